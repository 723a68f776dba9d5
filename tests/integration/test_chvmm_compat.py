"""ch-vmm users lose nothing (ADR 0013): ch-vmm-shaped manifests, applied as a ch-vmm user
applies them (server-side apply) to a local stack with the webhooks, come back with every
field the user wrote, get ch-vmm's defaults, a warning for each field chscale keeps but
does not act on, a field error for hugepages, and resize; the status names the VM pod as
ch-vmm's does (``kubectl get vm X -o jsonpath={.status.vmPodName}``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from adapters.k8s.client import ApiError, Kube, NotFound, error_from_status
from adapters.k8s.vms import pod_name, vm_path
from apps.cli.vmops import Follower, converged
from core.resources import KEPT_NOT_USED
from testbed.localstack.stack import NodeSpec, Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NODE = "compat-node"
APPLY = "application/apply-patch+yaml"
MANAGER = "ch-vmm-user"
HOSTNAME = "kubernetes.io/hostname"
# A warning header is `299 - "text"` (RFC 7234 §5.5), several joined by commas.
_WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def full_vm() -> dict[str, Any]:
    """The full example plus the ch-vmm fields it leaves out (GPUs, file systems,
    persistent memory, resource claims)."""
    obj = example("ch-vmm/vm-full.yaml")
    instance = obj["spec"]["instance"]
    instance["fileSystems"] = [{"name": "share", "cache": "never"}]
    instance["gpus"] = [{"name": "gpu0", "resourceName": "nvidia.com/gpu"}]
    instance["pmem"] = {"name": "pm0", "size": "1Gi"}
    obj["spec"]["resources"] = {"claims": [{"name": "gpu"}]}
    return obj


MANIFESTS = {
    "seed": lambda: example("vm.yaml"),
    "full": full_vm,
    "fragment": lambda: example("ch-vmm/vm-fragment.yaml"),
    "dedicated": lambda: example("ch-vmm/vm-dedicated-cpus.yaml"),
}


@pytest.fixture(scope="module")
def stack(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("chvmm"),
        nodes=[NodeSpec(NODE, "32", "64Gi")],
        control_plane=control_plane,
        webhook=True,
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture
def vms(kube: Kube, namespace: str) -> Iterator[list[str]]:
    """Names of the VMs a test applies; deleted (pods and all) when it ends."""
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(NotFound):
            kube.delete(vm_path(namespace, name))
    deadline = time.monotonic() + 60
    for name in names:
        while time.monotonic() < deadline:
            try:
                kube.get(vm_path(namespace, name))
            except NotFound:
                break
            time.sleep(0.1)


def apply(kube: Kube, namespace: str, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Server-side apply as `kubectl apply --server-side` does it; returns the object and
    the admission warnings the API server passed on."""
    obj = copy.deepcopy(obj)
    obj["metadata"]["namespace"] = namespace
    path = vm_path(namespace, obj["metadata"]["name"])
    url = kube._url(path, {"fieldManager": MANAGER, "force": "true"})
    resp = kube.pool.request(
        "PATCH",
        url,
        body=json.dumps(obj).encode(),  # JSON is YAML
        headers=kube._headers("PATCH", path, APPLY),
        timeout=urllib3.Timeout(connect=5, read=30),
        retries=False,
    )
    if not 200 <= resp.status < 300:
        raise error_from_status(resp.status, resp.data)
    warnings = [
        m.group(1).replace('\\"', '"')
        for header in resp.headers.getlist("Warning")
        for m in _WARNING.finditer(header)
    ]
    return json.loads(resp.data), warnings


def missing(written: object, stored: object, path: str = "") -> list[str]:
    """Paths of what the user wrote that the stored object does not hold as written."""
    if isinstance(written, dict):
        if not isinstance(stored, dict):
            return [path or "."]
        return [p for k, v in written.items() for p in missing(v, stored.get(k), f"{path}.{k}")]
    if isinstance(written, list):
        if not isinstance(stored, list) or len(stored) != len(written):
            return [path]
        return [p for i, v in enumerate(written) for p in missing(v, stored[i], f"{path}[{i}]")]
    return [] if written == stored else [f"{path}: wrote {written!r}, got {stored!r}"]


def on_node(obj: dict[str, Any]) -> dict[str, Any]:
    obj["spec"].setdefault("nodeSelector", {})[HOSTNAME] = NODE
    return obj


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_every_field_written_survives_server_side_apply(
    kube: Kube, namespace: str, vms: list[str], manifest: str
) -> None:
    written = on_node(MANIFESTS[manifest]())
    _, warnings = apply(kube, namespace, written)
    vms.append(written["metadata"]["name"])
    stored = kube.get(vm_path(namespace, written["metadata"]["name"]))
    assert missing(written["spec"], stored["spec"], "spec") == []

    # Re-applying the same manifest changes nothing: the webhook's defaults are not
    # fields the user's manager fights over.
    again, _ = apply(kube, namespace, written)
    assert again["metadata"]["generation"] == stored["metadata"]["generation"]

    fields = {w.split(" ")[0].split(":")[0] for w in warnings}
    spec = written["spec"]
    expected = {
        path
        for path, _ in KEPT_NOT_USED
        if _get(spec, path.removeprefix("spec.")) not in (None, [], {})
    }
    if spec["instance"]["cpu"].get("dedicatedCPUPlacement"):
        expected.add("spec.instance.cpu.dedicatedCPUPlacement")
    assert fields == expected, warnings
    assert all("chscale" in w for w in warnings), warnings
    if manifest == "full":
        assert len(expected) == len(KEPT_NOT_USED)  # every field chscale only keeps


def _get(obj: Any, path: str) -> Any:
    for key in path.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def test_a_fragment_gets_ch_vmms_defaults(kube: Kube, namespace: str, vms: list[str]) -> None:
    written = on_node(example("ch-vmm/vm-fragment.yaml"))
    applied, warnings = apply(kube, namespace, written)
    vms.append("small")
    assert warnings == []
    assert applied["spec"]["instance"]["memory"] == {"size": "1Gi"}
    assert applied["spec"]["instance"]["cpu"] == {"sockets": 1, "coresPerSocket": 2}
    assert applied["spec"]["runPolicy"] == "Once"
    pod_size = {"cpu": "2", "memory": "1280Mi"}  # 1Gi + the VMM's 256Mi
    assert applied["spec"]["resources"] == {"requests": pod_size, "limits": pod_size}


def test_hugepages_are_refused_naming_the_field(kube: Kube, namespace: str) -> None:
    with pytest.raises(ApiError) as refused:
        apply(kube, namespace, on_node(example("ch-vmm/vm-hugepages.yaml")))
    error = refused.value
    assert error.status == 422, error
    assert "spec.instance.memory.hugepages" in str(error) and "hugepages-2Mi" in str(error)
    with pytest.raises(NotFound):
        kube.get(vm_path(namespace, "hugepages"))


def kubectl_jsonpath(stack: Stack, namespace: str, name: str, jsonpath: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # the same field, read without kubectl
        obj = stack_kube(stack).get(vm_path(namespace, name))
        return str(_get(obj, jsonpath.strip("{}.")) or "")
    done = subprocess.run(
        [kubectl, "get", "vm", name, "-n", namespace, "-o", f"jsonpath={jsonpath}"],
        env={**os.environ, "KUBECONFIG": str(stack.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def stack_kube(stack: Stack) -> Kube:
    assert stack.control_plane is not None
    return Kube(stack.control_plane.api_client())


@pytest.mark.parametrize("manifest", ["full", "fragment", "dedicated"])
def test_accepted_vms_run_report_their_pod_and_resize(
    stack: Stack, kube: Kube, namespace: str, vms: list[str], manifest: str
) -> None:
    written = on_node(MANIFESTS[manifest]())
    name = written["metadata"]["name"]
    apply(kube, namespace, written)
    vms.append(name)
    running = Follower(kube, namespace, name).wait(converged, 60)

    pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod_name(name)}")
    assert kubectl_jsonpath(stack, namespace, name, "{.status.vmPodName}") == pod_name(name)
    assert kubectl_jsonpath(stack, namespace, name, "{.status.vmPodUID}") == pod["metadata"]["uid"]
    assert running["status"]["nodeName"] == NODE

    # A resize, written the ch-vmm way: the user's manifest, re-applied with new sizes.
    grown = copy.deepcopy(written)
    grown["spec"]["instance"]["cpu"]["coresPerSocket"] = 4
    grown["spec"]["instance"].setdefault("memory", {})["size"] = "4Gi"
    apply(kube, namespace, grown)
    done = Follower(kube, namespace, name).wait(converged, 60)
    assert done["status"]["allocated"]["vcpus"] == 4 * done["spec"]["instance"]["cpu"]["sockets"]
    assert done["status"]["allocated"]["memory"] == "4Gi"
    assert missing(grown["spec"], done["spec"], "spec") == []
    assert done["status"]["vmPodUID"] == pod["metadata"]["uid"]  # resized in place
