"""gpudeck.text: what a peer or a user wrote, made safe for a person's terminal, and which job names
are accepted where they enter (JobSpec.check, for the CLI, the dashboard's form and the coordinator)."""

from __future__ import annotations

import pytest

from gpudeck.model import JobSpec, RunSpec
from gpudeck.text import MAX_NAME, safe_output, visible

ESC = "\x1b"


def test_visible_shows_every_control_as_its_escape_and_keeps_unicode():
    assert visible("a\x1b]0;t\x07\x00\x7f\x9b2J\t\n\r") == "a\\x1b]0;t\\x07\\x00\\x7f\\x9b2J\\t\\n\\r"
    assert visible("crème 東京 🚀 [b]") == "crème 東京 🚀 [b]"


def test_a_jobs_output_keeps_its_colours_and_nothing_else_a_terminal_acts_on():
    line = f"{ESC}[1;31mred{ESC}[0m {ESC}]0;title{ESC}\\ {ESC}]52;c;ZXZpbA=={ESC}\\ {ESC}[2J{ESC}[H\x9b5A\x08é\tend"
    assert safe_output(line) == f"{ESC}[1;31mred{ESC}[0m   é\tend"
    assert safe_output(line, colours=False) == "red   é\tend"


def _spec(name: str) -> JobSpec:
    return JobSpec(name=name, gpus=1, run=RunSpec(workload="data-parallel"))


@pytest.mark.parametrize("name", ["ddp", "crème brûlée", "東京-run", "🚀 launch", "a[/]b", "x" * MAX_NAME])
def test_printable_names_are_accepted(name: str):
    _spec(name).check()


@pytest.mark.parametrize("name, shown", [
    ("evil\x1b]0;pwned\x07\rX", "evil\\x1b]0;pwned\\x07\\rX"),
    ("admin\u202egnp.exe", "admin\\u202egnp.exe"),  # reads as another name
    ("zero\u200bwidth", "zero\\u200bwidth"),
])
def test_names_with_control_or_invisible_characters_are_refused_showing_them(name: str, shown: str):
    with pytest.raises(ValueError) as refused:
        _spec(name).check()
    assert str(refused.value) == ("a job name must be printable text, without control or invisible characters: "
                                  f"{shown} is not")


@pytest.mark.parametrize("name", ["", "x" * (MAX_NAME + 1)])
def test_empty_and_long_names_are_refused(name: str):
    with pytest.raises(ValueError, match=f"a job name must be 1 to {MAX_NAME} characters, not {len(name)}"):
        _spec(name).check()
