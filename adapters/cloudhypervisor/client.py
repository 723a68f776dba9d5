"""A blocking client for the Cloud Hypervisor HTTP API on a Unix socket (RESIZE.md s. 6).

HTTP is ``requests`` over ``requests_unixsocket``'s adapter, connection pool and
connection (the library speaks HTTP/1.1 and its framings: ``Content-Length``, chunked,
end of connection). What chscale adds, in small subclasses of those three (ADR 0011):

- **the connect**: the connection's ``connect()`` calls the client's ``connect`` callable
  (:func:`~adapters.cloudhypervisor.podsocket.connect_path`, or the daemon's
  :class:`~adapters.cloudhypervisor.podsocket.PodSocket`, which checks the pod's socket
  and the process behind it and connects through the very file it checked). No path is
  taken from the URL, whose host is a fixed name;
- **one deadline per call**, from the connect to the last byte of the answer (not the
  library's timeout per read: a VMM that dribbles a byte a second is cut off at the
  deadline all the same). The connected socket is adopted by :class:`_DeadlineSocket`,
  whose every ``recv``/``send`` first sets the socket's timeout to the time left and
  fails once none is. Every blocking wait of the library is one of those, so no call can
  outlast its deadline by more than the parsing of one buffer, and no watchdog thread is
  needed (there is nothing to cancel or to leak);
- **bounded answers**: the head (status line and headers, and the read-ahead of the
  library's 8 KiB buffer) is cut at :data:`MAX_HEADER_BYTES` by the same socket; the body
  is read with ``stream=True`` in bounded pieces, undecoded, and an answer over
  ``max_body_bytes`` is refused from its ``Content-Length`` or as soon as it grows past
  the limit (chunked or framed by the end of the connection), never buffered.

One request per connection (``Connection: close``; an adapter, a pool and a connection
per call, all closed when it ends) and no retries: ``vm.create`` and ``vm.boot`` are not
idempotent, and every call checks the socket again. A client keeps nothing between calls,
so the daemon's workers may share one.

Action endpoints (boot, pause, resume, shutdown) are sent without a body, as Cloud
Hypervisor answers 400 to a body there; ``resize`` sends only the fields it is given,
because virtio-mem refuses to be set to the size it already has.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from requests_unixsocket.adapters import UnixAdapter, UnixHTTPConnection, UnixHTTPConnectionPool

from adapters.cloudhypervisor.errors import (
    CloudHypervisorError,
    MalformedResponse,
    ResponseTooLarge,
    VmmBusy,
    VmmError,
    VmmUnreachable,
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
_READ = 64 << 10
# The connection is made by the ``connect`` callable, never from the URL: its host only
# names the pool.
_URL = f"http+unix://vmm{API_BASE}"
_CONTENT_LENGTH = re.compile(r"[0-9]+")

Connector = Callable[[float], socket.socket]
"""``timeout`` -> a connected stream socket to the VMM (raises CloudHypervisorError or
OSError)."""


class _HeadTooLarge(Exception):
    """Raised inside the library's header parsing; no library catches it on the way."""


class _ConnectFailed(Exception):
    """The connector failed with an OSError; ``timed_out`` if it ran out of time."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.message, self.timed_out = message, timed_out


class _DeadlineSocket(socket.socket):
    """A connected socket whose every operation is held to one absolute deadline."""

    deadline: float
    head_budget: int | None  # bytes the head may still take; None once it is read
    expired: bool
    head_too_large: bool

    @classmethod
    def adopt(cls, sock: socket.socket, deadline: float) -> _DeadlineSocket:
        family, kind, proto = sock.family, sock.type, sock.proto
        adopted = cls(family, kind, proto, sock.detach())
        adopted.deadline = deadline
        adopted.head_budget = MAX_HEADER_BYTES
        adopted.expired = adopted.head_too_large = False
        return adopted

    def settimeout(self, value: float | None) -> None:
        """Ignored: the deadline sets the timeout before each operation, so the library's
        timeout per read cannot lengthen it."""

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("the call's deadline has passed")
        super().settimeout(left)

    def _took(self, size: int) -> None:
        if self.head_budget is None:
            return
        self.head_budget -= size
        if self.head_budget < 0:
            self.head_too_large = True
            raise _HeadTooLarge(f"head over {MAX_HEADER_BYTES} bytes")

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        try:
            size = super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            self.expired = True
            raise
        self._took(size)
        return size

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:
            self.expired = True
            raise
        self._took(len(data))
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()  # one timeout for all of sendall (Python >= 3.5)
        try:
            super().sendall(data, flags)
        except TimeoutError:
            self.expired = True
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        try:
            return super().send(data, flags)
        except TimeoutError:
            self.expired = True
            raise


class _Call:
    """One call's deadline, its connector and (once connected) its socket."""

    def __init__(self, connect: Connector, timeout: float) -> None:
        self.connect, self.timeout = connect, timeout
        self.deadline = time.monotonic() + timeout
        self.sock: _DeadlineSocket | None = None

    @property
    def expired(self) -> bool:
        return self.sock is not None and self.sock.expired

    @property
    def head_too_large(self) -> bool:
        return self.sock is not None and self.sock.head_too_large


class _Connection(UnixHTTPConnection):
    def __init__(self, call: _Call) -> None:
        # The library's timeout is only bookkeeping here: the socket ignores it.
        super().__init__(_URL, timeout=call.timeout)
        self._chscale_call = call

    def connect(self) -> None:
        call = self._chscale_call
        left = call.deadline - time.monotonic()
        if left <= 0:
            raise _ConnectFailed("no time left to connect", timed_out=True)
        # VmmUntrusted and VmmUnreachable from the connector pass through the library
        # untouched (neither catches anything but its own errors and OSError).
        try:
            sock = call.connect(left)
        except TimeoutError as exc:
            raise _ConnectFailed("timed out", timed_out=True) from exc
        except OSError as exc:
            raise _ConnectFailed(f"cannot connect: {exc}", timed_out=False) from exc
        self.sock = call.sock = _DeadlineSocket.adopt(sock, call.deadline)


class _Pool(UnixHTTPConnectionPool):
    def __init__(self, call: _Call) -> None:
        super().__init__(_URL, timeout=call.timeout)
        self._chscale_call = call

    def _new_conn(self) -> _Connection:
        return _Connection(self._chscale_call)


class _Adapter(UnixAdapter):
    """requests' transport for one call: one pool, one connection, no retry."""

    def __init__(self, call: _Call) -> None:
        super().__init__(max_retries=0)
        self._pool = _Pool(call)

    def get_connection(self, url: str, proxies: Any = None) -> _Pool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


# Before v53 Cloud Hypervisor answered 500 for a missing VM; its message names the cause:
# "VM is not created" (vm.info, vm.resize) or "VM config is missing" (vm.boot).
_NOT_CREATED = re.compile(r"not\s*created|config\s*is\s*missing|missing\s*config", re.IGNORECASE)
# The router's own 404 (an endpoint this VMM does not have), as opposed to a missing VM.
_UNKNOWN_ENDPOINT = "Not Found"


def error_chain(response: requests.Response) -> tuple[str, ...]:
    """The VMM's error messages, outermost first: a JSON array of strings (>= v47), or
    the plain text of older releases as one message; the reason phrase for a bare status."""
    text = response.content.decode("utf-8", "replace").strip()
    if not text:
        return (response.reason or f"HTTP {response.status_code}",)
    try:
        value = json.loads(text)
    except ValueError:
        return (text,)
    if isinstance(value, list) and value and all(isinstance(part, str) for part in value):
        return tuple(value)
    return (text,)


def error_message(response: requests.Response) -> str:
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
        """Nothing to release: every call has a pool and a connection of its own, closed
        when it ends."""

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
            value = json.loads(response.content)
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

    def delete(self) -> None:
        self._call("PUT", "vm.delete")

    def shutdown_vmm(self) -> None:
        self._call("PUT", "vmm.shutdown")

    # ---- plumbing -----------------------------------------------------------------

    def _typed(self, endpoint: str, cls: type[Any]) -> Any:
        response = self._call("GET", endpoint)
        try:
            # JSON is UTF-8 (RFC 8259): no guessing of the charset from the body.
            return structure(json.loads(response.content), cls)
        except ValueError as exc:
            raise self._malformed(endpoint, response, str(exc)) from exc

    def _read_body(self, endpoint: str, response: requests.Response) -> bytes:
        """The body, refused once over ``max_body_bytes``. Read undecoded (a
        ``Content-Encoding`` is not ours to inflate: a small gzip can be a huge body)."""
        limit = self.max_body_bytes
        if "chunked" not in response.headers.get("Transfer-Encoding", "").lower():
            declared = response.headers.get("Content-Length")
            if declared is not None:
                if not _CONTENT_LENGTH.fullmatch(declared):
                    raise VmmUnreachable(
                        self.socket_path,
                        endpoint,
                        f"bad HTTP answer: bad Content-Length {declared[:40]!r}",
                    )
                if int(declared) > limit:
                    raise ResponseTooLarge(
                        self.socket_path,
                        endpoint,
                        response.status_code,
                        f"body of {declared} bytes is over the {limit}-byte limit",
                    )
        body = bytearray()
        while chunk := response.raw.read(min(_READ, limit + 1 - len(body)), decode_content=False):
            body += chunk
            if len(body) > limit:
                raise ResponseTooLarge(
                    self.socket_path,
                    endpoint,
                    response.status_code,
                    f"body of {len(body)}+ bytes is over the {limit}-byte limit",
                )
        return bytes(body)

    def _broken(self, call: _Call, endpoint: str, exc: BaseException) -> VmmUnreachable:
        """What the library raised, said as the call's own limits explain it."""
        if call.expired or isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
            why = f"no complete answer within {self.timeout}s"
        elif call.head_too_large:
            why = f"bad HTTP answer: head over {MAX_HEADER_BYTES} bytes"
        elif call.sock is None:
            why = f"cannot connect: {exc}"
        else:
            why = f"bad or broken HTTP answer: {exc}"
        return VmmUnreachable(self.socket_path, endpoint, why)

    def _malformed(self, endpoint: str, response: requests.Response, why: str) -> VmmError:
        return MalformedResponse(self.socket_path, endpoint, response.status_code, why)

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None
    ) -> requests.Response:
        headers = {"Accept": "application/json", "Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = requests.Request(method, _URL + endpoint, headers=headers, data=data).prepare()
        call = _Call(self._connect, self.timeout)
        adapter = _Adapter(call)
        response: requests.Response | None = None
        try:
            response = adapter.send(request, stream=True, timeout=self.timeout)
            if call.sock is not None:
                call.sock.head_budget = None  # the head is read; the body has its own limit
            # What requests itself does when it reads a body, so that .content and .text
            # work as on any requests.Response.
            response._content = self._read_body(endpoint, response)
            response._content_consumed = True
        except _ConnectFailed as exc:
            why = f"no answer within {self.timeout}s" if exc.timed_out else exc.message
            raise VmmUnreachable(self.socket_path, endpoint, why) from exc
        except CloudHypervisorError:
            raise  # the connector's VmmUntrusted/VmmUnreachable, ResponseTooLarge
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            _HeadTooLarge,
            OSError,
        ) as exc:
            raise self._broken(call, endpoint, exc) from exc
        finally:
            if response is not None:
                response.close()
            adapter.close()
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
