"""Admission decisions as pure functions: an AdmissionReview request in, the response out.

Theory of operation. The API server sends an ``admission.k8s.io/v1`` AdmissionReview;
:func:`parse_review` checks its envelope (anything else is the caller's fault: the server
answers 400) and returns ``request``. One function per route turns that request into a
complete AdmissionReview response:

- :func:`mutate_vm_review` (VirtualMachine CREATE/UPDATE) applies ch-vmm's defaults (CPU
  topology 1 x 1, ``memory.size`` 1Gi, ``runPolicy`` Once) and keeps ``spec.resources``
  equal to what the VM pod gets (requests = limits =
  :func:`core.resources.pod_resources`), as a JSONPatch. A spec the kernel cannot parse,
  or one the rules refuse, is left alone: the validating webhook refuses it with the
  field path, and a patch computed from a broken spec would only obscure that.
- :func:`validate_vm_review` (VirtualMachine CREATE/UPDATE) refuses with 422 Invalid,
  one cause per :class:`core.model.FieldError` of ``parse_vm`` and ``validate_vm``.
  An UPDATE that leaves ``spec.instance`` as it was is admitted: the rules judge changes
  to the VM, and metadata writes (a finalizer removed on delete) must never be blocked by
  a spec that predates the webhook. An admitted VM gets a warning for every ch-vmm field
  it sets that chscale keeps but does not act on (:func:`core.resources.compat_warnings`).
- :func:`mutate_pod_review` (Pod CREATE, VM pods only) gives container ``vm-manager``
  requests = limits and ``resizePolicy: NotRequired`` for cpu and memory. The VM spec is
  needed only when the pod does not already carry requests = limits; it comes from a
  lookup function the app supplies, so this module stays free of I/O.

The rules themselves are the kernel's (``core.resources``, ``core.wire``); nothing here
re-decides what a valid VM is. Every function is total: odd input is a refusal or a
pass-through, never an exception.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen

from core.config import DEFAULT_CONFIG, KernelConfig
from core.constants import API_GROUP, KIND, VM_CONTAINER, VM_NAME_LABEL, VM_UID_LABEL
from core.model import FieldError, Resources, Vm
from core.quantity import (
    QuantityError,
    format_bytes,
    format_millicores,
    parse_bytes,
    parse_millicores,
)
from core.resources import (
    DEFAULT_MEMORY_SIZE,
    DEFAULT_RUN_POLICY,
    compat_warnings,
    pod_resources,
    validate_vm,
)
from core.wire import parse_vm

__all__ = [
    "REVIEW_API_VERSION",
    "BadReview",
    "LookupFailed",
    "VmLookup",
    "allow",
    "mutate_pod_review",
    "mutate_vm_review",
    "parse_review",
    "patched",
    "pointer",
    "refuse",
    "validate_vm_review",
]

REVIEW_API_VERSION = "admission.k8s.io/v1"
REVIEW_KIND = "AdmissionReview"
CREATE, UPDATE = "CREATE", "UPDATE"
RESIZABLE = ("cpu", "memory")
# RestartContainer would restart the VMM, that is kill the guest (RESIZE.md §5).
NOT_REQUIRED = "NotRequired"
# Messages quote user values; a megabyte of them helps nobody reading kubectl's output.
MAX_MESSAGE_CHARS = 2048
TOO_DEEP = "is nested too deeply to judge"
# A VM's name and namespace (DNS subdomain / label): checked before they go into a lookup
# URL, because mutating webhooks see labels before the API server validates them.
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

VmLookup = Callable[[str, str], dict[str, Any] | None]
"""``(namespace, name)`` -> the VirtualMachine object, or ``None`` when it does not exist.
Raises (:class:`LookupFailed` or anything else) when it cannot tell."""


class BadReview(ValueError):
    """The body is not an AdmissionReview v1 request (the sender's fault: HTTP 400)."""


class LookupFailed(Exception):
    """The VM could not be read (API server unreachable, forbidden, ...)."""


# --- the envelope ---------------------------------------------------------------------


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an AdmissionReview v1 body; :class:`BadReview` says what is wrong."""
    if not body:
        raise BadReview("empty body: expected an AdmissionReview")
    try:
        review = json.loads(body)
    except RecursionError:
        raise BadReview("body is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise BadReview(f"body is not JSON: {exc}") from None
    if not isinstance(review, dict):
        raise BadReview(f"expected a JSON object, got {type(review).__name__}")
    if review.get("apiVersion") != REVIEW_API_VERSION or review.get("kind") != REVIEW_KIND:
        raise BadReview(
            f"expected apiVersion {REVIEW_API_VERSION} kind {REVIEW_KIND}, got "
            f"apiVersion {_short(review.get('apiVersion'))} kind {_short(review.get('kind'))}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("request.uid is missing or not a string")
    return request


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    return _cut(repr(value), limit)


def _review(uid: str, response: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": REVIEW_API_VERSION,
        "kind": REVIEW_KIND,
        "response": {"uid": uid, **response},
    }


def allow(uid: str, warnings: Sequence[str] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {"allowed": True}
    if warnings:
        response["warnings"] = list(warnings)
    return _review(uid, response)


def refuse(
    uid: str,
    message: str,
    *,
    code: int = 422,
    reason: str = "Invalid",
    causes: Sequence[FieldError] = (),
) -> dict[str, Any]:
    """A denial; the API server prefixes ``message`` with the webhook's name and returns
    ``code`` and the causes (field paths) to the client."""
    status: dict[str, Any] = {
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": _cut(message, MAX_MESSAGE_CHARS),
    }
    if causes:
        status["details"] = {
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "field": e.path,
                    "message": _cut(e.message, MAX_MESSAGE_CHARS),
                }
                for e in causes
            ]
        }
    return _review(uid, {"allowed": False, "status": status})


def patched(uid: str, ops: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Allowed, with ``ops`` as a JSONPatch (no patch at all when nothing changes)."""
    if not ops:
        return allow(uid)
    patch = base64.b64encode(json.dumps(list(ops), separators=(",", ":")).encode()).decode()
    return _review(uid, {"allowed": True, "patchType": "JSONPatch", "patch": patch})


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` becomes ``~0`` and ``/`` becomes ``~1`` in keys."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _add(ops: list[dict[str, Any]], value: object, *path: str | int) -> None:
    # "add" replaces an existing member (RFC 6902 §4.1), so it serves both cases.
    ops.append({"op": "add", "path": pointer(*path), "value": value})


def _dict(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _uid(request: dict[str, Any]) -> str:
    return str(request["uid"])


def _named(request: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with a name to parse it by: objects created with ``generateName`` get theirs
    after the mutating webhooks run."""
    meta = _dict(obj.get("metadata"))
    if meta is None or meta.get("name"):
        return obj
    name = request.get("name") or meta.get("generateName")
    return {**obj, "metadata": {**meta, "name": name}} if name else obj


def _describe(request: dict[str, Any], obj: dict[str, Any]) -> str:
    meta = _dict(obj.get("metadata")) or {}
    namespace = request.get("namespace") or meta.get("namespace") or ""
    name = meta.get("name") or request.get("name") or meta.get("generateName") or ""
    return f'{KIND} "{namespace}/{name}"' if namespace else f'{KIND} "{name}"'


def _parse(request: dict[str, Any], obj: dict[str, Any]) -> Vm | FieldError:
    try:
        return parse_vm(_named(request, obj))
    except ValueError as exc:  # no usable identity
        return FieldError("metadata.name", str(exc))
    except RecursionError:  # a value so deep that quoting it in an error overflows
        return FieldError("spec", TOO_DEEP)
    except TypeError as exc:  # parse_vm is meant to refuse with ValueError only
        return FieldError("object", f"is malformed: {exc}")


def _refuse_vm(uid: str, what: str, errors: Sequence[FieldError]) -> dict[str, Any]:
    return refuse(uid, f"{what} is invalid: " + "; ".join(map(str, errors)), causes=errors)


# --- VirtualMachine: validation -------------------------------------------------------

_ABSENT = object()


def _instance(obj: dict[str, Any]) -> object:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ("spec", spec)  # never equal to an instance value, equal to itself
    return spec.get("instance", _ABSENT)


def _judge(new: Vm, old: Vm | None) -> tuple[FieldError, ...]:
    try:
        return validate_vm(new, old)
    except ValueError as exc:
        # Python will not print an int of more than 4300 digits, and the rules quote the
        # values they refuse: such a spec is refused here rather than answered with a 500.
        return (FieldError("spec.instance", f"numbers too large to judge: {exc}"),)


def _same_instance(old: dict[str, Any], new: dict[str, Any]) -> bool:
    try:
        return _instance(old) == _instance(new)
    except RecursionError:  # too deep to compare: judge it in full
        return False


def validate_vm_review(request: dict[str, Any]) -> dict[str, Any]:
    uid = _uid(request)
    operation = request.get("operation")
    if operation not in (CREATE, UPDATE):
        return allow(uid)
    obj = _dict(request.get("object"))
    if obj is None:
        return refuse(
            uid,
            f"{KIND} is invalid: object: must be a JSON object",
            causes=[FieldError("object", "must be a JSON object")],
        )
    what = _describe(request, obj)
    warnings = _warnings(obj)
    old_obj = _dict(request.get("oldObject")) if operation == UPDATE else None
    if old_obj is not None and _same_instance(old_obj, obj):
        return allow(uid, warnings)
    new = _parse(request, obj)
    if isinstance(new, FieldError):
        return _refuse_vm(uid, what, [new])
    old = None
    if old_obj is not None:
        parsed = _parse(request, old_obj)
        old = parsed if isinstance(parsed, Vm) else None
    errors = _judge(new, old)
    return _refuse_vm(uid, what, errors) if errors else allow(uid, warnings)


def _warnings(obj: dict[str, Any]) -> list[str]:
    # A warning quotes at most the runPolicy the user wrote; cut it like any message.
    return [_cut(w, MAX_MESSAGE_CHARS) for w in compat_warnings(obj.get("spec"))]


# --- VirtualMachine: defaults ---------------------------------------------------------


def resource_values(resources: Resources) -> dict[str, str]:
    """``{"cpu": ..., "memory": ...}`` as Kubernetes prints them."""
    return {
        "cpu": format_millicores(resources.cpu_millis),
        "memory": format_bytes(resources.memory),
    }


def _amount(name: str, value: object) -> int | None:
    try:
        return parse_millicores(value) if name == "cpu" else parse_bytes(value)
    except QuantityError:
        return None


def _resource_ops(
    ops: list[dict[str, Any]],
    resources: object,
    needed: Resources,
    values: dict[str, str],
    *parent: str | int,
) -> None:
    """Ops that make ``resources`` (at ``parent``/resources) hold requests = limits =
    ``needed`` (``values`` as quantity strings) for cpu and memory. Only our values go
    into the patch, never a copy of the user's: other resource names and keys stay."""
    wanted = {"cpu": needed.cpu_millis, "memory": needed.memory}
    current = _dict(resources)
    if current is None:
        _add(ops, {"requests": dict(values), "limits": dict(values)}, *parent, "resources")
        return
    for kind in ("requests", "limits"):
        listed = _dict(current.get(kind))
        if listed is None:
            _add(ops, dict(values), *parent, "resources", kind)
            continue
        for name in RESIZABLE:
            # Equal amounts keep the user's spelling ("8000m" stays): only a change is a
            # write, and a write to a VM bumps its generation.
            if _amount(name, listed.get(name)) != wanted[name]:
                _add(ops, values[name], *parent, "resources", kind, name)


def mutate_vm_review(
    request: dict[str, Any], config: KernelConfig = DEFAULT_CONFIG
) -> dict[str, Any]:
    uid = _uid(request)
    obj = _dict(request.get("object"))
    if request.get("operation") not in (CREATE, UPDATE) or obj is None:
        return allow(uid)
    vm = _parse(request, obj)
    if isinstance(vm, FieldError) or vm.spec is None or _judge(vm, None):
        return allow(uid)  # the validating webhook refuses it, naming the field
    spec: dict[str, Any] = obj["spec"]  # parse_vm found a spec object
    ops: list[dict[str, Any]] = []
    _default_ops(ops, spec)
    needed = pod_resources(vm.spec, config)
    try:
        values = resource_values(needed)
    except ValueError:
        # Too many digits to print (Python refuses int -> str beyond 4300): nothing a
        # pod could hold. Left for validation; see the kernel's bounds.
        return allow(uid)
    _resource_ops(ops, spec.get("resources"), needed, values, "spec")
    return patched(uid, ops)


def _default_ops(ops: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    """ch-vmm's defaults, written out where the user left them out (the kernel reads the
    same values from an absent field; the patch makes them visible in the object)."""
    topology = {"sockets": 1, "coresPerSocket": 1}
    size = format_bytes(DEFAULT_MEMORY_SIZE)
    instance = _dict(spec.get("instance"))
    if instance is None:
        _add(ops, {"cpu": topology, "memory": {"size": size}}, "spec", "instance")
    else:
        cpu = _dict(instance.get("cpu"))
        if cpu is None:
            _add(ops, topology, "spec", "instance", "cpu")
        else:
            for key, value in topology.items():
                if cpu.get(key) is None:
                    _add(ops, value, "spec", "instance", "cpu", key)
        memory = _dict(instance.get("memory"))
        if memory is None:
            _add(ops, {"size": size}, "spec", "instance", "memory")
        elif memory.get("size") is None:
            _add(ops, size, "spec", "instance", "memory", "size")
    if spec.get("runPolicy") is None:
        _add(ops, DEFAULT_RUN_POLICY, "spec", "runPolicy")


# --- the VM pod -----------------------------------------------------------------------


def _guaranteed(resources: object) -> bool:
    """Requests = limits for cpu and memory, all valid quantities."""
    resources = _dict(resources)
    if resources is None:
        return False
    requests, limits = _dict(resources.get("requests")), _dict(resources.get("limits"))
    if requests is None or limits is None:
        return False
    for name in RESIZABLE:
        amount = _amount(name, limits.get(name))
        if amount is None or amount <= 0 or _amount(name, requests.get(name)) != amount:
            return False
    return True


def _policy_ops(ops: list[dict[str, Any]], policy: object, *container: str | int) -> None:
    """Ops that give cpu and memory ``restartPolicy: NotRequired``; entries for other
    resources are left as they are."""
    if not isinstance(policy, list):
        entries = [{"resourceName": n, "restartPolicy": NOT_REQUIRED} for n in RESIZABLE]
        _add(ops, entries, *container, "resizePolicy")
        return
    seen: set[str] = set()
    for i, entry in enumerate(policy):
        name = entry.get("resourceName") if isinstance(entry, dict) else None
        if name in RESIZABLE and name not in seen:
            seen.add(name)
            if entry.get("restartPolicy") != NOT_REQUIRED:
                _add(ops, NOT_REQUIRED, *container, "resizePolicy", i, "restartPolicy")
    for name in RESIZABLE:
        if name not in seen:
            added = {"resourceName": name, "restartPolicy": NOT_REQUIRED}
            _add(ops, added, *container, "resizePolicy", "-")


@frozen
class _Owner:
    name: str
    uid: str | None


def _owner(meta: dict[str, Any]) -> _Owner | None:
    """The pod's VM by its label; its uid only from a matching ownerReference (what the
    controller's pod carries), so a lookup is never made for a bare name (ADR 0011)."""
    labels = _dict(meta.get("labels")) or {}
    name = labels.get(VM_NAME_LABEL)
    if not isinstance(name, str) or not name:
        return None
    uid: str | None = None
    refs = meta.get("ownerReferences")
    for ref in refs if isinstance(refs, list) else ():
        if (
            isinstance(ref, dict)
            and ref.get("kind") == KIND
            and str(ref.get("apiVersion") or "").startswith(f"{API_GROUP}/")
            and ref.get("name") == name
            and isinstance(ref.get("uid"), str)
            and ref["uid"]
        ):
            uid = ref["uid"]
    label_uid = labels.get(VM_UID_LABEL)
    if uid is not None and label_uid and label_uid != uid:
        uid = None  # two owners named: trust neither
    return _Owner(name, uid)


class _Refused(Exception):
    def __init__(self, message: str, code: int = 422, reason: str = "Invalid") -> None:
        super().__init__(message)
        self.message, self.code, self.reason = message, code, reason


def _vm_resources(
    request: dict[str, Any],
    meta: dict[str, Any],
    owner: _Owner,
    lookup: VmLookup | None,
    config: KernelConfig,
) -> Resources:
    """The VM's pod resources; :class:`_Refused` says why they cannot be known.

    Only the review's own namespace and the pod's owner (name and uid) are looked up, and
    a VM that does not exist and one whose uid is not the owner's get the same answer:
    the webhook's read access must not become anyone's existence oracle (ADR 0011)."""
    namespace = str(request.get("namespace") or "")
    key = f"{namespace}/{owner.name}"
    if not (_OBJECT_NAME.fullmatch(namespace) and _OBJECT_NAME.fullmatch(owner.name)):
        raise _Refused(f"label {VM_NAME_LABEL}: {key!r} cannot name a {KIND}")
    missing = _Refused(
        f"{KIND} {key} (label {VM_NAME_LABEL}) does not exist with the uid of the pod's "
        f"ownerReference ({owner.uid or 'none'})",
        404,
        "NotFound",
    )
    if not owner.uid:
        raise missing
    if lookup is None:
        raise _Refused(
            f"pod has no requests = limits for {VM_CONTAINER} and this webhook has no API "
            f"access to read {KIND} {key} for them",
            503,
            "ServiceUnavailable",
        )
    try:
        obj = lookup(namespace, owner.name)
    except Exception as exc:  # the app's I/O failed: say so, never crash the review
        raise _Refused(
            f"cannot read {KIND} {key} to size its pod: {exc}", 503, "ServiceUnavailable"
        ) from None
    vm = _parse(request, obj) if isinstance(obj, dict) else None
    obj_meta = _dict(obj.get("metadata")) if isinstance(obj, dict) else None
    if vm is None or obj_meta is None or obj_meta.get("uid") != owner.uid:
        raise missing
    if isinstance(vm, FieldError) or vm.spec is None:
        errors = [vm] if isinstance(vm, FieldError) else list(vm.spec_errors)
        raise _Refused(
            f"{KIND} {key} has an invalid spec, its pod cannot be sized: "
            + "; ".join(map(str, errors))
        )
    return pod_resources(vm.spec, config)


def mutate_pod_review(
    request: dict[str, Any],
    lookup: VmLookup | None,
    config: KernelConfig = DEFAULT_CONFIG,
) -> dict[str, Any]:
    uid = _uid(request)
    pod = _dict(request.get("object"))
    if request.get("operation") != CREATE or pod is None:
        return allow(uid)
    meta = _dict(pod.get("metadata")) or {}
    owner = _owner(meta)
    spec = _dict(pod.get("spec"))
    containers = spec.get("containers") if spec is not None else None
    if owner is None or not isinstance(containers, list):
        return allow(uid)  # not a VM pod; or a pod the API server's validation refuses
    index = next(
        (
            i
            for i, c in enumerate(containers)
            if isinstance(c, dict) and c.get("name") == VM_CONTAINER
        ),
        None,
    )
    if index is None:
        return allow(
            uid,
            warnings=[f"VM pod has no {VM_CONTAINER} container: chscale cannot resize it"],
        )
    container: dict[str, Any] = containers[index]
    ops: list[dict[str, Any]] = []
    path = ("spec", "containers", index)
    if not _guaranteed(container.get("resources")):
        try:
            needed = _vm_resources(request, meta, owner, lookup, config)
            values = resource_values(needed)
        except _Refused as no:
            return refuse(uid, no.message, code=no.code, reason=no.reason)
        except ValueError:  # too many digits to print: no pod can hold it
            return refuse(uid, f"{KIND} {owner.name}: resources beyond any pod")
        _resource_ops(ops, container.get("resources"), needed, values, *path)
    _policy_ops(ops, container.get("resizePolicy"), *path)
    return patched(uid, ops)
