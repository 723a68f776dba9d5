"""Settings for every hypothesis test in the suite.

Timings are not what these tests judge (they belong in bench/), and CI machines are
shared: no per-example deadline, and no health check that fails a run because drawing
inputs was slow. Example counts stay each test's own; tests/property/conftest.py adds
the state machine's profiles on top.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("chscale", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("chscale")
