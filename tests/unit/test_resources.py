"""The pod's resources, the VMM's boot configuration and the admission rules (RESIZE.md
sections 2, 5 and 6)."""

from __future__ import annotations

import pytest
from attrs import evolve

from core import (
    Allocation,
    BootVmm,
    Capacity,
    FieldError,
    KernelConfig,
    Phase,
    Resources,
    Vm,
    VmSpec,
    VmStatus,
    parse_spec,
    pod_resources,
    pod_resources_for,
    validate_vm,
    vmm_config,
)
from core.constants import (
    HOTPLUG_REGION_ALIGNMENT,
    MAX_GUEST_MEMORY,
    MAX_VCPUS,
    POD_MEMORY_OVERHEAD,
    GiB,
    MiB,
)
from core.resources import (
    KEPT_NOT_USED,
    capacity_errors,
    capacity_for,
    compat_warnings,
    spec_errors,
)

SEED = VmSpec(sockets=2, cores_per_socket=4, memory=4 * GiB)


# --- RESIZE.md section 2 ----------------------------------------------------------------


def test_pod_resources_follow_the_seed() -> None:
    assert pod_resources(SEED) == Resources(cpu_millis=8000, memory=4 * GiB + 256 * MiB)
    assert pod_resources(VmSpec(4, 4, 16 * GiB)) == Resources(16000, 16 * GiB + 256 * MiB)
    assert 256 * MiB == POD_MEMORY_OVERHEAD


def test_the_overhead_is_configurable() -> None:
    config = KernelConfig(pod_memory_overhead=512 * MiB)
    assert pod_resources(SEED, config).memory == 4 * GiB + 512 * MiB
    assert pod_resources_for(Allocation(3, 2 * GiB), config) == Resources(3000, 2560 * MiB)


# --- RESIZE.md section 6: the VMM's boot configuration ----------------------------------


@pytest.mark.parametrize(
    ("spec", "boot"),
    [
        (SEED, BootVmm(boot_vcpus=8, max_vcpus=16, memory=4 * GiB, hotplug_size=16 * GiB)),
        (
            VmSpec(1, 2, 1 * GiB, max_vcpus=6, max_memory=3 * GiB),
            BootVmm(2, 6, 1 * GiB, 2 * GiB),
        ),
        # 1000Mi x 5 leaves a 4000Mi region: rounded up to 4096Mi, a multiple of 128Mi.
        (VmSpec(1, 1, 1000 * MiB), BootVmm(1, 2, 1000 * MiB, 4096 * MiB)),
        # A 2Mi region still takes one 128Mi unit.
        (VmSpec(1, 1, 1 * GiB, max_memory=1 * GiB + 2 * MiB), BootVmm(1, 2, 1 * GiB, 128 * MiB)),
        (VmSpec(1, 1, 1 * GiB, max_memory=1 * GiB + 128 * MiB), BootVmm(1, 2, GiB, 128 * MiB)),
        (
            VmSpec(1, 1, 1 * GiB, max_memory=1 * GiB + 130 * MiB),
            BootVmm(1, 2, 1 * GiB, 256 * MiB),
        ),
        (VmSpec(1, 1, 1 * GiB, max_memory=1 * GiB), BootVmm(1, 2, 1 * GiB, 0)),
    ],
)
def test_vmm_config(spec: VmSpec, boot: BootVmm) -> None:
    assert vmm_config(spec) == boot
    assert boot.hotplug_size % HOTPLUG_REGION_ALIGNMENT == 0
    assert capacity_for(spec) == Capacity(
        boot.max_vcpus, boot.memory + boot.hotplug_size, boot.memory
    )
    assert capacity_for(spec).max_memory == spec.memory_ceiling


def test_vmm_config_never_boots_more_vcpus_than_its_maximum() -> None:
    boot = vmm_config(VmSpec(2, 2, 1 * GiB, max_vcpus=3))  # refused by admission anyway
    assert boot.max_vcpus >= boot.boot_vcpus == 4


# --- RESIZE.md section 5: admission ----------------------------------------------------


def _vm(spec: VmSpec | None, phase: Phase | None = None, capacity: Capacity | None = None) -> Vm:
    return Vm("ns", "vm", spec=spec, status=VmStatus(phase=phase, capacity=capacity))


def _running(spec: VmSpec) -> Vm:
    return _vm(spec, Phase.RUNNING, capacity_for(spec))


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        (evolve(SEED, sockets=0), "spec.instance.cpu.sockets", "at least 1"),
        (evolve(SEED, sockets=-3), "spec.instance.cpu.sockets", "got -3"),
        (evolve(SEED, cores_per_socket=0), "spec.instance.cpu.coresPerSocket", "at least 1"),
        (evolve(SEED, max_vcpus=0), "spec.instance.cpu.maxVcpus", "at least 1"),
        (evolve(SEED, max_vcpus=6), "spec.instance.cpu", "exceeds maxVcpus 6"),
        (evolve(SEED, max_vcpus=MAX_VCPUS + 1), "spec.instance.cpu.maxVcpus", "more than the"),
        # Fault fuzz schedule 22: 2^63 vCPUs passed the kernel and every status write 422'd.
        (evolve(SEED, sockets=2**62, cores_per_socket=2), "spec.instance.cpu", "more than"),
        (evolve(SEED, sockets=16, cores_per_socket=16), "spec.instance.cpu", "256 vCPUs"),
        (evolve(SEED, memory=0), "spec.instance.memory.size", "positive"),
        (evolve(SEED, memory=-GiB), "spec.instance.memory.size", "positive"),
        (evolve(SEED, memory=GiB + 1), "spec.instance.memory.size", "multiple of 2Mi"),
        (evolve(SEED, memory=GiB + MiB), "spec.instance.memory.size", "try 1026Mi"),
        (evolve(SEED, memory=MAX_GUEST_MEMORY + 2 * MiB), "spec.instance.memory.size", "4Ei"),
        (evolve(SEED, max_memory=0), "spec.instance.memory.maxSize", "positive"),
        (evolve(SEED, max_memory=5 * GiB + MiB), "spec.instance.memory.maxSize", "2Mi"),
        (evolve(SEED, max_memory=2 * GiB), "spec.instance.memory.maxSize", "below memory.size"),
    ],
)
def test_spec_rules(spec: VmSpec, path: str, words: str) -> None:
    errors = validate_vm(_vm(spec))
    assert [e.path for e in errors] == [path], errors
    assert words in errors[0].message
    assert path in str(errors[0])
    assert spec_errors(spec) == errors
    # The same rules hold on an update of a running VM.
    assert validate_vm(_vm(spec), _running(SEED)) == errors


def test_every_problem_is_reported_at_once() -> None:
    spec = VmSpec(sockets=0, cores_per_socket=0, memory=GiB + 1)
    assert [e.path for e in validate_vm(_vm(spec))] == [
        "spec.instance.cpu.sockets",
        "spec.instance.cpu.coresPerSocket",
        "spec.instance.memory.size",
    ]


def test_a_valid_spec_passes_create_and_update() -> None:
    assert validate_vm(_vm(SEED)) == ()
    assert validate_vm(_vm(VmSpec(4, 4, 16 * GiB)), _running(SEED)) == ()
    assert validate_vm(_vm(evolve(SEED, memory=4 * GiB + 2 * MiB)), _running(SEED)) == ()


@pytest.mark.parametrize(
    ("new", "path", "words"),
    [
        # The recorded capacity (8 boot vCPUs: ceiling 16; 4Gi boot: ceiling 20Gi).
        (VmSpec(4, 5, 4 * GiB), "spec.instance.cpu", "ceiling of 16"),
        (evolve(SEED, memory=20 * GiB + 2 * MiB), "spec.instance.memory.size", "ceiling of 20Gi"),
        (evolve(SEED, memory=2 * GiB), "spec.instance.memory.size", "below the boot size 4Gi"),
        (evolve(SEED, max_vcpus=32), "spec.instance.cpu.maxVcpus", "cannot change"),
        (evolve(SEED, max_memory=40 * GiB), "spec.instance.memory.maxSize", "cannot change"),
    ],
)
def test_rules_while_the_vmm_runs(new: VmSpec, path: str, words: str) -> None:
    for phase in (
        Phase.RUNNING,
        Phase.PAUSED,
        Phase.POD_RESIZE_IN_PROGRESS,
        Phase.RESIZE_IN_PROGRESS,
    ):
        old = _vm(SEED, phase, capacity_for(SEED))
        errors = validate_vm(_vm(new), old)
        assert [e.path for e in errors] == [path], (phase, errors)
        assert words in errors[0].message
    # Before the VMM runs there is no ceiling yet: the same update is accepted.
    for phase in (None, Phase.PENDING, Phase.SCHEDULING, Phase.SCHEDULED, Phase.FAILED):
        assert validate_vm(_vm(new), _vm(SEED, phase)) == ()


def test_capacity_is_the_recorded_one_not_the_spec_default() -> None:
    """A VM booted with 8 vCPUs keeps its ceiling of 16 even if its spec now says 12."""
    old = _vm(VmSpec(2, 6, 4 * GiB), Phase.RUNNING, capacity_for(SEED))
    assert validate_vm(_vm(VmSpec(4, 4, 4 * GiB)), old) == ()
    assert [e.path for e in validate_vm(_vm(VmSpec(1, 17, 4 * GiB)), old)] == ["spec.instance.cpu"]
    assert capacity_errors(VmSpec(1, 17, 4 * GiB), capacity_for(SEED))


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (None, "spec"),
        ("a string", "spec"),
        ({"instance": []}, "spec.instance"),
        ({"instance": {"cpu": {"sockets": "two"}, "memory": {"size": "1Gi"}}}, "sockets"),
        ({"instance": {"cpu": {"sockets": True}, "memory": {"size": "1Gi"}}}, "sockets"),
        ({"instance": {"memory": {"size": "lots"}}}, "spec.instance.memory.size"),
        ({"instance": {"cpu": {"dedicatedCPUPlacement": "yes"}}}, "dedicatedCPUPlacement"),
        ({"instance": {"memory": {"hugepages": {"pageSize": "4Ki"}}}}, "hugepages.pageSize"),
        ({"instance": {"memory": {"hugepages": "2Mi"}}}, "spec.instance.memory.hugepages"),
        ({"instance": {"memory": {"size": "1Gi", "maxSize": []}}}, "maxSize"),
        ({"instance": {"memory": {"size": "1Gi"}, "boot": {"kernel": 3}}}, "kernel"),
    ],
)
def test_malformed_objects_are_refused_with_a_path(raw: object, path: str) -> None:
    spec, errors = parse_spec(raw)
    assert spec is None
    vm = Vm("ns", "vm", spec=None, spec_errors=errors)
    refused = validate_vm(vm)
    assert refused and any(path in e.path for e in refused), refused


def test_a_missing_spec_is_refused() -> None:
    assert validate_vm(Vm("ns", "vm")) == (FieldError("spec", "is required"),)


def test_seed_yaml_parses_unchanged() -> None:
    spec, errors = parse_spec(
        {"instance": {"cpu": {"sockets": 2, "coresPerSocket": 4}, "memory": {"size": "4Gi"}}}
    )
    assert errors == () and spec == SEED
    spec, errors = parse_spec({"instance": {"memory": {"size": "1Gi"}}})
    assert errors == () and spec is not None and (spec.sockets, spec.cores_per_socket) == (1, 1)


def test_the_default_vcpu_ceiling_stops_at_what_cloud_hypervisor_runs() -> None:
    assert evolve(SEED, sockets=100, cores_per_socket=2).vcpu_ceiling == MAX_VCPUS
    assert evolve(SEED, sockets=255, cores_per_socket=1).vcpu_ceiling == MAX_VCPUS
    assert SEED.vcpu_ceiling == 16


# --- ch-vmm's fields (ADR 0013) ---------------------------------------------------------


def test_hugepages_are_refused_saying_why() -> None:
    errors = spec_errors(evolve(SEED, hugepage_size="2Mi"))
    assert [e.path for e in errors] == ["spec.instance.memory.hugepages"]
    assert "hugepages-2Mi" in errors[0].message and "resize" in errors[0].message
    assert spec_errors(evolve(SEED, dedicated_cpus=True)) == ()


def test_dedicated_cpus_keep_the_pod_guaranteed_with_whole_cpus() -> None:
    # What the static CPU manager needs to grant exclusive cores: integer CPUs, and
    # requests = limits (the webhook and the pod builder write both from this one value).
    spec = evolve(SEED, dedicated_cpus=True)
    assert pod_resources(spec).cpu_millis == spec.vcpus * 1000


CH_VMM_SPEC = {
    "runPolicy": "Always",
    "instance": {
        "cpu": {"sockets": 1, "coresPerSocket": 2, "dedicatedCPUPlacement": True},
        "memory": {"size": "1Gi"},
        "kernel": {"image": "kernel:latest", "cmdline": "console=ttyS0"},
        "disks": [{"name": "root"}],
        "interfaces": [{"name": "pod"}],
        "fileSystems": [{"name": "share"}],
        "gpus": [{"name": "gpu"}],
        "pmem": {"name": "pm"},
    },
    "volumes": [{"name": "root", "containerDisk": {"image": "ubuntu"}}],
    "networks": [{"name": "pod", "pod": {}}],
    "livenessProbe": {"httpGet": {"port": 80}},
    "readinessProbe": {"tcpSocket": {"port": 22}},
    "resources": {"claims": [{"name": "gpu"}]},
    "nodeSelector": {"kubernetes.io/hostname": "n"},
}


def test_every_field_kept_but_not_used_gets_a_warning_naming_it() -> None:
    warnings = compat_warnings(CH_VMM_SPEC)
    fields = [path for path, _ in KEPT_NOT_USED] + [
        "spec.runPolicy",
        "spec.instance.cpu.dedicatedCPUPlacement",
    ]
    assert len(warnings) == len(fields)
    for field, warning in zip(fields, warnings, strict=True):
        assert warning.startswith(field), (field, warning)
        assert "chscale" in warning  # says what chscale does instead
    assert "'Always'" in warnings[-2] and "Once" in warnings[-2]


def test_fields_chscale_acts_on_or_left_empty_get_no_warning() -> None:
    quiet = {
        "runPolicy": "Once",
        "instance": {"cpu": {"sockets": 2, "dedicatedCPUPlacement": False}, "disks": []},
        "volumes": [],
        "resources": {"requests": {"cpu": "2"}},
        "nodeSelector": {"a": "b"},
        "tolerations": [{"key": "k"}],
        "affinity": {"nodeAffinity": {}},
    }
    assert compat_warnings(quiet) == ()
    assert compat_warnings("not a spec") == ()
    assert compat_warnings({"instance": [], "resources": "x"}) == ()
