"""A blocking client for the Cloud Hypervisor HTTP API on a Unix socket (RESIZE.md s. 6).

Every call has one deadline, from the connect to the last byte of the answer (not a
timeout per read: a VMM that dribbles a byte a second is cut off at the deadline all the
same), and an answer over ``max_body_bytes`` is refused from its ``Content-Length`` or as
soon as it grows past the limit, never buffered (ADR 0011). The daemon has a handful of
workers for the whole node, so one bad VMM must not hold one for long.

Action endpoints (boot, pause, resume, shutdown) are sent without a body, as Cloud
Hypervisor answers 400 to a body there; ``resize`` sends only the fields it is given,
because virtio-mem refuses to be set to the size it already has.

HTTP/1.1 is spoken directly (one request per connection, ``Connection: close``): the
micro_http server of Cloud Hypervisor answers with ``Content-Length``; chunked answers
and answers framed by the end of the connection are read too, under the same limits.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from adapters.cloudhypervisor.errors import (
    MalformedResponse,
    ResponseTooLarge,
    VmmBusy,
    VmmError,
    VmmUnreachable,
    VmmUntrusted,
    VmNotCreated,
)
from adapters.cloudhypervisor.podsocket import connect_path
from adapters.cloudhypervisor.types import VmInfo, VmmPing, structure

log = logging.getLogger(__name__)

API_BASE = "/api/v1/"
DEFAULT_TIMEOUT_S = 5.0
# vm.info of a VM with many devices is tens of KiB; 4 MiB is far above any real answer
# and far below the daemon's memory limit even with every worker reading one.
DEFAULT_MAX_BODY_BYTES = 4 << 20
MAX_HEADER_BYTES = 64 << 10
_RECV = 64 << 10

Connector = Callable[[float], socket.socket]
"""``timeout`` -> a connected stream socket to the VMM (raises CloudHypervisorError or
OSError)."""


class Response:
    """An HTTP answer, fully read within the call's limits."""

    def __init__(self, status_code: int, reason: str, headers: dict[str, str], body: bytes):
        self.status_code, self.reason, self.headers, self.content = (
            status_code,
            reason,
            headers,
            body,
        )

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Deadline(Exception):
    pass


class _Framing(Exception):
    pass


class _TooLarge(_Framing):
    pass


class _Reader:
    """Reads from ``sock`` until ``deadline`` (monotonic), at most ``limit`` bytes kept."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.buffer = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """One more recv into the buffer; False at the end of the stream."""
        if self.eof:
            return False
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Deadline
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(_RECV)
        except TimeoutError as exc:
            raise _Deadline from exc
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def until(self, marker: bytes, limit: int, what: str) -> bytes:
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                out = bytes(self.buffer[:at])
                del self.buffer[: at + len(marker)]
                return out
            if len(self.buffer) > limit:
                raise _Framing(f"{what} over {limit} bytes")
            if not self.fill():
                raise _Framing(f"connection closed inside the {what}")

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise _Framing(f"connection closed {size - len(self.buffer)} bytes early")
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


def read_response(reader: _Reader, max_body: int, head_only: bool = False) -> Response:
    """Parse one HTTP/1.x answer from ``reader`` (raises _Deadline or _Framing)."""
    head = reader.until(b"\r\n\r\n", MAX_HEADER_BYTES, "header")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _Framing(f"not an HTTP status line: {lines[0][:80]!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Framing(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (204, 304) or 100 <= status < 200:
        return Response(status, reason, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = reader.until(b"\r\n", 1024, "chunk size").split(b";", 1)[0]
            try:
                size = int(size_line.strip() or b"x", 16)
            except ValueError as exc:
                raise _Framing(f"bad chunk size {size_line[:40]!r}") from exc
            if size == 0:
                break
            if len(body) + size > max_body:
                raise _TooLarge(
                    f"body of {len(body) + size}+ bytes is over the {max_body}-byte limit"
                )
            body += reader.exactly(size)
            reader.exactly(2)
        return Response(status, reason, headers, bytes(body))
    if "content-length" in headers:
        raw = headers["content-length"]
        if not raw.isdigit():
            raise _Framing(f"bad Content-Length {raw[:40]!r}")
        length = int(raw)
        if length > max_body:
            raise _TooLarge(f"body of {length} bytes is over the {max_body}-byte limit")
        return Response(status, reason, headers, reader.exactly(length))
    while reader.fill():  # framed by the end of the connection
        if len(reader.buffer) > max_body:
            raise _TooLarge(
                f"body of {len(reader.buffer)}+ bytes is over the {max_body}-byte limit"
            )
    return Response(status, reason, headers, bytes(reader.buffer))


# Before v53 Cloud Hypervisor answered 500 for a missing VM; its message names the cause:
# "VM is not created" (vm.info, vm.resize) or "VM config is missing" (vm.boot).
_NOT_CREATED = re.compile(r"not\s*created|config\s*is\s*missing|missing\s*config", re.IGNORECASE)
# The router's own 404 (an endpoint this VMM does not have), as opposed to a missing VM.
_UNKNOWN_ENDPOINT = "Not Found"


def error_chain(response: Response) -> tuple[str, ...]:
    """The VMM's error messages, outermost first: a JSON array of strings (>= v47), or
    the plain text of older releases as one message; the reason phrase for a bare status."""
    text = response.text.strip()
    if not text:
        return (response.reason or f"HTTP {response.status_code}",)
    try:
        value = json.loads(text)
    except ValueError:
        return (text,)
    if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
        return tuple(value)
    return (text,)


def error_message(response: Response) -> str:
    return ": ".join(error_chain(response))


class CloudHypervisorClient:
    """One VMM's API socket. ``vm`` names the VM in logs (the socket path otherwise).

    ``timeout`` is the deadline of a whole call; ``connect`` opens the socket (by default
    a plain connect to ``socket_path``; the daemon passes a
    :class:`~adapters.cloudhypervisor.podsocket.PodSocket`, see :meth:`for_pod`)."""

    def __init__(
        self,
        socket_path: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        vm: str = "",
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        connect: Connector | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be > 0, got {max_body_bytes}")
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self.vm = vm or socket_path
        self._connect: Connector = connect or (lambda t: connect_path(socket_path, t))

    @classmethod
    def for_pod(
        cls,
        pods_root: str,
        pod_uid: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        vm: str = "",
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        owner_uid: int | None = None,
        check_identity: bool = True,
    ) -> CloudHypervisorClient:
        """The VMM of pod ``pod_uid``, reached only inside that pod's own directory and
        only if the process behind the socket is that pod's (raises VmmUntrusted)."""
        from adapters.cloudhypervisor.podsocket import PodSocket

        opener = PodSocket(pods_root, pod_uid, owner_uid=owner_uid, check_identity=check_identity)
        return cls(opener.path, timeout, vm, max_body_bytes=max_body_bytes, connect=opener)

    def close(self) -> None:
        """Nothing to release: every call has a connection of its own."""

    def __enter__(self) -> CloudHypervisorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- endpoints ----------------------------------------------------------------

    def ping(self) -> VmmPing:
        return self._typed("vmm.ping", VmmPing)

    def create(self, config: dict[str, Any]) -> None:
        self._call("PUT", "vm.create", config)

    def boot(self) -> None:
        self._call("PUT", "vm.boot")

    def info(self) -> VmInfo:
        return self._typed("vm.info", VmInfo)

    def info_raw(self) -> dict[str, Any]:
        """``vm.info`` as decoded JSON, every field kept."""
        response = self._call("GET", "vm.info")
        try:
            value = response.json()
        except ValueError as exc:
            raise self._malformed("vm.info", response, f"not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise self._malformed("vm.info", response, "not a JSON object")
        return value

    def resize(
        self,
        desired_vcpus: int | None = None,
        desired_ram: int | None = None,
        desired_balloon: int | None = None,
    ) -> None:
        body = {
            key: value
            for key, value in (
                ("desired_vcpus", desired_vcpus),
                ("desired_ram", desired_ram),
                ("desired_balloon", desired_balloon),
            )
            if value is not None
        }
        if not body:
            raise ValueError("resize needs desired_vcpus, desired_ram or desired_balloon")
        for key, value in body.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"resize: {key} must be a non-negative integer, got {value!r}")
        self._call("PUT", "vm.resize", body)

    def pause(self) -> None:
        self._call("PUT", "vm.pause")

    def resume(self) -> None:
        self._call("PUT", "vm.resume")

    def shutdown(self) -> None:
        self._call("PUT", "vm.shutdown")

    def shutdown_vmm(self) -> None:
        self._call("PUT", "vmm.shutdown")

    # ---- plumbing -----------------------------------------------------------------

    def _typed(self, endpoint: str, cls: type[Any]) -> Any:
        response = self._call("GET", endpoint)
        try:
            return structure(response.json(), cls)
        except ValueError as exc:
            raise self._malformed(endpoint, response, str(exc)) from exc

    def _malformed(self, endpoint: str, response: Response, why: str) -> VmmError:
        return MalformedResponse(self.socket_path, endpoint, response.status_code, why)

    def _call(self, method: str, endpoint: str, body: dict[str, Any] | None = None) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        head = [
            f"{method} {API_BASE}{endpoint} HTTP/1.1",
            "Host: localhost",
            "Accept: application/json",
            "Connection: close",
        ]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        elif method in ("PUT", "POST"):
            head.append("Content-Length: 0")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._connect(self.timeout)
        except VmmUntrusted:
            raise
        except TimeoutError as exc:
            raise VmmUnreachable(
                self.socket_path, endpoint, f"no answer within {self.timeout}s"
            ) from exc
        except VmmUnreachable:
            raise
        except OSError as exc:
            raise VmmUnreachable(self.socket_path, endpoint, f"cannot connect: {exc}") from exc
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline
            sock.settimeout(left)  # sendall: one timeout for all of it (Python >= 3.5)
            try:
                sock.sendall(request)
            except TimeoutError as exc:
                raise _Deadline from exc
            response = read_response(_Reader(sock, deadline), self.max_body_bytes)
        except _Deadline as exc:
            raise VmmUnreachable(
                self.socket_path, endpoint, f"no complete answer within {self.timeout}s"
            ) from exc
        except _TooLarge as exc:
            raise ResponseTooLarge(self.socket_path, endpoint, 0, str(exc)) from exc
        except _Framing as exc:
            raise VmmUnreachable(self.socket_path, endpoint, f"bad HTTP answer: {exc}") from exc
        except OSError as exc:
            raise VmmUnreachable(self.socket_path, endpoint, f"connection failed: {exc}") from exc
        finally:
            sock.close()
        if response.ok:
            log.debug(
                "vmm call",
                extra={"vm": self.vm, "endpoint": endpoint, "status": response.status_code},
            )
            return response
        status, chain = response.status_code, error_chain(response)
        message = ": ".join(chain)
        log.debug(
            "vmm refused",
            extra={"vm": self.vm, "endpoint": endpoint, "status": status, "error": message},
        )
        if status == 429:
            raise VmmBusy(self.socket_path, endpoint, status, message, chain)
        if endpoint.startswith("vm.") and (
            (status == 404 and message != _UNKNOWN_ENDPOINT)
            or (status == 500 and _NOT_CREATED.search(chain[-1]))
        ):
            raise VmNotCreated(self.socket_path, endpoint, status, message, chain)
        raise VmmError(self.socket_path, endpoint, status, message, chain)
