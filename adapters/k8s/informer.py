"""List-then-watch one resource into a cache of plain JSON dicts.

Semantics follow client-go's reflector: list at a resourceVersion, watch from it with
bookmarks, relist on 410 Gone, reconnect with capped, jittered backoff on errors. The
cache never goes backwards: an object's entry is only replaced by one with a higher
resourceVersion, which also lets :meth:`Informer.observe_write` insert the answer to our
own write before its watch event arrives (the controller must never decide on a view
older than its own last write).

Cached dicts are shared, not copied, for speed with thousands of objects: callers treat
them as read-only (everything in chscale parses them into frozen kernel values at once).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from adapters.k8s.client import Gone, Kube

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]
Key = tuple[str, str]

WATCH_TIMEOUT_S = 240  # server side; a normal watch ends and is resumed at the last version


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _rv(obj: dict[str, Any]) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def newer(candidate: dict[str, Any], current: dict[str, Any] | None) -> bool:
    if current is None:
        return True
    a, b = _rv(candidate), _rv(current)
    if a is None or b is None:
        return True  # opaque versions: trust the most recent arrival
    return a >= b


class Informer:
    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        name: str = "",
        resync_backoff_cap: float = 30.0,
    ) -> None:
        self.kube = kube
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.name = name or path
        self._cache: dict[Key, dict[str, Any]] = {}
        # Deleted keys remember their last version so a late, older event cannot revive them.
        self._tombstones: dict[Key, int] = {}
        self._lock = threading.Lock()
        self._handlers: list[Handler] = []
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resource_version: str | None = None
        self._backoff_cap = resync_backoff_cap
        self.relists = 0

    # --- reading ------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._cache.get((namespace, name))

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._cache.values())

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    # --- writing ------------------------------------------------------------------------

    def observe_write(self, obj: dict[str, Any]) -> None:
        """Insert the answer to our own write if it is newer than what we hold."""
        self._apply("MODIFIED", obj, notify=False)

    def _apply(self, event: str, obj: dict[str, Any], notify: bool = True) -> None:
        key = _key(obj)
        with self._lock:
            current = self._cache.get(key)
            if event == "DELETED":
                if current is not None and not newer(obj, current):
                    return
                self._cache.pop(key, None)
                rv = _rv(obj)
                if rv is not None:
                    self._tombstones[key] = rv
            else:
                tomb = self._tombstones.get(key)
                rv = _rv(obj)
                if tomb is not None and rv is not None and rv <= tomb:
                    return
                if not newer(obj, current):
                    return
                self._tombstones.pop(key, None)
                self._cache[key] = obj
        if notify:
            self._notify(event, obj)

    def _notify(self, event: str, obj: dict[str, Any]) -> None:
        for handler in self._handlers:
            try:
                handler(event, obj)
            except Exception:
                log.exception("informer handler failed", extra={"informer": self.name})

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _selectors(self) -> dict[str, Any]:
        return {"labelSelector": self.label_selector, "fieldSelector": self.field_selector}

    def _relist(self) -> None:
        listing = self.kube.request("GET", self.path, query=self._selectors(), timeout=60.0)
        items = listing.get("items") or []
        kind = listing.get("kind", "").removesuffix("List")
        api_version = listing.get("apiVersion")
        fresh: dict[Key, dict[str, Any]] = {}
        for item in items:
            # List items omit kind/apiVersion; events and owner references want them.
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
            fresh[_key(item)] = item
        with self._lock:
            vanished = [obj for key, obj in self._cache.items() if key not in fresh]
        for obj in vanished:
            self._apply("DELETED", obj)
        for item in fresh.values():
            with self._lock:
                existed = _key(item) in self._cache
            self._apply("MODIFIED" if existed else "ADDED", item)
        self._resource_version = (listing.get("metadata") or {}).get("resourceVersion")
        self.relists += 1
        self._synced.set()

    def _watch(self) -> None:
        query = {
            **self._selectors(),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": self._resource_version,
            "timeoutSeconds": WATCH_TIMEOUT_S,
        }
        for event in self.kube.stream(self.path, query, timeout=WATCH_TIMEOUT_S + 30):
            if self._stop.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(410, "Expired", str(obj.get("message")))
                raise RuntimeError(f"watch error: {obj.get('message')}")
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind == "BOOKMARK":
                self._resource_version = rv
                continue
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, obj)
                self._resource_version = rv

    def _run(self) -> None:
        failures = 0
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._relist()
                    need_list = False
                self._watch()
                failures = 0
            except Gone:
                log.info("watch expired; relisting", extra={"informer": self.name})
                need_list = True
            except Exception as exc:
                failures += 1
                delay = min(0.2 * 2 ** min(failures, 10), self._backoff_cap)
                delay *= 0.5 + random.random()  # jitter: do not stampede a recovering server
                log.warning(
                    "watch failed; retrying",
                    extra={"informer": self.name, "error": str(exc), "retry_s": round(delay, 2)},
                )
                if self._stop.wait(delay):
                    return
                need_list = need_list or self._resource_version is None
