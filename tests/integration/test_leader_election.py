"""Two controller replicas: only the leader acts, and the other takes over when it dies."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.k8s.client import Kube, NotFound
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, converged, resize_vm
from core.constants import API_GROUP, API_VERSION
from testbed.localstack.stack import NodeSpec, Stack

pytestmark = pytest.mark.integration

LEASE = "/apis/coordination.k8s.io/v1/namespaces/default/leases/chscale-controller"


@pytest.fixture(scope="module")
def stack(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("leader"),
        nodes=[NodeSpec("le-node", "16", "32Gi")],
        control_plane=control_plane,
        controller_replicas=2,
        webhook=False,
    )
    s.start()
    yield s
    s.stop()


def _metric(stack: Stack, controller: str, name: str) -> float:
    port = stack.metrics_ports[controller]
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line.startswith(name)
    )


def _leader(kube: Kube, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = kube.get(LEASE)["spec"].get("holderIdentity")
        except NotFound:
            holder = None
        if holder:
            return str(holder)
        time.sleep(0.1)
    raise AssertionError("no controller took the lease")


def test_only_the_leader_acts_and_the_other_takes_over(stack: Stack, namespace: str) -> None:
    assert stack.control_plane is not None
    kube = Kube(stack.control_plane.api_client())
    leader = _leader(kube)
    follower_name = next(n for n in ("controller-0", "controller-1") if n != leader)
    vm = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": "ha", "namespace": namespace},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": 2}, "memory": {"size": "2Gi"}},
            "nodeSelector": {"kubernetes.io/hostname": "le-node"},
        },
    }
    kube.create(vm_path(namespace), vm)
    follow = Follower(kube, namespace, "ha")
    follow.wait(converged, 60)
    resize_vm(kube, namespace, "ha", 4, "4Gi")
    follow.wait(converged, 60)
    reconciles = "chscale_controller_reconciles_total"
    assert _metric(stack, leader, reconciles) > 0
    assert _metric(stack, follower_name, reconciles) == 0, "the standby reconciled"
    # The leader dies without releasing its lease; the standby must wait it out, then act.
    stack.children[leader].kill()
    started = time.monotonic()
    resize_vm(kube, namespace, "ha", 3, "3Gi")
    follow.wait(converged, 60)
    took = time.monotonic() - started
    assert _leader(kube) == follower_name
    assert _metric(stack, follower_name, reconciles) > 0
    assert took < 30, f"takeover and resize took {took:.1f}s"
    kube.delete(vm_path(namespace, "ha"))
