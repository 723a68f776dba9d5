"""Which node kind a local stack gets (``chscale up`` and ``chscale demo``), and why.

``auto`` takes a real node (kubelet v1.35 + containerd + runc) when this machine allows
one, else the simulated kubelet (ADR 0014). A real node's guests really hold their
memory, so a caller that knows how much its guests will hold asks for that much to be
free as well; otherwise ``auto`` falls back to the simulated kubelet and says so.
"""

from __future__ import annotations

import os

KINDS = ("auto", "real", "simulated")
# Besides the guests' memory: the control plane, the daemons and the test bench.
MEMORY_MARGIN = 2 << 30


def default_kind() -> str:
    """``$CHSCALE_NODE`` if set (a test suite pins the kind for the stacks it starts),
    else ``auto``."""
    return os.environ.get("CHSCALE_NODE", "auto").strip().lower() or "auto"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose(wanted: str, guest_memory: int = 0) -> tuple[str, str]:
    """The node kind (``real`` or ``simulated``) for ``wanted``, and a line saying which
    and why. ``guest_memory``: what the guests will really hold on a real node."""
    if wanted not in KINDS:
        raise ValueError(f"node kind {wanted!r}: expected one of {', '.join(KINDS)}")
    if wanted == "simulated":
        return "simulated", "node: simulated kubelet (--kubelet simulated)"
    from testbed.node.realnode import machine_allows

    verdict = machine_allows(fetch=True)
    if wanted == "real":
        if not verdict.ok:
            return "real", f"node: real kubelet asked for, but {verdict.reason}; it will fail"
        return (
            "real",
            f"node: real kubelet v1.35 + containerd + runc (--kubelet real: {verdict.reason})",
        )
    if not verdict.ok:
        return "simulated", f"node: simulated kubelet (auto: no real node here, {verdict.reason})"
    free = available_memory()
    needed = guest_memory + MEMORY_MARGIN
    if guest_memory and free is not None and free < needed:
        return "simulated", (
            f"node: simulated kubelet (auto: a real node's guests hold their memory, and "
            f"{free / 2**30:.1f}Gi is free of the {needed / 2**30:.1f}Gi needed)"
        )
    return "real", f"node: real kubelet v1.35 + containerd + runc (auto: {verdict.reason})"
