"""The admission webhook's HTTPS server (stdlib ``http.server`` + ``ssl``).

Three admission routes and a health check do not need a framework, but they do need to
survive whatever reaches the port, because with ``failurePolicy: Fail`` a dead or hung
webhook blocks every VirtualMachine write in the cluster. So:

- nothing a client sends produces a 500 or kills the server: a body that is not an
  AdmissionReview is a 400 naming what is wrong, a body over :data:`MAX_BODY_BYTES` a
  413, a missing length a 411, an unknown route a 404; a rule that raises anyway is
  logged and answered as a denial (fail closed, like the failurePolicy);
- nothing a client does hangs a worker for long: the TLS handshake has its own
  deadline, and every request has one from its first byte to the end of its body (a
  reader whose per-``recv`` timeout is the time left, so a client dribbling one byte at
  a time is cut off); between requests a keep-alive connection may idle longer than Go's
  90 s idle timeout, so that the API server, not us, closes idle connections (closing
  first races with a request already on its way). Connections beyond
  :attr:`Limits.max_connections` are closed at once instead of queueing threads;
- nobody can starve it by holding connections (ADR 0011): a new connection must send the
  first byte of its first request within :attr:`Limits.first_request_s` of its accept
  (handshake included), one peer may hold at most :attr:`Limits.max_per_peer`
  connections, and when a cap is reached a new connection takes the place of the oldest
  *idle* one (never-used connections first, then idle keep-alives; one that is reading or
  answering a request is never cut). Only when every slot is busy serving a request is
  the new connection closed. The listen backlog is :attr:`_Server.request_queue_size`,
  and the accept loop never blocks on a client (the handshake runs in the worker);
- with a client CA (``client_ca``), only clients presenting a certificate it signed
  complete the handshake: the API server authenticates itself to the webhook with the
  client certificate its admission kubeconfig names (ADR 0011);
- the certificate and key are files, re-read when either changes (checked at each new
  connection, loaded into a fresh ``SSLContext``); a half-written pair keeps the previous
  context until the pair is consistent again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from adapters.webhook.admission import (
    BadReview,
    VmLookup,
    mutate_pod_review,
    mutate_vm_review,
    parse_review,
    refuse,
    validate_vm_review,
)
from core.config import DEFAULT_CONFIG, KernelConfig

__all__ = [
    "MAX_BODY_BYTES",
    "ROUTES",
    "Limits",
    "WebhookServer",
    "start_server",
]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MUTATE_VM = "/mutate-vm"
VALIDATE_VM = "/validate-vm"
MUTATE_POD = "/mutate-pod"
HEALTHZ = "/healthz"
ROUTES = (MUTATE_VM, VALIDATE_VM, MUTATE_POD)
_LOG_FIELD_MAX = 253  # a DNS subdomain: longer is not a Kubernetes name


@frozen
class Limits:
    handshake_s: float = 5.0
    # accept to the first byte of the first request, the handshake included: the API
    # server sends its request as soon as the connection is up, an idle squatter does not
    first_request_s: float = 10.0
    request_s: float = 10.0  # first byte of a request to the end of its body
    idle_s: float = 120.0  # between keep-alive requests; above Go's 90 s IdleConnTimeout
    max_connections: int = 128
    # One address may hold this many; the API server (one address per replica) keeps a
    # few keep-alive connections per webhook, far below it.
    max_per_peer: int = 64
    max_body_bytes: int = MAX_BODY_BYTES


class _Conn:
    """What the server knows of one open connection (under ``_Server.lock``)."""

    __slots__ = ("idle", "peer", "served", "since")

    def __init__(self, peer: str, now: float) -> None:
        self.peer, self.since = peer, now
        self.idle = True  # waiting for a request (or in the handshake)
        self.served = 0


class _Certificates:
    """An SSLContext that follows the certificate and key files on disk."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        self._failed_stamp: tuple[int, ...] | None = None
        self._context = self._load()  # at start a bad pair is fatal: raise

    def _read_stamp(self) -> tuple[int, ...]:
        stamp: tuple[int, ...] = ()
        for path in (self.cert, self.key):
            st = os.stat(path)
            stamp += (st.st_mtime_ns, st.st_ino, st.st_size)
        return stamp

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.client_ca)
        return context

    def context(self) -> ssl.SSLContext:
        try:
            stamp = self._read_stamp()
        except OSError:
            return self._context  # mid-rotation (a file briefly absent): keep serving
        with self._lock:
            if stamp != self._stamp and stamp != self._failed_stamp:
                try:
                    self._context = self._load()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    # Typically the new certificate is written and the key not yet: the
                    # next connection tries again once either file changes.
                    self._failed_stamp = stamp
                    log.warning(
                        "webhook certificate not reloaded, keeping the previous one",
                        extra={"cert": str(self.cert), "key": str(self.key), "error": str(exc)},
                    )
                else:
                    self._stamp = stamp
                    log.info("webhook certificate reloaded", extra={"cert": str(self.cert)})
            return self._context


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket, each ``recv`` bounded by the time left until ``deadline``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        certificates: _Certificates,
        review: Callable[[str, dict[str, Any]], dict[str, Any]],
        limits: Limits,
    ) -> None:
        self.certificates, self.review, self.limits = certificates, review, limits
        self.connections: dict[socket.socket, _Conn] = {}
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.counts = {
            "reviews": 0,
            "bad_requests": 0,
            "rule_errors": 0,
            "refused_connections": 0,
            "evicted_idle": 0,
        }
        super().__init__(address, _Handler)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        # The handshake runs in the worker thread (see _Handler.setup), so a client that
        # never completes it cannot stall the accept loop.
        wrapped = self.certificates.context().wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, addr

    def _evictable(self, peer: str | None) -> socket.socket | None:
        """The oldest idle connection (of ``peer`` if given), never-used ones first."""
        idle = [
            (c.served > 0, c.since, sock)
            for sock, c in self.connections.items()
            if c.idle and (peer is None or c.peer == peer)
        ]
        return min(idle, key=lambda t: (t[0], t[1]))[2] if idle else None

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = _client(client_address)["client"].rpartition(":")[0]
        limits = self.limits
        evicted: socket.socket | None = None
        with self.lock:
            mine = sum(1 for c in self.connections.values() if c.peer == peer)
            full = False
            if mine >= limits.max_per_peer:
                evicted = self._evictable(peer)
                full = evicted is None
            elif len(self.connections) >= limits.max_connections:
                evicted = self._evictable(None)
                full = evicted is None
            if evicted is not None:
                del self.connections[evicted]
                self.counts["evicted_idle"] += 1
            if full:
                self.counts["refused_connections"] += 1
            else:
                self.connections[request] = _Conn(peer, time.monotonic())
        if evicted is not None:
            # The plain socket's shutdown wakes its thread (blocked in a read) safely.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(evicted, socket.SHUT_RDWR)
            log.info("idle connection closed for a new one", extra=_client(client_address))
        if full:
            log.warning("too many connections, closing a new one", extra=_client(client_address))
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def set_idle(self, request: Any, idle: bool) -> None:
        with self.lock:
            conn = self.connections.get(request)
            if conn is not None:
                conn.idle = idle
                if not idle:
                    conn.served += 1

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections.pop(request, None)
                self.drained.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that vanished, failed the handshake or broke TLS: its problem, not ours.
        # Anything else is a bug of ours that cost the client its connection: say so.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection ended", exc_info=True, extra=_client(client_address))
        else:
            log.error(
                "connection ended by a server error", exc_info=True, extra=_client(client_address)
            )

    def close_connections(self, timeout: float) -> None:
        """End every open connection (idle keep-alives included) and wait for their
        threads, so that stopping never waits out an idle timeout."""
        with self.lock:
            for conn in self.connections:
                # The plain socket's shutdown: it wakes a thread blocked in an SSL read
                # without touching the SSL object that thread is using.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)
            self.drained.wait_for(lambda: not self.connections, timeout)


def _client(address: Any) -> dict[str, str]:
    return {"client": f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "?"}


def _printable(value: object) -> str:
    text = str(value or "")[:_LOG_FIELD_MAX]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chscale-webhook"
    # Headers and body leave in one write (buffered, flushed after each request) and
    # without Nagle: two small TLS records against delayed ACKs cost 40 ms a review.
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        limits = self.server.limits
        self._first_deadline = time.monotonic() + limits.first_request_s
        self._first = True
        # settimeout bounds the whole handshake, not each recv (CPython's SSL deadline).
        self.request.settimeout(min(limits.handshake_s, limits.first_request_s))
        self.request.do_handshake()
        super().setup()
        self.rfile.close()
        self._reader = _DeadlineReader(self.request)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        limits = self.server.limits
        if self._first:
            self._reader.deadline = self._first_deadline
            self._first = False
        else:
            self._reader.deadline = time.monotonic() + limits.idle_s
        self.server.set_idle(self.request, True)
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except (OSError, ValueError):  # timed out, evicted: an idle connection we close
            self.close_connection = True
            return
        self.server.set_idle(self.request, False)
        self._reader.deadline = time.monotonic() + limits.request_s
        super().handle_one_request()

    def version_string(self) -> str:
        return self.server_version

    def handle_expect_100(self) -> bool:
        accepted = super().handle_expect_100()
        self.wfile.flush()  # the interim answer must not wait in the write buffer
        return accepted

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format % args, extra=_client(self.client_address))

    def _start_response(self, code: int) -> None:
        # Reads left the socket timeout at whatever time the request had left.
        self.request.settimeout(self.server.limits.request_s)
        self.send_response(code)

    def _send_text(self, code: int, text: str, *, close: bool = False) -> None:
        data = text.encode()
        self._start_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self._start_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == HEALTHZ:
            self._send_text(200, "ok\n")
        else:
            self._send_text(404, f"no route {_printable(urlsplit(self.path).path)}\n")

    def _bad(self, code: int, message: str, *, close: bool = False) -> None:
        self.server.count("bad_requests")
        log.info(
            "bad admission request",
            extra={**_client(self.client_address), "code": code, "error": message},
        )
        self._send_text(code, message + "\n", close=close)

    def do_POST(self) -> None:
        started = time.monotonic()
        route = urlsplit(self.path).path
        limit = self.server.limits.max_body_bytes
        # Every refusal before the body is read closes the connection: the unread body
        # would otherwise be taken for the next request.
        if route not in ROUTES:
            self._bad(404, f"no route {_printable(route)}", close=True)
            return
        if self.headers.get("Transfer-Encoding"):
            self._bad(411, "chunked bodies are not accepted: send Content-Length", close=True)
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._bad(411, "Content-Length is required", close=True)
            return
        try:
            length = int(length_header)
        except ValueError:
            self._bad(400, f"Content-Length {_printable(length_header)!r} is no number", close=True)
            return
        if length < 0 or length > limit:
            self._bad(413, f"body of {length} bytes is over the {limit}-byte limit", close=True)
            return
        try:
            body = self.rfile.read(length)
        except OSError:  # timed out or the peer went away: nobody to answer
            self.close_connection = True
            return
        if len(body) < length:
            self.close_connection = True
            return
        try:
            request = parse_review(body)
        except BadReview as exc:
            self._bad(400, f"not an AdmissionReview: {exc}")
            return
        response = self.server.review(route, request)
        self._send_json(response)
        self._log_review(route, request, response, started)

    def _log_review(
        self, route: str, request: dict[str, Any], response: dict[str, Any], started: float
    ) -> None:
        obj = request.get("object")
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        kind = request.get("kind")
        answer = response["response"]
        namespace = _printable(request.get("namespace") or meta.get("namespace"))
        name = _printable(request.get("name") or meta.get("name"))
        # Not "name": LogRecord owns that key, and logging raises on a clash. A raise
        # here, after the answer was buffered, cost the API server its keep-alive
        # connection on every review (ADR 0006 addendum).
        fields = {
            "route": route,
            "operation": _printable(request.get("operation")),
            "kind": _printable(kind.get("kind") if isinstance(kind, dict) else ""),
            "object": f"{namespace}/{name}" if namespace else name,
            "uid": _printable(request.get("uid")),
            "allowed": answer["allowed"],
            "patched": "patch" in answer,
            "ms": round((time.monotonic() - started) * 1000, 2),
        }
        if not answer["allowed"]:
            fields["reason"] = _printable(answer["status"]["message"])
        log.info("admission reviewed", extra=fields)


class WebhookServer:
    """The webhook on ``host:port`` (port 0: any free port), bound at construction and
    serving from a daemon thread after :meth:`start`."""

    def __init__(
        self,
        cert_file: Path | str,
        key_file: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        vm_lookup: VmLookup | None = None,
        config: KernelConfig = DEFAULT_CONFIG,
        limits: Limits = Limits(),
        client_ca: Path | str | None = None,
    ) -> None:
        self.vm_lookup, self.config = vm_lookup, config
        certificates = _Certificates(
            Path(cert_file), Path(key_file), None if client_ca is None else Path(client_ca)
        )
        self._server = _Server((host, port), certificates, self.review, limits)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def counts(self) -> dict[str, int]:
        """reviews, bad_requests, rule_errors, refused_connections, evicted_idle since
        the start."""
        with self._server.lock:
            return dict(self._server.counts)

    def review(self, route: str, request: dict[str, Any]) -> dict[str, Any]:
        """The AdmissionReview response for ``request`` (already checked by
        ``parse_review``) on ``route``; never raises."""
        self._server.count("reviews")
        try:
            if route == VALIDATE_VM:
                return validate_vm_review(request)
            if route == MUTATE_VM:
                return mutate_vm_review(request, self.config)
            if route == MUTATE_POD:
                return mutate_pod_review(request, self.vm_lookup, self.config)
            raise ValueError(f"no route {route}")
        except Exception as exc:  # a bug in a rule: refuse (fail closed), never a 500
            self._server.count("rule_errors")
            log.exception("admission rule failed", extra={"route": route})
            return refuse(
                str(request["uid"]),
                f"the chscale webhook could not judge this object: {exc!r}",
                code=500,
                reason="InternalError",
            )

    def start(self) -> WebhookServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, end open connections, release the port."""
        if self._thread is not None:
            self._server.shutdown()  # waits for serve_forever, so only once it runs
        self._server.close_connections(timeout)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> WebhookServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_server(
    cert_file: Path | str,
    key_file: Path | str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    vm_lookup: VmLookup | None = None,
    config: KernelConfig = DEFAULT_CONFIG,
    limits: Limits = Limits(),
    client_ca: Path | str | None = None,
) -> WebhookServer:
    """A :class:`WebhookServer` already serving from a daemon thread; ``stop()`` it."""
    return WebhookServer(
        cert_file, key_file, host, port, vm_lookup, config, limits, client_ca
    ).start()
