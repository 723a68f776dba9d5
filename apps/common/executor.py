"""Carrying out the kernel's shared actions: one status write, events, requeue hints.

The controller and the daemon both use this; each adds the side effects it owns. The
order matters for crash safety and is the kernel's: status first (intent recorded), then
side effects, then events, then hints. Events come after the side effects because they
are API writes no step waits for: before them, each step's Event held up the next step
(the kubelet's, the daemon's) by one API round trip (issue 19). They are still written
when a side effect fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from adapters.k8s.vms import same_status, status_body
from apps.common.logs import kv
from core import (
    RESIZED,
    Action,
    ConditionStatus,
    Phase,
    Reasons,
    RecordEvent,
    Requeue,
    SetPhase,
    Vm,
    apply_status,
)
from core.actions import STATUS_ACTIONS
from core.model import RESIZE_PHASES, STEADY_PHASES
from core.table import TRANSITIONS, Cause

log = logging.getLogger(__name__)
_INFEASIBLE_EVENT = TRANSITIONS[(Phase.POD_RESIZE_IN_PROGRESS, Cause.INFEASIBLE)].reason


def resize_outcome(vm: Vm, actions: tuple[Action, ...]) -> str:
    """How a resize that just left its resize phase ended, by the ``Resized`` condition
    it ended with: ``completed`` only when the guest reached the target; a deadline that
    passed or a refusal is ``stopped`` (counted apart, so the duration of stalls never
    reads as the time a resize takes), a pod resize the node cannot fit ``infeasible``."""
    if any(isinstance(a, RecordEvent) and a.reason == _INFEASIBLE_EVENT for a in actions):
        return "infeasible"
    resized = apply_status(vm.status, actions).condition(RESIZED)
    if resized is not None and resized.status is ConditionStatus.TRUE:
        return "completed"
    if resized is not None and resized.reason == Reasons.POD_RESIZE_INFEASIBLE:
        return "infeasible"
    return "stopped"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusApi(Protocol):
    def write_status(self, vm_obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]: ...

    def record_event(
        self, vm_obj: dict[str, Any], type_: str, reason: str, message: str
    ) -> None: ...


class ResizeObserver(Protocol):
    def __call__(self, outcome: str, seconds: float) -> None: ...


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class SharedExecutor:
    def __init__(
        self,
        api: StatusApi,
        observe_write: Callable[[dict[str, Any]], None],
        on_resize_done: ResizeObserver | None = None,
        clock: Callable[[], str] = now_rfc3339,
    ) -> None:
        self.api = api
        self.observe_write = observe_write
        self.on_resize_done = on_resize_done
        self.clock = clock

    def write_status(
        self, vm_obj: dict[str, Any], vm: Vm, actions: tuple[Action, ...]
    ) -> dict[str, Any]:
        """Merge the status actions into one conditional write; returns the newest object.

        Raises the API's conflict error when the object changed since it was read: the
        caller re-reads and re-decides rather than overwriting blindly.
        """
        status_actions = tuple(a for a in actions if isinstance(a, STATUS_ACTIONS))
        if not status_actions:
            return vm_obj
        new = apply_status(vm.status, status_actions)
        body = status_body(vm_obj.get("status"), new, self.clock())
        if same_status(vm_obj.get("status"), body):
            return vm_obj
        written = self.api.write_status(vm_obj, body)
        self.observe_write(written)
        self._log_phase(vm, actions, vm_obj)
        return written

    def _log_phase(self, vm: Vm, actions: tuple[Action, ...], vm_obj: dict[str, Any]) -> None:
        for action in actions:
            if isinstance(action, SetPhase) and action.phase is not vm.status.phase:
                log.info(
                    "phase changed",
                    extra=kv(vm=vm.key, **{"from": vm.status.phase, "to": action.phase}),
                )
                self._resize_metric(vm, action.phase, vm_obj, actions)

    def _resize_metric(
        self, vm: Vm, to: Phase, vm_obj: dict[str, Any], actions: tuple[Action, ...]
    ) -> None:
        if self.on_resize_done is None:
            return
        if vm.status.phase in RESIZE_PHASES and to in STEADY_PHASES:
            resize = (vm_obj.get("status") or {}).get("resize") or {}
            started = _parse_time(resize.get("startedAt"))
            if started is not None:
                outcome = resize_outcome(vm, actions)
                self.on_resize_done(outcome, max(time.time() - started, 0.0))

    def record_events(self, vm_obj: dict[str, Any], vm: Vm, actions: tuple[Action, ...]) -> None:
        for action in actions:
            if isinstance(action, RecordEvent):
                log.info(
                    "event",
                    extra=kv(
                        vm=vm.key, type=action.type, reason=action.reason, message=action.message
                    ),
                )
                self.api.record_event(vm_obj, str(action.type), action.reason, action.message)

    @staticmethod
    def requeue_after(actions: tuple[Action, ...]) -> float | None:
        delays = [a.after for a in actions if isinstance(a, Requeue)]
        return min(delays) if delays else None
