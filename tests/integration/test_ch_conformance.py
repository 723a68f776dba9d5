"""REALITY.md section 1, row by row: what the real Cloud Hypervisor v50 and v53 answer.

Each test states one row of that table (its docstring quotes the row) and runs it over
the VMM's real Unix socket against:

- the simulator at ``--sim-api-version 50`` and ``53``, with the guest of the measuring
  machine (its PVM runs no stock guest, so the guest never ejects a vCPU nor plugs a
  block: ``--sim-eject-delay never --sim-plug-rate never``);
- a real ``cloud-hypervisor`` when ``CHSCALE_CH_BINARY`` is set, exactly as
  ``test_ch_contract.py`` allows (its fixtures and helpers are reused here); its version
  is read from ``vmm.ping``.

Where the table's columns differ, a test asserts each version's answer. A few tests at
the end state the HTTP layer's behaviour (micro_http, read from its source) that the
table's rows rest on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration.test_ch_contract import (  # noqa: F401 (workdir is a fixture)
    BOOT_MEMORY,
    MIB,
    REGION,
    SIM,
    Target,
    Vmm,
    _real_target,
    raw,
    raw_bytes,
    start,
    stop,
    workdir,
)

pytestmark = pytest.mark.integration

V50, V53 = 50, 53
BOOT_VCPUS, MAX_VCPUS = 4, 6
# Long enough to see that something that should never happen does not happen soon.
SETTLE_S = 1.0
STATUSES = {200, 204, 400, 404, 429, 500}


def _sim(version: int) -> Target:
    def argv(sock: str) -> list[str]:
        # Later flags win: the measuring machine's guest, at this version.
        return [
            *SIM.argv(sock),
            "--sim-api-version",
            str(version),
            "--sim-eject-delay",
            "never",
            "--sim-plug-rate",
            "never",
        ]

    return attrs.evolve(SIM, name=f"sim-v{version}", argv=argv)


def _targets() -> list[Any]:
    real = _real_target()
    return [
        pytest.param(_sim(V50), id="sim-v50"),
        pytest.param(_sim(V53), id="sim-v53"),
        pytest.param(
            real,
            id="cloud-hypervisor",
            marks=pytest.mark.skip(reason=real) if isinstance(real, str) else (),
        ),
    ]


@attrs.define
class Ch:
    """One VMM under test, with the version its column of the table is read from."""

    vmm: Vmm
    version: int
    is_sim: bool

    @property
    def socket(self) -> str:
        return self.vmm.socket

    def call(self, method: str, endpoint: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, raw_body = raw(self.socket, method, f"/api/v1/{endpoint}", data)
        assert status in STATUSES, (method, endpoint, status, raw_body)
        return status, json.loads(raw_body) if raw_body else None

    def put(self, endpoint: str, body: Any = None) -> tuple[int, Any]:
        return self.call("PUT", endpoint, body)

    def info(self) -> dict[str, Any]:
        status, body = self.call("GET", "vm.info")
        assert status == 200, body
        return body

    def boot_vcpus(self) -> int:
        return int(self.info()["config"]["cpus"]["boot_vcpus"])

    def config(self, boot: int = BOOT_VCPUS, top: int = MAX_VCPUS) -> dict[str, Any]:
        return self.vmm.config(boot=boot, top=top)

    def boot(self, **kwargs: Any) -> None:
        assert self.put("vm.create", self.config(**kwargs))[0] == 204
        assert self.put("vm.boot")[0] == 204

    def resize(self, **fields: int) -> tuple[int, Any]:
        return self.put("vm.resize", fields)

    def vcpu_threads(self) -> int:
        """The vCPUs the VMM still runs: the simulator says so; Cloud Hypervisor names
        each vCPU thread vcpu<N>."""
        if self.is_sim:
            status, body = self.call("GET", "sim.guest")
            assert status == 200
            return int(body["vcpus_online"])
        tasks = Path(f"/proc/{self.vmm.proc.pid}/task")
        names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
        return sum(1 for name in names if re.fullmatch(r"vcpu\d+", name))


def _version(build_version: str) -> int:
    match = re.match(r"v?(\d+)\.", build_version)
    assert match, f"cannot read a release from build_version {build_version!r}"
    return int(match.group(1))


@pytest.fixture(params=_targets())
def ch(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Ch]:  # noqa: F811
    target: Target = request.param
    is_sim = target.name.startswith(SIM.name)
    if is_sim:
        kernel = workdir / "vmlinux"  # opened at boot, never read
        kernel.touch()
        target = attrs.evolve(target, payload={"kernel": str(kernel)})
    sock = str(workdir / "api.sock")
    proc, client = start(target, sock, workdir / "vmm.log")
    try:
        version = _version(client.ping().build_version)
        yield Ch(Vmm(target, proc, sock, client), version, is_sim)
    finally:
        client.close()
        stop(proc)


def chain_end(body: Any) -> str:
    assert isinstance(body, list) and body and all(isinstance(m, str) for m in body), body
    return body[-1]


def shrink_pending(ch: Ch) -> None:
    """Boot with BOOT_VCPUS and shrink to 2: the guest ejects nothing, so the removal of
    the other vCPUs stays pending."""
    ch.boot()
    assert ch.resize(desired_vcpus=2)[0] == 204


# ---- the table, row by row ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "endpoint", "body", "v50_message"),
    [
        ("GET", "vm.info", None, "VM is not created"),
        ("PUT", "vm.boot", None, "VM config is missing"),
        ("PUT", "vm.resize", {"desired_vcpus": 2}, "VM is not created"),
    ],
)
def test_info_boot_resize_with_no_vm(
    ch: Ch, method: str, endpoint: str, body: Any, v50_message: str
):
    """| info / boot / resize with no VM | 500 "VM is not created" | 404 |"""
    status, answer = ch.call(method, endpoint, body)
    if ch.version >= V53:
        assert status == 404
    else:
        assert status == 500
        assert chain_end(answer) == v50_message


@pytest.mark.parametrize("endpoint", ["vm.pause", "vm.resume", "vm.shutdown"])
def test_pause_resume_shutdown_with_no_vm(ch: Ch, endpoint: str):
    """| pause / resume / shutdown with no VM | 500 "VM is not running" | same |"""
    for created in (False, True):
        if created:
            assert ch.put("vm.create", ch.config())[0] == 204
        status, answer = ch.put(endpoint)
        assert status == 500
        assert chain_end(answer) == "VM is not running"


def test_vcpu_grow_within_max(ch: Ch):
    """| `desired_vcpus` grow within max | 204; `config.cpus.boot_vcpus` = new count |"""
    ch.boot()
    assert ch.resize(desired_vcpus=MAX_VCPUS) == (204, None)
    assert ch.boot_vcpus() == MAX_VCPUS


@pytest.mark.parametrize("desired", [MAX_VCPUS + 1, 0])
def test_vcpus_above_max_or_zero(ch: Ch, desired: int):
    """| `desired_vcpus` above max / 0 | 500 | same |"""
    ch.boot()
    status, answer = ch.resize(desired_vcpus=desired)
    assert status == 500
    chain_end(answer)
    assert ch.boot_vcpus() == BOOT_VCPUS


def test_vcpu_shrink_sets_boot_vcpus_at_once_and_the_threads_stay(ch: Ch):
    """| `desired_vcpus` shrink | 204; `boot_vcpus` = new count AT ONCE; the vCPU threads
    stay until the guest ejects |"""
    ch.boot()
    assert ch.vcpu_threads() == BOOT_VCPUS
    assert ch.resize(desired_vcpus=2) == (204, None)
    assert ch.boot_vcpus() == 2
    time.sleep(SETTLE_S)
    assert ch.vcpu_threads() == BOOT_VCPUS


@pytest.mark.parametrize("desired", [2, 3, 1, MAX_VCPUS])
def test_any_vcpu_request_while_a_removal_is_pending_is_429(ch: Ch, desired: int):
    """| any vCPU request while a removal is pending, the same target included | 429
    `["Too Many Requests"]` | same |"""
    shrink_pending(ch)
    assert ch.resize(desired_vcpus=desired) == (429, ["Too Many Requests"])
    assert ch.boot_vcpus() == 2


def test_asking_for_the_running_count_while_a_removal_is_pending(ch: Ch):
    """| ask for the count still running while a removal is pending | 204, `boot_vcpus`
    back, removal still pending: a later shrink then gets 429 forever |"""
    shrink_pending(ch)
    assert ch.resize(desired_vcpus=BOOT_VCPUS) == (204, None)
    assert ch.boot_vcpus() == BOOT_VCPUS
    assert ch.vcpu_threads() == BOOT_VCPUS
    for _ in range(2):
        assert ch.resize(desired_vcpus=3) == (429, ["Too Many Requests"])
        time.sleep(SETTLE_S)
    assert ch.boot_vcpus() == BOOT_VCPUS


def test_memory_grow(ch: Ch):
    """| `desired_ram` grow | 204; `memory_actual_size` = the REQUESTED size | 204;
    `memory_actual_size` = what the guest has plugged (stays at boot size until the guest
    driver plugs) |"""
    ch.boot()
    target = BOOT_MEMORY + 256 * MIB
    assert ch.resize(desired_ram=target) == (204, None)
    info = ch.info()
    assert info["config"]["memory"]["hotplugged_size"] == 256 * MIB
    if ch.version >= V53:
        time.sleep(SETTLE_S)
        actual = ch.info()["memory_actual_size"]
        if ch.is_sim:  # the guest never plugs
            assert actual == BOOT_MEMORY
        else:
            assert BOOT_MEMORY <= actual <= target
    else:
        assert info["memory_actual_size"] == target


@pytest.mark.parametrize(
    ("first", "desired"),
    [
        pytest.param(BOOT_MEMORY + 128 * MIB, BOOT_MEMORY + 128 * MIB, id="equal-to-current"),
        pytest.param(None, BOOT_MEMORY, id="equal-to-boot"),
        pytest.param(None, BOOT_MEMORY + REGION + 2 * MIB, id="above-region"),
        pytest.param(None, BOOT_MEMORY + 1 * MIB, id="not-2MiB-aligned"),
    ],
)
def test_memory_equal_above_region_or_unaligned(ch: Ch, first: int | None, desired: int):
    """| `desired_ram` equal to current / above region / not 2 MiB aligned | 500 "Failed
    to virtio-mem resize" | same |"""
    ch.boot()
    if first is not None:
        assert ch.resize(desired_ram=first)[0] == 204
    before = ch.info()["config"]["memory"].get("hotplugged_size")
    status, answer = ch.resize(desired_ram=desired)
    assert status == 500
    assert "Failed to virtio-mem resize" in answer
    assert ch.info()["config"]["memory"].get("hotplugged_size") == before


def test_memory_below_boot_size(ch: Ch):
    """| `desired_ram` below boot size | 204, silently: `hotplugged_size` becomes null,
    the virtio-mem device keeps its size, the next grow gets 500 "identical" | 500 |"""
    ch.boot()
    grown = BOOT_MEMORY + 256 * MIB
    assert ch.resize(desired_ram=grown)[0] == 204
    status, answer = ch.resize(desired_ram=BOOT_MEMORY - 128 * MIB)
    memory = ch.info()["config"]["memory"]
    if ch.version >= V53:
        assert status == 500
        chain_end(answer)
        assert memory["hotplugged_size"] == 256 * MIB
        return
    assert (status, answer) == (204, None)
    assert memory["hotplugged_size"] is None
    assert memory["size"] == BOOT_MEMORY
    again, refusal = ch.resize(desired_ram=grown)
    assert again == 500
    assert "identical" in chain_end(refusal)


def test_resize_while_paused(ch: Ch):
    """| resize while paused | memory 204; vCPUs 429 if a removal is pending | same |"""
    shrink_pending(ch)
    assert ch.put("vm.pause")[0] == 204
    assert ch.resize(desired_ram=BOOT_MEMORY + 128 * MIB) == (204, None)
    assert ch.resize(desired_vcpus=3) == (429, ["Too Many Requests"])
    info = ch.info()
    assert info["state"] == "Paused"
    assert info["config"]["memory"]["hotplugged_size"] == 128 * MIB


@pytest.mark.parametrize(
    ("method", "endpoint", "body"),
    [
        pytest.param("PUT", "vm.pause", b"{}", id="body-on-pause"),
        pytest.param("PUT", "vm.shutdown", b"{}", id="body-on-shutdown"),
        pytest.param("PUT", "vm.boot", b"{}", id="body-on-boot"),
        pytest.param("PUT", "vm.resize", b"{not json", id="bad-json-resize"),
        pytest.param("PUT", "vm.create", b"{not json", id="bad-json-create"),
        pytest.param("PUT", "vm.create", b'{"cpus": {"boot_vcpus": "2"}}', id="mistyped-create"),
        pytest.param("GET", "vm.resize", None, id="get-resize"),
        pytest.param("PUT", "vm.info", None, id="put-info"),
        pytest.param("GET", "vm.boot", None, id="get-boot"),
        pytest.param("PATCH", "vm.info", None, id="patch-info"),
    ],
)
def test_body_on_an_action_endpoint_bad_json_wrong_method(
    ch: Ch, method: str, endpoint: str, body: bytes | None
):
    """| body on an action endpoint, bad JSON, wrong method | 400 | same |"""
    ch.boot()
    before = ch.info()
    status, _ = raw(ch.socket, method, f"/api/v1/{endpoint}", body)
    assert status == 400
    assert ch.info() == before


def http_answer(sock: str, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Status line, headers and body of the one answer to ``request``, read until the
    VMM closes the connection (the socket times out, failing the test, if it does not)."""
    answer = raw_bytes(sock, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, body


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "DELETE"])
def test_head_options_trace_delete(ch: Ch, method: str):
    """| HEAD, OPTIONS, TRACE, DELETE | 400 with a `{"error": ...}` body (not JSON-array),
    connection closed | same |"""
    request = f"{method} /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    status_line, _, body = http_answer(ch.socket, request)
    assert status_line.split()[1] == b"400"
    value = json.loads(body, strict=False)  # micro_http puts a raw newline in the string
    assert isinstance(value, dict) and set(value) == {"error"}
    assert ch.call("GET", "vmm.ping")[0] == 200  # the VMM itself is unharmed


@pytest.mark.parametrize("path", ["/api/v1/vm.no-such-endpoint", "/api/v2/vm.info", "/"])
def test_unknown_path(ch: Ch, path: str):
    """| unknown path | 404 | same |"""
    status, body = raw(ch.socket, "GET", path)
    assert status == 404
    assert json.loads(body) == ["Not Found"]


def test_shutdown_then_info(ch: Ch):
    """| shutdown then info | 204, then state `Created` | same |"""
    ch.boot()
    assert ch.put("vm.shutdown") == (204, None)
    assert ch.info()["state"] == "Created"
    assert ch.vcpu_threads() == 0


@pytest.mark.parametrize("payload", [None, {}, {"kernel": "/nonexistent/chscale/vmlinux"}])
def test_boot_with_no_payload_or_a_missing_kernel(ch: Ch, payload: dict[str, str] | None):
    """| boot with no payload / a kernel path that does not exist | 500 (config validated,
    kernel opened at boot) | same |"""
    config = ch.config()
    if payload is None:
        del config["payload"]
    else:
        config["payload"] = payload
    assert ch.put("vm.create", config) == (204, None)
    status, answer = ch.put("vm.boot")
    assert status == 500
    chain_end(answer)
    assert ch.info()["state"] == "Created"


# ---- the notes under the table ---------------------------------------------------------------


def test_status_codes_seen_are_only_the_six(ch: Ch):
    """ "Status codes seen: only 200, 204, 400, 404, 429, 500." (``Ch.call`` asserts it on
    every answer; this walks the API through each of them.)"""
    seen = set()
    for method, endpoint, body in [
        ("GET", "vmm.ping", None),
        ("GET", "vm.info", None),
        ("PUT", "vm.pause", None),
        ("PUT", "vm.create", ch.config()),
        ("PUT", "vm.boot", None),
        ("PUT", "vm.resize", {"desired_vcpus": 2}),
        ("PUT", "vm.resize", {"desired_vcpus": 3}),
        ("PUT", "vm.resize", {"desired_ram": BOOT_MEMORY + 1 * MIB}),
        ("GET", "vm.nope", None),
        ("PUT", "vm.boot", {}),
    ]:
        seen.add(ch.call(method, endpoint, body)[0])
    assert seen == STATUSES


def test_vmm_shutdown_makes_the_process_exit_0(ch: Ch):
    """ "The VMM can exit on its own (a guest fault, its seccomp filter,
    `vmm.shutdown`)." — vmm.shutdown answers 200 and the process exits with status 0."""
    ch.boot()
    assert ch.put("vmm.shutdown")[0] == 200
    assert ch.vmm.proc.wait(timeout=10) == 0
    assert not os.path.exists(ch.socket)


# ---- the HTTP layer under the table (micro_http, from its source) ---------------------------


def exchange(sock: str, request: bytes, count: int) -> list[tuple[bytes, bytes, bytes]]:
    """Send ``request`` (one or more requests) and read ``count`` answers, framed by their
    Content-Length: (status line, header block, body) each."""
    answers: list[tuple[bytes, bytes, bytes]] = []
    buffer = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(sock)
        conn.sendall(request)
        while len(answers) < count:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buffer[:head_end]
                status_line, _, header_block = head.partition(b"\r\n")
                match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", header_block)
                length = int(match.group(1)) if match else 0
                end = head_end + 4 + length
                if len(buffer) >= end:
                    answers.append((status_line, header_block, buffer[head_end + 4 : end]))
                    buffer = buffer[end:]
                    continue
            chunk = conn.recv(65536)
            assert chunk, f"the VMM closed the connection after {len(answers)} answers"
            buffer += chunk
    return answers


def test_answers_are_framed_as_micro_http_frames_them(ch: Ch):
    """No reason phrase; Server "Cloud Hypervisor API"; Content-Type and Content-Length
    on every answer but a 204, which has neither; the connection kept open."""
    config = json.dumps(ch.config()).encode()
    request = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n"
    (pong,) = exchange(ch.socket, request, 1)
    assert pong[0] == b"HTTP/1.1 200 "
    assert b"Server: Cloud Hypervisor API" in pong[1].split(b"\r\n")
    assert b"Content-Type: application/json" in pong[1].split(b"\r\n")
    request = b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
        len(config),
        config,
    )
    (created,) = exchange(ch.socket, request, 1)
    assert created[0] == b"HTTP/1.1 204 "
    assert b"content-type" not in created[1].lower()
    assert b"content-length" not in created[1].lower()


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Type: text/xml\r\nAccept: text/html",
        "Content-Type: application/x-www-form-urlencoded\r\nAccept: */*",
        "Accept: text/plain",
        "Transfer-Encoding: gzip",
        "Expect: 200-ok",
    ],
)
def test_content_type_and_accept_never_change_an_answer(ch: Ch, headers: str):
    """Values micro_http does not support for these headers are ignored: the body is
    still read as JSON and the answer is still JSON."""
    ch.boot()
    body = b'{"desired_vcpus": 5}'
    request = (
        f"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    request += f"GET /api/v1/vm.info HTTP/1.1\r\n{headers}\r\n\r\n".encode()
    resized, info = exchange(ch.socket, request, 2)
    assert resized[0] == b"HTTP/1.1 204 "
    assert info[0] == b"HTTP/1.1 200 "
    assert b"Content-Type: application/json" in info[1].split(b"\r\n")
    assert json.loads(info[2])["config"]["cpus"]["boot_vcpus"] == 5


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /api/v1/vmm.ping HTTP/1.1\r\nNoColonHere\r\n\r\n", id="no-colon"),
        pytest.param(
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", id="bad-length"
        ),
        pytest.param(b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", id="http-2"),
        pytest.param(b"get /api/v1/vmm.ping HTTP/1.1\r\n\r\n", id="lowercase-method"),
        pytest.param(b"POST /api/v1/vm.boot HTTP/1.1\r\n\r\n", id="post"),
        pytest.param(
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nAccept-Encoding: identity;q=0\r\n\r\n",
            id="no-identity",
        ),
        pytest.param(
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 51201\r\n\r\n", id="too-big"
        ),
    ],
)
def test_requests_micro_http_cannot_parse(ch: Ch, request_bytes: bytes):
    """A request line or header micro_http refuses: its own 400 `{"error": ...}`, and the
    connection closed."""
    status_line, _, body = http_answer(ch.socket, request_bytes)
    assert status_line.split()[1] == b"400"
    assert set(json.loads(body, strict=False)) == {"error"}
    assert ch.call("GET", "vmm.ping")[0] == 200


def test_expect_100_continue(ch: Ch):
    """Expect: 100-continue gets an interim 100 before the answer."""
    ch.boot()
    body = b'{"desired_vcpus": 5}'
    request = (
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    interim, answer = exchange(ch.socket, request, 2)
    assert (interim[0], answer[0]) == (b"HTTP/1.1 100 ", b"HTTP/1.1 204 ")
    assert ch.boot_vcpus() == 5
