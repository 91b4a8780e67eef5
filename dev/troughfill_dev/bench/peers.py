"""troughfill and a real KEDA side by side: the same trigger, worker, batch and online serving.

    python -m troughfill_dev.bench.peers [--triggers 10] [--minutes 30] [--start-hour 18]
                                         [--speed 12] [--gpus 4] [--load-seconds 8]

Two arms, one after the other, each on a fresh local cluster (one node of `--gpus` GPUs), Redis
and Prometheus (scraping, every second, the online gauge this script serves):

- **troughfill**: `troughfill operator` scales the job's workers into the pool's trough, reading
  online demand as `max(online_gpus)`;
- **keda**: KEDA v2 (operator and metrics API server, built from its Go module; see
  localcluster.keda) scales a Deployment of the same worker with a ScaledObject as KEDA's
  Prometheus scaler documents it, with its defaults (pollingInterval 30 s, cooldownPeriod
  300 s, the HPA's default behaviour): query `<gpus> - max(online_gpus)`, the idle GPUs, at a
  threshold of 1 (one replica per idle GPU). The Deployment's pod template is the worker pod
  troughfill's operator itself rendered for the job (same image, command, batch, ledger, Secret,
  PriorityClass); the operator admits the job, makes its Secret and collects results, but its
  pool is then pointed at no node, so it scales nothing.

In both arms online serving is both the gauge and pods: a Deployment `online` of one-GPU pods at a
PriorityClass above batch, so the scheduler preempts batch pods online needs (what a cluster
does whatever scales batch). The worker's engine is the stand-in (troughfill_dev.standin),
listening after `--load-seconds`, streaming a token every 0.05 s to 8 answers at a time, so a
stopped worker has partial output to save or lose.

Measured per arm:
- **triggers** (`--triggers` n, each: online at 0 until batch holds every GPU, Ready, and has
  work in flight for 5 s; then online at every GPU): seconds from the online rise to the batch
  GPUs free (every online pod Running), and to the scaler's own verdict that batch must go
  (troughfill's pool status `troughGPUs` 0; KEDA's Deployment at 0 replicas; waited for up to
  20 s past the GPUs being free: the scheduler's preemption frees them whatever the scaler
  says), and over the n triggers the tokens wasted and the requests resumed from saved
  partial output (the job's `status.tokens.wasted`, `status.requestCounts.resumed`);
- **replay** (`--minutes` of the simulator's standard trace from `--start-hour`, `--speed` times
  faster, as bench.replay plays it): batch GPU-seconds held and Ready, and online GPU-seconds
  displaced (online pods wanted but not Running, summed every 0.25 s).
Prints one JSON object, with keda/troughfill ratios. Needs scripts/setup.sh, setup_k8s.sh and
setup_keda.sh sourced.
"""

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from troughfill import constants
from troughfill.kube.podstate import is_ready
from troughfill.sim.scenario import Scenario
from troughfill_dev.bench.onlinereplay import (
    NAMESPACE,
    StandinJob,
    StandinStack,
    bound_pods,
    deployment,
    play,
)
from troughfill_dev.bench.replay import segment
from troughfill_dev.localcluster.keda import start_keda, wait_scaled_object_ready
from troughfill_dev.localcluster.services import wait_until

JOB, POOL, TEMPLATE, KEDA_TARGET = "peers", "peers", "standin", "batch"
SCALE_UP_DELAY_SECONDS = 5
DRAIN_GRACE_SECONDS = 5
IN_FLIGHT_SECONDS = 5
TOKENS_PER_REQUEST = 256
"""Long enough that the worker streams and checkpoints them (it streams from 256 tokens)."""
TOKEN_SECONDS = 0.05
ENGINE_BATCH = 8
"""The stand-in's batch limit: 8 answers at a time, 12.8 s each."""
REQUESTS = 40_000
"""More than the workers get through."""
FILL_TIMEOUT = 240.0
"""KEDA's defaults: a 30 s poll to activate, the HPA's 15 s sync to scale; then cold starts."""
FREE_TIMEOUT = 120.0
VERDICT_WAIT = 20.0
"""How long past the GPUs being free the scaler's own verdict is still waited for."""
ARMS = ("troughfill", "keda")


class Arm:
    """One scaler's run: its own cluster, Redis, Prometheus, operator and job."""

    def __init__(self, kind: str, workdir: Path, gpus: int, load_seconds: float) -> None:
        self.kind = kind
        self.workdir = workdir
        self.gpus = gpus
        spec = StandinJob(
            job=JOB, pool=POOL, template=TEMPLATE, requests=REQUESTS, max_tokens=TOKENS_PER_REQUEST,
            engine_args=["--token-seconds", str(TOKEN_SECONDS), "--max-running", str(ENGINE_BATCH)],
            load_seconds=load_seconds, scale_up_delay=SCALE_UP_DELAY_SECONDS, drain_grace=DRAIN_GRACE_SECONDS,
        )  # fmt: skip
        self.stack = StandinStack(workdir, gpus, spec, online_gpus=0)

    # --- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        self.stack.start()
        self.core, self.apps, self.objects = self.stack.core, self.stack.apps, self.stack.objects
        if self.kind == "keda":
            self._hand_over_to_keda()

    def _hand_over_to_keda(self) -> None:
        """The operator renders the job's first worker (and makes the job's Secret); its pod
        becomes the Deployment KEDA scales, and the pool is pointed at no node."""
        selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"

        def rendered() -> Any:
            pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
            return pods[0] if pods else None

        pod = wait_until(rendered, 120, "the operator's first worker pod", 0.2)
        cluster = self.stack.cluster
        raw = cluster.api.sanitize_for_serialization(pod)
        spec = {k: v for k, v in raw["spec"].items() if k not in ("nodeName", "preemptionPolicy", "priority")}
        spec["restartPolicy"] = "Always"  # a Deployment's pods
        self.objects.patch_cluster_custom_object(
            constants.API_GROUP, constants.API_VERSION, "batchpools", POOL,
            {"spec": {"gpus": {"nodeSelector": {"troughfill.dev/no-such-node": "true"}}}},
        )  # fmt: skip
        wait_until(lambda: rendered() is None, 120, "the operator's worker gone", 0.2)
        self.stack.add(start_keda(cluster.plane, self.workdir / "keda"))
        self.apps.create_namespaced_deployment(NAMESPACE, deployment(KEDA_TARGET, 0, spec))
        scaled = {
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": KEDA_TARGET},
            "spec": {
                "scaleTargetRef": {"name": KEDA_TARGET},
                "minReplicaCount": 0, "maxReplicaCount": self.gpus,
                "triggers": [{"type": "prometheus", "metadata": {
                    "serverAddress": self.stack.prometheus.url,
                    "query": f"{self.gpus} - max(online_gpus)", "threshold": "1",
                }}],
            },
        }  # fmt: skip
        self.objects.create_namespaced_custom_object(
            "keda.sh", "v1alpha1", NAMESPACE, "scaledobjects", scaled
        )
        wait_scaled_object_ready(cluster.plane, NAMESPACE, KEDA_TARGET)

    def stop(self) -> None:
        self.stack.stop()

    # --- observation ------------------------------------------------------------------------

    def work_lost_and_saved(self) -> tuple[int, int]:
        """(tokens wasted, requests resumed from saved partial output) so far, from the job's status."""
        status = self.stack.job_status()
        wasted = int((status.get("tokens") or {}).get("wasted", 0))
        return wasted, int((status.get("requestCounts") or {}).get("resumed", 0))

    def batch_pods(self) -> list[Any]:
        """Batch pods holding GPUs on the node (bound, not finished)."""
        selector = (
            f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
            if self.kind == "troughfill"
            else f"app={KEDA_TARGET}"
        )
        return bound_pods(self.core, selector)

    def online_running(self) -> int:
        return self.stack.online_running()

    def scaler_stopped(self) -> bool:
        """The scaler's own verdict that batch must go: troughfill's pool leaves it no GPU
        (status.troughGPUs 0, written after the cycle that decided it); KEDA's Deployment is
        at 0 replicas. Not "its pods are being deleted": the scheduler's preemption does that too."""
        if self.kind == "keda":
            return int(self.apps.read_namespaced_deployment(KEDA_TARGET, NAMESPACE).spec.replicas or 0) == 0
        pool = self.objects.get_cluster_custom_object(
            constants.API_GROUP, constants.API_VERSION, "batchpools", POOL
        )
        return int((pool.get("status") or {}).get("troughGPUs", -1)) == 0

    def set_online(self, gpus: int) -> None:
        self.stack.online.set(gpus)

    # --- the two measurements -----------------------------------------------------------------

    def triggers(self, count: int) -> dict[str, Any]:
        free, scaled_down, fills = [], [], []
        wasted_before, resumed_before = self.work_lost_and_saved()
        for _ in range(count):
            self.set_online(0)
            opened = time.monotonic()
            wait_until(
                lambda: sum(1 for p in self.batch_pods() if is_ready(p) and not p.metadata.deletion_timestamp)
                == self.gpus,
                FILL_TIMEOUT, f"{self.kind}: batch on every GPU", 0.25,
            )  # fmt: skip
            fills.append(time.monotonic() - opened)
            time.sleep(IN_FLIGHT_SECONDS)
            risen = time.monotonic()
            self.set_online(self.gpus)
            freed, stopped = _first(
                lambda: self.online_running() == self.gpus, self.scaler_stopped, FREE_TIMEOUT, VERDICT_WAIT
            )
            free.append(freed - risen)
            scaled_down.append(stopped - risen if stopped is not None else None)
        # The last rise's partial output is resumed once batch comes back: let it.
        self.set_online(0)
        time.sleep(IN_FLIGHT_SECONDS)
        wait_until(lambda: any(is_ready(p) for p in self.batch_pods()), FILL_TIMEOUT, "batch back", 0.25)
        time.sleep(IN_FLIGHT_SECONDS)
        wasted, resumed = self.work_lost_and_saved()
        return {
            "n": count,
            "online_rise_to_batch_gpus_free_s": _summary(free),
            "online_rise_to_scaler_stopped_batch_s": _summary([s for s in scaled_down if s is not None]),
            "scaler_had_not_stopped_batch_when_gpus_were_free": sum(
                1 for s, f in zip(scaled_down, free, strict=True) if s is None or s > f
            ),
            "scaler_had_not_stopped_batch_after_gpus_free": {
                "s": VERDICT_WAIT,
                "count": sum(1 for s in scaled_down if s is None),
            },
            "fill_s": _summary(fills),
            "wasted_tokens": wasted - wasted_before,
            "requests_resumed_from_saved_partials": resumed - resumed_before,
        }

    def replay(self, demand: list[int]) -> dict[str, Any]:
        tally = play(demand, self.stack.online, self.batch_pods, self.online_running)
        return {
            "batch_held_gpu_seconds": round(tally.held, 1),
            "batch_ready_gpu_seconds": round(tally.ready, 1),
            "online_displaced_gpu_seconds": round(tally.displaced, 1),
            "batch_pods_preempted": len(tally.preempted),
        }


def _first(
    primary: Callable[[], bool], secondary: Callable[[], bool], timeout: float, after: float
) -> tuple[float, float | None]:
    """When `primary` first held (monotonic seconds; TimeoutError if not within `timeout`), and
    when `secondary` did, polling it until `after` seconds past `primary` (None if it had not)."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    second: float | None = None
    while True:
        now = time.monotonic()
        if second is None and secondary():
            second = now
        if first is None and primary():
            first = now
        if first is not None and (second is not None or now > first + after):
            return first, second
        if first is None and now > deadline:
            raise TimeoutError(f"batch GPUs not free within {timeout:.0f}s of the online rise")
        time.sleep(0.05)


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "max": round(max(values), 2),
    }


def ratio(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 4) if part is not None and whole else None


def run(workdir: Path, *, triggers: int, minutes: float, start_hour: float, speed: int, gpus: int,
        load_seconds: float) -> dict[str, Any]:  # fmt: skip
    demand = segment(gpus, start_hour, minutes / 60, speed)
    arms: dict[str, dict[str, Any]] = {}
    for kind in ARMS:
        arm = Arm(kind, workdir / kind, gpus, load_seconds)
        try:
            arm.start()
            # The replay first: the triggers leave online holding every GPU.
            arms[kind] = {"replay": arm.replay(demand), "triggers": arm.triggers(triggers)}
        finally:
            arm.stop()

    def median(kind: str, key: str) -> float | None:
        value = arms[kind]["triggers"][key]["median"]
        return float(value) if value is not None else None

    keda, ours = arms["keda"], arms["troughfill"]
    return {
        "setup": {
            "gpus": gpus,
            "load_seconds": load_seconds,
            "token_seconds": TOKEN_SECONDS,
            "keda": {
                "pollingInterval": 30,
                "cooldownPeriod": 300,
                "hpa_behavior": "default",
                "query": f"{gpus} - max(online_gpus)",
                "threshold": 1,
            },
            "troughfill": {"reconcile_s": 1, "scaleUpDelay_s": SCALE_UP_DELAY_SECONDS, "headroomGPUs": 0},
            "segment": {
                "trace": Scenario().trace.name,
                "start_hour": start_hour,
                "minutes": minutes,
                "speed": speed,
                "wall_seconds": len(demand),
                "online_min": min(demand),
                "online_max": max(demand),
            },
        },
        "troughfill": ours,
        "keda": keda,
        "keda_over_troughfill": {
            "online_rise_to_batch_gpus_free_median": ratio(
                median("keda", "online_rise_to_batch_gpus_free_s"),
                median("troughfill", "online_rise_to_batch_gpus_free_s"),
            ),
            "online_rise_to_scaler_stopped_batch_median": ratio(
                median("keda", "online_rise_to_scaler_stopped_batch_s"),
                median("troughfill", "online_rise_to_scaler_stopped_batch_s"),
            ),
            **{
                key: ratio(keda["replay"][key], ours["replay"][key])
                for key in (
                    "batch_held_gpu_seconds",
                    "batch_ready_gpu_seconds",
                    "online_displaced_gpu_seconds",
                )
            },
            "wasted_tokens": ratio(keda["triggers"]["wasted_tokens"], ours["triggers"]["wasted_tokens"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--triggers", type=int, default=10, help="online rises measured per scaler")
    parser.add_argument("--minutes", type=float, default=30.0, help="trace minutes replayed")
    parser.add_argument("--start-hour", type=float, default=18.0, help="trace hour the segment starts at")
    parser.add_argument("--speed", type=int, default=12, help="trace seconds per wall second")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs of the node (and the pool)")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="the stand-in engine's load time")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="troughfill-peers-"))
    try:
        result = run(
            scratch, triggers=args.triggers, minutes=args.minutes, start_hour=args.start_hour,
            speed=args.speed, gpus=args.gpus, load_seconds=args.load_seconds,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
