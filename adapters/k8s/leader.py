"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go does it.

Theory of operation. Every candidate runs :meth:`LeaderElector.run`, which calls
:meth:`LeaderElector.step` every ``retry_period`` (candidates with jitter, so they do not
collide):

- **Expiry is judged on the candidate's own clock.** A candidate notes when it last saw
  the lease record change (holder, renewTime, ...); the lease is free once
  ``leaseDurationSeconds`` have passed since then without a change, or at once if the
  holder is empty (released). Clocks of different machines are never compared, so skew
  does not matter; the price is that a newcomer waits a full duration from its first
  look even if the holder died long before.
- **Every write is conditional** (a PUT carrying the resourceVersion that was read): of
  two candidates taking a free lease one gets 409 Conflict, re-reads, and sees the other
  holding it. Two candidates can never both succeed.
- **The leader steps down before anyone may take over.** It renews every
  ``retry_period``; if it has not renewed for ``renew_deadline`` (< ``lease_duration``)
  it stops leading, and :meth:`is_leader` turns false at that moment even if the thread
  running :meth:`run` is stalled. Seeing another holder also ends leadership at once.
- **No request outlives the renew deadline, and nothing outlives leadership** (ADR 0011).
  Every lease request has a read timeout of ``request_timeout`` (a quarter of the renew
  deadline by default), so a hung API server cannot keep :meth:`step` from noticing that
  it stopped renewing; and a watchdog thread ends leadership (``on_stopped_leading``) the
  moment the renew deadline passes, whatever the elector thread is doing. The controller
  exits there, so a replica that is not certain it leads stops acting at once.
- **Graceful stop releases the lease** (``holderIdentity`` empty,
  ``leaseDurationSeconds`` 1, a fresh ``renewTime``), so a successor takes over on its
  next retry instead of waiting out the lease.

Callbacks: ``on_started_leading`` runs in a thread of its own (like client-go's
goroutine), so a slow start never delays renewals; ``on_stopped_leading`` runs in the
elector's thread, after the lease has been released on a graceful stop. Leadership can
end while ``on_started_leading`` is still running: a start that takes time (waiting for
caches) should check :meth:`LeaderElector.is_leader` before it begins to act.

Timestamps written are MicroTime (RFC 3339 with microseconds, UTC). Both clocks are
injected: ``clock`` (monotonic seconds) for every decision, ``wall_clock`` only for the
timestamps.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from adapters.k8s.client import (
    AlreadyExists,
    ApiError,
    ClientLike,
    Conflict,
    NotFound,
    as_kube,
    resource_path,
)

log = logging.getLogger(__name__)

LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"
JITTER = 1.2  # client-go's JitterFactor: candidates wait retry_period * [1, 2.2)
RELEASED_LEASE_DURATION_S = 1
CONFLICT_RETRIES = 1


def micro_time(moment: datetime) -> str:
    """A MicroTime: RFC 3339 in UTC with microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _observed(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(
        spec.get(k)
        for k in (
            "holderIdentity",
            "renewTime",
            "acquireTime",
            "leaseDurationSeconds",
            "leaseTransitions",
        )
    )


class LeaderElector:
    def __init__(
        self,
        api_client: ClientLike,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        release_on_stop: bool = True,
        request_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not identity:
            raise ValueError("LeaderElector: identity must not be empty")
        if not retry_period > 0:
            raise ValueError(f"LeaderElector: retry_period must be > 0, got {retry_period}")
        if not renew_deadline > retry_period * JITTER:
            raise ValueError(
                f"LeaderElector: renew_deadline ({renew_deadline}) must exceed "
                f"retry_period * {JITTER} ({retry_period * JITTER})"
            )
        if not lease_duration > renew_deadline:
            raise ValueError(
                f"LeaderElector: lease_duration ({lease_duration}) must exceed "
                f"renew_deadline ({renew_deadline})"
            )
        if request_timeout is None:
            request_timeout = renew_deadline / 4
        if not 0 < request_timeout < renew_deadline:
            raise ValueError(
                f"LeaderElector: request_timeout ({request_timeout}) must be > 0 and below "
                f"renew_deadline ({renew_deadline})"
            )
        self.request_timeout = request_timeout
        self.kube = as_kube(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.collection = resource_path(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, namespace)
        self.path = resource_path(LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL, namespace, name)
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.release_on_stop = release_on_stop
        self.clock = clock
        self.wall_clock = wall_clock
        self._state = threading.Lock()  # leadership flag, renew time, callbacks
        self._leading = False
        self._last_renew = -math.inf
        self._lease: dict[str, Any] | None = None  # the lease as we last wrote it
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._stop = threading.Event()

    # --- state --------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Leading, and renewed within ``renew_deadline`` (by this elector's clock)."""
        with self._state:
            return self._leading and self.clock() - self._last_renew <= self.renew_deadline

    @property
    def observed_holder(self) -> str | None:
        """The holder in the lease as last read or written (``""``: released)."""
        return None if self._observed is None else (self._observed[0] or "")

    def _set_leading(self, leading: bool) -> None:
        with self._state:
            if leading == self._leading:
                return
            self._leading = leading
        log.info(
            "leadership changed",
            extra={
                "lease": f"{self.namespace}/{self.name}",
                "identity": self.identity,
                "leading": leading,
            },
        )
        if leading:
            if self.on_started_leading is not None:
                threading.Thread(
                    target=self.on_started_leading, name="leader-started", daemon=True
                ).start()
        elif self.on_stopped_leading is not None:
            self.on_stopped_leading()

    # --- running ------------------------------------------------------------------------

    def run(self) -> None:
        """Campaign and renew until :meth:`stop`; then release the lease if held (unless
        ``release_on_stop`` is false) and stop leading. Blocks: run it in a thread."""
        watchdog = threading.Thread(target=self._watch, name="leader-watchdog", daemon=True)
        watchdog.start()
        try:
            while not self._stop.is_set():
                self.step()
                wait = self.retry_period
                if not self._leading:
                    wait *= 1.0 + JITTER * random.random()
                self._stop.wait(wait)
        finally:
            if self._leading and self.release_on_stop:
                self.release()
            self._set_leading(False)

    def _watch(self) -> None:
        """End leadership as soon as the renew deadline passes, even while the elector
        thread is stuck in a request (``step`` would only notice on its return)."""
        period = min(self.retry_period, self.renew_deadline / 10)
        while not self._stop.wait(period):
            if self._leading and not self.is_leader():
                log.warning(
                    "lease not renewed within the renew deadline: no longer leading",
                    extra={"lease": f"{self.namespace}/{self.name}", "identity": self.identity},
                )
                self._set_leading(False)

    def stop(self) -> None:
        """Ask :meth:`run` to return (it releases the lease on its way out)."""
        self._stop.set()

    def step(self) -> bool:
        """One attempt to acquire or renew; updates leadership; returns :meth:`is_leader`."""
        started = self.clock()
        try:
            held = self._try_acquire_or_renew(started)
        except Exception as exc:
            # Whatever went wrong, the elector must live on: a dead elector thread would
            # leave a leader that never steps down (is_leader() still times out).
            log.info(
                "lease attempt failed",
                exc_info=not isinstance(exc, ApiError),
                extra={
                    "lease": f"{self.namespace}/{self.name}",
                    "identity": self.identity,
                    "error": str(exc),
                },
            )
            held = None
        if held:
            with self._state:
                self._last_renew = started
            self._set_leading(True)
        elif held is False or self.clock() - self._last_renew > self.renew_deadline:
            # Someone else holds it, or we could not renew in time: stop before anyone
            # else may start (their wait is lease_duration > renew_deadline).
            self._set_leading(False)
        return self.is_leader()

    # --- the lease ----------------------------------------------------------------------

    def _observe(self, spec: Mapping[str, Any], now: float) -> None:
        seen = _observed(spec)
        if seen != self._observed:
            self._observed, self._observed_at = seen, now

    def _try_acquire_or_renew(self, now: float) -> bool:
        """True if we hold the lease now, False if another holder's lease is in force;
        raises :class:`ApiError` when the API server did not let us tell."""
        for _ in range(1 + CONFLICT_RETRIES):
            try:
                lease = self._request("GET", self.path)
            except NotFound:
                try:
                    self._write(self._request("POST", self.collection, self._new_lease()), now)
                    return True
                except (AlreadyExists, Conflict):
                    continue  # another candidate created it first: read theirs
            spec = lease.get("spec") or {}
            self._observe(spec, now)
            holder = spec.get("holderIdentity") or ""
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if holder and holder != self.identity and now - self._observed_at < duration:
                return False
            try:
                self._write(self._request("PUT", self.path, self._claimed(lease, holder)), now)
                return True
            except Conflict:
                continue  # changed since we read it: re-read and decide again
        raise Conflict(409, "Conflict", f"lease {self.namespace}/{self.name} kept changing")

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self.kube.request(method, path, body, timeout=self.request_timeout)

    def _write(self, lease: dict[str, Any], now: float) -> None:
        self._lease = lease
        self._observe(lease.get("spec") or {}, now)

    def _new_lease(self) -> dict[str, Any]:
        stamp = micro_time(self.wall_clock())
        return {
            "apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": math.ceil(self.lease_duration),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
            },
        }

    def _claimed(self, lease: Mapping[str, Any], holder: str) -> dict[str, Any]:
        stamp = micro_time(self.wall_clock())
        spec = dict(lease.get("spec") or {})
        if holder != self.identity:
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = math.ceil(self.lease_duration)
        spec["renewTime"] = stamp
        # The resourceVersion read stays in metadata: the PUT is refused if it is stale.
        return {**lease, "spec": spec}

    def release(self) -> bool:
        """Give the lease up if we hold it, so a successor need not wait it out. Returns
        whether it was released. Leadership ends here (``on_stopped_leading`` runs)."""
        released = False
        lease = self._lease
        for _ in range(1 + CONFLICT_RETRIES):
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                break
            stamp = micro_time(self.wall_clock())
            spec = {
                **(lease.get("spec") or {}),
                "holderIdentity": "",
                "leaseDurationSeconds": RELEASED_LEASE_DURATION_S,
                "acquireTime": stamp,
                "renewTime": stamp,
            }
            try:
                self._write(self._request("PUT", self.path, {**lease, "spec": spec}), self.clock())
                released = True
                break
            except Conflict:
                try:
                    lease = self._request("GET", self.path)
                except ApiError:
                    break
            except ApiError as exc:
                log.info(
                    "lease release failed",
                    extra={"lease": f"{self.namespace}/{self.name}", "error": str(exc)},
                )
                break
        self._set_leading(False)
        return released
