"""`kubectl troughfill`: the kubectl plugin (installed with the package as `kubectl-troughfill`).

    kubectl troughfill get [NAME] [-n NS | -A]     jobs: progress, workers, tokens, GPU-hours, $/1M, ETA
    kubectl troughfill describe NAME              conditions, the pool's decisions, yields and their latency
    kubectl troughfill pool [NAME]                GPUs (capacity, online, trough, batch, headroom),
                                                  namespaces' shares and quotas, the signal's age
    kubectl troughfill suspend|resume NAME        spec.suspend (progress is kept)
    kubectl troughfill cancel NAME [--delete]     spec.cancel: workers stop, finished results are merged,
                                                  the job stays (cancelled); --delete removes it too
    kubectl troughfill results NAME [--dir D]     download output.jsonl and errors.jsonl

Tables by default, `-o json|yaml` for scripts. It acts with the caller's own kubeconfig
(`--kubeconfig`, `--context`, `$KUBECONFIG`), so RBAC decides what each user may see and change;
the views are pure functions of the objects read (`job_view`, `pool_view`, `describe_view`).
"""

import argparse
import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from troughfill import constants
from troughfill.api.batchinference import BatchInference
from troughfill.api.batchpool import BatchPool
from troughfill.api.conditions import PoolConditionType, Reason, find_condition
from troughfill.api.modeltemplate import ModelTemplate
from troughfill.api.types import parse_duration
from troughfill.config import Settings
from troughfill.storage.errors import StorageError
from troughfill.storage.objects import store_for
from troughfill.storage.segments import ERROR_FILE, OUTPUT_FILE

GROUP, VERSION = constants.API_GROUP, constants.API_VERSION
DECISION_REASONS = frozenset(
    {Reason.SCALE_UP, Reason.SCALE_DOWN, Reason.YIELD, Reason.WORKER_STOPPED, Reason.WORKER_CREATE_FAILED}
)
ClusterKind = TypeVar("ClusterKind", ModelTemplate, BatchPool)
AnyKind = TypeVar("AnyKind", BatchInference, BatchPool, ModelTemplate)


class PluginError(Exception):
    """A failure to show the user in one line (exit status 1)."""


# --- views: pure functions of the objects --------------------------------------------------------


def _seconds(delta_start: datetime | None, now: datetime) -> float | None:
    return None if delta_start is None else max(0.0, (now - delta_start).total_seconds())


def job_view(job: BatchInference, pool: BatchPool | None, now: datetime) -> dict[str, Any]:
    """One job as the plugin shows it: progress, workers, tokens, harvested GPU-hours, realised
    $/1M completion tokens (the pool's GPU price), the ETA at the rate so far and the window left."""
    status = job.status
    counts = status.request_counts if status else None
    done = (counts.completed + counts.failed) if counts else 0
    total = counts.total if counts else 0
    gpu_seconds = status.gpu_seconds if status else 0.0
    completion_tokens = status.tokens.completion if status else 0
    usd_per_million: float | None = None
    if pool is not None and completion_tokens and pool.spec.gpu_hourly_cost > 0:
        dollars = pool.spec.gpu_hourly_cost * Decimal(gpu_seconds) / 3600
        usd_per_million = round(float(dollars / (Decimal(completion_tokens) / Decimal(1_000_000))), 4)
    created = job.metadata.creationTimestamp
    window_end = created + parse_duration(job.spec.completion_window) if created else None
    window_left = None if window_end is None else max(0.0, (window_end - now).total_seconds())
    running_for = _seconds(status.started_at if status else None, now)
    finished = bool(status and status.finished_at)
    eta: float | None = None
    if finished:
        eta = 0.0
    elif running_for and done and total:
        eta = (total - done) * running_for / done
    return {
        "namespace": job.metadata.ns,
        "name": job.metadata.name,
        "phase": (status.phase.value if status and status.phase else "pending"),
        "suspended": job.spec.suspend,
        "requests": {"total": total, "done": done, "failed": counts.failed if counts else 0},
        "progressPercent": round(100 * done / total, 1) if total else 0.0,
        "workers": {
            "ready": status.workers.ready if status else 0,
            "desired": status.workers.desired if status else 0,
        },
        "tokens": {
            "prompt": status.tokens.prompt if status else 0,
            "completion": completion_tokens,
            "wasted": status.tokens.wasted if status else 0,
        },
        "gpuHours": round(gpu_seconds / 3600, 4),
        "usdPerMillionTokens": usd_per_million,
        "etaSeconds": None if eta is None else round(eta, 1),
        "windowLeftSeconds": None if window_left is None else round(window_left, 1),
        "onTrack": None if eta is None or window_left is None or finished else eta <= window_left,
        "template": job.spec.template_ref,
        "pool": pool.metadata.name if pool else None,
    }


def _share(pool: BatchPool, namespace: str) -> dict[str, Any]:
    """A namespace's row, before its jobs are counted: its quota and weight (the default
    quota's for a namespace the list does not name; 0 and 0 without one)."""
    quota = next((q for q in pool.spec.quotas if q.namespace == namespace), None) or pool.spec.default_quota
    return {
        "namespace": namespace,
        "jobs": 0,
        "batchGPUs": 0,
        "maxGPUs": quota.max_gpus if quota else 0,
        "weight": quota.weight if quota else 0,
    }


def pool_view(
    pool: BatchPool, jobs: Iterable[BatchInference], templates: Mapping[str, ModelTemplate], now: datetime
) -> dict[str, Any]:
    """A pool: its GPUs (capacity, online, trough, batch, the headroom it keeps), each namespace's
    share (GPUs its ready workers hold, its quota and weight) and how old the online signal is."""
    status = pool.status
    name = pool.metadata.name
    shares: dict[str, dict[str, Any]] = {}
    for job in jobs:
        template = templates.get(job.spec.template_ref)
        if template is None or template.spec.pool_ref != name:
            continue
        ns = job.metadata.ns
        if ns not in shares:
            shares[ns] = _share(pool, ns)
        share = shares[ns]
        share["jobs"] += 1
        ready = job.status.workers.ready if job.status else 0
        share["batchGPUs"] += ready * template.spec.gpus_per_worker
    for quota in pool.spec.quotas:  # namespaces with a quota and no jobs show too
        if quota.namespace not in shares:
            shares[quota.namespace] = _share(pool, quota.namespace)
    signal = find_condition(status.conditions, PoolConditionType.SIGNAL_READY) if status else None
    return {
        "name": name,
        "capacityGPUs": status.capacity_gpus if status else 0,
        "onlineGPUs": status.online_gpus if status else 0,
        "troughGPUs": status.trough_gpus if status else 0,
        "batchGPUs": status.batch_gpus if status else 0,
        "headroomGPUs": pool.spec.headroom_gpus,
        "activeJobs": status.active_jobs if status else 0,
        "signalAgeSeconds": (
            None
            if status is None or status.last_signal_time is None
            else round(max(0.0, (now - status.last_signal_time).total_seconds()), 1)
        ),
        "signalMaxStalenessSeconds": parse_duration(pool.spec.signal.max_staleness).total_seconds(),
        "signalReady": None if signal is None else signal.status.value == "True",
        "signalMessage": None if signal is None else signal.message,
        "namespaces": sorted(shares.values(), key=lambda s: s["namespace"]),
    }


def _event_time(event: Mapping[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or "")


def describe_view(
    job: BatchInference, pool: BatchPool | None, job_events: Sequence[Mapping[str, Any]],
    pool_events: Sequence[Mapping[str, Any]], now: datetime,
) -> dict[str, Any]:  # fmt: skip
    """A job in full: its view, its conditions, its own Events, and the pool's decisions about
    its workers (scale-ups, drains, yields, and when each stopped worker's GPUs were free)."""
    prefix = f"{job.metadata.name[:40]}-w-"
    decisions = [
        {
            "time": _event_time(e),
            "reason": e.get("reason", ""),
            "count": e.get("count") or 1,
            "message": e.get("message", ""),
        }
        for e in pool_events
        if e.get("reason") in DECISION_REASONS and prefix in str(e.get("message", ""))
    ]
    yields = [d for d in decisions if d["reason"] == Reason.WORKER_STOPPED]
    conditions = job.status.conditions if job.status else []
    return {
        **job_view(job, pool, now),
        "conditions": [
            {
                "type": c.type,
                "status": c.status.value,
                "reason": c.reason,
                "since": c.last_transition_time.isoformat(),
                "message": c.message,
            }
            for c in conditions
        ],
        "events": [
            {
                "time": _event_time(e),
                "type": e.get("type", ""),
                "reason": e.get("reason", ""),
                "count": e.get("count") or 1,
                "message": e.get("message", ""),
            }
            for e in sorted(job_events, key=_event_time)
        ],
        "decisions": sorted(decisions, key=lambda d: d["time"]),
        "stoppedWorkers": sorted(yields, key=lambda d: d["time"]),
        "outputURL": job.status.output_url if job.status else None,
        "errorURL": job.status.error_url if job.status else None,
    }


# --- rendering -----------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    """kubectl's short ages: 45s, 7m12s, 3h5m, 2d4h."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    for unit, size, small_unit, small in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // small
            return f"{whole // size}{unit}" + (f"{rest}{small_unit}" if rest else "")
    return f"{whole}s"


BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(value: object) -> str:
    """Text a tenant may have written (a message, a URL, metadata), safe on an admin's terminal:
    control characters (escape sequences, carriage returns, newlines) and bidirectional overrides
    shown as escapes, never sent raw."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        ascii(c)[1:-1] if unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS else c for c in text
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """kubectl's plain table: upper-case headers, columns three spaces apart; every cell printable."""
    cells = [list(headers), *([("-" if v is None else printable(v)) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def jobs_table(views: Sequence[Mapping[str, Any]], *, all_namespaces: bool) -> str:
    headers = ["NAME", "PHASE", "PROGRESS", "WORKERS", "TOKENS", "GPU-HOURS", "$/1M", "ETA", "WINDOW LEFT"]
    if all_namespaces:
        headers.insert(0, "NAMESPACE")
    rows = []
    for v in views:
        eta = _duration(v["etaSeconds"])
        if v["onTrack"] is False:
            eta += " (at risk)"
        row = [
            v["name"],
            v["phase"] + (" (suspended)" if v["suspended"] else ""),
            f"{v['requests']['done']}/{v['requests']['total']} ({v['progressPercent']}%)",
            f"{v['workers']['ready']}/{v['workers']['desired']}",
            v["tokens"]["prompt"] + v["tokens"]["completion"],
            f"{v['gpuHours']:.3f}",
            None if v["usdPerMillionTokens"] is None else f"{v['usdPerMillionTokens']:.4f}",
            eta,
            _duration(v["windowLeftSeconds"]),
        ]
        if all_namespaces:
            row.insert(0, v["namespace"])
        rows.append(row)
    return table(headers, rows)


def pools_table(views: Sequence[Mapping[str, Any]]) -> str:
    parts = [
        table(
            ["POOL", "CAPACITY", "ONLINE", "TROUGH", "BATCH", "HEADROOM", "JOBS", "SIGNAL AGE"],
            [
                [
                    v["name"],
                    v["capacityGPUs"],
                    v["onlineGPUs"],
                    v["troughGPUs"],
                    v["batchGPUs"],
                    v["headroomGPUs"],
                    v["activeJobs"],
                    f"{_duration(v['signalAgeSeconds'])} (max {_duration(v['signalMaxStalenessSeconds'])})"
                    + ("" if v["signalReady"] is not False else " STALE"),
                ]
                for v in views
            ],
        )
    ]
    for v in views:
        parts.append(f"\nPool {v['name']}: per-namespace shares")
        parts.append(
            table(
                ["NAMESPACE", "JOBS", "BATCH GPUS", "QUOTA GPUS", "WEIGHT"],
                [
                    [s["namespace"], s["jobs"], s["batchGPUs"], s["maxGPUs"], s["weight"]]
                    for s in v["namespaces"]
                ],
            )
        )
    return "\n".join(parts)


def describe_text(view: Mapping[str, Any]) -> str:
    lines = [
        f"Name:         {view['name']}",
        f"Namespace:    {view['namespace']}",
        f"Template:     {view['template']} (pool {view['pool'] or '-'})",
        f"Phase:        {view['phase']}" + (" (suspended)" if view["suspended"] else ""),
        f"Progress:     {view['requests']['done']}/{view['requests']['total']} ({view['progressPercent']}%),"
        f" {view['requests']['failed']} failed",
        f"Workers:      {view['workers']['ready']} ready / {view['workers']['desired']} desired",
        f"Tokens:       {view['tokens']['prompt']} prompt, {view['tokens']['completion']} completion,"
        f" {view['tokens']['wasted']} wasted",
        f"GPU-hours:    {view['gpuHours']:.4f}"
        + (
            ""
            if view["usdPerMillionTokens"] is None
            else f" (${view['usdPerMillionTokens']:.4f} per 1M tokens)"
        ),
        f"ETA:          {_duration(view['etaSeconds'])}, window left {_duration(view['windowLeftSeconds'])}"
        + (" (at risk)" if view["onTrack"] is False else ""),
        f"Output:       {printable(view['outputURL'] or '-')}",
        f"Errors:       {printable(view['errorURL'] or '-')}",
        "",
        "Conditions:",
        table(
            ["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            [[c["type"], c["status"], c["reason"], c["since"], c["message"]] for c in view["conditions"]],
        ),
        "",
        "Pool decisions about its workers:",
        _listing(["time", "reason", "count", "message"], view["decisions"]),
        "",
        "Events:",
        _listing(["time", "type", "reason", "count", "message"], view["events"]),
    ]
    return "\n".join(lines)


def _listing(keys: Sequence[str], items: Sequence[Mapping[str, Any]]) -> str:
    """Items as a table of their `keys` (upper-cased headers), or "<none>" as kubectl describe says."""
    if not items:
        return "  <none>"
    return table([key.upper() for key in keys], [[item[key] for key in keys] for item in items])


def emit(data: Any, output: str, as_text: Callable[[], str]) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False), end="")
    else:
        print(as_text())


# --- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """The reads and writes the plugin makes, with the caller's own credentials."""

    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        except (config.ConfigException, OSError) as error:
            raise PluginError(f"no usable kubeconfig: {error}") from error
        if context is not None:
            active = next((c for c in contexts if c["name"] == context), active)
        self.default_namespace: str = active.get("context", {}).get("namespace") or "default"
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def job(self, namespace: str, name: str) -> BatchInference:
        found = self._call(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, BatchInference.crd.plural, name
            ),
            f"batchinference {namespace}/{name}",
        )
        return _parse(BatchInference, found)

    def jobs(self, namespace: str | None) -> list[BatchInference]:
        if namespace is None:
            listed = self._call(
                lambda: self.custom.list_cluster_custom_object(GROUP, VERSION, BatchInference.crd.plural),
                "batchinferences",
            )
        else:
            listed = self._call(
                lambda: self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, BatchInference.crd.plural
                ),
                f"batchinferences in {namespace}",
            )
        return [_parse(BatchInference, item) for item in listed.get("items", [])]

    def templates(self) -> dict[str, ModelTemplate]:
        return {t.metadata.name: t for t in self._cluster_objects(ModelTemplate)}

    def pools(self) -> dict[str, BatchPool]:
        return {p.metadata.name: p for p in self._cluster_objects(BatchPool)}

    def _cluster_objects(self, kind: type[ClusterKind]) -> list[ClusterKind]:
        try:
            listed = self.custom.list_cluster_custom_object(GROUP, VERSION, kind.crd.plural)
        except ApiException as error:
            if error.status == 403:  # a user without read access to them still sees the jobs
                return []
            raise PluginError(_api_message(error, kind.crd.plural)) from error
        return [_parse(kind, item) for item in listed.get("items", [])]

    def events(self, namespace: str | None, name: str, kind: str) -> list[dict[str, Any]]:
        """Events about one object; `namespace` None: wherever they are (a cluster-scoped
        object's Events sit in the namespace of whoever posted them: the operator's)."""
        selector = f"involvedObject.name={name},involvedObject.kind={kind}"
        try:
            if namespace is None:
                listed = self.core.list_event_for_all_namespaces(field_selector=selector)
            else:
                listed = self.core.list_namespaced_event(namespace, field_selector=selector)
        except ApiException as error:
            if error.status == 403:  # not the caller's to read: the view goes without them
                return []
            raise PluginError(_api_message(error, "events")) from error
        return [self.core.api_client.sanitize_for_serialization(e) for e in listed.items]

    def patch_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        self._call(
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, BatchInference.crd.plural, name, {"spec": dict(spec)}
            ),
            f"batchinference {namespace}/{name}",
        )

    def delete(self, namespace: str, name: str) -> None:
        self._call(
            lambda: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, BatchInference.crd.plural, name
            ),
            f"batchinference {namespace}/{name}",
        )

    @staticmethod
    def _call(call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except ApiException as error:
            raise PluginError(_api_message(error, what)) from error


def _api_message(error: ApiException, what: str) -> str:
    try:
        message = json.loads(error.body or "{}").get("message") or error.reason
    except json.JSONDecodeError:
        message = error.reason
    return f"{what}: {message} ({error.status})"


def _parse(kind: type[AnyKind], found: Mapping[str, Any]) -> AnyKind:
    try:
        return kind.model_validate(found)
    except ValidationError as error:
        name = found.get("metadata", {}).get("name", "?")
        raise PluginError(f"{kind.crd.kind} {name} does not parse: {error.errors()[0]['msg']}") from error


# --- commands ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _pool_of(
    job: BatchInference, templates: Mapping[str, ModelTemplate], pools: Mapping[str, BatchPool]
) -> BatchPool | None:
    template = templates.get(job.spec.template_ref)
    return pools.get(template.spec.pool_ref) if template else None


def cmd_get(cluster: Cluster, args: argparse.Namespace) -> int:
    namespace = None if args.all_namespaces else (args.namespace or cluster.default_namespace)
    if args.name:
        jobs = [cluster.job(namespace or cluster.default_namespace, args.name)]
    else:
        jobs = cluster.jobs(namespace)
    templates, pools = cluster.templates(), cluster.pools()
    now = _now()
    views = [
        job_view(j, _pool_of(j, templates, pools), now) for j in sorted(jobs, key=lambda j: j.metadata.key)
    ]
    if not views and args.output == "table":
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No BatchInferences in {where}.", file=sys.stderr)
        return 0
    emit(
        views[0] if args.name else views,
        args.output,
        lambda: jobs_table(views, all_namespaces=namespace is None),
    )
    return 0


def cmd_describe(cluster: Cluster, args: argparse.Namespace) -> int:
    namespace = args.namespace or cluster.default_namespace
    job = cluster.job(namespace, args.name)
    templates, pools = cluster.templates(), cluster.pools()
    pool = _pool_of(job, templates, pools)
    pool_events = cluster.events(None, pool.metadata.name, constants.KIND_BATCH_POOL) if pool else []
    job_events = cluster.events(namespace, args.name, constants.KIND_BATCH_INFERENCE)
    view = describe_view(job, pool, job_events, pool_events, _now())
    emit(view, args.output, lambda: describe_text(view))
    return 0


def cmd_pool(cluster: Cluster, args: argparse.Namespace) -> int:
    pools = cluster.pools()
    if args.name:
        if args.name not in pools:
            raise PluginError(f"batchpool {args.name}: not found")
        pools = {args.name: pools[args.name]}
    jobs, templates = cluster.jobs(None), cluster.templates()
    now = _now()
    views = [pool_view(p, jobs, templates, now) for _, p in sorted(pools.items())]
    emit(views[0] if args.name else views, args.output, lambda: pools_table(views))
    return 0


def cmd_suspend(cluster: Cluster, args: argparse.Namespace) -> int:
    namespace = args.namespace or cluster.default_namespace
    suspend = args.command == "suspend"
    cluster.patch_spec(namespace, args.name, {"suspend": suspend})
    print(f"batchinference.{GROUP}/{args.name} {'suspended' if suspend else 'resumed'}")
    return 0


def cmd_cancel(cluster: Cluster, args: argparse.Namespace) -> int:
    namespace = args.namespace or cluster.default_namespace
    job = cluster.job(namespace, args.name)
    if args.delete:
        cluster.delete(namespace, args.name)
    else:
        cluster.patch_spec(namespace, args.name, {"cancel": True})
    print(
        f"batchinference.{GROUP}/{args.name} cancelled{' and deleted' if args.delete else ''}: its workers"
        f" stop, finished results are merged into {job.spec.output_url} (the rest as batch_cancelled errors)"
    )
    return 0


def cmd_results(cluster: Cluster, args: argparse.Namespace) -> int:
    """Download the job's merged output and error files (the URLs its status names) with the
    caller's own storage credentials (the environment's, as for any object-store client)."""
    namespace = args.namespace or cluster.default_namespace
    job = cluster.job(namespace, args.name)
    status = job.status
    named = {OUTPUT_FILE: status.output_url, ERROR_FILE: status.error_url} if status else {}
    urls = {name: url for name, url in named.items() if url}
    if not urls:
        phase = job.status.phase.value if job.status and job.status.phase else "pending"
        raise PluginError(f"batchinference {namespace}/{args.name} has no merged output yet (phase {phase})")
    store = store_for(Settings())
    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, url in urls.items():
        path = target / name
        try:
            with path.open("wb") as out:
                for line in store.read_lines(url):
                    out.write(line + b"\n")
        except (OSError, StorageError) as error:
            raise PluginError(f"reading {url}: {error}") from error
        written[name] = {"url": url, "path": str(path), "bytes": path.stat().st_size}
    emit(
        written,
        args.output,
        lambda: "\n".join(
            f"{name}: {w['bytes']} bytes from {w['url']} -> {w['path']}" for name, w in written.items()
        ),
    )
    return 0


COMMANDS: dict[str, Callable[[Cluster, argparse.Namespace], int]] = {
    "get": cmd_get,
    "describe": cmd_describe,
    "pool": cmd_pool,
    "suspend": cmd_suspend,
    "resume": cmd_suspend,
    "cancel": cmd_cancel,
    "results": cmd_results,
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="the namespace (default: the context's)")
    common.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context")
    parser = argparse.ArgumentParser(
        prog="kubectl troughfill", description="troughfill's BatchInferences and BatchPools, for people."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("get", parents=[common], help="jobs: progress, workers, tokens, cost, ETA")
    get.add_argument("name", nargs="?")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    describe = commands.add_parser("describe", parents=[common], help="a job's conditions, decisions, yields")
    describe.add_argument("name")
    pool = commands.add_parser("pool", parents=[common], help="pools: GPUs, shares, quotas, signal age")
    pool.add_argument("name", nargs="?")
    for verb, text in (
        ("suspend", "stop a job's workers, keeping its progress"),
        ("resume", "let a suspended job run again"),
    ):
        commands.add_parser(verb, parents=[common], help=text).add_argument("name")
    cancel = commands.add_parser(
        "cancel", parents=[common], help="cancel a job: workers stop, finished results are merged and kept"
    )
    cancel.add_argument("name")
    cancel.add_argument("--delete", action="store_true", help="delete the job too (its output stays)")
    results = commands.add_parser("results", parents=[common], help="download a job's output and error files")
    results.add_argument("name")
    results.add_argument("--dir", default=".", help="where to write output.jsonl and errors.jsonl")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = Cluster(args.kubeconfig, args.context)
        return COMMANDS[args.command](cluster, args)
    except PluginError as error:
        print(f"error: {printable(error)}", file=sys.stderr)
        return 1
