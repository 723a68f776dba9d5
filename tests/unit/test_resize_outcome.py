"""The resize duration histogram's outcome: only a resize the guest finished counts as
``completed`` (issue 15: a resize that passed its deadline was counted completed, so the
duration of stalls read as the time resizes take)."""

from __future__ import annotations

from typing import Any

import pytest

from apps.common.executor import SharedExecutor
from core import RESIZED, Condition, ConditionStatus, Owner, Phase, Reasons, Vm, VmStatus
from core.actions import Action, SetCondition, SetPhase


def _ended(reason: str, status: ConditionStatus) -> tuple[Action, ...]:
    return (
        SetPhase(Phase.RUNNING, owner=Owner.DAEMON),
        SetCondition(Condition(RESIZED, status, reason), owner=Owner.DAEMON),
    )


@pytest.mark.parametrize(
    ("actions", "outcome"),
    [
        (_ended(Reasons.RESIZED, ConditionStatus.TRUE), "completed"),
        (_ended(Reasons.GUEST_VCPU_REMOVAL_STUCK, ConditionStatus.FALSE), "stopped"),
        (_ended(Reasons.POD_RESIZE_INFEASIBLE, ConditionStatus.FALSE), "infeasible"),
        ((SetPhase(Phase.RUNNING, owner=Owner.DAEMON),), "stopped"),
    ],
)
def test_a_resize_is_completed_only_when_resized_is_true(
    actions: tuple[Action, ...], outcome: str
) -> None:
    seen: list[str] = []
    executor = SharedExecutor(
        api=None,  # type: ignore[arg-type]  # no write is made
        observe_write=lambda _obj: None,
        on_resize_done=lambda out, _seconds: seen.append(out),
    )
    vm = Vm("default", "vm-0", status=VmStatus(phase=Phase.RESIZE_IN_PROGRESS))
    vm_obj: dict[str, Any] = {"status": {"resize": {"startedAt": "2026-12-05T00:00:00Z"}}}
    executor._resize_metric(vm, Phase.RUNNING, vm_obj, actions)
    assert seen == [outcome]
