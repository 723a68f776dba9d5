"""Which node a local stack gets (``apps/cli/nodekind.py``): ``auto`` takes a real node
only where the machine allows one and has the guests' memory free, and says why."""

from __future__ import annotations

import pytest

from apps.cli import nodekind
from testbed.node import realnode

GiB = 1 << 30


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(
        realnode, "machine_allows", lambda fetch=False: realnode.Verdict(True, "root")
    )
    return monkeypatch


def test_auto_takes_a_real_node_with_the_guests_memory_free(machine: pytest.MonkeyPatch) -> None:
    machine.setattr(nodekind, "available_memory", lambda: 20 * GiB)
    kind, why = nodekind.choose("auto", 8 * GiB)
    assert kind == "real" and "auto: root" in why


def test_auto_falls_back_when_the_guests_memory_is_not_free(machine: pytest.MonkeyPatch) -> None:
    machine.setattr(nodekind, "available_memory", lambda: 6 * GiB)
    kind, why = nodekind.choose("auto", 8 * GiB)
    assert kind == "simulated"
    assert "6.0Gi is free of the 10.0Gi needed" in why


def test_asked_for_kinds_are_taken_as_asked(machine: pytest.MonkeyPatch) -> None:
    machine.setattr(nodekind, "available_memory", lambda: 1 * GiB)
    assert nodekind.choose("real", 8 * GiB)[0] == "real"
    assert nodekind.choose("simulated")[0] == "simulated"
    machine.setattr(
        realnode, "machine_allows", lambda fetch=False: realnode.Verdict(False, "not root")
    )
    kind, why = nodekind.choose("auto")
    assert kind == "simulated" and "not root" in why
    with pytest.raises(ValueError, match="node kind 'fake'"):
        nodekind.choose("fake")
