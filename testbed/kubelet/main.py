"""chscale-kubelet: a simulated kubelet for one node.

It registers the node, binds pending pods that fit (first fit; there is no scheduler),
starts one VMM process per pod, and implements in-place pod resize as kubelets 1.33-1.35
do (PodResizePending / PodResizeInProgress, or legacy ``status.resize``).

Node sizes: --cpu/--memory are the capacity; allocatable is capacity minus
--system-reserved and --kube-reserved minus the --eviction-hard memory threshold. A
resize beyond capacity minus reserved is Infeasible; one beyond what is free of
allocatable is Deferred (so one inside the eviction threshold is Deferred for ever).
A memory-limit decrease is refused (PodResizeInProgress reason Error) while what the VMM
process holds is at or above the new limit: the simulator's sim.guest "rss", else the
VMM's VmRSS. A VMM that exits terminates its container; with restartPolicy Never the pod
becomes Failed (Succeeded on exit 0), otherwise the VMM is started again.
Defaults are fast; the real kubelet is about --runtime-poll 1 --error-retry 12
--deferred-retry-initial 30 --deferred-retry 180.
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


def _reserved(text: str) -> dict[str, str]:
    """``cpu=500m,memory=1Gi``, the kubelet's --system-reserved/--kube-reserved form."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("cpu", "memory") or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: expected cpu=QUANTITY or memory=QUANTITY")
        try:
            parse_millicores(value) if key == "cpu" else parse_bytes(value)
        except QuantityError as exc:
            raise argparse.ArgumentTypeError(f"{key}: {exc}") from exc
        out[key] = value
    return out


def _eviction(text: str) -> str:
    """``memory.available<QUANTITY`` or ``memory.available<N%`` (of capacity)."""
    if not text:
        return text
    signal, sep, value = text.partition("<")
    if signal.strip() != "memory.available" or not sep or not value.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected memory.available<QUANTITY or memory.available<N%"
        )
    return text


def eviction_bytes(text: str, capacity: int) -> int:
    if not text:
        return 0
    value = text.partition("<")[2].strip()
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError as exc:
            raise SystemExit(
                f"chscale-kubelet: --eviction-hard: {value!r} is not a percentage"
            ) from exc
        if not 0 <= percent <= 100:
            raise SystemExit(f"chscale-kubelet: --eviction-hard: {value!r} is not within 0-100%")
        return int(capacity * percent / 100)
    try:
        return parse_bytes(value)
    except QuantityError as exc:
        raise SystemExit(f"chscale-kubelet: --eviction-hard: {exc}") from exc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from exc
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be finite and >= 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chscale-kubelet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster or ~/.kube/config)")
    p.add_argument("--node-name", required=True)
    p.add_argument("--cpu", default="16", help="node CPU capacity, a quantity (16, 7500m)")
    p.add_argument("--memory", default="32Gi", help="node memory capacity, a quantity")
    p.add_argument(
        "--system-reserved",
        type=_reserved,
        default={},
        metavar="cpu=Q,memory=Q",
        help="taken off capacity for the OS; Infeasible is judged against capacity minus "
        "this and --kube-reserved (default: none)",
    )
    p.add_argument(
        "--kube-reserved",
        type=_reserved,
        default={},
        metavar="cpu=Q,memory=Q",
        help="taken off capacity for Kubernetes daemons, like --system-reserved",
    )
    p.add_argument(
        "--eviction-hard",
        type=_eviction,
        default="",
        metavar="memory.available<Q|N%",
        help="hard-eviction threshold, taken off allocatable only: admission and Deferred "
        "are judged against it, Infeasible is not, so a resize within it stays Deferred "
        "for ever (default: none; the real kubelet's is memory.available<100Mi)",
    )
    p.add_argument(
        "--cpu-manager-policy",
        choices=("none", "static"),
        default="none",
        help="static: a Guaranteed pod's resize is Infeasible (as 1.33-1.35 do)",
    )
    p.add_argument(
        "--memory-manager-policy",
        choices=("None", "Static"),
        default="None",
        help="Static: a Guaranteed pod's resize is Infeasible (as 1.33-1.35 do)",
    )
    p.add_argument("--node-labels", type=_labels, default={}, help="extra labels: k=v,k=v")
    p.add_argument("--node-ip", default="127.0.0.1")
    p.add_argument(
        "--resize-delay",
        type=_seconds,
        default=0.0,
        help="seconds from accepting a resize to actuating it (default: 0)",
    )
    p.add_argument(
        "--runtime-poll",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="model the kubelet's runtime poll (PLEG relist, ~1 s on a real node): an "
        "accepted resize is actuated and reported on the first tick of this period after "
        "--resize-delay (default: 0, as fast as possible)",
    )
    p.add_argument(
        "--deferred-retry-initial",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds from a resize becoming Deferred to its first periodic retry (the "
        "real kubelet: 30; default: the --deferred-retry period)",
    )
    p.add_argument(
        "--deferred-retry",
        type=_seconds,
        default=DEFAULT_DEFERRED_RETRY_S,
        help="seconds between periodic retries of deferred resizes, in priority order "
        f"(the real kubelet: 180; default: {DEFAULT_DEFERRED_RETRY_S:g}); they are also "
        "retried whenever a pod is added, removed, terminated or resized",
    )
    p.add_argument(
        "--error-retry",
        type=_seconds,
        default=DEFAULT_ERROR_RETRY_S,
        metavar="SECONDS",
        help="the pod sync period while a memory-limit decrease is refused (usage >= the "
        "new limit): usage is re-read and the decrease retried this often, and on every "
        f"change of the pod (the real kubelet: ~12-15; default: {DEFAULT_ERROR_RETRY_S:g})",
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
    reserved_cpu = reserved_memory = 0
    for reserved in (args.system_reserved, args.kube_reserved):
        reserved_cpu += parse_millicores(reserved.get("cpu", "0"))
        reserved_memory += parse_bytes(reserved.get("memory", "0"))
    try:
        return KubeletConfig(
            args.node_name,
            cpu=cpu,
            memory=memory,
            reserved_cpu=reserved_cpu,
            reserved_memory=reserved_memory,
            eviction_hard_memory=eviction_bytes(args.eviction_hard, memory),
            cpu_manager_static=args.cpu_manager_policy == "static",
            memory_manager_static=args.memory_manager_policy == "Static",
            runtime_poll_s=args.runtime_poll,
            deferred_retry_initial_s=args.deferred_retry_initial,
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
