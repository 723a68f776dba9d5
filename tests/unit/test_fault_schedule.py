"""Fault schedules are data drawn from a seed: the same seed is the same schedule, and
every schedule is one the pool can play and recover from."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.constants import POD_MEMORY_OVERHEAD, GiB, MiB
from testbed.faults.proxy import classify
from testbed.faults.schedule import (
    CONTROLLER,
    CallClass,
    Fault,
    FaultKind,
    GeneratorConfig,
    NodeGeometry,
    Pool,
    PoolVm,
    Schedule,
    ScheduleError,
    default_pool,
    generate,
)

POOL = default_pool()
seeds = st.integers(min_value=0, max_value=2**63)


@given(seeds)
@settings(max_examples=200)
def test_a_seed_is_its_schedule(seed: int) -> None:
    assert generate(seed, POOL) == generate(seed, POOL)


def test_different_seeds_give_different_schedules() -> None:
    schedules = {generate(seed, POOL).to_json() for seed in range(50)}
    assert len(schedules) == 50


@given(seeds)
@settings(max_examples=200)
def test_json_round_trip(seed: int) -> None:
    schedule = generate(seed, POOL)
    assert Schedule.from_json(schedule.to_json()) == schedule


@given(seeds)
@settings(max_examples=300)
def test_sizes_are_ones_a_user_could_ask_for(seed: int) -> None:
    schedule = generate(seed, POOL)
    sizes = [(s.vm, s.vcpus, s.memory) for s in schedule.starts]
    sizes += [(c.vm, c.vcpus, c.memory) for c in schedule.changes]
    for name, vcpus, memory in sizes:
        vm = POOL.vm(name)
        assert 1 <= vcpus <= vm.max_vcpus
        assert vm.boot_memory <= memory <= vm.max_memory
        assert memory % (2 * MiB) == 0


@given(seeds)
@settings(max_examples=300)
def test_start_and_final_sizes_fit_every_node(seed: int) -> None:
    """Otherwise a VM could never converge and the schedule would fail for nothing."""
    schedule = generate(seed, POOL)
    starts = {s.vm: (s.vcpus, s.memory) for s in schedule.starts}
    assert set(starts) == {vm.name for vm in POOL.vms}
    finals = schedule.final_sizes()
    for node in POOL.nodes:
        assert POOL.fits(node.name, starts)
        assert POOL.fits(node.name, finals)


@given(seeds)
@settings(max_examples=300)
def test_everything_happens_inside_the_window(seed: int) -> None:
    config = GeneratorConfig()
    schedule = generate(seed, POOL, config)
    assert all(0 <= c.at < config.window for c in schedule.changes)
    assert all(0 <= f.at < config.window for f in schedule.faults)
    assert config.min_faults <= len(schedule.faults) <= config.max_faults
    kills = [f for f in schedule.faults if f.kind in (FaultKind.KILL, FaultKind.KILL_AT_PHASE)]
    assert len(kills) <= config.max_kills


def test_the_generator_reaches_every_kind_of_fault() -> None:
    kinds = {f.kind for seed in range(300) for f in generate(seed, POOL).faults}
    assert kinds == set(FaultKind)


def test_some_intermediate_sizes_overcommit_or_exceed_a_node() -> None:
    """Deferred and Infeasible resizes must come up, not only easy ones."""
    exceeded = overcommitted = 0
    for seed in range(200):
        schedule = generate(seed, POOL)
        for change in schedule.changes:
            node = POOL.node(POOL.vm(change.vm).node)
            if change.memory + POD_MEMORY_OVERHEAD > node.memory:
                exceeded += 1
        overcommitted += sum(
            1
            for c in schedule.changes
            if c.memory >= 6 * GiB  # beside any neighbour of >= 3.5Gi this cannot fit
        )
    assert exceeded > 0
    assert overcommitted > 0


def test_replay_command_names_the_seed() -> None:
    assert generate(1234, POOL).replay_command == "python -m bench.faults --replay 1234"


def test_describe_lists_every_step() -> None:
    schedule = generate(5, POOL)
    text = schedule.describe()
    assert "seed=5" in text
    assert text.count("\n") == len(schedule.starts) + len(schedule.changes) + len(schedule.faults)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (dict(kind="kill", at=0.1, target="nobody"), "target must be a component"),
        (dict(kind="kill-at-phase", at=0.1, target=CONTROLLER), "needs vm and phase"),
        (
            dict(kind="api-error", at=0.1, target=CONTROLLER, call="event", status=418, count=1),
            "status must be one of",
        ),
        (
            dict(kind="api-error", at=0.1, target=CONTROLLER, call="event", status=500),
            "count must be >= 1",
        ),
        (dict(kind="node-squeeze", at=0.1, target="faults-a"), "memory must be > 0"),
        (dict(kind="kill", at=-1, target=CONTROLLER), "times must be >= 0"),
    ],
)
def test_malformed_faults_are_refused_with_the_reason(fault: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Fault(**fault)


def test_an_unknown_call_class_is_refused() -> None:
    with pytest.raises(ValueError, match="no-such-call"):
        Fault(FaultKind.API_ERROR, 0.1, CONTROLLER, call="no-such-call", status=500, count=1)


def test_a_pool_vm_on_an_unknown_node_is_refused() -> None:
    with pytest.raises(ScheduleError, match="node 'elsewhere'"):
        Pool((NodeGeometry("n", 4, 4 * GiB),), (PoolVm("v", "elsewhere", 1, GiB, 2, 2 * GiB),))


def test_from_json_refuses_garbage() -> None:
    with pytest.raises(ScheduleError, match="not a schedule"):
        Schedule.from_json('{"seed": "x"}')


@pytest.mark.parametrize(
    ("method", "path", "query", "call"),
    [
        ("PATCH", "/api/v1/namespaces/ns/pods/vm-a/resize", "", CallClass.POD_RESIZE),
        ("PATCH", "/api/v1/namespaces/ns/pods/vm-a/status", "", CallClass.OTHER),
        (
            "PUT",
            "/apis/cloudhypervisor.quill.today/v1beta1/namespaces/ns/virtualmachines/a/status",
            "",
            CallClass.VM_STATUS,
        ),
        (
            "PATCH",
            "/apis/cloudhypervisor.quill.today/v1beta1/namespaces/ns/virtualmachines/a",
            "",
            CallClass.VM_PATCH,
        ),
        ("POST", "/api/v1/namespaces/ns/pods", "", CallClass.POD_CREATE),
        ("POST", "/api/v1/namespaces/ns/events", "", CallClass.EVENT),
        ("PATCH", "/api/v1/namespaces/ns/events/a.1", "", CallClass.EVENT),
        ("GET", "/api/v1/pods", "labelSelector=x&limit=500", CallClass.LIST),
        (
            "GET",
            "/apis/cloudhypervisor.quill.today/v1beta1/virtualmachines",
            "allowWatchBookmarks=true&watch=true",
            CallClass.WATCH,
        ),
        ("GET", "/api/v1/namespaces/ns/pods/vm-a", "", CallClass.OTHER),
    ],
)
def test_the_proxy_tells_calls_apart(method: str, path: str, query: str, call: CallClass) -> None:
    assert classify(method, path, query) is call


# --- the checker's phase graph and pod reading -----------------------------------------


def test_the_checker_knows_the_phase_graph() -> None:
    from testbed.faults.checker import PHASE_EDGES

    assert "PodResizeInProgress" in PHASE_EDGES["Running"]
    assert "ResizeInProgress" in PHASE_EDGES["PodResizeInProgress"]
    assert {"Running", "Paused"} <= PHASE_EDGES["ResizeInProgress"]  # back where it started
    assert PHASE_EDGES[None] == {"Pending"}
    assert "Pending" not in PHASE_EDGES["Running"]
    assert "ResizeInProgress" not in PHASE_EDGES["Scheduled"]


def test_the_checker_reads_enforced_and_asked_limits_apart() -> None:
    from testbed.faults.checker import pod_limits

    def resources(cpu: str, memory: str) -> dict:
        return {"limits": {"cpu": cpu, "memory": memory}}

    pod = {
        "spec": {"containers": [{"name": "vm-manager", "resources": resources("4", "8448Mi")}]},
        "status": {
            "containerStatuses": [
                {"name": "sidecar", "resources": resources("1", "1Gi")},
                {"name": "vm-manager", "resources": resources("2", "4352Mi")},
            ]
        },
    }
    assert pod_limits(pod, enforced=False) == (4000, 8448 * MiB)
    assert pod_limits(pod, enforced=True) == (2000, 4352 * MiB)
    assert pod_limits({"status": {}}, enforced=True) is None
