"""`make demo`'s scenario, end to end, inside `make test`."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.cli.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_grows_shrinks_and_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], control_plane: object
) -> None:
    # control_plane: only so that the binaries are built (with visible progress) first.
    assert run_demo(state_dir=str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    assert "webhook set spec.resources=" in out and "'cpu': '8'" in out
    for step in ("grow: 8 -> 12 vCPUs", "shrink: 12 -> 8 vCPUs", "infeasible: 18Gi"):
        assert step in out
    assert "refused (PodResizeInfeasible" in out
    assert "Phase timeline" in out and "ResizeInProgress" in out
    for reason in (
        "VMResizeInitiated",
        "VMResizePodInitiated",
        "VMResizeInProgress",
        "VMResizeCompleted",
        "VMPodResizeInfeasible",
    ):
        assert reason in out
    assert "node: simulated kubelet with 16 CPUs" in out  # the demo says which node it used
    assert "all processes stopped" in out
