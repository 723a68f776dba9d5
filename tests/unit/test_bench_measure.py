"""The benchmarks' pure helpers (bench/measure.py)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from bench.measure import (
    SHRINK_MILESTONES,
    CallCounter,
    busy_gaps,
    log_vm,
    milestones,
    parse_log_line,
    parse_request_totals,
    per_resize,
    percentile,
    ratio,
    stage_seconds,
    status_changes,
    write_name,
    writes_between,
)


def _sample(resource: str, sub: str, verb: str, value: int, code: str = "200") -> str:
    """One line as kube-apiserver v1.35 writes it (labels sorted, group and version too)."""
    return (
        f'apiserver_request_total{{code="{code}",component="apiserver",dry_run="",group="",'
        f'resource="{resource}",scope="resource",subresource="{sub}",verb="{verb}",'
        f'version="v1"}} {value}'
    )


METRICS = "\n".join(
    [
        "# HELP apiserver_request_total [STABLE] Counter of apiserver requests broken out",
        "# TYPE apiserver_request_total counter",
        _sample("pods", "status", "PATCH", 7),
        _sample("pods", "status", "PATCH", 2, code="409"),
        _sample("pods", "resize", "PATCH", 3),
        _sample("virtualmachines", "", "GET", 40),
        _sample("events", "", "POST", 5, code="201"),
        _sample("leases", "", "PUT", 10),
        'apiserver_request_total_other{resource="pods",verb="PATCH"} 99',
        'apiserver_request_duration_seconds_count{resource="pods",verb="PATCH"} 99',
    ]
)


def test_percentile_nearest_rank() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError, match="p must be"):
        percentile(values, 101)


def test_ratio_guards_a_zero_floor() -> None:
    assert ratio(30.0, 10.0) == 3.0
    assert ratio(1.0, 0.0) == math.inf


def test_request_totals_sum_over_codes_and_skip_other_metrics() -> None:
    totals = parse_request_totals(METRICS)
    assert totals[("pods", "status", "PATCH")] == 9.0
    assert totals[("pods", "resize", "PATCH")] == 3.0
    assert totals[("virtualmachines", "", "GET")] == 40.0
    assert len(totals) == 5


def test_writes_between_counts_writes_only() -> None:
    before = parse_request_totals(METRICS)
    after = dict(before)
    after[("pods", "status", "PATCH")] += 4
    after[("virtualmachines", "", "GET")] += 100
    after[("virtualmachines", "status", "PATCH")] = 6
    writes = writes_between(before, after)
    assert writes == {("pods", "status", "PATCH"): 4, ("virtualmachines", "status", "PATCH"): 6}
    with pytest.raises(ValueError, match="went down"):
        writes_between(after, before)


def test_per_resize_keeps_background_apart() -> None:
    writes = {
        ("virtualmachines", "status", "PATCH"): 6,
        ("pods", "resize", "PATCH"): 2,
        ("leases", "", "PUT"): 4,
    }
    total, background, breakdown = per_resize(writes, 2)
    assert total == 4.0
    assert background == 2.0
    assert breakdown == {"pods_resize_patch": 1.0, "virtualmachines_status_patch": 3.0}
    assert write_name(("events", "", "POST")) == "events_post"
    with pytest.raises(ValueError, match="resizes"):
        per_resize(writes, 0)


def test_parse_log_line_reads_logfmt_with_quotes() -> None:
    line = (
        'ts=2026-12-04T21:35:28.930Z level=info logger=apps.daemon.daemon msg="VMM call '
        'refused" vm=default/bench-e2e kind=Busy error="vm.resize: 429 \\"Too Many\\""'
    )
    parsed = parse_log_line(line)
    assert parsed is not None
    when, fields = parsed
    assert when.microsecond == 930000
    assert fields["msg"] == "VMM call refused"
    assert fields["kind"] == "Busy"
    assert fields["error"] == 'vm.resize: 429 "Too Many"'
    assert parse_log_line("Traceback (most recent call last):") is None
    assert parse_log_line("ts=yesterday msg=x") is None


def test_busy_gaps_from_first_refusal_to_the_accepted_call() -> None:
    lines = [
        'ts=2026-12-04T21:35:28.850Z msg="VMM resize requested" vm=default/a vcpus=4',
        'ts=2026-12-04T21:35:28.930Z msg="VMM call refused" vm=default/a kind=Busy',
        'ts=2026-12-04T21:35:29.044Z msg="VMM call refused" vm=default/a kind=Busy',
        'ts=2026-12-04T21:35:29.000Z msg="VMM call refused" vm=default/b kind=Failed',
        'ts=2026-12-04T21:35:29.166Z msg="VMM resize requested" vm=default/a vcpus=2',
        'ts=2026-12-04T21:35:29.200Z msg="VMM resize requested" vm=default/b vcpus=2',
    ]
    gaps = busy_gaps(lines)
    assert len(gaps) == 1
    assert timedelta(seconds=gaps[0]) == timedelta(milliseconds=236)


def test_call_counter_counts_callers_and_repeats() -> None:
    def add(a: int, b: int) -> int:
        return a + b

    counter = CallCounter(add, key=lambda args: args[0])

    def first() -> None:
        counter(1, 2)
        counter(1, 2)  # the same arguments again: a repeat
        counter(1, 3)

    def second() -> None:
        assert counter(1, 3) == 4  # same arguments, another caller: not a repeat

    first()
    second()
    assert counter.calls == 4
    assert counter.repeats == 1
    assert counter.by_caller == {"first": 3, "second": 1}


def _line(ts: str, **fields: str) -> str:
    body = " ".join(f'{k}="{v}"' if " " in v else f"{k}={v}" for k, v in fields.items())
    return f"ts=2026-12-04T21:00:{ts}Z level=info {body}"


def test_log_vm_names_the_vm_from_each_component() -> None:
    assert log_vm({"vm": "default/a"}) == "default/a"
    assert log_vm({"object": "default/a"}) == "default/a"
    assert log_vm({"pod": "default/vm-a"}) == "default/a"
    assert log_vm({"pod": "default/other"}) is None


def test_milestones_take_each_step_after_the_one_before() -> None:
    sent = {"default/a": datetime.fromisoformat("2026-12-04T21:00:01+00:00")}
    review = {"msg": "admission reviewed", "route": "/validate-vm", "operation": "UPDATE"}
    logs = {
        "webhook": [
            # Before the patch was sent: not this resize's.
            _line("00.500", **review, object="default/a"),
            _line("01.100", **review, object="default/a"),
        ],
        "controller": [
            _line("01.300", msg="pod resize requested", vm="default/a"),
            _line("01.600", msg="phase changed", vm="default/a", to="ResizeInProgress"),
        ],
        # The kubelet's status write before the pod resize was asked for does not count.
        "kubelet": [
            _line("01.200", msg="pod status written", pod="default/vm-a"),
            _line("01.500", msg="pod status written", pod="default/vm-a"),
        ],
        # Logged 20 ms before the controller's line for the write that woke the daemon.
        "daemon": [_line("01.580", msg="VMM resize requested", vm="default/a")],
    }
    reached = milestones(logs, sent)["default/a"]
    assert list(reached) == [
        "admitted",
        "pod_resize_requested",
        "pod_actuated",
        "guest_step_started",
        "vmm_resized",
    ]  # never completed: the list stops there
    stages = stage_seconds({"default/a": reached}, sent)
    assert [round(v, 3) for v in stages["admitted"]] == [0.1]
    assert [round(v, 3) for v in stages["pod_actuated"]] == [0.2]
    assert [round(v, 3) for v in stages["vmm_resized"]] == [-0.02]
    assert stages["completed"] == []


def test_status_changes_names_fields_and_condition_types() -> None:
    before = {
        "phase": "Running",
        "allocated": {"vcpus": 2},
        "conditions": [
            {"type": "Resized", "status": "True", "lastTransitionTime": "t1"},
            {"type": "SpecValid", "status": "True"},
        ],
    }
    moved = {
        **before,
        "conditions": [dict(c, lastTransitionTime="t2") for c in before["conditions"]],
    }
    assert status_changes(before, moved) == "nothing"
    after = {
        "phase": "PodResizeInProgress",
        "allocated": {"vcpus": 2},
        "resize": {"step": "PodGrow"},
        "conditions": [
            {"type": "Resized", "status": "False"},
            {"type": "SpecValid", "status": "True"},
        ],
    }
    assert status_changes(before, after) == "conditions.Resized+phase+resize"
    grown = {**after, "allocated": {"vcpus": 4}, "resize": {"step": "Guest", "attempts": 0}}
    assert status_changes(after, grown) == "allocated.vcpus+resize.attempts+resize.step"
    assert status_changes(None, {"phase": "Pending"}) == "phase"


def test_shrink_milestones_follow_guest_then_pod() -> None:
    sent = {"default/a": datetime.fromisoformat("2026-12-04T21:00:01+00:00")}
    review = {"msg": "admission reviewed", "route": "/validate-vm", "operation": "UPDATE"}
    logs = {
        "webhook": [_line("01.010", **review, object="default/a")],
        "controller": [
            # The previous resize's, logged just before this one was sent.
            _line("00.990", msg="phase changed", vm="default/a", to="ResizeInProgress"),
            _line("01.030", msg="phase changed", vm="default/a", to="ResizeInProgress"),
            _line("01.100", msg="pod resize requested", vm="default/a"),
            _line("01.200", msg="phase changed", vm="default/a", to="Running"),
        ],
        "daemon": [
            _line("01.050", msg="VMM resize requested", vm="default/a"),
            _line("01.080", msg="phase changed", vm="default/a", to="PodResizeInProgress"),
            # The daemon does not complete a shrink: the controller does, after the pod.
            _line("01.090", msg="phase changed", vm="default/a", to="Running"),
        ],
        "kubelet": [_line("01.150", msg="pod status written", pod="default/vm-a")],
    }
    reached = milestones(logs, sent, SHRINK_MILESTONES)["default/a"]
    stages = stage_seconds({"default/a": reached}, sent, SHRINK_MILESTONES)
    assert {k: [round(v, 3) for v in vs] for k, vs in stages.items()} == {
        "admitted": [0.01],
        "guest_step_started": [0.02],
        "vmm_resized": [0.02],
        "pod_step_started": [0.03],
        "pod_resize_requested": [0.02],
        "pod_actuated": [0.05],
        "completed": [0.05],
    }
