"""The main job's pieces: `chscale up/status/down` leave nothing behind, the printer
columns work with kubectl, and the deploy manifests are valid for a real API server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.k8s.client import Kube, load_api_client
from adapters.k8s.vms import vm_path
from apps.cli.vmops import Follower, apply_vm, converged
from testbed.controlplane.launcher import STACK_LABEL
from testbed.localstack.stack import NodeSpec, Stack
from testbed.procs import alive, processes_mentioning
from tests.integration.tables import server_table

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def chscale(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apps.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found |= {child} | _descendants(child)
    return found


def _kubectl_get_vm(kubectl: str, kubeconfig: Path) -> tuple[list[str], list[str]]:
    """Apply the example with kubectl, and once it runs, ``kubectl get vm``'s header and
    row."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    applied = subprocess.run(
        [kubectl, "apply", "-f", str(ROOT / "examples" / "vm.yaml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    deadline = time.monotonic() + 60
    while True:
        got = subprocess.run(
            [kubectl, "get", "vm"], env=env, capture_output=True, text=True, check=False, timeout=60
        )
        lines = got.stdout.splitlines()
        if (len(lines) == 2 and "Running" in lines[1]) or time.monotonic() > deadline:
            assert len(lines) == 2, got.stdout + got.stderr
            return lines[0].split(), lines[1].split()
        time.sleep(0.5)


def test_up_get_down_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    up = chscale("up", "--state-dir", str(state), "--nodes", "1", "--node-memory", "8Gi")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"KUBECONFIG={state / 'kubeconfig'}" in up.stdout
    supervisor = int((state / "supervisor.pid").read_text())
    processes = _descendants(supervisor) | {supervisor}
    assert len(processes) >= 5  # etcd, apiserver, webhook, kubelet, daemon, controller
    try:
        status = chscale("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout
        assert "controller-0" in status.stdout and "kubelet-node-a" in status.stdout
        kubeconfig = state / "kubeconfig"
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            # Without kubectl, the same server-side printing kubectl asks for.
            kube = Kube(load_api_client(str(kubeconfig)))
            apply_vm(kube, yaml.safe_load((ROOT / "examples" / "vm.yaml").read_text()))
            Follower(kube, "default", "my-vm").wait(converged, 60)
            names, (row,) = server_table(kube.api_client, vm_path("default", "my-vm"))
            columns, cells = [n.upper() for n in names], [str(cell) for cell in row]
        else:
            columns, cells = _kubectl_get_vm(kubectl, kubeconfig)
        assert columns[:7] == [
            "NAME",
            "PHASE",
            "VCPUS",
            "ALLOC-VCPUS",
            "MEMORY",
            "ALLOC-MEMORY",
            "NODE",
        ], columns
        assert cells[:7] == ["my-vm", "Running", "8", "8", "4Gi", "4Gi", "node-a"], cells
    finally:
        down = chscale("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in processes if alive(p)], "processes left behind"
    assert chscale("status", "--state-dir", str(state)).returncode == 1


def test_stop_ends_the_vmms_a_killed_kubelet_left_running(
    control_plane: Any, namespace: str, tmp_path: Path
) -> None:
    stack = Stack(
        tmp_path / "stack",
        nodes=[NodeSpec("orphan-node", "8", "16Gi")],
        control_plane=control_plane,
        webhook=False,
    )
    vmms = f"path={stack.socket_root('orphan-node')}/"
    stack.start()
    try:
        kube = Kube(control_plane.api_client())
        vm = {
            "metadata": {"name": "left"},
            "spec": {
                "instance": {"cpu": {"sockets": 1, "coresPerSocket": 1}, "memory": {"size": "1Gi"}},
                "nodeSelector": {"kubernetes.io/hostname": "orphan-node"},
            },
        }
        apply_vm(kube, vm, namespace)
        Follower(kube, namespace, "left").wait(converged, 60)
        assert len(processes_mentioning(vmms)) == 1
        # As a container outlives its kubelet: the VMM runs on, detached.
        stack.children["kubelet-orphan-node"].kill()
        assert len(processes_mentioning(vmms)) == 1
        kube.patch(vm_path(namespace, "left"), {"metadata": {"finalizers": None}})
    finally:
        stack.stop()
    assert processes_mentioning(vmms) == []


def test_start_returns_once_its_kubelet_adopted_a_node_registered_before(
    control_plane: Any, tmp_path: Path
) -> None:
    """A bare Node a test registered Ready before the stack started (ControlPlane.add_node)
    is not yet the stack's: its scheduler only places pods onto nodes labelled as the
    stack's. start() returns once the stack's kubelet has adopted it (CI: a VM pod created
    in between stayed Pending for the whole test)."""
    control_plane.add_node("adopted-node")
    stack = Stack(
        tmp_path / "stack",
        nodes=[NodeSpec("adopted-node", "8", "16Gi")],
        control_plane=control_plane,
        webhook=False,
    )
    stack.start()
    try:
        node = Kube(control_plane.api_client()).get("/api/v1/nodes/adopted-node")
        assert node["metadata"]["labels"].get(STACK_LABEL) == stack.stack_id
        assert node["status"]["allocatable"]["cpu"] == "8"
    finally:
        stack.stop()


# --- the deploy manifests -------------------------------------------------------------

_PATHS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets",
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    "MutatingWebhookConfiguration": (
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    ),
    "ValidatingWebhookConfiguration": (
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
    ),
    "ValidatingAdmissionPolicy": (
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
    ),
    "ValidatingAdmissionPolicyBinding": (
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"
    ),
}


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        # The Helm chart's templates are not manifests; test_helm_chart.py renders them.
        if path.name == "kustomization.yaml" or "helm" in path.relative_to(DEPLOY).parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def test_deploy_manifests_are_accepted_by_the_api_server(control_plane: Any) -> None:
    kube = Kube(control_plane.api_client())
    docs = _manifests()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet", "ClusterRole"} <= kinds
    # Namespaced objects need their namespace to exist, even for a dry run.
    for _, doc in docs:
        if doc["kind"] == "Namespace":
            try:
                kube.create(_PATHS["Namespace"], doc)
            except Exception as exc:  # already there from an earlier run: fine
                assert "AlreadyExists" in str(exc) or "already exists" in str(exc)
    for path, doc in docs:
        if doc["kind"] == "Namespace":
            continue
        assert doc["kind"] in _PATHS, f"{path}: no test mapping for kind {doc['kind']}"
        ns = doc["metadata"].get("namespace", "default")
        url = _PATHS[doc["kind"]].format(ns=ns)
        # Server-side dry run: full validation and admission, nothing persisted.
        if doc["kind"] == "CustomResourceDefinition":
            kube.request(
                "PUT",
                f"{url}/{doc['metadata']['name']}",
                _with_rv(kube, url, doc),
                query={"dryRun": "All"},
            )
        else:
            kube.request("POST", url, doc, query={"dryRun": "All"})


def _with_rv(kube: Kube, url: str, doc: dict[str, Any]) -> dict[str, Any]:
    current = kube.get(f"{url}/{doc['metadata']['name']}")
    return {
        **doc,
        "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
    }
