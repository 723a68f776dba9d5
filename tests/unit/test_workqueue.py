"""The work queue's guarantees, driven by an injected clock (no sleeps decide an outcome)."""

from __future__ import annotations

import random
import threading

import pytest

from adapters.k8s.workqueue import WorkQueue


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drain(q: WorkQueue) -> list[str]:
    """Every key ready now, each marked done at once."""
    keys = []
    while (key := q.get(timeout=0)) is not None:
        keys.append(key)
        q.done(key)
    return keys


# --- one worker per key, dirty re-adds --------------------------------------------------


def test_a_key_being_processed_is_not_handed_out_again_until_done() -> None:
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")
    assert q.get(timeout=0) is None
    q.done("a")
    assert q.get(timeout=0) == "a"


def test_many_adds_while_processing_come_back_exactly_once() -> None:
    q = WorkQueue()
    q.add("a")
    key = q.get(timeout=0)
    for _ in range(5):
        q.add("a")
    q.done(key)
    assert drain(q) == ["a"]


def test_a_key_not_re_added_while_processing_does_not_come_back() -> None:
    q = WorkQueue()
    q.add("a")
    q.done(q.get(timeout=0))
    assert q.get(timeout=0) is None


def test_duplicate_adds_are_coalesced_and_order_is_fifo() -> None:
    q = WorkQueue()
    for key in ("a", "b", "a", "c", "b"):
        q.add(key)
    assert len(q) == 3
    assert drain(q) == ["a", "b", "c"]


def test_concurrent_workers_never_hold_one_key_at_the_same_time() -> None:
    q = WorkQueue()
    keys = [f"k{i}" for i in range(5)]
    holding: set[str] = set()
    overlaps: list[str] = []
    processed = 0
    lock = threading.Lock()
    rng = random.Random(7)

    def worker() -> None:
        nonlocal processed
        while (key := q.get()) is not None:
            with lock:
                if key in holding:
                    overlaps.append(key)
                holding.add(key)
                processed += 1
            # Re-add keys while they are held: the dirty path is what is under test.
            q.add(rng.choice(keys))
            with lock:
                holding.discard(key)
            q.done(key)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        q.add(rng.choice(keys))
    enough = threading.Event()
    # Workers keep re-adding, so the queue never runs dry; stop after enough rounds.
    while not enough.wait(0.01):
        with lock:
            if processed >= 2000:
                enough.set()
    q.shutdown()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == []
    assert processed > 0


# --- add_after ----------------------------------------------------------------------------


def test_add_after_keeps_the_earliest_schedule() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 10)
    q.add_after("a", 5)
    q.add_after("a", 20)
    clock.t += 4.9
    assert q.get(timeout=0) is None
    clock.t += 0.2
    assert drain(q) == ["a"]
    clock.t += 30
    assert drain(q) == []  # the superseded schedules do not fire later


def test_add_after_is_a_schedule_not_a_hold_so_an_add_wins() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 100)
    q.add("a")
    assert drain(q) == ["a"]


def test_add_after_while_processing_returns_after_done_at_its_time() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add("a")
    key = q.get(timeout=0)
    q.add_after("a", 3)
    clock.t += 3
    assert q.get(timeout=0) is None  # still being processed
    q.done(key)
    assert drain(q) == ["a"]


# --- rate limiting ------------------------------------------------------------------------


def test_backoff_doubles_per_failure_and_is_capped_and_forget_resets_it() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=1.0, max_delay=8.0, clock=clock)
    delays = [q.add_rate_limited("a") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert q.failures("a") == 6
    q.forget("a")
    assert q.failures("a") == 0
    assert q.add_rate_limited("a") == 1.0


def test_backoff_survives_absurd_failure_counts() -> None:
    q = WorkQueue(base_delay=0.005, max_delay=60.0, clock=FakeClock(), burst=10_000)
    for _ in range(5000):
        delay = q.add_rate_limited("a")
    assert delay == 60.0


def test_a_rate_limited_key_is_ready_exactly_when_its_backoff_ends() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=2.0, max_delay=60.0, clock=clock)
    q.add_rate_limited("a")
    clock.t += 1.99
    assert q.get(timeout=0) is None
    clock.t += 0.01
    assert drain(q) == ["a"]


def test_backoff_is_per_key() -> None:
    q = WorkQueue(base_delay=1.0, max_delay=60.0, clock=FakeClock())
    q.add_rate_limited("a")
    q.add_rate_limited("a")
    assert q.add_rate_limited("b") == 1.0
    assert q.failures("a") == 2


def test_the_global_bucket_spaces_out_a_burst_of_failures() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=0.001, max_delay=60.0, qps=10.0, burst=2, clock=clock)
    delays = [q.add_rate_limited(f"k{i}") for i in range(5)]
    assert delays[:2] == [0.001, 0.001]
    assert delays[2:] == pytest.approx([0.1, 0.2, 0.3])
    clock.t += 10  # the bucket refills, up to its burst
    assert [q.add_rate_limited(f"j{i}") for i in range(2)] == [0.001, 0.001]


# --- not_before: holds ----------------------------------------------------------------------


def test_not_before_holds_back_an_early_add_until_its_time() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.not_before("a", clock.t + 30)
    q.add("a")  # a watch event arrives early
    clock.t += 29
    assert q.get(timeout=0) is None
    clock.t += 1
    assert drain(q) == ["a"]


def test_not_before_alone_schedules_the_key() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.not_before("a", clock.t + 5)
    clock.t += 5
    assert drain(q) == ["a"]
    clock.t += 100
    q.add("a")  # the hold has expired: no longer in force
    assert drain(q) == ["a"]


def test_a_hold_set_while_processing_applies_to_the_dirty_re_add() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add("a")
    key = q.get(timeout=0)
    q.add("a")  # dirty
    q.not_before("a", clock.t + 10)  # what the reconcile decided
    q.done(key)
    assert q.get(timeout=0) is None
    clock.t += 10
    assert drain(q) == ["a"]


def test_a_held_key_already_queued_is_not_handed_out_early() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add("a")
    q.not_before("a", clock.t + 10)
    assert q.get(timeout=0) is None
    clock.t += 10
    assert drain(q) == ["a"]


def test_a_key_in_backoff_is_not_processed_before_its_time_even_when_re_added() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=4.0, clock=clock)
    q.add_rate_limited("a")
    q.add("a")
    q.add_after("a", 1)
    clock.t += 3.9
    assert q.get(timeout=0) is None
    clock.t += 0.1
    assert drain(q) == ["a"]


def test_a_later_hold_replaces_an_earlier_one() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.not_before("a", clock.t + 30)
    q.not_before("a", clock.t + 2)
    clock.t += 2
    assert drain(q) == ["a"]


def test_other_keys_are_not_held() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.not_before("a", clock.t + 30)
    q.add("a")
    q.add("b")
    assert drain(q) == ["b"]


# --- blocking and shutdown --------------------------------------------------------------------


def test_a_blocked_worker_wakes_for_an_add() -> None:
    q = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    t.start()
    q.add("a")
    t.join(30)
    assert got == ["a"]


def test_shutdown_wakes_blocked_workers_and_refuses_new_keys() -> None:
    q = WorkQueue()
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(q.get())) for _ in range(3)]
    for t in threads:
        t.start()
    q.shutdown()
    for t in threads:
        t.join(5)
    assert got == [None, None, None]
    assert q.shutting_down
    q.add("a")
    assert q.get(timeout=0) is None


def test_get_times_out_empty_handed() -> None:
    assert WorkQueue().get(timeout=0.01) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_delay": 0}, "base_delay"),
        ({"base_delay": 2.0, "max_delay": 1.0}, "max_delay"),
        ({"qps": 0}, "qps"),
        ({"burst": 0}, "burst"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WorkQueue(**kwargs)
