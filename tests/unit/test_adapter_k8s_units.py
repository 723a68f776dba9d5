"""Unit tests for the pure parts of the Kubernetes adapter: the work queue's guarantees,
the informer's never-go-backwards cache, status rendering with timestamps."""

from __future__ import annotations

import threading

from adapters.k8s.client import Unavailable
from adapters.k8s.informer import Informer
from adapters.k8s.vms import build_pod, finalizer_patch, owned_pod, same_status, status_body
from adapters.k8s.workqueue import WorkQueue
from core import Condition, ConditionStatus, Phase, Resources, VmStatus
from core.constants import FINALIZER, VM_CONTAINER, VM_UID_LABEL, GiB


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_key_is_never_processed_twice_at_once_and_dirty_keys_come_back() -> None:
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")  # while processing: marked dirty, not handed out
    assert q.get(timeout=0) is None
    q.done("a")
    assert q.get(timeout=0) == "a"


def test_duplicate_adds_are_coalesced() -> None:
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    assert len(q) == 1


def test_add_after_keeps_the_earlier_time_and_add_wins() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 10)
    q.add_after("a", 5)
    q.add_after("a", 20)
    clock.t += 4.9
    assert q.get(timeout=0) is None
    clock.t += 0.2
    assert q.get(timeout=0) == "a"
    q.done("a")
    q.add_after("b", 100)
    q.add("b")
    assert q.get(timeout=0) == "b"


def test_rate_limited_backoff_grows_and_is_capped_and_forget_resets() -> None:
    clock = FakeClock()
    q = WorkQueue(base_delay=1.0, max_delay=8.0, clock=clock)
    delays = []
    for _ in range(6):
        before = clock.t
        q.add_rate_limited("a")
        while (key := q.get(timeout=0)) is None:
            clock.t += 0.25
        q.done(key)
        delays.append(clock.t - before)
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[4:] == [8.0, 8.0]
    q.forget("a")
    assert q.failures("a") == 0


def test_shutdown_wakes_blocked_workers() -> None:
    q = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shutdown()
    t.join(2)
    assert got == [None]


def _obj(name: str, rv: str, **extra: object) -> dict:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}, **extra}


def test_informer_cache_never_goes_backwards() -> None:
    inf = Informer(kube=None, path="/x")  # type: ignore[arg-type]
    seen: list[str] = []
    inf.add_handler(lambda ev, obj: seen.append(f"{ev}:{obj['metadata']['resourceVersion']}"))
    inf._apply("ADDED", _obj("a", "5"))
    inf.observe_write(_obj("a", "9"))  # our own write, ahead of its watch event
    inf._apply("MODIFIED", _obj("a", "7"))  # an older event arrives late: ignored
    assert inf.get("ns", "a")["metadata"]["resourceVersion"] == "9"
    inf._apply("DELETED", _obj("a", "10"))
    inf._apply("MODIFIED", _obj("a", "9"))  # a stale event cannot revive a deleted object
    assert inf.get("ns", "a") is None
    assert seen == ["ADDED:5", "DELETED:10"]


def test_status_body_keeps_transition_times_of_unchanged_conditions() -> None:
    old = {
        "conditions": [
            {"type": "Resized", "status": "True", "reason": "Resized", "lastTransitionTime": "T0"}
        ]
    }
    same = VmStatus(
        phase=Phase.RUNNING,
        conditions=(Condition("Resized", ConditionStatus.TRUE, "Resized", "x", 1),),
    )
    flipped = VmStatus(
        phase=Phase.RUNNING,
        conditions=(Condition("Resized", ConditionStatus.FALSE, "InProgress", "x", 2),),
    )
    assert status_body(old, same, "T1")["conditions"][0]["lastTransitionTime"] == "T0"
    assert status_body(old, flipped, "T1")["conditions"][0]["lastTransitionTime"] == "T1"


def test_same_status_treats_null_as_absent() -> None:
    body = {"phase": "Running", "resize": None}
    assert same_status({"phase": "Running"}, body)
    assert not same_status({"phase": "Running", "resize": {"vcpus": 1}}, body)


def test_same_status_compares_nested_nulls_as_a_merge_patch_would() -> None:
    body = {"phase": "Running", "resize": {"vcpus": 2, "podGeneration": None, "attempts": 0}}
    assert same_status({"phase": "Running", "resize": {"vcpus": 2, "attempts": 0}}, body)
    stale = {"phase": "Running", "resize": {"vcpus": 2, "podGeneration": 4, "attempts": 0}}
    assert not same_status(stale, body)
    assert not same_status({"phase": "Running", "resize": "junk"}, body)


def test_vm_pod_is_guaranteed_and_never_restarts_on_resize() -> None:
    vm = {
        "metadata": {"namespace": "ns", "name": "v", "uid": "u1"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": "n1"}},
    }
    pod = build_pod(vm, Resources(8000, 4 * GiB + 256 * 2**20), "img")
    (container,) = pod["spec"]["containers"]
    assert container["name"] == VM_CONTAINER
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "4352Mi"}
    assert {p["restartPolicy"] for p in container["resizePolicy"]} == {"NotRequired"}
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "n1"}
    assert owned_pod(vm, pod) is pod
    stranger = {**pod, "metadata": {**pod["metadata"], "labels": {VM_UID_LABEL: "other"}}}
    assert owned_pod(vm, stranger) is None


def test_finalizer_patch_is_conditional_and_idempotent() -> None:
    vm = {"metadata": {"resourceVersion": "3", "finalizers": ["x", FINALIZER]}}
    assert finalizer_patch(vm, add=True)["metadata"] == {
        "finalizers": ["x", FINALIZER],
        "resourceVersion": "3",
    }
    assert finalizer_patch(vm, add=False)["metadata"]["finalizers"] == ["x"]


def test_a_relist_announces_our_own_write_whose_watch_event_it_replaces() -> None:
    """Fault schedule 43 (CI): the controller wrote a VM's status, a watch fault made the
    informer relist before the write's watch event came, and the listing showed the
    object at exactly the version observe_write had cached. Nothing was announced, the
    watch resumed past that version, and the VM waited for the five-minute resync."""
    inf = Informer(kube=None, path="/x")  # type: ignore[arg-type]
    seen: list[str] = []
    inf.add_handler(lambda ev, obj: seen.append(f"{ev}:{obj['metadata']['resourceVersion']}"))
    inf._apply("ADDED", _obj("a", "5"))
    inf._apply("ADDED", _obj("b", "6"))
    inf.observe_write(_obj("a", "9"))
    inf.observe_write(_obj("c", "12"))  # newer than the listing below: its event follows
    inf._list = lambda: ([_obj("a", "9"), _obj("b", "6")], "10")  # type: ignore[method-assign]
    inf._relist()
    assert seen == ["ADDED:5", "ADDED:6", "MODIFIED:9"]
    assert inf.get("ns", "c") is not None
    inf._relist()  # announced once, not on every relist
    assert seen == ["ADDED:5", "ADDED:6", "MODIFIED:9"]
    inf._apply("ADDED", _obj("c", "12"))  # the watch event of the newer write
    assert seen[-1] == "ADDED:12"


class _BrokenWatches:
    """An API server whose watches each run for a minute of ``clock`` and then break,
    until ``stop_after`` of them; lists are empty."""

    def __init__(self, clock: FakeClock, informer_box: list[Informer], stop_after: int) -> None:
        self.clock, self.box, self.stop_after, self.watches = clock, informer_box, stop_after, 0

    def request(self, method: str, path: str, **_kw: object) -> dict:
        return {"kind": "XList", "items": [], "metadata": {"resourceVersion": "1"}}

    def open_watch(self, path: str, query: dict, timeout: float) -> _BrokenWatches:
        self.watches += 1
        return self

    def __iter__(self) -> _BrokenWatches:
        return self

    def __next__(self) -> dict:
        self.clock.t += 60.0
        if self.watches >= self.stop_after:
            self.box[0]._stop.set()
        raise Unavailable(0, "WatchInterrupted", "Response ended prematurely")

    def close(self) -> None:
        pass


def test_a_watch_that_ran_well_and_broke_backs_off_from_the_start(monkeypatch) -> None:
    """Fault schedules 126, 128, 130, 132 took 30 s to converge: every cut watch of a
    long-lived daemon counted toward the backoff, however long it had run, so after a
    dozen routine cuts the daemon waited the 30 s cap before watching again."""
    clock = FakeClock()
    monkeypatch.setattr("adapters.k8s.informer.time.monotonic", clock)
    box: list[Informer] = []
    api = _BrokenWatches(clock, box, stop_after=20)
    inf = Informer(kube=None, path="/x")  # type: ignore[arg-type]
    inf.kube = api  # type: ignore[assignment]
    box.append(inf)
    series: list[int] = []
    monkeypatch.setattr(inf, "_backoff", lambda failures: series.append(failures) or 0.0)
    inf._run()
    assert api.watches == 20
    assert series == [1] * 19
