"""The operator's own metrics (prometheus-client), served on Settings.metrics_port at /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
# A job's series are labelled `namespace` and `batchinference`, not `job`: Prometheus sets `job`
# (the scrape job) on every series and would rename ours to `exported_job`.

CAPACITY = Gauge("troughfill_pool_capacity_gpus", "GPUs in the pool", ["pool"], registry=REGISTRY)
ONLINE = Gauge(
    "troughfill_pool_online_gpus", "GPUs online serving holds (last good signal)", ["pool"], registry=REGISTRY
)
TROUGH = Gauge(
    "troughfill_pool_trough_gpus", "capacity - online - pending - headroom: what batch may hold", ["pool"],
    registry=REGISTRY,
)  # fmt: skip
BATCH = Gauge(
    "troughfill_pool_batch_gpus",
    "GPUs batch workers hold once the plan is carried out",
    ["pool"],
    registry=REGISTRY,
)
READY = Gauge(
    "troughfill_pool_ready_batch_gpus",
    "GPUs the pool's ready batch workers hold: what batch is harvesting now",
    ["pool"],
    registry=REGISTRY,
)
STALENESS = Gauge(
    "troughfill_pool_signal_staleness_seconds", "Age of the online demand signal the planner used", ["pool"],
    registry=REGISTRY,
)  # fmt: skip
MAX_STALENESS = Gauge(
    "troughfill_pool_signal_max_staleness_seconds",
    "The pool's signal.maxStaleness: a signal older than this is stale",
    ["pool"],
    registry=REGISTRY,
)
JOB_GPUS = Gauge(
    "troughfill_job_batch_gpus",
    "GPUs held by a job's ready workers",
    ["namespace", "batchinference"],
    registry=REGISTRY,
)
JOB_REQUESTS = Gauge(
    "troughfill_job_requests",
    "A job's requests by state",
    ["namespace", "batchinference", "state"],
    registry=REGISTRY,
)
JOB_TOKENS = Gauge(
    "troughfill_job_tokens",
    "A job's tokens by kind",
    ["namespace", "batchinference", "kind"],
    registry=REGISTRY,
)
JOB_COST = Gauge(
    "troughfill_job_usd_per_million_tokens",
    "Realised cost: GPU $/h x batch GPU-hours of the job / its completion tokens (millions)",
    ["namespace", "batchinference"],
    registry=REGISTRY,
)
JOB_AT_RISK = Gauge(
    "troughfill_job_at_risk",
    "1 while the job misses its deadline at the current pace (its AtRisk condition), else 0",
    ["namespace", "batchinference"],
    registry=REGISTRY,
)
JOB_CRASH_LOOP = Gauge(
    "troughfill_job_worker_crash_loop",
    "1 while the job's worker pods keep failing and it gets no new worker, else 0",
    ["namespace", "batchinference"],
    registry=REGISTRY,
)
LEDGER_UNAVAILABLE = Counter(
    "troughfill_ledger_unavailable_total",
    "Operations that failed because Redis (the work ledger) was unreachable; each is retried",
    registry=REGISTRY,
)
DECISIONS = Counter(
    "troughfill_decisions_total",
    "Workers started and stopped, by action",
    ["pool", "action"],
    registry=REGISTRY,
)
YIELD_LATENCY = Histogram(
    "troughfill_yield_latency_seconds",
    "From the planning cycle that decided to stop a worker to its pod being gone (its GPUs free)",
    ["pool", "mode"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
    registry=REGISTRY,
)
COLD_START = Histogram(
    "troughfill_worker_cold_start_seconds",
    "A worker's start: its pod created to first seen Ready (scheduling, image, engine load)",
    ["template"],
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
    registry=REGISTRY,
)
COLD_START_ESTIMATE = Gauge(
    "troughfill_template_cold_start_estimate_seconds",
    "The cold start the planner assumes for a template's workers: the 90th percentile of its "
    "last 20 measured starts once it has 3, its declared coldStartSeconds until then",
    ["template"],
    registry=REGISTRY,
)

CYCLE_SECONDS = Histogram(
    "troughfill_pool_cycle_seconds",
    "One pool cycle: observe, plan, act",
    ["pool"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5),
    registry=REGISTRY,
)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


FULL_COLLECTION = Histogram(
    "troughfill_full_collection_seconds",
    "Python's full garbage collections, which the operator runs between pool cycles",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2),
    registry=REGISTRY,
)
