"""A one-node Slurm on loopback, from Debian's packages, for benchmarks to run side by side with gpudeck.

It writes its whole configuration (slurm.conf, a munge key) in a folder of its own, starts munged,
slurmctld and slurmd in the foreground as children of this process, and stops only those. Tuned for
latency, as a site that cares about it would: no batch scheduling delay, no minimum interval between
scheduling passes. The node has as many CPUs as the gpudeck node in the same bench has GPUs, and each
job asks for one, so both run the same number of jobs at once.

    apt-get install slurm-wlm munge
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
READY_TIMEOUT = 60.0
_JOB_ID = re.compile(r"Submitted batch job (\d+)")


def missing() -> str:
    """Why Slurm cannot run here ("" when it can)."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs as their users"
    return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _program(proc: subprocess.Popen[bytes]) -> str:
    """The program a daemon runs (`_spawn` starts each from a tuple of strings)."""
    command = proc.args
    assert isinstance(command, tuple), command
    return str(command[0])


class LoopbackSlurm:
    """munged + slurmctld + slurmd for one node named after this host, all on 127.0.0.1."""

    def __init__(self, folder: Path, cpus: int) -> None:
        self.folder = folder
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "logs", "out"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder / "munge", 0o700)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = self.folder / "munge" / "munge.socket"
        self._spawn(_binary("munged"), "-F", "-f", f"--socket={socket_path}", f"--key-file={key}",
                    f"--pid-file={self.folder / 'munge' / 'munged.pid'}",
                    f"--log-file={self.folder / 'logs' / 'munged.log'}",
                    f"--seed-file={self.folder / 'munge' / 'munged.seed'}")
        self._wait(socket_path.exists, "munged to open its socket")
        (self.folder / "slurm.conf").write_text(self._config(socket_path))
        self._spawn(_binary("slurmctld"), "-D", "-i")
        self._spawn(_binary("slurmd"), "-D", "-N", self.node)
        self._wait(self._node_idle, "the Slurm node to be idle")

    def _config(self, munge_socket: Path) -> str:
        folder = self.folder
        return "\n".join([
            "ClusterName=gpudeckbench",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'logs' / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'logs' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MinJobAge=2",
            "KillWait=2",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=bench Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, *command: str) -> None:
        with open(self.folder / "logs" / f"{Path(command[0]).name}.out", "ab") as out:
            self.procs.append(subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready():
            dead = [_program(p) for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in (self.folder / "logs").iterdir())
                raise RuntimeError(f"Slurm did not come up (waiting for {what}; exited: {dead})\n{logs}")
            time.sleep(0.1)

    def _node_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def sbatch(self, *args: str) -> int:
        result = subprocess.run(["sbatch", "--parsable", "-c", "1", "-o", str(self.folder / "out" / "%j.out"), *args],
                                env=self.env, capture_output=True, text=True, check=True)
        return int(result.stdout.strip().split(";")[0])

    def output(self, job: int) -> Path:
        return self.folder / "out" / f"{job}.out"

    def active_jobs(self) -> int:
        result = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, check=True)
        return len(result.stdout.split())

    def stop(self) -> None:
        """Stop the daemons this object started (and what slurmd started for them), nothing else."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 15)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        self.procs.clear()
