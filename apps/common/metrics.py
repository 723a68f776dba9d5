"""The /metrics, /healthz and /readyz endpoints, served by a bounded server.

The metrics themselves are prometheus_client's (label escaping, the exposition formats
and the process collector are its job, ADR 0012). Its own ``start_http_server`` runs a
thread per connection, so a scraper that opens connections and sends nothing can pin a
thread each: :class:`BoundedServer` is one thread and a selector instead. Each
connection has a deadline (a request that has not been answered by then is dropped), and
the number of open connections is capped; at the cap the oldest connection that is
still waiting for its request makes room, so idle connections cannot lock a scraper out.
One request per connection (``Connection: close``): scrapes are seconds apart and
keep-alive would only hold sockets open for nothing.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

DEFAULT_BIND = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_DEADLINE_S = 10.0
# A scrape request is a few hundred bytes; anything this long is not one.
MAX_REQUEST_BYTES = 8192
_TICK_S = 0.25  # how often deadlines are checked when nothing else happens
_SEND_CHUNK = 64 * 1024


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def encode(response: Response, head_only: bool = False) -> bytes:
    reason = _REASONS.get(response.status, "")
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + response.body


def endpoints(
    registry: CollectorRegistry, ready: Callable[[], bool]
) -> Callable[[str, str, dict[str, str]], Response]:
    """The three paths: /metrics (in the format the scraper's Accept asks for), /healthz
    (the process answers) and /readyz (``ready()`` holds, e.g. the caches have synced)."""

    def route(method: str, path: str, headers: dict[str, str]) -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n")
        path = path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return Response(200, encoder(registry), content_type)
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            return Response(200, b"ok\n") if ready() else Response(503, b"not ready\n")
        return Response(404, b"not found\n")

    return route


class _Conn:
    __slots__ = ("inbox", "opened", "outbox", "sock")

    def __init__(self, sock: socket.socket, opened: float) -> None:
        self.sock = sock
        self.opened = opened
        self.inbox = b""
        self.outbox: bytes | None = None  # None while the request is still being read


def _parse(raw: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path, lower-cased headers) of a request head, or None if malformed."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


class BoundedServer:
    """An HTTP/1.1 server for small GET endpoints on one thread.

    ``max_connections`` caps the sockets held open; ``deadline_s`` is how long a
    connection may live from accept to its answer being sent.
    """

    def __init__(
        self,
        route: Callable[[str, str, dict[str, str]], Response],
        host: str = DEFAULT_BIND,
        port: int = 0,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        deadline_s: float = DEFAULT_DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.route = route
        self.max_connections = max_connections
        self.deadline_s = deadline_s
        self.clock = clock
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.socket(family, kind, proto)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(address)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._conns: dict[int, _Conn] = {}  # by file descriptor, in accept order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters for tests and the logs: connections dropped for each reason.
        self.expired = 0
        self.evicted = 0
        self.refused = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> BoundedServer:
        self._thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(_TICK_S):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fd in self._conns:
                        conn = self._conns[key.fd]
                        if events & selectors.EVENT_READ:
                            self._read(conn)
                        elif events & selectors.EVENT_WRITE:
                            self._write(conn)
                self._expire()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._selector.close()
            self._listener.close()

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. out of file descriptors: keep serving the others
            log.warning("metrics server: accept failed", extra={"error": str(exc)})
            return
        sock.setblocking(False)
        if len(self._conns) >= self.max_connections and not self._evict_idle():
            # Every slot is answering a request: say so rather than hold the socket.
            self.refused += 1
            with contextlib.suppress(OSError):
                sock.send(encode(Response(503, b"too many connections\n")))
            sock.close()
            return
        conn = _Conn(sock, self.clock())
        self._conns[sock.fileno()] = conn
        self._selector.register(sock, selectors.EVENT_READ)

    def _evict_idle(self) -> bool:
        """Close the oldest connection that has not yet sent a whole request."""
        for conn in self._conns.values():
            if conn.outbox is None:
                self.evicted += 1
                self._close(conn)
                return True
        return False

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        head, sep, _ = conn.inbox.partition(b"\r\n\r\n")
        if not sep:
            if len(conn.inbox) > MAX_REQUEST_BYTES:
                self._answer(conn, Response(431, b"request head too large\n"))
            return
        parsed = _parse(head)
        if parsed is None:
            self._answer(conn, Response(400, b"malformed request\n"))
            return
        method, path, headers = parsed
        try:
            response = self.route(method, path, headers)
        except Exception:
            log.exception("metrics server: handler failed", extra={"path": path})
            response = Response(500, b"internal error\n")
        self._answer(conn, response, head_only=method == "HEAD")

    def _answer(self, conn: _Conn, response: Response, head_only: bool = False) -> None:
        conn.outbox = encode(response, head_only)
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.outbox is not None
        try:
            sent = conn.sock.send(conn.outbox[:_SEND_CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._close(conn)

    def _expire(self) -> None:
        now = self.clock()
        for conn in [c for c in self._conns.values() if now - c.opened >= self.deadline_s]:
            self.expired += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()


def serve(
    registry: CollectorRegistry,
    port: int,
    ready: Callable[[], bool],
    host: str = DEFAULT_BIND,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> BoundedServer:
    """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread."""
    server = BoundedServer(
        endpoints(registry, ready),
        host,
        port,
        max_connections=max_connections,
        deadline_s=deadline_s,
    )
    return server.start()
