"""A work queue of string keys with controller-runtime's guarantees, plus holds.

Theory of operation. A key is in at most one of three places: **ready** (a FIFO of keys
to hand out), **processing** (handed out by :meth:`WorkQueue.get`, not yet
:meth:`WorkQueue.done`), or nowhere. Besides, a key may have a **schedule** (a time at
which it becomes ready) and a **hold** (a time before which it must not be handed out).

- ``add`` makes a key ready; a ready key is not queued twice. A key added while it is
  processing is marked **dirty** and becomes ready again when it is done, so one key is
  never handed to two workers at once and no change is lost.
- ``add_after(key, delay)`` schedules the key; the earliest schedule wins. A schedule is
  only a wake-up: an ``add`` before it makes the key ready at once.
- ``not_before(key, t)`` sets a hold until ``t`` (on the queue's clock) and schedules the
  key at ``t``: the key is handed out at ``t``, not earlier, however often it is added
  meanwhile (adds during a hold are coalesced into that one hand-out). A new hold
  replaces the previous one. This is how a kernel's ``Requeue(after)`` hint is made
  binding, so watch events echoing the reconcile's own writes do not bring the key back
  early; use ``add_after`` for a hint that anything newer may pre-empt.
- ``add_rate_limited`` is for failures: it computes a delay, the larger of the key's
  exponential backoff (``base_delay * 2**failures``, capped at ``max_delay``) and the
  wait for a token from a global bucket (``qps``, ``burst``), and holds the key for it.
  A key in backoff is therefore never processed before its time, even when a watch event
  adds it. ``forget`` resets the key's failure count (not a hold in force).

The choice of holds over "an add always wins" (client-go's behaviour): a failing key
re-added by every watch event would otherwise be retried at the event rate, and the
backoff would bound nothing. A held key's latest state is still what the next reconcile
reads, since reconciles are level-triggered: deferring an add loses nothing.

Schedules and holds use the injected ``clock`` (a ``time.monotonic``-like callable), so
tests are deterministic; ``get(timeout=...)`` measures its timeout in real seconds.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable

DEFAULT_BASE_DELAY_S = 0.005
DEFAULT_MAX_DELAY_S = 60.0
DEFAULT_QPS = 50.0
DEFAULT_BURST = 300
# Beyond this many doublings any base delay is past any sensible cap.
_MAX_DOUBLINGS = 62
# How long an idle get() sleeps between checks when nothing is scheduled (an add or a
# shutdown wakes it at once anyway).
_IDLE_WAIT_S = 1.0


class WorkQueue:
    def __init__(
        self,
        base_delay: float = DEFAULT_BASE_DELAY_S,
        max_delay: float = DEFAULT_MAX_DELAY_S,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not base_delay > 0:
            raise ValueError(f"WorkQueue: base_delay must be > 0, got {base_delay}")
        if not max_delay >= base_delay:
            raise ValueError(
                f"WorkQueue: max_delay must be >= base_delay ({base_delay}), got {max_delay}"
            )
        if not qps > 0:
            raise ValueError(f"WorkQueue: qps must be > 0, got {qps}")
        if not burst >= 1:
            raise ValueError(f"WorkQueue: burst must be >= 1, got {burst}")
        self.base_delay, self.max_delay = base_delay, max_delay
        self.qps, self.burst = qps, burst
        self.clock = clock
        self._cond = threading.Condition()
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._schedule: list[tuple[float, int, str]] = []  # heap of (due, seq, key)
        self._due: dict[str, float] = {}  # the live schedule of each key
        self._holds: dict[str, float] = {}
        self._seq = 0
        self._failures: dict[str, int] = {}
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._shutdown = False

    def __len__(self) -> int:
        """Keys ready to hand out now (not those scheduled or processing)."""
        with self._cond:
            return len(self._ready)

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutdown

    # --- adding -------------------------------------------------------------------------

    def add(self, key: str) -> None:
        """Make ``key`` ready (or dirty, if processing; or due at its hold, if held)."""
        with self._cond:
            self._add_locked(key, self.clock())

    def add_after(self, key: str, delay: float) -> None:
        """Make ``key`` ready after ``delay`` seconds (the earliest schedule wins)."""
        with self._cond:
            now = self.clock()
            if delay <= 0:
                self._add_locked(key, now)
            else:
                self._schedule_locked(key, now + delay)

    def not_before(self, key: str, t: float) -> None:
        """Hand ``key`` out at ``t`` (on this queue's clock) and not before, whatever adds
        arrive meanwhile; replaces an earlier hold of the key."""
        with self._cond:
            if self._shutdown:
                return
            self._holds[key] = t
            self._schedule_locked(key, t)

    def add_rate_limited(self, key: str) -> float:
        """Hold ``key`` for its backoff (and the global bucket's wait); returns the delay."""
        with self._cond:
            now = self.clock()
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            per_key = min(self.base_delay * 2 ** min(failures, _MAX_DOUBLINGS), self.max_delay)
            delay = max(per_key, self._take_token_locked(now))
            if not self._shutdown:
                self._holds[key] = now + delay
                self._schedule_locked(key, now + delay)
            return delay

    def forget(self, key: str) -> None:
        """Reset ``key``'s failure count (after a success)."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def _held_until(self, key: str, now: float) -> float | None:
        until = self._holds.get(key)
        if until is None:
            return None
        if until <= now:
            del self._holds[key]
            return None
        return until

    def _add_locked(self, key: str, now: float) -> None:
        if self._shutdown:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        held = self._held_until(key, now)
        if held is not None:
            self._schedule_locked(key, held)
            return
        self._due.pop(key, None)  # ready now: a pending schedule is moot
        if key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._cond.notify()

    def _schedule_locked(self, key: str, due: float) -> None:
        if self._shutdown or (key in self._queued and key not in self._holds):
            return  # already ready, and nothing holds it back
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._schedule, (due, self._seq, key))
        self._cond.notify()

    def _take_token_locked(self, now: float) -> float:
        """Take a token (possibly borrowing ahead); the wait until it is really there."""
        elapsed = max(now - self._refilled_at, 0.0)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.qps)
        self._refilled_at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    # --- taking -------------------------------------------------------------------------

    def _promote_locked(self, now: float) -> float | None:
        """Make due keys ready; return the time of the next schedule, if any."""
        while self._schedule:
            due, _, key = self._schedule[0]
            if self._due.get(key) != due:
                heapq.heappop(self._schedule)  # superseded by an earlier schedule or an add
                continue
            if due > now:
                return due
            heapq.heappop(self._schedule)
            del self._due[key]
            self._add_locked(key, now)
        return None

    def _pop_ready_locked(self, now: float) -> str | None:
        while self._ready:
            key = self._ready.popleft()
            self._queued.discard(key)
            held = self._held_until(key, now)
            if held is not None:
                self._schedule_locked(key, held)  # was ready before its hold was set
                continue
            self._processing.add(key)
            return key
        return None

    def get(self, timeout: float | None = None) -> str | None:
        """The next key, blocking until one is ready; ``None`` once shut down or when
        ``timeout`` (real seconds; 0 = do not block) passes first. Call :meth:`done`
        with the key when finished with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                now = self.clock()
                self._promote_locked(now)
                key = self._pop_ready_locked(now)
                if key is not None:
                    return key
                # Popping may have re-scheduled held keys: look at the schedule afresh.
                next_due = self._promote_locked(now)
                wait = _IDLE_WAIT_S if next_due is None else next_due - now
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = min(wait, left)
                self._cond.wait(max(wait, 0.0))

    def done(self, key: str) -> None:
        """Finished with ``key``: if it was added meanwhile, it becomes ready (or held)."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key, self.clock())

    def shutdown(self) -> None:
        """Wake every waiting worker with ``None``; later adds are ignored."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
