"""Kubernetes Events with client-go's aggregation: a repeat bumps a count, never spams.

core/v1 Events are used (not events.k8s.io/v1) because ``kubectl describe`` and every
dashboard show them with their count, and their ``count``/``lastTimestamp`` fields carry
exactly the aggregation we need.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from adapters.k8s.client import Kube, NotFound

log = logging.getLogger(__name__)

# A repeat older than this starts a new Event, as client-go's correlator does.
AGGREGATION_WINDOW_S = 600.0
CACHE_SIZE = 4096


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(
        self, kube: Kube, component: str, host: str | None = None, clock: Any = time.monotonic
    ) -> None:
        self.kube = kube
        self.component = component
        self.host = host or socket.gethostname()
        self.clock = clock
        self._seen: OrderedDict[tuple[str, ...], tuple[str, str, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.written = 0
        self.aggregated = 0

    def record(self, regarding: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an event about ``regarding``; never raises (events are best effort)."""
        try:
            self._record(regarding, type_, reason, message[:1024])
        except Exception as exc:
            log.warning(
                "event not recorded",
                extra={"reason": reason, "error": str(exc)},
            )

    def _record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        key = (str(meta.get("uid")), type_, reason, message)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[3] > AGGREGATION_WINDOW_S:
                seen = None
            if seen is not None:
                self._seen.move_to_end(key)
        if seen is not None:
            ns, name, count, _ = seen
            try:
                self.kube.patch(
                    f"/api/v1/namespaces/{ns}/events/{name}",
                    {"count": count + 1, "lastTimestamp": _now()},
                )
                self._remember(key, (ns, name, count + 1, now))
                self.aggregated += 1
                return
            except NotFound:
                pass  # expired on the server (events have a TTL); write a new one
        name = f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:16]}"
        stamp = _now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
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
        self.kube.create(f"/api/v1/namespaces/{namespace}/events", body)
        self.written += 1
        self._remember(key, (namespace, name, 1, now))

    def _remember(self, key: tuple[str, ...], value: tuple[str, str, int, float]) -> None:
        with self._lock:
            self._seen[key] = value
            self._seen.move_to_end(key)
            while len(self._seen) > CACHE_SIZE:
                self._seen.popitem(last=False)
