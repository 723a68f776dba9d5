"""Daemon writes are scoped to its own node by the API server (issue 17, item 2).

The daemon's RBAC and ValidatingAdmissionPolicy from deploy/ are applied to the real
kube-apiserver; a token is minted for the daemon's ServiceAccount bound to a daemon pod on
node A (the API server adds the node-name claim, as it does for a kubelet-projected
token), and with it the daemon writes VM status. Before the policy any node's daemon could
forge any VM's status (a forged status made the controller shrink a pod under its guest).
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

from adapters.k8s.client import AlreadyExists, ApiError, Kube
from adapters.k8s.vms import build_pod
from core.constants import API_GROUP, API_VERSION, PLURAL
from core.model import Resources
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
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
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


def pod_bound_token(admin: Kube, account: str, node: str = NODE) -> tuple[str, str]:
    """A token for ``account`` bound to a pod of its own on ``node`` (as the kubelet
    projects one), and that pod's name."""
    name = f"{account}-{uuid.uuid4().hex[:5]}"
    pod = admin.create(
        f"/api/v1/namespaces/{SYSTEM}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": account,
                "nodeName": node,
                "automountServiceAccountToken": False,
                "containers": [{"name": "main", "image": "chscale/chscale:test"}],
            },
        },
    )
    token = admin.create(
        f"/api/v1/namespaces/{SYSTEM}/serviceaccounts/{account}/token",
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
    return token, name


def as_service_account(admin: Kube, account: str) -> tuple[Kube, str]:
    """A client for ``account`` authenticated as its pod on ``NODE`` would be, and the
    pod's name."""
    token, name = pod_bound_token(admin, account)
    source = admin.api_client.configuration
    config = k8s.Configuration(host=source.host, ssl_ca_cert=source.ssl_ca_cert)
    config.api_key = {"BearerToken": token}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    return Kube(k8s.ApiClient(config)), name


def deploy_rbac_and_policies(control_plane: Any, admin: Kube) -> None:
    """deploy/'s service accounts, RBAC and policies, as shipped."""
    control_plane.create_namespace(SYSTEM)
    for component in ("daemon", "controller", "webhook"):
        apply(admin, DEPLOY / component / "rbac.yaml")
        if (DEPLOY / component / "policy.yaml").exists():
            apply(admin, DEPLOY / component / "policy.yaml")


@pytest.fixture(scope="module")
def deployed(control_plane: Any, admin: Kube) -> None:
    control_plane.add_node(OTHER_NODE)
    deploy_rbac_and_policies(control_plane, admin)


@pytest.fixture(scope="module")
def daemon(deployed: None, admin: Kube) -> Iterator[Kube]:
    kube, pod = as_service_account(admin, "chscale-daemon")
    yield kube
    kube.api_client.close()
    admin.delete(f"/api/v1/namespaces/{SYSTEM}/pods/{pod}", grace_period_seconds=0)


@pytest.fixture(scope="module")
def controller(deployed: None, admin: Kube) -> Iterator[Kube]:
    kube, pod = as_service_account(admin, "chscale-controller")
    yield kube
    kube.api_client.close()
    admin.delete(f"/api/v1/namespaces/{SYSTEM}/pods/{pod}", grace_period_seconds=0)


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


def test_the_controller_creates_vm_pods_and_nothing_else(
    controller: Kube, admin: Kube, namespace: str, node: str
) -> None:
    vm = admin.get(vm_on(admin, namespace, "podded", node))
    pod = build_pod(vm, Resources(cpu_millis=2000, memory=1 << 30), "chscale/vmm:test")
    pods = f"/api/v1/namespaces/{namespace}/pods"
    # Bounded wait for the policy to load: a plain pod must end up refused.
    plain = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }
    deadline = time.monotonic() + POLICY_WAIT_S
    while True:
        try:
            controller.create(pods, plain)
        except ApiError as exc:
            assert exc.status == 403, exc
            break
        admin.delete(f"{pods}/plain", grace_period_seconds=0)
        assert time.monotonic() < deadline, "the controller created a pod that is no VM pod"
        time.sleep(0.5)
    for name, change in (
        ("host", {"hostPID": True}),
        ("sa", {"serviceAccountName": "chscale-daemon"}),
        ("path", {"volumes": [*pod["spec"]["volumes"], {"name": "r", "hostPath": {"path": "/"}}]}),
    ):
        bad = copy.deepcopy(pod)
        bad["metadata"]["name"] = f"bad-{name}"
        bad["spec"].update(change)
        with pytest.raises(ApiError) as refused:
            controller.create(pods, bad)
        assert refused.value.status == 403, (name, refused.value)
    created = controller.create(pods, pod)
    assert created["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
