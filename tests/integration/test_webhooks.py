"""The admission webhooks against the real kube-apiserver (RESIZE.md §5).

A module-scoped fixture runs the webhook server in this process on a free port with a
fresh CA and registers it (URL client config, prefix ``chscale-test``) the way the
local stack does; the API server then calls it over TLS for every VirtualMachine write
and every VM pod create. Each rejection rule has its own test, and each checks that the
API server's answer names the field. There is no kubelet: pods stay Pending.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from adapters.k8s.client import ApiError, Kube, NotFound
from adapters.webhook.certs import write_serving_cert
from adapters.webhook.server import WebhookServer
from apps.webhook.main import register_webhooks, unregister_webhooks, vm_lookup
from core.constants import API_GROUP, API_VERSION, PLURAL, VM_CONTAINER, VM_NAME_LABEL

pytestmark = pytest.mark.integration

PREFIX = "chscale-test"
UNREGISTER_WAIT_S = 30.0

# The seed's example, applied as is (sockets 2 x coresPerSocket 4 = 8 vCPUs, 4Gi).
SEED_YAML = """
apiVersion: cloudhypervisor.quill.today/v1beta1
kind: VirtualMachine
metadata:
  name: my-vm
spec:
  instance:
    cpu:
      sockets: 2
      coresPerSocket: 4  # Total: 8 vCPUs
    memory:
      size: 4Gi
"""
SEED_RESOURCES = {
    "requests": {"cpu": "8", "memory": "4352Mi"},
    "limits": {"cpu": "8", "memory": "4352Mi"},
}
CAPACITY = {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"}


def vms_path(namespace: str) -> str:
    return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"


@pytest.fixture(scope="module")
def kube(control_plane: Any) -> Iterator[Kube]:
    with control_plane.api_client() as api_client:
        yield Kube(api_client)


@pytest.fixture(scope="module")
def webhook(
    control_plane: Any, kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebhookServer]:
    certs = tmp_path_factory.mktemp("webhook-certs")
    bundle = write_serving_cert(certs, dns_names=["localhost"], ips=["127.0.0.1"])

    # The app's own lookup, as chscale-webhook serve wires it.
    server = WebhookServer(certs / "tls.crt", certs / "tls.key", vm_lookup=vm_lookup(kube))
    server.start()
    try:
        register_webhooks(kube.api_client, server.url, bundle, name_prefix=PREFIX)
        yield server
    finally:
        unregister_webhooks(kube.api_client, name_prefix=PREFIX)
        # Keep serving until the API server has dropped the configurations: with
        # failurePolicy Fail, a stopped server would refuse later modules' writes.
        _wait_until_unregistered(kube)
        server.stop()


def _wait_until_unregistered(kube: Kube) -> None:
    probe = yaml.safe_load(SEED_YAML)
    probe["metadata"] = {"name": "chscale-test-unregistered", "namespace": "default"}
    probe["spec"]["instance"]["cpu"]["sockets"] = 0
    deadline = time.monotonic() + UNREGISTER_WAIT_S
    while time.monotonic() < deadline:
        try:
            kube.request("POST", vms_path("default"), probe, query={"dryRun": "All"})
            return
        except ApiError:
            time.sleep(0.2)


def seed_vm(name: str = "my-vm") -> dict[str, Any]:
    obj = yaml.safe_load(SEED_YAML)
    obj["metadata"]["name"] = name
    return obj


def create_vm(kube: Kube, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    return kube.create(vms_path(namespace), obj)


def refused(call: Any, *fields: str) -> ApiError:
    """Run ``call``; it must be refused as invalid, the message naming every field."""
    with pytest.raises(ApiError) as info:
        call()
    error = info.value
    assert error.status == 422, f"{error.status} {error.reason}: {error.message}"
    for field in fields:
        assert field in error.message, error.message
    return error


def booted(kube: Kube, namespace: str, name: str = "my-vm") -> dict[str, Any]:
    """The seed VM, created, with the status a daemon writes once its VMM has booted."""
    obj = create_vm(kube, namespace, seed_vm(name))
    path = f"{vms_path(namespace)}/{name}"
    kube.patch_status(
        path,
        {"phase": "Running", "capacity": dict(CAPACITY)},
        obj["metadata"]["resourceVersion"],
    )
    current = kube.get(path)
    assert current["status"]["phase"] == "Running"
    return current


def patch_spec(kube: Kube, namespace: str, name: str, cpu=None, memory=None) -> dict:
    instance: dict[str, Any] = {}
    if cpu:
        instance["cpu"] = cpu
    if memory:
        instance["memory"] = memory
    return kube.patch(f"{vms_path(namespace)}/{name}", {"spec": {"instance": instance}})


# --- defaulting ----------------------------------------------------------------------------


def test_the_seed_yaml_applied_as_is_gets_its_pod_resources(webhook, kube, namespace):
    created = create_vm(kube, namespace, seed_vm())
    assert created["spec"]["resources"] == SEED_RESOURCES
    stored = kube.get(f"{vms_path(namespace)}/my-vm")
    assert stored["spec"]["resources"] == SEED_RESOURCES
    assert stored["spec"]["instance"]["cpu"] == {"sockets": 2, "coresPerSocket": 4}


def test_missing_topology_defaults_to_one_socket_one_core(webhook, kube, namespace):
    obj = seed_vm("tiny")
    obj["spec"]["instance"]["cpu"] = {}
    obj["spec"]["instance"]["memory"]["size"] = "1Gi"
    created = create_vm(kube, namespace, obj)
    assert created["spec"]["instance"]["cpu"] == {"sockets": 1, "coresPerSocket": 1}
    assert created["spec"]["resources"]["limits"] == {"cpu": "1", "memory": "1280Mi"}


def test_an_update_keeps_the_resources_consistent(webhook, kube, namespace):
    create_vm(kube, namespace, seed_vm())
    updated = patch_spec(
        kube, namespace, "my-vm", cpu={"coresPerSocket": 6}, memory={"size": "8Gi"}
    )
    assert updated["spec"]["resources"] == {
        "requests": {"cpu": "12", "memory": "8448Mi"},
        "limits": {"cpu": "12", "memory": "8448Mi"},
    }


# --- rejections on create ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "memory", "field"),
    [
        ({"sockets": 0}, None, "spec.instance.cpu.sockets"),
        ({"coresPerSocket": 0}, None, "spec.instance.cpu.coresPerSocket"),
        ({"maxVcpus": 4}, None, "spec.instance.cpu"),  # 2 x 4 = 8 vCPUs > maxVcpus 4
        (None, {"size": "0"}, "spec.instance.memory.size"),
        (None, {"size": "-4Gi"}, "spec.instance.memory.size"),
        (None, {"size": "1001Mi"}, "spec.instance.memory.size"),
    ],
    ids=[
        "sockets<1",
        "cores<1",
        "vcpus>maxVcpus",
        "memory-zero",
        "memory-negative",
        "memory-not-2Mi-aligned",
    ],
)
def test_a_create_breaking_a_rule_is_refused_naming_the_field(
    webhook, kube, namespace, cpu, memory, field
):
    obj = seed_vm()
    obj["spec"]["instance"]["cpu"].update(cpu or {})
    obj["spec"]["instance"]["memory"].update(memory or {})
    refused(lambda: create_vm(kube, namespace, obj), field)
    with pytest.raises(NotFound):
        kube.get(f"{vms_path(namespace)}/my-vm")


@pytest.mark.parametrize(
    ("cpu", "memory", "field"),
    [
        ({"sockets": "two"}, None, "spec.instance.cpu.sockets"),
        (None, {"size": "four gigs"}, "spec.instance.memory.size"),
        (None, {"size": {"gi": 4}}, "spec.instance.memory.size"),
    ],
    ids=["sockets-string", "memory-not-a-quantity", "memory-object"],
)
def test_a_malformed_object_is_refused_naming_the_field(
    webhook, kube, namespace, cpu, memory, field
):
    obj = seed_vm()
    obj["spec"]["instance"]["cpu"].update(cpu or {})
    obj["spec"]["instance"]["memory"].update(memory or {})
    refused(lambda: create_vm(kube, namespace, obj), field)


def test_a_valid_create_with_ceilings_is_admitted(webhook, kube, namespace):
    obj = seed_vm()
    obj["spec"]["instance"]["cpu"]["maxVcpus"] = 16
    obj["spec"]["instance"]["memory"]["maxSize"] = "20Gi"
    assert create_vm(kube, namespace, obj)["metadata"]["name"] == "my-vm"


# --- rejections while the VMM runs ----------------------------------------------------------


def test_vcpus_above_the_recorded_capacity_are_refused_once_booted(webhook, kube, namespace):
    booted(kube, namespace)
    # 20 vCPUs: no maxVcpus in the spec, so only the recorded capacity (16) forbids it.
    refused(
        lambda: patch_spec(kube, namespace, "my-vm", cpu={"sockets": 4, "coresPerSocket": 5}),
        "spec.instance.cpu",
        "16",
    )


def test_memory_below_the_boot_size_is_refused_while_running(webhook, kube, namespace):
    booted(kube, namespace)
    refused(
        lambda: patch_spec(kube, namespace, "my-vm", memory={"size": "2Gi"}),
        "spec.instance.memory.size",
    )


def test_memory_above_the_ceiling_is_refused_while_running(webhook, kube, namespace):
    booted(kube, namespace)
    refused(
        lambda: patch_spec(kube, namespace, "my-vm", memory={"size": "22Gi"}),
        "spec.instance.memory.size",
    )


def test_max_vcpus_cannot_change_while_running(webhook, kube, namespace):
    booted(kube, namespace)
    refused(
        lambda: patch_spec(kube, namespace, "my-vm", cpu={"maxVcpus": 16}),
        "spec.instance.cpu.maxVcpus",
    )


def test_max_size_cannot_change_while_running(webhook, kube, namespace):
    booted(kube, namespace)
    refused(
        lambda: patch_spec(kube, namespace, "my-vm", memory={"maxSize": "20Gi"}),
        "spec.instance.memory.maxSize",
    )


def test_a_resize_within_capacity_is_admitted(webhook, kube, namespace):
    booted(kube, namespace)
    resized = patch_spec(
        kube, namespace, "my-vm", cpu={"coresPerSocket": 8}, memory={"size": "16Gi"}
    )
    assert resized["spec"]["instance"]["cpu"] == {"sockets": 2, "coresPerSocket": 8}
    assert resized["spec"]["resources"]["limits"] == {"cpu": "16", "memory": "16640Mi"}


def test_a_metadata_update_of_a_running_vm_is_admitted(webhook, kube, namespace):
    booted(kube, namespace)
    labelled = kube.patch(
        f"{vms_path(namespace)}/my-vm", {"metadata": {"labels": {"team": "storage"}}}
    )
    assert labelled["metadata"]["labels"] == {"team": "storage"}


# --- the VM pod ---------------------------------------------------------------------------


def vm_pod(vm_name: str, labelled: bool = True, uid: str | None = None) -> dict[str, Any]:
    """A pod as the controller builds it: labelled, owned by its VM (name and uid)."""
    meta: dict[str, Any] = {"name": f"{vm_name}-{uuid.uuid4().hex[:5]}"}
    if labelled:
        meta["labels"] = {VM_NAME_LABEL: vm_name}
    if uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "VirtualMachine",
                "name": vm_name,
                "uid": uid,
                "controller": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": VM_CONTAINER, "image": "chscale/vmm:test"}]},
    }


def test_a_vm_pod_gets_the_vms_resources_and_a_not_required_resize_policy(webhook, kube, namespace):
    vm = create_vm(kube, namespace, seed_vm())
    pod = kube.create(
        f"/api/v1/namespaces/{namespace}/pods", vm_pod("my-vm", uid=vm["metadata"]["uid"])
    )
    container = pod["spec"]["containers"][0]
    assert container["resources"] == SEED_RESOURCES
    policy = {p["resourceName"]: p["restartPolicy"] for p in container["resizePolicy"]}
    assert policy == {"cpu": "NotRequired", "memory": "NotRequired"}
    assert pod["status"]["qosClass"] == "Guaranteed"


def test_a_pod_without_the_vm_label_is_not_touched(webhook, kube, namespace):
    create_vm(kube, namespace, seed_vm())
    pod = kube.create(f"/api/v1/namespaces/{namespace}/pods", vm_pod("my-vm", labelled=False))
    container = pod["spec"]["containers"][0]
    assert not container.get("resources")
    assert pod["status"]["qosClass"] == "BestEffort"


def test_a_vm_pod_that_carries_requests_equal_limits_keeps_them(webhook, kube, namespace):
    create_vm(kube, namespace, seed_vm())
    obj = vm_pod("my-vm")
    own = {"cpu": "2", "memory": "1Gi"}
    obj["spec"]["containers"][0]["resources"] = {"requests": own, "limits": own}
    pod = kube.create(f"/api/v1/namespaces/{namespace}/pods", obj)
    container = pod["spec"]["containers"][0]
    assert container["resources"] == {"requests": own, "limits": own}
    assert {p["resourceName"] for p in container["resizePolicy"]} == {"cpu", "memory"}


def test_a_vm_pod_of_a_missing_vm_without_resources_is_refused(webhook, kube, namespace):
    with pytest.raises(ApiError) as info:
        kube.create(
            f"/api/v1/namespaces/{namespace}/pods", vm_pod("no-such-vm", uid=str(uuid.uuid4()))
        )
    assert info.value.status == 404
    assert f"VirtualMachine {namespace}/no-such-vm" in info.value.message


def test_a_pod_naming_a_vm_of_another_uid_gets_the_missing_answer(webhook, kube, namespace):
    # Issue 17 item 3: a VM that exists but is not the pod's owner (another uid) must
    # answer as a missing one does, never with its sizes.
    create_vm(kube, namespace, seed_vm("other-vm"))
    answers = []
    for name in ("other-vm", "none-such-vm"):
        with pytest.raises(ApiError) as info:
            kube.create(
                f"/api/v1/namespaces/{namespace}/pods", vm_pod(name, uid="not-the-owners-uid")
            )
        answers.append((info.value.status, info.value.message.replace(name, "NAME")))
    assert answers[0] == answers[1]
    assert answers[0][0] == 404


def test_concurrent_writes_are_all_admitted_over_reused_connections(
    webhook, kube, namespace, caplog
):
    # Regression for ADR 0006's addendum: with INFO logging on, every review crashed its
    # log line after answering and dropped the connection; the API server, reusing it,
    # failed ~40% of writes with EOF. Dry runs still call every webhook.
    caplog.set_level(logging.INFO, logger="adapters.webhook.server")
    before = webhook.counts["reviews"]

    def create(i: int) -> str | None:
        body = yaml.safe_load(SEED_YAML)
        body["metadata"] = {"name": f"burst-{i}", "namespace": namespace}
        try:
            kube.request("POST", f"{vms_path(namespace)}?dryRun=All", body)
        except ApiError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(create, range(120)) if f]
    assert failures == []
    assert webhook.counts["reviews"] - before >= 240  # mutate and validate, each write
