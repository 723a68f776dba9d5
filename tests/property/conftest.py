"""Hypothesis profiles for the state machine in test_stateful.py.

``ci`` (the default) runs it for 500 examples, derandomized: CI judges the change, not
the luck of the draw, and a failure it reports replays exactly. ``dev`` is a quick look
while editing; ``deep`` is a long hunt at random (run it to find what ``ci`` does not).
Pick one with ``HYPOTHESIS_PROFILE=dev``. The profiles apply to
the state machine only (loading one here would change every hypothesis test in the
session). No deadline: the machine is shared, and timings are not what these tests judge.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile(
    "ci", max_examples=500, stateful_step_count=100, derandomize=True, **_COMMON
)
settings.register_profile("dev", max_examples=60, stateful_step_count=100, **_COMMON)
settings.register_profile("deep", max_examples=5000, stateful_step_count=80, **_COMMON)
