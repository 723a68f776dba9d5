"""The long-lived parent of a stack started by ``chscale up``: it owns every process
of the stack (so they all die with it) and stops them on SIGTERM (``chscale down``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from apps.common import logs
from testbed.localstack.stack import Stack

log = logging.getLogger("chscale.stack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chscale-stack-supervisor")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-cpu", default="16")
    parser.add_argument("--node-memory", default="32Gi")
    parser.add_argument("--resize-delay", type=float, default=0.0)
    parser.add_argument("--vmm-command")
    parser.add_argument("--kernel")
    parser.add_argument("--kubelet", choices=("simulated", "real"), default="simulated")
    args = parser.parse_args(argv)
    logs.setup("info")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = Stack(
        args.state_dir,
        nodes=args.nodes,
        node_cpu=args.node_cpu,
        node_memory=args.node_memory,
        resize_delay=args.resize_delay,
        vmm_command=args.vmm_command,
        kernel=args.kernel,
        kubelet=args.kubelet,
        progress=lambda msg: log.info(msg),
    )
    try:
        stack.start()
    except Exception as exc:
        (args.state_dir / "failed").write_text(f"{exc}\n")
        log.exception("stack failed to start")
        return 1
    (args.state_dir / "ready").write_text("ready\n")
    log.info("stack ready", extra={"state_dir": str(args.state_dir)})
    reported: set[str] = set()
    while not stop.wait(1.0):
        for child in stack.children.values():
            if not child.alive() and child.name not in reported:
                reported.add(child.name)
                log.warning("a stack process exited", extra={"child": child.name})
    log.info("stopping stack")
    stack.stop()
    (args.state_dir / "ready").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
