"""The Cloud Hypervisor model's rules (RESIZE.md section 6), table-driven."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sim.cloudhypervisor import (
    MIB,
    VIRTIO_MEM_BLOCK,
    Knobs,
    Response,
    VmmModel,
    VmState,
)

GIB = 1024 * MIB
BOOT_MEMORY = 1 * GIB
REGION = 4 * GIB


def config(boot: int = 2, top: int = 4, size: int = BOOT_MEMORY, region: int | None = REGION):
    memory: dict[str, Any] = {"size": size}
    if region is not None:
        memory.update(hotplug_method="VirtioMem", hotplug_size=region)
    return {
        "cpus": {"boot_vcpus": boot, "max_vcpus": top},
        "memory": memory,
        "payload": {"kernel": "/boot/vmlinux"},
        "balloon": {"size": 0},
    }


def put(model: VmmModel, endpoint: str, body: Any = None, now: float = 0.0) -> Response:
    raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return model.handle(now, "PUT", f"/api/v1/{endpoint}", raw)


def get(model: VmmModel, endpoint: str, now: float = 0.0) -> Response:
    return model.handle(now, "GET", f"/api/v1/{endpoint}", None)


def info(model: VmmModel, now: float = 0.0) -> dict[str, Any]:
    response = get(model, "vm.info", now)
    assert response.status == 200, response
    return response.json()


def running(knobs: Knobs | None = None, **kwargs: Any) -> VmmModel:
    model = VmmModel(knobs or Knobs())
    assert put(model, "vm.create", config(**kwargs)).status == 204
    assert put(model, "vm.boot").status == 204
    return model


# ---- routing, methods and bodies -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error_body"),
    [
        ("GET", "/api/v1/vmm.ping", None, 200, None),
        ("GET", "/api/v1/vm.nope", None, 404, ["Not Found"]),
        ("GET", "/other", None, 404, ["Not Found"]),
        ("PUT", "/api/v1/vm.info", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.resize", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.boot", None, 400, ["Bad Request"]),
        ("POST", "/api/v1/vm.boot", None, 400, None),
        ("DELETE", "/api/v1/vm.info", None, 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.pause", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.resume", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.shutdown", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.resize", None, 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.resize", b"{not json", 400, None),
        ("PUT", "/api/v1/vm.resize", b"[1]", 400, None),
        ("PUT", "/api/v1/vm.resize", b'{"desired_vcpus": -1}', 400, None),
        ("PUT", "/api/v1/vm.resize", b'{"desired_ram": "1G"}', 400, None),
        ("PUT", "/api/v1/vm.create", b"{oops", 400, None),
    ],
)
def test_routing(method, path, body, status, error_body):
    model = running()
    response = model.handle(0.0, method, path, body)
    assert response.status == status
    if error_body is not None:
        assert response.json() == error_body
    if status == 400 and error_body is None and method == "PUT":
        assert response.json()[0] == "Failed to deserialize JSON"


def test_ping_shape():
    model = VmmModel(pid=4242)
    body = get(model, "vmm.ping").json()
    assert body["pid"] == 4242
    assert set(body) == {"build_version", "version", "pid", "features"}


@pytest.mark.parametrize(
    ("api_version", "status", "body_is_json"),
    [(53, 404, True), (52, 500, True), (47, 500, True), (46, 500, False)],
)
def test_not_created_status_and_error_format_follow_the_version(api_version, status, body_is_json):
    model = VmmModel(Knobs(api_version=api_version))
    for endpoint in ("vm.boot", "vm.pause", "vm.shutdown"):
        assert put(model, endpoint).status == status
    response = get(model, "vm.info")
    assert response.status == status
    if body_is_json:
        assert "VM is not created" in response.json()
    else:
        assert response.body.decode().endswith("VM is not created")
        with pytest.raises(ValueError):
            json.loads(response.body)


def test_create_twice_is_refused():
    model = running()
    response = put(model, "vm.create", config())
    assert response.status == 500
    assert "VM already created" in response.json()


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (config(boot=0), "boot_vcpus"),
        (config(boot=5, top=4), "max_vcpus"),
        (config(size=0), "memory.size"),
        (config(region=100 * MIB), "128 MiB"),
    ],
)
def test_create_validates(cfg, message):
    response = put(VmmModel(), "vm.create", cfg)
    assert response.status == 500
    assert any(message in part for part in response.json())


def test_create_without_body_is_400():
    assert put(VmmModel(), "vm.create").status == 400


# ---- states ----------------------------------------------------------------------------

TRANSITIONS = [
    # (actions leading to the start state, action, expected status, resulting state)
    ([], "vm.boot", 204, VmState.RUNNING),
    ([], "vm.pause", 500, VmState.CREATED),
    ([], "vm.resume", 500, VmState.CREATED),
    ([], "vm.shutdown", 500, VmState.CREATED),
    (["vm.boot"], "vm.boot", 500, VmState.RUNNING),
    (["vm.boot"], "vm.pause", 204, VmState.PAUSED),
    (["vm.boot"], "vm.resume", 500, VmState.RUNNING),
    (["vm.boot"], "vm.shutdown", 204, VmState.SHUTDOWN),
    (["vm.boot", "vm.pause"], "vm.pause", 500, VmState.PAUSED),
    (["vm.boot", "vm.pause"], "vm.resume", 204, VmState.RUNNING),
    (["vm.boot", "vm.pause"], "vm.shutdown", 204, VmState.SHUTDOWN),
    (["vm.boot", "vm.shutdown"], "vm.boot", 204, VmState.RUNNING),
    (["vm.boot", "vm.shutdown"], "vm.pause", 500, VmState.SHUTDOWN),
    (["vm.boot", "vm.shutdown"], "vm.resume", 500, VmState.SHUTDOWN),
]


@pytest.mark.parametrize(("before", "action", "status", "after"), TRANSITIONS)
def test_transitions(before, action, status, after):
    model = VmmModel(Knobs(report_shutdown_state=True))
    put(model, "vm.create", config())
    for step in before:
        assert put(model, step).status == 204
    response = put(model, action)
    assert response.status == status
    assert info(model)["state"] == after.value
    if status == 500:
        assert any("Invalid transition" in part for part in response.json())


def test_shut_down_vm_shows_as_created_by_default_and_boots_again():
    model = running()
    assert put(model, "vm.shutdown").status == 204
    assert info(model)["state"] == "Created"
    assert model.state is VmState.SHUTDOWN
    assert put(model, "vm.resume").status == 500
    assert put(model, "vm.boot").status == 204
    assert info(model)["state"] == "Running"


def test_vmm_shutdown_stops_the_vm_and_asks_the_process_to_exit():
    model = running()
    response = put(model, "vmm.shutdown")
    assert response.status == 200 and response.body == b""
    assert model.vmm_shutdown_requested
    assert model.state is VmState.SHUTDOWN


# ---- vCPUs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "status", "boot_vcpus"),
    [(3, 204, 3), (4, 204, 4), (2, 204, 2), (5, 500, 2), (0, 500, 2), (1, 204, 1)],
)
def test_vcpu_bounds(desired, status, boot_vcpus):
    model = running(boot=2, top=4)
    response = put(model, "vm.resize", {"desired_vcpus": desired})
    assert response.status == status, response
    assert info(model)["config"]["cpus"]["boot_vcpus"] == boot_vcpus


def test_vcpu_shrink_is_pending_until_the_guest_ejects():
    model = running(Knobs(eject_delay_s=2.0), boot=4, top=8)
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=1.0).status == 204
    assert info(model, 1.0)["config"]["cpus"]["boot_vcpus"] == 2
    assert model.pending_vcpu_removal == 2
    assert model.next_event() == pytest.approx(3.0)
    for desired in (3, 1, 8):
        assert put(model, "vm.resize", {"desired_vcpus": desired}, now=2.0).status == 429
    # Re-asking for the already requested count changes nothing and is not refused.
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=2.0).status == 204
    model.advance(3.0)
    assert model.pending_vcpu_removal == 0 and model.present_vcpus == 2
    assert put(model, "vm.resize", {"desired_vcpus": 3}, now=3.0).status == 204
    assert model.present_vcpus == 3


def test_vcpu_429_leaves_the_memory_part_unapplied():
    model = running(Knobs(eject_delay_s=5.0), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2})
    response = put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": 2 * GIB})
    assert response.status == 429
    assert info(model)["config"]["memory"]["hotplugged_size"] is None


def test_ejection_waits_while_paused():
    model = running(Knobs(eject_delay_s=1.0), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2}, now=0.0)
    put(model, "vm.pause", now=0.5)
    model.advance(10.0)
    assert model.pending_vcpu_removal == 2
    assert model.next_event() is None
    put(model, "vm.resume", now=10.0)
    assert model.next_event() == pytest.approx(10.5)
    model.advance(10.5)
    assert model.pending_vcpu_removal == 0


def test_progress_while_paused_knob():
    model = running(Knobs(eject_delay_s=1.0, progress_while_paused=True), boot=4, top=8)
    put(model, "vm.pause")
    assert put(model, "vm.resize", {"desired_vcpus": 2}).status == 204
    model.advance(1.0)
    assert model.pending_vcpu_removal == 0


# ---- memory (virtio-mem) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "status", "hotplugged"),
    [
        (2 * GIB, 204, 1 * GIB),
        (BOOT_MEMORY + REGION, 204, REGION),
        (BOOT_MEMORY + REGION + VIRTIO_MEM_BLOCK, 500, None),
        (BOOT_MEMORY - VIRTIO_MEM_BLOCK, 500, None),
        (BOOT_MEMORY + MIB, 500, None),
        (BOOT_MEMORY + VIRTIO_MEM_BLOCK, 204, VIRTIO_MEM_BLOCK),
        (BOOT_MEMORY, 500, None),  # identical to the requested 0 bytes of hotplug
    ],
)
def test_memory_bounds(desired, status, hotplugged):
    model = running()
    response = put(model, "vm.resize", {"desired_ram": desired})
    assert response.status == status, response
    assert info(model)["config"]["memory"]["hotplugged_size"] == hotplugged


def test_identical_memory_request_is_500():
    model = running()
    assert put(model, "vm.resize", {"desired_ram": 2 * GIB}).status == 204
    response = put(model, "vm.resize", {"desired_ram": 2 * GIB})
    assert response.status == 500
    assert any("unchanged" in part for part in response.json())


def test_memory_without_hotplug_region_is_refused():
    model = running(region=None)
    assert put(model, "vm.resize", {"desired_ram": 2 * GIB}).status == 500


def test_plugging_is_asynchronous_at_the_configured_rate():
    rate = 512 * MIB  # bytes/s
    model = running(Knobs(plug_rate=rate))
    put(model, "vm.resize", {"desired_ram": 2 * GIB}, now=0.0)
    assert info(model, 0.0)["memory_actual_size"] == BOOT_MEMORY
    assert info(model, 1.0)["memory_actual_size"] == BOOT_MEMORY + 512 * MIB
    assert info(model, 1.0)["config"]["memory"]["hotplugged_size"] == 1 * GIB
    assert info(model, 5.0)["memory_actual_size"] == 2 * GIB
    # Unplug moves back at the same rate, block by block.
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY}, now=5.0)
    actual = info(model, 5.5)["memory_actual_size"]
    assert actual == 2 * GIB - 256 * MIB
    assert (actual - BOOT_MEMORY) % VIRTIO_MEM_BLOCK == 0
    assert info(model, 7.0)["memory_actual_size"] == BOOT_MEMORY


def test_next_event_lands_each_block():
    model = running(Knobs(plug_rate=3 * MIB))
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 6 * MIB})
    seen = []
    while (due := model.next_event()) is not None:
        model.advance(due)
        seen.append(model.plugged_memory)
        assert len(seen) < 10
    assert seen == [2 * MIB, 4 * MIB, 6 * MIB]


def test_instant_plug_by_default():
    model = running()
    put(model, "vm.resize", {"desired_ram": 3 * GIB})
    assert info(model)["memory_actual_size"] == 3 * GIB


def test_memory_actual_size_omitted_before_v52():
    model = running(Knobs(api_version=51))
    assert "memory_actual_size" not in info(model)


def test_resize_is_not_atomic():
    model = running(boot=2, top=4)
    response = put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": BOOT_MEMORY + MIB})
    assert response.status == 500
    got = info(model)["config"]
    assert got["cpus"]["boot_vcpus"] == 3
    assert got["memory"]["hotplugged_size"] is None


def test_resize_accepted_while_paused_and_the_guest_plugs_on_resume():
    model = running(Knobs(plug_rate=1 * GIB))
    put(model, "vm.pause", now=0.0)
    assert put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": 2 * GIB}).status == 204
    paused = info(model, 100.0)
    assert paused["state"] == "Paused"
    assert paused["config"]["cpus"]["boot_vcpus"] == 3
    assert paused["memory_actual_size"] == BOOT_MEMORY
    put(model, "vm.resume", now=100.0)
    assert info(model, 101.0)["memory_actual_size"] == 2 * GIB


def test_cold_resize_edits_the_config():
    model = VmmModel()
    put(model, "vm.create", config())
    assert put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": 2 * GIB}).status == 204
    got = info(model)["config"]
    assert got["cpus"]["boot_vcpus"] == 3 and got["memory"]["size"] == 2 * GIB


@pytest.mark.parametrize(
    ("balloon", "status", "actual"),
    [(256 * MIB, 204, BOOT_MEMORY - 256 * MIB), (8 * GIB, 500, BOOT_MEMORY)],
)
def test_balloon_is_subtracted_from_memory_actual_size(balloon, status, actual):
    model = running()
    assert put(model, "vm.resize", {"desired_balloon": balloon}).status == status
    assert info(model)["memory_actual_size"] == actual


def test_resize_with_unknown_fields_only_is_a_no_op():
    model = running()
    assert put(model, "vm.resize", {"something": 1}).status == 204


# ---- knobs -----------------------------------------------------------------------------


def test_injected_responses_are_consumed_in_order():
    model = running()
    busy = model.error(429, "Too Many Requests")
    model.inject("vm.resize", busy, times=2)
    for _ in range(2):
        assert put(model, "vm.resize", {"desired_vcpus": 3}).status == 429
    assert info(model)["config"]["cpus"]["boot_vcpus"] == 2
    assert put(model, "vm.resize", {"desired_vcpus": 3}).status == 204


def test_inject_rejects_unknown_endpoint():
    with pytest.raises(ValueError, match=r"vm\.bogus"):
        VmmModel().inject("vm.bogus", Response(status=500))


def test_latency_and_hang_are_hints_for_the_server():
    model = running(Knobs(latency_s=0.25))
    assert get(model, "vmm.ping").delay == 0.25
    model.hang = True
    assert get(model, "vmm.ping").hang


@pytest.mark.parametrize(
    "kwargs", [{"eject_delay_s": -1.0}, {"plug_rate": 0.0}, {"latency_s": -0.1}]
)
def test_knobs_validate(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Knobs(**kwargs)


def test_reboot_after_shutdown_plugs_the_requested_memory():
    model = running(Knobs(plug_rate=1 * MIB))
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    put(model, "vm.shutdown")
    put(model, "vm.boot")
    assert info(model)["memory_actual_size"] == 2 * GIB


STARTS = {
    "none": [],
    "created": ["vm.create"],
    "running": ["vm.create", "vm.boot"],
    "paused": ["vm.create", "vm.boot", "vm.pause"],
    "shutdown": ["vm.create", "vm.boot", "vm.shutdown"],
}
BODIES = [None, b"{}", b"{bad", b'{"desired_vcpus": 3, "desired_ram": 2147483648}']
ENDPOINTS = [
    "vmm.ping", "vmm.shutdown", "vm.create", "vm.boot", "vm.pause", "vm.resume",
    "vm.shutdown", "vm.info", "vm.resize", "vm.unknown",
]  # fmt: skip


@pytest.mark.parametrize("start", sorted(STARTS))
def test_every_request_in_every_state_is_answered(start):
    """Totality: no (state, endpoint, method, body) raises or answers outside the API's
    statuses, and an error never changes the reported state."""
    for endpoint in ENDPOINTS:
        for method in ("GET", "PUT", "POST"):
            for body in BODIES:
                model = VmmModel()
                for step in STARTS[start]:
                    put(model, step, config() if step == "vm.create" else None)
                before = get(model, "vm.info").body
                response = model.handle(0.0, method, f"/api/v1/{endpoint}", body)
                assert response.status in {200, 204, 400, 404, 429, 500}, (endpoint, method)
                if response.status >= 400:
                    if endpoint != "vm.resize":  # resize is not atomic by design
                        assert get(model, "vm.info").body == before, (endpoint, method, body)
                    if response.body:
                        assert all(isinstance(part, str) for part in response.json())
