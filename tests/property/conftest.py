"""Hypothesis profiles for the property suite.

``ci`` (the default) runs the state machine for 500 examples; ``dev`` is a quick look
while editing (``HYPOTHESIS_PROFILE=dev``); ``deep`` is for a long hunt. No deadline: the
machine is shared and timings are not what these tests judge.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=500, stateful_step_count=100, **_COMMON)
settings.register_profile("dev", max_examples=60, stateful_step_count=100, **_COMMON)
settings.register_profile("deep", max_examples=5000, stateful_step_count=80, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
