"""Team B attacks team A on one cluster (real API server, real Redis with a password, a real
S3-protocol server, worker pods run by the node agent): every attempt is refused with a clear
message, by the API server, admission, or the ledger service, and team A's job completes with every
custom_id exactly once. The NetworkPolicy's part is checked in the manifests tier
(tests/manifests) and the admission policy's in the install tier: the in-process operator here
does not run under the operator's ServiceAccount.

The table of attacks and outcomes this prints is the one in docs/security.md.
"""

import base64
import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import s3fs
import yaml
from kopf.testing import KopfRunner

from tests.conftest import wait_for_job
from tests.e2e.conftest import Kube, kubectl, ledger_service, operator_settings, until
from tests.e2e.test_operator import (
    condition,
    engine_pool_and_template,
    get_job,
    job,
    write_requests,
)
from troughfill import constants
from troughfill_dev.localcluster import S3Server, start_s3
from troughfill_dev.localcluster.services import RedisServer, start_redis
from troughfill_dev.localcluster.stack import create_namespace

PASSWORD = "the-operators-own"
REQUESTS = 60


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def ledger_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis", appendonly=False, password=PASSWORD)
    yield server
    server.stop()


@dataclass
class Tenancy:
    """The two teams' namespaces and what the attacks need of them; what was tried, for the table."""

    kube: Kube
    team_a: str
    team_b: str
    bucket: str
    idle: str
    """Team B's template: 1 GPU, an engine that only waits."""
    rows: list[tuple[str, str]] = field(default_factory=list)

    def refused(self, attack: str, outcome: str) -> None:
        self.rows.append((attack, outcome))

    def table(self) -> str:
        lines = ["| attack by team B | outcome |", "|---|---|"]
        lines += [f"| {attack} | {outcome} |" for attack, outcome in self.rows]
        return "\n".join(lines)

    def b_job(self, name: str, **spec: Any) -> dict[str, Any]:
        obj = job(
            name, self.idle, f"s3://{self.bucket}/team-b/in.jsonl", f"s3://{self.bucket}/team-b/{name}/"
        )
        obj["metadata"]["namespace"] = self.team_b
        obj["spec"].update(spec)
        return obj

    def attempt(self, name: str, **spec: Any) -> dict[str, Any]:
        """Team B applies a job; the API server stores it and the operator fails it: its Failed condition."""
        code, output = kubectl_apply(self.kube, self.b_job(name, **spec))
        assert code == 0, output
        return failed_with(self.kube, self.team_b, name)


def kubectl_apply(kube: Kube, obj: dict[str, Any]) -> tuple[int, str]:
    done = kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump(obj))
    return done.returncode, done.stdout + done.stderr


def failed_with(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = until(
        lambda: condition(get_job(kube, namespace, name), "Failed"), 60, f"{name} Failed", interval=0.3
    )
    return found


def storage_attacks(t: Tenancy) -> None:
    """Another team's prefixes, the operator's filesystem, traversal."""
    for name, spec, fragment in [
        ("steal-output", {"outputURL": f"s3://{t.bucket}/team-a/out/"}, "outputURL"),
        ("read-input", {"inputURL": f"s3://{t.bucket}/team-a/in.jsonl"}, "inputURL"),
        ("read-files", {"inputURL": "file:///etc/passwd"}, "inputURL file:///etc/passwd"),
        ("traverse", {"inputURL": f"s3://{t.bucket}/team-b/../team-a/in.jsonl"}, ". or .."),
    ]:
        failed = t.attempt(name, **spec)
        assert failed["reason"] == "StorageNotGranted", failed
        assert fragment in failed["message"]
        assert "root:" not in failed["message"]  # never the target's contents
        assert "team-a-s3" not in failed["message"]  # nor another namespace's grants
        url = next(iter(spec.values())).replace(t.bucket, "BUCKET")
        t.refused(
            f"{next(iter(spec))} `{url}`", "admission: `StorageNotGranted` (the job's URL, its own grants)"
        )


def flag_attacks(t: Tenancy) -> None:
    """Engine flags: smuggled as a value (the API server), not allowlisted, of the wrong type."""
    smuggle = t.b_job("smuggle", engineArgs=[{"name": "max-num-seqs", "value": "--trust-remote-code"}])
    code, output = kubectl_apply(t.kube, smuggle)
    assert code != 0
    assert "spec.engineArgs[0].value" in output
    t.refused("engineArgs max-num-seqs=`--trust-remote-code`", "API server: schema pattern; nothing stored")
    for name, arg, fragment in [
        ("own-model", {"name": "model", "value": "other/repo"}, "engineArgs model not allowed"),
        ("huge", {"name": "max-num-seqs", "value": "100000"}, "must be at most 256"),
        ("two-words", {"name": "max-num-seqs", "value": "8 --trust-remote-code"}, "must be an integer"),
    ]:
        failed = t.attempt(name, engineArgs=[arg])
        assert failed["reason"] == "EngineArgNotAllowed", failed
        assert fragment in failed["message"], failed
        t.refused(
            f"engineArgs {arg['name']}=`{arg['value']}`", f"admission: `EngineArgNotAllowed` ({fragment})"
        )


def ledger_call(url: str, operation: str, token: str, body: dict[str, Any]) -> tuple[int, str]:
    """One raw call to the ledger service, as a tenant's own program in its pod would make it."""
    request = urllib.request.Request(
        f"{url}/v1/job/{operation}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def ledger_attacks(t: Tenancy, redis_port: int, ledger_url: str) -> None:
    """Team B's own job runs; its workers' Secret and pod hold its job's ledger token and no Redis
    credential at all; with the token, team B reaches nothing of team A's through the ledger
    service; Redis without credentials refuses everything."""
    core = t.kube.core
    assert kubectl_apply(t.kube, t.b_job("legit"))[0] == 0
    a_uid = get_job(t.kube, t.team_a, "victim")["metadata"]["uid"]
    secrets = until(
        lambda: [s for s in core.list_namespaced_secret(t.team_b).items if "troughfill" in s.metadata.name],
        120,
        "team B's workers' Secret",
        interval=0.5,
    )
    data = {k: base64.b64decode(v).decode() for k, v in secrets[0].data.items()}
    assert PASSWORD not in json.dumps(data)
    assert set(data) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", constants.SECRET_LEDGER_TOKEN}
    selector = f"{constants.LABEL_COMPONENT}={constants.COMPONENT_WORKER}"
    pods = until(
        lambda: core.list_namespaced_pod(t.team_b, label_selector=selector).items, 60, "team B's worker pod"
    )
    env = [e.to_dict() for e in pods[0].spec.containers[0].env]
    assert PASSWORD not in json.dumps(env)
    assert not [e["name"] for e in env if "REDIS" in e["name"]]
    t.refused(
        "read a Redis credential from its own worker pod or Secret",
        "none there: its job's ledger token and storage keys; workers never connect to Redis",
    )
    token = data[constants.SECRET_LEDGER_TOKEN]
    mac = token.split(".")[1]
    a_ref = base64.urlsafe_b64encode(f"{t.team_a}/victim/{a_uid}".encode()).decode().rstrip("=")
    for what, operation, bad_token, body, status, fragment in [
        ("claim team A's requests with A's name under its own token's MAC", "claim", f"{a_ref}.{mac}",
         {"worker": "x", "max_count": 10}, 401, "not valid"),
        ("claim with no token", "claim", "", {"worker": "x", "max_count": 10}, 401, "token is required"),
        ("claim 2^32 requests at once (a script looping for minutes)", "claim", token,
         {"worker": "x", "max_count": 2**32}, 400, "max_count"),
        ("commit a segment id that is a path into team A's segments", "commit", token,
         {"segment_id": f"../../{t.team_a}/w-0123456789abcdef", "outcomes": []}, 400, "segment_id"),
        ("save a partial output for a request its job does not have", "save-partials", token,
         {"partials": {"999999": {"text": "x", "tokens": 1}}}, 400, "not one of this job's"),
        ("send a Redis command in a body", "claim", token,
         {"worker": "x", "max_count": 1, "command": ["FLUSHALL"]}, 400, "command"),
    ]:  # fmt: skip
        code, answer = ledger_call(ledger_url, operation, bad_token, body)
        assert (code, fragment in answer) == (status, True), (what, code, answer)
        t.refused(f"ledger service with its job's token: {what}", f"ledger service: {status}")
    anonymous = redis.Redis(host="127.0.0.1", port=redis_port)
    meta = f"troughfill:{{{t.team_a}/victim/{a_uid}}}:meta"
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.execute_command("HSET", meta, "output_url", "s3://attacker/")
    anonymous.close()
    t.refused(
        "Redis without credentials: HSET team A's meta", "Redis: NOAUTH (the default user has a password)"
    )


def setup_storage(kube: Kube, s3: S3Server, system: str, bucket: str, tmp_path: Path) -> s3fs.S3FileSystem:
    """One bucket, a prefix per team, each grant's credentials in a Secret with the operator."""
    fs = s3fs.S3FileSystem(**s3.s3_options)
    fs.mkdir(bucket)
    keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    for team in ("team-a", "team-b"):
        local = tmp_path / f"{team}.jsonl"
        write_requests(local, REQUESTS)
        fs.put(str(local), f"{bucket}/{team}/in.jsonl")
        kube.core.create_namespaced_secret(
            system, {"metadata": {"name": f"{team}-s3"}, "stringData": keys, "type": "Opaque"}
        )
    return fs


def pool_and_templates(
    suffix: str, engine_paths: tuple[str, str], bucket: str, team_a: str, team_b: str
) -> list[dict[str, Any]]:
    pool, template = engine_pool_and_template(suffix, engine_paths, f"online-{suffix}", team_a)
    pool["spec"]["gpus"] = {"count": 3}
    pool["spec"].pop("defaultQuota")
    pool["spec"]["quotas"] = [
        {
            "namespace": team,
            "maxGPUs": gpus,
            "storage": [{"prefix": f"s3://{bucket}/{prefix}/", "secretName": f"{prefix}-s3"}],
        }
        for team, prefix, gpus in ((team_a, "team-a", 2), (team_b, "team-b", 1))
    ]
    idle = json.loads(json.dumps(template))
    idle["metadata"]["name"] = f"idle-{suffix}"
    idle["spec"].update(
        gpusPerWorker=1,
        engine={"command": [sys.executable, "-c", "import time; time.sleep(600)"]},
        allowedEngineArgs=[{"name": "max-num-seqs", "type": "Integer", "minimum": 1, "maximum": 256}],
    )
    return [pool, template, idle]


@pytest.mark.timeout(900)
def test_team_b_cannot_reach_team_as_data_ledger_or_engine_and_team_a_completes(
    kube: Kube,
    crds: None,
    engine_paths: tuple[str, str],
    s3: S3Server,
    ledger_redis: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not kube.local:
        pytest.skip("worker pods run the local vLLM engine through the node agent")
    suffix = uuid.uuid4().hex[:6]
    system, team_a, team_b = f"tf-system-{suffix}", f"team-a-{suffix}", f"team-b-{suffix}"
    for name in (system, team_a, team_b):
        create_namespace(kube.api, name)
    bucket = f"tenancy-{suffix}"
    fs = setup_storage(kube, s3, system, bucket, tmp_path)
    objects = pool_and_templates(suffix, engine_paths, bucket, team_a, team_b)
    t = Tenancy(kube, team_a, team_b, bucket, objects[2]["metadata"]["name"])
    for name, value in operator_settings(ledger_redis).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TROUGHFILL_NAMESPACE", system)
    monkeypatch.setenv("TROUGHFILL_S3_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("TROUGHFILL_S3_ADDRESSING_STYLE", "path")
    args = ["run", "--standalone", "--all-namespaces", "-m", "troughfill.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        for obj in objects:
            assert kubectl_apply(kube, obj)[0] == 0
        victim = job(
            "victim",
            objects[1]["metadata"]["name"],
            f"s3://{bucket}/team-a/in.jsonl",
            f"s3://{bucket}/team-a/out/",
        )
        victim["metadata"]["namespace"] = team_a
        assert kubectl_apply(kube, victim)[0] == 0
        storage_attacks(t)
        flag_attacks(t)
        twin = json.loads(json.dumps(victim))  # team A's own second job on the same output
        twin["metadata"]["name"] = "twin"
        assert kubectl_apply(kube, twin)[0] == 0
        assert failed_with(kube, team_a, "twin")["reason"] == "OutputInUse"
        t.refused("a second live job on team A's output prefix (in team A)", "admission: `OutputInUse`")
        ledger_attacks(t, ledger_redis.port, ledger_service(ledger_redis).url)
        # Team A's job, untouched by all of it, completes.
        ended = wait_for_job(lambda: get_job(kube, team_a, "victim"), "team A's job")
        assert ended["status"]["phase"] == "completed", ended["status"]
        deleted = kubectl(kube, "delete", "batchinferences.troughfill.io", "--all", "-n", team_b, timeout=120)
        assert deleted.returncode == 0, deleted.stderr
    assert runner.exception is None
    lines = [json.loads(line) for line in fs.cat(f"{bucket}/team-a/out/output.jsonl").decode().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"ticket-{i}" for i in range(REQUESTS))
    print("\n" + t.table())
    (tmp_path.parent / "tenancy-attacks.md").write_text(t.table() + "\n")
