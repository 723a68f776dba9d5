"""The reconcile loop shared by the controller and the daemon (controller-runtime style):
take a key, reconcile it, then forget its backoff and schedule the kernel's requeue hint
or the periodic resync; on a conflict re-read at once; on an error back off per key."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from apps.common.logs import kv
from core.constants import VM_NAME_LABEL

log = logging.getLogger(__name__)


class Cache(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(self) -> list[dict[str, Any]]: ...

    def observe_write(self, obj: dict[str, Any]) -> None: ...


class Queue(Protocol):
    def add(self, key: str) -> None: ...

    def add_after(self, key: str, delay: float) -> None: ...

    def add_rate_limited(self, key: str) -> None: ...

    def forget(self, key: str) -> None: ...

    def get(self) -> str | None: ...

    def done(self, key: str) -> None: ...


class Metrics(Protocol):
    def reconciled(self, result: str) -> None: ...

    def resize_done(self, outcome: str, seconds: float) -> None: ...


def run_worker(
    queue: Queue,
    reconcile: Callable[[str], float | None],
    metrics: Metrics,
    is_conflict: Callable[[BaseException], bool],
    resync_s: float,
    stop: threading.Event,
) -> None:
    while not stop.is_set():
        key = queue.get()
        if key is None:
            return  # the queue shut down
        try:
            after = reconcile(key)
        except Exception as exc:
            if is_conflict(exc):
                # Re-read and re-decide, but with the key's backoff: a cache lagging the
                # API server would otherwise turn one stale object into a PATCH storm.
                metrics.reconciled("conflict")
                queue.add_rate_limited(key)
            else:
                metrics.reconciled("error")
                log.warning("reconcile failed", exc_info=True, extra=kv(vm=key))
                queue.add_rate_limited(key)
        else:
            metrics.reconciled("ok")
            queue.forget(key)
            queue.add_after(key, after if after is not None else resync_s)
        finally:
            queue.done(key)


class Reconciler:
    """What the controller and the daemon share: pod events map to their VM's key, and
    workers run :meth:`reconcile` under :func:`run_worker`'s guarantees."""

    resync_s = 300.0

    def __init__(
        self, queue: Queue, metrics: Metrics, is_conflict: Callable[[BaseException], bool]
    ) -> None:
        self.queue, self.metrics, self.is_conflict = queue, metrics, is_conflict
        self._stop = threading.Event()

    def on_pod(self, _event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        vm_name = (meta.get("labels") or {}).get(VM_NAME_LABEL)
        if vm_name:
            self.queue.add(f"{meta.get('namespace')}/{vm_name}")

    def reconcile(self, key: str) -> float | None:
        raise NotImplementedError

    def run_worker(self) -> None:
        run_worker(
            self.queue, self.reconcile, self.metrics, self.is_conflict, self.resync_s, self._stop
        )

    def stop(self) -> None:
        self._stop.set()
