"""`make demo`'s scenario, end to end, inside `make test`: on the simulated node and, where
the machine allows one, on a real node (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.cli.demo import run_demo

from .conftest import node_kinds

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", node_kinds())
def test_demo_grows_shrinks_and_refuses(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], control_plane: object
) -> None:
    # control_plane: only so that the binaries are built (with visible progress) first.
    assert run_demo(state_dir=str(tmp_path / "demo"), kubelet=kind) == 0
    out = capsys.readouterr().out
    assert "webhook set spec.resources=" in out and "'cpu': '8'" in out
    for step in ("grow: 8 -> 12 vCPUs", "shrink: 12 -> 8 vCPUs", "infeasible: 16 vCPUs"):
        assert step in out
    assert "refused (PodResizeInfeasible" in out
    assert "Node didn't have enough capacity: cpu" in out
    assert "Phase timeline" in out and "ResizeInProgress" in out
    for reason in (
        "VMResizeInitiated",
        "VMResizePodInitiated",
        "VMResizeInProgress",
        "VMResizeCompleted",
        "VMPodResizeInfeasible",
    ):
        assert reason in out
    # The demo says which node it used.
    said = "node: real kubelet v1.35" if kind == "real" else "node: simulated kubelet"
    assert said in out and f"{kind} node: 12 CPUs" in out
    assert "all processes stopped" in out
