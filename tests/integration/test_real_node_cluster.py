"""The real kube-scheduler and kube-controller-manager in the local stack (ADR 0014):
scheduling, ResourceQuota usage and garbage collection as on a real cluster, on the
simulated node and, where the machine allows one, the real node; ``CHSCALE_NODE`` set
names the one kind to run (see conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from adapters.k8s.client import Kube, NotFound
from testbed.localstack.stack import NodeSpec, Stack

from .conftest import NODE, node_kinds

NODE_NAME = "cluster-node"
WAIT_S = 60.0


@pytest.fixture(scope="module", params=node_kinds())
def stack(
    control_plane: Any, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("cluster"),
        # Each kind its own node name: the Node of the first stays registered.
        nodes=[NodeSpec(f"{NODE_NAME}-{request.param}", "8", "16Gi")],
        control_plane=control_plane,
        webhook=False,
        kubelet=request.param,
    )
    s.start()
    yield s
    s.stop()


def _wait(what: str, probe: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {WAIT_S:.0f}s")


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "chscale.local/pause:3.10",
                    "imagePullPolicy": "Never",
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "64Mi"},
                        "limits": {"cpu": "100m", "memory": "64Mi"},
                    },
                }
            ],
        },
    }


def test_the_scheduler_binds_onto_this_stacks_node(
    stack: Stack, kube: Kube, namespace: str
) -> None:
    kube.create(f"/api/v1/namespaces/{namespace}/pods", _pod("placed"))
    pod = _wait(
        "pod bound",
        lambda: (kube.get(f"/api/v1/namespaces/{namespace}/pods/placed")["spec"].get("nodeName")),
    )
    # Never the session's bare node (nothing runs there), though it has room.
    assert pod == stack.nodes[0], (pod, NODE)
    events = _wait(
        "Scheduled event",
        lambda: [
            e
            for e in kube.get(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")["items"]
            if e.get("reason") == "Scheduled"
        ],
    )
    assert events[0].get("reportingController") == "default-scheduler", events[0]


def test_resource_quota_usage_is_computed(stack: Stack, kube: Kube, namespace: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "q"},
        "spec": {"hard": {"pods": "5", "configmaps": "10"}},
    }
    kube.create(f"/api/v1/namespaces/{namespace}/resourcequotas", quota)

    def used() -> str | None:
        status = kube.get(f"/api/v1/namespaces/{namespace}/resourcequotas/q").get("status")
        return ((status or {}).get("used") or {}).get("pods")

    # Until the quota controller has first computed the usage, admission charges nothing,
    # and the controller counts a pod only from its informer's cache: a pod created in that
    # window can stay uncounted until the controller's resync, five minutes on. Once the
    # usage is known, quota admission charges each pod as it is created.
    _wait("quota usage computed", lambda: used() == "0")
    kube.create(f"/api/v1/namespaces/{namespace}/pods", _pod("counted"))
    _wait("quota usage counts the pod", lambda: used() == "1")


def test_garbage_collection_deletes_dependents(stack: Stack, kube: Kube, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    owner = kube.create(base, {"metadata": {"name": "owner"}, "data": {}})
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    kube.create(base, {"metadata": {"name": "dependent", "ownerReferences": [ref]}, "data": {}})
    kube.delete(f"{base}/owner")

    def gone() -> bool:
        try:
            kube.get(f"{base}/dependent")
        except NotFound:
            return True
        return False

    _wait("dependent collected", gone)
