"""chscale-kubelet: a simulated kubelet for one node.

It registers the node, binds pending pods that fit (first fit; there is no scheduler),
starts one VMM process per pod, and implements in-place pod resize as kubelets 1.33-1.35
do (PodResizePending / PodResizeInProgress, or legacy ``status.resize``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from adapters.k8s.client import Kube, load_api_client
from apps.common import logs
from apps.common.runtime import wait_for_signal
from core.quantity import QuantityError, parse_bytes, parse_millicores
from sim.kubelet import (
    DEFAULT_DEFERRED_RETRY_S,
    DEFAULT_ERROR_RETRY_S,
    KubeletConfig,
    KubeletInputError,
)
from testbed.kubelet.agent import KubeletAgent
from testbed.kubelet.vmm import DEFAULT_VMM_COMMAND, SocketPathTooLong, VmmRuntime

# Short on purpose: the socket path under it (<state-dir>/kubelet/pods/<uid>/volumes/
# kubernetes.io~empty-dir/vmm/ch.sock) must fit the 107 bytes of a Unix socket path.
DEFAULT_STATE_DIR = "/tmp/chscale"


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"label {item!r} is not key=value")
        labels[key] = value
    return labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chscale-kubelet", description=__doc__)
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or ~/.kube/config)")
    p.add_argument("--node-name", required=True)
    p.add_argument("--cpu", default="16", help="allocatable CPU, a quantity (16, 7500m)")
    p.add_argument("--memory", default="32Gi", help="allocatable memory, a quantity")
    p.add_argument("--node-labels", type=_labels, default={}, help="extra labels: k=v,k=v")
    p.add_argument("--node-ip", default="127.0.0.1")
    p.add_argument(
        "--resize-delay", type=float, default=0.0, help="seconds to actuate an accepted resize"
    )
    p.add_argument(
        "--deferred-retry",
        type=float,
        default=DEFAULT_DEFERRED_RETRY_S,
        help="seconds between periodic retries of deferred resizes",
    )
    p.add_argument(
        "--error-retry",
        type=float,
        default=DEFAULT_ERROR_RETRY_S,
        help="seconds between retries of a refused memory-limit decrease",
    )
    p.add_argument(
        "--legacy-resize-status",
        action="store_true",
        help="write status.resize instead of the PodResize* conditions (kubelets < 1.33)",
    )
    p.add_argument(
        "--no-observed-generation",
        action="store_true",
        help="do not report observedGeneration (kubelets < 1.33)",
    )
    p.add_argument(
        "--vmm-command",
        default=shlex.join(DEFAULT_VMM_COMMAND),
        help="the VMM to start per pod; '--api-socket path=<socket>' is appended "
        "(default: the Cloud Hypervisor simulator)",
    )
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    p.add_argument(
        "--vmm-socket-root",
        help="the pods directory holding each pod's VMM socket (default: <state-dir>/kubelet/pods)",
    )
    p.add_argument(
        "--namespace",
        help="serve only this namespace's pods (isolation on a shared API server; "
        "a real kubelet serves all namespaces)",
    )
    p.add_argument(
        "--no-bind",
        action="store_true",
        help="do not bind pending pods (a kube-scheduler does, as in a real cluster)",
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> KubeletConfig:
    try:
        cpu = parse_millicores(args.cpu)
        memory = parse_bytes(args.memory)
    except QuantityError as exc:
        raise SystemExit(f"chscale-kubelet: --cpu/--memory: {exc}") from exc
    try:
        return KubeletConfig(
            args.node_name,
            cpu=cpu,
            memory=memory,
            labels=args.node_labels,
            resize_delay_s=args.resize_delay,
            deferred_retry_s=args.deferred_retry,
            error_retry_s=args.error_retry,
            legacy_resize_status=args.legacy_resize_status,
            report_observed_generation=not args.no_observed_generation,
            host_ip=args.node_ip,
        )
    except KubeletInputError as exc:
        raise SystemExit(f"chscale-kubelet: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    config = build_config(args)
    root = args.vmm_socket_root or os.path.join(args.state_dir, "kubelet", "pods")
    try:
        runtime = VmmRuntime(os.path.abspath(root), shlex.split(args.vmm_command))
    except SocketPathTooLong as exc:
        raise SystemExit(f"chscale-kubelet: {exc}") from exc
    kube = Kube(load_api_client(args.kubeconfig))
    agent = KubeletAgent(kube, config, runtime, namespace=args.namespace, bind=not args.no_bind)
    try:
        agent.start()
    except BaseException:
        runtime.stop_all()
        raise
    wait_for_signal(agent.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
