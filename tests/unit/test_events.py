"""Event aggregation: the recorder's decisions, with a fake writer at the I/O edge only."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from adapters.k8s.client import ApiError, NotFound, Unavailable
from adapters.k8s.events import EventRecorder, ObjectRef


class FakeClock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


class FakeWall:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class FakeSink:
    """Stores events like the API server would, and can fail on demand."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], dict[str, Any]] = {}
        self.creates = 0
        self.patches = 0
        self.fail_create: Exception | None = None
        self.fail_patch: Exception | None = None
        self.gate: threading.Event | None = None

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            self.gate.wait(5)
        self.creates += 1
        if self.fail_create is not None:
            raise self.fail_create
        key = (namespace, body["metadata"]["name"])
        assert key not in self.events, "event names must be unique"
        self.events[key] = body
        return body

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.patches += 1
        if self.fail_patch is not None:
            raise self.fail_patch
        if (namespace, name) not in self.events:
            raise NotFound(404, "NotFound", f'events "{name}" not found')
        self.events[(namespace, name)].update(body)
        return self.events[(namespace, name)]

    def only(self) -> dict[str, Any]:
        (event,) = self.events.values()
        return event


def vm(name: str = "v1", uid: str = "uid-1", namespace: str = "ns") -> dict[str, Any]:
    return {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "metadata": {"namespace": namespace, "name": name, "uid": uid, "resourceVersion": "7"},
        "spec": {"ignored": True},
    }


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def wall() -> FakeWall:
    return FakeWall()


@pytest.fixture
def recorder(sink: FakeSink, clock: FakeClock, wall: FakeWall) -> EventRecorder:
    return EventRecorder(
        None, "chscale-controller", host="host-1", sink=sink, clock=clock, wall_clock=wall
    )


def test_a_first_event_is_created_with_its_reference_and_source(
    recorder: EventRecorder, sink: FakeSink
) -> None:
    recorder.record(vm(), "Normal", "ResizeStarted", "4 -> 8 vCPUs")
    event = sink.only()
    assert event["metadata"]["namespace"] == "ns"
    assert event["metadata"]["name"].startswith("v1.")
    assert event["involvedObject"] == {
        "apiVersion": "cloudhypervisor.quill.today/v1beta1",
        "kind": "VirtualMachine",
        "namespace": "ns",
        "name": "v1",
        "uid": "uid-1",
        "resourceVersion": "7",
    }
    assert (event["type"], event["reason"], event["message"]) == (
        "Normal",
        "ResizeStarted",
        "4 -> 8 vCPUs",
    )
    assert event["count"] == 1
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-02T03:04:05Z"
    assert event["source"] == {"component": "chscale-controller", "host": "host-1"}
    assert recorder.written == 1


def test_a_repeat_within_the_window_bumps_the_count_of_the_same_event(
    recorder: EventRecorder, sink: FakeSink, clock: FakeClock, wall: FakeWall
) -> None:
    recorder.record(vm(), "Warning", "Infeasible", "node full")
    for _ in range(3):
        clock.t += 60
        wall.now += timedelta(seconds=60)
        recorder.record(vm(), "Warning", "Infeasible", "node full")
    event = sink.only()
    assert event["count"] == 4
    assert event["firstTimestamp"] == "2026-01-02T03:04:05Z"
    assert event["lastTimestamp"] == "2026-01-02T03:07:05Z"
    assert (sink.creates, sink.patches) == (1, 3)
    assert recorder.aggregated == 3


@pytest.mark.parametrize(
    "change",
    [
        {"type_": "Normal"},
        {"reason": "Other"},
        {"message": "node still full"},
        {"obj": vm(uid="uid-2")},  # same name, a new incarnation of the object
        {"obj": vm(name="v2", uid="uid-3")},
    ],
)
def test_anything_that_differs_makes_a_new_event(
    recorder: EventRecorder, sink: FakeSink, change: dict[str, Any]
) -> None:
    base: dict[str, Any] = {
        "obj": vm(),
        "type_": "Warning",
        "reason": "Infeasible",
        "message": "node full",
    }
    recorder.record(base["obj"], base["type_"], base["reason"], base["message"])
    other = {**base, **change}
    recorder.record(other["obj"], other["type_"], other["reason"], other["message"])
    assert len(sink.events) == 2
    assert {e["count"] for e in sink.events.values()} == {1}


def test_a_repeat_after_the_window_starts_a_new_event(
    recorder: EventRecorder, sink: FakeSink, clock: FakeClock
) -> None:
    recorder.record(vm(), "Normal", "Resized", "done")
    clock.t += recorder.window + 1
    recorder.record(vm(), "Normal", "Resized", "done")
    assert len(sink.events) == 2


def test_memory_is_bounded_by_forgetting_the_least_recently_used(
    sink: FakeSink, clock: FakeClock, wall: FakeWall
) -> None:
    recorder = EventRecorder(None, "c", sink=sink, clock=clock, wall_clock=wall, cache_size=2)
    recorder.record(vm(), "Normal", "A", "m")
    recorder.record(vm(), "Normal", "B", "m")
    recorder.record(vm(), "Normal", "A", "m")  # A is now the most recent
    recorder.record(vm(), "Normal", "C", "m")  # evicts B
    assert recorder.cached() == 2
    recorder.record(vm(), "Normal", "A", "m")
    recorder.record(vm(), "Normal", "B", "m")
    counts = sorted((e["reason"], e["count"]) for e in sink.events.values())
    assert counts == [("A", 3), ("B", 1), ("B", 1), ("C", 1)]


def test_an_event_expired_on_the_server_is_written_anew(
    recorder: EventRecorder, sink: FakeSink
) -> None:
    recorder.record(vm(), "Normal", "Resized", "done")
    sink.events.clear()  # the API server's event TTL ran out
    recorder.record(vm(), "Normal", "Resized", "done")
    assert sink.only()["count"] == 1
    recorder.record(vm(), "Normal", "Resized", "done")
    assert sink.only()["count"] == 2


def test_write_failures_are_logged_never_raised(
    recorder: EventRecorder, sink: FakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    sink.fail_create = Unavailable(503, "ServiceUnavailable", "etcd is down")
    with caplog.at_level(logging.WARNING, logger="adapters.k8s.events"):
        recorder.record(vm(), "Warning", "Infeasible", "node full")
    assert recorder.failed == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "event not recorded"]
    assert (line.object, line.reason) == ("ns/v1", "Infeasible")
    assert "etcd is down" in line.error
    sink.fail_create = None
    recorder.record(vm(), "Warning", "Infeasible", "node full")
    assert sink.only()["count"] == 1  # the failed write was not remembered as written


def test_a_failed_bump_is_retried_from_the_last_written_count(
    recorder: EventRecorder, sink: FakeSink
) -> None:
    recorder.record(vm(), "Normal", "R", "m")
    sink.fail_patch = ApiError(500, "InternalError", "boom")
    recorder.record(vm(), "Normal", "R", "m")
    sink.fail_patch = None
    recorder.record(vm(), "Normal", "R", "m")
    assert sink.only()["count"] == 2
    assert recorder.failed == 1


def test_unexpected_errors_from_the_writer_are_contained(
    recorder: EventRecorder, sink: FakeSink
) -> None:
    sink.fail_create = RuntimeError("a bug in the writer")
    recorder.record(vm(), "Normal", "R", "m")
    assert recorder.failed == 1


def test_concurrent_repeats_make_one_event_not_two(recorder: EventRecorder, sink: FakeSink) -> None:
    sink.gate = threading.Event()
    threads = [
        threading.Thread(target=recorder.record, args=(vm(), "Normal", "R", "m")) for _ in range(4)
    ]
    for t in threads:
        t.start()
    sink.gate.set()
    for t in threads:
        t.join(5)
    assert sink.only()["count"] == 4
    assert sink.creates == 1


def test_cluster_scoped_objects_get_their_events_in_default(
    recorder: EventRecorder, sink: FakeSink
) -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "n1"}}
    recorder.record(node, "Warning", "NodeFull", "no room")
    event = sink.only()
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"]["kind"] == "Node"
    assert "namespace" not in event["involvedObject"]


def test_a_bare_reference_works_like_an_object(recorder: EventRecorder, sink: FakeSink) -> None:
    ref = ObjectRef(api_version="v1", kind="Pod", namespace="ns", name="p", uid="u9")
    recorder.record(ref, "Normal", "Resized", "ok")
    recorder.record(ObjectRef.of(recorder_pod()), "Normal", "Resized", "ok")
    event = sink.only()
    assert event["count"] == 2
    assert event["involvedObject"]["uid"] == "u9"


def recorder_pod() -> dict[str, Any]:
    meta = {"namespace": "ns", "name": "p", "uid": "u9"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta}


def test_long_messages_are_truncated(recorder: EventRecorder, sink: FakeSink) -> None:
    recorder.record(vm(), "Normal", "R", "x" * 5000)
    assert len(sink.only()["message"]) == 1024


def test_an_object_without_a_name_is_refused_in_the_log_not_raised(
    recorder: EventRecorder, sink: FakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.k8s.events"):
        recorder.record({"metadata": {}}, "Normal", "R", "m")
    assert sink.events == {}
    (line,) = [r for r in caplog.records if r.getMessage() == "event not recorded"]
    assert "metadata.name" in line.error
