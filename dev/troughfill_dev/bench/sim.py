"""The simulator's benchmarks. Each prints a JSON report.

python -m troughfill_dev.bench.sim [--days 14] [--plot sim.png]
    The standard scenario: a 64-GPU pool under the ServeGen m-small trace (14 days), online
    burstiness from the Azure conversation trace, troughfill vs a KEDA/HPA autoscaler vs a
    static split vs the oracle.

python -m troughfill_dev.bench.sim --traces [--days 14]
    The same comparison on every bundled trace combination (both ServeGen models, both Azure
    burst profiles, other seeds), against goals: troughfill harvests at least the KEDA/HPA
    policy's GPU-hours in the trough, with at most 1/10 of its interference, and 0.99 of the
    oracle's; with the most any policy paying the cold start could (the cold-start bound).

python -m troughfill_dev.bench.sim --cold-starts 0,15,30,60,120 [--days 3]
    The cold-start bound, troughfill and KEDA as the cold start varies.

python -m troughfill_dev.bench.sim --sweep [--days 3] [--plot tradeoff.png]
    The trade-off between harvest and interference: the admin's headroom (and for troughfill
    how much of it the pool lends to running workers) swept for each policy. Harvest is
    batch GPU-time produced ÷ all GPU-time online leaves idle (capacity - online), so points
    with different headrooms compare.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from troughfill.sim import Scenario, plot, run
from troughfill.sim.scenario import build_demand, bundled, ratio


def standard(days: float, plot_path: Path | None) -> dict[str, Any]:
    scenario = replace(Scenario(), days=days)
    report, series = run(scenario)
    troughfill, keda = report["policies"]["troughfill"], report["policies"]["keda-hpa"]
    report["goals"] = {
        "troughfill_capture_at_least_0.97": troughfill["trough_capture"] >= 0.97,
        "troughfill_interference_at_most_0.001": troughfill["online_interference"] <= 0.001,
        "ahead_of_keda_on_capture": troughfill["trough_capture"] > keda["trough_capture"],
        "ahead_of_keda_on_interference": troughfill["online_interference"] < keda["online_interference"],
    }
    if plot_path:
        plot(series, plot_path, f"64-GPU pool, ServeGen m-small, {report['scenario']['simulated_hours']} h")
        report["plot"] = str(plot_path)
    return report


BURSTS = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}


def trace_scenarios(days: float) -> dict[str, Scenario]:
    base = replace(Scenario(), days=days, policies=("troughfill", "keda-hpa"))
    scenarios = {}
    for model in ("language/m-small", "language/m-mid"):
        for bursts, file in BURSTS.items():
            for seed in (7, 11):
                name = f"{model.split('/')[-1]}/{bursts}/seed{seed}"
                scenarios[name] = replace(base, model=model, burst_trace=bundled(file), seed=seed)
    return scenarios


def compare(item: tuple[str, Scenario]) -> tuple[str, dict[str, Any]]:
    name, scenario = item
    report, _ = run(scenario)
    ours, keda = report["policies"]["troughfill"], report["policies"]["keda-hpa"]
    keep = (
        "trough_capture",
        "trough_capture_vs_cold_start_bound",
        "productive_vs_oracle",
        "online_interference",
        "preemptions",
        "wasted_tokens",
    )
    return name, {
        "online_mean_gpus": report["scenario"]["online_mean_gpus"],
        "online_peak_gpus": report["scenario"]["online_peak_gpus"],
        "cold_start_bound_trough_capture": report["scenario"]["cold_start_bound_trough_capture"],
        "troughfill": {k: ours[k] for k in keep},
        "keda-hpa": {k: keda[k] for k in keep},
        "capture_vs_keda": ratio(ours["trough_capture"], keda["trough_capture"]),
        "interference_vs_keda": ratio(ours["online_interference"], keda["online_interference"]),
    }


def traces(days: float, workers: int) -> dict[str, Any]:
    scenarios = trace_scenarios(days)
    with ProcessPoolExecutor(workers) as pool:
        results = dict(pool.map(compare, scenarios.items()))
    goals = {
        name: {
            "capture_at_least_kedas": r["troughfill"]["trough_capture"] >= r["keda-hpa"]["trough_capture"],
            "interference_at_most_a_tenth_of_kedas": r["interference_vs_keda"] is not None
            and r["interference_vs_keda"] <= 0.1,
            "capture_at_least_0.99": r["troughfill"]["trough_capture"] >= 0.99,
            # whether any policy that pays the cold start and keeps out of online's way could
            "cold_start_bound_allows_0.99": r["cold_start_bound_trough_capture"] >= 0.99,
        }
        for name, r in results.items()
    }
    return {"days": days, "scenarios": results, "goals": goals}


def cold_start_one(item: tuple[Scenario, int]) -> dict[str, Any]:
    base, cold = item
    scenario = replace(base, params=replace(base.params, cold_start_seconds=cold))
    report, _ = run(scenario)
    ours, keda = report["policies"]["troughfill"], report["policies"]["keda-hpa"]
    keep = ("trough_capture", "trough_capture_vs_cold_start_bound", "online_interference", "worker_starts")
    return {
        "cold_start_seconds": cold,
        "cold_start_bound_trough_capture": report["scenario"]["cold_start_bound_trough_capture"],
        "troughfill": {k: ours[k] for k in keep},
        "keda-hpa": {k: keda[k] for k in keep},
    }


def cold_starts(seconds: Sequence[int], days: float, workers: int) -> dict[str, Any]:
    """How the cold start bounds what a policy that keeps out of online's way can capture, and
    what troughfill and KEDA capture, cold start by cold start (standard scenario otherwise)."""
    base = replace(Scenario(), days=days, policies=("troughfill", "keda-hpa"))
    with ProcessPoolExecutor(workers) as pool:
        points = list(pool.map(cold_start_one, [(base, c) for c in seconds]))
    allowing = [p["cold_start_seconds"] for p in points if p["cold_start_bound_trough_capture"] >= 0.99]
    return {
        "days": days,
        "points": points,
        "longest_cold_start_whose_bound_allows_0.99": max(allowing, default=None),
    }


def idle_gpu_seconds(scenario: Scenario) -> float:
    """All GPU-time online leaves idle: capacity - online, each second (no headroom kept)."""
    capacity = scenario.params.capacity_gpus
    demand = build_demand(scenario).gpus
    return float(np.sum(np.maximum(0, capacity - np.minimum(demand, capacity))))


def sweep_points() -> list[tuple[str, int, int]]:
    """(policy, headroom, lent) for each point of the trade-off curves."""
    points = [("keda-hpa", h, 0) for h in range(5)]
    points += [("troughfill keep", h, 0) for h in range(5)]
    points += [("troughfill lend", h, lend) for h in range(1, 5) for lend in range(1, h + 1) if h - lend <= 1]
    return points


def sweep_one(item: tuple[Scenario, tuple[str, int, int], float]) -> dict[str, Any]:
    base, (family, headroom, lend), idle = item
    scenario = replace(
        base,
        params=replace(base.params, headroom_gpus=headroom),
        headroom_lend_gpus=lend,
        policies=("keda-hpa",) if family == "keda-hpa" else ("troughfill",),
    )
    report, _ = run(scenario)
    result = report["policies"][scenario.policies[0]]
    return {
        "policy": family,
        "headroom_gpus": headroom,
        "headroom_lend_gpus": lend,
        "harvest_of_idle": round(result["batch_productive_gpu_hours"] * 3600 / idle, 4),
        "trough_capture": result["trough_capture"],
        "online_interference": result["online_interference"],
        "online_displaced_gpu_hours": result["online_displaced_gpu_hours"],
        "preemptions": result["preemptions"],
        "batch_productive_gpu_hours": result["batch_productive_gpu_hours"],
        "sim_wall_seconds": result["sim_wall_seconds"],
    }


def sweep(days: float, start_day: float, workers: int, plot_path: Path | None) -> dict[str, Any]:
    base = replace(Scenario(), days=days, start_day=start_day)
    idle = idle_gpu_seconds(base)
    with ProcessPoolExecutor(workers) as pool:
        points = list(pool.map(sweep_one, [(base, p, idle) for p in sweep_points()]))
    report: dict[str, Any] = {
        "days": days,
        "start_day": start_day,
        "idle_gpu_hours": round(idle / 3600, 1),
        "points": points,
    }
    keda_at_2 = next(p for p in points if p["policy"] == "keda-hpa" and p["headroom_gpus"] == 2)
    report["dominates_keda"] = {
        # for each KEDA point, the best troughfill point with no more interference
        f"keda headroom {p['headroom_gpus']}": best_below(points, p)
        for p in points
        if p["policy"] == "keda-hpa"
    }
    report["reference"] = {"keda-hpa headroom 2": keda_at_2}
    if plot_path:
        plot_tradeoff(points, plot_path, f"64-GPU pool, ServeGen m-small, {days:g} days")
        report["plot"] = str(plot_path)
    return report


def best_below(points: list[dict[str, Any]], keda: dict[str, Any]) -> dict[str, Any] | None:
    ours = [
        p
        for p in points
        if p["policy"] != "keda-hpa" and p["online_interference"] <= keda["online_interference"]
    ]
    if not ours:
        return None
    best = max(ours, key=lambda p: p["harvest_of_idle"])
    return {
        "policy": best["policy"],
        "headroom_gpus": best["headroom_gpus"],
        "headroom_lend_gpus": best["headroom_lend_gpus"],
        "harvest_vs_keda": ratio(best["harvest_of_idle"], keda["harvest_of_idle"]),
        "interference_vs_keda": ratio(best["online_interference"], keda["online_interference"]),
    }


def plot_tradeoff(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - only the plot needs it, and it must pick a headless backend first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(figsize=(9, 6))
    # curves: KEDA over its headroom; troughfill keep over its headroom; troughfill lending all
    # but one GPU of its headroom (one always free at once), and all of it
    curves: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
        "keda-hpa": ("tab:red", lambda p: p["policy"] == "keda-hpa"),
        "troughfill keep": ("tab:green", lambda p: p["policy"] == "troughfill keep"),
        "troughfill lend, 1 GPU kept free": (
            "tab:blue",
            lambda p: p["policy"] == "troughfill lend" and p["headroom_gpus"] - p["headroom_lend_gpus"] == 1,
        ),
        "troughfill lend, all of it": (
            "tab:purple",
            lambda p: p["policy"] == "troughfill lend" and p["headroom_gpus"] == p["headroom_lend_gpus"],
        ),
    }
    floor = min((p["online_interference"] for p in points if p["online_interference"] > 0), default=1e-6) / 2
    for family, (color, member) in curves.items():
        mine = sorted((p for p in points if member(p)), key=lambda p: p["headroom_gpus"])
        xs = [max(p["online_interference"], floor) for p in mine]
        ys = [p["harvest_of_idle"] for p in mine]
        axes.plot(xs, ys, marker="o", color=color, label=family)
        for p, x, y in zip(mine, xs, ys, strict=True):
            label = f"h{p['headroom_gpus']}" + (
                f"/l{p['headroom_lend_gpus']}" if p["headroom_lend_gpus"] else ""
            )
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    axes.set_xscale("log")
    axes.set_xlabel("online interference (displaced ÷ demanded online GPU-time, log)")
    axes.set_ylabel("batch GPU-time produced ÷ GPU-time online left idle")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--traces", action="store_true", help="troughfill vs KEDA on every trace combination")
    mode.add_argument("--sweep", action="store_true", help="harvest vs interference, headroom swept")
    mode.add_argument(
        "--cold-starts", help="comma-separated cold starts (s): the bound, troughfill and KEDA at each"
    )
    parser.add_argument("--days", type=float, help="days simulated (default 14; 3 for --sweep)")
    parser.add_argument("--start-day", type=float, default=0.0, help="first day (--sweep)")
    parser.add_argument("--workers", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.traces:
        report = traces(args.days or 14.0, args.workers)
    elif args.cold_starts:
        report = cold_starts([int(c) for c in args.cold_starts.split(",")], args.days or 3.0, args.workers)
    elif args.sweep:
        report = sweep(args.days or 3.0, args.start_day, args.workers, args.plot)
    else:
        report = standard(args.days or 14.0, args.plot)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
