"""HTTP/1.1 over a Unix socket in front of :class:`sim.cloudhypervisor.VmmModel`.

The model decides every answer; this module only frames requests and responses, keeps the
clock (monotonic seconds since start), sleeps for the model's latency hints, withholds
answers the model says hang, and draws the seeded random faults. One lock serialises the
model, as Cloud Hypervisor's single API thread does.

Requests are read the way micro_http (Cloud Hypervisor's HTTP library) reads them, not
the way Python's ``http.server`` does: its methods, its header rules, its 1024-byte lines
and 51200-byte bodies, its 400 ``{"error": ...}`` and closed connection for anything it
cannot parse, and its framing of answers (no reason phrase, no content headers on 204).

Like Cloud Hypervisor (v53), the server holds an exclusive lock on ``<socket>.lock``
while it serves, so a second VMM started on the same path fails instead of deleting a
live socket; under that lock a socket file left by a crashed run is stale and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import selectors
import socketserver
import threading
import time
from collections.abc import Collection

from apps.common.logs import kv
from sim.cloudhypervisor import (
    API_PREFIX,
    HTTP_LIBRARY_SERVER_HEADER,
    HTTP_METHODS,
    INVALID_METHOD,
    JSON,
    MAX_PAYLOAD_SIZE,
    U32_MAX,
    Response,
    VmmModel,
    http_error,
)
from testbed.chsim.ballast import CHUNK, Ballast

log = logging.getLogger("chscale.chsim")

INJECTED_FAULT = "injected fault (chscale-ch-sim --sim-error-rate)"
LOCK_SUFFIX = ".lock"
# How often a hanging request checks whether the server is stopping.
_HANG_POLL_S = 0.1
# How often serve_forever wakes by itself while a ballast follows the guest's memory.
SERVICE_INTERVAL_S = 0.1
# micro_http reads into a 1024-byte buffer: a request or header line must fit in it.
_LINE_MAX = 1024


class SocketInUse(RuntimeError):
    pass


class _ParseError(ValueError):
    """A request micro_http cannot parse; the message is its RequestError's text."""


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


class _Request:
    def __init__(self, method: str, path: str) -> None:
        self.method, self.path = method, path
        self.content_length = 0
        self.expect_continue = False
        self.chunked = False
        self.body: bytes | None = None


class _Handler(socketserver.StreamRequestHandler):
    """One connection, parsed the way micro_http parses it: requests one after another
    (keep-alive) until the client closes; a request it cannot parse is answered with
    its 400 and the connection closed."""

    server: ChSimServer

    def handle(self) -> None:
        while not self.server.stopping.is_set():
            try:
                request = self._read_request()
            except _ParseError as exc:
                log.warning("unparsable request", extra=kv(vm=self.server.vm_name, error=str(exc)))
                self._send(http_error(str(exc)))
                return
            except (OSError, EOFError):
                return
            if request is None:
                return
            if not self._serve(request):
                return

    # ---- reading, as micro_http does --------------------------------------------------

    def _line(self) -> bytes | None:
        """One CRLF-terminated line without its CRLF; None at EOF before any byte."""
        line = self.rfile.readline(_LINE_MAX + 1)
        if not line:
            return None
        if len(line) > _LINE_MAX and not line.endswith(b"\n"):
            raise _ParseError("Invalid request.")
        if not line.endswith(b"\r\n"):
            if line.endswith(b"\n"):
                raise _ParseError("Invalid request.")
            raise EOFError  # the client went away mid-line
        return line[:-2]

    def _read_request(self) -> _Request | None:
        line = self._line()
        if line is None:
            return None
        request = self._request_line(line)
        while True:
            header = self._line()
            if header is None:
                raise EOFError
            if not header:
                break
            self._header(request, header)
        if request.chunked:
            # micro_http reads no chunked body: the chunks are parsed as the next request
            # line, which is not one.
            raise _ParseError("Invalid request.")
        if request.content_length:
            if request.content_length > MAX_PAYLOAD_SIZE:
                raise _ParseError(
                    f"Request payload with size {request.content_length} is larger than "
                    f"the limit of {MAX_PAYLOAD_SIZE} allowed by server."
                )
            if request.expect_continue:
                # Queued by micro_http itself, hence its own Server header.
                self._send(Response(status=100, server=HTTP_LIBRARY_SERVER_HEADER))
            body = self.rfile.read(request.content_length)
            if len(body) < request.content_length:
                raise EOFError
            request.body = body
        return request

    @staticmethod
    def _request_line(line: bytes) -> _Request:
        method, sep, rest = line.partition(b" ")
        uri, sep2, version = rest.partition(b" ")
        if not sep or not sep2:
            raise _ParseError("Invalid request.")
        if method.decode("latin-1") not in HTTP_METHODS:
            raise _ParseError(INVALID_METHOD)
        if not uri:
            raise _ParseError("Invalid URI: Empty URI not allowed.")
        try:
            path = uri.decode("utf-8")
        except UnicodeDecodeError:
            raise _ParseError("Invalid URI: Cannot parse URI as UTF-8.") from None
        if version not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise _ParseError("Invalid HTTP Version: Unsupported HTTP version.")
        return _Request(method.decode("ascii"), path)

    @staticmethod
    def _header(request: _Request, line: bytes) -> None:
        """micro_http's Headers::parse_header_line: a few names matter; a value it does
        not support for Content-Type, Accept, Transfer-Encoding or Expect is ignored, so
        those never change an answer; a line it cannot read refuses the request."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _ParseError(
                f"Invalid header. Reason: Header contains invalid characters. Key: {exc}"
            ) from None
        name, sep, value = text.partition(":")
        if not sep:
            raise _ParseError(
                f"Invalid header. Reason: Header is incorrectly formatted. Key: {name}"
            )
        key = name.strip().lower()
        if key == "content-length":
            try:
                length = int(value.strip(), 10)
            except ValueError:
                length = -1
            if not 0 <= length <= U32_MAX or not value.strip().isdigit():
                raise _ParseError(
                    f"Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"
                )
            request.content_length = length
        elif key == "transfer-encoding":
            request.chunked = request.chunked or value.strip() == "chunked"
        elif key == "expect":
            request.expect_continue = request.expect_continue or value.strip() == "100-continue"
        elif key == "accept-encoding":
            for encoding in value.strip().split(","):
                refused = encoding.strip() == "identity;q=0" or (
                    encoding.strip() == "*;q=0" and "identity" not in value
                )
                if refused:
                    raise _ParseError(
                        "Invalid header. Reason: Invalid value. "
                        f"Key:Accept-Encoding; Value:{encoding}"
                    )
        # content-type, accept, server and every other name: nothing to do.

    # ---- answering ----------------------------------------------------------------------

    def _serve(self, request: _Request) -> bool:
        """Answer one request; False when the connection is to be closed."""
        response = self.server.answer(request.method, request.path, request.body)
        if response.delay:
            time.sleep(response.delay)
        if response.hang:
            log.info("request hangs", extra=kv(vm=self.server.vm_name, path=request.path))
            while not self.server.stopping.wait(_HANG_POLL_S):
                pass
            return False
        stopping = self.server.model.vmm_shutdown_requested
        if stopping:
            # Gone from the file system before the answer, so no later request connects;
            # the server stops only after answering, or the process could exit first.
            self.server.unlink_socket()
        self._send(response)
        log.info(
            "request",
            extra=kv(
                vm=self.server.vm_name,
                method=request.method,
                path=request.path,
                status=response.status,
            ),
        )
        if self.server.model.exit_code is not None:
            self._crash(self.server.model.exit_code)
        if stopping:
            self.server.stop_soon()
            return False
        return not response.close

    def _send(self, response: Response) -> None:
        """micro_http's framing: no reason phrase, Server and Connection always, and the
        content headers on every answer but a 204."""
        head = [
            b"HTTP/1.1 %d " % response.status,
            b"Server: " + _server(response.server),
            b"Connection: keep-alive",
        ]
        if response.status not in (100, 204):
            head.append(b"Content-Type: " + (response.content_type or JSON).encode())
            head.append(b"Content-Length: %d" % len(response.body))
        data = b"\r\n".join(head) + b"\r\n\r\n"
        if response.status not in (100, 204):
            data += response.body
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass  # the client went away; nothing to tell it

    def _crash(self, code: int) -> None:
        """sim.exit: die at once with ``code``, as a crashed VMM does: no cleanup, so the
        socket file stays behind (the lock goes with the process)."""
        log.warning("exiting on request", extra=kv(vm=self.server.vm_name, code=code))
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)


def _server(name: str) -> bytes:
    return name.encode("ascii")


class ChSimServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        socket_path: str,
        model: VmmModel,
        faults: FaultPlan | None = None,
        vm_name: str = "",
        ballast: Ballast | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.model = model
        # The guest's memory, really held (--sim-touch-memory), kept in step with the model
        # by a thread of its own (see _follow_guest_memory).
        self.ballast = ballast
        self._memory_moved = threading.Event()
        self._ballast_thread: threading.Thread | None = None
        # serve_forever sleeps until a request or stop() (a byte on this pipe) wakes it.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._loop_done = threading.Event()
        self._loop_done.set()
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
        if ballast is not None:
            self._ballast_thread = threading.Thread(
                target=self._follow_guest_memory, name="chsim-ballast", daemon=True
            )
            self._ballast_thread.start()

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
            response = self.model.handle(self.now(), method, path, body)
            self._hold_guest_memory()
            return response

    def call(self, method: str, endpoint: str, body: bytes | None = None) -> Response:
        """Drive the model directly (the command-line boot), under the same lock."""
        with self._lock:
            response = self.model.handle(self.now(), method, API_PREFIX + endpoint, body)
            self._hold_guest_memory()
            return response

    def serve_forever(self, poll_interval: float = SERVICE_INTERVAL_S) -> None:
        """socketserver's loop, woken by :meth:`shutdown` instead of polling for it, and
        waking on its own only while the ballast follows the guest (``poll_interval``):
        1,000 idle simulators polling ten times a second used one of this machine's two
        cores (``bench.burst``'s ``burst_cpu_s_vmm``, ADR 0020)."""
        self._loop_done.clear()
        timeout = poll_interval if self.ballast is not None else None
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self.stopping.is_set():
                    ready = selector.select(timeout)
                    if self.stopping.is_set():
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._loop_done.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has (from another thread)."""
        self.stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):  # full: it is awake already
                os.write(self._wake_w, b"x")
        self._loop_done.wait()

    def service_actions(self) -> None:
        """Between requests (serve_forever's poll): the guest plugs and unplugs on its own
        clock, and the ballast follows it there too."""
        if self.ballast is not None:
            with self._lock:
                self.model.advance(self.now())
                self._hold_guest_memory()

    def _hold_guest_memory(self) -> None:
        if self.ballast is not None:
            self._memory_moved.set()

    def _follow_guest_memory(self) -> None:
        """Hold what the model says the guest holds, a chunk at a time, outside the lock.

        Cloud Hypervisor answers ``vm.resize`` at once and the guest's memory becomes
        resident as the guest uses it; touching gigabytes inside the request held the
        answer for seconds, past the daemon's call deadline (seen on the real node: a
        4Gi -> 8Gi grow answered after the daemon had given up). A growth is followed a
        chunk at a time, the target read again between chunks, so a shrink that comes
        meanwhile is never overshot by more than a chunk; a shrink is followed at once
        (unmapping is cheap), before the next look at the target."""
        assert self.ballast is not None
        while not self.stopping.is_set():
            with self._lock:
                target = self.model.guest_usage()["memory_held"]
            if target <= self.ballast.size:
                self.ballast.resize(target)
            else:
                self.ballast.resize(min(target, self.ballast.size + CHUNK))
                continue
            self._memory_moved.wait(timeout=0.5)
            self._memory_moved.clear()

    def stop_soon(self) -> None:
        """Stop serving from any thread, including a request handler's or a signal
        handler's (shutdown() would deadlock there, so a helper thread calls it)."""
        self.stopping.set()
        self.unlink_socket()
        threading.Thread(target=self.shutdown, name="chsim-stop", daemon=True).start()

    def server_close(self) -> None:
        self.shutdown()  # a loop still serving ends first; none: returns at once
        super().server_close()
        if self._wake_r >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self.ballast is not None:
            self._memory_moved.set()
            if self._ballast_thread is not None:
                self._ballast_thread.join(timeout=10)
            self.ballast.close()
        self.unlink_socket()
        self._release_socket_lock()

    def unlink_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
