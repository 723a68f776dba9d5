"""Admission decisions as pure functions: AdmissionReview request in, response out.

The rules themselves live in the kernel (``core.resources.validate_vm``,
``core.resources.pod_resources``); this module only speaks AdmissionReview v1 and
JSONPatch. No I/O: the server and the tests call these directly.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

from core.constants import VM_CONTAINER, VM_NAME_LABEL
from core.model import FieldError
from core.quantity import format_bytes, format_millicores
from core.resources import pod_resources, validate_vm
from core.wire import parse_vm

VmLookup = Callable[[str, str], dict[str, Any] | None]

RESIZE_POLICY = [
    {"resourceName": "cpu", "restartPolicy": "NotRequired"},
    {"resourceName": "memory", "restartPolicy": "NotRequired"},
]


class BadReview(ValueError):
    """The body is not an AdmissionReview we can answer (the server replies 400)."""


def parse_review(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("missing request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("missing request.uid")
    return request


def _response(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": True, **fields},
    }


def allow(uid: str) -> dict[str, Any]:
    return _response(uid)


def deny(uid: str, errors: list[FieldError] | tuple[FieldError, ...]) -> dict[str, Any]:
    message = "; ".join(str(e) for e in errors)
    return _response(
        uid,
        allowed=False,
        status={
            "status": "Failure",
            "code": 422,
            "reason": "Invalid",
            "message": f"VirtualMachine is invalid: {message}",
            "details": {
                "causes": [
                    {"reason": "FieldValueInvalid", "field": e.path, "message": e.message}
                    for e in errors
                ]
            },
        },
    )


def patched(uid: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    if not ops:
        return allow(uid)
    patch = base64.b64encode(json.dumps(ops).encode()).decode()
    return _response(uid, patchType="JSONPatch", patch=patch)


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` and ``/`` in keys are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _object(request: dict[str, Any], key: str = "object") -> dict[str, Any] | None:
    obj = request.get(key)
    return obj if isinstance(obj, dict) else None


def _with_name(request: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """Objects created with generateName have no name yet at admission time."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and meta.get("name"):
        return obj
    name = request.get("name") or (meta or {}).get("generateName") or "unnamed"
    return {**obj, "metadata": {**(meta if isinstance(meta, dict) else {}), "name": name}}


# --- VirtualMachine ---------------------------------------------------------------------


def validate_vm_review(request: dict[str, Any]) -> dict[str, Any]:
    uid = request["uid"]
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return allow(uid)
    obj = _object(request)
    if obj is None:
        return deny(uid, [FieldError("object", "is missing or not an object")])
    try:
        new = parse_vm(_with_name(request, obj))
    except (ValueError, TypeError) as exc:
        return deny(uid, [FieldError("metadata", str(exc))])
    old = None
    if request.get("operation") == "UPDATE" and (old_obj := _object(request, "oldObject")):
        try:
            old = parse_vm(_with_name(request, old_obj))
        except (ValueError, TypeError):
            old = None
    errors = validate_vm(new, old)
    return deny(uid, errors) if errors else allow(uid)


def mutate_vm_review(request: dict[str, Any]) -> dict[str, Any]:
    uid = request["uid"]
    obj = _object(request)
    if request.get("operation") not in ("CREATE", "UPDATE") or obj is None:
        return allow(uid)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return allow(uid)
    ops: list[dict[str, Any]] = []
    instance = spec.get("instance")
    cpu = instance.get("cpu") if isinstance(instance, dict) else None
    if isinstance(cpu, dict):
        for key in ("sockets", "coresPerSocket"):
            if key not in cpu:
                ops.append(
                    {"op": "add", "path": pointer("spec", "instance", "cpu", key), "value": 1}
                )
    elif isinstance(instance, dict) and "cpu" not in instance:
        ops.append(
            {
                "op": "add",
                "path": pointer("spec", "instance", "cpu"),
                "value": {"sockets": 1, "coresPerSocket": 1},
            }
        )
    try:
        vm = parse_vm(_with_name(request, _apply_defaults(obj, ops)))
    except (ValueError, TypeError):
        return patched(uid, ops)
    if vm.spec is None:
        return patched(uid, ops)  # the validating webhook refuses it, with the field path
    needed = pod_resources(vm.spec)
    values = {"cpu": format_millicores(needed.cpu_millis), "memory": format_bytes(needed.memory)}
    resources = spec.get("resources")
    if not isinstance(resources, dict):
        ops.append(
            {
                "op": "add",
                "path": pointer("spec", "resources"),
                "value": {"requests": dict(values), "limits": dict(values)},
            }
        )
    else:
        for kind in ("requests", "limits"):
            current = resources.get(kind)
            if not isinstance(current, dict):
                ops.append(
                    {"op": "add", "path": pointer("spec", "resources", kind), "value": dict(values)}
                )
                continue
            for name, value in values.items():
                # Kept consistent with the instance spec on every write, so a pod created
                # from it is never smaller than the guest needs.
                if current.get(name) != value:
                    op = "replace" if name in current else "add"
                    ops.append(
                        {"op": op, "path": pointer("spec", "resources", kind, name), "value": value}
                    )
    return patched(uid, ops)


def _apply_defaults(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The object as the defaulting ops would leave it (only the cpu defaults)."""
    if not ops:
        return obj
    result = copy.deepcopy(obj)
    cpu = result["spec"]["instance"].setdefault("cpu", {})
    for key in ("sockets", "coresPerSocket"):
        cpu.setdefault(key, 1)
    return result


# --- the VM pod ---------------------------------------------------------------------------


def mutate_pod_review(request: dict[str, Any], lookup: VmLookup | None) -> dict[str, Any]:
    uid = request["uid"]
    pod = _object(request)
    if request.get("operation") != "CREATE" or pod is None:
        return allow(uid)
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    vm_name = labels.get(VM_NAME_LABEL)
    spec = pod.get("spec")
    if not isinstance(vm_name, str) or not isinstance(spec, dict):
        return allow(uid)
    containers = spec.get("containers")
    if not isinstance(containers, list):
        return allow(uid)
    values = None
    namespace = request.get("namespace") or meta.get("namespace") or "default"
    if lookup is not None:
        try:
            vm_obj = lookup(str(namespace), vm_name)
            vm = parse_vm(vm_obj) if vm_obj is not None else None
        except (ValueError, TypeError, OSError):
            vm = None
        if vm is not None and vm.spec is not None:
            needed = pod_resources(vm.spec)
            values = {
                "cpu": format_millicores(needed.cpu_millis),
                "memory": format_bytes(needed.memory),
            }
    ops: list[dict[str, Any]] = []
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or container.get("name") != VM_CONTAINER:
            continue
        if values is not None:
            resources = {"requests": dict(values), "limits": dict(values)}
            if container.get("resources") != resources:
                op = "replace" if "resources" in container else "add"
                ops.append(
                    {
                        "op": op,
                        "path": pointer("spec", "containers", i, "resources"),
                        "value": resources,
                    }
                )
        if container.get("resizePolicy") != RESIZE_POLICY:
            op = "replace" if "resizePolicy" in container else "add"
            ops.append(
                {
                    "op": op,
                    "path": pointer("spec", "containers", i, "resizePolicy"),
                    "value": RESIZE_POLICY,
                }
            )
    return patched(uid, ops)
