"""A blocking client for the Cloud Hypervisor HTTP API on a Unix socket (RESIZE.md s. 6).

Every call has a timeout. Action endpoints (boot, pause, resume, shutdown) are sent
without a body, as Cloud Hypervisor answers 400 to a body there; ``resize`` sends only
the fields it is given, because virtio-mem refuses to be set to the size it already has.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote

import requests
import requests_unixsocket

from adapters.cloudhypervisor.errors import (
    MalformedResponse,
    VmmBusy,
    VmmError,
    VmmUnreachable,
    VmNotCreated,
)
from adapters.cloudhypervisor.types import VmInfo, VmmPing, structure

log = logging.getLogger(__name__)

API_BASE = "/api/v1/"
DEFAULT_TIMEOUT_S = 5.0
# Before v53 Cloud Hypervisor answered 500 for a missing VM; its message names the cause:
# "VM is not created" (vm.info, vm.resize) or "VM config is missing" (vm.boot).
_NOT_CREATED = re.compile(r"not\s*created|config\s*is\s*missing|missing\s*config", re.IGNORECASE)
# The router's own 404 (an endpoint this VMM does not have), as opposed to a missing VM.
_UNKNOWN_ENDPOINT = "Not Found"


def error_chain(response: requests.Response) -> tuple[str, ...]:
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


def error_message(response: requests.Response) -> str:
    return ": ".join(error_chain(response))


class CloudHypervisorClient:
    """One VMM's API socket. ``vm`` names the VM in logs (the socket path otherwise)."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S, vm: str = "") -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.socket_path = socket_path
        self.timeout = timeout
        self.vm = vm or socket_path
        self._base = f"http+unix://{quote(socket_path, safe='')}{API_BASE}"
        self._session = requests_unixsocket.Session()

    def close(self) -> None:
        self._session.close()

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

    def delete(self) -> None:
        self._call("PUT", "vm.delete")

    def shutdown_vmm(self) -> None:
        self._call("PUT", "vmm.shutdown")

    # ---- plumbing -----------------------------------------------------------------

    def _typed(self, endpoint: str, cls: type[Any]) -> Any:
        response = self._call("GET", endpoint)
        try:
            return structure(response.json(), cls)
        except ValueError as exc:
            raise self._malformed(endpoint, response, str(exc)) from exc

    def _malformed(self, endpoint: str, response: requests.Response, why: str) -> VmmError:
        return MalformedResponse(self.socket_path, endpoint, response.status_code, why)

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None
    ) -> requests.Response:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._session.request(
                method, self._base + endpoint, data=data, headers=headers, timeout=self.timeout
            )
        except requests.Timeout as exc:
            raise VmmUnreachable(
                self.socket_path, endpoint, f"no answer within {self.timeout}s"
            ) from exc
        except requests.ConnectionError as exc:
            raise VmmUnreachable(self.socket_path, endpoint, f"cannot connect: {exc}") from exc
        except requests.RequestException as exc:
            raise VmmUnreachable(self.socket_path, endpoint, str(exc)) from exc
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
