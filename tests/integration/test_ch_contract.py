"""One contract for Cloud Hypervisor's API, run through the client against every target.

Targets: the simulator process (always) and a real ``cloud-hypervisor`` binary when
``CHSCALE_CH_BINARY`` names one and /dev/kvm is usable (``CHSCALE_CH_KERNEL`` is then
required; ``CHSCALE_CH_INITRAMFS`` and ``CHSCALE_CH_CMDLINE`` are optional). The guest
kernel must support vCPU hot-unplug and virtio-mem for the resize cases.

These tests start processes but need no Kubernetes control plane. At the end, a few
simulator-only cases cover its knobs (old API versions, faults, hangs).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import (
    VmmBusy,
    VmmError,
    VmmUnreachable,
    VmNotCreated,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20
BOOT_MEMORY = 512 * MIB
REGION = 512 * MIB  # a multiple of 128 MiB, as virtio-mem requires
BOOT_VCPUS, MAX_VCPUS = 2, 4
REPO = Path(__file__).resolve().parents[2]
# Liveness bounds for the guest's asynchronous work (a real guest is slower than the sim).
GUEST_DEADLINE_S = 60.0
START_DEADLINE_S = 20.0
POLL_S = 0.05


@attrs.frozen
class Target:
    name: str
    argv: Callable[[str], list[str]]
    payload: dict[str, str]
    # The simulator's guest takes a known time to eject vCPUs, so 429 is certain there.
    slow_eject: bool


def _sim_argv(sock: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "testbed.chsim.main",
        "--api-socket",
        f"path={sock}",
        "--sim-eject-delay",
        "0.5",
        "--sim-plug-rate",
        "1G",
        "--sim-name",
        "contract",
    ]


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _real_target() -> Target | str:
    binary = os.environ.get("CHSCALE_CH_BINARY")
    if not binary:
        return "CHSCALE_CH_BINARY is not set"
    if not (os.access(binary, os.X_OK) or shutil.which(binary)):
        return f"CHSCALE_CH_BINARY={binary} is not an executable"
    if not _kvm_usable():
        return "/dev/kvm is missing or not read/writable by this user"
    kernel = os.environ.get("CHSCALE_CH_KERNEL")
    if not kernel:
        return "CHSCALE_CH_KERNEL is not set (a guest kernel is needed to boot)"
    payload = {"kernel": kernel}
    for key, env in (("initramfs", "CHSCALE_CH_INITRAMFS"), ("cmdline", "CHSCALE_CH_CMDLINE")):
        if os.environ.get(env):
            payload[key] = os.environ[env]
    return Target(
        name="cloud-hypervisor",
        argv=lambda sock: [binary, "--api-socket", f"path={sock}"],
        payload=payload,
        slow_eject=False,
    )


# The simulator opens the kernel at boot, as Cloud Hypervisor does, but never reads it:
# sim_target() points it at an empty file in the test's directory.
SIM = Target(name="sim", argv=_sim_argv, payload={}, slow_eject=True)


def sim_target(workdir: Path) -> Target:
    kernel = workdir / "vmlinux"
    kernel.touch()
    return attrs.evolve(SIM, payload={"kernel": str(kernel)})


def _targets() -> list[Any]:
    real = _real_target()
    return [
        pytest.param(SIM, id="sim"),
        pytest.param(
            real,
            id="cloud-hypervisor",
            marks=pytest.mark.skip(reason=real) if isinstance(real, str) else (),
        ),
    ]


@attrs.define
class Vmm:
    target: Target
    proc: subprocess.Popen[bytes]
    socket: str
    client: CloudHypervisorClient

    def config(self, boot: int = BOOT_VCPUS, top: int = MAX_VCPUS) -> dict[str, Any]:
        return {
            "cpus": {"boot_vcpus": boot, "max_vcpus": top},
            "memory": {
                "size": BOOT_MEMORY,
                "hotplug_method": "VirtioMem",
                "hotplug_size": REGION,
            },
            "payload": dict(self.target.payload),
            "serial": {"mode": "Null"},
            "console": {"mode": "Off"},
        }

    def boot(self, **kwargs: Any) -> None:
        self.client.create(self.config(**kwargs))
        self.client.boot()


def start(target: Target, sock: str, log_path: Path, argv: list[str] | None = None) -> Any:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv or target.argv(sock),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = CloudHypervisorClient(sock, timeout=5.0)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{target.name} exited with {proc.returncode}: {log_path}")
        try:
            client.ping()
            return proc, client
        except VmmUnreachable:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{target.name} did not answer on {sock}") from None
            time.sleep(POLL_S)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="chc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=_targets())
def vmm(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Vmm]:
    target: Target = request.param
    if target is SIM:
        target = sim_target(workdir)
    sock = str(workdir / "api.sock")
    proc, client = start(target, sock, workdir / "vmm.log")
    try:
        yield Vmm(target, proc, sock, client)
    finally:
        client.close()
        stop(proc)


def wait_for(what: str, check: Callable[[], bool], deadline_s: float = GUEST_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def raw(sock: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request the client would never send (a body on an action endpoint, bad JSON)."""
    conn = _UnixConnection(sock)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_bytes(sock: str, request: bytes) -> bytes:
    """Send hand-framed bytes, return everything the server answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(sock)
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ---- the contract ------------------------------------------------------------------------


def test_ping(vmm: Vmm):
    pong = vmm.client.ping()
    assert pong.version
    assert pong.pid == vmm.proc.pid


def test_create_then_boot(vmm: Vmm):
    with pytest.raises(VmNotCreated):
        vmm.client.info()
    with pytest.raises(VmNotCreated):
        vmm.client.boot()
    with pytest.raises(VmNotCreated):
        vmm.client.resize(desired_vcpus=2)
    vmm.client.create(vmm.config())
    assert vmm.client.info().state == "Created"
    with pytest.raises(VmmError):
        vmm.client.create(vmm.config())
    vmm.client.boot()
    assert vmm.client.info().state == "Running"


@pytest.mark.parametrize("action", ["pause", "resume", "shutdown"])
def test_actions_without_a_booted_vm_are_500_not_404(vmm: Vmm, action: str):
    """No VM object is Cloud Hypervisor's VmNotRunning, a 500 in every version: only
    info, resize and boot say "not created" (404 from v53)."""
    for create in (False, True):
        if create:
            vmm.client.create(vmm.config())
        with pytest.raises(VmmError) as caught:
            getattr(vmm.client, action)()
        assert caught.value.status == 500
        assert not isinstance(caught.value, VmNotCreated)
        assert "not running" in caught.value.chain[-1]


def test_config_values_are_checked_at_boot(vmm: Vmm):
    config = vmm.config()
    config["memory"]["hotplug_size"] = 100 * MIB  # virtio-mem needs 128 MiB multiples
    vmm.client.create(config)
    with pytest.raises(VmmError) as caught:
        vmm.client.boot()
    assert caught.value.status == 500
    assert vmm.client.info().state == "Created"


def test_info_shape(vmm: Vmm):
    vmm.boot()
    body = vmm.client.info_raw()
    assert body["state"] == "Running"
    cpus, memory = body["config"]["cpus"], body["config"]["memory"]
    assert (cpus["boot_vcpus"], cpus["max_vcpus"]) == (BOOT_VCPUS, MAX_VCPUS)
    assert memory["size"] == BOOT_MEMORY
    assert memory["hotplug_size"] == REGION
    assert memory["hotplug_method"] == "VirtioMem"
    assert memory.get("hotplugged_size") in (None, 0)
    info = vmm.client.info()
    assert info.config.cpus.boot_vcpus == BOOT_VCPUS
    assert info.config.memory.size == BOOT_MEMORY
    assert info.guest_memory == BOOT_MEMORY


@pytest.mark.parametrize("desired", [0, MAX_VCPUS + 1])
def test_vcpus_out_of_bounds_are_refused(vmm: Vmm, desired: int):
    vmm.boot()
    with pytest.raises(VmmError) as caught:
        vmm.client.resize(desired_vcpus=desired)
    assert caught.value.status >= 400
    assert vmm.client.info().config.cpus.boot_vcpus == BOOT_VCPUS


def test_grow_vcpus(vmm: Vmm):
    vmm.boot()
    vmm.client.resize(desired_vcpus=MAX_VCPUS)
    assert vmm.client.info().config.cpus.boot_vcpus == MAX_VCPUS


def test_shrink_vcpus_is_busy_until_the_guest_ejects(vmm: Vmm):
    vmm.boot(boot=MAX_VCPUS)
    vmm.client.resize(desired_vcpus=1)
    assert vmm.client.info().config.cpus.boot_vcpus == 1
    try:
        vmm.client.resize(desired_vcpus=3)
        busy = False
    except VmmBusy as exc:
        busy = True
        assert exc.status == 429
    if vmm.target.slow_eject:
        assert busy, "a count change while vCPUs await ejection must be 429"

    def accepted() -> bool:
        try:
            vmm.client.resize(desired_vcpus=3)
            return True
        except VmmBusy:
            return False

    wait_for("the guest to eject the removed vCPUs", accepted)
    assert vmm.client.info().config.cpus.boot_vcpus == 3


def test_grow_memory_then_the_guest_plugs_it(vmm: Vmm):
    vmm.boot()
    target = BOOT_MEMORY + 256 * MIB
    vmm.client.resize(desired_ram=target)
    assert vmm.client.info().config.memory.hotplugged_size == 256 * MIB
    wait_for("virtio-mem to plug 256 MiB", lambda: vmm.client.info().guest_memory == target)


def test_shrink_memory_back_to_the_boot_size(vmm: Vmm):
    vmm.boot()
    vmm.client.resize(desired_ram=BOOT_MEMORY + 256 * MIB)
    wait_for("virtio-mem to plug", lambda: vmm.client.info().guest_memory > BOOT_MEMORY)
    vmm.client.resize(desired_ram=BOOT_MEMORY)
    # Cloud Hypervisor stores no hotplugged_size (null, or absent from v53), not 0.
    assert vmm.client.info_raw()["config"]["memory"].get("hotplugged_size") is None
    assert vmm.client.info().config.memory.hotplugged_size is None
    wait_for("virtio-mem to unplug", lambda: vmm.client.info().guest_memory == BOOT_MEMORY)


def test_identical_memory_request_is_500(vmm: Vmm):
    vmm.boot()
    vmm.client.resize(desired_ram=BOOT_MEMORY + 128 * MIB)
    with pytest.raises(VmmError) as caught:
        vmm.client.resize(desired_ram=BOOT_MEMORY + 128 * MIB)
    assert caught.value.status == 500


@pytest.mark.parametrize(
    "desired",
    [
        pytest.param(BOOT_MEMORY + 1 * MIB, id="not-2MiB-multiple"),
        pytest.param(BOOT_MEMORY + REGION + 2 * MIB, id="above-region"),
        pytest.param(BOOT_MEMORY - 2 * MIB, id="below-boot"),
    ],
)
def test_memory_out_of_bounds_is_refused(vmm: Vmm, desired: int):
    vmm.boot()
    with pytest.raises(VmmError) as caught:
        vmm.client.resize(desired_ram=desired)
    assert caught.value.status == 500
    assert vmm.client.info().config.memory.hotplugged_size in (None, 0)


def test_cpu_part_sticks_when_the_memory_part_fails(vmm: Vmm):
    vmm.boot()
    with pytest.raises(VmmError):
        vmm.client.resize(desired_vcpus=3, desired_ram=BOOT_MEMORY + 1 * MIB)
    assert vmm.client.info().config.cpus.boot_vcpus == 3


@pytest.mark.parametrize("endpoint", ["vm.pause", "vm.shutdown", "vm.boot", "vm.resume"])
def test_body_on_an_action_endpoint_is_400(vmm: Vmm, endpoint: str):
    vmm.boot()
    status, _ = raw(vmm.socket, "PUT", f"/api/v1/{endpoint}", b"{}")
    assert status == 400
    assert vmm.client.info().state == "Running"


@pytest.mark.parametrize("endpoint", ["vm.resize", "vm.create"])
def test_malformed_json_is_400(vmm: Vmm, endpoint: str):
    vmm.boot()
    status, _ = raw(vmm.socket, "PUT", f"/api/v1/{endpoint}", b"{not json")
    assert status == 400


def test_keep_alive_serves_several_requests_on_one_connection(vmm: Vmm):
    vmm.boot()
    conn = _UnixConnection(vmm.socket)
    try:
        for method, path, status in [
            ("PUT", "/api/v1/vm.pause", 204),
            ("GET", "/api/v1/vm.info", 200),
            ("PUT", "/api/v1/vm.resume", 204),
            ("GET", "/api/v1/vm.nope", 404),
            ("GET", "/api/v1/vmm.ping", 200),
        ]:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == status, (method, path, body)
            if status == 204:
                assert body == b""
            else:
                json.loads(body)
    finally:
        conn.close()


def test_unknown_path_is_404(vmm: Vmm):
    status, body = raw(vmm.socket, "GET", "/api/v1/vm.no-such-endpoint")
    assert status == 404
    assert json.loads(body) == ["Not Found"]


@pytest.mark.parametrize(
    ("method", "endpoint"),
    [("GET", "vm.resize"), ("PUT", "vm.info"), ("PUT", "vmm.ping"), ("GET", "vm.boot")],
)
def test_wrong_method_is_400(vmm: Vmm, method: str, endpoint: str):
    """Cloud Hypervisor answers a method an endpoint does not serve with 400 ["Bad
    Request"], not 405."""
    vmm.boot()
    status, body = raw(vmm.socket, method, f"/api/v1/{endpoint}")
    assert status == 400
    assert json.loads(body) == ["Bad Request"]
    assert vmm.client.info().state == "Running"


def test_resize_while_paused(vmm: Vmm):
    vmm.boot()
    vmm.client.pause()
    assert vmm.client.info().state == "Paused"
    target = BOOT_MEMORY + 128 * MIB
    vmm.client.resize(desired_vcpus=3, desired_ram=target)
    paused = vmm.client.info()
    assert paused.state == "Paused"
    assert paused.config.cpus.boot_vcpus == 3
    assert paused.config.memory.hotplugged_size == 128 * MIB
    with pytest.raises(VmmError):
        vmm.client.pause()
    vmm.client.resume()
    assert vmm.client.info().state == "Running"
    wait_for("virtio-mem to plug after resume", lambda: vmm.client.info().guest_memory == target)


def test_shutdown_then_boot_again(vmm: Vmm):
    vmm.boot()
    vmm.client.shutdown()
    # Cloud Hypervisor drops the VM object and shows its kept config as Created.
    assert vmm.client.info().state == "Created"
    with pytest.raises(VmmError):
        vmm.client.resume()
    vmm.client.boot()
    assert vmm.client.info().state == "Running"


def test_sigterm_removes_the_socket(vmm: Vmm):
    vmm.boot()
    vmm.proc.send_signal(signal.SIGTERM)
    vmm.proc.wait(timeout=10)
    assert vmm.proc.returncode == 0
    assert not os.path.exists(vmm.socket)
    if vmm.target.name == SIM.name:  # Cloud Hypervisor leaves its <socket>.lock file behind
        assert not os.path.exists(vmm.socket + ".lock")
    with pytest.raises(VmmUnreachable):
        vmm.client.ping()


def test_vmm_shutdown_exits(vmm: Vmm):
    vmm.boot()
    vmm.client.shutdown_vmm()
    assert vmm.proc.wait(timeout=10) == 0
    with pytest.raises(VmmUnreachable):
        vmm.client.ping()


# ---- simulator only: the knobs ------------------------------------------------------------


@contextlib.contextmanager
def sim_argv(workdir: Path, argv: list[str]) -> Iterator[Vmm]:
    sock = str(workdir / "api.sock")
    proc, client = start(SIM, sock, workdir / "vmm.log", argv)
    try:
        yield Vmm(sim_target(workdir), proc, sock, client)
    finally:
        client.close()
        stop(proc)


def sim(workdir: Path, *flags: str) -> contextlib.AbstractContextManager[Vmm]:
    sock = str(workdir / "api.sock")
    return sim_argv(workdir, [*_sim_argv(sock), *flags])


def test_sim_boots_from_its_command_line(workdir: Path):
    flags = [
        "--kernel",
        sim_target(workdir).payload["kernel"],
        "--cpus",
        "boot=2,max=6",
        "--memory",
        "size=1G,hotplug_method=virtio-mem,hotplug_size=2G",
    ]
    with sim(workdir, *flags) as vmm:
        info = vmm.client.info()
        assert info.state == "Running"
        assert (info.config.cpus.boot_vcpus, info.config.cpus.max_vcpus) == (2, 6)
        assert (info.config.memory.size, info.config.memory.hotplug_size) == (1 << 30, 2 << 30)


def test_sim_refuses_a_region_not_multiple_of_128mib(workdir: Path):
    sock = str(workdir / "api.sock")
    argv = [
        *_sim_argv(sock),
        "--kernel",
        sim_target(workdir).payload["kernel"],
        "--memory",
        "size=1G,hotplug_method=virtio-mem,hotplug_size=100M",
    ]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30, check=False)
    assert result.returncode != 0
    assert b"128 MiB" in result.stderr
    assert not os.path.exists(sock)


@pytest.mark.parametrize(
    ("kernel", "message"),
    [(None, b"No kernel or firmware"), ("missing-vmlinux", b"Cannot open the kernel image")],
)
def test_sim_command_line_vm_needs_a_kernel_that_opens(
    workdir: Path, kernel: str | None, message: bytes
):
    sock = str(workdir / "api.sock")
    argv = [*_sim_argv(sock), "--cpus", "boot=1"]
    if kernel:
        argv += ["--kernel", str(workdir / kernel)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30, check=False)
    assert result.returncode == 1
    assert message in result.stderr


@pytest.mark.parametrize(("version", "plain"), [(46, True), (51, False)])
def test_sim_old_versions_report_not_created_as_500(workdir: Path, version: int, plain: bool):
    with sim(workdir, "--sim-api-version", str(version)) as vmm:
        status, body = raw(vmm.socket, "GET", "/api/v1/vm.info")
        assert status == 500
        if plain:
            assert not body.startswith(b"[")
        else:
            assert isinstance(json.loads(body), list)
        with pytest.raises(VmNotCreated) as caught:
            vmm.client.info()
        assert caught.value.status == 500
        with pytest.raises(VmNotCreated):
            vmm.client.boot()  # "VM config is missing"
        vmm.boot()
        # Before v52 memory_actual_size is the requested size, plugged or not.
        target = BOOT_MEMORY + 128 * MIB
        vmm.client.resize(desired_ram=target)
        assert vmm.client.info().memory_actual_size == target
        # Optional fields are null before v53, and the client reads them the same.
        vmm.client.resize(desired_ram=BOOT_MEMORY)
        assert vmm.client.info_raw()["config"]["memory"]["hotplugged_size"] is None
        assert vmm.client.info().config.memory.hotplugged_size is None


def test_sim_can_leave_memory_actual_size_out(workdir: Path):
    with sim(workdir, "--sim-omit-memory-actual-size", "--sim-plug-rate", "0") as vmm:
        vmm.boot()
        vmm.client.resize(desired_ram=BOOT_MEMORY + 128 * MIB)
        info = vmm.client.info()
        assert info.memory_actual_size is None
        assert info.guest_memory == BOOT_MEMORY + 128 * MIB


def test_sim_accepts_a_bare_socket_path(workdir: Path):
    sock = str(workdir / "api.sock")
    argv = [*_sim_argv(sock)]
    argv[argv.index(f"path={sock}")] = sock
    with sim_argv(workdir, argv) as vmm:
        assert vmm.client.ping().pid == vmm.proc.pid


def test_sim_refuses_a_socket_another_vmm_serves(workdir: Path):
    with sim(workdir) as vmm:
        result = subprocess.run(
            _sim_argv(vmm.socket), cwd=REPO, capture_output=True, timeout=30, check=False
        )
        assert result.returncode == 1
        assert b"in use" in result.stderr
        assert vmm.client.ping().pid == vmm.proc.pid


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ],
    ids=["bad-content-length", "chunked", "garbage"],
)
def test_sim_answers_bad_framing_with_400_and_closes(workdir: Path, request_bytes: bytes):
    with sim(workdir) as vmm:
        answer = raw_bytes(vmm.socket, request_bytes)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
        assert vmm.client.ping().pid == vmm.proc.pid


def test_sim_error_rate_one_fails_every_resize(workdir: Path):
    with sim(workdir, "--sim-error-rate", "1", "--sim-error-seed", "7") as vmm:
        vmm.boot()
        with pytest.raises(VmmError) as caught:
            vmm.client.resize(desired_vcpus=3)
        assert caught.value.status == 500
        assert "injected" in caught.value.message
        assert vmm.client.info().config.cpus.boot_vcpus == BOOT_VCPUS


def test_sim_hang_makes_the_vmm_unreachable_by_timeout(workdir: Path):
    with sim(workdir) as vmm:
        vmm.proc.send_signal(signal.SIGUSR1)
        impatient = CloudHypervisorClient(vmm.socket, timeout=0.3)

        def hangs() -> bool:
            try:
                impatient.ping()
                return False
            except VmmUnreachable:
                return True

        wait_for("the simulator to hang", hangs, deadline_s=10)
        vmm.proc.send_signal(signal.SIGUSR1)
        wait_for("the simulator to answer again", lambda: not hangs(), deadline_s=10)
        impatient.close()


# ---- simulator only: the guest model's flags, through the process ---------------------------

FOREVER_S = 1.5  # seconds a test watches to see that something never happens


def sim_guest(vmm: Vmm) -> dict[str, int]:
    status, body = raw(vmm.socket, "GET", "/api/v1/sim.guest")
    assert status == 200, body
    return json.loads(body)


def test_sim_eject_delay_never_leaves_the_removal_pending(workdir: Path):
    with sim(workdir, "--sim-eject-delay", "never") as vmm:
        vmm.boot(boot=MAX_VCPUS)
        vmm.client.resize(desired_vcpus=2)
        deadline = time.monotonic() + FOREVER_S
        while time.monotonic() < deadline:
            with pytest.raises(VmmBusy):
                vmm.client.resize(desired_vcpus=2)
            time.sleep(0.1)
        assert sim_guest(vmm)["vcpus_online"] == MAX_VCPUS
        vmm.client.resize(desired_vcpus=MAX_VCPUS)  # the count still running: a 204
        assert vmm.client.info().config.cpus.boot_vcpus == MAX_VCPUS
        with pytest.raises(VmmBusy):
            vmm.client.resize(desired_vcpus=3)


def test_sim_plug_rate_never_plugs_nothing(workdir: Path):
    with sim(workdir, "--sim-plug-rate", "never") as vmm:
        vmm.boot()
        vmm.client.resize(desired_ram=BOOT_MEMORY + 256 * MIB)
        time.sleep(FOREVER_S)
        info = vmm.client.info()
        assert info.config.memory.hotplugged_size == 256 * MIB
        assert info.memory_actual_size == BOOT_MEMORY
        assert sim_guest(vmm)["memory_held"] == BOOT_MEMORY


def test_sim_unplug_limit_stops_the_unplug_there(workdir: Path):
    with sim(workdir, "--sim-plug-rate", "0", "--sim-unplug-limit", "128Mi") as vmm:
        vmm.boot()
        vmm.client.resize(desired_ram=BOOT_MEMORY + 512 * MIB)
        vmm.client.resize(desired_ram=BOOT_MEMORY)
        time.sleep(FOREVER_S)
        assert vmm.client.info().memory_actual_size == BOOT_MEMORY + 384 * MIB
        assert sim_guest(vmm)["memory_held"] == BOOT_MEMORY + 384 * MIB


@pytest.mark.parametrize(
    ("version", "below_boot_status"), [("50", 204), ("51", 204), ("52", 500), ("53", 500)]
)
def test_sim_api_version_below_boot(workdir: Path, version: str, below_boot_status: int):
    with sim(workdir, "--sim-api-version", version, "--sim-plug-rate", "0") as vmm:
        assert vmm.client.ping().build_version == f"v{version}.0"
        vmm.boot()
        vmm.client.resize(desired_ram=BOOT_MEMORY + 256 * MIB)
        status, _ = raw(
            vmm.socket, "PUT", "/api/v1/vm.resize", b'{"desired_ram": %d}' % (BOOT_MEMORY - 2 * MIB)
        )
        assert status == below_boot_status
        if below_boot_status == 204:
            assert vmm.client.info().config.memory.hotplugged_size is None
            assert sim_guest(vmm)["memory_held"] == BOOT_MEMORY + 256 * MIB
            with pytest.raises(VmmError) as caught:
                vmm.client.resize(desired_ram=BOOT_MEMORY + 256 * MIB)
            assert caught.value.status == 500


def test_sim_guest_and_vmm_overhead(workdir: Path):
    with sim(workdir, "--sim-vmm-overhead", "100Mi", "--sim-plug-rate", "0") as vmm:
        assert sim_guest(vmm) == {"memory_held": 0, "vcpus_online": 0, "rss": 100 * MIB}
        vmm.boot()
        vmm.client.resize(desired_ram=BOOT_MEMORY + 128 * MIB)
        assert sim_guest(vmm) == {
            "memory_held": BOOT_MEMORY + 128 * MIB,
            "vcpus_online": BOOT_VCPUS,
            "rss": BOOT_MEMORY + 228 * MIB,
        }


def test_sim_guest_default_overhead_is_64mib(workdir: Path):
    with sim(workdir) as vmm:
        assert sim_guest(vmm)["rss"] == 64 * MIB


@pytest.mark.parametrize("code", [0, 3, 137])
def test_sim_exit_makes_the_process_exit_with_the_code(workdir: Path, code: int):
    with sim(workdir) as vmm:
        vmm.boot()
        status, _ = raw(vmm.socket, "PUT", "/api/v1/sim.exit", b'{"code": %d}' % code)
        assert status == 204
        assert vmm.proc.wait(timeout=10) == code
        # A crash cleans nothing up: the socket file stays, and nobody answers on it.
        assert os.path.exists(vmm.socket)
        with pytest.raises(VmmUnreachable):
            vmm.client.ping()


def test_sim_rust_backtrace_makes_500s_long(workdir: Path):
    with sim(workdir, "--sim-rust-backtrace") as vmm:
        vmm.boot()
        with pytest.raises(VmmError) as caught:
            vmm.client.resize(desired_vcpus=MAX_VCPUS + 1)
        assert caught.value.status == 500
        assert "Stack backtrace" in caught.value.chain[-1]
        assert caught.value.chain[-1].count("\n") > 20
