"""List-then-watch one resource into a thread-safe cache of plain JSON dicts.

Theory of operation (client-go's reflector, in one thread per informer):

1. **List** (paged) without a resourceVersion, i.e. a consistent read. The cache is
   *replaced* by the listing: new keys are ``ADDED``, changed ones ``MODIFIED``, and
   cached objects the listing lacks are ``DELETED`` (synthetic: the watch that would
   have said so was lost). An object whose resourceVersion is newer than the listing's
   was written by us after the snapshot (:meth:`Informer.observe_write`) and is kept.
   One the listing shows at the very version of our own write is announced as
   ``MODIFIED`` if its watch event had not come yet: the relist replaces that event,
   and a controller waits for it to decide again after its own write.
2. **Watch** from the listing's resourceVersion with ``allowWatchBookmarks=true``; each
   event and each bookmark advances the resourceVersion we would resume from. The server
   ends a watch after ``timeoutSeconds`` (randomised so informers do not reconnect in
   lockstep): that is normal, and the watch resumes where it stopped.
3. **410 Gone** (an HTTP status, or an ``ERROR`` event with code 410) means the
   resourceVersion fell out of the server's window: list again (step 1). Any other
   ``ERROR`` event or API refusal also relists, after a backoff. A broken connection
   resumes the watch from the last resourceVersion after a capped, jittered exponential
   backoff (a relist is only needed if the server then says 410). The backoff grows only
   over failures in a row: a watch that ran for a while before it broke starts it anew.

The cache never goes backwards: an entry is replaced only by an equal or newer
resourceVersion (compared as integers; an opaque version is trusted as the newer), and a
deleted key keeps a tombstone so a late, older write cannot revive it. This is what lets
:meth:`Informer.observe_write` insert the answer to our own write before its watch event
arrives, so a controller never decides on a view older than its own last write.

Cached objects are **frozen**, not copied: every dict in them is a :class:`FrozenDict`
and every list a :class:`FrozenList` (subclasses of ``dict`` and ``list`` that refuse
mutation with ``TypeError``). Freezing costs one walk per watch event; copying on every
``get`` would cost a walk per read, and reads outnumber events many times over with a
thousand VMs reconciled from the cache. ``copy.deepcopy`` (or :func:`thaw`) of a cached
object returns plain, mutable dicts and lists; ``json.dumps`` works as on any dict.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from adapters.k8s.client import (
    ApiError,
    ClientLike,
    Gone,
    Kube,
    Unavailable,
    WatchStream,
    as_kube,
    error_from_status,
    resource_path,
)

log = logging.getLogger(__name__)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
Handler = Callable[[str, Mapping[str, Any]], None]
Key = tuple[str, str]

# Server-side watch length; each watch asks for a random length between this and twice it.
WATCH_TIMEOUT_S = 240.0
# Client-side read allowance beyond the server's timeout before the stream counts as dead.
WATCH_READ_SLACK_S = 30.0
LIST_TIMEOUT_S = 60.0
LIST_PAGE_SIZE = 500
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 30.0
# A watch that ends sooner than this counts as a failure for backoff: a server that
# accepts and at once closes must not make us spin.
MIN_HEALTHY_WATCH_S = 1.0
TOMBSTONE_LIMIT = 10_000
STOP_JOIN_S = 5.0

_READ_ONLY = "informer cache objects are read-only: copy.deepcopy() one to change it"


def _read_only(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError(_READ_ONLY)


class FrozenDict(dict[str, Any]):
    """A ``dict`` that refuses mutation (``copy.deepcopy`` gives a plain, mutable one)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, _memo: dict[int, Any]) -> dict[str, Any]:
        return thaw(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class FrozenList(list[Any]):
    """A ``list`` that refuses mutation (``copy.deepcopy`` gives a plain, mutable one)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, _memo: dict[int, Any]) -> list[Any]:
        return thaw(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))


def freeze(value: Any) -> Any:
    """A read-only deep copy of a JSON value (frozen parts are shared, not copied)."""
    if isinstance(value, dict):
        if type(value) is FrozenDict:
            return value
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        if type(value) is FrozenList:
            return value
        return FrozenList([freeze(v) for v in value])
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a (possibly frozen) JSON value."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value


def object_key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _int_rv(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _rv(obj: Mapping[str, Any]) -> int | None:
    return _int_rv((obj.get("metadata") or {}).get("resourceVersion"))


def newer(candidate: Mapping[str, Any], current: Mapping[str, Any] | None, *, strict: bool) -> bool:
    """Does ``candidate`` replace ``current``? Versions compare as integers when both
    parse as integers (what kube-apiserver with etcd sends); an opaque version cannot be
    ordered, so the candidate (the most recent arrival) wins."""
    if current is None:
        return True
    a, b = _rv(candidate), _rv(current)
    if a is None or b is None:
        return True
    return a > b if strict else a >= b


class _WatchError(Exception):
    """An ``ERROR`` event other than 410: the watch is unusable; relist."""


class Informer:
    """A cache of one resource, kept current by list+watch in a daemon thread.

    Name the resource by ``path`` (its collection URL) or by ``group``/``version``/
    ``plural`` (``group=""`` for the core API), optionally confined to ``namespace`` and
    filtered by ``label_selector`` / ``field_selector`` (e.g. ``spec.nodeName=node-a``).
    """

    def __init__(
        self,
        kube: ClientLike | None,
        path: str | None = None,
        *,
        group: str = "",
        version: str = "v1",
        plural: str | None = None,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        name: str = "",
        watch_timeout: float = WATCH_TIMEOUT_S,
        page_size: int = LIST_PAGE_SIZE,
        backoff_base: float = BACKOFF_BASE_S,
        backoff_cap: float = BACKOFF_CAP_S,
    ) -> None:
        if (path is None) == (plural is None):
            raise ValueError("Informer: give exactly one of path and plural")
        if plural is not None:
            path = resource_path(group, version, plural, namespace)
        elif namespace is not None:
            raise ValueError("Informer: namespace goes with plural, not with path")
        assert path is not None
        if watch_timeout <= 0:
            raise ValueError(f"Informer: watch_timeout must be > 0, got {watch_timeout}")
        if not 0 < backoff_base <= backoff_cap:
            raise ValueError(
                f"Informer: need 0 < backoff_base <= backoff_cap, got {backoff_base}, {backoff_cap}"
            )
        self.kube: Kube | None = None if kube is None else as_kube(kube)
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.name = name or path
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._cache: dict[Key, FrozenDict] = {}
        self._tombstones: OrderedDict[Key, int] = OrderedDict()
        # Keys whose cached version came from observe_write and has not been announced
        # to the handlers yet (its watch event is still to come).
        self._unannounced: set[Key] = set()
        self._lock = threading.Lock()
        self._handlers: list[Handler] = []
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: WatchStream | None = None
        self._resource_version: str | None = None
        self.relists = 0

    # --- reading ------------------------------------------------------------------------

    def get(self, namespace: str, name: str) -> FrozenDict | None:
        """The cached object (read-only), or ``None``. Cluster-scoped: ``namespace=""``."""
        with self._lock:
            return self._cache.get((namespace, name))

    def list(self) -> list[FrozenDict]:
        """Every cached object (read-only), in a new list the caller may reorder."""
        with self._lock:
            return list(self._cache.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def resource_version(self) -> str | None:
        """Where the watch resumes: the last event's, bookmark's or listing's version."""
        return self._resource_version

    def add_handler(self, handler: Handler) -> None:
        """Call ``handler(event_type, obj)`` for every ``ADDED``/``MODIFIED``/``DELETED``
        (watch events and a relist's synthetic ones), on the informer's thread, in order.
        Handlers should only enqueue; an exception is logged and does not stop others."""
        with self._lock:
            self._handlers = [*self._handlers, handler]

    def wait_synced(self, timeout: float | None) -> bool:
        """True once the first listing is in the cache (waits up to ``timeout`` s)."""
        return self._synced.wait(timeout)

    # --- writing ------------------------------------------------------------------------

    def observe_write(self, obj: Mapping[str, Any]) -> bool:
        """Insert the API server's answer to our own write if its resourceVersion is newer
        than the cached one (or cannot be compared), so that the next read sees at least
        our write; the watch event that follows replaces it without going backwards.
        Handlers are not called (the watch event will). Returns whether it was taken.

        Only for objects this informer watches (same resource, matching its selectors).
        """
        return self._apply(MODIFIED, obj, notify=False, strict=True)

    def _apply(
        self, event: str, obj: Mapping[str, Any], *, notify: bool = True, strict: bool = False
    ) -> bool:
        key = object_key(obj)
        rv = _rv(obj)
        frozen = freeze(obj)
        with self._lock:
            current = self._cache.get(key)
            if current is not None and not newer(frozen, current, strict=strict):
                return False
            tomb = self._tombstones.get(key)
            if current is None and tomb is not None and rv is not None and rv <= tomb:
                return False  # a late echo of an object already deleted
            if event == DELETED:
                self._cache.pop(key, None)
                self._bury(key, rv)
            else:
                self._tombstones.pop(key, None)
                self._cache[key] = frozen
            if notify:
                self._unannounced.discard(key)
            else:
                self._unannounced.add(key)
            handlers = self._handlers
        if notify:
            self._notify(handlers, event, frozen)
        return True

    def _bury(self, key: Key, rv: int | None) -> None:
        if rv is None:
            return
        self._tombstones[key] = rv
        self._tombstones.move_to_end(key)
        while len(self._tombstones) > TOMBSTONE_LIMIT:
            self._tombstones.popitem(last=False)

    def _notify(self, handlers: list[Handler], event: str, obj: FrozenDict) -> None:
        for handler in handlers:
            try:
                handler(event, obj)
            except Exception:
                namespace, name = object_key(obj)
                log.exception(
                    "informer handler failed",
                    extra={"informer": self.name, "object": f"{namespace}/{name}"},
                )

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        if self.kube is None:
            raise RuntimeError(f"informer {self.name}: no API client to list and watch with")
        if self._thread is not None:
            raise RuntimeError(f"informer {self.name}: already started")
        self._thread = threading.Thread(target=self._run, name=f"informer:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_JOIN_S) -> None:
        """Stop watching (the open watch is closed at once) and wait for the thread."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _selectors(self) -> dict[str, Any]:
        return {"labelSelector": self.label_selector, "fieldSelector": self.field_selector}

    def _list(self) -> tuple[list[dict[str, Any]], str | None]:
        assert self.kube is not None
        items: list[dict[str, Any]] = []
        query: dict[str, Any] = {**self._selectors(), "limit": self.page_size}
        paged = True
        while True:
            try:
                page = self.kube.request("GET", self.path, query=query, timeout=LIST_TIMEOUT_S)
            except Gone:
                if not paged:
                    raise
                # The continue token expired between pages: one unpaged list instead.
                items, paged = [], False
                query = self._selectors()
                continue
            kind = str(page.get("kind") or "").removesuffix("List")
            api_version = page.get("apiVersion")
            for item in page.get("items") or ():
                # List items of built-in types omit kind/apiVersion; events and owner
                # references made from cached objects need them.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, meta.get("resourceVersion")
            query = {**query, "continue": token}

    def _relist(self) -> None:
        items, list_rv = self._list()
        fresh = {object_key(item): freeze(item) for item in items}
        list_rv_int = _int_rv(list_rv)
        events: list[tuple[str, FrozenDict]] = []
        with self._lock:
            for key, obj in list(self._cache.items()):
                if key in fresh:
                    continue
                rv = _rv(obj)
                if rv is not None and list_rv_int is not None and rv > list_rv_int:
                    continue  # our own write, newer than the listing: not deleted
                del self._cache[key]
                self._unannounced.discard(key)
                self._bury(key, rv)
                events.append((DELETED, obj))
            for key, obj in fresh.items():
                current = self._cache.get(key)
                # Our own write (observe_write) whose watch event the relist replaces is
                # announced now: a controller that waits for the echo of its write to
                # decide again would otherwise wait until the next resync.
                unannounced = key in self._unannounced
                if current is None:
                    self._cache[key] = obj
                    events.append((ADDED, obj))
                elif newer(obj, current, strict=not unannounced):
                    self._cache[key] = obj
                    events.append((MODIFIED, obj))
                else:
                    continue  # still newer than the listing: its watch event follows
                self._unannounced.discard(key)
            if list_rv_int is not None:
                # The listing is the truth up to its version: older tombstones are moot.
                for key in [k for k, rv in self._tombstones.items() if rv <= list_rv_int]:
                    del self._tombstones[key]
            self._resource_version = list_rv
            handlers = self._handlers
        self.relists += 1
        log.info(
            "informer listed",
            extra={
                "informer": self.name,
                "objects": len(fresh),
                "resource_version": list_rv,
                "changes": len(events),
            },
        )
        for event, obj in events:
            self._notify(handlers, event, obj)
        self._synced.set()

    def _watch(self) -> None:
        assert self.kube is not None
        # Spread reconnects: informers started together must not all return at once.
        server_timeout = int(self.watch_timeout * (1.0 + random.random())) or 1
        query = {
            **self._selectors(),
            "allowWatchBookmarks": True,
            "resourceVersion": self._resource_version,
            "timeoutSeconds": server_timeout,
        }
        stream = self.kube.open_watch(self.path, query, timeout=server_timeout + WATCH_READ_SLACK_S)
        self._stream = stream
        try:
            if self._stop.is_set():
                return
            for event in stream:
                if self._stop.is_set():
                    return
                self._handle(event)
        finally:
            self._stream = None
            stream.close()

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = _int_rv(obj.get("code")) or 0
            if code == 410:
                raise Gone(410, str(obj.get("reason") or "Expired"), str(obj.get("message")))
            raise _WatchError(str(error_from_status(code, obj)))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self._resource_version = rv
            return
        if kind in (ADDED, MODIFIED, DELETED):
            self._apply(kind, obj)
            if rv:
                self._resource_version = rv
            return
        log.warning("unknown watch event ignored", extra={"informer": self.name, "type": kind})

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_base * 2 ** min(failures - 1, 30), self.backoff_cap)
        return min(delay * (0.5 + random.random()), self.backoff_cap)  # jitter: no stampede

    def _run(self) -> None:
        failures = 0
        need_list = True
        healthy_after = min(MIN_HEALTHY_WATCH_S, self.watch_timeout)
        while not self._stop.is_set():
            delay = 0.0
            started: float | None = None
            try:
                if need_list:
                    self._relist()
                    need_list = False
                started = time.monotonic()
                self._watch()
                if time.monotonic() - started >= healthy_after:
                    failures = 0
                else:
                    failures += 1
                    delay = self._backoff(failures)
            except Gone as exc:
                # Expected now and then (compaction, an API server restart): relist at once;
                # only a relist that keeps ending in 410 backs off.
                failures += 1
                need_list = True
                delay = self._backoff(failures) if failures > 1 else 0.0
                log.info(
                    "watch expired; relisting",
                    extra={"informer": self.name, "error": exc.message},
                )
            except Exception as exc:
                if self._stop.is_set():
                    return
                if started is not None and time.monotonic() - started >= healthy_after:
                    # A watch that ran well and then broke is a fresh failure, not the
                    # next in a series: else every cut over a long life adds up and a
                    # daemon ends up 30 s deaf after a routine network blip.
                    failures = 0
                failures += 1
                delay = self._backoff(failures)
                if isinstance(exc, _WatchError) or (
                    isinstance(exc, ApiError) and not isinstance(exc, Unavailable)
                ):
                    need_list = True
                need_list = need_list or self._resource_version is None
                log.warning(
                    "list/watch failed; retrying",
                    extra={
                        "informer": self.name,
                        "error": str(exc),
                        "retry_s": round(delay, 3),
                        "relist": need_list,
                    },
                )
            if delay and self._stop.wait(delay):
                return
