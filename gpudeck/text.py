"""Text from peers and users on a person's terminal: control characters made visible, names checked,
and a job's own output let through with its colours but without sequences that take over the terminal.

A job name like "evil\\x1b]0;pwned\\x07" printed raw would set the terminal's title; "\\x1b[2J"
would clear the screen. Everything gpudeck prints that it did not write itself goes through
`visible` (names, reasons, errors) or `safe_output` (a job's output).
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls, DEL and C1 controls; each is shown as \xNN (\t, \n and \r as themselves escaped).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
MAX_NAME = 128


def visible(text: str) -> str:
    """`text` with every control character replaced by its escape, so it prints as what it is."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot name a job (or a node, a user), or None: printable, 1 to MAX_NAME characters.
    Printable as Python's str.isprintable says: no controls, and none of the invisible characters
    (direction overrides, zero-width spaces) that would make a name read as another."""
    if not 0 < len(name) <= MAX_NAME:
        return f"a {what} name must be 1 to {MAX_NAME} characters, not {len(name)}"
    if not name.isprintable():
        shown = "".join(map(_readable, name))
        return f"a {what} name must be printable text, without control or invisible characters: {shown} is not"
    return None


def _readable(char: str) -> str:
    """One character of a refused name as a person can read it: itself, or its escape."""
    if char.isprintable():
        return char
    return visible(char) if _CONTROL.match(char) else f"\\u{ord(char):04x}"


# A job's output: SGR (colours, bold: ESC [ params m) passes; any other escape sequence, OSC (titles,
# clipboard), cursor moves and screen clears are dropped, as are controls other than \t and \n.
_SEQUENCE = re.compile(
    r"\x1b\[[0-9;:]*m"  # SGR, kept (see safe_output)
    r"|\x1b\[[0-?]*[ -/]*[@-~]"  # other CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC, ended by BEL or ST
    r"|\x1b[P^_X][^\x1b]*(?:\x1b\\)"  # DCS, PM, APC, SOS
    r"|\x1b[^\[\]P^_X]?"  # any other escape
    r"|\x9b[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # 8-bit CSI, lone controls
)


_SGR = re.compile(r"\x1b\[[0-9;:]*m")


def safe_output(line: str, colours: bool = True) -> str:
    """One line of a job's output with nothing left that a terminal would act on but its colours
    (and not those either with `colours=False`, for widgets that show text as it is)."""
    return _SEQUENCE.sub(lambda m: m.group() if colours and _SGR.fullmatch(m.group()) else "", line)


def visible_data(value: Any) -> Any:
    """Every string in a peer's JSON-like data (not the keys) passed through `visible`."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {key: visible_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [visible_data(item) for item in value]
    return value


def counted(count: int, noun: str) -> str:
    """'1 GPU', '2 GPUs', '0 jobs': a count with its noun, singular only for one."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


_BINARY_UNITS = ("", "Ki", "Mi", "Gi", "Ti")


def human_bytes(count: float, suffix: str = "B") -> str:
    """1023 B, 1.5 KiB, 1015 KiB, 12 MiB, 3.4 GiB: each number in the largest binary unit it is at
    least one of, rounded to what is printed, so just under a MiB reads 1015 KiB (never 0.99 MiB,
    nor 1024 KiB). The one formatter of sizes and, with suffix "B/s", of rates."""
    value = float(count)
    for unit in _BINARY_UNITS:
        shown = f"{value:.1f}" if unit and abs(round(value, 1)) < 10 else f"{value:.0f}"
        if abs(float(shown)) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{shown} {unit}{suffix}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(bytes_per_second: float) -> str:
    """A transfer rate: '1015 KiB/s'."""
    return human_bytes(bytes_per_second, "B/s")


def spoken_duration(seconds: float) -> str:
    """How long, as a person says it, whole units down: '40 s', '25 min', '2 h', '2 h 5 min'."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    hours, minutes = divmod(whole // 60, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def idle_note(idle_since: float | None, now: float) -> str:
    """What `jobs` and the dashboard say of a running job whose GPUs are all at 0 % ('' when not)."""
    return f"idle {spoken_duration(now - idle_since)}: its GPUs are at 0 %" if idle_since is not None else ""
