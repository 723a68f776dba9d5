"""HTTP/1.1 over a Unix socket in front of :class:`sim.cloudhypervisor.VmmModel`.

The model decides every answer; this module only frames requests and responses, keeps the
clock (monotonic seconds since start), sleeps for the model's latency hints, withholds
answers the model says hang, and draws the seeded random faults. One lock serialises the
model, as Cloud Hypervisor's single API thread does.
"""

from __future__ import annotations

import contextlib
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
from sim.cloudhypervisor import API_PREFIX, Response, VmmModel

log = logging.getLogger("chscale.chsim")

SERVER_HEADER = "Cloud Hypervisor API"
INJECTED_FAULT = "injected fault (chscale-ch-sim --sim-error-rate)"
# How often a hanging request checks whether the server is stopping.
_HANG_POLL_S = 0.1


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
    server: ChSimServer

    def _serve(self) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        response = self.server.answer(self.command, self.path, body)
        if response.delay:
            time.sleep(response.delay)
        if response.hang:
            log.info("request hangs", extra=kv(vm=self.server.vm_name, path=self.path))
            while not self.server.stopping.wait(_HANG_POLL_S):
                pass
            self.close_connection = True
            return
        if self.server.model.vmm_shutdown_requested:
            # Gone from the file system before the answer, so no later request connects.
            self.close_connection = True
            self.server.stop_soon()
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        if response.status != 204:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.status != 204 and response.body:
            self.wfile.write(response.body)
        self.wfile.flush()
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

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed HTTP framing; answer like micro_http: a bare status, then close.
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Content-Length", "0")
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)  # stale, from a crashed run (Cloud Hypervisor does the same)
        super().__init__(socket_path, _Handler)
        # Unlink only our own socket: a successor may already have bound the same path.
        self._inode = os.stat(socket_path).st_ino

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
        """Stop serving from any thread, including a request handler's."""
        self.stopping.set()
        self._unlink()
        threading.Thread(target=self.shutdown, name="chsim-stop", daemon=True).start()

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()
        self._unlink()

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
