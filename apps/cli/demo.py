"""``chscale demo``: the whole story in a minute, on a real API server.

Start the local stack, create the seed's VM, grow it (pod first, then guest), shrink it
(guest first, then pod), ask for more vCPUs than the node can ever give (refused cleanly,
the VM keeps running), print a timeline, tear everything down. The node is a real one
(kubelet v1.35 + containerd + runc, the guest's memory really held) where the machine
allows it and has the guest's memory free, else the simulated kubelet; the demo says
which and why.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters.k8s.client import Kube
from apps.cli import nodekind
from apps.cli.progress import Progress
from apps.cli.vmops import (
    Follower,
    apply_vm,
    converged,
    event_reasons,
    resize_refused,
    resize_vm,
    summary,
    wait_for_events,
)
from testbed.localstack.stack import Stack

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vm.yaml"
NAMESPACE = "default"
NAME = "my-vm"
# A node the seed's VM grows to fill (12 vCPUs) and can never outgrow within its own
# ceiling (16 vCPUs: 2 x 8) but for Infeasible. CPUs, not memory: a real node has this
# machine's memory, which may fit any size the VM may reach, but the CPUs it is told.
NODE_CPU, NODE_MEMORY = "12", "16Gi"
# What the guest holds at most during the demo (really, on a real node).
GUEST_MEMORY_MAX = 8 << 30

STEPS: list[tuple[str, int | None, str | None, bool]] = [
    # title, vCPUs, memory, expect refusal
    ("grow: 8 -> 12 vCPUs, 4Gi -> 8Gi (pod first, then guest)", 12, "8Gi", False),
    ("shrink: 12 -> 8 vCPUs, 8Gi -> 6Gi (guest first, then pod)", 8, "6Gi", False),
    ("infeasible: 16 vCPUs on a 12-CPU node (refused, VM keeps running)", 16, None, True),
]
# The controller records an Event after the status write it belongs to, so a step can be
# over (as the VM's status shows) before its Event exists; the timeline waits for these.
CLOSING_EVENTS = ("VMResizeCompleted", "VMPodResizeInfeasible")
EVENT_WAIT_S = 10.0


def _steps_closed(events: list[dict[str, Any]]) -> bool:
    return set(CLOSING_EVENTS) <= set(event_reasons(events))


def _load_example() -> dict[str, Any]:
    import yaml  # type: ignore[import-untyped]  # pulled in by the kubernetes client

    return yaml.safe_load(EXAMPLE.read_text())


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S.%f")[:-3]


def run_demo(keep: bool = False, state_dir: str | None = None, kubelet: str = "auto") -> int:
    progress = Progress()
    progress.step("chscale demo: resize a running VM in place, on a real kube-apiserver")
    progress.step("building the control plane if needed (the first run takes a few minutes)")
    from testbed.controlplane.build import ensure_binaries

    ensure_binaries()
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="chscale-demo-")
        state_dir = tmp.name
    kind, why = nodekind.choose(kubelet, GUEST_MEMORY_MAX)
    stack = Stack(
        Path(state_dir),
        nodes=1,
        node_cpu=NODE_CPU,
        node_memory=NODE_MEMORY,
        progress=progress.step,
        kubelet=kind,
    )
    memory = NODE_MEMORY if kind == "simulated" else "this machine's memory"
    started = time.monotonic()
    try:
        progress.step(why)
        stack.start()
        progress.done(
            f"stack up in {time.monotonic() - started:.1f}s "
            f"({kind} node: {NODE_CPU} CPUs, {memory})"
        )
        assert stack.control_plane is not None
        kube = Kube(stack.control_plane.api_client())
        return _scenario(kube, progress)
    finally:
        if keep:
            progress.step(f"left running; KUBECONFIG={stack.kubeconfig}; stop with Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        progress.step("tearing down")
        stack.stop()
        if tmp is not None:
            tmp.cleanup()
        progress.done("all processes stopped")


def _scenario(kube: Kube, progress: Progress) -> int:
    follower = Follower(kube, NAMESPACE, NAME)
    obj = apply_vm(kube, _load_example(), NAMESPACE)
    resources = (obj.get("spec") or {}).get("resources")
    progress.step(f"created {NAME} from examples/vm.yaml; webhook set spec.resources={resources}")
    t0 = time.monotonic()
    follower.wait(converged, 60)
    progress.done(
        f"{NAME} running in {time.monotonic() - t0:.2f}s: {summary(follower.poll() or {})}"
    )
    durations: list[tuple[str, float, str]] = []
    for title, vcpus, memory, expect_refusal in STEPS:
        progress.step(title)
        resize_vm(kube, NAMESPACE, NAME, vcpus, memory)
        t0 = time.monotonic()
        obj = follower.wait(lambda o: converged(o) or resize_refused(o) is not None, 60)
        elapsed = time.monotonic() - t0
        refused = resize_refused(obj)
        if expect_refusal != (refused is not None):
            progress.fail(f"unexpected outcome: {summary(obj)} {refused or ''}")
            return 1
        outcome = f"refused ({refused})" if refused else summary(obj)
        durations.append((title, elapsed, outcome))
        progress.done(f"{elapsed * 1000:.0f} ms: {outcome}")
    _print_timeline(follower, kube, durations)
    return 0


def _print_timeline(
    follower: Follower, kube: Kube, durations: list[tuple[str, float, str]]
) -> None:
    print("\nPhase timeline (as observed by polling the VM every 20 ms):")
    start = follower.timeline[0][0] if follower.timeline else 0.0
    for i, (t, phase, text) in enumerate(follower.timeline):
        nxt = follower.timeline[i + 1][0] if i + 1 < len(follower.timeline) else None
        held = f"{(nxt - t) * 1000:7.0f} ms" if nxt else "        -"
        print(f"  {_ts(t)}  +{t - start:6.2f}s  {phase:<20} {held}  {text}")
    print("\nEvents recorded on the VM (in order):")
    for ev in wait_for_events(kube, NAMESPACE, NAME, _steps_closed, EVENT_WAIT_S):
        count = ev.get("count") or 1
        print(f"  {ev.get('type'):<8} {ev.get('reason'):<24} x{count}  {ev.get('message')}")
    print("\nResize durations (spec change -> Running with allocated == spec):")
    for title, elapsed, outcome in durations:
        print(f"  {elapsed * 1000:7.0f} ms  {title}: {outcome}")
    print()
