"""A loopback HTTP proxy in front of the API server that misbehaves on request.

One :class:`ApiProxy` stands between one component (the controller, or one node's
daemon) and kube-apiserver. The component gets a kubeconfig that points at the proxy
(plain HTTP on 127.0.0.1, no credentials: :meth:`ApiProxy.write_kubeconfig`); the proxy
forwards every request over TLS with the admin client certificate of the real
kubeconfig. Without faults it is transparent: bodies, statuses and the newline-delimited
JSON of watch streams pass unchanged.

Faults, all switched on and off at run time from another thread:

- :meth:`fail_next`: the next ``count`` calls of a :class:`CallClass` get a Kubernetes
  ``Status`` with 409, 429 or 500 instead of reaching the server;
- :meth:`hang_next`: the next ``count`` calls are held, then the connection is cut
  without an answer, either before the call reaches the server or after (the write
  happened; the component does not know);
- :meth:`set_watch_faults`: watch events are held back by a delay, sent twice, or
  swapped with their successor, until a deadline;
- :meth:`drop_watches`: every open watch is cut (the informer resumes from its last
  resourceVersion).

The proxy also counts what passes, per call class and per pod for ``pods/resize``, so a
checker can bound the number of resize requests (RESIZE.md §8, invariant 5).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import queue
import re
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from adapters.k8s.client import load_api_client
from apps.common.logs import kv
from testbed.faults.schedule import CallClass

log = logging.getLogger("chscale.faults.proxy")

UPSTREAM_TIMEOUT_S = 60.0
WATCH_UPSTREAM_TIMEOUT_S = 600.0
REORDER_WAIT_S = 0.3  # how long a held-back event waits for a successor to swap with
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "authorization"}
)
_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError"}
_POD_RESIZE = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/resize$")
_VM_ITEM = re.compile(r"^/apis/[^/]+/[^/]+/namespaces/[^/]+/virtualmachines/([^/]+)(/status)?$")
_EVENTS = re.compile(r"/events(/[^/]+)?$")
_POD_COLLECTION = re.compile(r"^/api/v1/namespaces/[^/]+/pods$")
_COLLECTION = re.compile(r"^/(api/v1|apis/[^/]+/[^/]+)(/namespaces/[^/]+)?/[a-z]+$")


def classify(method: str, path: str, query: str) -> CallClass:
    """Which :class:`CallClass` an API request belongs to."""
    params = parse_qs(query)
    if method == "GET" and params.get("watch", [""])[0] in ("true", "1"):
        return CallClass.WATCH
    if method == "PATCH" and _POD_RESIZE.match(path):
        return CallClass.POD_RESIZE
    vm = _VM_ITEM.match(path)
    if vm and method in ("PUT", "PATCH"):
        return CallClass.VM_STATUS if vm.group(2) else CallClass.VM_PATCH
    if method == "POST" and _POD_COLLECTION.match(path):
        return CallClass.POD_CREATE
    if method in ("POST", "PATCH", "PUT") and _EVENTS.search(path):
        return CallClass.EVENT
    if method == "GET" and _COLLECTION.match(path):
        return CallClass.LIST
    return CallClass.OTHER


def status_body(code: int, message: str) -> bytes:
    """A Kubernetes ``Status`` as the API server would send it."""
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": _REASONS.get(code, "InternalError"),
            "code": code,
        }
    ).encode()


class _Rule:
    def __init__(self, call: CallClass, count: int, status: int, hang_s: float, after: bool):
        self.call, self.left, self.status = call, count, status
        self.hang_s, self.after_upstream = hang_s, after


class _WatchFaults:
    def __init__(self, until: float, delay: float, duplicate: bool, reorder: bool) -> None:
        self.until, self.delay, self.duplicate, self.reorder = until, delay, duplicate, reorder

    def active(self) -> bool:
        return time.monotonic() < self.until


_NO_WATCH_FAULTS = _WatchFaults(0.0, 0.0, False, False)


class ApiProxy:
    """See the module docstring. ``start()`` binds 127.0.0.1 on a free port."""

    def __init__(self, name: str, upstream_kubeconfig: Path) -> None:
        self.name = name
        config = load_api_client(str(upstream_kubeconfig)).configuration
        url = urlsplit(config.host)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"proxy {name}: upstream {config.host!r} is not an https URL")
        self.upstream_host, self.upstream_port = url.hostname, url.port or 443
        self._ssl = ssl.create_default_context(cafile=config.ssl_ca_cert)
        if config.cert_file:
            self._ssl.load_cert_chain(config.cert_file, config.key_file)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._watch_faults = _NO_WATCH_FAULTS
        self._watch_generation = 0  # bumped by drop_watches(); open watches compare
        self.calls: Counter[str] = Counter()
        self.pod_resizes: Counter[str] = Counter()  # "namespace/pod" -> 2xx answers
        self.injected: Counter[str] = Counter()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=f"proxy-{self.name}",
        )
        self._thread.start()
        log.info("proxy listening", extra=kv(proxy=self.name, port=self.port))

    def stop(self) -> None:
        self.drop_watches()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for the component: the proxy, no credentials (it adds them)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # --- faults ---------------------------------------------------------------------------

    def fail_next(self, call: CallClass, status: int, count: int) -> None:
        with self._lock:
            self._rules.append(_Rule(call, count, status, 0.0, False))

    def hang_next(self, call: CallClass, count: int, hang_s: float, after_upstream: bool) -> None:
        with self._lock:
            self._rules.append(_Rule(call, count, 0, hang_s, after_upstream))

    def set_watch_faults(
        self, duration: float, delay: float = 0.0, duplicate: bool = False, reorder: bool = False
    ) -> None:
        with self._lock:
            self._watch_faults = _WatchFaults(
                time.monotonic() + duration, delay, duplicate, reorder
            )

    def drop_watches(self) -> None:
        with self._lock:
            self._watch_generation += 1

    def clear(self) -> None:
        """No more faults; calls already held finish as they were told."""
        with self._lock:
            self._rules.clear()
            self._watch_faults = _NO_WATCH_FAULTS

    # --- used by the handler --------------------------------------------------------------

    def _take_rule(self, call: CallClass) -> _Rule | None:
        with self._lock:
            self.calls[call] += 1
            for rule in self._rules:
                if rule.call is call and rule.left > 0:
                    rule.left -= 1
                    kind = f"status-{rule.status}" if rule.status else "timeout"
                    self.injected[f"{call}:{kind}"] += 1
                    return rule
            self._rules = [r for r in self._rules if r.left > 0]
        return None

    def _watch_state(self) -> tuple[_WatchFaults, int]:
        with self._lock:
            return self._watch_faults, self._watch_generation

    def _count_injected(self, what: str) -> None:
        with self._lock:
            self.injected[what] += 1

    def _upstream(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.upstream_host, self.upstream_port, timeout=timeout, context=self._ssl
        )

    def injected_total(self) -> int:
        with self._lock:
            return sum(self.injected.values())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A component that hangs up mid-answer (its own timeout, a SIGKILL) is routine
        # here; the stdlib would print a traceback for each.
        log.debug("proxy connection failed", exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: ApiProxy
    _conn: http.client.HTTPSConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test output

    def do_GET(self) -> None:
        self._proxy()

    def do_POST(self) -> None:
        self._proxy()

    def do_PUT(self) -> None:
        self._proxy()

    def do_PATCH(self) -> None:
        self._proxy()

    def do_DELETE(self) -> None:
        self._proxy()

    def finish(self) -> None:
        with contextlib.suppress(Exception):
            super().finish()
        if self._conn is not None:
            self._conn.close()

    def _proxy(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        call = classify(self.command, url.path, url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        rule = owner._take_rule(call)
        if rule is not None and rule.status:
            self._answer(
                rule.status, status_body(rule.status, f"injected by chscale faults ({call})")
            )
            return
        if rule is not None and not rule.after_upstream:
            self._cut(rule.hang_s)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if call is CallClass.WATCH:
            if rule is not None:  # the watch reaches the API server; its answer never comes
                self._watch_lost(headers, rule.hang_s)
            else:
                self._watch(headers)
            return
        try:
            status, reason, resp_headers, data = self._forward(headers, body)
        except (OSError, http.client.HTTPException) as exc:
            log.warning(
                "upstream failed", extra=kv(proxy=owner.name, path=url.path, error=str(exc))
            )
            self._answer(503, status_body(503, f"proxy: upstream failed: {exc}"))
            return
        if rule is not None:
            self._cut(rule.hang_s)  # the call took effect; its answer is lost
            return
        if call is CallClass.POD_RESIZE and 200 <= status < 300:
            match = _POD_RESIZE.match(url.path)
            assert match is not None
            with owner._lock:
                owner.pod_resizes[f"{match.group(1)}/{match.group(2)}"] += 1
        self._answer(status, data, resp_headers, reason)

    def _forward(
        self, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (0, 1):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = self.owner._upstream(UPSTREAM_TIMEOUT_S)
            try:
                self._conn.request(self.command, self.path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                # A kept-alive connection the server closed: retry once on a new one,
                # but only reads (a write may have happened).
                if fresh or attempt or self.command != "GET":
                    raise
                continue
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
            if resp.will_close:
                self._conn.close()
                self._conn = None
            return resp.status, resp.reason, kept, data
        raise AssertionError("unreachable")

    def _answer(
        self,
        status: int,
        data: bytes,
        headers: list[tuple[str, str]] | None = None,
        reason: str | None = None,
    ) -> None:
        self.send_response(status, reason)
        if headers is None:
            headers = [("Content-Type", "application/json")]
            if status == 429:
                headers.append(("Retry-After", "1"))
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _cut(self, hang_s: float) -> None:
        """Hold the call, then close the connection without a word (a timeout)."""
        time.sleep(hang_s)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # --- watches -------------------------------------------------------------------------

    def _watch_lost(self, headers: dict[str, str], hang_s: float) -> None:
        conn = self.owner._upstream(WATCH_UPSTREAM_TIMEOUT_S)
        try:
            conn.request("GET", self.path, headers=headers)
            conn.getresponse()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        self._cut(hang_s)

    def _watch(self, headers: dict[str, str]) -> None:
        owner = self.owner
        conn = owner._upstream(WATCH_UPSTREAM_TIMEOUT_S)
        try:
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._answer(503, status_body(503, f"proxy: upstream watch failed: {exc}"))
            return
        if resp.status != 200:
            data = resp.read()
            conn.close()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
            self._answer(resp.status, data, kept, resp.reason)
            return
        self.send_response(200)
        self.send_header("Content-Type", resp.getheader("Content-Type") or "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
        _, generation = owner._watch_state()

        def read() -> None:
            try:
                while True:
                    line = resp.readline()
                    if not line:
                        break
                    lines.put((time.monotonic(), line))
            except Exception:
                pass
            lines.put((time.monotonic(), None))

        reader = threading.Thread(target=read, daemon=True, name=f"proxy-{owner.name}-watch")
        reader.start()
        try:
            if self._relay(lines, generation):
                self.wfile.write(b"0\r\n\r\n")  # the server ended it: keep the connection
            else:
                # Cut: no end of stream, the connection just breaks (as a network would).
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True  # the component closed its watch
        finally:
            with contextlib.suppress(OSError):
                conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _relay(self, lines: queue.Queue[tuple[float, bytes | None]], generation: int) -> bool:
        """Pass the events on, faults applied; False if the watch was cut."""
        owner = self.owner
        held: bytes | None = None
        while True:
            faults, current = owner._watch_state()
            if current != generation:
                owner._count_injected("watch:drop")
                return False
            try:
                arrived, line = lines.get(timeout=REORDER_WAIT_S if held else 0.5)
            except queue.Empty:
                if held is not None:
                    self._send(held)
                    held = None
                continue
            if line is None:
                if held is not None:
                    self._send(held)
                return True
            if faults.active() and faults.delay:
                wait = arrived + faults.delay - time.monotonic()
                if wait > 0:
                    owner._count_injected("watch:delay")
                    time.sleep(wait)
            if faults.active() and faults.reorder and held is None and b'"BOOKMARK"' not in line:
                held = line
                continue
            self._send(line)
            if held is not None:
                owner._count_injected("watch:reorder")
                self._send(held)
                held = None
            if faults.active() and faults.duplicate and b'"BOOKMARK"' not in line:
                owner._count_injected("watch:duplicate")
                self._send(line)

    def _send(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            line += b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()
