"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print, write JSON.

Each benchmark measures its figure and a baseline in the same run and prints
the ratio next to the PROTOCOL §9 target; results go to bench/results/NAME.json.
Missing a target is reported, not an error: the exit status is non-zero only
when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from bench.common import RESULTS_DIR, Result, fmt, machine_info, now_iso

# Run order: rollout-e2e reuses the ingest and download baselines measured before it.
BENCHMARKS = {
    "control-api": "bench.control_api",
    "telemetry-ingest": "bench.telemetry_ingest",
    "download": "bench.download",
    "report": "bench.report",
    "dashboard": "bench.dashboard",
    "rollout-e2e": "bench.rollout_e2e",
    "fleet-connect": "bench.fleet_connect",
    "notify-fleet": "bench.notify_fleet",
    "origin-load": "bench.origin_load",
    "device-identity": "bench.device_identity",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def _print_result(result: Result) -> None:
    print(f"  {result.figure.text()}")
    print(f"  {result.baseline.text()}")
    if result.ratio is not None:
        print(f"  ratio: {result.ratio:.3f}")
    for t in result.targets:
        verdict = {True: "met", False: "NOT met", None: "not measurable here"}[t.met]
        note = f" ({t.note})" if t.note else ""
        print(f"  target {t.what}: {verdict}{note}")


def _summary(results: list[Result], failed: list[str]) -> None:
    print("\nsummary")
    print(f"  {'benchmark':<18} {'figure':>22} {'baseline':>22} {'ratio':>7}  met")
    for r in results:
        fig = f"{fmt(r.figure.value)} {r.figure.unit}" if r.figure.value is not None else "n/a"
        base = (
            f"{fmt(r.baseline.value)} {r.baseline.unit}" if r.baseline.value is not None else "n/a"
        )
        rat = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        met = {True: "yes", False: "no", None: "-"}[r.met]
        print(f"  {r.name:<18} {fig:>22} {base:>22} {rat:>7}  {met}")
    for name in failed:
        print(f"  {name:<18} FAILED to run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, a smoke run (about a minute)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="rollout-e2e, notify-fleet, origin-load and device-identity fleet size "
        "(rollout-e2e and origin-load: 200 with --quick, 2000 otherwise; notify-fleet: 100 "
        "with --quick, 10000 otherwise; device-identity: 300 with --quick, 100000 otherwise)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where NAME.json files go (default {RESULTS_DIR})",
    )
    parser.add_argument(
        "--fleet-in-process",
        action="store_true",
        help="rollout-e2e: run the simulated fleet in this process (default: a child process)",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="rollout-e2e: follow the rollout with WatchRollout (default: poll its row)",
    )
    parser.add_argument(
        "--broker-max-queued",
        type=int,
        default=1_000_000,
        metavar="N",
        help="rollout-e2e: the broker's max_queued_messages (default 1000000, as the shipped "
        "config; 0: no limit)",
    )
    parser.add_argument(
        "--publish-connections",
        type=int,
        default=None,
        metavar="N",
        help="rollout-e2e and notify-fleet: the control plane's publish_connections "
        "(default: the shipped default)",
    )
    parser.add_argument(
        "--ingest-workers",
        type=int,
        default=2,
        metavar="N",
        help="telemetry-ingest: the control plane's ingest_workers (default 2, one per core "
        "here; 0: ingest in the control plane's process)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(
        f"machine: {machine['nproc']} cores, {machine['cpu_model']}, "
        f"Python {machine['python']}, {machine['mosquitto']}"
    )
    results: list[Result] = []
    failed: list[str] = []
    earlier: dict[str, Result] = {}
    for name in names:
        print(f"\n== {name} ({'quick' if args.quick else 'full'})", flush=True)
        started, t0, load0 = now_iso(), time.perf_counter(), os.getloadavg()[0]
        try:
            module = _module(name)
            if name == "rollout-e2e":
                result = module.run(
                    args.quick,
                    earlier=earlier,
                    devices=args.devices,
                    fleet_in_process=args.fleet_in_process,
                    watch=args.watch,
                    broker_max_queued=args.broker_max_queued,
                    publish_connections=args.publish_connections,
                )
            elif name == "notify-fleet":
                result = module.run(
                    args.quick, devices=args.devices, publish_connections=args.publish_connections
                )
            elif name == "telemetry-ingest":
                result = module.run(args.quick, ingest_workers=args.ingest_workers)
            elif name in ("origin-load", "device-identity"):
                result = module.run(args.quick, devices=args.devices)
            else:
                result = module.run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            # No result is better than last run's, read as this run's.
            (results_dir / f"{name}.json").unlink(missing_ok=True)
            continue
        result.started_at = started
        result.elapsed_s = time.perf_counter() - t0
        # Other work on the machine skews figures; the load average shows it.
        result.details["loadavg_1min"] = {"start": load0, "end": os.getloadavg()[0]}
        earlier[name] = result
        results.append(result)
        _print_result(result)
        path = results_dir / f"{name}.json"
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"  wrote {path} ({result.elapsed_s:.1f} s)", flush=True)
    _summary(results, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
