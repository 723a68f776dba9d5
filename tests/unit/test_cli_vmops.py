"""The CLI's waiting helpers, against a scripted API (no server needed)."""

from __future__ import annotations

from typing import Any

from apps.cli.vmops import event_reasons, wait_for_events


class ScriptedEvents:
    """Answers the event listing with each script entry in turn, then the last forever."""

    def __init__(self, *reasons_per_call: tuple[str, ...]) -> None:
        self.script = list(reasons_per_call)
        self.calls = 0

    def get(self, _path: str, **_params: Any) -> dict[str, Any]:
        reasons = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        items = [
            {"reason": r, "metadata": {"resourceVersion": str(i + 1)}}
            for i, r in enumerate(reasons)
        ]
        return {"items": items}


def completed(events: list[dict[str, Any]]) -> bool:
    return "VMResizeCompleted" in event_reasons(events)


def test_waits_until_an_event_written_after_the_status_shows_up() -> None:
    # The controller writes the status first and the Event second: a caller that saw the
    # status must not print the events before the closing one exists.
    api = ScriptedEvents(("VMResizeInitiated",), ("VMResizeInitiated", "VMResizeCompleted"))
    events = wait_for_events(api, "default", "vm", completed, timeout=5)  # type: ignore[arg-type]
    assert [e["reason"] for e in events] == ["VMResizeInitiated", "VMResizeCompleted"]
    assert api.calls == 2


def test_gives_back_what_is_there_when_an_event_never_comes() -> None:
    # Events are best effort (a failed write is only logged): never hang on one.
    api = ScriptedEvents(("VMResizeInitiated",))
    events = wait_for_events(api, "default", "vm", completed, timeout=0)  # type: ignore[arg-type]
    assert [e["reason"] for e in events] == ["VMResizeInitiated"]
