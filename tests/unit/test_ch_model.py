"""The Cloud Hypervisor model's rules (RESIZE.md section 6), table-driven."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sim.cloudhypervisor import (
    DEFAULT_VMM_OVERHEAD,
    MIB,
    NEVER,
    PLUG_NEVER,
    RUST_BACKTRACE_DELAY_S,
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


def messages(response: Response) -> list[str]:
    value = response.json()
    assert isinstance(value, list) and all(isinstance(m, str) for m in value), value
    return value


# ---- routing, methods and bodies -------------------------------------------------------

BARE = b""  # a status with no body at all


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error_body"),
    [
        ("GET", "/api/v1/vmm.ping", None, 200, None),
        ("GET", "/api/v1/vm.nope", None, 404, ["Not Found"]),
        ("GET", "/other", None, 404, ["Not Found"]),
        # micro_http matches the whole URI, a query string included.
        ("GET", "/api/v1/vm.info?x=1", None, 404, ["Not Found"]),
        ("GET", "http://localhost/api/v1/vm.info", None, 200, None),
        # A method the endpoint does not serve is a 400, not a 405.
        ("PUT", "/api/v1/vm.info", None, 400, ["Bad Request"]),
        ("PUT", "/api/v1/vmm.ping", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vmm.shutdown", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.create", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.resize", None, 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.boot", None, 400, ["Bad Request"]),
        # PATCH is parsed: the generic action handler answers it with a bare 400, the
        # dedicated handlers with ["Bad Request"].
        ("PATCH", "/api/v1/vm.resize", b"{}", 400, BARE),
        ("PATCH", "/api/v1/vm.boot", None, 400, BARE),
        ("PATCH", "/api/v1/vm.delete", None, 400, BARE),
        ("PATCH", "/api/v1/vm.info", None, 400, ["Bad Request"]),
        ("PATCH", "/api/v1/vm.create", b"{}", 400, ["Bad Request"]),
        ("GET", "/api/v1/vm.delete", None, 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.pause", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.resume", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.shutdown", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.boot", b"{}", 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.resize", None, 400, ["Bad Request"]),
        ("PUT", "/api/v1/vm.create", None, 400, BARE),
    ],
)
def test_routing(method, path, body, status, error_body):
    model = running()
    response = model.handle(0.0, method, path, body)
    assert response.status == status
    assert response.content_type == "application/json"
    assert response.server == "Cloud Hypervisor API"
    assert not response.close
    if error_body == BARE:
        assert response.body == b""
    elif error_body is not None:
        assert response.json() == error_body


def http_error_text(response: Response) -> str:
    """micro_http's {"error": ...} body; its raw newline needs a lenient parser."""
    value = json.loads(response.body, strict=False)
    assert set(value) == {"error"}, value
    return value["error"]


@pytest.mark.parametrize(
    "method", ["HEAD", "OPTIONS", "TRACE", "DELETE", "POST", "CONNECT", "get", "Put", "BREW"]
)
@pytest.mark.parametrize("path", ["/api/v1/vm.info", "/api/v1/vm.boot", "/api/v1/nope"])
def test_methods_micro_http_does_not_parse_are_its_400_and_close(method, path):
    model = running()
    before = info(model)
    response = model.handle(0.0, method, path, None)
    assert response.status == 400
    assert response.close
    assert response.server == "Firecracker API"
    assert http_error_text(response).startswith("Invalid HTTP Method")
    assert info(model) == before


def test_a_body_beyond_micro_http_s_limit_is_its_400():
    model = running()
    response = put(model, "vm.resize", b" " * 51201)
    assert response.status == 400 and response.close
    assert "larger than the limit of 51200" in http_error_text(response)
    assert put(model, "vm.resize", b'{"desired_vcpus": 3}' + b" " * 51180).status == 204


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("vm.resize", b"{not json"),
        ("vm.resize", b"[1]"),
        ("vm.resize", b'{"desired_vcpus": -1}'),
        ("vm.resize", b'{"desired_vcpus": 4294967296}'),
        ("vm.resize", b'{"desired_ram": "1G"}'),
        ("vm.resize", b'{"desired_vcpus": true}'),
        ("vm.resize", b"\xff\xfe"),
        ("vm.create", b"{oops"),
        ("vm.create", b'{"cpus": {"boot_vcpus": 2}}'),
        ("vm.create", b'{"cpus": null}'),
        ("vm.create", b'{"memory": {"hotplug_size": 1}}'),
        ("vm.create", b'{"memory": {"size": "1G"}}'),
        ("vm.create", b'{"memory": {"size": 1, "hotplug_method": "virtio-mem"}}'),
        ("vm.create", b'{"memory": {"size": 1, "shared": "yes"}}'),
        ("vm.create", b'{"balloon": {}}'),
    ],
)
def test_malformed_bodies_are_400_and_change_nothing(endpoint, body):
    model = VmmModel()
    if endpoint == "vm.resize":
        put(model, "vm.create", config())
        put(model, "vm.boot")
    before = get(model, "vm.info").body
    response = put(model, endpoint, body)
    assert response.status == 400
    assert messages(response)[0] == "Failed to deserialize JSON"
    assert get(model, "vm.info").body == before


def test_ping_shape():
    model = VmmModel(pid=4242)
    body = get(model, "vmm.ping").json()
    assert body["pid"] == 4242
    assert set(body) == {"build_version", "version", "pid", "features"}
    assert body["version"].startswith("53.")


NO_VM = [
    # (endpoint, message that names the cause, follows the "not created" status)
    ("vm.info", "VM is not created", True),
    ("vm.resize", "VM is not created", True),
    ("vm.boot", "VM config is missing", True),
    # No VM object: VmNotRunning, a 500 in every version.
    ("vm.pause", "VM is not running", False),
    ("vm.resume", "VM is not running", False),
    ("vm.shutdown", "VM is not running", False),
]


@pytest.mark.parametrize(
    ("api_version", "not_created_status", "json_body"),
    [(53, 404, True), (52, 500, True), (47, 500, True), (46, 500, False)],
)
@pytest.mark.parametrize(("endpoint", "cause", "versioned"), NO_VM)
def test_requests_without_a_vm_follow_the_version(
    api_version, not_created_status, json_body, endpoint, cause, versioned
):
    model = VmmModel(Knobs(api_version=api_version))
    if endpoint == "vm.resize":
        response = put(model, endpoint, {"desired_vcpus": 2})
    elif endpoint == "vm.info":
        response = get(model, endpoint)
    else:
        response = put(model, endpoint)
    assert response.status == (not_created_status if versioned else 500)
    if json_body:
        chain = messages(response)
        assert chain[0] == "Error from API" and chain[-1] == cause
    else:
        text = response.body.decode()
        assert text.startswith("Error from API: ") and text.endswith(cause)
        with pytest.raises(ValueError):
            json.loads(response.body)


def test_create_twice_is_refused():
    model = running()
    response = put(model, "vm.create", config())
    assert response.status == 500
    assert messages(response)[-1] == "VM is already created"


def test_create_fills_serde_defaults():
    model = VmmModel()
    assert put(model, "vm.create", {}).status == 204
    got = info(model)["config"]
    assert (got["cpus"]["boot_vcpus"], got["cpus"]["max_vcpus"]) == (1, 1)
    assert got["memory"]["size"] == 512 * MIB
    assert got["memory"]["hotplug_method"] == "Acpi"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (config(boot=0), "boot_vcpus"),
        (config(boot=5, top=4), "max_vcpus"),
        (config(size=0), "memory.size"),
        (config(region=100 * MIB), "128 MiB"),
        (config(region=0), "hotplug_size"),
    ],
)
def test_config_values_are_checked_at_boot_not_at_create(cfg, message):
    model = VmmModel()
    assert put(model, "vm.create", cfg).status == 204
    response = put(model, "vm.boot")
    assert response.status == 500
    chain = messages(response)
    assert chain[:2] == ["Error from API", "The VM could not boot"]
    assert message in chain[-1]
    assert info(model)["state"] == "Created"


# ---- states ----------------------------------------------------------------------------

NOT_RUNNING = "VM is not running"
TRANSITIONS = [
    # (actions leading to the start state, action, status, resulting state, last message)
    ([], "vm.boot", 204, VmState.RUNNING, None),
    ([], "vm.pause", 500, VmState.CREATED, NOT_RUNNING),
    ([], "vm.resume", 500, VmState.CREATED, NOT_RUNNING),
    ([], "vm.shutdown", 500, VmState.CREATED, NOT_RUNNING),
    (["vm.boot"], "vm.boot", 500, VmState.RUNNING, "VM is already created"),
    (["vm.boot"], "vm.pause", 204, VmState.PAUSED, None),
    (["vm.boot"], "vm.resume", 500, VmState.RUNNING, "invalid VM state transition"),
    (["vm.boot"], "vm.shutdown", 204, VmState.SHUTDOWN, None),
    (["vm.boot", "vm.pause"], "vm.boot", 500, VmState.PAUSED, "VM is already created"),
    (["vm.boot", "vm.pause"], "vm.pause", 500, VmState.PAUSED, "invalid VM state transition"),
    (["vm.boot", "vm.pause"], "vm.resume", 204, VmState.RUNNING, None),
    (["vm.boot", "vm.pause"], "vm.shutdown", 204, VmState.SHUTDOWN, None),
    (["vm.boot", "vm.shutdown"], "vm.boot", 204, VmState.RUNNING, None),
    (["vm.boot", "vm.shutdown"], "vm.pause", 500, VmState.SHUTDOWN, NOT_RUNNING),
    (["vm.boot", "vm.shutdown"], "vm.resume", 500, VmState.SHUTDOWN, NOT_RUNNING),
    (["vm.boot", "vm.shutdown"], "vm.shutdown", 500, VmState.SHUTDOWN, NOT_RUNNING),
]


@pytest.mark.parametrize(("before", "action", "status", "after", "message"), TRANSITIONS)
def test_transitions(before, action, status, after, message):
    model = VmmModel(Knobs(report_shutdown_state=True))
    put(model, "vm.create", config())
    for step in before:
        assert put(model, step).status == 204
    response = put(model, action)
    assert response.status == status
    assert info(model)["state"] == after.value
    if message is not None:
        assert message in messages(response)[-1]


def test_shut_down_vm_shows_as_created_by_default_and_boots_again():
    model = running()
    assert put(model, "vm.shutdown").status == 204
    assert info(model)["state"] == "Created"
    assert model.state is VmState.SHUTDOWN
    assert put(model, "vm.resume").status == 500
    assert put(model, "vm.boot").status == 204
    assert info(model)["state"] == "Running"


def test_vmm_shutdown_deletes_the_vm_and_asks_the_process_to_exit():
    model = running()
    response = put(model, "vmm.shutdown")
    assert response.status == 200 and response.body == b""
    assert model.vmm_shutdown_requested
    assert model.state is None and model.config is None
    assert get(model, "vm.info").status == 404


# ---- vCPUs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "status", "boot_vcpus", "message"),
    [
        (3, 204, 3, None),
        (4, 204, 4, None),
        (2, 204, 2, None),
        (1, 204, 1, None),
        (5, 500, 2, "Requested vCPUs exceed maximum"),
        (0, 500, 2, "Requested zero vCPUs"),
    ],
)
def test_vcpu_bounds(desired, status, boot_vcpus, message):
    model = running(boot=2, top=4)
    response = put(model, "vm.resize", {"desired_vcpus": desired})
    assert response.status == status, response
    assert info(model)["config"]["cpus"]["boot_vcpus"] == boot_vcpus
    assert model.guest_vcpus_settled == boot_vcpus
    if message:
        assert messages(response)[-1] == message


def test_vcpu_shrink_is_pending_until_the_guest_ejects():
    model = running(Knobs(eject_delay_s=2.0), boot=4, top=8)
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=1.0).status == 204
    # The config shows the request at once; the guest still has all four.
    assert info(model, 1.0)["config"]["cpus"]["boot_vcpus"] == 2
    assert (model.present_vcpus, model.pending_vcpu_removal) == (4, 2)
    assert model.next_event() == pytest.approx(3.0)
    # Re-sending the requested count is a count change for CpuManager (it compares with
    # the vCPUs present): 429 like any other.
    for desired in (2, 3, 1, 8):
        response = put(model, "vm.resize", {"desired_vcpus": desired}, now=2.0)
        assert response.status == 429, desired
        assert messages(response) == ["Too Many Requests"]
    assert put(model, "vm.resize", {"desired_vcpus": 0}, now=2.0).status == 500
    model.advance(3.0)
    assert (model.present_vcpus, model.pending_vcpu_removal) == (2, 0)
    # Re-sending the shrink's count is now a no-op: a probe for "the guest has ejected".
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=3.0).status == 204
    assert model.present_vcpus == 2
    assert put(model, "vm.resize", {"desired_vcpus": 3}, now=3.0).status == 204
    assert model.present_vcpus == 3


def test_asking_for_the_present_count_during_a_removal_is_accepted_but_does_not_cancel_it():
    """Cloud Hypervisor's CpuManager sees no change, answers 204 and records the count in
    the config, while the guest still ejects the vCPUs marked for removal."""
    model = running(Knobs(eject_delay_s=1.0), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2})
    assert put(model, "vm.resize", {"desired_vcpus": 4}).status == 204
    assert info(model)["config"]["cpus"]["boot_vcpus"] == 4
    model.advance(1.0)
    assert model.present_vcpus == 2
    assert info(model, 1.0)["config"]["cpus"]["boot_vcpus"] == 4
    # The next change is measured from what the guest has: 2 -> 4 hot-adds two.
    assert put(model, "vm.resize", {"desired_vcpus": 4}, now=1.0).status == 204
    assert model.present_vcpus == 4


def test_strict_pending_removal_knob_refuses_the_present_count_too():
    model = running(Knobs(eject_delay_s=1.0, strict_pending_removal=True), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2})
    assert put(model, "vm.resize", {"desired_vcpus": 4}).status == 429
    assert info(model)["config"]["cpus"]["boot_vcpus"] == 2


def test_vcpu_429_leaves_the_memory_part_unapplied():
    model = running(Knobs(eject_delay_s=5.0), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2})
    response = put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": 2 * GIB})
    assert response.status == 429
    assert "hotplugged_size" not in info(model)["config"]["memory"]
    assert model.requested_hotplug == 0


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

BELOW_BOOT = "below boot size"
IDENTICAL = "identical"
TOO_BIG = "bigger than region_size"
UNALIGNED = "not aligned on block_size"


@pytest.mark.parametrize(
    ("desired", "status", "hotplugged", "message"),
    [
        (2 * GIB, 204, 1 * GIB, None),
        (BOOT_MEMORY + REGION, 204, REGION, None),
        (BOOT_MEMORY + VIRTIO_MEM_BLOCK, 204, VIRTIO_MEM_BLOCK, None),
        (BOOT_MEMORY + REGION + VIRTIO_MEM_BLOCK, 500, None, TOO_BIG),
        (BOOT_MEMORY - VIRTIO_MEM_BLOCK, 500, None, BELOW_BOOT),
        (BOOT_MEMORY + MIB, 500, None, UNALIGNED),
        (BOOT_MEMORY, 500, None, IDENTICAL),  # identical to the requested 0 bytes
    ],
)
def test_memory_bounds(desired, status, hotplugged, message):
    model = running()
    response = put(model, "vm.resize", {"desired_ram": desired})
    assert response.status == status, response
    assert info(model)["config"]["memory"].get("hotplugged_size") == hotplugged
    if message:
        chain = messages(response)
        assert chain[:2] == ["Error from API", "The VM could not be resized"]
        assert message in chain[-1]


def test_identical_memory_request_is_500():
    model = running()
    assert put(model, "vm.resize", {"desired_ram": 2 * GIB}).status == 204
    response = put(model, "vm.resize", {"desired_ram": 2 * GIB})
    assert response.status == 500
    assert IDENTICAL in messages(response)[-1]


def test_shrinking_back_to_the_boot_size_clears_hotplugged_size():
    model = running()
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    assert put(model, "vm.resize", {"desired_ram": BOOT_MEMORY}).status == 204
    assert "hotplugged_size" not in info(model)["config"]["memory"]
    assert info(model)["memory_actual_size"] == BOOT_MEMORY


@pytest.mark.parametrize(("api_version", "omitted"), [(53, True), (52, False)])
def test_null_fields_are_omitted_from_v53(api_version, omitted):
    model = running(Knobs(api_version=api_version))
    memory = info(model)["config"]["memory"]
    assert ("hotplugged_size" not in memory) is omitted
    if not omitted:
        assert memory["hotplugged_size"] is None


def test_memory_without_hotplug_region_is_refused():
    model = running(region=None)
    response = put(model, "vm.resize", {"desired_ram": 2 * GIB})
    assert response.status == 500


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


def test_a_new_request_redirects_a_plug_in_progress():
    model = running(Knobs(plug_rate=1 * GIB))
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 2 * GIB}, now=0.0)
    model.advance(0.5)
    assert model.plugged_memory == 512 * MIB
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 256 * MIB}, now=0.5)
    assert info(model, 0.75)["memory_actual_size"] == BOOT_MEMORY + 256 * MIB


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


def test_before_v52_memory_actual_size_is_the_requested_size():
    model = running(Knobs(api_version=51, plug_rate=1 * MIB))
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    assert model.plugged_memory == 0
    assert info(model)["memory_actual_size"] == 2 * GIB


def test_memory_actual_size_can_be_left_out():
    model = running(Knobs(report_memory_actual_size=False))
    assert "memory_actual_size" not in info(model)


def test_resize_is_not_atomic():
    model = running(boot=2, top=4)
    response = put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": BOOT_MEMORY + MIB})
    assert response.status == 500
    got = info(model)["config"]
    assert got["cpus"]["boot_vcpus"] == 3
    assert "hotplugged_size" not in got["memory"]


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


def test_cold_resize_edits_the_config_unchecked():
    model = VmmModel()
    put(model, "vm.create", config())
    assert put(model, "vm.resize", {"desired_vcpus": 3, "desired_ram": 2 * GIB}).status == 204
    got = info(model)["config"]
    assert got["cpus"]["boot_vcpus"] == 3 and got["memory"]["size"] == 2 * GIB
    assert put(model, "vm.boot").status == 204
    assert model.present_vcpus == 3
    assert info(model)["memory_actual_size"] == 2 * GIB


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
    before = info(model)
    assert put(model, "vm.resize", {"something": 1}).status == 204
    assert info(model) == before


def test_reboot_after_shutdown_plugs_the_requested_memory():
    model = running(Knobs(plug_rate=1 * MIB))
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    put(model, "vm.shutdown")
    put(model, "vm.boot")
    assert info(model)["memory_actual_size"] == 2 * GIB


# ---- knobs -----------------------------------------------------------------------------


def test_injected_responses_are_consumed_in_order():
    model = running()
    busy = model.error(429, "Too Many Requests")
    model.inject("vm.resize", busy, times=2)
    for _ in range(2):
        assert put(model, "vm.resize", {"desired_vcpus": 3}).status == 429
    assert info(model)["config"]["cpus"]["boot_vcpus"] == 2
    assert put(model, "vm.resize", {"desired_vcpus": 3}).status == 204


@pytest.mark.parametrize(("endpoint", "times"), [("vm.bogus", 1), ("vm.resize", 0)])
def test_inject_rejects_bad_arguments(endpoint, times):
    with pytest.raises(ValueError, match=r"vm\.bogus|times"):
        VmmModel().inject(endpoint, Response(status=500), times=times)


def test_error_format_follows_the_version():
    assert VmmModel(Knobs(api_version=46)).error(500, "a", "b").body == b"a: b"
    assert VmmModel().error(500, "a", "b").json() == ["a", "b"]


def test_latency_and_hang_are_hints_for_the_server():
    model = running(Knobs(latency_s=0.25))
    assert get(model, "vmm.ping").delay == 0.25
    model.hang = True
    assert get(model, "vmm.ping").hang


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eject_delay_s": -1.0},
        {"eject_delay_s": float("nan")},
        {"plug_rate": -1.0},
        {"plug_rate": float("inf")},
        {"unplug_limit": -1},
        {"vmm_overhead": -1},
        {"latency_s": -0.1},
        {"api_version": 0},
    ],
)
def test_knobs_validate(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Knobs(**kwargs)


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
    "vm.shutdown", "vm.info", "vm.resize", "vm.delete", "sim.guest", "sim.exit",
    "vm.unknown",
]  # fmt: skip


@pytest.mark.parametrize("start", sorted(STARTS))
def test_every_request_in_every_state_is_answered(start):
    """Totality: no (state, endpoint, method, body) raises or answers outside the API's
    statuses, and an error never changes the reported state."""
    for endpoint in ENDPOINTS:
        for method in ("GET", "PUT", "PATCH", "POST"):
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
                    if response.close:
                        http_error_text(response)
                    elif response.body:
                        messages(response)


# ---- the guest model: unkind guests --------------------------------------------------------

FOREVER = 1e9  # seconds: long past any eject delay or plug a test configures


def guest(model: VmmModel, now: float = 0.0) -> dict[str, int]:
    response = get(model, "sim.guest", now)
    assert response.status == 200, response
    return response.json()


def test_a_guest_that_never_ejects_keeps_the_removal_pending_for_ever():
    model = running(Knobs(eject_delay_s=NEVER), boot=4, top=8)
    assert put(model, "vm.resize", {"desired_vcpus": 2}).status == 204
    assert model.next_event() is None
    model.advance(FOREVER)
    assert (model.present_vcpus, model.pending_vcpu_removal) == (4, 2)
    assert guest(model, FOREVER)["vcpus_online"] == 4
    # Every other count, the shrink's own target included, is busy for ever.
    for desired in (2, 3, 1, 8):
        response = put(model, "vm.resize", {"desired_vcpus": desired}, now=FOREVER)
        assert response.status == 429, desired
        assert messages(response) == ["Too Many Requests"]
    # The count still running is a no-op CpuManager accepts: boot_vcpus goes back, the
    # removal stays pending...
    assert put(model, "vm.resize", {"desired_vcpus": 4}, now=FOREVER).status == 204
    assert info(model, FOREVER)["config"]["cpus"]["boot_vcpus"] == 4
    assert model.pending_vcpu_removal == 2
    # ...so a later shrink is a 429 too, for ever.
    assert put(model, "vm.resize", {"desired_vcpus": 3}, now=2 * FOREVER).status == 429


def test_after_the_guest_ejects_the_same_target_is_a_204_no_op():
    model = running(Knobs(eject_delay_s=1.0), boot=4, top=8)
    put(model, "vm.resize", {"desired_vcpus": 2})
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=0.5).status == 429
    assert guest(model, 0.5)["vcpus_online"] == 4
    assert put(model, "vm.resize", {"desired_vcpus": 2}, now=1.0).status == 204
    assert (model.present_vcpus, model.pending_vcpu_removal) == (2, 0)
    assert guest(model, 1.0)["vcpus_online"] == 2


def test_a_guest_driver_that_never_plugs():
    model = running(Knobs(plug_rate=PLUG_NEVER))
    assert put(model, "vm.resize", {"desired_ram": 2 * GIB}).status == 204
    assert model.next_event() is None
    got = info(model, FOREVER)
    # The request is recorded; the guest has none of it.
    assert got["config"]["memory"]["hotplugged_size"] == 1 * GIB
    assert got["memory_actual_size"] == BOOT_MEMORY
    assert guest(model, FOREVER)["memory_held"] == BOOT_MEMORY
    assert model.plugged_memory == 0


def test_a_guest_driver_that_never_plugs_holds_nothing_hotplugged_at_boot():
    model = VmmModel(Knobs(plug_rate=PLUG_NEVER))
    cfg = config()
    cfg["memory"]["hotplugged_size"] = 512 * MIB
    put(model, "vm.create", cfg)
    assert put(model, "vm.boot").status == 204
    assert info(model)["memory_actual_size"] == BOOT_MEMORY


@pytest.mark.parametrize("plug_rate", [None, 512 * MIB])
def test_unplug_stops_at_the_limit_and_stays(plug_rate):
    model = running(Knobs(plug_rate=plug_rate, unplug_limit=256 * MIB))
    put(model, "vm.resize", {"desired_ram": 2 * GIB}, now=0.0)
    model.advance(10.0)
    assert model.plugged_memory == 1 * GIB
    assert put(model, "vm.resize", {"desired_ram": BOOT_MEMORY}, now=10.0).status == 204
    model.advance(FOREVER)
    assert model.next_event() is None
    assert info(model, FOREVER)["memory_actual_size"] == BOOT_MEMORY + 768 * MIB
    assert guest(model, FOREVER)["memory_held"] == 2 * GIB - 256 * MIB
    # Plugging still works; giving back does not, the budget is spent.
    put(model, "vm.resize", {"desired_ram": 2 * GIB}, now=FOREVER)
    model.advance(FOREVER + 10)
    assert model.plugged_memory == 1 * GIB
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY}, now=FOREVER + 10)
    model.advance(2 * FOREVER)
    assert model.plugged_memory == 1 * GIB


def test_unplug_limit_zero_gives_nothing_back_and_a_reboot_restores_the_budget():
    model = running(Knobs(unplug_limit=0))
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 512 * MIB})
    assert info(model)["memory_actual_size"] == 2 * GIB
    put(model, "vm.shutdown")
    put(model, "vm.boot")
    # A fresh guest boots with what the config asks for and has given nothing back yet.
    assert info(model)["memory_actual_size"] == BOOT_MEMORY + 512 * MIB


def test_unplug_limit_counts_partial_unplugs_across_requests():
    model = running(Knobs(unplug_limit=384 * MIB))
    put(model, "vm.resize", {"desired_ram": 2 * GIB})
    put(model, "vm.resize", {"desired_ram": 2 * GIB - 256 * MIB})
    assert model.plugged_memory == 768 * MIB
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY})
    assert model.plugged_memory == 1 * GIB - 384 * MIB


@pytest.mark.parametrize("api_version", [50, 51])
def test_before_v52_below_boot_is_a_silent_204_that_leaves_the_device(api_version):
    model = running(Knobs(api_version=api_version))
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 256 * MIB})
    assert model.plugged_memory == 256 * MIB
    response = put(model, "vm.resize", {"desired_ram": BOOT_MEMORY - 256 * MIB})
    assert response.status == 204 and response.body == b""
    got = info(model)
    assert got["config"]["memory"]["hotplugged_size"] is None
    assert got["config"]["memory"]["size"] == BOOT_MEMORY
    # The device still asks for 256 MiB and the guest still has them...
    assert (model.requested_hotplug, model.plugged_memory) == (256 * MIB, 256 * MIB)
    assert guest(model)["memory_held"] == BOOT_MEMORY + 256 * MIB
    # ...while memory_actual_size, the request in these versions, shows the boot size.
    assert got["memory_actual_size"] == BOOT_MEMORY
    # Asking for that size again is "identical" to what the device has.
    again = put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 256 * MIB})
    assert again.status == 500
    assert IDENTICAL in messages(again)[-1]
    assert put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 512 * MIB}).status == 204


@pytest.mark.parametrize("api_version", [52, 53])
def test_from_v52_below_boot_is_a_500(api_version):
    model = running(Knobs(api_version=api_version))
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 256 * MIB})
    response = put(model, "vm.resize", {"desired_ram": BOOT_MEMORY - 256 * MIB})
    assert response.status == 500
    assert BELOW_BOOT in messages(response)[-1]
    assert info(model)["config"]["memory"]["hotplugged_size"] == 256 * MIB


@pytest.mark.parametrize(
    ("api_version", "actual_while_plugging"),
    [(50, BOOT_MEMORY + 1 * GIB), (53, BOOT_MEMORY)],
)
def test_memory_actual_size_is_the_request_before_v52_and_the_plug_after(
    api_version, actual_while_plugging
):
    model = running(Knobs(api_version=api_version, plug_rate=PLUG_NEVER))
    put(model, "vm.resize", {"desired_ram": BOOT_MEMORY + 1 * GIB})
    assert info(model, FOREVER)["memory_actual_size"] == actual_while_plugging


@pytest.mark.parametrize("api_version", [50, 53])
def test_ping_reports_the_release(api_version):
    body = get(VmmModel(Knobs(api_version=api_version), pid=7), "vmm.ping").json()
    assert body == {
        "build_version": f"v{api_version}.0",
        "version": f"{api_version}.0.0",
        "pid": 7,
        "features": ["kvm"],
    }


def test_sim_guest_before_boot_holds_only_the_vmm_overhead():
    model = VmmModel()
    assert guest(model) == {"memory_held": 0, "vcpus_online": 0, "rss": DEFAULT_VMM_OVERHEAD}
    put(model, "vm.create", config())
    assert guest(model) == {"memory_held": 0, "vcpus_online": 0, "rss": DEFAULT_VMM_OVERHEAD}


def test_sim_guest_follows_the_guest_not_the_request():
    overhead = 100 * MIB
    model = running(Knobs(plug_rate=512 * MIB, vmm_overhead=overhead), boot=2, top=4)
    assert guest(model) == {
        "memory_held": BOOT_MEMORY,
        "vcpus_online": 2,
        "rss": BOOT_MEMORY + overhead,
    }
    put(model, "vm.resize", {"desired_ram": 2 * GIB, "desired_vcpus": 4}, now=0.0)
    halfway = guest(model, 1.0)
    assert halfway["memory_held"] == BOOT_MEMORY + 512 * MIB
    assert halfway["rss"] == BOOT_MEMORY + 512 * MIB + overhead
    assert halfway["vcpus_online"] == 4
    put(model, "vm.pause", now=1.0)
    assert guest(model, 5.0)["memory_held"] == BOOT_MEMORY + 512 * MIB
    put(model, "vm.shutdown", now=5.0)
    assert guest(model, 5.0) == {"memory_held": 0, "vcpus_online": 0, "rss": overhead}


@pytest.mark.parametrize(("method", "body"), [("PUT", None), ("PUT", b"{}"), ("PATCH", None)])
def test_sim_guest_is_get_only(method, body):
    response = running().handle(0.0, method, "/api/v1/sim.guest", body)
    assert response.status == 400


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"code": 3}', 204, 3),
        (b'{"code": 0}', 204, 0),
        (None, 400, None),
        (b"{}", 400, None),
        (b'{"code": 256}', 400, None),
        (b'{"code": "1"}', 400, None),
        (b"{oops", 400, None),
    ],
)
def test_sim_exit_asks_the_process_to_exit_with_the_code(body, status, code):
    model = running()
    response = put(model, "sim.exit", body)
    assert response.status == status
    assert model.exit_code == code
    assert info(model)["state"] == "Running"


@pytest.mark.parametrize("api_version", [50, 53])
def test_vm_delete_removes_the_config_in_any_state(api_version):
    for steps in (
        [],
        ["vm.create"],
        ["vm.create", "vm.boot"],
        ["vm.create", "vm.boot", "vm.pause"],
    ):
        model = VmmModel(Knobs(api_version=api_version))
        for step in steps:
            assert put(model, step, config() if step == "vm.create" else None).status == 204
        assert put(model, "vm.delete").status == 204
        assert model.config is None and model.state is None
        assert get(model, "vm.info").status == (404 if api_version >= 53 else 500)
        assert guest(model)["memory_held"] == 0
        assert put(model, "vm.create", config()).status == 204


def test_vm_delete_refuses_a_body():
    model = running()
    assert put(model, "vm.delete", {}).status == 400
    assert info(model)["state"] == "Running"


# ---- boot checks the payload as Cloud Hypervisor does --------------------------------------


def with_payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    cfg = config()
    if payload is None:
        del cfg["payload"]
    else:
        cfg["payload"] = payload
    return cfg


@pytest.mark.parametrize(
    ("payload", "files", "status", "message"),
    [
        (None, set(), 500, "No kernel or firmware specified"),
        ({}, set(), 500, "No kernel or firmware specified"),
        ({"cmdline": "console=ttyS0"}, set(), 500, "No kernel or firmware specified"),
        ({"kernel": "/k"}, set(), 500, "No such file or directory"),
        ({"kernel": "/k", "initramfs": "/i"}, {"/k"}, 500, "No such file or directory"),
        ({"firmware": "/fw"}, set(), 500, "No such file or directory"),
        ({"kernel": "/k"}, {"/k"}, 204, None),
        ({"kernel": "/k", "initramfs": "/i"}, {"/k", "/i"}, 204, None),
        ({"firmware": "/fw"}, {"/fw"}, 204, None),
    ],
)
def test_boot_needs_a_payload_whose_files_open(payload, files, status, message):
    model = VmmModel(file_exists=files.__contains__)
    # vm.create stores any well-typed payload; only vm.boot looks at it.
    assert put(model, "vm.create", with_payload(payload)).status == 204
    response = put(model, "vm.boot")
    assert response.status == status
    if message:
        chain = messages(response)
        assert chain[:2] == ["Error from API", "The VM could not boot"]
        assert message in chain[-1]
        assert info(model)["state"] == "Created"
        assert guest(model)["memory_held"] == 0
    else:
        assert info(model)["state"] == "Running"


def test_the_missing_file_is_named_by_its_role():
    model = VmmModel(file_exists={"/k"}.__contains__)
    put(model, "vm.create", with_payload({"kernel": "/k", "initramfs": "/i"}))
    assert "Cannot open the initramfs image" in messages(put(model, "vm.boot"))


@pytest.mark.parametrize(
    "body",
    [
        {"payload": {"kernel": 3}},
        {"payload": "/boot/vmlinux"},
        {"payload": {"cmdline": ["a"]}},
        {"serial": {"mode": "Nope"}},
        {"serial": {}},
        {"console": {"mode": "File", "file": 1}},
        {"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "nested": "yes"}},
        {"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "max_phys_bits": 300}},
    ],
)
def test_create_types_the_body_as_serde_does(body):
    model = VmmModel()
    response = put(model, "vm.create", body)
    assert response.status == 400
    assert messages(response)[0] == "Failed to deserialize JSON"
    assert model.config is None


def test_rust_backtrace_makes_every_500_long_multi_line_and_slow():
    model = running(Knobs(rust_backtrace=True))
    response = put(model, "vm.resize", {"desired_vcpus": 99})
    assert response.status == 500
    chain = messages(response)
    assert chain[:2] == ["Error from API", "The VM could not be resized"]
    assert chain[-1].startswith("Requested vCPUs exceed maximum\n")
    assert chain[-1].count("\n") > 20 and "Stack backtrace" in chain[-1]
    assert response.delay == RUST_BACKTRACE_DELAY_S
    # Other statuses are as without it.
    busy = running(Knobs(rust_backtrace=True, eject_delay_s=NEVER), boot=4, top=8)
    put(busy, "vm.resize", {"desired_vcpus": 2})
    assert put(busy, "vm.resize", {"desired_vcpus": 3}).json() == ["Too Many Requests"]
    assert put(model, "vm.resize", b"{bad").delay == 0.0
