"""The simulator's ballast (``--sim-touch-memory``) really holds the guest's memory: the
process's resident set follows it up and back down, as a VMM's does with its guest."""

from __future__ import annotations

from pathlib import Path

from core.constants import MiB
from testbed.chsim.ballast import CHUNK, PAGE, Ballast


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def test_the_resident_set_follows_the_ballast_up_and_down() -> None:
    ballast = Ballast()
    before = _resident()
    try:
        ballast.resize(CHUNK + 32 * MiB)  # a whole chunk and a partial one
        assert _resident() - before >= CHUNK + 30 * MiB
        ballast.resize(40 * MiB)  # whole chunks go, the last is remapped smaller
        assert ballast.size == 40 * MiB
        assert _resident() - before < 48 * MiB
        ballast.resize(40 * MiB + 1)  # rounded up to a page
        assert ballast.size == 40 * MiB + PAGE
    finally:
        ballast.close()
    assert ballast.size == 0
    assert _resident() - before < 8 * MiB
