"""`troughfill simulate`: run the policies over a trace and report JSON (and a PNG plot)."""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from troughfill.sim.fleet import ClusterParams
from troughfill.sim.scenario import Scenario, plot, run

POLICIES = ("troughfill", "keda-hpa", "static")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troughfill simulate",
        description="troughfill vs a KEDA/HPA autoscaler, a static split and the oracle, over a trace",
    )
    defaults = Scenario()
    params = ClusterParams()
    parser.add_argument(
        "--trace", type=Path, help="rate CSV (ts, rate_rps, active_clients, model); default: bundled ServeGen"
    )
    parser.add_argument("--model", default=defaults.model, help="model column value to use")
    parser.add_argument(
        "--burst-trace", type=Path, help="per-request CSV (TIMESTAMP, ...); default: bundled Azure conv"
    )
    parser.add_argument("--no-burst", action="store_true", help="no sub-window burstiness")
    parser.add_argument("--days", type=float, default=defaults.days)
    parser.add_argument("--start-day", type=float, default=defaults.start_day)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--capacity", type=int, default=params.capacity_gpus, help="GPUs in the pool")
    parser.add_argument("--headroom", type=int, default=params.headroom_gpus)
    parser.add_argument(
        "--per-gpu-rps", type=float, help="online requests/s per GPU (default: sized from the trace)"
    )
    parser.add_argument("--online-peak-fraction", type=float, default=defaults.online_peak_fraction)
    parser.add_argument("--tokens-per-gpu-second", type=float, default=params.tokens_per_gpu_second)
    parser.add_argument("--cold-start", type=int, default=params.cold_start_seconds)
    parser.add_argument("--yield-seconds", type=int, default=params.yield_seconds)
    parser.add_argument("--drain-seconds", type=int, default=params.drain_seconds)
    parser.add_argument("--scrape-interval", type=int, default=params.scrape_interval_seconds)
    parser.add_argument("--gpu-hourly-cost", type=float, default=params.gpu_hourly_cost_usd)
    parser.add_argument("--scale-up-delay", type=float, default=defaults.scale_up_delay_seconds)
    parser.add_argument("--min-useful", type=float, default=defaults.min_useful_seconds)
    parser.add_argument(
        "--forecast",
        action="store_true",
        help="troughfill plans with a seasonal forecast of online demand (the operator builds none)",
    )
    parser.add_argument("--daily-job-gpu-hours", type=float, default=defaults.daily_job_gpu_hours)
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES)
    )
    parser.add_argument("--output", type=Path, help="write the JSON report here (default: stdout)")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    return parser


def scenario_from(args: argparse.Namespace) -> Scenario:
    base = Scenario()
    params = ClusterParams(
        capacity_gpus=args.capacity,
        headroom_gpus=args.headroom,
        tokens_per_gpu_second=args.tokens_per_gpu_second,
        cold_start_seconds=args.cold_start,
        yield_seconds=args.yield_seconds,
        drain_seconds=args.drain_seconds,
        scrape_interval_seconds=args.scrape_interval,
        gpu_hourly_cost_usd=args.gpu_hourly_cost,
    )
    policies = tuple(p for p in args.policies.split(",") if p)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    return replace(
        base,
        trace=args.trace or base.trace,
        model=args.model,
        burst_trace=None if args.no_burst else (args.burst_trace or base.burst_trace),
        days=args.days,
        start_day=args.start_day,
        seed=args.seed,
        per_gpu_rps=args.per_gpu_rps,
        online_peak_fraction=args.online_peak_fraction,
        params=params,
        scale_up_delay_seconds=args.scale_up_delay,
        min_useful_seconds=args.min_useful,
        use_forecast=args.forecast,
        daily_job_gpu_hours=args.daily_job_gpu_hours,
        policies=policies,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenario = scenario_from(args)
    report, series = run(scenario)
    if args.plot:
        plot(
            series,
            args.plot,
            f"{scenario.params.capacity_gpus}-GPU pool, {scenario.model}, "
            f"{report['scenario']['simulated_hours']} h",
        )
        report["plot"] = str(args.plot)
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0
