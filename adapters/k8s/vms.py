"""VirtualMachine-specific Kubernetes plumbing: the VM pod's manifest, status writes,
finalizers. Everything here turns kernel values into API objects; nothing decides."""

from __future__ import annotations

import copy
from typing import Any

from adapters.k8s.client import AlreadyExists, Kube
from adapters.k8s.events import EventRecorder
from core.constants import (
    API_GROUP,
    API_VERSION,
    FINALIZER,
    KIND,
    PLURAL,
    VM_CONTAINER,
    VM_NAME_LABEL,
    VM_UID_LABEL,
)
from core.model import Resources, VmStatus
from core.podlayout import POD_UID_ENV, VMM_MOUNT_PATH, VMM_VOLUME, vmm_socket_in_pod
from core.quantity import format_bytes, format_millicores
from core.wire import render_status

DEFAULT_VMM_IMAGE = "ghcr.io/chscale/vm-manager:0.1.0"


def pod_name(vm_name: str) -> str:
    return f"vm-{vm_name}"


def vm_path(namespace: str, name: str = "", subresource: str = "") -> str:
    """The namespace's VM collection, or one VM (and a subresource of it)."""
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    if name:
        path = f"{path}/{name}"
    return f"{path}/{subresource}" if subresource else path


def resource_list(resources: Resources) -> dict[str, str]:
    return {
        "cpu": format_millicores(resources.cpu_millis),
        "memory": format_bytes(resources.memory),
    }


def build_pod(vm_obj: dict[str, Any], resources: Resources, image: str) -> dict[str, Any]:
    """The VM pod: one ``vm-manager`` container whose requests = limits (Guaranteed QoS,
    which a resize must keep) and whose resize policy never restarts it (a restart would
    kill the guest; the policy is immutable once the pod exists)."""
    meta = vm_obj["metadata"]
    spec = vm_obj.get("spec") or {}
    name = meta["name"]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 30,
        "containers": [
            {
                "name": VM_CONTAINER,
                "image": image,
                "args": ["--api-socket", f"path={vmm_socket_in_pod()}"],
                # The node daemon checks that the VMM behind the pod's socket is this
                # pod's by this variable (or the pod's cgroup): ADR 0011.
                "env": [
                    {
                        "name": POD_UID_ENV,
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
                    }
                ],
                "resources": {
                    "requests": resource_list(resources),
                    "limits": resource_list(resources),
                },
                "resizePolicy": [
                    {"resourceName": "cpu", "restartPolicy": "NotRequired"},
                    {"resourceName": "memory", "restartPolicy": "NotRequired"},
                ],
                "volumeMounts": [{"name": VMM_VOLUME, "mountPath": VMM_MOUNT_PATH}],
            }
        ],
        "volumes": [{"name": VMM_VOLUME, "emptyDir": {}}],
    }
    for key in ("nodeSelector", "affinity", "tolerations"):
        if spec.get(key):
            pod_spec[key] = copy.deepcopy(spec[key])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name),
            "namespace": meta["namespace"],
            "labels": {VM_NAME_LABEL: name, VM_UID_LABEL: meta.get("uid", "")},
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": KIND,
                    "name": name,
                    "uid": meta.get("uid", ""),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def owned_pod(vm_obj: dict[str, Any], pod_obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pod only if it belongs to this incarnation of the VM (same name, same uid)."""
    if pod_obj is None:
        return None
    labels = pod_obj.get("metadata", {}).get("labels") or {}
    uid = vm_obj.get("metadata", {}).get("uid")
    return pod_obj if labels.get(VM_UID_LABEL) in (uid, None) else None


def status_body(old_raw: dict[str, Any] | None, new: VmStatus, now: str) -> dict[str, Any]:
    """Render ``new`` for the status subresource, stamping timestamps the kernel cannot:
    a condition keeps its lastTransitionTime unless its status flipped, and a resize
    record gets ``startedAt`` when it first appears for a generation."""
    old_raw = old_raw or {}
    old_conditions = {
        c.get("type"): c for c in old_raw.get("conditions") or () if isinstance(c, dict)
    }
    times = {}
    for cond in new.conditions:
        previous = old_conditions.get(cond.type)
        if previous and previous.get("status") == str(cond.status):
            times[cond.type] = previous.get("lastTransitionTime") or now
        else:
            times[cond.type] = now
    body = render_status(new, times)
    resize = body.get("resize")
    if resize is not None and not resize.get("startedAt"):
        old_resize = old_raw.get("resize") or {}
        same = isinstance(old_resize, dict) and old_resize.get("generation") == resize.get(
            "generation"
        )
        resize["startedAt"] = (old_resize.get("startedAt") if same else None) or now
    return body


def same_status(old_raw: dict[str, Any] | None, body: dict[str, Any]) -> bool:
    """Would merge-patching ``body`` leave the object's status as it is? A null deletes
    a key, so it matches an absent one, at any depth; lists are replaced whole."""
    old = old_raw or {}
    for key, value in body.items():
        current = old.get(key)
        if value is None:
            if current is not None:
                return False
        elif isinstance(value, dict):
            if not isinstance(current, dict) or not same_status(current, value):
                return False
        elif current != value:
            return False
    return True


def finalizer_patch(vm_obj: dict[str, Any], add: bool) -> dict[str, Any]:
    meta = vm_obj["metadata"]
    finalizers = [f for f in meta.get("finalizers") or () if f != FINALIZER]
    if add:
        finalizers.append(FINALIZER)
    # resourceVersion in a merge patch makes it conditional: a concurrent writer's
    # finalizer change is never overwritten blindly.
    return {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}


class VmApi:
    """The controller's and the daemon's writes, as the kernel's executors need them."""

    def __init__(self, kube: Kube, recorder: EventRecorder) -> None:
        self.kube = kube
        self.recorder = recorder
        self.resize_calls = 0

    def write_status(self, vm_obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        meta = vm_obj["metadata"]
        return self.kube.patch_status(
            vm_path(meta["namespace"], meta["name"]), status, meta["resourceVersion"]
        )

    def record_event(self, vm_obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.recorder.record(vm_obj, type_, reason, message)

    def patch_vm(self, vm_obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        meta = vm_obj["metadata"]
        return self.kube.patch(vm_path(meta["namespace"], meta["name"]), patch)

    def create_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        namespace = pod["metadata"]["namespace"]
        try:
            return self.kube.create(f"/api/v1/namespaces/{namespace}/pods", pod)
        except AlreadyExists:
            # Created by a previous incarnation of this controller before it crashed.
            return self.kube.get(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}")

    def delete_pod(self, namespace: str, name: str) -> None:
        self.kube.delete(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def resize_pod(self, namespace: str, name: str, cpu_millis: int, memory: int) -> dict[str, Any]:
        self.resize_calls += 1
        values = resource_list(Resources(cpu_millis, memory))
        return self.kube.resize_pod(namespace, name, VM_CONTAINER, values["cpu"], values["memory"])
