"""Fault injection: play seeded fault schedules against the real local stack.

    python -m bench.faults --schedules 50            # seeds 0..49
    python -m bench.faults --schedules 20 --seed 1000
    python -m bench.faults --replay 17               # one schedule again, described
    python -m bench.faults --fuzz 40                 # malformed VMs past admission

One control plane, one stack with a fault proxy in front of the API server for the
controller and each daemon, four VMs on two nodes (ADR 0008). Each schedule brings the
VMs to its start sizes, plays its spec changes and faults for a short window, ends the
faults and waits for convergence, while the checker samples RESIZE.md §8 all along.
A failing schedule prints its seed and the command that replays it.

Prints ``schedules=``, ``faults_injected=``, ``invariant_checks=``, ``violations=``
(goal 0), ``unconverged=`` (goal 0), plus ``proxy_interventions=``,
``converge_p50_s=``/``converge_max_s=`` and ``elapsed_s=``. Exit status 1 if any
schedule failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from apps.common import logs
from testbed.faults.fuzz import run_fuzz
from testbed.faults.runner import Harness, ScheduleResult
from testbed.faults.schedule import GeneratorConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n")[0])
    p.add_argument("--schedules", type=int, default=0, help="how many seeded schedules to play")
    p.add_argument("--seed", type=int, default=0, help="the first schedule's seed")
    p.add_argument("--replay", type=int, action="append", default=[], help="play this seed")
    p.add_argument("--fuzz", type=int, default=0, help="malformed VM objects to write")
    p.add_argument("--window", type=float, default=GeneratorConfig().window)
    p.add_argument("--state-dir", type=Path, help="default: a fresh temporary directory")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    seeds = list(args.replay) or list(range(args.seed, args.seed + args.schedules))
    if not seeds and not args.fuzz:
        print("nothing to do: give --schedules N, --replay SEED or --fuzz N", file=sys.stderr)
        return 2
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="chscale-faults-"))
    results: list[ScheduleResult] = []
    began = time.monotonic()
    harness = Harness(
        state_dir,
        generator=GeneratorConfig(window=args.window),
        progress=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True),
    )
    fuzz_failures = 0
    with harness:
        for seed in seeds:
            schedule = harness.schedule(seed)
            if args.replay:
                print(schedule.describe(), file=sys.stderr)
            result = harness.run(schedule)
            results.append(result)
            verdict = "ok" if result.ok else "FAILED"
            print(
                f"# seed={seed} {verdict} faults={result.faults_injected} "
                f"reset_s={result.reset_s:.2f} converge_s={result.converge_s:.2f}",
                file=sys.stderr,
                flush=True,
            )
            if not result.ok:
                print(result.report(), file=sys.stderr, flush=True)
        if args.fuzz:
            fuzz = run_fuzz(harness, args.fuzz, seed=args.seed)
            fuzz_failures = len(fuzz.failures)
            for failure in fuzz.failures:
                print(f"# fuzz FAILED: {failure}", file=sys.stderr)
            print(f"fuzz_objects={fuzz.written}")
            print(f"fuzz_rejected_by_schema={fuzz.rejected}")
            print(f"fuzz_spec_invalid_flagged={fuzz.flagged}")
            print(f"fuzz_failures={fuzz_failures}")
        checks = harness.checks()
        interventions = harness.proxy_interventions()
    converge = sorted(r.converge_s for r in results) or [0.0]
    print(f"schedules={len(results)}")
    print(f"faults_injected={sum(r.faults_injected for r in results)}")
    print(f"proxy_interventions={interventions}")
    print(f"invariant_checks={checks}")
    print(f"violations={sum(len(r.violations) for r in results)}")
    print(f"unconverged={sum(len(r.unconverged) for r in results)}")
    print(f"converge_p50_s={converge[len(converge) // 2]:.2f}")
    print(f"converge_max_s={converge[-1]:.2f}")
    print(f"elapsed_s={time.monotonic() - began:.1f}")
    failed = [r.seed for r in results if not r.ok]
    if failed:
        print(
            f"# failed seeds: {failed}; replay one: python -m bench.faults --replay SEED",
            file=sys.stderr,
        )
    logging.shutdown()
    return 1 if failed or fuzz_failures else 0


if __name__ == "__main__":
    sys.exit(main())
