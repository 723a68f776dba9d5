"""Pure helpers the benchmarks share: percentiles and ratios, the API server's request
counters, the components' log lines, and a counting wrapper.

No I/O here (the benchmarks fetch ``/metrics`` and read logs themselves), so each helper
has a unit test (``tests/unit/test_bench_measure.py``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# The verbs of apiserver_request_total that change state (reads: GET, LIST, WATCH).
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
# Writes a node or a leader election makes on a timer whatever resizes happen: reported
# apart, not charged to a resize.
BACKGROUND_RESOURCES = frozenset({"leases", "nodes"})

# (resource, subresource, verb)
RequestKey = tuple[str, str, str]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')
_LOGFMT = re.compile(r'(?P<key>[A-Za-z_][\w.-]*)=(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>\S*))')


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in [0, 100]); 0.0 for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile: p must be within [0, 100], got {p}")
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(value: float, floor: float) -> float:
    """``value / floor``; ``inf`` when the floor is not positive (never a ZeroDivisionError)."""
    if floor <= 0:
        return math.inf
    return value / floor


def _stat(path: Path) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) from a ``/proc/<pid>/stat``, or None."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: the fields that follow come after ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, or None."""
    stat = _stat(Path(f"/proc/{pid}/stat"))
    return stat[1] if stat is not None else None


# Processes of these kinds run one per node or replica, named "<kind>-<node or index>".
PER_NODE = ("controller", "daemon", "kubelet")


def cpu_by_component(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds per component (the processes of a per-node kind summed), and the
    children of the kubelets (the VMMs they started) as ``vmm``."""
    totals: dict[str, float] = {}
    kubelets = set()
    for name, pid in pids.items():
        seconds = cpu_seconds(pid)
        if seconds is None:
            continue
        kind = name.split("-", 1)[0]
        component = kind if kind in PER_NODE else name
        totals[component] = totals.get(component, 0.0) + seconds
        if kind == "kubelet":
            kubelets.add(pid)
    for path in Path("/proc").glob("[0-9]*/stat"):
        stat = _stat(path)
        if stat is not None and stat[0] in kubelets:
            totals["vmm"] = totals.get("vmm", 0.0) + stat[1]
    return totals


def parse_request_totals(text: str) -> dict[RequestKey, float]:
    """``apiserver_request_total`` from a Prometheus text exposition, summed over every
    label except resource, subresource and verb (code, scope, group, version, ...)."""
    totals: dict[RequestKey, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total"):
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != "apiserver_request_total":
            continue
        labels = {
            m.group("key"): m.group("value") for m in _LABEL.finditer(match.group("labels") or "")
        }
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        key = (labels.get("resource", ""), labels.get("subresource", ""), labels.get("verb", ""))
        totals[key] = totals.get(key, 0.0) + value
    return totals


def writes_between(
    before: Mapping[RequestKey, float], after: Mapping[RequestKey, float]
) -> Counter[RequestKey]:
    """The write requests served between two snapshots (counters only grow; a key that
    shrank means the server restarted, which is an error, not a negative count)."""
    out: Counter[RequestKey] = Counter()
    for key, value in after.items():
        if key[2] not in WRITE_VERBS:
            continue
        delta = value - before.get(key, 0.0)
        if delta < 0:
            raise ValueError(f"apiserver_request_total{key} went down: was the server restarted?")
        if delta:
            out[key] = round(delta)
    return out


def write_name(key: RequestKey) -> str:
    """``virtualmachines/status PATCH`` -> ``virtualmachines_status_patch``."""
    resource, subresource, verb = key
    parts = [resource or "none"] + ([subresource] if subresource else []) + [verb.lower()]
    return "_".join(p.replace(".", "_").replace("-", "_") for p in parts)


def per_resize(
    writes: Mapping[RequestKey, int], resizes: int
) -> tuple[float, float, dict[str, float]]:
    """(writes per resize, background writes per resize, breakdown by write_name) with
    the background resources (leases, nodes) left out of the first and the breakdown."""
    if resizes <= 0:
        raise ValueError(f"per_resize: resizes must be > 0, got {resizes}")
    charged = {k: v for k, v in writes.items() if k[0] not in BACKGROUND_RESOURCES}
    background = sum(v for k, v in writes.items() if k[0] in BACKGROUND_RESOURCES)
    breakdown = {write_name(k): v / resizes for k, v in sorted(charged.items())}
    return sum(charged.values()) / resizes, background / resizes, breakdown


def parse_log_line(line: str) -> tuple[datetime, dict[str, str]] | None:
    """One logfmt line of a chscale process (``ts=... level=... msg=... vm=...``): its
    time and fields, or None for a line that is not one (a traceback, a blank)."""
    fields: dict[str, str] = {}
    for m in _LOGFMT.finditer(line):
        quoted = m.group("quoted")
        value = quoted.replace('\\"', '"') if quoted is not None else m.group("bare")
        fields[m.group("key")] = value
    ts = fields.get("ts")
    if not ts:
        return None
    try:
        when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when, fields


def busy_gaps(lines: Iterable[str]) -> list[float]:
    """Per vm.resize that was refused Busy (429) at least once: seconds from the first
    refusal to the request the VMM accepted next, from a node daemon's log."""
    gaps: list[float] = []
    first_refusal: dict[str, datetime] = {}
    for line in lines:
        parsed = parse_log_line(line)
        if parsed is None:
            continue
        when, fields = parsed
        vm, msg = fields.get("vm", ""), fields.get("msg", "")
        if msg == "VMM call refused" and fields.get("kind") == "Busy":
            first_refusal.setdefault(vm, when)
        elif msg == "VMM resize requested" and vm in first_refusal:
            gaps.append((when - first_refusal.pop(vm)).total_seconds())
    return gaps


class CallCounter:
    """Wraps a function and counts its calls (the simulation's ``decide``): in all, by
    the name of the calling function, and ``repeats``, the calls whose arguments equal
    those of the previous call from the same caller for the same ``key(args)`` (the same
    observation evaluated again)."""

    def __init__(
        self, fn: Callable[..., Any], key: Callable[[tuple[Any, ...]], Hashable] | None = None
    ) -> None:
        self.fn = fn
        self.key = key
        self.calls = 0
        self.repeats = 0
        self.by_caller: Counter[str] = Counter()
        self._last: dict[tuple[str, Hashable], tuple[Any, ...]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        caller = sys._getframe(1).f_code.co_name
        self.by_caller[caller] += 1
        if self.key is not None:
            slot = (caller, self.key(args))
            if _same(self._last.get(slot), args):
                self.repeats += 1
            self._last[slot] = args
        return self.fn(*args, **kwargs)


def _same(last: tuple[Any, ...] | None, args: tuple[Any, ...]) -> bool:
    """``last == args``, compared from the last argument on: for ``decide`` that is
    ``now``, which tells two calls apart at once, where the VMs (first) compare field by
    field."""
    if last is None or len(last) != len(args):
        return False
    for i in range(len(args) - 1, -1, -1):
        a, b = last[i], args[i]
        if a is not b and not a == b:  # noqa: SIM201 (what tuple equality asks: ==)
            return False
    return True


# --- where a resize's time goes, from the components' logs ----------------------------------

# The steps of a one-step grow (pod first, then guest) in order, each the log line that
# marks it done: (milestone, component whose log has it, predicate on the fields).
GROW_MILESTONES: tuple[tuple[str, str, Callable[[Mapping[str, str]], bool]], ...] = (
    (
        "admitted",
        "webhook",
        lambda f: (
            f.get("msg") == "admission reviewed"
            and f.get("route") == "/validate-vm"
            and f.get("operation") == "UPDATE"
        ),
    ),
    ("pod_resize_requested", "controller", lambda f: f.get("msg") == "pod resize requested"),
    ("pod_actuated", "kubelet", lambda f: f.get("msg") == "pod status written"),
    (
        "guest_step_started",
        "controller",
        lambda f: f.get("msg") == "phase changed" and f.get("to") == "ResizeInProgress",
    ),
    ("vmm_resized", "daemon", lambda f: f.get("msg") == "VMM resize requested"),
    (
        "completed",
        "daemon",
        lambda f: f.get("msg") == "phase changed" and f.get("to") in ("Running", "Paused"),
    ),
)


# A shrink: guest first, then the pod.
SHRINK_MILESTONES: tuple[tuple[str, str, Callable[[Mapping[str, str]], bool]], ...] = (
    GROW_MILESTONES[0],
    (
        "guest_step_started",
        "controller",
        lambda f: f.get("msg") == "phase changed" and f.get("to") == "ResizeInProgress",
    ),
    ("vmm_resized", "daemon", lambda f: f.get("msg") == "VMM resize requested"),
    (
        "pod_step_started",
        "daemon",
        lambda f: f.get("msg") == "phase changed" and f.get("to") == "PodResizeInProgress",
    ),
    ("pod_resize_requested", "controller", lambda f: f.get("msg") == "pod resize requested"),
    ("pod_actuated", "kubelet", lambda f: f.get("msg") == "pod status written"),
    (
        "completed",
        "controller",
        lambda f: f.get("msg") == "phase changed" and f.get("to") in ("Running", "Paused"),
    ),
)

# A component logs a step after the API write that made it, so the next component,
# woken by that write, can log its own step a few milliseconds *before* it.
LOG_SLACK_S = 0.05


def log_vm(fields: Mapping[str, str]) -> str | None:
    """The VM a log line is about, as namespace/name: ``vm=``, the webhook's ``object=``,
    or the kubelet's ``pod=namespace/vm-<name>`` (chscale's pod naming)."""
    if fields.get("vm"):
        return fields["vm"]
    if fields.get("object"):
        return fields["object"]
    pod = fields.get("pod", "")
    namespace, _, name = pod.partition("/")
    if name.startswith("vm-"):
        return f"{namespace}/{name[3:]}"
    return None


def milestones(
    logs: Mapping[str, Iterable[str]],
    sent: Mapping[str, datetime],
    steps: tuple[tuple[str, str, Callable[[Mapping[str, str]], bool]], ...] = GROW_MILESTONES,
    slack_s: float = LOG_SLACK_S,
) -> dict[str, dict[str, datetime]]:
    """Per VM (namespace/name) with a ``sent`` time, when each step was first logged at or
    after the step before it, less ``slack_s`` but not before ``sent`` (``logs``: lines
    by component). A step
    never logged ends that VM's list: later steps are not looked for."""
    events: dict[tuple[str, str], list[datetime]] = {}
    for component, lines in logs.items():
        for line in lines:
            parsed = parse_log_line(line)
            if parsed is None:
                continue
            when, fields = parsed
            vm = log_vm(fields)
            if vm is None or vm not in sent:
                continue
            for name, owner, matches in steps:
                if owner == component and matches(fields):
                    events.setdefault((vm, name), []).append(when)
    out: dict[str, dict[str, datetime]] = {}
    for vm, start in sent.items():
        reached: dict[str, datetime] = {}
        previous = start
        for name, _, _ in steps:
            # Never before the resize was sent: that line is the previous resize's.
            after = max(start, previous - timedelta(seconds=slack_s))
            later = [t for t in events.get((vm, name), []) if t >= after]
            if not later:
                break
            previous = reached[name] = min(later)
        out[vm] = reached
    return out


def stage_seconds(
    reached: Mapping[str, Mapping[str, datetime]],
    sent: Mapping[str, datetime],
    steps: tuple[tuple[str, str, Callable[[Mapping[str, str]], bool]], ...] = GROW_MILESTONES,
) -> dict[str, list[float]]:
    """Per step, the seconds each VM spent from the step before (``sent`` for the first)
    to it: ``{"admitted": [...], "pod_resize_requested": [...], ...}``."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    for vm, times in reached.items():
        previous = sent[vm]
        for name, _, _ in steps:
            if name not in times:
                break
            out[name].append((times[name] - previous).total_seconds())
            previous = times[name]
    return out


# --- what each VM status write changed -------------------------------------------------------

# Stamps that change on every write and say nothing by themselves.
_STAMPS = frozenset({"lastTransitionTime", "lastProbeTime", "lastUpdateTime"})


def _without_stamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_stamps(v) for k, v in value.items() if k not in _STAMPS}
    if isinstance(value, list):
        return [_without_stamps(v) for v in value]
    return value


def status_changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """What one status write changed, as a name: the status fields that differ, sorted
    and joined by ``+``; a field holding an object on both sides by its keys
    (``resize.step``), a condition by its type (``conditions.Resized``); ``nothing``
    when only timestamps moved."""
    old = _without_stamps(dict(before or {}))
    new = _without_stamps(dict(after))
    changed: set[str] = set()
    for key in set(old) | set(new):
        if key == "conditions":
            old_c = {c.get("type"): c for c in old.get(key) or [] if isinstance(c, dict)}
            new_c = {c.get("type"): c for c in new.get(key) or [] if isinstance(c, dict)}
            for ctype in set(old_c) | set(new_c):
                if old_c.get(ctype) != new_c.get(ctype):
                    changed.add(f"conditions.{ctype}")
        elif isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            for sub in set(old[key]) | set(new[key]):
                if old[key].get(sub) != new[key].get(sub):
                    changed.add(f"{key}.{sub}")
        elif old.get(key) != new.get(key):
            changed.add(key)
    return "+".join(sorted(changed)) or "nothing"
