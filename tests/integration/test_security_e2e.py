"""The controller and the node daemon run under exactly the RBAC and policies deploy/
ships (issue 17, stretch): each gets a kubeconfig holding a token of its own service
account, bound to a pod on the node (as the kubelet would project it), instead of the
admin's. A VM then boots, grows and shrinks end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.k8s.client import Kube, load_api_client
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, converged, resize_vm
from core.constants import API_GROUP, API_VERSION, VM_CONTAINER, VM_NAME_LABEL
from testbed.localstack.stack import NodeSpec, Stack
from tests.integration.test_security_policy import deploy_rbac_and_policies, pod_bound_token

pytestmark = pytest.mark.integration

E2E_NODE = "sec-e2e-node"
COMPONENTS = (
    ("controller-0", "chscale-controller"),
    (f"daemon-{E2E_NODE}", "chscale-daemon"),
    ("webhook", "chscale-webhook"),
)


def token_kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}
                ],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def admin(control_plane: Any) -> Iterator[Kube]:
    with control_plane.api_client() as client:
        yield Kube(client)


@pytest.fixture(scope="module")
def stack(
    control_plane: Any, admin: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    deploy_rbac_and_policies(control_plane, admin)
    control_plane.add_node(E2E_NODE)  # the simulated kubelet adopts it
    state = tmp_path_factory.mktemp("sec-e2e")
    kubeconfigs = {}
    for component, account in COMPONENTS:
        token, _pod = pod_bound_token(admin, account, E2E_NODE)
        kubeconfigs[component] = token_kubeconfig(
            state / f"{component}.kubeconfig",
            control_plane.server_url,
            control_plane.ca_cert_path,
            token,
        )
    s = Stack(
        state / "stack",
        nodes=[NodeSpec(E2E_NODE, "16", "32Gi")],
        control_plane=control_plane,
        kubeconfigs=kubeconfigs,
    )
    s.start()
    yield s
    s.stop()


def test_the_components_are_their_service_accounts(stack: Stack) -> None:
    for component, account in COMPONENTS:
        with load_api_client(str(stack.component_kubeconfig(component))) as client:
            review = Kube(client).create(
                "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
            )
        info = review["status"]["userInfo"]
        assert info["username"] == f"system:serviceaccount:chscale-system:{account}"
        assert info["extra"]["authentication.kubernetes.io/node-name"] == [E2E_NODE]


def test_a_vm_boots_grows_and_shrinks_under_the_shipped_rbac(stack: Stack, namespace: str):
    kube = Kube(stack.control_plane.api_client())  # type: ignore[union-attr]
    vm = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": "least", "namespace": namespace},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": 2}, "memory": {"size": "2Gi"}},
            "nodeSelector": {"kubernetes.io/hostname": E2E_NODE},
        },
    }
    kube.create(vm_path(namespace), vm)
    follow = Follower(kube, namespace, "least")
    follow.wait(converged, 120)
    resize_vm(kube, namespace, "least", 4, "4Gi")
    follow.wait(converged, 120)
    resize_vm(kube, namespace, "least", 2, "3Gi")
    follow.wait(converged, 120)
    status = kube.get(vm_path(namespace, "least"))["status"]
    assert status["nodeName"] == E2E_NODE
    assert status["allocated"]["vcpus"] == 2
    kube.delete(vm_path(namespace, "least"))


def test_the_webhook_sizes_a_vm_pod_with_its_own_read_access(stack: Stack, namespace: str):
    """A VM pod created without requests = limits is sized by /mutate-pod from its VM: the
    one lookup the webhook makes, under the get on virtualmachines its ClusterRole grants.
    A dry run: the API server runs admission and stores nothing."""
    kube = Kube(stack.control_plane.api_client())  # type: ignore[union-attr]
    vm = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": "sized", "namespace": namespace},
        "spec": {
            "instance": {"cpu": {"sockets": 1, "coresPerSocket": 2}, "memory": {"size": "1Gi"}}
        },
    }
    uid = kube.create(vm_path(namespace), vm)["metadata"]["uid"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "hand-made",
            "labels": {VM_NAME_LABEL: "sized"},
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": "VirtualMachine",
                    "name": "sized",
                    "uid": uid,
                    "controller": True,
                }
            ],
        },
        "spec": {
            "nodeName": E2E_NODE,
            "containers": [{"name": VM_CONTAINER, "image": "chscale/chscale:test"}],
        },
    }
    made = kube.request(
        "POST", f"/api/v1/namespaces/{namespace}/pods", pod, query={"dryRun": "All"}
    )
    resources = made["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"], resources
    assert resources["limits"]["cpu"] == "2", resources
    kube.delete(vm_path(namespace, "sized"))
