"""A pool's planning cycle, phase by phase, against an in-memory cluster (the controller's Cluster
Protocol) and a real Redis ledger: what it starts, stops and deletes, what it tells workers, and
what it records (each job's WorkerView, GPU-seconds, crash loops)."""

import contextlib
import uuid
import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from redis.asyncio import Redis

from tests.builders import batch_inference, pool, template
from tests.ledgertools import FakeClock, request_line, write_input
from troughfill import metrics
from troughfill.api import BatchInference, BatchPool, ModelTemplate, admit
from troughfill.api.batchpool import OnlineWorkload
from troughfill.config import Settings
from troughfill.controller import jobs, pools
from troughfill.controller.pools import CRASH_LOOP_FAILURES, PoolController, PoolState
from troughfill.controller.ports import Cluster, WorkerPod
from troughfill.controller.stores import JobStores
from troughfill.kube.workerpod import WorkerEnvironment
from troughfill.ledger import JobKeys, JobLedger, StopMode
from troughfill.ledger.credentials import LedgerKey, read_token
from troughfill.planner import Limit
from troughfill.signals.prometheus import SignalReading
from troughfill.storage import ObjectStore

START = 1_800_000_000.0


@dataclass
class FakeCluster:
    """The cluster as the controller sees it, in memory; pods change only when a test says so."""

    templates: dict[str, ModelTemplate] = field(default_factory=dict)
    pools: dict[str, BatchPool] = field(default_factory=dict)
    raw_jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: dict[str, WorkerPod] = field(default_factory=dict)
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    annotated: dict[str, dict[str, str]] = field(default_factory=dict)
    refuse_creates: str | None = None
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    clock: FakeClock = field(default_factory=FakeClock)

    def template(self, name: str) -> ModelTemplate | None:
        return self.templates.get(name)

    def pool(self, name: str) -> BatchPool | None:
        return self.pools.get(name)

    def jobs(self) -> list[dict[str, Any]]:
        return self.raw_jobs

    def node_gpus(self, node_selector: dict[str, str], resource: str) -> int:
        raise AssertionError("the test pools have a fixed GPU count")

    def online_gpus(self, label_selector: str, namespaces: list[str], resource: str) -> tuple[float, float]:
        return 0.0, 0.0

    def priority_value(self, name: str) -> int:
        return 100

    def missing_priority_classes(self, names: list[str]) -> list[str]:
        return []

    def worker_pods(self, pool: str) -> list[WorkerPod]:
        return list(self.pods.values())

    def create_pod(self, manifest: dict[str, Any]) -> None:
        if self.refuse_creates:
            raise ApiException(status=403, reason=self.refuse_creates)
        meta = manifest["metadata"]
        self.created.append(manifest)
        self.pods[meta["name"]] = WorkerPod(
            namespace=meta["namespace"],
            name=meta["name"],
            phase="Pending",
            ready=False,
            deleting=False,
            created_at=self.clock(),
            owner_uid=next(ref["uid"] for ref in meta["ownerReferences"] if ref.get("controller")),
        )

    def delete_pod(self, namespace: str, name: str) -> None:
        self.deleted.append(name)
        if name in self.pods:
            self.pods[name] = replace(self.pods[name], deleting=True)

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.annotated.setdefault(name, {}).update(annotations)

    def delete_pool_workers(self, pool: str) -> int:
        return 0

    def delete_job_workers(self, namespace: str, job_uid: str) -> int:
        return 0

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))

    def create_secret(self, manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        self.secrets.setdefault((meta["namespace"], meta["name"]), dict(manifest["stringData"]))

    # --- what the kubelet and the scheduler would do ---

    def ready(self, name: str) -> None:
        self.pods[name] = replace(self.pods[name], phase="Running", ready=True, ready_at=self.clock())

    def fail(self, name: str) -> None:
        self.pods[name] = replace(self.pods[name], phase="Failed", ready=False)

    def succeed(self, name: str) -> None:
        self.pods[name] = replace(self.pods[name], phase="Succeeded", ready=False)

    def gone(self, name: str) -> None:
        del self.pods[name]


@dataclass
class FakeSignals:
    """Online demand as Prometheus would report it (fresh at every read)."""

    clock: FakeClock
    gpus: float = 0.0

    def read(self, pool_name: str, online: OnlineWorkload) -> SignalReading:
        return SignalReading(gpus_in_use=self.gpus, read_at=self.clock())

    def history(
        self, query: str, start: float, end: float, step: float, url: str | None = None
    ) -> list[tuple[float, float]]:
        return []


@dataclass
class World:
    cluster: FakeCluster
    signals: FakeSignals
    controller: PoolController
    pool: BatchPool
    job: BatchInference
    ledger: JobLedger
    clock: FakeClock


@pytest.fixture
async def world(aredis: Redis, tmp_path: Path) -> World:
    clock = FakeClock(START)
    pool_object = BatchPool.model_validate(pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 8}))
    template_object = ModelTemplate.model_validate(template(gpusPerWorker=2))
    input_url = write_input(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(40)])
    wire = batch_inference(inputURL=input_url, outputURL=(tmp_path / "out").as_uri() + "/", maxWorkers=2)
    created = datetime.fromtimestamp(START, UTC)
    wire["metadata"].update(uid=uuid.uuid4().hex, generation=1, creationTimestamp=created.isoformat())
    job = BatchInference.model_validate(wire)
    ledger = jobs.ledger_for(job, aredis)
    started = await jobs.start(job, admit(job, template_object, pool_object), ledger, ObjectStore(), created)
    assert started.status.phase == "in_progress"
    wire["status"] = started.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    cluster = FakeCluster(
        templates={"tiny": template_object}, pools={"gpus": pool_object}, raw_jobs=[wire], clock=clock
    )
    signals = FakeSignals(clock)
    environment = WorkerEnvironment(ledger_url="http://ledger:8090")
    checked: Cluster = cluster  # the fake is a Cluster as far as mypy can tell
    stores = JobStores(checked, Settings())
    controller = PoolController(checked, signals, aredis, environment, stores, clock=clock)
    return World(
        cluster, signals, controller, pool_object, BatchInference.model_validate(wire), ledger, clock
    )


async def test_a_trough_starts_workers_once_and_the_job_sees_them(world: World) -> None:
    cycle = await world.controller.cycle(world.pool)
    assert len(cycle.created) == 2  # maxWorkers
    assert {m["metadata"]["namespace"] for m in world.cluster.created} == {"team-a"}
    view = world.controller.workers_of(world.job.metadata.uid_text)
    assert view is not None
    assert (view.desired, view.ready, view.limit) == (2, 0, Limit.NONE)
    again = await world.controller.cycle(world.pool)
    assert again.created == []  # the pending pods count: nothing is started twice
    assert again.stopped == []


async def test_online_demand_makes_serving_workers_yield_through_the_ledger(world: World) -> None:
    await world.controller.cycle(world.pool)
    for name in list(world.cluster.pods):
        world.cluster.ready(name)
    world.clock.advance(1)
    world.signals.gpus = 8  # online takes the whole pool
    cycle = await world.controller.cycle(world.pool)
    stopped = dict(cycle.stopped)
    assert set(stopped) == set(world.cluster.pods)
    assert set(stopped.values()) == {StopMode.YIELD}
    for name in stopped:
        assert await world.ledger.stop_mode(name) is StopMode.YIELD  # told before its SIGTERM
        assert world.cluster.pods[name].deleting
    state = world.controller.pools["gpus"]
    assert set(state.stopping) == {f"team-a/{name}" for name in stopped}
    for name in stopped:
        world.cluster.gone(name)
    world.clock.advance(1)
    await world.controller.cycle(world.pool)
    assert state.stopping == {}  # gone: its yield latency is recorded once


async def test_gpu_seconds_are_a_total_so_a_lost_status_write_loses_nothing(world: World) -> None:
    await world.controller.cycle(world.pool)
    for name in list(world.cluster.pods):
        world.cluster.ready(name)
    for _ in range(3):
        world.clock.advance(10)
        await world.controller.cycle(world.pool)
    view = world.controller.workers_of(world.job.metadata.uid_text)
    assert view is not None
    assert view.ready == 2
    assert view.gpu_seconds == pytest.approx(2 * 2 * 30)  # 2 workers of 2 GPUs, 30 s
    assert metrics.REGISTRY.get_sample_value("troughfill_pool_ready_batch_gpus", {"pool": "gpus"}) == 4
    assert world.controller.workers_of(world.job.metadata.uid_text) == view  # reading takes nothing
    status = world.job.status
    assert status is not None
    now = datetime.fromtimestamp(world.clock(), UTC)
    first = await jobs.refresh_status(
        world.job, status.model_copy(deep=True), world.ledger, ObjectStore(), now, workers=view
    )
    retried = await jobs.refresh_status(
        world.job, status.model_copy(deep=True), world.ledger, ObjectStore(), now, workers=view
    )
    assert first.status.gpu_seconds == retried.status.gpu_seconds == pytest.approx(120)


async def test_a_job_whose_workers_keep_failing_gets_none_until_the_failures_age_out(world: World) -> None:
    failures = 0
    while failures < CRASH_LOOP_FAILURES:  # two workers a cycle: two rounds
        cycle = await world.controller.cycle(world.pool)
        assert cycle.created
        for name in cycle.created:
            world.cluster.fail(name)
            failures += 1
        world.clock.advance(1)
    cycle = await world.controller.cycle(world.pool)
    assert cycle.created == []
    view = world.controller.workers_of(world.job.metadata.uid_text)
    assert view is not None
    assert view.crash_loop is not None
    assert "failed in the last" in view.crash_loop
    labels = {"namespace": "team-a", "batchinference": world.job.metadata.name}
    assert metrics.REGISTRY.get_sample_value("troughfill_job_worker_crash_loop", labels) == 1
    failed = [m["metadata"]["name"] for m in world.cluster.created]
    assert set(failed) <= set(world.cluster.deleted)  # finished pods are removed
    world.clock.advance(301)
    for name in failed:
        world.cluster.gone(name)
    assert (await world.controller.cycle(world.pool)).created
    assert metrics.REGISTRY.get_sample_value("troughfill_job_worker_crash_loop", labels) == 0


async def test_a_jobs_alert_gauges_are_set_each_cycle_and_removed_when_it_leaves_the_pool(
    world: World,
) -> None:
    labels = {"namespace": "team-a", "batchinference": world.job.metadata.name}
    for mode in ("yield", "drain"):  # as in a fresh operator (the registry is the process's)
        for family in (metrics.YIELD_LATENCY, metrics.DECISIONS):
            with contextlib.suppress(KeyError):
                family.remove("gpus", mode)
    await world.controller.cycle(world.pool)
    assert metrics.REGISTRY.get_sample_value("troughfill_job_at_risk", labels) == 0  # no deadline
    assert metrics.REGISTRY.get_sample_value("troughfill_job_worker_crash_loop", labels) == 0
    stale = metrics.REGISTRY.get_sample_value(
        "troughfill_pool_signal_max_staleness_seconds", {"pool": "gpus"}
    )
    assert stale == 30.0  # the pool's signal.maxStaleness (its default)
    # counters and the yield histogram exist from the first cycle, before any stop: a series that
    # first appears at 3 shows Prometheus no increase
    for mode in ("yield", "drain"):
        latency = {"pool": "gpus", "mode": mode}
        assert (
            metrics.REGISTRY.get_sample_value("troughfill_yield_latency_seconds_count", latency) is not None
        )
        decided = {"pool": "gpus", "action": mode}
        assert metrics.REGISTRY.get_sample_value("troughfill_decisions_total", decided) is not None
    world.cluster.raw_jobs.clear()  # the job ended or was deleted: nothing about it may go on firing
    await world.controller.cycle(world.pool)
    assert metrics.REGISTRY.get_sample_value("troughfill_job_at_risk", labels) is None
    assert metrics.REGISTRY.get_sample_value("troughfill_job_worker_crash_loop", labels) is None


async def test_workers_of_no_active_job_are_deleted_and_refused_creates_are_reported(world: World) -> None:
    world.cluster.pods["stray"] = WorkerPod(
        "team-b", "stray", "Running", True, False, START, owner_uid="no-such-uid"
    )
    world.cluster.pods["not-ours"] = WorkerPod("team-b", "not-ours", "Running", True, False, START)
    world.cluster.refuse_creates = "forbidden: exceeded quota"
    cycle = await world.controller.cycle(world.pool)
    assert "stray" in world.cluster.deleted  # owned by a job that is not active here
    assert "not-ours" not in world.cluster.deleted  # no BatchInference owns it: not the operator's to delete
    assert cycle.created == []
    assert len(cycle.failures) == 1  # the second start of the job is not tried
    assert "exceeded quota" in cycle.failures[0]


async def test_a_deleted_job_and_pool_are_forgotten(world: World, aredis: Redis) -> None:
    await world.controller.cycle(world.pool)
    uid = world.job.metadata.uid_text
    world.controller.forget_job(uid)
    assert world.controller.workers_of(uid) is None
    world.controller.forget_pool("gpus")
    assert world.controller.pools == {}
    assert JobKeys.of(world.job.metadata) == world.ledger.keys


async def test_a_pod_in_another_namespace_claiming_a_jobs_uid_neither_counts_nor_crash_loops_it(
    world: World,
) -> None:
    """Team B labels (and owner-references) its own failing pods with team A's job uid: they are
    not A's workers (owner references never cross namespaces), so A is not put in a crash loop."""
    uid = world.job.metadata.uid_text
    for index in range(2 * CRASH_LOOP_FAILURES):
        name = f"forged-{index}"
        world.cluster.pods[name] = WorkerPod("team-b", name, "Failed", False, False, START, owner_uid=uid)
    cycle = await world.controller.cycle(world.pool)
    view = world.controller.workers_of(uid)
    assert view is not None
    assert view.crash_loop is None
    assert len(cycle.created) == 2  # team A's job gets its workers
    assert view.ready == 0  # and the forged pods are not counted as its workers


async def test_a_job_the_template_no_longer_admits_gets_no_workers_until_it_does(world: World) -> None:
    """Each cycle admits the job again, against the template and pool of now: an admin who
    narrows the quota stops its workers (its progress stays); restoring it starts them again,
    and the status's Admitted condition follows."""
    narrowed = BatchPool.model_validate(
        pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 8}, quotas=[])
    )
    world.cluster.pools["gpus"] = narrowed
    cycle = await world.controller.cycle(narrowed)
    assert cycle.created == []
    view = world.controller.workers_of(world.job.metadata.uid_text)
    assert view is not None
    assert view.admission is not None
    assert not view.admission.allowed
    status = world.job.status
    assert status is not None
    now = datetime.fromtimestamp(world.clock(), UTC)
    update = await jobs.refresh_status(
        world.job, status.model_copy(deep=True), world.ledger, ObjectStore(), now, workers=view
    )
    admitted = next(c for c in update.status.conditions if c.type == "Admitted")
    running = next(c for c in update.status.conditions if c.type == "Running")
    assert (admitted.status, admitted.reason) == ("False", "NamespaceNotInQuota")
    assert (running.status, running.reason) == ("False", "NamespaceNotInQuota")
    assert update.status.phase == "in_progress"  # nothing lost: it waits
    world.clock.advance(1)
    assert len((await world.controller.cycle(world.pool)).created) == 2


async def test_workers_get_their_jobs_own_secret_with_the_grants_credentials(world: World) -> None:
    """The grant's Secret lives with the operator; the job's workers get a copy of its keys in
    a Secret of the job's own (and envFrom it), nothing else of the operator's."""
    granted = pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 8})
    granted["spec"]["quotas"][0]["storage"] = [{"prefix": "file:///", "secretName": "team-a-store"}]
    world.cluster.pools["gpus"] = pool_object = BatchPool.model_validate(granted)
    cycle = await world.controller.cycle(pool_object)
    assert cycle.created == []  # the grant's Secret is missing: no worker could read its storage
    assert (
        "storage grant Secret 'team-a-store' not found in namespace 'troughfill-system'" in cycle.failures[0]
    )
    world.cluster.secrets["troughfill-system", "team-a-store"] = {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "unrelated": "not copied",
    }
    world.clock.advance(1)
    cycle = await world.controller.cycle(pool_object)
    assert len(cycle.created) == 2
    (secret,) = [key for key in world.cluster.secrets if key[0] == "team-a"]
    data = world.cluster.secrets[secret]
    # The grant's storage keys and the job's ledger token: no Redis credential of any kind.
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TROUGHFILL_LEDGER_TOKEN"}
    assert (data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]) == ("a", "b")
    key = await LedgerKey(world.controller.redis).get()
    assert read_token(key, data["TROUGHFILL_LEDGER_TOKEN"]) == world.ledger.keys  # this job's, alone
    for manifest in world.cluster.created:
        container = manifest["spec"]["containers"][0]
        assert "envFrom" not in container  # named keys only, never the whole Secret
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
                and "secretKeyRef" in e["valueFrom"]}  # fmt: skip
        assert {ref["name"] for ref in refs.values()} == {secret[1]}
        assert refs["TROUGHFILL_LEDGER_TOKEN"]["optional"] is False
        assert not any(e["name"].startswith("TROUGHFILL_REDIS") for e in container["env"])


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many jobs' ledger counts each cycle read."""
    counts: list[int] = []
    real = pools.progress_of

    async def counted(client: Redis, ledgers: list[JobLedger]) -> list[jobs.Progress]:
        counts.append(len(ledgers))
        return await real(client, ledgers)

    monkeypatch.setattr(pools, "progress_of", counted)
    return counts


async def test_a_job_that_cannot_progress_has_its_counts_read_only_in_its_turn(
    world: World, reads: list[int]
) -> None:
    """No worker and no lease: its ledger counts cannot move, so a cycle reads them only in its
    turn (one cycle in PROGRESS_RECHECK_CYCLES), not every cycle."""
    idle = BatchPool.model_validate(pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 0}))
    for _ in range(3 * pools.PROGRESS_RECHECK_CYCLES):
        await world.controller.cycle(idle)
    assert sum(reads) <= 4, reads  # the first cycle, then one in PROGRESS_RECHECK_CYCLES


async def test_a_job_has_its_turn_however_many_pools_cycle_beside_its_own(
    world: World, reads: list[int]
) -> None:
    """Turns count each pool's own cycles. Counted across pools, a pool cycling third among
    three saw only every third count, and a job whose turn was another's never had its counts
    read again: a worker run by hand that claimed and finished between two reads left the job
    in progress for good (an end-to-end test timed out on it). The job's pool is placed in the
    round where, counted across pools, it would never reach the job's turn."""
    idle = BatchPool.model_validate(pool(scaleUpDelay="0s", minUsefulTime="0s", gpus={"count": 0}))
    others = [BatchPool.model_validate(pool(f"other-{k}", gpus={"count": 0})) for k in range(2)]
    turn = zlib.crc32(world.job.metadata.uid_text.encode()) % pools.PROGRESS_RECHECK_CYCLES
    place = next(p for p in range(3) if (p + 1) % 3 != turn % 3)  # counted across pools: never its turn
    rounds = [*others[:place], idle, *others[place:]]
    for one in rounds:
        await world.controller.cycle(one)
    first = sum(reads)
    for _ in range(2 * pools.PROGRESS_RECHECK_CYCLES):
        for one in rounds:
            await world.controller.cycle(one)
    assert (first, sum(reads) - first) == (1, 2), reads  # then once in PROGRESS_RECHECK_CYCLES


async def test_a_job_with_workers_has_its_counts_read_every_cycle(world: World, reads: list[int]) -> None:
    first = await world.controller.cycle(world.pool)
    assert first.created
    for _ in range(5):
        await world.controller.cycle(world.pool)
    assert reads == [1] * 6


async def test_the_planner_assumes_the_cold_start_the_templates_workers_took(world: World) -> None:
    """The template says 120 s; its workers start in 30-40 s: after three measured starts the
    planner plans with the measured figure (the 90th percentile), not the declared one."""
    declared = float(world.cluster.templates["tiny"].spec.cold_start_seconds)
    uid = world.job.metadata.uid_text
    state = world.controller.pools.setdefault("gpus", PoolState())
    assumed = []
    for took in (30.0, 40.0, 35.0):
        await world.controller.cycle(world.pool)
        world.clock.advance(took)
        starting = [name for name, pod in world.cluster.pods.items() if not pod.ready]
        assert len(starting) == 2
        for name in starting:
            world.cluster.ready(name)
        await world.controller.cycle(world.pool)
        await world.controller.cycle(world.pool)  # seen again: counted once
        assumed.append(state.job_states[uid][1].cold_start_seconds)
        for name in starting:
            world.cluster.gone(name)
    assert world.controller.cold_starts.count("tiny") == 6
    assert assumed == [declared, 40.0, 40.0]  # two starts, then four (30, 30, 40, 40), then six
    gauge = "troughfill_template_cold_start_estimate_seconds"
    assert metrics.REGISTRY.get_sample_value(gauge, {"template": "tiny"}) == 40.0


async def test_a_job_whose_workers_just_finished_has_its_counts_read(world: World, reads: list[int]) -> None:
    """A worker that exits has just recorded what it finished (its last results may have come
    and gone between two reads): the cycle that sees its pod finished reads the job's counts,
    not only the job's turn one in PROGRESS_RECHECK_CYCLES cycles later."""
    first = await world.controller.cycle(world.pool)
    assert first.created
    for name in first.created:
        world.cluster.succeed(name)
    reads.clear()
    await world.controller.cycle(world.pool)
    assert reads == [1]
