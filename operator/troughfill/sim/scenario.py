"""A scenario: a pool, a trace, a job mix; every policy runs on the same demand, then a report.

The oracle defines 100 %: with perfect knowledge and no latency (no cold start, no stop time,
no lost work) it fills exactly capacity - online - headroom at every second, the admin's
headroom being a constraint for everyone.
"""

import math
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from troughfill.sim.fleet import (
    SAMPLE_SECONDS,
    Cluster,
    ClusterParams,
    Policy,
    SimJob,
    Totals,
    WindowMeans,
    queue_order,
)
from troughfill.sim.policies import KedaPolicy, StaticPolicy, TroughfillPolicy, pool_policy
from troughfill.sim.trace import (
    OnlineDemand,
    load_burst_profile,
    load_rate_trace,
    online_demand,
    resample_mean,
)

DATA = resources.files("troughfill.sim") / "data"
DEFAULT_TRACE = "servegen_rate_10min_msmall_mmid.csv"
DEFAULT_BURST_TRACE = "AzureLLMInferenceTrace_conv.csv"


def bundled(name: str) -> Path:
    return Path(str(DATA / name))


@dataclass(frozen=True)
class Scenario:
    trace: Path = field(default_factory=lambda: bundled(DEFAULT_TRACE))
    model: str | None = "language/m-small"
    burst_trace: Path | None = field(default_factory=lambda: bundled(DEFAULT_BURST_TRACE))
    burst_window_seconds: int = 60
    days: float | None = 14.0
    start_day: float = 0.0
    per_gpu_rps: float | None = None
    """Requests/s one online GPU serves; None: sized so online's 99.9th percentile needs 85 % of the pool."""
    online_peak_fraction: float = 0.85
    online_scale_down_seconds: int = 300
    seed: int = 7
    params: ClusterParams = field(default_factory=ClusterParams)
    scale_up_delay_seconds: float = 10.0
    min_useful_seconds: float = 300.0
    reconcile_seconds: int = 2
    headroom_lend_gpus: int = 0
    """troughfill's pool lends this much of its headroom to running workers (keep: 0)."""
    use_forecast: bool = False
    """troughfill plans with a seasonal forecast of online demand (the operator has none)."""
    daily_job_gpu_hours: float = 150.0
    """Size of the daily deadline job (products namespace, 24 h window), in GPU-hours of work."""
    policies: tuple[str, ...] = ("troughfill", "keda-hpa", "static")


@dataclass
class PolicyRun:
    name: str
    totals: Totals
    jobs: list[SimJob]
    samples: list[float]
    wall_seconds: float


def make_jobs(scenario: Scenario, seconds: int) -> list[SimJob]:
    """A standing low-priority backlog plus a daily higher-priority job due 24 h after it arrives."""
    params = scenario.params
    jobs = [SimJob("research/backfill", "research", priority=0, tokens=math.inf)]
    tokens = scenario.daily_job_gpu_hours * 3600 * params.tokens_per_gpu_second
    day = 0
    while day * 86_400 + 3_600 < seconds:
        arrival = day * 86_400 + 3_600
        jobs.append(
            SimJob(
                f"products/daily-{day}",
                "products",
                priority=10,
                tokens=tokens,
                arrival=arrival,
                deadline=arrival + 86_400,
            )
        )
        day += 1
    return jobs


def build_demand(scenario: Scenario) -> OnlineDemand:
    trace = load_rate_trace(scenario.trace, scenario.model)
    burst = (
        load_burst_profile(scenario.burst_trace, scenario.burst_window_seconds)
        if scenario.burst_trace
        else None
    )
    return online_demand(
        trace,
        burst,
        per_gpu_rps=scenario.per_gpu_rps,
        target_peak_gpus=scenario.online_peak_fraction * scenario.params.capacity_gpus,
        days=scenario.days,
        seed=scenario.seed,
        online_scale_down_seconds=scenario.online_scale_down_seconds,
        start_seconds=scenario.start_day * 86_400,
    )


def make_policy(name: str, scenario: Scenario, demand: list[int]) -> Policy:
    params = scenario.params
    if name == "troughfill":
        return TroughfillPolicy(
            params,
            pool_policy(
                params,
                scale_up_delay=scenario.scale_up_delay_seconds,
                min_useful=scenario.min_useful_seconds,
                weights={"products": 3, "research": 1},
                headroom_lend=scenario.headroom_lend_gpus,
            ),
            interval_seconds=scenario.reconcile_seconds,
            use_forecast=scenario.use_forecast,
        )
    if name == "keda-hpa":
        return KedaPolicy(params)
    if name == "static":
        # sized in hindsight for online's 99.9th percentile (its rare spikes then preempt it)
        peak = int(np.quantile(demand, 0.999))
        return StaticPolicy(max(0, params.capacity_gpus - peak - params.headroom_gpus))
    raise ValueError(f"unknown policy {name!r}")


def run_policy(name: str, scenario: Scenario, demand: list[int]) -> PolicyRun:
    jobs = make_jobs(scenario, len(demand))
    started = time.perf_counter()
    cluster = Cluster(scenario.params, demand, jobs, make_policy(name, scenario, demand))
    totals = cluster.run()
    return PolicyRun(name, totals, jobs, cluster.samples.means, time.perf_counter() - started)


def run_oracle(scenario: Scenario, demand: list[int]) -> PolicyRun:
    """Every second exactly capacity - online - headroom GPUs produce; jobs served by priority."""
    params = scenario.params
    jobs = make_jobs(scenario, len(demand))
    started = time.perf_counter()
    totals = Totals(seconds=len(demand))
    rate = params.tokens_per_gpu_second
    samples = WindowMeans()
    order = sorted(jobs, key=queue_order)
    for now, wanted in enumerate(demand):
        online = min(wanted, params.capacity_gpus)
        batch = max(0, params.capacity_gpus - online - params.headroom_gpus)
        totals.online_demand_gpu_seconds += online
        totals.online_over_capacity_gpu_seconds += wanted - online
        totals.online_served_gpu_seconds += online
        totals.batch_held_gpu_seconds += batch
        totals.batch_productive_gpu_seconds += batch
        totals.batch_in_trough_gpu_seconds += batch
        tokens = batch * rate
        for job in order:
            if tokens <= 0:
                break
            if not job.active(now):
                continue
            used = min(tokens, job.remaining_tokens)
            job.done_tokens += used
            tokens -= used
            totals.tokens_generated += used
            if job.remaining_tokens <= 0:
                job.finished_at = now
        samples.add(batch)
    return PolicyRun("oracle", totals, jobs, samples.means, time.perf_counter() - started)


def trough_gpus(demand: list[int] | np.ndarray, params: ClusterParams) -> np.ndarray:
    """capacity - online - headroom each second (online beyond capacity counts as capacity)."""
    online = np.minimum(np.asarray(demand, dtype=np.int64), params.capacity_gpus)
    trough: np.ndarray = np.maximum(0, params.capacity_gpus - online - params.headroom_gpus)
    return trough


def cold_start_bound(demand: list[int] | np.ndarray, params: ClusterParams) -> float:
    """The most productive GPU-time inside the trough that any policy can have when a worker
    produces only `cold_start_seconds` after it starts and holds nothing outside the trough
    (starts only into it, stops when it closes): per level k of the trough, each maximal stretch
    of L seconds with at least k GPUs free yields L - cold start.

    Why nothing does better: at a second t, take the i-th oldest of the workers then alive, of
    age a. The i oldest were all alive since t - a, so the trough held at least i GPUs since
    then; if that worker produces (a >= cold start), level i's stretch around t is at least a
    cold start old, and t counts in level i. So the workers producing at t are at most the
    levels counting t. A policy that keeps workers outside the trough (in online's headroom, or
    on GPUs online wants) is not bounded by it: that is what the headroom and interference
    figures measure."""
    trough = trough_gpus(demand, params)
    cold = params.cold_start_seconds
    total = 0
    for level in range(1, int(trough.max(initial=0)) + 1):
        above = np.concatenate(([False], trough >= level, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(above))
        lengths = edges[1::2] - edges[0::2]
        total += int(np.sum(np.maximum(0, lengths - cold)))
    return float(total)


def ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def summarise(
    run: PolicyRun, oracle: PolicyRun, scenario: Scenario, bound: float | None = None
) -> dict[str, Any]:
    params = scenario.params
    t = run.totals
    hours = 1 / 3600
    useful_tokens = t.tokens_generated - t.wasted_tokens
    deadline_jobs = [j for j in run.jobs if j.deadline is not None and j.deadline <= t.seconds]
    met = [j for j in deadline_jobs if j.finished_at is not None and j.finished_at <= (j.deadline or 0)]
    utilisation = (t.online_served_gpu_seconds + t.batch_productive_gpu_seconds) / (
        params.capacity_gpus * t.seconds
    )
    pool_tokens_per_s = params.tokens_per_gpu_second * params.capacity_gpus
    return {
        # productive batch GPU-time inside the trough (capacity - online - headroom) / the oracle's
        "trough_capture": ratio(t.batch_in_trough_gpu_seconds, oracle.totals.batch_in_trough_gpu_seconds),
        # the same without the trough bound: GPU-time taken out of online's headroom counts too
        "productive_vs_oracle": ratio(
            t.batch_productive_gpu_seconds, oracle.totals.batch_productive_gpu_seconds
        ),
        # the same against the most a policy paying the cold start and staying in the trough can have
        "trough_capture_vs_cold_start_bound": ratio(t.batch_in_trough_gpu_seconds, bound) if bound else None,
        "online_interference": round(t.online_displaced_gpu_seconds / t.online_demand_gpu_seconds, 6)
        if t.online_demand_gpu_seconds
        else 0.0,
        "batch_productive_gpu_hours": round(t.batch_productive_gpu_seconds * hours, 1),
        "batch_held_gpu_hours": round(t.batch_held_gpu_seconds * hours, 1),
        "online_displaced_gpu_hours": round(t.online_displaced_gpu_seconds * hours, 3),
        "headroom_intrusion_gpu_hours": round(t.headroom_intrusion_gpu_seconds * hours, 2),
        "preemptions": t.preemptions,
        "planned_yields": t.yields,
        "drains": t.drains,
        "worker_starts": t.starts,
        "useful_tokens": round(useful_tokens),
        "wasted_tokens": round(t.wasted_tokens),
        "deadline_jobs": len(deadline_jobs),
        "deadline_jobs_met": len(met),
        "utilisation": round(utilisation, 4),
        # the seeds' formula: $/1M = GPU $/h x GPUs x 1e6 / (tokens/s x utilisation x 3600)
        "pool_usd_per_million_tokens": round(
            params.gpu_hourly_cost_usd
            * params.capacity_gpus
            * 1e6
            / (pool_tokens_per_s * utilisation * 3600),
            4,
        )
        if utilisation
        else None,
        "batch_usd_per_million_tokens": round(
            params.gpu_hourly_cost_usd * t.batch_held_gpu_seconds * hours / (useful_tokens / 1e6), 4
        )
        if useful_tokens > 0
        else None,
        "sim_wall_seconds": round(run.wall_seconds, 1),
    }


def run(scenario: Scenario) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report (JSON-ready) and the series for the plot."""
    demand_model = build_demand(scenario)
    demand = demand_model.gpus.tolist()
    oracle = run_oracle(scenario, demand)
    runs = [run_policy(name, scenario, demand) for name in scenario.policies]
    params = scenario.params
    bound = cold_start_bound(demand, params)
    online_only = float(np.mean(np.minimum(demand_model.gpus, params.capacity_gpus))) / params.capacity_gpus
    report: dict[str, Any] = {
        "scenario": {
            # file names only: a report should not carry the paths of the machine that made it
            **{
                k: (v.name if isinstance(v, Path) else v)
                for k, v in asdict(replace(scenario, params=params)).items()
            },
            "per_gpu_rps": round(demand_model.per_gpu_rps, 2),
            "trace_gaps_interpolated": demand_model.gaps,
            "simulated_hours": round(len(demand) / 3600, 1),
            "online_peak_gpus": int(max(demand)),
            "online_mean_gpus": round(float(np.mean(demand)), 2),
            "online_only_utilisation": round(online_only, 4),
            # the oracle pays no cold start; this is the most a policy that pays it and keeps
            # out of online's way can capture (see cold_start_bound)
            "cold_start_bound_trough_capture": ratio(bound, oracle.totals.batch_in_trough_gpu_seconds),
            "online_only_pool_usd_per_million_tokens": round(
                params.gpu_hourly_cost_usd * 1e6 / (params.tokens_per_gpu_second * online_only * 3600), 4
            ),
        },
        "policies": {"oracle": summarise(oracle, oracle, scenario)}
        | {r.name: summarise(r, oracle, scenario, bound) for r in runs},
    }
    series = {
        "online_gpus": resample_mean(demand, SAMPLE_SECONDS).tolist(),
        "capacity": params.capacity_gpus,
        "batch_gpus": {"oracle": oracle.samples} | {r.name: r.samples for r in runs},
        "sample_seconds": SAMPLE_SECONDS,
    }
    return report, series


def plot(series: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - only the plot needs it, and it must pick a headless backend first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    hours = np.arange(len(series["online_gpus"])) * series["sample_seconds"] / 3600
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    top.fill_between(hours, series["online_gpus"], color="tab:blue", alpha=0.4, label="online GPUs (demand)")
    top.axhline(series["capacity"], color="black", linewidth=0.8, label="pool capacity")
    top.set_ylabel("GPUs")
    top.legend(loc="upper right")
    top.set_title(title)
    styles = {
        "oracle": ("black", 1.6),
        "troughfill": ("tab:green", 1.0),
        "keda-hpa": ("tab:red", 0.8),
        "static": ("tab:gray", 0.8),
    }
    for name, values in series["batch_gpus"].items():
        color, width = styles.get(name, ("tab:purple", 0.8))
        bottom.plot(hours[: len(values)], values, label=name, color=color, linewidth=width)
    bottom.set_ylabel("batch GPUs held (10-min mean)")
    bottom.set_xlabel("hours")
    bottom.legend(loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
