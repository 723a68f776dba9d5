"""The simulated kubelet's container runtime: one VMM process per pod.

Each pod's VMM is started with ``--api-socket path=<socket>`` at the path
:func:`core.podlayout.vmm_socket_path` gives, which is where the node daemon connects.
Its output goes to ``vmm.log`` next to the socket.

The memory usage the model's Error rule needs is what a real kubelet reads from the
pod's cgroup: what the VMM process holds, guest memory it has touched plus its own
overhead. The Cloud Hypervisor simulator tells it on its API socket
(``GET /api/v1/sim.guest`` -> ``{"memory_held", "vcpus_online", "rss"}``; ``rss`` is
the usage); a VMM that does not answer that (a real cloud-hypervisor) is measured by its
process's resident memory, ``VmRSS`` in ``/proc/<pid>/status``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import requests
import requests_unixsocket

from apps.common.logs import kv
from core.podlayout import POD_UID_ENV, vmm_socket_path

log = logging.getLogger(__name__)

# The default VMM: the Cloud Hypervisor simulator, which takes cloud-hypervisor's flags.
DEFAULT_VMM_COMMAND = (sys.executable, "-m", "testbed.chsim.main")
# sun_path holds 108 bytes including the terminating NUL (Linux).
MAX_SOCKET_PATH = 107
_UID_LENGTH = 36  # a Kubernetes UID is a UUID
STOP_GRACE_S = 5.0
INFO_TIMEOUT_S = 2.0
# The simulator's report of what its guest and its process hold (not a Cloud
# Hypervisor endpoint: the real one answers 404, and VmRSS is read instead).
SIM_GUEST_PATH = "/api/v1/sim.guest"


def read_vmrss(pid: int) -> int | None:
    """The resident memory of process ``pid`` in bytes, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    value, unit = line.split()[1:3]
                    return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no VmRSS line


def read_sim_guest(socket: str, timeout: float = INFO_TIMEOUT_S) -> dict[str, int] | None:
    """The simulator's ``sim.guest`` report, or None when the VMM does not give one
    (another status, not JSON, a field missing or not an integer, no answer)."""
    return _sim_guest(socket, timeout)[1]


def _sim_guest(socket: str, timeout: float) -> tuple[bool, dict[str, int] | None]:
    """(whether the VMM answered at all, its report if it was a valid one)."""
    url = f"http+unix://{quote(socket, safe='')}{SIM_GUEST_PATH}"
    try:
        with requests_unixsocket.Session() as session:
            response = session.get(url, headers={"Accept": "application/json"}, timeout=timeout)
    except requests.RequestException:
        return False, None
    if response.status_code != 200:
        return True, None
    try:
        body = response.json()
    except ValueError:
        return True, None
    fields = ("memory_held", "vcpus_online", "rss")
    if not isinstance(body, dict) or not all(
        type(body.get(key)) is int and body[key] >= 0 for key in fields
    ):
        return True, None
    return True, {key: body[key] for key in fields}


class SocketPathTooLong(ValueError):
    pass


def check_socket_root(pods_root: str) -> None:
    """Refuse a root under which a pod's socket path cannot be bound (Unix socket paths
    are limited to 107 bytes); better at startup than at the first pod."""
    sample = vmm_socket_path(pods_root, "0" * _UID_LENGTH)
    if len(os.fsencode(sample)) > MAX_SOCKET_PATH:
        raise SocketPathTooLong(
            f"--vmm-socket-root {pods_root!r} is too long: a pod's VMM socket would be "
            f"{len(os.fsencode(sample))} bytes ({sample}), Unix sockets allow "
            f"{MAX_SOCKET_PATH}; choose a shorter directory"
        )


class _Process:
    def __init__(self, ref: str, popen: subprocess.Popen[bytes], socket: str) -> None:
        self.ref = ref
        self.popen = popen
        self.socket = socket
        self.reported_exit = False
        # False once the VMM answered sim.guest with something else: read VmRSS directly.
        self.sim_guest = True


class VmmRuntime:
    """Starts, watches and stops the VMM processes of one node's pods."""

    def __init__(self, pods_root: str, command: Sequence[str] = DEFAULT_VMM_COMMAND) -> None:
        check_socket_root(pods_root)
        self.pods_root = pods_root
        self.command = tuple(command)
        self._procs: dict[str, _Process] = {}
        self._lock = threading.Lock()

    def socket_path(self, uid: str) -> str:
        return vmm_socket_path(self.pods_root, uid)

    def ensure(self, uid: str, ref: str) -> None:
        """Start the pod's VMM unless it already runs (a StartVmm may repeat on adoption)."""
        with self._lock:
            proc = self._procs.get(uid)
            if proc is not None and proc.popen.poll() is None:
                return
            socket = self.socket_path(uid)
            directory = Path(socket).parent
            directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                Path(socket).unlink()  # a stale socket from a VMM that died
            argv = [*self.command, "--api-socket", f"path={socket}"]
            # The VM pod's only downward-API env var (fieldRef metadata.uid), as a kubelet
            # would set it: the daemon checks the VMM's identity by it (ADR 0011).
            env = {**os.environ, POD_UID_ENV: uid}
            with open(directory / "vmm.log", "ab") as out:
                popen = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # our signals (Ctrl-C) are not the VMM's
                )
            self._procs[uid] = _Process(ref, popen, socket)
        log.info("vmm started", extra=kv(pod=ref, uid=uid, pid=popen.pid, socket=socket))

    def stop(self, uid: str) -> None:
        with self._lock:
            proc = self._procs.pop(uid, None)
        if proc is not None:
            self._terminate([proc])
        # The pod is gone: its directory (socket, log) goes too, as the kubelet's would.
        shutil.rmtree(Path(self.pods_root) / uid, ignore_errors=True)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        self._terminate(procs)

    def running(self) -> dict[str, int]:
        with self._lock:
            return {uid: p.popen.pid for uid, p in self._procs.items() if p.popen.poll() is None}

    def poll_exits(self) -> dict[str, int]:
        """The VMMs that exited on their own since the last call, by pod UID, with the
        exit code as a container runtime reports it (128 + the signal when killed)."""
        with self._lock:
            procs = list(self._procs.items())
        exits = {}
        for uid, proc in procs:
            code = proc.popen.poll()
            if code is not None and not proc.reported_exit:
                proc.reported_exit = True
                exit_code = 128 - code if code < 0 else code
                log.warning(
                    "vmm exited",
                    extra=kv(pod=proc.ref, uid=uid, pid=proc.popen.pid, exit_code=exit_code),
                )
                exits[uid] = exit_code
        return exits

    def memory_usage(self, uid: str) -> int | None:
        """What the pod's VMM process holds (the cgroup usage a kubelet compares a new
        memory limit with): the simulator's ``rss`` from ``sim.guest``, else the
        process's VmRSS. None when no VMM runs: the model then does not block."""
        with self._lock:
            proc = self._procs.get(uid)
        if proc is None or proc.popen.poll() is not None:
            return None
        if proc.sim_guest:
            answered, report = _sim_guest(proc.socket, INFO_TIMEOUT_S)
            if report is not None:
                return report["rss"]
            if answered:
                # An answer that is no report: a VMM without the endpoint (a real
                # cloud-hypervisor); stop asking. No answer (starting, hung): ask again.
                proc.sim_guest = False
                log.info("vmm has no sim.guest, reading VmRSS", extra=kv(pod=proc.ref, uid=uid))
        return read_vmrss(proc.popen.pid)

    def _terminate(self, procs: list[_Process]) -> None:
        """SIGTERM to all of them at once, then SIGKILL to whatever outlives one grace
        period: one after the other, 250 VMMs outlasted the kubelet's own stop grace."""
        for proc in procs:
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(p.popen.poll() is None for p in procs):
            time.sleep(0.05)
        for proc in procs:
            popen = proc.popen
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                popen.wait(timeout=STOP_GRACE_S)
            log.info(
                "vmm stopped", extra=kv(pod=proc.ref, pid=popen.pid, exit_code=popen.returncode)
            )
