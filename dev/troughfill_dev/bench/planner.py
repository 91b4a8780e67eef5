"""Planning cycle time at scale: 1,000 jobs over a 10,000-GPU pool.

    python -m troughfill_dev.bench.planner [--jobs 1000] [--gpus 10000] [--cycles 60]

Jobs spread over 50 namespaces (weights 1-5, quotas), 3 priority classes, 1-8 GPUs per worker,
a third with deadlines, with workers already holding most of the pool in an arbitrary
distribution. Two figures:
- cold: the first cycle, which reshuffles that arbitrary distribution (thousands of stops);
- steady: every later cycle, the previous plan carried out (stops leave, starts arrive ready)
  while online demand moves by up to +-3 % of the pool per cycle, as in operation.
Prints JSON: cycle times in milliseconds, with the planner memory carried between cycles.
"""

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

from troughfill.planner import (
    JobState,
    OnlineSignal,
    Plan,
    PlannerMemory,
    PoolPolicy,
    Quota,
    Snapshot,
    StopMode,
    WorkerState,
    plan,
)


def build_jobs(count: int, gpus: int, seed: int) -> tuple[JobState, ...]:
    rng = random.Random(seed)
    sizes = [1, 1, 1, 1, 2, 4, 8]
    jobs = []
    held_target = int(gpus * 0.85)
    per_job_gpus = held_target // count
    now = 1_000_000.0
    for index in range(count):
        namespace = f"team-{index % 50}"
        size = rng.choice(sizes)
        running = max(0, per_job_gpus // size + rng.randint(-2, 2))
        workers = tuple(
            WorkerState(
                name=f"j{index}-w{n}",
                started_at=now - rng.uniform(0, 7200),
                ready=rng.random() > 0.1,
                unsaved_tokens=rng.randint(0, 2000),
                stopping=StopMode.DRAIN if rng.random() < 0.02 else None,
            )
            for n in range(running)
        )
        jobs.append(
            JobState(
                key=f"{namespace}/job-{index}",
                namespace=namespace,
                priority=rng.choice([0, 0, 10, 20]),
                gpus_per_worker=size,
                min_workers=rng.choice([0, 0, 0, 1]),
                max_workers=rng.choice([None, None, 64]),
                remaining_requests=rng.randint(100, 1_000_000),
                remaining_tokens=rng.uniform(1e6, 1e10),
                worker_tokens_per_second=2_000.0 * size,
                deadline=now + rng.uniform(3600, 86_400) if rng.random() < 0.33 else None,
                cold_start_seconds=60.0,
                workers=workers,
            )
        )
    return tuple(jobs)


def carry_out(jobs: tuple[JobState, ...], result: Plan, now: float) -> tuple[JobState, ...]:
    """The cluster after the plan: stopped workers gone, started ones running."""
    gone = {stop.worker for stop in result.stops}
    updated = []
    for job in jobs:
        kept = tuple(w for w in job.workers if w.name not in gone)
        started = tuple(
            WorkerState(name=f"{job.key}-s{now:.0f}-{n}", started_at=now)
            for n in range(result.jobs[job.key].starts)
        )
        updated.append(replace(job, workers=kept + started))
    return tuple(updated)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    jobs = build_jobs(args.jobs, args.gpus, args.seed)
    pool = PoolPolicy(
        capacity_gpus=args.gpus,
        headroom_gpus=args.gpus // 100,
        scale_up_delay_seconds=30.0,
        quotas={f"team-{i}": Quota(max_gpus=args.gpus // 20, weight=1 + i % 5) for i in range(50)},
        default_quota=Quota(max_gpus=args.gpus // 50),
    )
    rng = random.Random(args.seed)
    memory = PlannerMemory()
    timings = []
    starts = stops = 0
    now = 1_000_000.0
    online = args.gpus * 0.1
    workers = sum(len(j.workers) for j in jobs)
    held = sum(len(j.workers) * j.gpus_per_worker for j in jobs)
    current = jobs
    for cycle in range(args.cycles + 1):
        online = min(args.gpus * 0.3, max(args.gpus * 0.02, online + args.gpus * rng.uniform(-0.03, 0.03)))
        at = now + 2 * cycle
        snapshot = Snapshot(
            now=at, pool=pool, online=OnlineSignal(gpus_in_use=online, observed_at=at), jobs=current
        )
        begun = time.perf_counter()
        result = plan(snapshot, memory)
        timings.append((time.perf_counter() - begun) * 1000)
        memory = result.memory
        starts += result.starts
        stops += len(result.stops)
        current = carry_out(current, result, at)
    cold, steady = timings[0], sorted(timings[1:])
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "pool_gpus": args.gpus,
                "workers_at_start": workers,
                "held_gpus_at_start": held,
                "cold_cycle_ms": round(cold, 2),
                "steady_cycles": args.cycles,
                "steady_cycle_ms_p50": round(statistics.median(steady), 2),
                "steady_cycle_ms_p99": round(steady[min(len(steady) - 1, int(0.99 * len(steady)))], 2),
                "steady_cycle_ms_max": round(steady[-1], 2),
                "goal_ms": 20,
                "starts_planned": starts,
                "stops_planned": stops,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
