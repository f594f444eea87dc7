"""Prints whose rights it runs with (uid, gid, groups, home) and writes where a job writes: a file
under $GPUDECK_OUTPUT_DIR, one in its checkpoint folder and one in its working directory. It needs
no torch."""
import json
import os
from pathlib import Path

facts = {
    "uid": os.getuid(),
    "euid": os.geteuid(),
    "gid": os.getgid(),
    "groups": sorted(os.getgroups()),
    "home": os.environ.get("HOME"),
    "user": os.environ.get("USER"),
    "logname": os.environ.get("LOGNAME"),
}
Path("scratch.txt").write_text("the working copy is writable\n")
checkpoints = Path(os.environ["GPUDECK_CHECKPOINT_DIR"])
checkpoints.mkdir(parents=True, exist_ok=True)
(checkpoints / "step.txt").write_text("1\n")
(Path(os.environ["GPUDECK_OUTPUT_DIR"]) / "whoami.json").write_text(json.dumps(facts))
print("OWNER_FACTS " + json.dumps(facts), flush=True)
