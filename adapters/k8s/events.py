"""Kubernetes Events with client-go's aggregation: a repeat bumps a count, never spams.

**core/v1 Events, not events.k8s.io/v1.** Both APIs store the same objects; what differs
is how a repeat is written. In core/v1 a repeat is a merge patch of ``count`` and
``lastTimestamp``, which ``kubectl describe`` shows as "(x4 over 3m)" and every
dashboard reads; in events.k8s.io/v1 it is a ``series`` whose count older tools ignore,
and a new Event there needs ``eventTime`` (MicroTime), ``reportingController``,
``reportingInstance`` and ``action`` besides. client-go's classic recorder, which the
kubelet and most controllers still use, writes core/v1 for the same reasons.

**Aggregation, as client-go's event correlator does it.** Events are keyed by (the
object: its uid, or apiVersion/kind/namespace/name without one; type; reason; message).
The first occurrence creates an Event named ``<object>.<unique suffix>``; a repeat within
``window`` seconds of the previous one patches that Event's ``count`` and
``lastTimestamp``; a repeat after the window, or after the server expired the Event
(404), creates a new one. Keys live in an LRU of ``cache_size`` entries, so memory is
bounded; an evicted key simply starts a new Event. Repeats of one key are serialised (a
lock per key) so concurrent workers make one Event with the right count, while writes
for different keys proceed in parallel.

**Best effort.** A failed write is logged (naming the object and reason) and counted in
``failed``; :meth:`EventRecorder.record` never raises into a reconcile.

The I/O is behind :class:`EventSink` (create, patch), so the decisions above are unit
tested with a fake sink; :class:`ApiEventSink` is the real one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs

from adapters.k8s.client import ClientLike, Kube, NotFound, as_kube, resource_path

log = logging.getLogger(__name__)

AGGREGATION_WINDOW_S = 600.0  # client-go's correlator: ten minutes
CACHE_SIZE = 4096  # client-go's LRU size for the same purpose
MESSAGE_LIMIT = 1024
NAME_LIMIT = 253  # a DNS subdomain
DEFAULT_NAMESPACE = "default"  # where client-go puts events about cluster-scoped objects
SUFFIX_HEX = 16


def _rfc3339(moment: datetime) -> str:
    """A core/v1 ``Time``: RFC 3339 in UTC, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@attrs.frozen(slots=True)
class ObjectRef:
    """What an Event is about (its ``involvedObject``)."""

    api_version: str
    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectRef:
        """The reference to an API object (a dict as the API server returns it)."""
        meta = obj.get("metadata") or {}
        if not meta.get("name"):
            raise ValueError("cannot refer to an object without metadata.name")
        return cls(
            api_version=str(obj.get("apiVersion") or ""),
            kind=str(obj.get("kind") or ""),
            name=str(meta["name"]),
            namespace=str(meta.get("namespace") or ""),
            uid=str(meta.get("uid") or ""),
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    def identity(self) -> tuple[str, ...]:
        # The uid tells incarnations of one name apart; without it, the name must do.
        if self.uid:
            return (self.uid,)
        return (self.api_version, self.kind, self.namespace, self.name)

    def as_json(self) -> dict[str, str]:
        ref = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}
        for field, value in (
            ("namespace", self.namespace),
            ("uid", self.uid),
            ("resourceVersion", self.resource_version),
        ):
            if value:
                ref[field] = value
        return ref

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class EventSink(Protocol):
    """Where Events are written: the I/O edge of the recorder."""

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...


class ApiEventSink:
    """core/v1 Events through the API server."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.kube.create(resource_path("", "v1", "events", namespace), body)

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.kube.patch(resource_path("", "v1", "events", namespace, name), body)


@attrs.define(slots=True)
class _Seen:
    """The Event last written for one key; its lock serialises writes for that key."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    namespace: str = ""
    name: str = ""
    count: int = 0
    last_seen: float = 0.0


class EventRecorder:
    """Records Events about objects for ``component`` (reported as ``source.component``,
    ``host`` as ``source.host``, by default this machine's hostname)."""

    def __init__(
        self,
        api_client: ClientLike | None,
        component: str,
        host: str | None = None,
        *,
        sink: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
        window: float = AGGREGATION_WINDOW_S,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if sink is None:
            if api_client is None:
                raise ValueError("EventRecorder: give an api_client or a sink")
            sink = ApiEventSink(as_kube(api_client))
        if cache_size < 1:
            raise ValueError(f"EventRecorder: cache_size must be >= 1, got {cache_size}")
        self.sink = sink
        self.component = component
        self.host = host or socket.gethostname()
        self.clock = clock
        self.wall_clock = wall_clock
        self.window = window
        self.cache_size = cache_size
        self._seen: OrderedDict[tuple[str, ...], _Seen] = OrderedDict()
        self._lock = threading.Lock()
        # Counters for metrics and tests.
        self.written = 0
        self.aggregated = 0
        self.failed = 0

    def cached(self) -> int:
        """How many keys the recorder remembers (at most ``cache_size``)."""
        with self._lock:
            return len(self._seen)

    def record(
        self, regarding: Mapping[str, Any] | ObjectRef, type_: str, reason: str, message: str
    ) -> None:
        """Record an Event (``type_`` is ``Normal`` or ``Warning``) about ``regarding``, an
        API object or an :class:`ObjectRef`. Never raises: failures are logged."""
        label = ""
        try:
            ref = regarding if isinstance(regarding, ObjectRef) else ObjectRef.of(regarding)
            label = str(ref)
            self._record(ref, type_, reason, message[:MESSAGE_LIMIT])
        except Exception as exc:
            with self._lock:
                self.failed += 1
            log.warning(
                "event not recorded",
                extra={"object": label, "reason": reason, "type": type_, "error": str(exc)},
            )

    def _entry(self, key: tuple[str, ...]) -> _Seen:
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                entry = self._seen[key] = _Seen()
                while len(self._seen) > self.cache_size:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(key)
            return entry

    def _record(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        entry = self._entry((*ref.identity(), type_, reason, message))
        with entry.lock:
            now = self.clock()
            fresh = entry.count and now - entry.last_seen <= self.window
            if fresh and self._bump(entry, now):
                return
            self._create(entry, ref, type_, reason, message, now)

    def _bump(self, entry: _Seen, now: float) -> bool:
        """Count a repeat on the existing Event; False if the server no longer has it."""
        stamp = _rfc3339(self.wall_clock())
        try:
            self.sink.patch(
                entry.namespace, entry.name, {"count": entry.count + 1, "lastTimestamp": stamp}
            )
        except NotFound:
            return False  # expired on the server (events have a TTL): write a new one
        entry.count += 1
        entry.last_seen = now
        with self._lock:
            self.aggregated += 1
        return True

    def _create(
        self, entry: _Seen, ref: ObjectRef, type_: str, reason: str, message: str, now: float
    ) -> None:
        namespace = ref.namespace or DEFAULT_NAMESPACE
        suffix = uuid.uuid4().hex[:SUFFIX_HEX]
        name = f"{ref.name[: NAME_LIMIT - SUFFIX_HEX - 1]}.{suffix}"
        stamp = _rfc3339(self.wall_clock())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": ref.as_json(),
            "type": type_,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.component, "host": self.host},
            "reportingComponent": self.component,
            "reportingInstance": self.host,
        }
        self.sink.create(namespace, body)
        entry.namespace, entry.name, entry.count, entry.last_seen = namespace, name, 1, now
        with self._lock:
            self.written += 1
