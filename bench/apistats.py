"""The test kube-apiserver's own request counters, read by the benchmarks (I/O; the
parsing is bench.measure's)."""

from __future__ import annotations

import time

from adapters.k8s.client import Kube
from bench.measure import BACKGROUND_RESOURCES, RequestKey, parse_request_totals, writes_between

QUIET_S = 0.3
QUIET_ROUNDS = 10


def request_totals(kube: Kube) -> dict[RequestKey, float]:
    """The API server's own request counters (its /metrics, as the admin)."""
    resp = kube.pool.request("GET", kube.host + "/metrics", headers={"Accept": "text/plain"})
    if resp.status != 200:
        raise RuntimeError(f"GET /metrics answered {resp.status}: {resp.data[:200]!r}")
    return parse_request_totals(resp.data.decode())


def quiet_totals(kube: Kube) -> dict[RequestKey, float]:
    """The counters once the writes that trail a converged resize (its events) are in:
    two snapshots ``QUIET_S`` apart with the same write counts (heartbeats aside), or
    the last one."""
    totals = request_totals(kube)
    for _ in range(QUIET_ROUNDS):
        time.sleep(QUIET_S)
        newer = request_totals(kube)
        if all(key[0] in BACKGROUND_RESOURCES for key in writes_between(totals, newer)):
            return newer
        totals = newer
    return totals
