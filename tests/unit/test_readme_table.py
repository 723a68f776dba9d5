"""The README's phase-transition table is the one ``python -m core.table`` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.table import TRANSITIONS, markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN, END = "<!-- transitions:begin -->", "<!-- transitions:end -->"


def readme_table(text: str) -> str:
    found = re.findall(re.escape(BEGIN) + r"\n(.*?)\n?" + re.escape(END), text, re.DOTALL)
    if len(found) != 1:
        raise AssertionError(f"README.md needs exactly one {BEGIN} ... {END} block")
    return found[0].strip()


def test_the_readme_table_is_generated_from_the_code() -> None:
    assert readme_table(README.read_text()) == markdown_table(), (
        "README.md has drifted from core/table.py; regenerate the block between the "
        "markers with `python -m core.table`"
    )


def test_python_m_core_table_prints_the_table() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "core.table"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert printed.strip() == markdown_table()


def test_the_table_has_a_row_per_transition() -> None:
    rows = markdown_table().splitlines()[2:]
    assert len(rows) == len(TRANSITIONS)
    for (phase, cause), mv in TRANSITIONS.items():
        assert any(
            row.startswith(f"| {phase or '(new)'} | {cause.value} |") and mv.reason in row
            for row in rows
        ), (phase, cause)


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text.replace("| VMResizeCompleted (Normal) | daemon |", "| x | daemon |"),
        lambda text: text.replace(END, ""),
        lambda text: text.replace(BEGIN, BEGIN + "\n| extra | row |"),
    ],
)
def test_drift_is_noticed(edit: object) -> None:
    good = f"intro\n{BEGIN}\n{markdown_table()}\n{END}\nmore\n"
    assert readme_table(good) == markdown_table()
    assert callable(edit)
    with pytest.raises(AssertionError):
        assert readme_table(edit(good)) == markdown_table()
