"""The operator on the real control plane: admission, the ledger, progress and completion as status.

Objects are applied with kubectl, the operator runs as Kopf does in production (here in this
process, via KopfRunner), the ledger is a real redis-server and the requests are answered by a
real vLLM engine through `troughfill worker run` (started here, as a worker pod would run it).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.conftest import wait_for_job
from tests.e2e.conftest import Kube, kubectl, operator_settings, until
from troughfill import constants
from troughfill_dev.localcluster import RedisServer, VllmServer, free_port, start_prometheus
from troughfill_dev.localcluster.services import VLLM_ENV
from troughfill_dev.scrape import Scrape

REPO = Path(__file__).resolve().parents[2]


def operator_process_env(kube: Kube, redis_server: RedisServer) -> dict[str, str]:
    """The environment of a `troughfill operator` process on this cluster."""
    return {
        **os.environ,
        **operator_settings(redis_server),
        "KUBECONFIG": str(kube.kubeconfig),
        "PYTHONUNBUFFERED": "1",
    }


def apply(kube: Kube, *objects: dict[str, Any]) -> None:
    done = kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    assert done.returncode == 0, done.stderr


FILES = [{"prefix": "file:///"}]
"""These pools' namespaces may use any file of this machine (the tests' temporary directories)."""


def pool_and_template(suffix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    pool = {
        "apiVersion": constants.GROUP_VERSION,
        "kind": "BatchPool",
        "metadata": {"name": f"pool-{suffix}"},
        # No GPUs: this pool's jobs get no worker pods (the first test runs its worker itself).
        "spec": {"gpus": {"count": 0}, "online": {}, "defaultQuota": {"maxGPUs": 8, "storage": FILES}},
    }
    template = {
        "apiVersion": constants.GROUP_VERSION,
        "kind": "ModelTemplate",
        "metadata": {"name": f"tiny-{suffix}"},
        "spec": {
            "poolRef": f"pool-{suffix}",
            "image": "vllm/vllm-openai:v0.11.0",
            "model": {"uri": "/models/tiny", "servedModelName": "tiny"},
            "allowedEngineArgs": [{"name": "max-num-seqs", "type": "Integer", "minimum": 1, "maximum": 1024}],
        },
    }
    return pool, template


def instant_pool_and_template(suffix: str, engine_script: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A 2-GPU pool that starts workers at once (no headroom, delay or minimum useful time),
    and a template whose engine is `python -c engine_script` (no vLLM: a stand-in)."""
    pool, template = pool_and_template(suffix)
    pool["spec"].update(gpus={"count": 2}, headroomGPUs=0, scaleUpDelay="0s", minUsefulTime="0s")
    template["spec"]["engine"] = {"command": [sys.executable, "-c", engine_script]}
    return pool, template


def job(name: str, template: str, input_url: str, output_url: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": constants.GROUP_VERSION,
        "kind": "BatchInference",
        "metadata": {"name": name},
        "spec": {"inputURL": input_url, "outputURL": output_url, "templateRef": template, **spec},
    }


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def get_job(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(kube.api).get_namespaced_custom_object(
        constants.API_GROUP, constants.API_VERSION, namespace, "batchinferences", name
    )
    return found


def events_for(kube: Kube, namespace: str, name: str) -> list[client.CoreV1Event]:
    events: list[client.CoreV1Event] = kube.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return events


def write_requests(path: Path, count: int, max_tokens: int = 8) -> None:
    lines = [
        {
            "custom_id": f"ticket-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "anything",
                "messages": [{"role": "user", "content": f"classify ticket {i}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def submit(kube: Kube, namespace: str, name: str, template: str, tmp_path: Path, count: int) -> None:
    """A job of `count` small requests on `template`, applied with kubectl."""
    requests = tmp_path / f"{name}.jsonl"
    write_requests(requests, count)
    bi = job(name, template, requests.as_uri(), (tmp_path / f"{name}-out").as_uri() + "/")
    bi["metadata"]["namespace"] = namespace
    apply(kube, bi)


def pool_events(kube: Kube, pool: str) -> set[str]:
    """Reasons of the Events about a (cluster-scoped) pool."""
    events = kube.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={pool}").items
    return {e.reason for e in events}


def live_pods(kube: Kube, namespace: str) -> list[client.V1Pod]:
    """Pods of the namespace not being deleted."""
    pods: list[client.V1Pod] = kube.core.list_namespaced_pod(namespace).items
    return [p for p in pods if not p.metadata.deletion_timestamp]


def test_a_job_is_admitted_indexed_worked_and_completes(
    kube: Kube,
    namespace: str,
    operator: KopfRunner,
    redis_server: RedisServer,
    vllm_engine: VllmServer,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    pool, template = pool_and_template(suffix)
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 30)
    output = tmp_path / "out"
    apply(kube, pool, template)
    bi = job("triage", f"tiny-{suffix}", requests.as_uri(), output.as_uri() + "/")
    bi["metadata"]["namespace"] = namespace
    bi["spec"]["engineArgs"] = [{"name": "max-num-seqs", "value": "16"}]
    apply(kube, bi)

    admitted = until(
        lambda: (
            (obj := get_job(kube, namespace, "triage"))
            and (c := condition(obj, "Admitted"))
            and c["status"] == "True"
            and obj
        ),
        30,
        "Admitted",
    )
    assert admitted["status"]["requestCounts"]["total"] == 30
    assert admitted["status"]["phase"] == "in_progress"
    assert constants.FINALIZER in admitted["metadata"]["finalizers"]
    uid = admitted["metadata"]["uid"]

    # What a worker pod runs; the next slice of the operator starts these as pods itself.
    worker = subprocess.run(
        [
            sys.executable, "-m", "troughfill.cli", "worker", "run",
            "--job", f"{namespace}/triage/{uid}", "--worker-id", "w1",
            "--engine-url", vllm_engine.url, "--served-model", "tiny", "--burst",
        ],
        env={**os.environ, "TROUGHFILL_REDIS_URL": redis_server.url},
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]

    waited = kubectl(
        kube, "wait", "--for=condition=Complete", f"batchinferences.{constants.API_GROUP}/triage",
        "-n", namespace, "--timeout=60s", timeout=90,
    )  # fmt: skip
    assert waited.returncode == 0, waited.stderr
    done = get_job(kube, namespace, "triage")
    status = done["status"]
    assert status["phase"] == "completed"
    assert status["requestCounts"] == {"total": 30, "completed": 30, "failed": 0, "resumed": 0}
    assert status["progress"] == "30/30 (100%)"
    assert status["tokens"]["completion"] == 30 * 8
    lines = [json.loads(line) for line in (output / "output.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"ticket-{i}" for i in range(30))
    until(
        lambda: {"Admitted", "AllRequestsDone"} <= {e.reason for e in events_for(kube, namespace, "triage")},
        15,
        "the Admitted and AllRequestsDone Events",
    )
    printed = kubectl(kube, "get", f"batchinferences.{constants.API_GROUP}", "-n", namespace)
    assert "30/30 (100%)" in printed.stdout, printed.stdout

    # Deleting the job removes its ledger keys (output stays) and releases the finalizer.
    deleted = kubectl(
        kube, "delete", f"batchinferences.{constants.API_GROUP}/triage", "-n", namespace, "--wait=true"
    )
    assert deleted.returncode == 0, deleted.stderr
    keys = redis.Redis.from_url(redis_server.url).keys(f"*{uid}*")
    assert keys == []
    assert (output / "output.jsonl").exists()


def test_a_job_naming_an_unknown_template_fails_with_a_reason_and_an_event(
    kube: Kube, namespace: str, operator: KopfRunner, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 2)
    bi = job("lost", "no-such-template", requests.as_uri(), (tmp_path / "out").as_uri() + "/")
    bi["metadata"]["namespace"] = namespace
    apply(kube, bi)
    failed = until(
        lambda: (obj := get_job(kube, namespace, "lost")) and condition(obj, "Failed") and obj, 30, "Failed"
    )
    failure = condition(failed, "Failed")
    assert failure is not None
    assert failure["reason"] == "TemplateNotFound"
    assert "no-such-template" in failure["message"]
    assert failed["status"]["phase"] == "failed"
    events = until(
        lambda: [e for e in events_for(kube, namespace, "lost") if e.reason == "TemplateNotFound"],
        15,
        "the Event",
    )
    assert events[0].type == "Warning"


def assert_decisions_metered(scraped: str, pool_name: str, template: str) -> None:
    """The operator's /metrics counted the starts and the yield, timed the yield, and measured
    the workers' starts (pod created -> Ready) for the template."""
    value = Scrape(scraped).value
    assert value("troughfill_decisions_total", pool=pool_name, action="start") >= 2
    assert value("troughfill_decisions_total", pool=pool_name, action="yield") >= 1
    assert value("troughfill_yield_latency_seconds_count", pool=pool_name, mode="yield") >= 1
    starts = value("troughfill_worker_cold_start_seconds_count", template=template)
    assert starts >= 2  # the first worker and the one after the yield
    mean = value("troughfill_worker_cold_start_seconds_sum", template=template) / starts
    assert 1 <= mean <= 300, mean  # a real engine's load, seconds not milliseconds
    assert value("troughfill_template_cold_start_estimate_seconds", template=template) > 0


def engine_pool_and_template(
    suffix: str, engine_paths: tuple[str, str], online_label: str, namespace: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A 2-GPU pool whose online demand is the GPUs of pods labelled app=`online_label`, and a
    template whose workers start the local vLLM engine with the tiny model (2 GPUs each)."""
    vllm_python, model = engine_paths
    pool, template = pool_and_template(suffix)
    pool["spec"].update(
        gpus={"count": 2},
        online={"selector": {"matchLabels": {"app": online_label}}, "namespaces": [namespace]},
        headroomGPUs=0,
        scaleUpDelay="0s",
        minUsefulTime="0s",
        drainGracePeriod="5s",
        defaultQuota={"maxGPUs": 2, "storage": FILES},
    )
    template["spec"].pop("allowedEngineArgs")
    template["spec"].update(
        image="troughfill/vllm-cpu:test",
        model={"uri": model, "servedModelName": "tiny"},
        gpusPerWorker=2,
        coldStartSeconds=60,
        engine={
            "command": [vllm_python, "-m", "vllm.entrypoints.openai.api_server"],
            "args": ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "32"],
            "env": [{"name": k, "value": v} for k, v in VLLM_ENV.items()],
        },
    )
    return pool, template


LONG_TOKENS = 400
LONG_REQUESTS = 600
"""The yield test's job: the tiny model's engine once did 120 x 400 tokens before the online pod
came, leaving nothing to yield, and on an idle machine 240 x 400 were done 73 s after the pod
started, before the test had seen it Ready and its deletion cost raised. (Longer requests are no
way out: a resumed request's prompt is the original plus its partial output re-tokenized, and the
random model's output re-tokenizes into more tokens than it was generated as: 800-token requests
overflowed the 1024 context.)"""


@pytest.mark.timeout(1500)  # a slow machine's engine: wait_for_job fails a stuck job
def test_workers_fill_the_trough_yield_to_online_pods_and_come_back(
    kube: Kube,
    namespace: str,
    redis_server: RedisServer,
    engine_paths: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crds: None,
) -> None:
    """The whole loop: the operator starts a worker pod (troughfill worker + a real vLLM engine,
    run by the node agent); an online pod arrives and the worker yields; it leaves and a new
    worker resumes; the job completes with every custom_id exactly once."""
    if not kube.local:
        pytest.skip("worker pods run the local vLLM engine through the node agent")
    suffix = uuid.uuid4().hex[:6]
    online_label = f"online-{suffix}"
    pool, template = engine_pool_and_template(suffix, engine_paths, online_label, namespace)
    requests = tmp_path / "requests.jsonl"
    # Enough work that the worker is still busy when the online pod comes: before that the test
    # waits for Ready and for the deletion cost (patched at most every 30 s).
    write_requests(requests, LONG_REQUESTS, max_tokens=LONG_TOKENS)
    output = tmp_path / "out"
    for name, value in operator_settings(redis_server).items():
        monkeypatch.setenv(name, value)
    metrics_port = free_port()
    monkeypatch.setenv("TROUGHFILL_METRICS_PORT", str(metrics_port))
    args = ["run", "--standalone", "--all-namespaces", "-m", "troughfill.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        apply(kube, pool, template)
        bi = job("long", f"tiny-{suffix}", requests.as_uri(), output.as_uri() + "/")
        bi["metadata"]["namespace"] = namespace
        apply(kube, bi)

        def workers() -> list[client.V1Pod]:
            pods: list[client.V1Pod] = kube.core.list_namespaced_pod(
                namespace, label_selector=f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
            ).items
            return pods

        def completed() -> int:
            return int(
                get_job(kube, namespace, "long")
                .get("status", {})
                .get("requestCounts", {})
                .get("completed", 0)
            )

        first = until(
            lambda: [p for p in workers() if p.status.phase == "Running"], 60, "a worker pod running"
        )
        until(lambda: completed() >= 3, 240, "the first results (engine cold start)", interval=0.2)
        until(
            lambda: any(
                c.type == "Ready" and c.status == "True" for p in workers() for c in p.status.conditions or []
            ),
            60,
            "the worker pod Ready (its probe runs every few seconds)",
            interval=0.5,  # the operator runs in this process: fast polling here starves it
        )
        until(
            lambda: any(
                int((p.metadata.annotations or {}).get(constants.ANNOTATION_POD_DELETION_COST, "0")) >= 1
                for p in workers()
            ),
            30,
            "the serving worker's pod-deletion-cost raised from progress",
            interval=0.5,
        )

        arrived = time.monotonic()
        kube.core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "online", "labels": {"app": online_label}},
                "spec": {
                    "containers": [
                        {
                            "name": "serve",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", "import time; time.sleep(3600)"],
                            "resources": {
                                "requests": {"nvidia.com/gpu": "2"},
                                "limits": {"nvidia.com/gpu": "2"},
                            },
                        }
                    ],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        )
        until(lambda: not workers(), 30, "the batch worker gone", interval=0.05)
        yielded = time.monotonic() - arrived
        job_status = get_job(kube, namespace, "long")["status"]
        assert job_status["workers"]["desired"] == 0
        done_at_yield = completed()
        assert done_at_yield < LONG_REQUESTS, (
            "the job finished before online load arrived; nothing was yielded"
        )

        time.sleep(2)  # the trough stays closed while the online pod runs
        assert not workers()
        kube.core.delete_namespaced_pod("online", namespace)
        until(lambda: [p for p in workers() if p.metadata.name != first[0].metadata.name], 60, "a new worker")

        ended = wait_for_job(lambda: get_job(kube, namespace, "long"), "the job after the yield")
        assert ended["status"]["phase"] == "completed", ended["status"]
        scraped = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
    assert runner.exception is None
    assert_decisions_metered(scraped, f"pool-{suffix}", f"tiny-{suffix}")
    lines = [json.loads(line) for line in (output / "output.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"ticket-{i}" for i in range(LONG_REQUESTS))
    short = {
        line["custom_id"]: (
            line["response"]["body"]["usage"],
            line["response"]["body"]["choices"][0]["finish_reason"],
        )
        for line in lines
        if line["response"]["body"]["usage"]["completion_tokens"] != LONG_TOKENS
    }
    assert not short, f"results without {LONG_TOKENS} tokens: {short}"
    assert {"ScaleUp", "Yield"} <= pool_events(kube, f"pool-{suffix}")
    print(
        f"\nonline pod created -> batch worker gone (GPUs free) in {yielded:.2f}s; "
        f"{done_at_yield} of {LONG_REQUESTS} done at the yield; the job then completed on a new worker"
    )


def test_of_two_operator_replicas_one_acts_and_the_other_takes_over(
    kube: Kube, namespace: str, crds: None, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Leader election (Kopf peering): `troughfill operator` twice; one pauses for the other,
    and resumes when the other stops. The peering CRD comes with manifests/crds; the peering
    object does not exist yet: the first replica creates it."""
    peering = f"troughfill-e2e-{uuid.uuid4().hex[:6]}"
    env = operator_process_env(kube, redis_server)
    replicas: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, priority: str) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "troughfill.cli", "operator", "--peering", peering]
        replicas[name] = subprocess.Popen(
            [*command, "--priority", priority], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    def low_paused() -> bool:
        # It starts paused and stays so if it sees the higher peer; had it acted before
        # seeing it, it pauses once it does.
        text = log("low")
        resumed, paused = text.rfind("Resuming operations"), text.rfind("Pausing operations")
        return "Activity 'configure' succeeded" in text and (resumed < 0 or paused > resumed)

    try:
        start("high", "200")
        until(lambda: "Resuming operations" in log("high"), 60, "the high-priority replica acting")
        assert f"created the peering object ClusterKopfPeering {peering}" in log("high")
        start("low", "100")
        until(low_paused, 60, "the low-priority replica up and paused")
        time.sleep(2)  # a few peering rounds: it stays paused
        assert low_paused()
        requests = tmp_path / "requests.jsonl"
        write_requests(requests, 3)
        first = job("first", "no-such-template", requests.as_uri(), (tmp_path / "out1").as_uri() + "/")
        first["metadata"]["namespace"] = namespace
        apply(kube, first)
        until(lambda: condition(get_job(kube, namespace, "first"), "Failed"), 30, "the first job handled")
        assert f"[{namespace}/first] Handler 'start_job' succeeded" in log("high")
        assert low_paused()
        assert "first" not in log("low")  # the paused replica did nothing with the job

        resumed_before = log("low").count("Resuming operations")
        replicas["high"].terminate()  # a clean stop leaves the peering at once
        assert replicas["high"].wait(30) == 0
        until(
            lambda: log("low").count("Resuming operations") > resumed_before, 60, "the other replica resuming"
        )
        second = job("second", "no-such-template", requests.as_uri(), (tmp_path / "out2").as_uri() + "/")
        second["metadata"]["namespace"] = namespace
        apply(kube, second)
        until(lambda: condition(get_job(kube, namespace, "second"), "Failed"), 30, "the second job handled")
        assert f"[{namespace}/second] Handler 'start_job' succeeded" in log("low")
    finally:
        for process in replicas.values():
            process.terminate()
            process.wait(30)


def test_deleting_a_job_cancels_it_keeping_partial_output(
    kube: Kube, namespace: str, operator: KopfRunner, redis_server: RedisServer, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    pool, template = pool_and_template(suffix)
    apply(kube, pool, template)
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 5)
    output = tmp_path / "out"
    bi = job("doomed", f"tiny-{suffix}", requests.as_uri(), output.as_uri() + "/")
    bi["metadata"]["namespace"] = namespace
    apply(kube, bi)
    admitted = until(
        lambda: (obj := get_job(kube, namespace, "doomed")) and condition(obj, "Admitted") and obj,
        30,
        "Admitted",
    )
    uid = admitted["metadata"]["uid"]
    deleted = kubectl(
        kube, "delete", f"batchinferences.{constants.API_GROUP}/doomed", "-n", namespace, "--wait=true"
    )
    assert deleted.returncode == 0, deleted.stderr
    errors = [json.loads(line) for line in (output / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["custom_id"] for e in errors) == [f"ticket-{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert redis.Redis.from_url(redis_server.url).keys(f"*{uid}*") == []


def test_a_job_whose_workers_keep_failing_is_marked_crash_looping(
    kube: Kube, namespace: str, operator: KopfRunner, tmp_path: Path
) -> None:
    if not kube.local:
        pytest.skip("the failing engine command runs through the node agent")
    suffix = uuid.uuid4().hex[:6]
    pool, template = instant_pool_and_template(suffix, "import sys; sys.exit(1)")
    apply(kube, pool, template)
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 4)
    bi = job("broken", f"tiny-{suffix}", requests.as_uri(), (tmp_path / "out").as_uri() + "/")
    bi["metadata"]["namespace"] = namespace
    apply(kube, bi)

    def crash_looping() -> dict[str, Any] | None:
        running = condition(get_job(kube, namespace, "broken"), "Running")
        return running if running and running["reason"] == "CrashLoop" else None

    marked = until(crash_looping, 120, "the CrashLoop condition", interval=0.2)
    assert marked["status"] == "False"
    assert "worker pods failed" in marked["message"]

    def workers() -> list[client.V1Pod]:
        return live_pods(kube, namespace)

    until(lambda: not workers(), 30, "the failed workers removed")
    time.sleep(3)
    assert not workers(), "a crash-looping job got new workers"
    assert get_job(kube, namespace, "broken")["status"]["phase"] == "in_progress"  # nothing was lost


@pytest.mark.timeout(1500)  # a slow machine's engine: wait_for_job fails a stuck job
def test_the_operator_killed_mid_job_picks_up_where_it_was(
    kube: Kube,
    namespace: str,
    crds: None,
    redis_server: RedisServer,
    engine_paths: tuple[str, str],
    tmp_path: Path,
) -> None:
    """SIGKILL the operator while a worker works; the worker carries on; a new operator
    process adopts the job and its worker; the job completes with every custom_id once."""
    if not kube.local:
        pytest.skip("worker pods run the local vLLM engine through the node agent")
    suffix = uuid.uuid4().hex[:6]
    pool, template = engine_pool_and_template(suffix, engine_paths, f"online-{suffix}", namespace)
    requests = tmp_path / "requests.jsonl"
    write_requests(requests, 80, max_tokens=400)
    output = tmp_path / "out"
    env = operator_process_env(kube, redis_server)

    def start_operator(name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        command = [sys.executable, "-m", "troughfill.cli", "operator", "--standalone"]
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def workers() -> list[client.V1Pod]:
        pods: list[client.V1Pod] = kube.core.list_namespaced_pod(
            namespace, label_selector=f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
        ).items
        return [p for p in pods if not p.metadata.deletion_timestamp]

    def completed() -> int:
        return int(
            get_job(kube, namespace, "survivor")
            .get("status", {})
            .get("requestCounts", {})
            .get("completed", 0)
        )

    first = start_operator("first")
    second = None
    try:
        apply(kube, pool, template)
        bi = job("survivor", f"tiny-{suffix}", requests.as_uri(), output.as_uri() + "/")
        bi["metadata"]["namespace"] = namespace
        apply(kube, bi)
        until(lambda: completed() >= 3, 240, "the first results", interval=0.2)
        (worker,) = workers()
        first.kill()
        first.wait(10)
        done_at_kill = completed()
        time.sleep(3)
        assert [p.metadata.name for p in workers()] == [
            worker.metadata.name
        ]  # it works on without the operator
        second = start_operator("second")
        ended = wait_for_job(lambda: get_job(kube, namespace, "survivor"), "the job after the kill")
        assert ended["status"]["phase"] == "completed", (
            json.dumps(ended["status"]) + (tmp_path / "second.log").read_text()[-3000:]
        )
        assert done_at_kill < 80, "the job finished before the operator was killed"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
    lines = [json.loads(line) for line in (output / "output.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"ticket-{i}" for i in range(80))
    status = get_job(kube, namespace, "survivor")["status"]
    counts = status["requestCounts"]
    assert (counts["total"], counts["completed"], counts["failed"]) == (80, 80, 0)
    print(f"\noperator killed with {done_at_kill} of 80 done; a new operator saw the job through")


def test_suspend_stops_the_workers_keeping_the_job_and_resume_brings_them_back(
    kube: Kube, namespace: str, operator: KopfRunner, tmp_path: Path
) -> None:
    """Also: the template's Ready and the pool's PriorityClassesReady conditions, a spec field
    fixed at admission refused on update, and pod-deletion-cost on a worker not serving yet."""
    if not kube.local:
        pytest.skip("the engine command runs through the node agent")
    suffix = uuid.uuid4().hex[:6]
    pool, template = instant_pool_and_template(suffix, "import time; time.sleep(600)")
    apply(kube, pool, template)
    custom = client.CustomObjectsApi(kube.api)

    def cluster_condition(plural: str, name: str, kind: str) -> dict[str, Any] | None:
        obj = custom.get_cluster_custom_object(constants.API_GROUP, constants.API_VERSION, plural, name)
        return condition(obj, kind)

    ready = until(
        lambda: cluster_condition("modeltemplates", f"tiny-{suffix}", "Ready"), 30, "template Ready"
    )
    assert (ready["status"], ready["reason"]) == ("True", "PoolFound")
    classes = until(
        lambda: cluster_condition("batchpools", f"pool-{suffix}", "PriorityClassesReady"),
        30,
        "pool conditions",
    )
    assert classes["status"] == "True", classes

    submit(kube, namespace, "paused", f"tiny-{suffix}", tmp_path, 4)

    def workers() -> list[client.V1Pod]:
        return live_pods(kube, namespace)

    first = until(workers, 60, "a worker pod")[0]
    assert first.metadata.annotations[constants.ANNOTATION_POD_DELETION_COST] == "0"  # not serving yet

    def patch_spec(**spec: Any) -> None:
        done = kubectl(
            kube, "patch", f"batchinferences.{constants.API_GROUP}/paused", "-n", namespace,
            "--type=merge", "-p", json.dumps({"spec": spec}),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    patch_spec(suspend=True)
    until(lambda: not workers(), 30, "the worker stopped")

    def suspended() -> dict[str, Any] | None:
        running = condition(get_job(kube, namespace, "paused"), "Running")
        return running if running and running["reason"] == "Suspended" else None

    until(suspended, 30, "Running=False, Suspended")
    time.sleep(2)
    assert not workers(), "a suspended job got a worker"
    assert get_job(kube, namespace, "paused")["status"]["phase"] == "in_progress"

    patch_spec(suspend=False)
    until(lambda: [p for p in workers() if p.metadata.name != first.metadata.name], 60, "a worker again")
    reasons = until(
        lambda: {"Suspended", "Resumed"} <= {e.reason for e in events_for(kube, namespace, "paused")},
        15,
        "the Suspended and Resumed Events",
    )
    assert reasons

    # A field fixed at admission: the API server's transition rule refuses the change, nothing
    # is stored, and the job keeps its worker and its Admitted condition.
    refused = kubectl(
        kube, "patch", f"batchinferences.{constants.API_GROUP}/paused", "-n", namespace,
        "--type=merge", "-p", json.dumps({"spec": {"outputURL": (tmp_path / "elsewhere").as_uri() + "/"}}),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "outputURL is immutable" in refused.stderr, refused.stderr
    stored = get_job(kube, namespace, "paused")
    assert stored["spec"]["outputURL"] != (tmp_path / "elsewhere").as_uri() + "/"
    assert (condition(stored, "Admitted") or {}).get("status") == "True"
    assert workers(), "the job lost its worker over a refused change"


def test_workers_follow_the_prometheus_online_metric_and_yield_when_it_goes_stale(
    kube: Kube, namespace: str, operator: KopfRunner, tmp_path: Path
) -> None:
    """The pool reads online demand from a real Prometheus scraping an exporter this test
    moves: up -> the worker yields; down -> a worker comes back; Prometheus gone -> the signal
    goes stale and batch yields (onStale: Yield). The workers' engine never gets ready here
    (a sleeping stand-in): what is tested is the path metric -> operator -> pod gone."""
    if not kube.local:
        pytest.skip("the engine command runs through the node agent")
    suffix = uuid.uuid4().hex[:6]
    metric = f"e2e_online_gpus_{suffix}"
    registry = CollectorRegistry()
    online = Gauge(metric, "GPUs online serving holds", registry=registry)
    exporter_port = free_port()
    exporter, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    prometheus = start_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{exporter_port}"], "1s")
    try:
        pool, template = instant_pool_and_template(suffix, "import time; time.sleep(600)")
        pool["spec"].update(
            online={"prometheusURL": prometheus.url, "gpusInUseQuery": f"max({metric})"},
            signal={"maxStaleness": "5s", "onStale": "Yield", "floorGPUs": 0},
        )
        template["spec"]["gpusPerWorker"] = 2
        online.set(0)
        apply(kube, pool, template)
        submit(kube, namespace, "follower", f"tiny-{suffix}", tmp_path, 4)

        def workers() -> list[client.V1Pod]:
            return live_pods(kube, namespace)

        def pool_status() -> dict[str, Any]:
            found: dict[str, Any] = client.CustomObjectsApi(kube.api).get_cluster_custom_object(
                constants.API_GROUP, constants.API_VERSION, "batchpools", f"pool-{suffix}"
            )
            return dict(found.get("status", {}))

        first = until(workers, 60, "a worker in the empty trough")[0]
        risen = time.monotonic()
        online.set(2)
        until(lambda: not workers(), 30, "the worker gone after the metric rose", interval=0.05)
        print(f"\nonline metric up -> worker pod gone in {time.monotonic() - risen:.2f}s")
        # The pool's status is written after the cycle that stopped the worker; it may land later.
        until(lambda: pool_status().get("onlineGPUs") == 2, 10, "the pool reporting 2 online GPUs")
        time.sleep(3)
        assert not workers(), "a worker started while online held every GPU"

        online.set(0)
        until(lambda: [p for p in workers() if p.metadata.name != first.metadata.name], 30, "a worker back")

        prometheus.stop()  # the signal can no longer be read: after maxStaleness, batch yields
        until(lambda: not workers(), 30, "the worker gone once the signal went stale", interval=0.2)

        def signal_ready() -> tuple[str, str, str]:
            ready = next(c for c in pool_status().get("conditions", []) if c["type"] == "SignalReady")
            return ready["status"], ready["reason"], ready["message"]

        # Written after the cycle that stopped the worker, like onlineGPUs above: it may land later.
        until(lambda: signal_ready()[:2] == ("False", "SignalStale"), 10, "SignalReady=False, SignalStale")
        # The message says why: the query's error (Prometheus is down).
        assert "online demand signal stale: ConnectionError" in signal_ready()[2], signal_ready()
        assert {"ScaleUp", "Yield"} <= pool_events(kube, f"pool-{suffix}")
    finally:
        exporter.shutdown()
        prometheus.stop()
