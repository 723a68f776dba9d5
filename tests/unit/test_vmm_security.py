"""Attacks on the node daemon's VMM client (issue 17, items 1 and 5), on loopback Unix
sockets under a temporary pods root.

Item 5: a VMM that dribbles its answer, or answers 96 MiB, must not hold or bloat a
worker. Item 1: a tenant who can write its own pod's ``vmm`` emptyDir must not steer the
daemon to another pod's VMM (symlinks, directory symlinks, hard links, non-sockets).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.cloudhypervisor.client import CloudHypervisorClient
from adapters.cloudhypervisor.errors import (
    CloudHypervisorError,
    ResponseTooLarge,
    VmmIdentityMismatch,
    VmmSocketRefused,
    VmmUnreachable,
    VmmUntrusted,
)
from apps.daemon.vmm import BootDefaults, Vmm
from core import (
    VMM_REACHABLE,
    VMM_TRUSTED,
    Allocation,
    BootVmm,
    ConditionStatus,
    Owner,
    Phase,
    PodView,
    RecordEvent,
    ResizeRecord,
    ResizeVmm,
    Resources,
    SetCondition,
    Step,
    Vm,
    VmmState,
    VmmView,
    VmSpec,
    VmStatus,
    apply_status,
    decide,
    owned_by,
)
from core.constants import GiB, MiB
from core.podlayout import POD_UID_ENV, vmm_socket_dir, vmm_socket_path

VICTIM, TENANT = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


# --- item 5: one deadline per call, bounded bodies --------------------------------------


@contextlib.contextmanager
def serving(path: str, answer: Callable[[socket.socket], None]) -> Iterator[None]:
    """A Unix server at ``path`` that runs ``answer`` on each connection (in a thread)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    stop = threading.Event()

    def loop() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=_answer, args=(conn,), daemon=True).start()

    def _answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.recv(65536)  # the request (small, one read is enough here)
            answer(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def _dribble(conn: socket.socket) -> None:
    body = b'{"state": "Running", "pad": "' + b"x" * 200 + b'"}'
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    for byte in body:  # bounded: one byte each 20 ms, about 5 s in all
        conn.sendall(bytes([byte]))
        time.sleep(0.02)


def test_a_dribbling_vmm_is_cut_off_at_the_call_deadline(tmp_path: Path) -> None:
    path = str(tmp_path / "ch.sock")
    with serving(path, _dribble):
        client = CloudHypervisorClient(path, timeout=0.5)
        # Every byte comes well inside a per-read timeout, so only a deadline for the
        # whole call ends this before the body is complete (about 5 s).
        with pytest.raises(VmmUnreachable, match=r"within 0\.5s"):
            client.info_raw()


def _huge_declared(conn: socket.socket) -> None:
    size = 96 * MiB
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = b"{" + b" " * (MiB - 1)
    for _ in range(96):  # bounded; ends when the client hangs up
        conn.sendall(chunk)


def _huge_unframed(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    for _ in range(96):
        conn.sendall(b" " * MiB)


def _huge_chunked(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(96):
        conn.sendall(b"100000\r\n" + b" " * MiB + b"\r\n")
    conn.sendall(b"0\r\n\r\n")


@pytest.mark.parametrize("answer", [_huge_declared, _huge_unframed, _huge_chunked])
def test_a_96_mib_vm_info_is_refused_not_buffered(
    tmp_path: Path, answer: Callable[[socket.socket], None]
) -> None:
    path = str(tmp_path / "ch.sock")
    with serving(path, answer):
        client = CloudHypervisorClient(path, timeout=20.0, max_body_bytes=1 * MiB)
        with pytest.raises(ResponseTooLarge, match="limit"):
            client.info_raw()


def test_an_answer_within_the_limits_is_read(tmp_path: Path) -> None:
    path = str(tmp_path / "ch.sock")

    def small(conn: socket.socket) -> None:
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"state": "ok"}')

    with serving(path, small):
        assert CloudHypervisorClient(path, timeout=2.0).info_raw() == {"state": "ok"}


# --- item 1: the pod's own directory, the pod's own VMM ---------------------------------


def daemon_client(root: str, uid: str) -> CloudHypervisorClient:
    """The client exactly as the daemon builds it for pod ``uid`` (apps/daemon/main.py)."""
    return CloudHypervisorClient.for_pod(root, uid, timeout=2.0)


@contextlib.contextmanager
def pod_vmm(root: Path, uid: str, env_uid: str | None = None) -> Iterator[str]:
    """The Cloud Hypervisor simulator as pod ``uid``'s VMM, its environment naming
    ``env_uid`` (the pod's own uid unless told otherwise)."""
    directory = Path(vmm_socket_dir(str(root), uid))
    directory.mkdir(parents=True, exist_ok=True)
    sock = vmm_socket_path(str(root), uid)
    env = {**os.environ, POD_UID_ENV: env_uid or uid}
    kernel = root / "vmlinux"  # the VMM opens its kernel at boot; an empty file will do
    kernel.touch()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed.chsim.main",
            "--api-socket",
            f"path={sock}",
            "--cpus",
            "boot=2,max=4",
            "--memory",
            "size=1G",
            "--kernel",
            str(kernel),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, "the simulator exited"
            assert time.monotonic() < deadline, "the simulator did not listen"
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def _victim_vcpus(sock: str) -> int:
    return CloudHypervisorClient(sock, timeout=2.0).info().config.cpus.boot_vcpus


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: the pod's socket path under it must fit a Unix socket's 107 bytes.
    r = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    yield r
    shutil.rmtree(r, ignore_errors=True)


def _tenant_dir(root: Path) -> Path:
    d = Path(vmm_socket_dir(str(root), TENANT))
    d.mkdir(parents=True)
    return d


def test_the_pods_own_vmm_is_reached(root: Path) -> None:
    with pod_vmm(root, VICTIM):
        client = daemon_client(str(root), VICTIM)
        assert client.info().config.cpus.boot_vcpus == 2
        client.resize(desired_vcpus=3)
        assert client.info().config.cpus.boot_vcpus == 3


def _attack(root: Path, victim_sock: str, expected: type[CloudHypervisorError]) -> None:
    client = daemon_client(str(root), TENANT)
    before = _victim_vcpus(victim_sock)
    with pytest.raises(expected):
        client.info()
    with pytest.raises(expected):
        client.resize(desired_vcpus=4)
    assert _victim_vcpus(victim_sock) == before  # no call reached the victim


def test_a_symlinked_socket_is_refused(root: Path) -> None:
    with pod_vmm(root, VICTIM) as victim:
        (_tenant_dir(root) / "ch.sock").symlink_to(victim)
        _attack(root, victim, VmmSocketRefused)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_a_symlinked_directory_below_the_root_is_refused(root: Path, level: int) -> None:
    with pod_vmm(root, VICTIM) as victim:
        victim_parts = Path(victim).parent.relative_to(root).parts
        # The tenant's path, from its pod dir down to vmm/, with one component swapped for
        # a symlink to the victim's same component.
        tenant = Path(root, TENANT, *victim_parts[1 : 1 + level])
        tenant.parent.mkdir(parents=True, exist_ok=True)
        target = Path(root, *victim_parts[: 1 + level])
        tenant.symlink_to(target, target_is_directory=True)
        _attack(root, victim, VmmSocketRefused)


def test_a_hard_link_to_another_pods_socket_fails_the_identity_check(root: Path) -> None:
    with pod_vmm(root, VICTIM) as victim:
        os.link(victim, _tenant_dir(root) / "ch.sock")
        _attack(root, victim, VmmIdentityMismatch)


def test_a_vmm_claiming_another_pod_is_refused(root: Path) -> None:
    with pod_vmm(root, TENANT, env_uid=VICTIM) as sock:
        with pytest.raises(VmmIdentityMismatch, match=TENANT):
            daemon_client(str(root), TENANT).info()
        assert _victim_vcpus(sock) == 2


@pytest.mark.parametrize("kind", ["file", "fifo", "dir"])
def test_anything_but_a_socket_is_refused(root: Path, kind: str) -> None:
    target = _tenant_dir(root) / "ch.sock"
    if kind == "file":
        target.write_text("HTTP/1.1 200 OK\r\n\r\n")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with pytest.raises(VmmSocketRefused, match="not a socket"):
        daemon_client(str(root), TENANT).info()


def test_an_unexpected_owner_is_refused(root: Path) -> None:
    with pod_vmm(root, VICTIM):
        client = CloudHypervisorClient.for_pod(
            str(root), VICTIM, timeout=2.0, owner_uid=os.getuid() + 1
        )
        with pytest.raises(VmmSocketRefused, match="owned by uid"):
            client.info()


def test_a_missing_socket_is_unreachable_not_untrusted(root: Path) -> None:
    _tenant_dir(root)
    with pytest.raises(VmmUnreachable) as caught:
        daemon_client(str(root), TENANT).info()
    assert not isinstance(caught.value, VmmUntrusted)


# --- what the daemon makes of it: a condition and an event of its own, never a call ----


def _untrusted_view(root: Path, victim: str) -> VmmView:
    (_tenant_dir(root) / "ch.sock").symlink_to(victim)
    return Vmm("unused", None, BootDefaults(), client=daemon_client(str(root), TENANT)).view()


def test_the_daemon_sees_a_redirected_socket_as_untrusted_not_unreachable(root: Path) -> None:
    with pod_vmm(root, VICTIM) as victim:
        view = _untrusted_view(root, victim)
    assert view.state is VmmState.UNTRUSTED, view
    assert "symlink" in (view.detail or "")


@pytest.mark.parametrize("phase", [Phase.SCHEDULED, Phase.RUNNING, Phase.RESIZE_IN_PROGRESS])
def test_an_untrusted_vmm_is_a_condition_and_one_event_never_a_call(phase: Phase) -> None:
    spec = VmSpec(1, 2, 1 * GiB, max_vcpus=4, max_memory=4 * GiB)
    record = ResizeRecord(vcpus=4, memory=1 * GiB, generation=2, step=Step.VMM)
    status = VmStatus(
        phase=phase,
        allocated=None if phase is Phase.SCHEDULED else Allocation(2, 1 * GiB),
        resize=record if phase is Phase.RESIZE_IN_PROGRESS else None,
    )
    vm = Vm("tenant-a", "vm-a", generation=2, spec=spec, status=status)
    held = Resources(4000, 1280 * MiB)
    pod = PodView("vm-vm-a", node_name="node-a", desired=held, actual=held, generation=3)
    vmm = VmmView(VmmState.UNTRUSTED, detail="/pods/x/vmm/ch.sock: is a symlink")
    first = owned_by(decide(vm, pod, vmm, now=1.0), Owner.DAEMON)
    assert not [a for a in first if isinstance(a, BootVmm | ResizeVmm)], first
    conditions = [a.condition for a in first if isinstance(a, SetCondition)]
    trusted = [c for c in conditions if c.type == VMM_TRUSTED]
    assert trusted and trusted[0].status is ConditionStatus.FALSE
    assert trusted[0].reason == "VMMUntrusted" and "symlink" in trusted[0].message
    assert not [c for c in conditions if c.type == VMM_REACHABLE]
    events = [a.reason for a in first if isinstance(a, RecordEvent)]
    assert events == ["VMMUntrusted"], events
    # Said once: the next look with the condition in place records no second event.
    again = vm.evolve(status=apply_status(vm.status, first))
    second = owned_by(decide(again, pod, vmm, now=2.0), Owner.DAEMON)
    assert not [a for a in second if isinstance(a, RecordEvent)], second
    assert not [a for a in second if isinstance(a, BootVmm | ResizeVmm)], second
