"""The embedded demo: the whole system on this machine, on the example batch.

A local Kubernetes control plane (devenv.cluster) with one node of 4 GPUs (devenv.nodeagent:
pods run as local processes), Redis, Prometheus and the operator (`troughfill operator`, as
in production but as a local process). Online serving is synthetic: a /metrics endpoint whose
`troughfill_demo_online_gpus` follows the bundled ServeGen trace (the simulator's conversion of
requests/s to GPUs, sized so online's 99.9th percentile needs 85 % of the pool), compressed in
time; Prometheus scrapes it and the pool's `gpusInUseQuery` reads it. The example objects
(manifests/examples) are applied with kubectl, adapted to this machine: the pool takes the
node's GPUs, the template runs the real vLLM CPU engine on SmolLM2-135M-Instruct, the job reads
the example requests from a file:// URL.

The trace clock is paced so that the story does not depend on how fast this machine is
(`TraceClock`): the afternoon trough lasts until a share of the batch is done, the evening
(where the worker must yield) plays at `seconds_per_hour`, and the night trough lasts until
the job is done. Progress is printed as it goes, with why nothing is done yet while that is
so (the engine loading, requests in the engine, tokens it generated); the summary is JSON.
"""

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from troughfill import constants
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.kube.podstate import is_ready
from troughfill.ledger.contract import Heartbeat
from troughfill.ledger.keys import JobKeys
from troughfill.sim.scenario import DEFAULT_TRACE, bundled
from troughfill.sim.trace import load_rate_trace, online_demand
from troughfill_dev.localcluster import ManagedProcess, free_port, start_prometheus, start_redis
from troughfill_dev.localcluster.nodeagent import AGENT_LABEL
from troughfill_dev.localcluster.services import LOOPBACK, VLLM_ENV
from troughfill_dev.localcluster.stack import (
    LocalCluster,
    create_namespace,
    start_local_cluster,
    start_operator,
)
from troughfill_dev.scrape import Scrape

ONLINE_METRIC = "troughfill_demo_online_gpus"
NODE_GPUS = 4
WORKER_GPUS = 2
ONLINE_PEAK_FRACTION = 0.85
"""As in the simulator: online's 99.9th percentile needs this share of the pool."""


AFTERNOON_SHARE = 0.4
"""Of the batch, what the afternoon trough does before the evening squeezes the worker out."""
NIGHT_SPAN = 0.6
"""How much of the night trough the rest of the batch takes (the morning rise never comes)."""
MIN_NIGHT_HOURS = 3.0
"""A trough this long after the evening peak is the night's (shorter ones are blips)."""
DEMO_MAX_NUM_SEQS = "16"
"""The job's engine batch here: a CPU engine with 128 sequences (the example's, sized for a
GPU) takes minutes before its first result; 16 turns requests into results within seconds."""


@dataclass(frozen=True)
class DemoOptions:
    examples: Path
    workdir: Path
    vllm_python: str
    model: Path
    start_hour: float = 14.0
    seconds_per_hour: float = 6.0
    timeout_seconds: float = 3600.0
    """A cap on the whole job; what normally ends a stuck demo is `stall_seconds`."""
    stall_seconds: float = 300.0
    """How long a ready worker may go without a result or a generated token before the demo
    fails (a slow engine is slow, not stuck: only no progress at all counts)."""
    reconcile_seconds: float = 1.0


class DemoError(RuntimeError):
    """The demo could not finish; the message says what and why in one line."""


class StallClock:
    """Seconds of no progress while a worker is ready to make some.

    Progress is any finished request or generated token (the job's and the engine's counters).
    Time without a ready worker (the evening peak, an engine loading) is not a stall: the trace
    and the cold start decide those, and the overall cap bounds them."""

    def __init__(self) -> None:
        self.stalled = 0.0
        self._seen: tuple[int, ...] | None = None
        self._last: float | None = None

    def record(self, progress: tuple[int, ...], working: bool, now: float) -> float:
        """The stalled seconds after this reading."""
        if self._seen is None or progress != self._seen or not working:
            self.stalled = 0.0
        elif self._last is not None:
            self.stalled += now - self._last
        self._seen, self._last = progress, now
        return self.stalled


# --- the trace clock --------------------------------------------------------------------------


class TraceClock:
    """Demo time on the trace: troughs move with the batch's progress, the evening with the wall.

    - From `start` through the first trough the worker fits in (`fits[t]`), the clock moves
      with completed requests: it reaches the trough's end when AFTERNOON_SHARE of the batch is
      done. However fast this machine is, the afternoon's work gets done, and the evening's
      yield catches requests in flight.
    - Then `speed` trace seconds per wall second through the evening (the worker yields, the
      peak passes) until the next trough of at least MIN_NIGHT_HOURS.
    - That night trough moves with progress again and reaches NIGHT_SPAN of its length when the
      last request is done.
    """

    def __init__(self, fits: list[bool], start: float, speed: float) -> None:
        day = len(fits)
        self.start, self.speed = start, speed

        def fits_at(t: float) -> bool:
            return fits[int(t) % day]

        if not fits_at(start):
            raise DemoError(f"the trace leaves no room for the worker at hour {start / 3600:g}")
        t = start
        while fits_at(t) and t < start + day:
            t += 1
        self.afternoon_end = t
        night = MIN_NIGHT_HOURS * 3600
        while t < self.afternoon_end + day and not all(fits_at(t + k) for k in range(0, int(night), 60)):
            t += 60
        while not fits_at(t):  # the first second of that trough
            t += 1
        self.night_start = t
        length = 0
        while fits_at(t + length) and length < day:
            length += 1
        self.night_span = NIGHT_SPAN * length
        self.phase = "afternoon"
        self.done = self.total = 0
        self._evening_from = 0.0
        self._done_at_night = 0

    def record(self, done: int, total: int, now: float) -> None:
        """The batch's progress (requests completed or failed, of `total`), seen at `now`."""
        self.done, self.total = done, total
        if self.phase == "afternoon" and total and done >= AFTERNOON_SHARE * total:
            self.phase, self._evening_from = "evening", now
        if self.phase == "evening" and self.trace_seconds(now) >= self.night_start:
            self.phase, self._done_at_night = "night", done

    def trace_seconds(self, now: float) -> float:
        if self.phase == "afternoon":
            share = self.done / (AFTERNOON_SHARE * self.total) if self.total else 0.0
            return self.start + (self.afternoon_end - self.start) * min(share, 1.0)
        if self.phase == "evening":
            return min(self.night_start, self.afternoon_end + (now - self._evening_from) * self.speed)
        left = self.total - self._done_at_night
        share = (self.done - self._done_at_night) / left if left > 0 else 1.0
        return self.night_start + self.night_span * min(share, 1.0)


# --- synthetic online load --------------------------------------------------------------------


class OnlineLoad:
    """A /metrics endpoint whose online-GPU gauge follows the trace on the demo's TraceClock."""

    def __init__(self, start_hour: float, seconds_per_hour: float, capacity: int) -> None:
        trace = load_rate_trace(bundled(DEFAULT_TRACE), "language/m-small")
        demand = online_demand(
            trace,
            None,
            per_gpu_rps=None,
            target_peak_gpus=ONLINE_PEAK_FRACTION * capacity,
            days=1,
            seed=7,
        )
        self.gpus = demand.gpus
        self.clock = TraceClock(
            [int(g) <= capacity - WORKER_GPUS for g in self.gpus],
            start_hour * 3600,
            3600.0 / seconds_per_hour,
        )
        self.registry = CollectorRegistry()
        self.gauge = Gauge(ONLINE_METRIC, "GPUs held by online serving (synthetic)", registry=self.registry)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr=LOOPBACK, registry=self.registry)
        self.stopping = threading.Event()
        self.history: list[tuple[float, int]] = []
        """(monotonic time, GPUs) whenever the published value changed."""
        self.thread = threading.Thread(target=self._run, name="online-load", daemon=True)
        self.value = self._value_at(0.0)
        self.gauge.set(self.value)
        self.history.append((time.monotonic(), self.value))
        self.thread.start()

    def trace_seconds(self) -> float:
        return self.clock.trace_seconds(time.monotonic())

    def time_of_day(self) -> str:
        seconds = int(self.trace_seconds()) % 86_400
        return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"

    def _value_at(self, trace_seconds: float) -> int:
        return int(self.gpus[int(trace_seconds) % len(self.gpus)])

    def _run(self) -> None:
        while not self.stopping.wait(0.1):
            value = self._value_at(self.trace_seconds())
            if value != self.value:
                self.value = value
                self.gauge.set(value)
                self.history.append((time.monotonic(), value))

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()


# --- the run ------------------------------------------------------------------------------------


def _documents(directory: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and "kind" in document:
                found[document["kind"]] = document
    return found


def local_objects(options: DemoOptions, online_query: str) -> list[dict[str, Any]]:
    """The example pool, template and job, adapted to this machine (what an admin of this
    little cluster would write); the requests are the example's."""
    examples = _documents(options.examples)
    pool, template, job = (
        json.loads(json.dumps(examples[kind])) for kind in ("BatchPool", "ModelTemplate", "BatchInference")
    )
    pool["spec"]["gpus"] = {"nodeSelector": {AGENT_LABEL: "true"}}
    pool["spec"]["online"] = {
        "selector": pool["spec"]["online"]["selector"],
        "namespaces": pool["spec"]["online"]["namespaces"],
        "gpusInUseQuery": online_query,
    }
    pool["spec"].update(
        headroomGPUs=0,
        signal={"maxStaleness": "10s", "onStale": "Yield", "floorGPUs": 0},
        scaleUpDelay="10s",  # one trace hour: no restart for a blip
        minUsefulTime="0s",
        drainGracePeriod="10s",
    )
    spec = template["spec"]
    spec["model"]["uri"] = str(options.model)
    spec["gpusPerWorker"] = WORKER_GPUS
    spec["coldStartSeconds"] = 45
    spec["tokensPerSecond"] = 200
    spec["engine"] = {
        "command": [options.vllm_python, "-m", "vllm.entrypoints.openai.api_server"],
        "args": ["--enforce-eager", "--max-model-len", "2048"],
        "env": [{"name": k, "value": v} for k, v in VLLM_ENV.items()],
    }
    spec.pop("resources", None)  # the node agent's node is this machine; nothing to reserve
    requests = options.workdir / "input" / "requests.jsonl"
    requests.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(options.examples / "requests.jsonl", requests)
    job["spec"]["inputURL"] = requests.as_uri()
    job["spec"]["outputURL"] = (options.workdir / "results").as_uri() + "/"
    # Here input and output are files of this machine: the admin grants the job's namespace
    # this directory (and nothing else) instead of the example's bucket.
    namespace = job["metadata"]["namespace"]
    for quota in pool["spec"]["quotas"]:
        if quota["namespace"] == namespace:
            quota["storage"] = [{"prefix": options.workdir.resolve().as_uri() + "/"}]
    job["spec"]["maxWorkers"] = 1
    job["spec"]["engineArgs"] = [
        arg if arg["name"] != "max-num-seqs" else {**arg, "value": DEMO_MAX_NUM_SEQS}
        for arg in job["spec"].get("engineArgs", [])
    ]
    return [pool, template, job]


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.stack = contextlib.ExitStack()
        self.started = time.monotonic()
        self.operator: ManagedProcess | None = None
        self.online: OnlineLoad | None = None
        self.redis_url = ""

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def up(self) -> tuple[LocalCluster, str]:
        """Everything but the job: returns the cluster and the operator's metrics URL."""
        work = self.options.workdir
        redis = start_redis(work / "redis")
        self.stack.callback(redis.stop)
        self.redis_url = redis.url
        self.say(f"redis-server on {redis.url}")
        self.online = OnlineLoad(self.options.start_hour, self.options.seconds_per_hour, NODE_GPUS)
        self.stack.callback(self.online.stop)
        metrics_port = free_port()
        prometheus = start_prometheus(
            work / "prometheus", [f"{LOOPBACK}:{self.online.port}", f"{LOOPBACK}:{metrics_port}"]
        )
        self.stack.callback(prometheus.stop)
        self.say(f"prometheus on {prometheus.url}, scraping the online load and the operator every 1s")
        cluster = start_local_cluster(work / "cluster", nodes=1, gpus=NODE_GPUS)
        self.stack.callback(cluster.stop)
        self.say(
            f"control plane up in {cluster.plane.started_seconds:.1f}s; 1 node with {NODE_GPUS} GPUs Ready; "
            "CRDs and PriorityClasses applied"
        )
        self.operator = start_operator(
            work / "operator",
            cluster,
            redis_url=redis.url,
            prometheus_url=prometheus.url,
            interval=self.options.reconcile_seconds,
            metrics_port=metrics_port,
        )
        self.stack.callback(self.operator.stop, 30)
        self.say("operator running (Kopf, standalone); its /metrics is scraped too")
        return cluster, f"http://{LOOPBACK}:{metrics_port}/metrics"

    def run(self) -> dict[str, Any]:
        cluster, metrics_url = self.up()
        api = cluster.api
        assert self.online is not None
        assert self.operator is not None
        pool, template, job = local_objects(self.options, f"max({ONLINE_METRIC})")
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        create_namespace(api, namespace)
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([pool, template, job]))
        self.say(
            f"applied BatchPool/{pool['metadata']['name']}, ModelTemplate/{template['metadata']['name']}, "
            f"BatchInference {namespace}/{name} ({_lines(self.options.examples / 'requests.jsonl')} requests)"
        )
        clock = self.online.clock
        self.say(
            f"trace clock: the afternoon trough lasts until {AFTERNOON_SHARE:.0%} of the batch is done "
            f"(then online needs 3 of {NODE_GPUS} GPUs, at {_hhmm(clock.afternoon_end)}); the evening plays "
            f"at {self.options.seconds_per_hour:g}s per hour; the night trough ({_hhmm(clock.night_start)}) "
            "lasts until the job is done"
        )
        watcher = Watcher(
            api, namespace, name, pool["metadata"]["name"], self.online, redis_url=self.redis_url
        )
        deadline = time.monotonic() + self.options.timeout_seconds
        stall = StallClock()
        last: tuple[object, ...] = ()
        printed = 0.0
        while True:
            self.operator.check_alive()
            state = watcher.poll()
            clock.record(state.completed + state.failed, state.total, time.monotonic())
            # A line when the situation changes (not every request or token), and every 5 s.
            news = (clock.phase, self.online.value, *state.situation())
            if news != last or time.monotonic() - printed >= 5:
                self.say(state.line(self.online))
                last, printed = news, time.monotonic()
            if state.phase in {"completed", "failed", "expired", "cancelled"}:
                break
            stalled = stall.record(state.progress(), state.ready_workers > 0, time.monotonic())
            if stalled > self.options.stall_seconds:
                raise DemoError(
                    f"no progress for {stalled:.0f}s with a worker ready: "
                    f"{state.completed}/{state.total} done, {state.why()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the job did not finish in {self.options.timeout_seconds:.0f}s: "
                    f"{state.completed}/{state.total} done, {state.why()}"
                )
            time.sleep(1.0)
        scraped = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        return summarise(watcher, scraped, job, self.options, time.monotonic() - self.started)

    def close(self) -> None:
        self.stack.close()


def _lines(path: Path) -> int:
    with path.open() as stream:
        return sum(1 for line in stream if line.strip())


def _hhmm(trace_seconds: float) -> str:
    seconds = int(trace_seconds) % 86_400
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@dataclass
class EngineView:
    """What the worker's engine says it is doing (its /metrics), found through the worker's heartbeat."""

    running: int
    waiting: int
    generated: int


@dataclass
class State:
    phase: str | None
    completed: int
    failed: int
    total: int
    ready_workers: int
    worker_pods: int
    stopping_pods: int
    worker_age: float
    online_gpus: int
    trough_gpus: int
    batch_gpus: int
    tokens: int
    engine: EngineView | None

    def why(self) -> str:
        """Why nothing is coming out right now, or what is going on."""
        if not self.worker_pods:
            return "no worker (waiting for room)"
        if self.stopping_pods == self.worker_pods:
            return "worker stopping (its GPUs are wanted, or the job is done)"
        if self.engine is None:
            return f"engine loading ({self.worker_age:.0f}s)"
        engine = self.engine
        return (
            f"engine: {engine.running} running, {engine.waiting} waiting, {engine.generated} tokens generated"
        )

    def progress(self) -> tuple[int, ...]:
        """Counters that grow while the job moves at all."""
        generated = self.engine.generated if self.engine else 0
        return (self.completed, self.failed, self.tokens, generated)

    def situation(self) -> tuple[object, ...]:
        """What a reader would call a change: not each request or token."""
        serving = "serving" if self.engine else "loading" if self.worker_pods else "idle"
        return (
            self.phase,
            self.trough_gpus,
            self.batch_gpus,
            self.worker_pods,
            self.ready_workers,
            self.stopping_pods,
            serving,
        )

    def line(self, online: OnlineLoad) -> str:
        workers = f"{self.ready_workers}/{self.worker_pods} worker ready" if self.worker_pods else "no worker"
        return (
            f"trace {online.time_of_day()} ({online.clock.phase:<9})  online {online.value} GPU  "
            f"trough {self.trough_gpus}  batch {self.batch_gpus}  {workers}  "
            f"done {self.completed}/{self.total}  {self.tokens} tokens  [{self.phase}]  {self.why()}"
        )


class Watcher:
    """Reads the job, the pool, the worker pods and their engines; remembers what the summary needs."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        pool: str,
        online: OnlineLoad,
        *,
        redis_url: str,
    ) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace, self.name, self.pool, self.online = namespace, name, pool, online
        self.redis = redis.Redis.from_url(redis_url)
        self.job: dict[str, Any] = {}
        self.pods_seen: set[str] = set()
        self.yields: list[float] = []
        """Seconds from the online gauge leaving no room for the running worker to its pod being gone."""
        self._squeezed_at: float | None = None
        self._had_worker = False

    def poll(self) -> State:
        group, version = constants.API_GROUP, constants.API_VERSION
        self.job = self.custom.get_namespaced_custom_object(
            group, version, self.namespace, BatchInference.crd.plural, self.name
        )
        pool = self.custom.get_cluster_custom_object(group, version, BatchPool.crd.plural, self.pool)
        selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        self.pods_seen |= {p.metadata.name for p in pods}
        ready = [p for p in pods if is_ready(p)]
        status, pool_status = self.job.get("status", {}), pool.get("status", {})
        counts = status.get("requestCounts", {})
        self._time_yields(bool(pods))
        oldest = min((p.metadata.creation_timestamp for p in pods), default=None)
        return State(
            phase=status.get("phase"),
            completed=int(counts.get("completed", 0)),
            failed=int(counts.get("failed", 0)),
            total=int(counts.get("total", 0)),
            ready_workers=len(ready),
            worker_pods=len(pods),
            stopping_pods=sum(1 for p in pods if p.metadata.deletion_timestamp),
            worker_age=(dt.datetime.now(dt.UTC) - oldest).total_seconds() if oldest else 0.0,
            online_gpus=int(pool_status.get("onlineGPUs", 0)),
            trough_gpus=int(pool_status.get("troughGPUs", 0)),
            batch_gpus=int(pool_status.get("batchGPUs", 0)),
            tokens=int(status.get("tokens", {}).get("completion", 0)),
            engine=self._engine([p.metadata.name for p in pods]),
        )

    def _engine(self, workers: list[str]) -> EngineView | None:
        """The first serving worker's engine, as its /metrics reports it (None: none serving)."""
        uid = self.job["metadata"]["uid"]
        for worker in workers:
            key = JobKeys(self.namespace, self.name, uid).key(f"worker:{worker}")
            try:
                beat = self.redis.get(key)
                if not beat:
                    continue
                url = Heartbeat.model_validate_json(beat).engine_url
                if not url:
                    continue
                scraped = urllib.request.urlopen(f"{url}/metrics", timeout=2).read().decode()
            except (OSError, ValueError, redis.RedisError):
                continue
            samples = Scrape(scraped)
            return EngineView(
                running=int(samples.total("vllm:num_requests_running")),
                waiting=int(samples.total("vllm:num_requests_waiting")),
                generated=int(samples.total("vllm:generation_tokens_total")),
            )
        return None

    def _time_yields(self, worker_present: bool) -> None:
        squeezed = self.online.value > NODE_GPUS - WORKER_GPUS
        if worker_present and squeezed and self._squeezed_at is None:
            # When the gauge moved (the exporter's own record), not when this poll saw it.
            self._squeezed_at = next(
                (t for t, v in reversed(self.online.history) if v > NODE_GPUS - WORKER_GPUS), time.monotonic()
            )
        if not worker_present and self._squeezed_at is not None and self._had_worker:
            self.yields.append(time.monotonic() - self._squeezed_at)
        if not worker_present or not squeezed:
            self._squeezed_at = None
        self._had_worker = worker_present


def summarise(
    watcher: Watcher, scraped: str, job: dict[str, Any], options: DemoOptions, wall: float
) -> dict[str, Any]:
    status = watcher.job.get("status", {})
    results = options.workdir / "results"
    outputs = _read_jsonl(results / "output.jsonl")
    errors = _read_jsonl(results / "errors.jsonl")
    wanted = [json.loads(line)["custom_id"] for line in (options.workdir / "input/requests.jsonl").open()]
    seen = [line["custom_id"] for line in outputs + errors]
    metric = Scrape(scraped).value
    pool = watcher.pool

    tokens = status.get("tokens", {})
    gpu_seconds = float(status.get("gpuSeconds", 0.0))
    answers = {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
        for line in sorted(outputs, key=lambda line: line["custom_id"])[:3]
    }
    return {
        "job": f"{watcher.namespace}/{watcher.name}",
        "phase": status.get("phase"),
        "requests": {
            **status.get("requestCounts", {}),
            "inInput": len(wanted),
            "everyCustomIdExactlyOnce": sorted(seen) == sorted(wanted),
        },
        "tokens": {k: tokens.get(k, 0) for k in ("prompt", "completion", "wasted")},
        "workerPods": len(watcher.pods_seen),
        "decisions": {
            action: int(metric("troughfill_decisions_total", pool=pool, action=action))
            for action in ("start", "yield", "drain")
        },
        "yieldSecondsOnlineRiseToGPUsFree": [round(s, 2) for s in watcher.yields],
        "gpuSecondsHarvested": round(gpu_seconds, 1),
        "completionTokensPerGPUSecond": round(tokens.get("completion", 0) / gpu_seconds, 1)
        if gpu_seconds
        else None,
        "output": str(results / "output.jsonl"),
        "errors": str(results / "errors.jsonl") if errors else None,
        "sampleAnswers": answers,
        "wallSeconds": round(wall, 1),
        "traceSecondsPerHour": options.seconds_per_hour,
    }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so everything started is stopped."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """The demo, start to summary; DemoError (one line: what, why, where the logs are) when it
    cannot finish, KeyboardInterrupt on Ctrl-C or SIGTERM. Everything started is stopped."""
    if options.workdir.exists():
        shutil.rmtree(options.workdir)
    options.workdir.mkdir(parents=True)
    demo = Demo(options)
    with _interruptible():
        try:
            return demo.run()
        except (DemoError, RuntimeError, TimeoutError, OSError, ApiException, redis.RedisError) as error:
            what = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DemoError(f"{what} (logs of every process: {options.workdir})") from error
        finally:
            demo.say("stopping everything it started")
            demo.close()


def default_workdir() -> Path:
    cache = os.environ.get("TROUGHFILL_CACHE") or str(Path.home() / ".cache" / "troughfill")
    return Path(cache) / "demo"
