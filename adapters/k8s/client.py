"""The one place chscale talks HTTP to the API server.

Objects stay plain JSON dicts (camelCase, as the API server sends them): the official
client's model classes cost far more CPU and memory than the controller can afford with a
thousand VMs in flight, and the kernel's wire layer reads dicts anyway. The official
client still provides what it is good at: kubeconfig and in-cluster loading, TLS and
credentials (its configured urllib3 pool and auth headers).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
DEFAULT_TIMEOUT = 30.0


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status fields."""

    def __init__(
        self,
        status: int,
        reason: str = "",
        message: str = "",
        causes: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message
        self.causes = causes or []


class NotFound(ApiError):
    pass


class AlreadyExists(ApiError):
    pass


class Conflict(ApiError):
    """The object changed since it was read (optimistic concurrency): re-read, re-decide."""


class Forbidden(ApiError):
    pass


class Gone(ApiError):
    """A watch's resourceVersion is too old: relist."""


class Unavailable(ApiError):
    """The API server could not be reached, or answered 5xx/429."""


def _error(status: int, body: bytes) -> ApiError:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    reason = str(data.get("reason") or "")
    message = str(data.get("message") or body[:500].decode("utf-8", "replace"))
    details = data.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    causes = causes if isinstance(causes, list) else []
    cls: type[ApiError] = ApiError
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = AlreadyExists if reason == "AlreadyExists" else Conflict
    elif status == 403:
        cls = Forbidden
    elif status == 410:
        cls = Gone
    elif status == 429 or status >= 500:
        cls = Unavailable
    return cls(status, reason, message, causes)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, Conflict)


def node_capacity_refusal(exc: BaseException) -> str | None:
    """The message of a 403 from the 1.36 PodResizeValidator (cause NodeCapacity)."""
    if isinstance(exc, Forbidden) and any(
        isinstance(c, dict) and c.get("type") == "NodeCapacity" for c in exc.causes
    ):
        return exc.message
    return None


class Kube:
    """Raw JSON access through the official client's connection settings."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client
        self.host = api_client.configuration.host.rstrip("/")
        self.pool: urllib3.PoolManager = api_client.rest_client.pool_manager

    def _headers(self, method: str, path: str, content_type: str | None) -> dict[str, str]:
        headers: dict[str, str] = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        # Adds the bearer token / basic auth the kubeconfig names (client certificates
        # are already in the pool's TLS settings).
        self.api_client.update_params_for_auth(headers, [], ["BearerToken"], path, method, None)
        return headers

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        url = self.host + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        return url

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        content_type: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        if data is not None and content_type is None:
            content_type = "application/json"
        try:
            resp = self.pool.request(
                method,
                self._url(path, query),
                body=data,
                headers=self._headers(method, path, content_type),
                timeout=urllib3.Timeout(connect=5.0, read=timeout),
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(0, "Unreachable", str(exc)) from exc
        if not 200 <= resp.status < 300:
            raise _error(resp.status, resp.data)
        return json.loads(resp.data) if resp.data else {}

    def stream(self, path: str, query: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
        """A watch: one decoded event per line until the server closes the stream."""
        try:
            resp = self.pool.request(
                "GET",
                self._url(path, query),
                headers=self._headers("GET", path, None),
                timeout=urllib3.Timeout(connect=5.0, read=timeout),
                preload_content=False,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(0, "Unreachable", str(exc)) from exc
        try:
            if not 200 <= resp.status < 300:
                raise _error(resp.status, resp.read())
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()

    # --- conveniences ---------------------------------------------------------------

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def delete(self, path: str, *, grace_period_seconds: int | None = None) -> None:
        body = None
        if grace_period_seconds is not None:
            body = {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": grace_period_seconds,
            }
        with contextlib.suppress(NotFound):
            self.request("DELETE", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=content_type)

    def patch_status(
        self, path: str, status: dict[str, Any], resource_version: str
    ) -> dict[str, Any]:
        """Merge-patch ``status``; the resourceVersion makes it conditional (409 if stale)."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return self.patch(f"{path}/status", body)

    def resize_pod(
        self, namespace: str, name: str, container: str, cpu: str, memory: str
    ) -> dict[str, Any]:
        """PATCH ``pods/resize``: requests = limits for one container; returns the pod."""
        values = {"cpu": cpu, "memory": memory}
        body = {
            "spec": {
                "containers": [
                    {"name": container, "resources": {"requests": values, "limits": values}}
                ]
            }
        }
        return self.patch(f"/api/v1/namespaces/{namespace}/pods/{name}/resize", body, STRATEGIC)


def load_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """From a kubeconfig file, or from the pod's service account when run in-cluster."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    # Many workers share one client: give the pool room for them and for watches.
    configuration.connection_pool_maxsize = 32
    return k8s.ApiClient(configuration)
