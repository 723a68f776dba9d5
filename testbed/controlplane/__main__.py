"""``python -m testbed.controlplane``: start a control plane and keep it until Ctrl-C.

Handy for poking at the API server by hand (``kubectl --kubeconfig ...``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from testbed.controlplane.build import BuildError
from testbed.controlplane.launcher import ControlPlane, ControlPlaneError


def _node(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"--node {text!r}: expected NAME:CPU:MEMORY")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.controlplane",
        description="Run etcd + kube-apiserver on 127.0.0.1 with the VirtualMachine CRD.",
    )
    parser.add_argument(
        "--state-dir", type=Path, help="keep state here (default: a temporary directory)"
    )
    parser.add_argument(
        "--node",
        type=_node,
        action="append",
        default=[],
        metavar="NAME:CPU:MEMORY",
        help="register a Ready node, e.g. node-a:16:32Gi (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with ControlPlane(args.state_dir, build_output=sys.stdout) as cp:
            for name, cpu, memory in args.node:
                cp.add_node(name, cpu, memory)
            print(f"server:     {cp.server_url}")
            print(f"kubeconfig: {cp.kubeconfig_path}")
            print(f"logs:       {cp.logs_dir}")
            print(f"ready in {cp.timings['total']:.1f}s; Ctrl-C stops it")
            print(f"export KUBECONFIG={cp.kubeconfig_path}", flush=True)
            while not stop.wait(1.0):
                if not cp.running:
                    print("kube-apiserver exited; see the logs above", file=sys.stderr)
                    return 1
    except (BuildError, ControlPlaneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
