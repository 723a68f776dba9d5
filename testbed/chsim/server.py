"""HTTP/1.1 over a Unix socket in front of :class:`sim.cloudhypervisor.VmmModel`.

The model decides every answer; this module only frames requests and responses, keeps the
clock (monotonic seconds since start), sleeps for the model's latency hints, withholds
answers the model says hang, and draws the seeded random faults. One lock serialises the
model, as Cloud Hypervisor's single API thread does.

Like Cloud Hypervisor (v53), the server holds an exclusive lock on ``<socket>.lock``
while it serves, so a second VMM started on the same path fails instead of deleting a
live socket; under that lock a socket file left by a crashed run is stale and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import logging
import os
import random
import socketserver
import threading
import time
from collections.abc import Collection
from typing import Any

from apps.common.logs import kv
from sim.cloudhypervisor import API_PREFIX, JSON, Response, VmmModel

log = logging.getLogger("chscale.chsim")

SERVER_HEADER = "Cloud Hypervisor API"
INJECTED_FAULT = "injected fault (chscale-ch-sim --sim-error-rate)"
LOCK_SUFFIX = ".lock"
# How often a hanging request checks whether the server is stopping.
_HANG_POLL_S = 0.1


class SocketInUse(RuntimeError):
    pass


class _FramingError(ValueError):
    """The request cannot be read (its body has no usable length)."""


class FaultPlan:
    """Seeded random 500s on chosen endpoints; the seed makes a run repeatable."""

    def __init__(self, rate: float = 0.0, seed: int = 0, endpoints: Collection[str] = ()) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--sim-error-rate must be within [0, 1], got {rate}")
        self.rate = rate
        self.endpoints = frozenset(endpoints)
        self._rng = random.Random(seed)

    def strikes(self, endpoint: str) -> bool:
        return self.rate > 0 and endpoint in self.endpoints and self._rng.random() < self.rate


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Also the version of the answer to an unparsable request line: the stdlib default
    # (HTTP/0.9) would send that 400 with no status line at all.
    default_request_version = "HTTP/1.1"
    server: ChSimServer

    def _serve(self) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
            return
        try:
            body = self._read_body()
        except _FramingError as exc:
            log.warning("bad request framing", extra=kv(vm=self.server.vm_name, error=str(exc)))
            self.close_connection = True
            self._send(Response(status=400))
            return
        response = self.server.answer(self.command, self.path, body)
        if response.delay:
            time.sleep(response.delay)
        if response.hang:
            log.info("request hangs", extra=kv(vm=self.server.vm_name, path=self.path))
            while not self.server.stopping.wait(_HANG_POLL_S):
                pass
            self.close_connection = True
            return
        stopping = self.server.model.vmm_shutdown_requested
        if stopping:
            # Gone from the file system before the answer, so no later request connects;
            # the server stops only after answering, or the process could exit first.
            self.close_connection = True
            self.server.unlink_socket()
        self._send(response)
        if self.server.model.exit_code is not None:
            self._crash(self.server.model.exit_code)
        if stopping:
            self.server.stop_soon()
        log.info(
            "request",
            extra=kv(
                vm=self.server.vm_name,
                method=self.command,
                path=self.path,
                status=response.status,
            ),
        )

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    def _crash(self, code: int) -> None:
        """sim.exit: die at once with ``code``, as a crashed VMM does: no cleanup, so the
        socket file stays behind (the lock goes with the process)."""
        log.warning("exiting on request", extra=kv(vm=self.server.vm_name, code=code))
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    def _read_body(self) -> bytes | None:
        """The request body, None when there is none."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _FramingError("chunked request bodies are not supported")
        raw_length = self.headers.get("Content-Length") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0:
            raise _FramingError(f"bad Content-Length {raw_length!r}")
        return self.rfile.read(length) if length else None

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        if response.status != 204:
            self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if response.status != 204 and response.body:
            self.wfile.write(response.body)
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed HTTP (request line, headers, unknown method): a bare status, then close.
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Content-Type", JSON)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are logged above, structured; the stdlib line would name no VM.
        pass

    def version_string(self) -> str:
        return SERVER_HEADER

    def address_string(self) -> str:
        return "unix"


class ChSimServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        socket_path: str,
        model: VmmModel,
        faults: FaultPlan | None = None,
        vm_name: str = "",
    ) -> None:
        self.socket_path = socket_path
        self.model = model
        self.faults = faults or FaultPlan()
        self.vm_name = vm_name or os.path.basename(socket_path)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._epoch = time.monotonic()
        self._lock_path = socket_path + LOCK_SUFFIX
        self._lock_fd = self._acquire_socket_lock()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)  # stale: we hold the lock, nobody serves it
            super().__init__(socket_path, _Handler)
        except BaseException:
            self._release_socket_lock()
            raise
        # Unlink only our own socket at exit, whatever happened to the path meanwhile.
        self._inode = os.stat(socket_path).st_ino

    def _acquire_socket_lock(self) -> int:
        fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SocketInUse(
                f"{self.socket_path} is in use by another VMM (it holds {self._lock_path})"
            ) from None
        return fd

    def _release_socket_lock(self) -> None:
        if self._lock_fd < 0:
            return
        # Removed while still held, so no successor can lock the file we are deleting.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._lock_path).st_ino == os.fstat(self._lock_fd).st_ino:
                os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = -1

    def now(self) -> float:
        return time.monotonic() - self._epoch

    def answer(self, method: str, path: str, body: bytes | None) -> Response:
        endpoint = path.split("?", 1)[0].removeprefix(API_PREFIX)
        with self._lock:
            if self.faults.strikes(endpoint):
                log.warning("injecting fault", extra=kv(vm=self.vm_name, endpoint=endpoint))
                return self.model.error(500, "Error from API", INJECTED_FAULT)
            return self.model.handle(self.now(), method, path, body)

    def call(self, method: str, endpoint: str, body: bytes | None = None) -> Response:
        """Drive the model directly (the command-line boot), under the same lock."""
        with self._lock:
            return self.model.handle(self.now(), method, API_PREFIX + endpoint, body)

    def stop_soon(self) -> None:
        """Stop serving from any thread, including a request handler's or a signal
        handler's (shutdown() would deadlock there, so a helper thread calls it)."""
        self.stopping.set()
        self.unlink_socket()
        threading.Thread(target=self.shutdown, name="chsim-stop", daemon=True).start()

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()
        self.unlink_socket()
        self._release_socket_lock()

    def unlink_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
