"""The one place chscale talks HTTP to the API server.

Objects stay plain JSON dicts (camelCase, exactly as the API server sends them): the
official client's model classes cost far more CPU and memory than the controller can
afford with a thousand VMs in flight, and the kernel's wire layer reads dicts anyway
(ADR 0004). The official client still provides what it is good at: kubeconfig and
in-cluster loading, TLS and credentials. :class:`Kube` sends requests through the
client's configured urllib3 pool with the client's auth headers and decodes the bodies
with :func:`json.loads`.

Two ways in, same behaviour:

- :class:`Kube` methods (``request``, ``get``, ``create``, ``put``, ``patch``,
  ``patch_status``, ``delete``, ``resize_pod``, ``open_watch``);
- module functions taking an official ``ApiClient`` or a :class:`Kube`: :func:`get_json`,
  :func:`patch_json`, :func:`update_status`, :func:`resize_pod`.

Every non-2xx answer raises a typed :class:`ApiError` carrying the Status fields.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from urllib.parse import quote, urlencode

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PatchType = Literal["merge", "strategic", "json"]
PATCH_CONTENT_TYPES: dict[str, str] = {"merge": MERGE, "strategic": STRATEGIC, "json": JSON_PATCH}

DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
# Many workers and every informer's watch share one client's pool.
POOL_SIZE = 32
WATCH_READ_CHUNK = 65536
ERROR_BODY_PREVIEW = 500


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status fields.

    ``status`` is the HTTP status (0 when the server could not be reached), ``reason``
    the Status reason (``Conflict``, ``Forbidden``, ...), ``message`` the server's text
    and ``causes`` the list under ``status.details.causes`` (each a dict with ``type``,
    ``message``, ``field``), by which e.g. a 403 with cause ``NodeCapacity`` is told
    apart from an RBAC refusal.
    """

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

    def has_cause(self, cause_type: str) -> bool:
        return any(isinstance(c, dict) and c.get("type") == cause_type for c in self.causes)


class NotFound(ApiError):
    pass


class AlreadyExists(ApiError):
    pass


class Conflict(ApiError):
    """The object changed since it was read (optimistic concurrency): re-read, re-decide."""


class Forbidden(ApiError):
    pass


class Gone(ApiError):
    """A watch's or a list continuation's resourceVersion is too old: relist."""


class Unavailable(ApiError):
    """The API server could not be reached, or answered 5xx/429: try again later."""


NODE_CAPACITY_CAUSE = "NodeCapacity"


def error_from_status(status: int, body: bytes | Mapping[str, Any]) -> ApiError:
    """The typed error for an HTTP status and its (JSON Status) body."""
    data: Any
    if isinstance(body, Mapping):
        data = body
    else:
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
    if not isinstance(data, Mapping):
        data = {}
    reason = str(data.get("reason") or "")
    message = data.get("message")
    if not message and isinstance(body, bytes):
        message = body[:ERROR_BODY_PREVIEW].decode("utf-8", "replace")
    details = data.get("details")
    causes = details.get("causes") if isinstance(details, Mapping) else None
    causes = [dict(c) for c in causes if isinstance(c, Mapping)] if isinstance(causes, list) else []
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
    return cls(status, reason, str(message or ""), causes)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, Conflict)


def node_capacity_refusal(exc: BaseException) -> str | None:
    """The message of a 403 whose cause is ``NodeCapacity`` (the 1.36 PodResizeValidator,
    or chscale's webhook playing it), else ``None``."""
    if isinstance(exc, Forbidden) and exc.has_cause(NODE_CAPACITY_CAUSE):
        return exc.message
    return None


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resource_path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a resource: ``group=""`` is the core API (``/api/v1``)."""
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{plural}"
    if name:
        path += f"/{quote(name, safe='')}"
        if subresource:
            path += f"/{subresource}"
    elif subresource:
        raise ValueError(f"subresource {subresource!r} needs a name")
    return path


class WatchStream:
    """One open watch: iterate for decoded events (dicts with ``type`` and ``object``)
    until the server ends the stream; :meth:`close` from any thread ends it early."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self._closed = False
        self._finished = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buffer = b""
        try:
            for chunk in self._response.stream(WATCH_READ_CHUNK, decode_content=True):
                if self._closed:
                    return
                buffer += chunk
                if b"\n" not in chunk:
                    continue
                # Split once per chunk: one event can span chunks, one chunk many events.
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip() and not self._closed:
                yield json.loads(buffer)
            self._finished = not self._closed
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if self._closed:
                return  # our own close() interrupted the read
            raise Unavailable(0, "WatchInterrupted", str(exc)) from exc
        finally:
            self._release()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            # Unblocks a read in progress in another thread (urllib3 >= 2.3).
            self._response.shutdown()
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(Exception):
            if not self._finished:
                # A half-read chunked body cannot be reused: never return it to the pool.
                self._response.close()
            self._response.release_conn()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


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
        # Adds the bearer token the kubeconfig or the service account names, refreshed by
        # the client's hook when it expires (client certificates are in the pool's TLS).
        self.api_client.update_params_for_auth(headers, [], ["BearerToken"], path, method, None)
        return headers

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        url = self.host + path
        if query:
            pairs = {k: _query_value(v) for k, v in query.items() if v is not None}
            if pairs:
                url += "?" + urlencode(pairs)
        return url

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, Any] | None = None,
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
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=timeout),
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(0, "Unreachable", f"{method} {path}: {exc}") from exc
        if not 200 <= resp.status < 300:
            raise error_from_status(resp.status, resp.data)
        return json.loads(resp.data) if resp.data else {}

    def open_watch(self, path: str, query: Mapping[str, Any], timeout: float) -> WatchStream:
        """Start a watch (``watch=true`` is added); raises the typed error of a refusal."""
        try:
            resp = self.pool.request(
                "GET",
                self._url(path, {**query, "watch": "true"}),
                headers=self._headers("GET", path, None),
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=timeout),
                preload_content=False,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(0, "Unreachable", f"watch {path}: {exc}") from exc
        if not 200 <= resp.status < 300:
            try:
                raise error_from_status(resp.status, resp.read())
            finally:
                resp.release_conn()
        return WatchStream(resp)

    def stream(
        self, path: str, query: Mapping[str, Any], timeout: float
    ) -> Iterator[dict[str, Any]]:
        """A watch as a generator (closing the generator closes the connection)."""
        watch = self.open_watch(path, query, timeout)
        try:
            yield from watch
        finally:
            watch.close()

    # --- conveniences ---------------------------------------------------------------

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def put(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the object; its ``metadata.resourceVersion`` makes it conditional."""
        return self.request("PUT", path, body)

    def delete(self, path: str, *, grace_period_seconds: int | None = None) -> None:
        """Delete; an object already gone is not an error."""
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
        self, path: str, status: Mapping[str, Any], resource_version: str
    ) -> dict[str, Any]:
        """Merge-patch ``status``; the resourceVersion makes it conditional (409 if stale).

        A merge patch keeps status fields the body does not name: send ``None`` for a
        field to remove it. :func:`update_status` replaces the whole status instead.
        """
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return self.patch(f"{path}/status", body)

    def resize_pod(
        self, namespace: str, name: str, container: str, cpu: str, memory: str
    ) -> dict[str, Any]:
        """PATCH ``pods/{name}/resize``: requests = limits = (cpu, memory) for one container
        (Guaranteed QoS must survive a resize). Returns the pod: its ``metadata.generation``
        is what the kubelet's ``status.observedGeneration`` will acknowledge."""
        values = {"cpu": cpu, "memory": memory}
        body = {
            "spec": {
                "containers": [
                    {"name": container, "resources": {"requests": values, "limits": values}}
                ]
            }
        }
        path = resource_path("", "v1", "pods", namespace, name, "resize")
        return self.patch(path, body, STRATEGIC)


ClientLike = k8s.ApiClient | Kube


def as_kube(client: ClientLike) -> Kube:
    """A :class:`Kube` for an official ``ApiClient`` (cheap: it holds two references)."""
    return client if isinstance(client, Kube) else Kube(client)


def get_json(
    client: ClientLike,
    path: str,
    query: Mapping[str, Any] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """GET ``path`` as a plain dict."""
    return as_kube(client).request("GET", path, query=query, timeout=timeout)


def patch_json(
    client: ClientLike, path: str, body: Any, patch_type: PatchType = "merge"
) -> dict[str, Any]:
    """PATCH ``path`` with a merge (RFC 7386), strategic-merge or JSON (RFC 6902) patch."""
    try:
        content_type = PATCH_CONTENT_TYPES[patch_type]
    except KeyError:
        raise ValueError(
            f"patch_type must be one of {sorted(PATCH_CONTENT_TYPES)}, got {patch_type!r}"
        ) from None
    return as_kube(client).patch(path, body, content_type)


def update_status(
    client: ClientLike,
    group: str,
    version: str,
    plural: str,
    obj: Mapping[str, Any],
    status: Mapping[str, Any],
) -> dict[str, Any]:
    """Replace ``obj``'s status through the status subresource (PUT), conditional on the
    ``metadata.resourceVersion`` of ``obj``: raises :class:`Conflict` when the object
    changed since it was read. Returns the new object."""
    meta = obj.get("metadata") or {}
    for field in ("name", "resourceVersion"):
        if not meta.get(field):
            raise ValueError(f"update_status: metadata.{field} is required, got {meta!r}")
    path = resource_path(group, version, plural, meta.get("namespace"), meta["name"], "status")
    return as_kube(client).put(path, {**obj, "status": status})


def resize_pod(
    client: ClientLike, namespace: str, name: str, container: str, cpu: str, memory: str
) -> dict[str, Any]:
    """See :meth:`Kube.resize_pod`."""
    return as_kube(client).resize_pod(namespace, name, container, cpu, memory)


def load_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """From a kubeconfig file; with ``None``, from the pod's service account when running
    in a pod (``KUBERNETES_SERVICE_HOST`` set), else from the default kubeconfig."""
    configuration = k8s.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = POOL_SIZE
    return k8s.ApiClient(configuration)
