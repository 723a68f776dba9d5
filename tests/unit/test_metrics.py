"""The metrics server (bounded: connections capped, each with a deadline, one thread) and
the component metrics fed by the reconcilers and the VM watch."""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from apps.common.metrics import BoundedServer, endpoints, serve
from apps.common.runtime import Metrics, add_common_flags

WAIT_S = 10.0  # generous: the machine is shared


def _get(server: BoundedServer, path: str, timeout: float = WAIT_S) -> tuple[int, str, str]:
    url = f"http://127.0.0.1:{server.address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def _raw(server: BoundedServer, request: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=WAIT_S) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _idle(server: BoundedServer, count: int) -> list[socket.socket]:
    socks = [socket.create_connection(server.address, timeout=WAIT_S) for _ in range(count)]
    return socks


def _wait(predicate: Any, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("chscale_test_things", "Things.", ["reason"], registry=reg).labels("a").inc()
    return reg


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[BoundedServer]:
    s = serve(registry, 0, lambda: True, max_connections=8, deadline_s=30.0)
    yield s
    s.stop()


# --- the server -----------------------------------------------------------------------


def test_two_hundred_idle_connections_take_no_threads_and_do_not_block_a_scrape(
    registry: CollectorRegistry,
) -> None:
    server = serve(registry, 0, lambda: True)  # the defaults a component runs with
    try:
        before = threading.active_count()
        socks = _idle(server, 200)
        try:
            # Give a thread-per-connection server the time to start its threads.
            time.sleep(0.5)
            assert threading.active_count() <= before + 1
            assert server.open_connections() <= server.max_connections
            status, _, body = _get(server, "/metrics")
            assert status == 200
            assert 'chscale_test_things_total{reason="a"} 1.0' in body
        finally:
            for s in socks:
                s.close()
    finally:
        server.stop()


def test_at_the_cap_the_oldest_idle_connection_makes_room(server: BoundedServer) -> None:
    socks = _idle(server, server.max_connections)
    try:
        assert _wait(lambda: server.open_connections() == server.max_connections)
        status, _, _ = _get(server, "/healthz")
        assert status == 200
        assert server.evicted >= 1
        assert server.open_connections() <= server.max_connections
        # The evicted one is the first opened: the server closed it.
        socks[0].settimeout(WAIT_S)
        assert socks[0].recv(1) == b""
    finally:
        for s in socks:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_at_its_deadline(
    registry: CollectorRegistry,
) -> None:
    server = serve(registry, 0, lambda: True, deadline_s=0.3)
    try:
        with socket.create_connection(server.address, timeout=WAIT_S) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
            assert sock.recv(1) == b""  # closed by the server, well within WAIT_S
        assert server.expired == 1
        assert _wait(lambda: server.open_connections() == 0)
    finally:
        server.stop()


def test_it_binds_loopback_unless_told_otherwise(registry: CollectorRegistry) -> None:
    server = BoundedServer(endpoints(registry, lambda: True))
    try:
        assert server.address[0] == "127.0.0.1"
    finally:
        server.stop()
    parser = argparse.ArgumentParser()
    add_common_flags(parser, metrics_port=8080)
    args = parser.parse_args([])
    assert args.metrics_bind == "127.0.0.1"
    assert parser.parse_args(["--metrics-bind", "0.0.0.0"]).metrics_bind == "0.0.0.0"


def test_ipv6_loopback(registry: CollectorRegistry) -> None:
    try:
        server = serve(registry, 0, lambda: True, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        with socket.create_connection(("::1", server.address[1]), timeout=WAIT_S) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()


def test_health_readiness_and_errors(registry: CollectorRegistry) -> None:
    ready = threading.Event()
    server = serve(registry, 0, ready.is_set)
    try:
        assert _get(server, "/healthz")[0] == 200
        assert _get(server, "/readyz")[0] == 503
        ready.set()
        assert _get(server, "/readyz")[0] == 200
        assert _get(server, "/nothing")[0] == 404
        assert _raw(server, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert _raw(server, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000
        assert _raw(server, huge).startswith(b"HTTP/1.1 431 ")
        head = _raw(server, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    finally:
        server.stop()


def test_openmetrics_when_the_scraper_asks(server: BoundedServer) -> None:
    request = (
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
    )
    answer = _raw(server, request)
    assert b"Content-Type: application/openmetrics-text" in answer
    assert answer.rstrip().endswith(b"# EOF")


def test_bad_limits_are_refused(registry: CollectorRegistry) -> None:
    route = endpoints(registry, lambda: True)
    with pytest.raises(ValueError, match="max_connections"):
        BoundedServer(route, max_connections=0)
    with pytest.raises(ValueError, match="deadline_s"):
        BoundedServer(route, deadline_s=0)
    parser = argparse.ArgumentParser()
    add_common_flags(parser, metrics_port=8080)
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-max-connections", "0"])


# --- the component metrics ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeInformer:
    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs
        self.handlers: list[Any] = []

    def list(self) -> list[dict[str, Any]]:
        return self.objs

    def add_handler(self, handler: Any) -> None:
        self.handlers.append(handler)


def vm(phase: str, resized: tuple[str, str] | None = None, name: str = "v") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if resized is not None:
        status["conditions"] = [{"type": "Resized", "status": resized[0], "reason": resized[1]}]
    return {"metadata": {"namespace": "ns", "name": name}, "status": status}


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_step_of_a_resize_is_timed_with_how_it_ended() -> None:
    clock = FakeClock()
    metrics = Metrics("controller", clock=clock)
    metrics.on_vm("ADDED", vm("Running", ("True", "Resized")))
    clock.now += 1
    metrics.on_vm("MODIFIED", vm("PodResizeInProgress", ("False", "InProgress")))
    clock.now += 2
    metrics.on_vm("MODIFIED", vm("ResizeInProgress", ("False", "InProgress")))
    clock.now += 3
    metrics.on_vm("MODIFIED", vm("Running", ("True", "Resized")))
    h = "chscale_controller_resize_duration_seconds"
    assert sample(metrics, f"{h}_sum", step="pod", outcome="next") == 2.0
    assert sample(metrics, f"{h}_sum", step="vmm", outcome="completed") == 3.0
    assert sample(metrics, f"{h}_bucket", step="vmm", outcome="completed", le="2.5") == 0.0
    assert sample(metrics, f"{h}_bucket", step="vmm", outcome="completed", le="5.0") == 1.0
    c = "chscale_controller_condition_transitions_total"
    assert sample(metrics, c, type="Resized", status="False", reason="InProgress") == 1.0
    assert sample(metrics, c, type="Resized", status="True", reason="Resized") == 1.0


def test_infeasible_stopped_and_deleted_steps() -> None:
    clock = FakeClock()
    metrics = Metrics("controller", clock=clock)
    h = "chscale_controller_resize_duration_seconds_count"
    for name, end, outcome in (
        ("a", vm("Running", ("False", "PodResizeInfeasible"), "a"), "infeasible"),
        ("b", vm("Paused", ("False", "ExceedsCapacity"), "b"), "stopped"),
        ("c", vm("Failed", None, "c"), "ended"),
    ):
        metrics.on_vm("ADDED", vm("Running", None, name))
        metrics.on_vm("MODIFIED", vm("PodResizeInProgress", None, name))
        metrics.on_vm("MODIFIED", end)
        assert sample(metrics, h, step="pod", outcome=outcome) == 1.0
    metrics.on_vm("ADDED", vm("Running", None, "d"))
    metrics.on_vm("MODIFIED", vm("ResizeInProgress", None, "d"))
    metrics.on_vm("DELETED", vm("ResizeInProgress", None, "d"))
    assert sample(metrics, h, step="vmm", outcome="deleted") == 1.0


def test_a_step_entered_before_the_watch_began_is_not_timed() -> None:
    metrics = Metrics("daemon", clock=FakeClock())
    metrics.on_vm("ADDED", vm("ResizeInProgress"))  # e.g. after a restart
    metrics.on_vm("MODIFIED", vm("Running", ("True", "Resized")))
    h = "chscale_daemon_resize_duration_seconds_count"
    assert sample(metrics, h, step="vmm", outcome="completed") is None
    # A status write that leaves the phase alone keeps the step's start.
    clock = FakeClock()
    metrics = Metrics("daemon", clock=clock)
    metrics.on_vm("ADDED", vm("Running"))
    metrics.on_vm("MODIFIED", vm("ResizeInProgress"))
    clock.now += 4
    metrics.on_vm("MODIFIED", vm("ResizeInProgress", ("False", "InProgress")))
    clock.now += 1
    metrics.on_vm("MODIFIED", vm("Running", ("True", "Resized")))
    assert (
        sample(
            metrics, "chscale_daemon_resize_duration_seconds_sum", step="vmm", outcome="completed"
        )
        == 5.0
    )


def test_reconciler_calls_land_in_the_registry() -> None:
    metrics = Metrics("controller")
    metrics.reconciled("ok")
    metrics.reconciled("ok")
    metrics.reconciled("conflict")
    metrics.resize_done("infeasible", 0.7)
    metrics.pod_resize_requested("refused")
    assert sample(metrics, "chscale_controller_reconciles_total", result="ok") == 2.0
    assert sample(metrics, "chscale_controller_reconciles_total", result="conflict") == 1.0
    assert (
        sample(
            metrics,
            "chscale_controller_resize_duration_seconds_sum",
            step="total",
            outcome="infeasible",
        )
        == 0.7
    )
    assert sample(metrics, "chscale_controller_pod_resize_requests_total", outcome="refused") == 1


def test_events_are_counted_by_type_and_reason_and_still_recorded() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.recorded: list[tuple[Any, ...]] = []

        def record(self, regarding: Any, type_: str, reason: str, message: str) -> None:
            self.recorded.append((regarding, type_, reason, message))

    metrics = Metrics("daemon")
    recorder = Recorder()
    assert metrics.counting_events(recorder) is recorder
    recorder.record({"x": 1}, "Warning", "VMResizeFailed", "boom")
    recorder.record({"x": 1}, "Warning", "VMResizeFailed", "boom")
    assert recorder.recorded == [({"x": 1}, "Warning", "VMResizeFailed", "boom")] * 2
    assert (
        sample(metrics, "chscale_daemon_events_total", type="Warning", reason="VMResizeFailed")
        == 2.0
    )


def test_exposition_has_process_metrics_phases_and_escaped_labels() -> None:
    informer = FakeInformer([vm("Running", name="a"), vm("Running", name="b"), vm("Paused")])
    metrics = Metrics("controller", informer)  # type: ignore[arg-type]
    assert informer.handlers == [metrics.on_vm]
    metrics.event_recorded("Warning", 'odd "reason"\nwith a newline\\')
    server = serve(metrics.registry, 0, lambda: True)
    try:
        status, content_type, body = _get(server, "/metrics")
    finally:
        server.stop()
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert "process_cpu_seconds" in families
    assert "process_resident_memory_bytes" in families
    phases = {s.labels["phase"]: s.value for s in families["chscale_vms"].samples}
    assert phases == {"Running": 2.0, "Paused": 1.0}
    reasons = [s.labels["reason"] for s in families["chscale_controller_events"].samples]
    assert 'odd "reason"\nwith a newline\\' in reasons
    assert "chscale_controller_resize_duration_seconds" in families
