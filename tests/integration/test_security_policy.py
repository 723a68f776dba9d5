"""Daemon writes are scoped to its own node by the API server (issue 17, item 2).

The daemon's RBAC and ValidatingAdmissionPolicy from deploy/ are applied to the real
kube-apiserver; a token is minted for the daemon's ServiceAccount bound to a daemon pod on
node A (the API server adds the node-name claim, as it does for a kubelet-projected
token), and with it the daemon writes VM status. Before the policy any node's daemon could
forge any VM's status (a forged status made the controller shrink a pod under its guest).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

from adapters.k8s.client import AlreadyExists, ApiError, Kube
from core.constants import API_GROUP, API_VERSION, PLURAL
from tests.integration.conftest import NODE

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SYSTEM = "chscale-system"
OTHER_NODE = "sec-other-node"
NODE_CLAIM = "authentication.kubernetes.io/node-name"
POLICY_WAIT_S = 30.0

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "ValidatingAdmissionPolicy": f"{ADMISSION}/validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": f"{ADMISSION}/validatingadmissionpolicybindings",
}


def apply(kube: Kube, manifest: Path) -> None:
    for doc in yaml.safe_load_all(manifest.read_text()):
        if not doc:
            continue
        path = _PATHS[doc["kind"]].format(ns=doc["metadata"].get("namespace", ""))
        try:
            kube.create(path, doc)
        except AlreadyExists:
            current = kube.get(f"{path}/{doc['metadata']['name']}")
            doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            kube.put(f"{path}/{doc['metadata']['name']}", doc)


@pytest.fixture(scope="module")
def admin(control_plane: Any) -> Iterator[Kube]:
    with control_plane.api_client() as client:
        yield Kube(client)


@pytest.fixture(scope="module")
def daemon(control_plane: Any, admin: Kube) -> Iterator[Kube]:
    """The daemon of node ``node``, authenticated as its pod would be."""
    control_plane.create_namespace(SYSTEM)
    control_plane.add_node(OTHER_NODE)
    apply(admin, DEPLOY / "daemon" / "rbac.yaml")
    apply(admin, DEPLOY / "daemon" / "policy.yaml")
    name = f"chscale-daemon-{uuid.uuid4().hex[:5]}"
    pod = admin.create(
        f"/api/v1/namespaces/{SYSTEM}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "chscale-daemon",
                "nodeName": NODE,
                "automountServiceAccountToken": False,
                "containers": [{"name": "daemon", "image": "chscale/chscale:test"}],
            },
        },
    )
    token = admin.create(
        f"/api/v1/namespaces/{SYSTEM}/serviceaccounts/chscale-daemon/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": name,
                    "uid": pod["metadata"]["uid"],
                },
            },
        },
    )["status"]["token"]
    source = admin.api_client.configuration
    config = k8s.Configuration(host=source.host, ssl_ca_cert=source.ssl_ca_cert)
    config.api_key = {"BearerToken": token}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    with k8s.ApiClient(config) as client:
        yield Kube(client)
    admin.delete(f"/api/v1/namespaces/{SYSTEM}/pods/{name}", grace_period_seconds=0)


def vm_on(admin: Kube, namespace: str, name: str, node: str) -> str:
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    obj = admin.create(
        path,
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {
                "instance": {"cpu": {"sockets": 1, "coresPerSocket": 2}, "memory": {"size": "1Gi"}}
            },
        },
    )
    admin.patch_status(
        f"{path}/{name}", {"phase": "Running", "nodeName": node}, obj["metadata"]["resourceVersion"]
    )
    return f"{path}/{name}"


def forge(daemon: Kube, path: str, status: dict[str, Any]) -> ApiError | None:
    try:
        daemon.request(
            "PATCH",
            f"{path}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )
    except ApiError as exc:
        return exc
    return None


def test_the_daemons_token_names_its_node(daemon: Kube, node: str) -> None:
    review = daemon.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    info = review["status"]["userInfo"]
    assert info["username"] == "system:serviceaccount:chscale-system:chscale-daemon"
    assert info["extra"][NODE_CLAIM] == [node]


def test_a_daemon_writes_only_the_status_of_vms_on_its_own_node(
    daemon: Kube, admin: Kube, namespace: str, node: str
) -> None:
    mine = vm_on(admin, namespace, "mine", node)
    theirs = vm_on(admin, namespace, "theirs", OTHER_NODE)
    # The policy takes effect once the API server has loaded it: a bounded wait.
    deadline = time.monotonic() + POLICY_WAIT_S
    while (refused := forge(daemon, theirs, {"allocated": {"memory": "2304Mi"}})) is None:
        assert time.monotonic() < deadline, "a daemon forged the status of another node's VM"
        admin.patch(
            f"{theirs}/status", {"status": {"allocated": None}}, "application/merge-patch+json"
        )
        time.sleep(0.5)
    assert refused.status == 403, refused
    assert OTHER_NODE in refused.message, refused.message
    assert "allocated" not in (admin.get(theirs).get("status") or {})
    assert forge(daemon, mine, {"observedGeneration": 7}) is None
    assert admin.get(mine)["status"]["observedGeneration"] == 7
    moved = forge(daemon, mine, {"nodeName": OTHER_NODE})
    assert moved is not None and moved.status == 403
    assert admin.get(mine)["status"]["nodeName"] == node


def test_a_daemon_cannot_touch_a_vms_spec(daemon: Kube, admin: Kube, namespace: str, node: str):
    mine = vm_on(admin, namespace, "spec-mine", node)
    with pytest.raises(ApiError) as refused:
        daemon.request(
            "PATCH",
            mine,
            {"spec": {"instance": {"memory": {"size": "2Gi"}}}},
            content_type="application/merge-patch+json",
        )
    assert refused.value.status == 403
