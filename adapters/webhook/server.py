"""The admission webhook's HTTPS server.

Stdlib only (``http.server`` + ``ssl``): three routes and a health check do not need a
framework. It never answers 500 and never hangs: bodies are bounded, sockets time out,
anything that is not an AdmissionReview gets a 400 with the reason, and any unexpected
error in a rule is logged and answered as a denial (failurePolicy Fail semantics) rather
than taking the connection down. The certificate and key are re-read when they change.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from adapters.webhook.admission import (
    BadReview,
    VmLookup,
    allow,
    deny,
    mutate_pod_review,
    mutate_vm_review,
    parse_review,
    validate_vm_review,
)
from core.model import FieldError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
SOCKET_TIMEOUT_S = 10.0


class _Tls:
    """An SSLContext that follows the certificate files on disk."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] | None = None
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        stamp = (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)
        with self._lock:
            if self._context is None or stamp != self._stamp:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self.cert, self.key)
                if self._context is not None:
                    log.info("webhook certificate reloaded", extra={"cert": str(self.cert)})
                self._context, self._stamp = ctx, stamp
            return self._context


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], tls: _Tls, lookup: VmLookup | None) -> None:
        super().__init__(address, _Handler)
        self.tls, self.lookup = tls, lookup

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.settimeout(SOCKET_TIMEOUT_S)
        # The handshake happens on first read, in the worker thread, so a slow client
        # cannot stall the accept loop.
        wrapped = self.tls.context().wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error", exc_info=True, extra={"client": str(client_address)})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any] | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header(
            "Content-Type", "application/json" if isinstance(body, dict) else "text/plain"
        )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, "ok\n")
        else:
            self._send(404, "not found\n")

    def do_POST(self) -> None:
        started = time.monotonic()
        route = self.path.split("?", 1)[0]
        if route not in ("/mutate-vm", "/validate-vm", "/mutate-pod"):
            self._drain()
            self._send(404, f"no route {route}\n")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send(400, "Content-Length is required\n")
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._send(413, f"body larger than {MAX_BODY} bytes\n")
            return
        body = self.rfile.read(length)
        try:
            request = parse_review(body)
        except BadReview as exc:
            self._send(400, f"{exc}\n")
            return
        try:
            if route == "/validate-vm":
                response = validate_vm_review(request)
            elif route == "/mutate-vm":
                response = mutate_vm_review(request)
            else:
                response = mutate_pod_review(request, self.server.lookup)
        except Exception as exc:  # a rule crashed on odd input: refuse, never 500
            log.exception("admission rule failed", extra={"route": route})
            response = deny(request["uid"], [FieldError("object", f"cannot be judged: {exc}")])
        if not isinstance(response, dict):
            response = allow(request["uid"])
        self._send(200, response)
        log.debug(
            "reviewed",
            extra={
                "route": route,
                "object": _describe(request),
                "allowed": response["response"]["allowed"],
                "ms": round((time.monotonic() - started) * 1000, 2),
            },
        )

    def _drain(self) -> None:
        try:
            length = min(int(self.headers.get("Content-Length", "0")), MAX_BODY)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(length)


def _describe(request: dict[str, Any]) -> str:
    return f"{request.get('namespace') or ''}/{request.get('name') or ''}"


class WebhookServer:
    def __init__(
        self,
        cert_file: Path | str,
        key_file: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        vm_lookup: VmLookup | None = None,
    ) -> None:
        self._server = _Server((host, port), _Tls(Path(cert_file), Path(key_file)), vm_lookup)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"https://{self._server.server_address[0]}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook", daemon=True
        )
        self._thread.start()

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
