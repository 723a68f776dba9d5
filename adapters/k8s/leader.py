"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it.

The holder renews ``renewTime`` every ``retry_period``; a candidate takes the lease when
``renewTime + leaseDurationSeconds`` has passed (measured on its own clock from when it
last saw the record change, so clock skew between machines does not matter). Every
write carries the resourceVersion it read: two candidates can never both win. A leader
that cannot renew within ``renew_deadline`` stops leading before anyone else may start.
On a graceful stop the lease is released so a successor takes over at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from adapters.k8s.client import ApiError, Conflict, Kube, NotFound

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started = on_started_leading
        self.on_stopped = on_stopped_leading
        self.clock = clock
        self._leading = False
        self._stop = threading.Event()
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._last_renew = 0.0

    def is_leader(self) -> bool:
        return self._leading

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._try_acquire_or_renew()
                except ApiError as exc:
                    log.info("lease attempt failed", extra={"lease": self.name, "error": str(exc)})
                if self._leading and self.clock() - self._last_renew > self.renew_deadline:
                    self._set_leading(False)  # could not renew in time: step down first
                self._stop.wait(self.retry_period)
        finally:
            if self._leading:
                self._release()
                self._set_leading(False)

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        log.info(
            "leadership changed",
            extra={"lease": self.name, "identity": self.identity, "leading": leading},
        )
        callback = self.on_started if leading else self.on_stopped
        if callback is not None:
            callback()

    def _spec(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_now()
        spec = dict(previous or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if previous and previous.get("holderIdentity") else 0
            )
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = int(self.lease_duration)
        spec["renewTime"] = now
        return spec

    def _try_acquire_or_renew(self) -> None:
        try:
            lease = self.kube.get(f"{self.path}/{self.name}")
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None),
            }
            try:
                self.kube.create(self.path, body)
            except ApiError:
                return  # someone else created it first
            self._last_renew = self.clock()
            self._set_leading(True)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, str(spec.get("renewTime")))
        now = self.clock()
        if observed != self._observed:
            self._observed, self._observed_at = observed, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = now - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            self._set_leading(False)
            return
        body = {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": self._spec(spec),
        }
        try:
            self.kube.patch(f"{self.path}/{self.name}", body)
        except Conflict:
            return
        self._last_renew = self.clock()
        self._set_leading(True)

    def _release(self) -> None:
        try:
            lease = self.kube.get(f"{self.path}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            self.kube.patch(
                f"{self.path}/{self.name}",
                {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {
                        "holderIdentity": "",
                        "renewTime": _micro_now(),
                        "leaseDurationSeconds": 1,
                    },
                },
            )
        except ApiError as exc:
            log.info("lease release failed", extra={"lease": self.name, "error": str(exc)})
