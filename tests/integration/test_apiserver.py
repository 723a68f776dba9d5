"""Facts about the real kube-apiserver (v1.35) that chscale's design depends on.

RESIZE.md §1 (the CRD and its status subresource) and §7 (in-place pod resize through
``pods/resize``: allowed on a running pod, bumps ``metadata.generation``, refuses a QoS
class change and the removal of a limit). There is no kubelet: a pod is made "running"
by binding it to the fixture's node and writing its status as a kubelet would.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from adapters.k8s.client import Kube
from testbed.controlplane.launcher import CRD_PATH
from tests.integration.tables import server_table

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "cloudhypervisor.quill.today", "v1beta1", "virtualmachines"
CRD_NAME = f"{PLURAL}.{GROUP}"
CONTAINER = "vm-manager"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"

SEED_VM: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VirtualMachine",
    "metadata": {"name": "my-vm"},
    "spec": {
        "instance": {
            "cpu": {"sockets": 2, "coresPerSocket": 4},
            "memory": {"size": "4Gi"},
            # ch-vmm fields chscale does not model; the schema must keep them.
            "disks": [{"name": "rootfs"}],
            "interfaces": [{"name": "pod"}],
        },
        "volumes": [{"name": "rootfs", "containerDisk": {"image": "ubuntu"}}],
    },
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resources(cpu: str, memory: str) -> dict[str, str]:
    return {"cpu": cpu, "memory": memory}


def running_pod(
    api_client: k8s.ApiClient,
    namespace: str,
    node: str,
    requests: dict[str, str],
    limits: dict[str, str],
) -> str:
    """Create a pod, bind it to ``node`` and mark it Running as the kubelet would; its name."""
    core = k8s.CoreV1Api(api_client)
    name = f"pod-{uuid.uuid4().hex[:8]}"
    policy = [
        {"resourceName": "cpu", "restartPolicy": "NotRequired"},
        {"resourceName": "memory", "restartPolicy": "NotRequired"},
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": CONTAINER,
                    "image": "registry.invalid/vm-manager:test",
                    "resources": {"requests": requests, "limits": limits},
                    "resizePolicy": policy,
                }
            ]
        },
    }
    core.create_namespaced_pod(namespace, pod)
    binding = k8s.V1Binding(
        metadata=k8s.V1ObjectMeta(name=name),
        target=k8s.V1ObjectReference(api_version="v1", kind="Node", name=node),
    )
    # The server answers a Status, which the client cannot read back as a Binding.
    core.create_namespaced_pod_binding(name, namespace, binding, _preload_content=False)
    now = _now()
    status = {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
        "containerStatuses": [
            {
                "name": CONTAINER,
                "image": "registry.invalid/vm-manager:test",
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
                "allocatedResources": requests,
                # Without this the API server takes the node for one that cannot resize.
                "resources": {"requests": requests, "limits": limits},
            }
        ],
    }
    core.patch_namespaced_pod_status(name, namespace, {"status": status}, _content_type=STRATEGIC)
    return name


def _pod(api_client: k8s.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return k8s.CoreV1Api(api_client).read_namespaced_pod(name, namespace).to_dict()


def _error_message(exc: ApiException) -> str:
    return str(json.loads(exc.body).get("message", "")) if exc.body else ""


def test_crd_is_served_with_status_subresource_and_printer_columns(
    api_client: k8s.ApiClient, namespace: str, node: str
):
    objects = k8s.CustomObjectsApi(api_client)
    created = objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, copy.deepcopy(SEED_VM)
    )
    assert created["spec"] == SEED_VM["spec"], "the schema pruned or changed the seed's YAML"

    status = {
        "phase": "Running",
        "nodeName": node,
        # ch-vmm's status fields: the pod, and what chscale only keeps.
        "vmPodName": "vm-my-vm",
        "vmPodUID": "3f1c7a3e-0000-4000-8000-000000000001",
        "powerAction": "PowerOn",
        "migration": {"phase": "Pending"},
        "volumeStatus": [{"name": "rootfs", "ready": True}],
        "observedGeneration": 1,
        "desired": {"vcpus": 8, "memory": "4Gi"},
        "capacity": {"maxVcpus": 16, "maxMemory": "20Gi", "bootMemory": "4Gi"},
        "allocated": {"vcpus": 8, "memory": "4Gi"},
        "resize": {"vcpus": 8, "memory": "4Gi", "generation": 1, "step": "Done"},
        "conditions": [
            {
                "type": "Resized",
                "status": "True",
                "reason": "Done",
                "message": "",
                "observedGeneration": 1,
                "lastTransitionTime": _now(),
            }
        ],
    }
    # A spec change sent to the status subresource must be ignored, not applied.
    patched = objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "my-vm",
        {"status": status, "spec": {"instance": {"cpu": {"sockets": 99}}}},
        _content_type=MERGE,
    )
    assert patched["status"] == status, "status fields were pruned by the schema"
    assert patched["spec"] == SEED_VM["spec"]
    assert patched["metadata"]["generation"] == created["metadata"]["generation"]

    # ...and a status change sent to the main resource is ignored likewise.
    objects.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "my-vm",
        {"status": {"phase": "Failed"}},
        _content_type=MERGE,
    )
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "my-vm")
    assert stored["status"]["phase"] == "Running"

    crd = k8s.ApiextensionsV1Api(api_client).read_custom_resource_definition(CRD_NAME)
    (version,) = crd.spec.versions
    assert version.subresources.status is not None
    want_columns = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0][
        "additionalPrinterColumns"
    ]
    assert [(c.name, c.json_path) for c in version.additional_printer_columns] == [
        (c["name"], c["jsonPath"]) for c in want_columns
    ]

    # What `kubectl get vm` shows: the server renders the printer columns as a Table.
    columns, (row,) = server_table(
        api_client, f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    )
    cells = dict(zip(columns, row, strict=True))
    assert cells["Phase"] == "Running"
    assert (cells["vCPUs"], cells["Alloc-vCPUs"]) == (8, 8)
    assert (cells["Memory"], cells["Alloc-Memory"], cells["Node"]) == ("4Gi", "4Gi", node)
    assert cells["Power"] == "PowerOn"  # ch-vmm's Phase, Node and Power are all there


def test_status_fields_clear_with_null(api_client: k8s.ApiClient, namespace: str, node: str):
    """The controller clears finished or stale status fields by writing null, in a merge
    patch or in a full status update; either way the field disappears."""
    objects = k8s.CustomObjectsApi(api_client)
    vm = copy.deepcopy(SEED_VM)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, vm)
    status = {
        "phase": "ResizeInProgress",
        "nodeName": node,
        "observedGeneration": 1,
        "desired": {"vcpus": 8, "memory": "4Gi"},
        "allocated": {"vcpus": 4, "memory": "4Gi"},
        "resize": {"vcpus": 8, "memory": "4Gi", "generation": 1, "step": "Vmm"},
    }
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "my-vm", {"status": status}, _content_type=MERGE
    )

    cleared = objects.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "my-vm",
        {"status": {"resize": None, "nodeName": None, "allocated": {"memory": None}}},
        _content_type=MERGE,
    )
    assert cleared["status"] == {
        "phase": "ResizeInProgress",
        "observedGeneration": 1,
        "desired": {"vcpus": 8, "memory": "4Gi"},
        "allocated": {"vcpus": 4},
    }

    cleared["status"].update(phase="Running", desired=None, observedGeneration=None)
    replaced = objects.replace_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "my-vm", cleared
    )
    assert replaced["status"] == {"phase": "Running", "allocated": {"vcpus": 4}}
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "my-vm")
    assert stored["status"] == replaced["status"]


# Every field of ch-vmm's VirtualMachine (REALITY.md §3), as a ch-vmm user writes it.
CH_VMM_VM: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "VirtualMachine",
    "metadata": {"name": "ch-vmm"},
    "spec": {
        "runPolicy": "RerunOnFailure",
        "instance": {
            "cpu": {"sockets": 1, "coresPerSocket": 2, "dedicatedCPUPlacement": True},
            "memory": {"size": "2Gi", "hugepages": {"pageSize": "1Gi"}},
            "kernel": {"image": "kernel:6.12", "cmdline": "console=ttyS0"},
            "disks": [{"name": "rootfs", "readOnly": False}],
            "interfaces": [{"name": "pod", "bridge": {}}],
            "fileSystems": [{"name": "share"}],
            "gpus": [{"name": "gpu0"}],
            "pmem": {"name": "pm0"},
        },
        "volumes": [{"name": "rootfs", "containerDisk": {"image": "ubuntu"}}],
        "networks": [{"name": "pod", "pod": {}}],
        "livenessProbe": {"tcpSocket": {"port": 22}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"port": 80}},
        "resources": {"claims": [{"name": "gpu"}], "requests": {"cpu": "2"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "vms", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
    },
}


def test_server_side_apply_keeps_every_ch_vmm_field(api_client: k8s.ApiClient, namespace: str):
    """The schema alone (no webhook here): nothing a ch-vmm user writes is pruned."""
    objects = k8s.CustomObjectsApi(api_client)
    applied = Kube(api_client).request(
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/ch-vmm",
        CH_VMM_VM,  # JSON is YAML
        query={"fieldManager": "ch-vmm-user", "force": "true"},
        content_type="application/apply-patch+yaml",
    )
    assert applied["spec"] == CH_VMM_VM["spec"]
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "ch-vmm")
    assert stored["spec"] == CH_VMM_VM["spec"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"memory": {"size": "2Gi", "hugepages": {"pageSize": "4Ki"}}}, "hugepages.pageSize"),
        ({"cpu": {"dedicatedCPUPlacement": "yes"}}, "dedicatedCPUPlacement"),
        ({"disks": [{"readOnly": True}]}, "spec.instance.disks[0].name"),
    ],
)
def test_the_schema_refuses_what_ch_vmms_refuses(
    api_client: k8s.ApiClient, namespace: str, change: dict[str, Any], field: str
):
    objects = k8s.CustomObjectsApi(api_client)
    vm = copy.deepcopy(CH_VMM_VM)
    vm["spec"]["instance"].update(change)
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, vm)
    assert refused.value.status == 422
    assert field in _error_message(refused.value), _error_message(refused.value)
    nameless = copy.deepcopy(CH_VMM_VM)
    nameless["spec"]["networks"] = [{"pod": {}}]
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, nameless)
    assert "spec.networks[0].name" in _error_message(refused.value)


def test_schema_leaves_value_rules_to_the_webhook(api_client: k8s.ApiClient, namespace: str):
    """Types are checked by the API server, values are not: a zero socket count is the
    validating webhook's to refuse (with a message), not the schema's."""
    objects = k8s.CustomObjectsApi(api_client)
    vm = copy.deepcopy(SEED_VM)
    vm["metadata"]["name"] = "zero-sockets"
    vm["spec"]["instance"]["cpu"]["sockets"] = 0
    vm["spec"]["instance"]["memory"]["size"] = "3.3333Gi"
    created = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, vm)
    assert created["spec"]["instance"]["cpu"]["sockets"] == 0

    vm["metadata"]["name"] = "string-sockets"
    vm["spec"]["instance"]["cpu"]["sockets"] = "two"
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, vm)
    assert refused.value.status == 422
    assert "spec.instance.cpu.sockets" in _error_message(refused.value)


def test_pod_resize_succeeds_on_running_pod(api_client: k8s.ApiClient, namespace: str, node: str):
    before = _resources("1", "256Mi")
    name = running_pod(api_client, namespace, node, requests=before, limits=before)
    generation = _pod(api_client, namespace, name)["metadata"]["generation"]

    after = _resources("2", "512Mi")
    body = {
        "spec": {
            "containers": [{"name": CONTAINER, "resources": {"requests": after, "limits": after}}]
        }
    }
    k8s.CoreV1Api(api_client).patch_namespaced_pod_resize(
        name, namespace, body, _content_type=STRATEGIC
    )

    pod = _pod(api_client, namespace, name)
    resources = pod["spec"]["containers"][0]["resources"]
    assert (resources["requests"], resources["limits"]) == (after, after)
    assert pod["metadata"]["generation"] == generation + 1
    assert pod["status"]["qos_class"] == "Guaranteed"


def test_resize_that_changes_qos_class_is_rejected(
    api_client: k8s.ApiClient, namespace: str, node: str
):
    guaranteed = _resources("1", "256Mi")
    name = running_pod(api_client, namespace, node, requests=guaranteed, limits=guaranteed)
    before = _pod(api_client, namespace, name)

    # requests below limits would make the pod Burstable.
    body = {
        "spec": {
            "containers": [
                {
                    "name": CONTAINER,
                    "resources": {
                        "requests": _resources("1", "256Mi"),
                        "limits": _resources("2", "512Mi"),
                    },
                }
            ]
        }
    }
    with pytest.raises(ApiException) as refused:
        k8s.CoreV1Api(api_client).patch_namespaced_pod_resize(
            name, namespace, body, _content_type=STRATEGIC
        )
    assert refused.value.status == 422
    assert "Pod QOS Class may not change as a result of resizing" in _error_message(refused.value)

    after = _pod(api_client, namespace, name)
    assert after["spec"]["containers"] == before["spec"]["containers"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]


def test_resize_that_removes_a_limit_is_rejected(
    api_client: k8s.ApiClient, namespace: str, node: str
):
    # Burstable either way, so the removal is the only thing wrong with the request.
    name = running_pod(
        api_client,
        namespace,
        node,
        requests=_resources("500m", "128Mi"),
        limits=_resources("1", "256Mi"),
    )
    before = _pod(api_client, namespace, name)

    remove = [{"op": "remove", "path": "/spec/containers/0/resources/limits/cpu"}]
    with pytest.raises(ApiException) as refused:
        k8s.CoreV1Api(api_client).patch_namespaced_pod_resize(
            name, namespace, remove, _content_type=JSON_PATCH
        )
    assert refused.value.status == 422
    message = _error_message(refused.value)
    assert "resource limits cannot be removed" in message
    assert "QOS" not in message

    after = _pod(api_client, namespace, name)
    assert after["spec"]["containers"] == before["spec"]["containers"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
