"""chscale-daemon: one per node; boots VMMs and carries out the VMM step of resizes."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.k8s.client import Kube, is_conflict, load_api_client
from adapters.k8s.events import EventRecorder
from adapters.k8s.informer import Informer
from adapters.k8s.vms import VmApi
from adapters.k8s.workqueue import WorkQueue
from apps.common import logs
from apps.common.runtime import (
    Metrics,
    add_common_flags,
    kernel_config,
    run_workers,
    start_metrics,
    wait_for_signal,
)
from apps.daemon.daemon import Daemon
from apps.daemon.vmm import BootDefaults, Vmm
from core.constants import API_GROUP, API_VERSION, PLURAL, VM_NAME_LABEL
from core.podlayout import DEFAULT_PODS_ROOT

log = logging.getLogger("chscale.daemon")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chscale-daemon", description=__doc__)
    add_common_flags(parser, metrics_port=8081)
    parser.add_argument("--node-name", required=True)
    parser.add_argument(
        "--vmm-socket-root",
        default=DEFAULT_PODS_ROOT,
        help="the kubelet's pods directory; sockets are <root>/<pod-uid>/volumes/"
        "kubernetes.io~empty-dir/vmm/ch.sock",
    )
    parser.add_argument("--kernel", help="default guest kernel when the VM spec names none")
    parser.add_argument("--initramfs")
    parser.add_argument("--cmdline", default="console=ttyS0 quiet")
    parser.add_argument("--vmm-timeout", type=float, default=5.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    kube = Kube(load_api_client(args.kubeconfig))
    # Only this node's VMs: the controller records status.nodeName as soon as it sees
    # the pod bound, before the VM can need anything from a daemon (ADR 0004 addendum).
    vms = Informer(
        kube,
        f"/apis/{API_GROUP}/{API_VERSION}/{PLURAL}",
        field_selector=f"status.nodeName={args.node_name}",
        name="node-vms",
    )
    pods = Informer(
        kube,
        "/api/v1/pods",
        label_selector=VM_NAME_LABEL,
        field_selector=f"spec.nodeName={args.node_name}",
        name="node-vm-pods",
    )
    queue = WorkQueue()
    metrics = Metrics("daemon", vms)
    defaults = BootDefaults(args.kernel, args.initramfs, args.cmdline)

    def vmm_for_pod(pod: dict[str, Any], vm: dict[str, Any]) -> Vmm:
        uid = pod["metadata"]["uid"]
        boot = ((vm.get("spec") or {}).get("instance") or {}).get("boot")
        version = (vm.get("status") or {}).get("vmmVersion")
        # Only inside the pod's own directory, only to the pod's own VMM (ADR 0011).
        client = CloudHypervisorClient.for_pod(args.vmm_socket_root, uid, args.vmm_timeout)
        return Vmm(
            client.socket_path,
            boot,
            defaults,
            args.vmm_timeout,
            version if isinstance(version, str) and version else None,
            client=client,
        )

    daemon = Daemon(
        VmApi(
            kube,
            metrics.counting_events(EventRecorder(kube, "chscale-daemon", host=args.node_name)),
        ),
        vms,
        pods,
        queue,
        metrics,
        node_name=args.node_name,
        vmm_for_pod=vmm_for_pod,
        config=kernel_config(args),
        is_conflict=is_conflict,
    )
    vms.add_handler(daemon.on_vm)
    pods.add_handler(daemon.on_pod)
    pods.start()
    vms.start()
    if not (pods.wait_synced(60) and vms.wait_synced(60)):
        log.error("caches did not sync")
        return 1
    run_workers(args.workers, daemon.run_worker, "reconcile")
    start_metrics(metrics, args, ready=lambda: True)
    log.info("daemon started", extra={"node": args.node_name})

    def shutdown() -> None:
        daemon.stop()
        queue.shutdown()
        vms.stop()
        pods.stop()

    wait_for_signal(shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
