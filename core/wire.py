"""JSON objects (as the API server sends them) to kernel values and back.

This is pure data conversion, so it lives in the kernel package and is shared by the
controller, the daemon and the webhook (the adapters may not import one another).
Spec parsing never raises for bad user input: it returns the field-path errors, and the
kernel turns them into a condition, so a malformed object cannot crash a process.
Status is written only by chscale, so it is structured with cattrs (camelCase names); a
part of it that does not parse is dropped and re-derived from observation.
"""

from __future__ import annotations

from typing import Any

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from core.actions import (
    Action,
    SetAllocated,
    SetCapacity,
    SetCondition,
    SetObserved,
    SetPhase,
    SetResizeTarget,
    SetVmmVersion,
)
from core.constants import FINALIZER, VM_CONTAINER
from core.model import (
    Allocation,
    BootSource,
    Capacity,
    Condition,
    ConditionStatus,
    FieldError,
    Phase,
    PodPhase,
    PodResizeCondition,
    PodView,
    ResizeRecord,
    Resources,
    Step,
    Vm,
    VmSpec,
    VmStatus,
)
from core.quantity import (
    QuantityError,
    format_bytes,
    parse_bytes,
    parse_millicores,
)
from core.resources import DEFAULT_MEMORY_SIZE, HUGEPAGE_SIZES

__all__ = [
    "apply_status",
    "parse_pod",
    "parse_spec",
    "parse_vm",
    "render_status",
]

# --- the status converter -------------------------------------------------------------

_converter = cattrs.Converter(forbid_extra_keys=False)
_converter.register_structure_hook(int, lambda v, _: _strict_int(v))
# bool subclasses int, so the int hook would claim bools too; give them their own.
_converter.register_structure_hook(bool, lambda v, _: _strict_bool(v))
_converter.register_unstructure_hook(Phase, str)
_converter.register_unstructure_hook(Step, str)
_converter.register_unstructure_hook(ConditionStatus, str)


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _strict_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _camel(cls: type, *, omit_defaults: bool = True, **renames: str) -> None:
    overrides = {attr: override(rename=json) for attr, json in renames.items()}
    _converter.register_structure_hook(cls, make_dict_structure_fn(cls, _converter, **overrides))
    _converter.register_unstructure_hook(
        cls,
        make_dict_unstructure_fn(
            cls, _converter, _cattrs_omit_if_default=omit_defaults, **overrides
        ),
    )


_camel(Allocation)
_camel(Capacity, max_vcpus="maxVcpus", max_memory="maxMemory", boot_memory="bootMemory")
# Status goes out as a merge patch, where an omitted key keeps its old value: a record
# that omitted its defaults would never clear podGeneration, reset attempts or drop
# vmmRequested. Every field is rendered, None as null (which deletes the key).
_camel(
    ResizeRecord,
    omit_defaults=False,
    return_phase="returnPhase",
    pod_generation="podGeneration",
    started_at="startedAt",
    vmm_requested="vmmRequested",
    wait_since="waitSince",
)
_camel(Condition, observed_generation="observedGeneration")

_MEMORY_KEYS = {
    Allocation: ("memory",),
    Capacity: ("maxMemory", "bootMemory"),
    ResizeRecord: ("memory",),
}


def _structure(obj: object, cls: type) -> Any:
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object, got {type(obj).__name__}")
    data = dict(obj)
    for key in _MEMORY_KEYS.get(cls, ()):
        if key in data:
            data[key] = parse_bytes(data[key])
    return _converter.structure(data, cls)


def _unstructure(value: object) -> dict[str, Any]:
    data: dict[str, Any] = _converter.unstructure(value)
    for key in _MEMORY_KEYS.get(type(value), ()):
        if key in data:
            data[key] = format_bytes(data[key])
    return data


def _lenient(obj: object, cls: type) -> Any:
    try:
        return _structure(obj, cls)
    except (TypeError, ValueError, KeyError, cattrs.BaseValidationError):
        return None


# --- VirtualMachine -------------------------------------------------------------------


def _int_at(obj: dict[str, Any], key: str, path: str, errors: list[FieldError]) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(FieldError(f"{path}.{key}", f"must be an integer, got {value!r}"))
        return None
    return value


def _bytes_at(obj: dict[str, Any], key: str, path: str, errors: list[FieldError]) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except QuantityError as exc:
        errors.append(FieldError(f"{path}.{key}", str(exc)))
        return None


def _object_at(
    obj: dict[str, Any], key: str, path: str, errors: list[FieldError]
) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(FieldError(f"{path}.{key}", f"must be an object, got {type(value).__name__}"))
        return {}
    return value


def parse_spec(spec: object) -> tuple[VmSpec | None, tuple[FieldError, ...]]:
    """``spec`` of a VirtualMachine; ch-vmm's defaults applied (sockets, cores = 1, memory
    1Gi; RESIZE.md §1, ADR 0013). An explicit null counts as absent, as in the webhook."""
    errors: list[FieldError] = []
    if not isinstance(spec, dict):
        return None, (FieldError("spec", "must be an object"),)
    instance = _object_at(spec, "instance", "spec", errors)
    cpu = _object_at(instance, "cpu", "spec.instance", errors)
    memory = _object_at(instance, "memory", "spec.instance", errors)
    boot = _object_at(instance, "boot", "spec.instance", errors)
    sockets = _int_at(cpu, "sockets", "spec.instance.cpu", errors)
    cores = _int_at(cpu, "coresPerSocket", "spec.instance.cpu", errors)
    max_vcpus = _int_at(cpu, "maxVcpus", "spec.instance.cpu", errors)
    dedicated = cpu.get("dedicatedCPUPlacement")
    if dedicated is not None and not isinstance(dedicated, bool):
        errors.append(
            FieldError(
                "spec.instance.cpu.dedicatedCPUPlacement",
                f"must be true or false, got {dedicated!r}",
            )
        )
    # ch-vmm's webhook defaults a missing size to 1Gi; the kernel reads the same default,
    # so a VM that slipped past the webhook is sized as it would have been defaulted.
    size = _bytes_at(memory, "size", "spec.instance.memory", errors)
    if memory.get("size") is None:
        size = DEFAULT_MEMORY_SIZE
    max_size = _bytes_at(memory, "maxSize", "spec.instance.memory", errors)
    hugepage_size = _hugepage_size(memory, errors)
    for key in ("kernel", "initramfs", "cmdline"):
        if key in boot and not isinstance(boot[key], str):
            errors.append(FieldError(f"spec.instance.boot.{key}", "must be a string"))
    if errors or size is None:
        return None, tuple(errors)
    return (
        VmSpec(
            sockets=1 if sockets is None else sockets,
            cores_per_socket=1 if cores is None else cores,
            memory=size,
            max_vcpus=max_vcpus,
            max_memory=max_size,
            boot=BootSource(boot.get("kernel"), boot.get("initramfs"), boot.get("cmdline")),
            dedicated_cpus=bool(dedicated),
            hugepage_size=hugepage_size,
        ),
        (),
    )


def _hugepage_size(memory: dict[str, Any], errors: list[FieldError]) -> str | None:
    """``memory.hugepages.pageSize``; a ``hugepages`` object without one is hugepages of
    the smallest size."""
    path = "spec.instance.memory.hugepages"
    if memory.get("hugepages") is None:
        return None
    hugepages = _object_at(memory, "hugepages", "spec.instance.memory", errors)
    page = hugepages.get("pageSize")
    if page is None:
        page = HUGEPAGE_SIZES[0]
    if page not in HUGEPAGE_SIZES:
        errors.append(
            FieldError(
                f"{path}.pageSize", f"must be one of {', '.join(HUGEPAGE_SIZES)}, got {page!r}"
            )
        )
        return None
    return str(page)


def parse_status(status: object) -> VmStatus:
    if not isinstance(status, dict):
        return VmStatus()
    try:
        phase = Phase(status["phase"]) if status.get("phase") else None
    except ValueError:
        phase = Phase.UNKNOWN
    conditions = []
    for raw in status.get("conditions") or ():
        cond = _lenient(raw, Condition)
        if cond is not None:
            conditions.append(cond)
    generation = status.get("observedGeneration")
    return VmStatus(
        phase=phase,
        node_name=_text(status.get("nodeName")),
        pod_name=_text(status.get("vmPodName")),
        pod_uid=_text(status.get("vmPodUID")),
        observed_generation=generation if isinstance(generation, int) else None,
        desired=_lenient(status.get("desired"), Allocation),
        capacity=_lenient(status.get("capacity"), Capacity),
        allocated=_lenient(status.get("allocated"), Allocation),
        resize=_lenient(status.get("resize"), ResizeRecord),
        conditions=tuple(conditions),
        vmm_version=_text(status.get("vmmVersion")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_vm(obj: dict[str, Any]) -> Vm:
    """A VirtualMachine object; raises ``ValueError`` only if it has no usable identity."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ValueError("object has no metadata.name")
    spec, errors = parse_spec(obj.get("spec"))
    generation = meta.get("generation")
    finalizers = meta.get("finalizers") or ()
    return Vm(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta["name"]),
        uid=str(meta.get("uid") or ""),
        generation=generation if isinstance(generation, int) else 1,
        spec=spec,
        spec_errors=errors,
        status=parse_status(obj.get("status")),
        deleting=bool(meta.get("deletionTimestamp")),
        has_finalizer=FINALIZER in finalizers,
    )


# --- Pod ------------------------------------------------------------------------------


def _resources(obj: object) -> Resources | None:
    """Limits (requests = limits for a VM pod), falling back to requests."""
    if not isinstance(obj, dict):
        return None
    for key in ("limits", "requests"):
        values = obj.get(key)
        if isinstance(values, dict) and "cpu" in values and "memory" in values:
            try:
                return Resources(parse_millicores(values["cpu"]), parse_bytes(values["memory"]))
            except QuantityError:
                return None
    return None


def _resize_condition(cond: dict[str, Any]) -> PodResizeCondition:
    generation = cond.get("observedGeneration")
    return PodResizeCondition(
        reason=cond.get("reason") or None,
        message=str(cond.get("message") or ""),
        observed_generation=generation if isinstance(generation, int) else None,
    )


def _resize_conditions(
    conditions: list[Any],
) -> tuple[PodResizeCondition | None, PodResizeCondition | None]:
    """The first true ``PodResizePending`` and ``PodResizeInProgress`` conditions, found
    in one pass over the pod's conditions (a kubelet writes seven)."""
    pending = in_progress = None
    for cond in conditions:
        if not isinstance(cond, dict) or cond.get("status") != "True":
            continue
        type_ = cond.get("type")
        if type_ == "PodResizePending" and pending is None:
            pending = _resize_condition(cond)
        elif type_ == "PodResizeInProgress" and in_progress is None:
            in_progress = _resize_condition(cond)
    return pending, in_progress


_POD_PHASES = {phase.value: phase for phase in PodPhase}


def parse_pod(obj: dict[str, Any], container: str = VM_CONTAINER) -> PodView:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    desired = None
    for c in spec.get("containers") or ():
        if c.get("name") == container:
            desired = _resources(c.get("resources"))
    actual = None
    for cs in status.get("containerStatuses") or ():
        if cs.get("name") == container:
            actual = _resources(cs.get("resources"))
    raw_phase = status.get("phase") or "Pending"
    # A dict look-up first: calling the enum runs Python code for every pod version.
    phase = _POD_PHASES.get(raw_phase) if type(raw_phase) is str else None
    if phase is None:
        try:
            phase = PodPhase(raw_phase)
        except ValueError:
            phase = PodPhase.UNKNOWN
    resize_pending, resize_in_progress = _resize_conditions(status.get("conditions") or [])
    observed = status.get("observedGeneration")
    return PodView(
        name=str(meta.get("name") or ""),
        generation=int(meta.get("generation") or 1),
        observed_generation=observed if isinstance(observed, int) else None,
        uid=_text(meta.get("uid")),
        phase=phase,
        node_name=spec.get("nodeName") or None,
        deleting=bool(meta.get("deletionTimestamp")),
        desired=desired,
        actual=actual,
        resize_pending=resize_pending,
        resize_in_progress=resize_in_progress,
        legacy_resize_status=status.get("resize") or None,
    )


# --- writing status -------------------------------------------------------------------


def apply_status(status: VmStatus, actions: tuple[Action, ...]) -> VmStatus:
    """The status that results from carrying out the status actions among ``actions``."""
    fields: dict[str, Any] = {}
    conditions = {c.type: c for c in status.conditions}
    for action in actions:
        if isinstance(action, SetPhase):
            fields["phase"] = action.phase
        elif isinstance(action, SetCondition):
            conditions[action.condition.type] = action.condition
        elif isinstance(action, SetResizeTarget):
            fields["resize"] = action.record
        elif isinstance(action, SetAllocated):
            fields["allocated"] = action.allocation
        elif isinstance(action, SetCapacity):
            fields["capacity"] = action.capacity
        elif isinstance(action, SetVmmVersion):
            fields["vmm_version"] = action.version
        elif isinstance(action, SetObserved):
            fields["observed_generation"] = action.generation
            fields["desired"] = action.desired
            fields["node_name"] = action.node_name
            fields["pod_name"] = action.pod_name
            fields["pod_uid"] = action.pod_uid
    fields["conditions"] = tuple(conditions.values())
    return VmStatus(**{**_status_fields(status), **fields})


def _status_fields(status: VmStatus) -> dict[str, Any]:
    return {
        "phase": status.phase,
        "node_name": status.node_name,
        "pod_name": status.pod_name,
        "pod_uid": status.pod_uid,
        "observed_generation": status.observed_generation,
        "desired": status.desired,
        "capacity": status.capacity,
        "allocated": status.allocated,
        "resize": status.resize,
        "conditions": status.conditions,
        "vmm_version": status.vmm_version,
    }


def render_status(
    status: VmStatus, transition_times: dict[str, str] | None = None
) -> dict[str, Any]:
    """The JSON ``status`` for a status-subresource write (all fields, None as null so a
    merge patch clears them). ``transition_times`` gives each condition's
    lastTransitionTime, which only the adapter (holding a clock) can stamp."""
    times = transition_times or {}
    conditions = []
    for cond in status.conditions:
        data = _unstructure(cond)
        data["status"] = str(cond.status)
        data.setdefault("message", "")
        if cond.type in times:
            data["lastTransitionTime"] = times[cond.type]
        conditions.append(data)
    return {
        "phase": str(status.phase) if status.phase is not None else None,
        "nodeName": status.node_name,
        "vmPodName": status.pod_name,
        "vmPodUID": status.pod_uid,
        "observedGeneration": status.observed_generation,
        "desired": _unstructure(status.desired) if status.desired else None,
        "capacity": _unstructure(status.capacity) if status.capacity else None,
        "allocated": _unstructure(status.allocated) if status.allocated else None,
        "resize": _unstructure(status.resize) if status.resize else None,
        "conditions": conditions,
        "vmmVersion": status.vmm_version,
    }
