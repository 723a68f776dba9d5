"""Control-plane figures: ``python -m bench.controlplane [--cold [--fresh-gocache]] [--runs N]``.

- ``controlplane_cold_build_s``: building kube-apiserver and etcd from the Go module
  proxy. By default the figure recorded by the build that produced the cached binaries
  (``build-times.json`` next to them), or ``unknown`` if there is no record. ``--cold``
  measures it now, into a fresh temporary binary directory; Go's build cache (GOCACHE)
  and module cache still hold the compiled packages of earlier builds, so that is a
  warm-cache rebuild unless ``--fresh-gocache`` also points GOCACHE at an empty
  directory (minutes of both cores).
- ``controlplane_warm_ready_s``: from ``ControlPlane.start()`` to an API server that is
  ready with the VirtualMachine CRD Established and served, binaries already built
  (median of ``--runs``). Goal: <= 10 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from testbed.controlplane.build import cache_dir, ensure_binaries, read_timings
from testbed.controlplane.launcher import ControlPlane

WARM_READY_GOAL_S = 10.0


def _recorded_build() -> None:
    binaries = ensure_binaries(out=None)
    timings = read_timings()
    names = [binaries.apiserver.name, binaries.etcd.name]
    seconds = [timings.get(name, {}).get("seconds") for name in names]
    if all(isinstance(s, int | float) for s in seconds):
        total = sum(float(s) for s in seconds if isinstance(s, int | float))
        print(f"controlplane_cold_build_s={total:.1f}")
        for name in names:
            entry = timings[name]
            print(
                f"# recorded: {name} {entry.get('seconds')}s, "
                f"{entry.get('packages_compiled')} packages compiled, {entry.get('go')}, "
                f"{entry.get('built_at')}"
            )
        return
    print("controlplane_cold_build_s=unknown")
    print(
        f"# no build record in {cache_dir()} for {', '.join(names)} (built by hand or by an "
        "older build.py; ADR 0002 records the first measurement); --cold measures one"
    )


def _cold_build(fresh_gocache: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="chscale-cold-build-") as tmp:
        if fresh_gocache:
            os.environ["GOCACHE"] = str(Path(tmp) / "gocache")
            print("# GOCACHE is empty: every package is compiled (modules come from GOMODCACHE)")
        else:
            print(
                "# binaries built into an empty directory, but Go's build cache (GOCACHE) is "
                "warm: this is faster than a first build; --fresh-gocache for a cold one"
            )
        sys.stdout.flush()
        started = time.monotonic()
        # ensure_binaries prints controlplane_cold_build_s itself.
        ensure_binaries(Path(tmp) / "bin", out=sys.stdout)
        print(f"# wall clock including locking and bookkeeping: {time.monotonic() - started:.1f}s")


def _warm_ready(runs: int) -> None:
    binaries = ensure_binaries(out=sys.stdout)
    totals: list[float] = []
    phases: dict[str, list[float]] = {}
    for _ in range(runs):
        cp = ControlPlane(binaries=binaries)
        started = time.monotonic()
        cp.start()
        try:
            totals.append(time.monotonic() - started)
            for name, seconds in cp.timings.items():
                phases.setdefault(name, []).append(seconds)
        finally:
            cp.stop()
    print(f"controlplane_warm_ready_s={statistics.median(totals):.2f}")
    print(f"controlplane_warm_ready_max_s={max(totals):.2f}")
    for name in ("apiserver_ready", "crd_established"):
        if name in phases:
            print(f"controlplane_{name}_s={statistics.median(phases[name]):.2f}")
    print(f"# {runs} run(s); goal controlplane_warm_ready_s <= {WARM_READY_GOAL_S:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane", description=__doc__)
    parser.add_argument("--cold", action="store_true", help="measure a build now")
    parser.add_argument(
        "--fresh-gocache", action="store_true", help="with --cold: empty Go build cache too"
    )
    parser.add_argument("--runs", type=int, default=3, help="warm starts to time")
    args = parser.parse_args(argv)
    if args.fresh_gocache and not args.cold:
        parser.error("--fresh-gocache only makes sense with --cold")
    if args.cold:
        _cold_build(args.fresh_gocache)
    else:
        _recorded_build()
    _warm_ready(max(1, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
