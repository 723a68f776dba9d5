"""chscale-controller: the VM lifecycle and the pod side of every resize."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

from adapters.k8s.client import (
    ApiError,
    Forbidden,
    Kube,
    is_conflict,
    load_api_client,
    node_capacity_refusal,
)
from adapters.k8s.events import EventRecorder
from adapters.k8s.informer import Informer
from adapters.k8s.leader import LeaderElector
from adapters.k8s.vms import DEFAULT_VMM_IMAGE, VmApi
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
from apps.controller.controller import Controller
from core.constants import API_GROUP, API_VERSION, PLURAL, VM_NAME_LABEL

log = logging.getLogger("chscale.controller")


def permanent_refusal(exc: BaseException) -> str | None:
    """The message of a ``pods/resize`` refusal no retry fixes: a 403 other than
    NodeCapacity (a ResourceQuota, RBAC, an admission webhook) or a 422 (invalid)."""
    if isinstance(exc, Forbidden) and node_capacity_refusal(exc) is None:
        return f"forbidden: {exc.message}"
    if isinstance(exc, ApiError) and exc.status == 422:
        return f"invalid: {exc.message}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chscale-controller", description=__doc__)
    add_common_flags(parser, metrics_port=8080)
    parser.add_argument("--leader-elect", action="store_true", help="run as one of N replicas")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    parser.add_argument("--lease-name", default="chscale-controller")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument(
        "--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    )
    parser.add_argument("--image", default=DEFAULT_VMM_IMAGE, help="image of the VM pod")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    kube = Kube(load_api_client(args.kubeconfig))
    vms = Informer(kube, f"/apis/{API_GROUP}/{API_VERSION}/{PLURAL}", name="vms")
    pods = Informer(kube, "/api/v1/pods", label_selector=VM_NAME_LABEL, name="vm-pods")
    queue = WorkQueue()
    metrics = Metrics("controller", vms)
    api = VmApi(kube, metrics.counting_events(EventRecorder(kube, "chscale-controller")))
    controller = Controller(
        api,
        vms,
        pods,
        queue,
        metrics,
        image=args.image,
        config=kernel_config(args),
        is_conflict=is_conflict,
        refusal=node_capacity_refusal,
        forbidden=permanent_refusal,
    )
    vms.add_handler(controller.on_vm)
    pods.add_handler(controller.on_pod)
    # Informers run even while not leading, so a successor takes over with a warm cache.
    vms.start()
    pods.start()
    leading = threading.Event()

    def start_leading() -> None:
        if not (vms.wait_synced(60) and pods.wait_synced(60)):
            log.error("caches did not sync")
            os._exit(1)
        if elector is not None and not elector.is_leader():
            # Leadership ended while the caches synced (stop_leading saw nothing started).
            log.warning(
                "lost leadership before starting; exiting", extra={"identity": args.identity}
            )
            os._exit(1)
        leading.set()
        for obj in vms.list():
            controller.on_vm("SYNC", obj)
        run_workers(args.workers, controller.run_worker, "reconcile")
        log.info("controller started", extra={"identity": args.identity, "workers": args.workers})

    def stop_leading() -> None:
        # Losing the lease means another replica may act: stop at once, as
        # controller-runtime does, rather than risk two writers.
        if leading.is_set():
            log.warning("lost leadership; exiting", extra={"identity": args.identity})
            os._exit(1)

    elector = None
    elector_thread = None
    if args.leader_elect:
        elector = LeaderElector(
            kube,
            args.lease_namespace,
            args.lease_name,
            args.identity,
            lease_duration=args.lease_duration,
            renew_deadline=args.lease_duration * 2 / 3,
            retry_period=max(args.lease_duration / 7.5, 0.2),
            on_started_leading=start_leading,
            on_stopped_leading=stop_leading,
        )
        elector_thread = threading.Thread(target=elector.run, name="leader", daemon=True)
        elector_thread.start()
    else:
        threading.Thread(target=start_leading, name="start", daemon=True).start()
    start_metrics(metrics, args, ready=lambda: vms.wait_synced(0) and pods.wait_synced(0))

    def shutdown() -> None:
        controller.stop()
        queue.shutdown()
        vms.stop()
        pods.stop()
        if elector is not None and elector_thread is not None:
            elector.stop()  # releases the lease so a successor takes over at once
            elector_thread.join(timeout=5)

    wait_for_signal(shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
