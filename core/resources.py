"""Pure helpers the adapters share: the pod's resources, the VMM's boot configuration,
the admission rules of RESIZE.md section 5, and where chscale stands on each field of
ch-vmm's VirtualMachine (its defaults, the fields chscale keeps but does not act on, the
ones it refuses; ADR 0013)."""

from __future__ import annotations

import functools
import re
from typing import Any

from core.actions import BootVmm
from core.config import DEFAULT_CONFIG, KernelConfig
from core.constants import (
    GUEST_MEMORY_ALIGNMENT,
    MAX_GUEST_MEMORY,
    MAX_VCPUS,
    MILLICORES_PER_VCPU,
    GiB,
)
from core.model import (
    VMM_PHASES,
    Allocation,
    Capacity,
    FieldError,
    Resources,
    Vm,
    VmSpec,
)
from core.quantity import format_bytes

CPU_PATH = "spec.instance.cpu"
MEMORY_PATH = "spec.instance.memory"
HUGEPAGES_PATH = f"{MEMORY_PATH}.hugepages"
DEDICATED_CPUS_PATH = f"{CPU_PATH}.dedicatedCPUPlacement"
RUN_POLICY_PATH = "spec.runPolicy"

# ch-vmm's mutating webhook defaults, kept: a missing memory.size is 1Gi, a missing
# runPolicy Once (sockets and coresPerSocket default to 1 in core.wire.parse_spec).
DEFAULT_MEMORY_SIZE = 1 * GiB
DEFAULT_RUN_POLICY = "Once"
# ch-vmm's hugepages.pageSize values; a hugepages object without one means the first.
HUGEPAGE_SIZES = ("2Mi", "1Gi")

# Fields of ch-vmm's VirtualMachine that chscale keeps as written but does not act on,
# each with what chscale does instead; admission warns about each one a VM sets.
KEPT_NOT_USED: tuple[tuple[str, str], ...] = (
    (
        "spec.instance.kernel",
        "chscale boots the kernel, initramfs and cmdline of spec.instance.boot (paths on "
        "the node) or the node daemon's defaults, not a kernel image",
    ),
    ("spec.instance.disks", "chscale attaches no disks to the VMM"),
    ("spec.instance.interfaces", "chscale attaches no network interfaces to the VMM"),
    ("spec.instance.fileSystems", "chscale shares no file systems with the guest"),
    ("spec.instance.gpus", "chscale passes no GPUs through to the guest"),
    ("spec.instance.pmem", "chscale attaches no persistent memory to the guest"),
    ("spec.volumes", "chscale mounts no volumes into the VM pod"),
    ("spec.networks", "chscale connects the guest to no network"),
    (
        "spec.livenessProbe",
        "chscale sets no probes on the VM pod; it watches the VMM itself (condition VMMReachable)",
    ),
    (
        "spec.readinessProbe",
        "chscale sets no probes on the VM pod; it watches the VMM itself (condition VMMReachable)",
    ),
    ("spec.resources.claims", "chscale's VM pod claims no dynamically allocated resources"),
)
NAME_PATH = "metadata.name"
# The VM's name is a label value of its pod (at most 63 characters) and its pod is named
# "vm-<name>", which must be a DNS label (RFC 1123: 63 characters, [a-z0-9-]).
POD_NAME_PREFIX = "vm-"
MAX_NAME_LENGTH = 63 - len(POD_NAME_PREFIX)
# The end is not checked: a generateName prefix ends in "-", and the API server refuses
# a whole name that does.
_DNS_LABEL = re.compile(r"[a-z0-9][-a-z0-9]*")


def pod_resources_for(allocation: Allocation, config: KernelConfig = DEFAULT_CONFIG) -> Resources:
    """What the VM container must be granted for a guest of this size (the seed's formula)."""
    return Resources(
        cpu_millis=allocation.vcpus * MILLICORES_PER_VCPU,
        memory=allocation.memory + config.pod_memory_overhead,
    )


def pod_resources(spec: VmSpec, config: KernelConfig = DEFAULT_CONFIG) -> Resources:
    return pod_resources_for(spec.desired, config)


def vmm_config(spec: VmSpec) -> BootVmm:
    """The Cloud Hypervisor configuration that makes this VM resizable up to its ceilings."""
    return BootVmm(
        boot_vcpus=spec.vcpus,
        max_vcpus=max(spec.vcpu_ceiling, spec.vcpus),
        memory=spec.memory,
        hotplug_size=spec.memory_ceiling - spec.memory,
    )


def capacity_for(spec: VmSpec) -> Capacity:
    boot = vmm_config(spec)
    return Capacity(boot.max_vcpus, boot.memory + boot.hotplug_size, boot.memory)


# Memoized: every decision checks the spec, and a spec (immutable, its hash cached) is
# the same object for all the decisions of a resize. Bounded, so a long-running process
# holds no more than this many specs through it.
@functools.lru_cache(maxsize=16384)
def spec_errors(spec: VmSpec) -> tuple[FieldError, ...]:
    """Rules that hold for any VM spec, running or not."""
    errors: list[FieldError] = []
    if spec.hugepage_size is not None:
        errors.append(
            FieldError(
                HUGEPAGES_PATH,
                "chscale cannot run a VM on hugepages and resize it: pods/resize changes a "
                f"pod's cpu and memory, never its hugepages-{spec.hugepage_size}, so the pod "
                "would have to hold the whole hotplug ceiling in hugepages from the start, "
                "and under the kubelet's memory manager every in-place resize is Infeasible; "
                "remove hugepages to run this VM with chscale (ADR 0013)",
            )
        )
    if spec.sockets < 1:
        errors.append(FieldError(f"{CPU_PATH}.sockets", f"must be at least 1, got {spec.sockets}"))
    if spec.cores_per_socket < 1:
        errors.append(
            FieldError(
                f"{CPU_PATH}.coresPerSocket", f"must be at least 1, got {spec.cores_per_socket}"
            )
        )
    topology_ok = spec.sockets >= 1 and spec.cores_per_socket >= 1
    if topology_ok and spec.vcpus > MAX_VCPUS:
        errors.append(
            FieldError(
                CPU_PATH,
                f"sockets x coresPerSocket = {spec.vcpus} vCPUs is more than the "
                f"{MAX_VCPUS} Cloud Hypervisor can run",
            )
        )
    if spec.max_vcpus is not None and spec.max_vcpus < 1:
        errors.append(
            FieldError(f"{CPU_PATH}.maxVcpus", f"must be at least 1, got {spec.max_vcpus}")
        )
    elif spec.max_vcpus is not None and spec.max_vcpus > MAX_VCPUS:
        errors.append(
            FieldError(
                f"{CPU_PATH}.maxVcpus",
                f"{spec.max_vcpus} is more than the {MAX_VCPUS} vCPUs Cloud Hypervisor can run",
            )
        )
    elif (
        spec.max_vcpus is not None
        and topology_ok
        and spec.vcpus <= MAX_VCPUS
        and spec.vcpus > spec.max_vcpus
    ):
        errors.append(
            FieldError(
                CPU_PATH,
                f"sockets x coresPerSocket = {spec.vcpus} vCPUs exceeds maxVcpus {spec.max_vcpus}",
            )
        )
    errors.extend(_memory_errors(f"{MEMORY_PATH}.size", spec.memory))
    if spec.max_memory is not None:
        max_errors = _memory_errors(f"{MEMORY_PATH}.maxSize", spec.max_memory)
        errors.extend(max_errors)
        if not max_errors and spec.memory > 0 and spec.max_memory < spec.memory:
            errors.append(
                FieldError(
                    f"{MEMORY_PATH}.maxSize",
                    f"{format_bytes(spec.max_memory)} is below memory.size "
                    f"{format_bytes(spec.memory)}",
                )
            )
    return tuple(errors)


def _memory_errors(path: str, value: int) -> list[FieldError]:
    if value <= 0:
        return [FieldError(path, f"must be a positive quantity, got {value} bytes")]
    if value > MAX_GUEST_MEMORY:
        return [FieldError(path, f"{value} bytes is beyond any machine (at most 4Ei)")]
    if value % GUEST_MEMORY_ALIGNMENT:
        return [
            FieldError(
                path,
                f"{value} bytes is not a multiple of 2Mi (virtio-mem plugs 2Mi blocks); "
                f"try {format_bytes(-(-value // GUEST_MEMORY_ALIGNMENT) * GUEST_MEMORY_ALIGNMENT)}",
            )
        ]
    return []


def vmm_running(vm: Vm) -> bool:
    return vm.status.capacity is not None and vm.status.phase in VMM_PHASES


def capacity_errors(spec: VmSpec, capacity: Capacity) -> tuple[FieldError, ...]:
    """Targets the running VMM cannot reach (its ceilings were fixed at boot)."""
    errors: list[FieldError] = []
    if spec.vcpus > capacity.max_vcpus:
        errors.append(
            FieldError(
                CPU_PATH,
                f"{spec.vcpus} vCPUs exceeds this VM's ceiling of {capacity.max_vcpus} "
                "(fixed when the VMM started; restart the VM with a larger maxVcpus)",
            )
        )
    if spec.memory < capacity.boot_memory:
        errors.append(
            FieldError(
                f"{MEMORY_PATH}.size",
                f"{format_bytes(spec.memory)} is below the boot size "
                f"{format_bytes(capacity.boot_memory)} (virtio-mem cannot unplug boot memory)",
            )
        )
    elif spec.memory > capacity.max_memory:
        errors.append(
            FieldError(
                f"{MEMORY_PATH}.size",
                f"{format_bytes(spec.memory)} exceeds this VM's ceiling of "
                f"{format_bytes(capacity.max_memory)} (fixed when the VMM started; restart "
                "the VM with a larger maxSize)",
            )
        )
    return tuple(errors)


def name_errors(name: str) -> tuple[FieldError, ...]:
    """A name chscale cannot run: its pod ``vm-<name>`` and the label naming the VM would
    be refused by the API server, and the VM would wait in Scheduling for ever."""
    if len(name) > MAX_NAME_LENGTH:
        return (
            FieldError(
                NAME_PATH,
                f"is {len(name)} characters; at most {MAX_NAME_LENGTH} (the VM's pod is "
                f"named {POD_NAME_PREFIX}<name>, a DNS label of at most 63 characters, and "
                "the name is a label value)",
            ),
        )
    if not _DNS_LABEL.fullmatch(name):
        return (
            FieldError(
                NAME_PATH,
                f"{name!r} must be a DNS label (lower-case letters, digits and '-', starting "
                f"with a letter or digit): the VM's pod is {POD_NAME_PREFIX}<name>",
            ),
        )
    return ()


def validate_vm(new: Vm, old: Vm | None = None) -> tuple[FieldError, ...]:
    """Admission rules (RESIZE.md §5) for a create (``old`` None) or an update."""
    naming = name_errors(new.name) if old is None else ()
    if new.spec is None:
        return naming + (new.spec_errors or (FieldError("spec", "is required"),))
    errors = list(naming) + list(spec_errors(new.spec))
    if errors or old is None or not vmm_running(old):
        return tuple(errors)
    capacity = old.status.capacity
    assert capacity is not None  # vmm_running() checked it
    errors.extend(capacity_errors(new.spec, capacity))
    if old.spec is not None:
        if new.spec.max_vcpus != old.spec.max_vcpus:
            errors.append(FieldError(f"{CPU_PATH}.maxVcpus", "cannot change while the VMM runs"))
        if new.spec.max_memory != old.spec.max_memory:
            errors.append(FieldError(f"{MEMORY_PATH}.maxSize", "cannot change while the VMM runs"))
    return tuple(errors)


def _at(spec: dict[str, Any], path: str) -> object:
    value: object = {"spec": spec}
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def compat_warnings(spec: object) -> tuple[str, ...]:
    """Admission warnings for the ch-vmm fields this spec sets that chscale keeps but does
    not act on (or acts on only in part), each naming the field and what chscale does."""
    if not isinstance(spec, dict):
        return ()
    warnings = [
        f"{path} is kept but not used: {instead}"
        for path, instead in KEPT_NOT_USED
        if _at(spec, path) not in (None, [], {}, "")
    ]
    policy = spec.get("runPolicy")
    if policy is not None and policy != DEFAULT_RUN_POLICY:
        warnings.append(
            f"{RUN_POLICY_PATH} {policy!r} is kept but not used: chscale runs every VM "
            f"{DEFAULT_RUN_POLICY} (it starts the VM when created and never restarts it)"
        )
    if _at(spec, DEDICATED_CPUS_PATH) is True:
        warnings.append(
            f"{DEDICATED_CPUS_PATH}: the VM pod is Guaranteed with whole CPUs, so a kubelet "
            "with the static CPU manager policy gives it exclusive cores; chscale pins no "
            "vCPU threads itself, and under that policy the kubelet refuses every in-place "
            "resize (Infeasible), which chscale reports as VMPodResizeInfeasible"
        )
    return tuple(warnings)
