"""A work queue with controller-runtime's guarantees.

- A key is queued at most once, and never handed to two workers at once: a key added
  while it is being processed is marked dirty and queued again when the worker calls
  :meth:`done`.
- ``add_after`` schedules a key; an earlier schedule wins over a later one, and an
  immediate ``add`` wins over both. (A watch event therefore still wakes a key that waits
  on a requeue hint: the kernel is level-triggered, so an early look is only redundant,
  never wrong; backoff that must hold is enforced by ``add_rate_limited``.)
- ``add_rate_limited`` applies per-key exponential backoff and a global token bucket;
  ``forget`` resets the key's backoff.
The clock is injected so that tests are deterministic.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable


class WorkQueue:
    def __init__(
        self,
        base_delay: float = 0.005,
        max_delay: float = 60.0,
        qps: float = 50.0,
        burst: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay
        self.qps, self.burst = qps, burst
        self.clock = clock
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._waiting: list[tuple[float, int, str]] = []  # heap of (due, seq, key)
        self._due: dict[str, float] = {}
        self._seq = 0
        self._failures: dict[str, int] = {}
        self._tokens = float(burst)
        self._last_refill = clock()
        self._shutdown = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    # --- adding -------------------------------------------------------------------------

    def add(self, key: str) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: str) -> None:
        if self._shutdown:
            return
        self._due.pop(key, None)
        if key in self._processing:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown or key in self._queued:
                return
            due = self.clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._waiting, (due, self._seq, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> None:
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            per_key = min(self.base_delay * 2**failures, self.max_delay)
            global_delay = self._take_token_locked()
        self.add_after(key, max(per_key, global_delay))

    def _take_token_locked(self) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last_refill) * self.qps)
        self._last_refill = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def forget(self, key: str) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # --- taking -------------------------------------------------------------------------

    def _promote_locked(self) -> float | None:
        """Move due keys into the queue; return seconds until the next one is due."""
        now = self.clock()
        while self._waiting:
            due, _, key = self._waiting[0]
            if self._due.get(key) != due:
                heapq.heappop(self._waiting)  # superseded by an earlier schedule or an add
                continue
            if due > now:
                return due - now
            heapq.heappop(self._waiting)
            del self._due[key]
            self._add_locked(key)
        return None

    def get(self, timeout: float | None = None) -> str | None:
        """The next key (blocking); ``None`` once shut down, or after ``timeout``."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                wait = self._promote_locked()
                if self._shutdown:
                    return None
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None:
                    left = deadline - self.clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait if wait is not None else 1.0)

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
