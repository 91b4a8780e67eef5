"""The same stretch of online demand, compressed, on the local cluster and in the simulator.

    python -m troughfill_dev.bench.replay [--hours 2] [--start-hour 18] [--speed 12] [--gpus 6]
                                          [--load-seconds 8] [--interval 1]

Online demand is the simulator's own (`sim.trace.online_demand`: the bundled ServeGen trace with
the Azure per-second bursts, seed 7, peak 85 % of the pool), a segment of `--hours` from `--start-hour`,
played `--speed` times faster: one wall second per `speed` trace seconds, the GPUs of the
trace second `start + speed·i` at wall second i.

- measured: Redis, Prometheus (scraping the online gauge this script serves and the operator,
  every second), the local control plane with one node of `--gpus` GPUs, `troughfill
  operator` reconciling every `--interval` s; a pool of that node (no headroom, a 5 s scale-up
  delay, no minimum useful time), a template of one GPU per worker whose engine is the
  stand-in (`troughfill_dev.standin`, listening after `--load-seconds`: the engine's load)
  and a job that outlasts the replay. Held and ready worker GPUs are sampled every 0.25 s; the
  operator's /metrics give its start, yield and drain decisions and the cold start and yield
  times it measured.
- simulated: the simulator's cluster on the same per-second demand, with the operator's planner
  (troughfill policy, no forecast: the operator has none either), the same pool settings, a
  one-second scrape and reconcile, and the cold start, yield and drain times just measured
  (calibration: the simulator's timings are the cluster's own).

Online serving is both what the pool's query reads (a gauge Prometheus scrapes) and pods: a
Deployment `online` of one-GPU pods at a higher PriorityClass, scaled to the demand each second,
so that, as in the simulator, online takes GPUs batch has not yet given back (kube-scheduler
preempts batch workers for them). Reported: batch GPU-seconds held and productive (ready), and
the stops for online (the operator's yields plus the scheduler's preemptions: workers whose pod
got the DisruptionTarget condition `PreemptionByScheduler`), each as simulated/measured.
Prints one JSON object. Needs scripts/setup.sh and setup_k8s.sh sourced.
"""

import argparse
import itertools
import json
import math
import shutil
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from troughfill import constants
from troughfill.sim.fleet import Cluster, ClusterParams, SimJob
from troughfill.sim.policies import TroughfillPolicy, pool_policy
from troughfill.sim.scenario import Scenario, ratio
from troughfill.sim.trace import load_burst_profile, load_rate_trace, online_demand
from troughfill_dev.bench.onlinereplay import NAMESPACE, StandinJob, StandinStack, bound_pods, play
from troughfill_dev.localcluster import free_port
from troughfill_dev.scrape import Scrape

JOB, POOL, TEMPLATE = "replay", "replay", "standin"
SCALE_UP_DELAY_SECONDS = 5
DRAIN_GRACE_SECONDS = 5
ONLINE_PEAK_FRACTION = 0.85
REQUESTS = 60_000
"""More than the workers get through in the replay (each stand-in answer takes 20 s)."""


def segment(gpus: int, start_hour: float, hours: float, speed: int) -> list[int]:
    """Online GPUs per wall second: the trace second start + speed·i at second i."""
    scenario = Scenario()  # the simulator's standard trace, bursts and seed
    trace = load_rate_trace(scenario.trace, scenario.model)
    bursts = (
        load_burst_profile(scenario.burst_trace, scenario.burst_window_seconds)
        if scenario.burst_trace
        else None
    )
    demand = online_demand(
        trace,
        bursts,
        per_gpu_rps=None,
        target_peak_gpus=ONLINE_PEAK_FRACTION * gpus,
        days=1,
        seed=scenario.seed,
    )
    start = int(start_hour * 3600)
    day = len(demand.gpus)
    return [int(demand.gpus[(start + k) % day]) for k in range(0, int(hours * 3600), speed)]


def simulate(
    demand: list[int], gpus: int, cold_start: float, yield_seconds: float, drain_seconds: float
) -> dict[str, Any]:
    params = ClusterParams(
        capacity_gpus=gpus,
        headroom_gpus=0,
        cold_start_seconds=max(0, round(cold_start)),
        yield_seconds=max(1, round(yield_seconds)),
        drain_seconds=max(1, round(drain_seconds)),
        scrape_interval_seconds=1,
    )
    policy = TroughfillPolicy(
        params,
        pool_policy(params, scale_up_delay=SCALE_UP_DELAY_SECONDS, min_useful=0, weights={NAMESPACE: 1}),
        interval_seconds=1,
        use_forecast=False,
    )
    cluster = Cluster(params, demand, [SimJob(f"{NAMESPACE}/{JOB}", NAMESPACE, 0, math.inf)], policy)
    totals = cluster.run()
    return {
        "batch_held_gpu_seconds": totals.batch_held_gpu_seconds,
        "batch_ready_gpu_seconds": totals.batch_productive_gpu_seconds,
        "starts": totals.starts,
        "yields": totals.yields,
        "preemptions": totals.preemptions,
        "drains": totals.drains,
        "stops_for_online": totals.yields + totals.preemptions,
        "timings": {
            "cold_start_s": params.cold_start_seconds,
            "yield_s": params.yield_seconds,
            "drain_s": params.drain_seconds,
        },
    }


class Replay:
    def __init__(self, workdir: Path, gpus: int, load_seconds: float, interval: float) -> None:
        self.metrics_port = free_port()
        spec = StandinJob(
            job=JOB, pool=POOL, template=TEMPLATE, requests=REQUESTS, max_tokens=16,
            engine_args=["--delay-seconds", "20"], load_seconds=load_seconds,
            scale_up_delay=SCALE_UP_DELAY_SECONDS, drain_grace=DRAIN_GRACE_SECONDS,
        )  # fmt: skip
        # Online holds every GPU until the replay starts: nothing starts before it does.
        self.stack = StandinStack(
            workdir, gpus, spec, online_gpus=gpus, interval=interval, metrics_port=self.metrics_port
        )

    def start(self) -> None:
        self.stack.start()

    def play(self, demand: list[int]) -> dict[str, Any]:
        """Publish the demand second by second; sample held and ready worker GPUs meanwhile."""
        stack = self.stack
        selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
        tally = play(demand, stack.online, lambda: bound_pods(stack.core, selector), stack.online_running)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read()
        return {
            "held": tally.held,
            "ready": tally.ready,
            "displaced": tally.displaced,
            "preempted": len(tally.preempted),
            "metrics": scraped.decode(),
        }

    def stop(self) -> None:
        self.stack.stop()


def operator_figures(scraped: str) -> dict[str, float | None]:
    value = Scrape(scraped).value

    def mean(name: str, **labels: str) -> float | None:
        count = value(f"{name}_count", **labels)
        return value(f"{name}_sum", **labels) / count if count else None

    return {
        "starts": value("troughfill_decisions_total", pool=POOL, action="start"),
        "yields": value("troughfill_decisions_total", pool=POOL, action="yield"),
        "drains": value("troughfill_decisions_total", pool=POOL, action="drain"),
        "cold_start_mean_s": mean("troughfill_worker_cold_start_seconds", template=TEMPLATE),
        "cold_starts_measured": value("troughfill_worker_cold_start_seconds_count", template=TEMPLATE),
        "yield_mean_s": mean("troughfill_yield_latency_seconds", pool=POOL, mode="yield"),
        "drain_mean_s": mean("troughfill_yield_latency_seconds", pool=POOL, mode="drain"),
    }


def run(workdir: Path, *, gpus: int, start_hour: float, hours: float, speed: int, load_seconds: float,
        interval: float) -> dict[str, Any]:  # fmt: skip
    demand = segment(gpus, start_hour, hours, speed)
    replay = Replay(workdir, gpus, load_seconds, interval)
    try:
        replay.start()
        played = replay.play(demand)
    finally:
        replay.stop()
    figures = operator_figures(played["metrics"])
    cold = figures["cold_start_mean_s"] if figures["cold_start_mean_s"] is not None else load_seconds
    yielded = figures["yield_mean_s"] if figures["yield_mean_s"] is not None else 2.0
    drained = figures["drain_mean_s"] if figures["drain_mean_s"] is not None else DRAIN_GRACE_SECONDS
    simulated = simulate(demand, gpus, cold, yielded, drained)
    measured = {
        "batch_held_gpu_seconds": round(played["held"], 1),
        "batch_ready_gpu_seconds": round(played["ready"], 1),
        "online_displaced_gpu_seconds": round(played["displaced"], 1),
        "starts": figures["starts"],
        "yields": figures["yields"],
        "drains": figures["drains"],
        "preemptions": played["preempted"],
        "stops_for_online": (figures["yields"] or 0) + played["preempted"],
        "timings": {
            k: (round(v, 2) if v is not None else None) for k, v in figures.items() if k.endswith("_s")
        },
        "cold_starts_measured": figures["cold_starts_measured"],
    }
    trough = [max(0, gpus - d) for d in demand]
    return {
        "segment": {
            "trace": Scenario().trace.name,
            "start_hour": start_hour,
            "hours": hours,
            "speed": speed,
            "wall_seconds": len(demand),
            "gpus": gpus,
            "online_min": min(demand),
            "online_max": max(demand),
            "trough_gpu_seconds": sum(trough),
            "trough_changes": sum(1 for a, b in itertools.pairwise(trough) if a != b),
        },
        "measured": measured,
        "simulated": simulated,
        "simulated_over_measured": {
            key: ratio(simulated[key], measured[key])
            for key in ("batch_held_gpu_seconds", "batch_ready_gpu_seconds", "stops_for_online", "starts")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=float, default=2.0, help="trace hours replayed")
    parser.add_argument("--start-hour", type=float, default=18.0, help="trace hour the segment starts at")
    parser.add_argument("--speed", type=int, default=12, help="trace seconds per wall second")
    parser.add_argument("--gpus", type=int, default=6, help="GPUs of the node (and the pool)")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="the stand-in engine's load time")
    parser.add_argument("--interval", type=float, default=1.0, help="operator reconcile interval, seconds")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="troughfill-replay-"))
    try:
        result = run(
            scratch, gpus=args.gpus, start_hour=args.start_hour, hours=args.hours, speed=args.speed,
            load_seconds=args.load_seconds, interval=args.interval,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
