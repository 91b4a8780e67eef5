"""A chaos soak: jobs on real vLLM workers while their world is killed around them.

    python -m troughfill_dev.bench.chaos [--minutes 30] [--seed 1] [--gap 20] [--requests 400]
                                         [--store-outage 60]

Starts Redis (AOF, fsync every second, as deployed), Prometheus (an online-GPUs gauge this
script serves), an S3-protocol server (moto, a process of its own) holding the jobs' inputs and
outputs behind a storage grant, the local control plane with one node of 2 GPUs and
`troughfill operator`, a pool of those GPUs and a template whose workers run vLLM (the tiny
test model, one GPU each).
Then, until `--minutes` have passed, it keeps one BatchInference of `--requests` chat requests
running (the next is created when one completes) and, every `--gap` seconds on average
(seeded), does one of:

- `worker`: SIGKILL a worker process (its pod fails; the operator replaces it);
- `operator`: SIGKILL the operator, start it again 1-5 s later;
- `redis`: SIGKILL redis-server, start it again on its AOF 1-5 s later;
- `prometheus`: SIGKILL Prometheus, start it again 1-5 s later;
- `apiserver`: SIGKILL kube-apiserver, start it again 1-5 s later;
- `signal`: online traffic takes both GPUs for 5-15 s (the workers yield), then leaves;
- `store`: the S3 server frozen (SIGSTOP: connections hang, as with a partitioned store) for
  `--store-outage` seconds, then thawed.

Actions come in rounds, every kind once per round in a seeded order, so a short run meets each.
At the end (the last job finished, no more chaos) every job is checked: every custom_id in its
output or error file exactly once, and the error file empty (the inputs are valid: any error
line would be one the chaos caused). Prints one JSON object: actions survived, jobs and
requests completed, wall time, tokens generated and wasted, failed attempts. Needs
scripts/setup.sh, setup_vllm.sh and setup_k8s.sh sourced.
"""

import argparse
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import s3fs
import yaml
from kubernetes import client

from troughfill import constants
from troughfill_dev.bench import online_gpus_gauge, run_in_scratch
from troughfill_dev.bench.scale import worker_pids
from troughfill_dev.localcluster import start_ledger, start_prometheus, start_redis, start_s3
from troughfill_dev.localcluster.services import VLLM_ENV, ManagedProcess, wait_until
from troughfill_dev.localcluster.stack import create_namespace, start_local_cluster, start_operator

ACTIONS = ("worker", "operator", "ledger", "redis", "prometheus", "apiserver", "signal", "store")
BUCKET = "soak"
GRANT_SECRET = "soak-s3-default"
"""The jobs' namespace's Secret of the pool's default grant (soak-s3-{namespace})."""
GPUS = 2
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def request_lines(job: str, count: int) -> str:
    lines = []
    for i in range(count):
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": f"write about ticket {i} of {job}"}],
            # 256 tokens and up: streamed and checkpointed (the worker's resume threshold), so a
            # request caught mid-generation is resumed and what it loses is counted as wasted.
            "max_tokens": 256 + (i * 37) % 128,
            "ignore_eos": True,
        }
        lines.append(
            json.dumps(
                {"custom_id": f"{job}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            )
        )
    return "\n".join(lines) + "\n"


class Soak:
    def __init__(self, workdir: Path, seed: int, requests: int, store_outage: float = 60.0) -> None:
        self.workdir = workdir
        self.store_outage = store_outage
        self.rng = random.Random(seed)
        self.requests = requests
        self.processes: list[Any] = []
        self.actions: Counter[str] = Counter()
        self.jobs: list[str] = []
        self.events: list[str] = []

    # --- the stack ---------------------------------------------------------------------------

    def start(self) -> None:
        python, model = os.environ.get("TROUGHFILL_VLLM_PYTHON"), os.environ.get("TROUGHFILL_TINY_MODEL")
        if not python or not model:
            raise SystemExit("source scripts/setup.sh, scripts/setup_vllm.sh and scripts/setup_k8s.sh first")
        self.online, exporter = online_gpus_gauge()
        self.redis = start_redis(self.workdir / "redis", appendonly=True)
        self.prometheus = start_prometheus(self.workdir / "prometheus", [exporter], "1s")
        self.s3 = start_s3(self.workdir / "s3")
        self.fs = s3fs.S3FileSystem(**self.s3.s3_options, use_listings_cache=False)
        self.fs.mkdir(BUCKET)
        self.cluster = start_local_cluster(self.workdir / "cluster", nodes=1, gpus=GPUS)
        self.custom = client.CustomObjectsApi(self.cluster.api)
        # The grant's credentials, in a Secret beside the operator, as an admin provides them.
        create_namespace(self.cluster.api, constants.OPERATOR_NAMESPACE)
        self.cluster.core.create_namespaced_secret(
            constants.OPERATOR_NAMESPACE,
            {
                "metadata": {"name": GRANT_SECRET},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": self.s3.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
                },
            },
        )
        self.ledger = start_ledger(self.workdir / "ledger", self.redis.url)
        self.operator = self._start_operator()
        kind = {"apiVersion": constants.GROUP_VERSION}
        pool = {
            **kind, "kind": "BatchPool", "metadata": {"name": "soak"},
            "spec": {
                "gpus": {"nodeSelector": {"troughfill.dev/node-agent": "true"}},
                "online": {"prometheusURL": self.prometheus.url, "gpusInUseQuery": "sum(online_gpus)"},
                "headroomGPUs": 0, "scaleUpDelay": "0s", "minUsefulTime": "0s", "drainGracePeriod": "5s",
                "signal": {"maxStaleness": "30s"},
                "defaultQuota": {
                    "maxGPUs": GPUS,
                    "storage": [{"prefix": f"s3://{BUCKET}/", "secretName": "soak-s3-{namespace}"}],
                },
            },
        }  # fmt: skip
        template = {
            **kind, "kind": "ModelTemplate", "metadata": {"name": "tiny"},
            "spec": {
                "poolRef": "soak", "image": "troughfill/vllm-cpu:soak",
                "model": {"uri": model, "servedModelName": "tiny"},
                "gpusPerWorker": 1, "coldStartSeconds": 60,
                "engine": {
                    "command": [python, "-m", "vllm.entrypoints.openai.api_server"],
                    "args": ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "16"],
                    "env": [{"name": k, "value": v} for k, v in VLLM_ENV.items()],
                },
            },
        }  # fmt: skip
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([pool, template]))

    def _start_operator(self) -> ManagedProcess:
        return start_operator(
            self.workdir / "operator",
            self.cluster,
            redis_url=self.redis.url,
            prometheus_url=self.prometheus.url,
            interval=1.0,
            extra_env={"TROUGHFILL_S3_ENDPOINT_URL": self.s3.url},
            ledger=self.ledger,
        )

    def stop(self) -> None:
        for name in ("operator", "ledger", "cluster", "prometheus", "redis", "s3"):
            process = getattr(self, name, None)
            if process is not None:
                process.stop()

    # --- jobs --------------------------------------------------------------------------------

    def submit(self) -> str:
        name = f"soak-{len(self.jobs):03d}"
        self.fs.pipe(f"{BUCKET}/inputs/{name}.jsonl", request_lines(name, self.requests).encode())
        job = {
            "apiVersion": constants.GROUP_VERSION, "kind": "BatchInference",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"inputURL": f"s3://{BUCKET}/inputs/{name}.jsonl",
                     "outputURL": f"s3://{self._out(name)}/", "templateRef": "tiny"},
        }  # fmt: skip
        self._api(lambda: self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job)))
        self.jobs.append(name)
        return name

    def status(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self._api(
            lambda: self.custom.get_namespaced_custom_object(
                constants.API_GROUP, constants.API_VERSION, "default", "batchinferences", name
            )
        )
        return found.get("status") or {}

    def _api(self, call: Any) -> Any:
        """An API call that waits out an API server the chaos has just killed."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return call()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def keep_a_job_running(self, current: str | None) -> str:
        if current is None:
            return self.submit()
        phase = self.status(current).get("phase")
        if phase in TERMINAL:
            if phase != "completed":
                raise RuntimeError(f"{current} ended {phase}: {self.status(current).get('conditions')}")
            self.events.append(f"{time.strftime('%H:%M:%S')} {current} completed")
            return self.submit()
        return current

    # --- chaos -------------------------------------------------------------------------------

    def act(self, action: str) -> None:
        down = self.rng.uniform(1, 5)
        if action == "worker":
            pids = [pid for job in self.jobs for pid in worker_pids(self._uid(job))]
            if not pids:
                return
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        elif action == "operator":
            self.operator.kill()
            time.sleep(down)
            self.operator = self._start_operator()
        elif action == "ledger":
            self.ledger.managed.kill()
            time.sleep(down)
            self.ledger.restart()
        elif action == "redis":
            self.redis.managed.kill()
            time.sleep(down)
            self.redis.restart()
        elif action == "prometheus":
            self.prometheus.managed.kill()
            time.sleep(down)
            self.prometheus.restart()
        elif action == "apiserver":
            self.cluster.plane.restart_apiserver(down_seconds=down)
        elif action == "signal":
            self.online.set(GPUS)
            time.sleep(self.rng.uniform(5, 15))
            self.online.set(0)
        elif action == "store":
            self.s3.freeze()
            time.sleep(self.store_outage)
            self.s3.thaw()
        self.actions[action] += 1
        self.events.append(f"{time.strftime('%H:%M:%S')} {action}")

    def _uid(self, job: str) -> str:
        found = self._api(
            lambda: self.custom.get_namespaced_custom_object(
                constants.API_GROUP, constants.API_VERSION, "default", "batchinferences", job
            )
        )
        return str(found["metadata"]["uid"])

    def run(self, minutes: float, gap: float) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + minutes * 60
        current: str | None = None
        plan: list[str] = []
        next_action = started + self.rng.uniform(0.5, 1.5) * gap
        while time.monotonic() < deadline:
            current = self.keep_a_job_running(current)
            if time.monotonic() >= next_action:
                if not plan:
                    plan = self.rng.sample(ACTIONS, len(ACTIONS))
                self.act(plan.pop())
                next_action = time.monotonic() + self.rng.uniform(0.5, 1.5) * gap
            time.sleep(1)
        chaos_seconds = time.monotonic() - started
        # No more chaos: the job running now finishes, then everything is checked.
        assert current is not None
        wait_until(
            lambda: self.status(current).get("phase") in TERMINAL, 1800, f"{current} ending", interval=2
        )
        self.keep_a_job_running(current)  # raises if it did not complete
        self.jobs.pop()  # the job it just submitted is not part of the run
        return self.report(chaos_seconds, time.monotonic() - started)

    def report(self, chaos_seconds: float, wall_seconds: float) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        problems: list[str] = []
        for name in self.jobs:
            status = self.status(name)
            if status.get("phase") != "completed":
                problems.append(f"{name} ended {status.get('phase')}")
                continue
            outputs = self._custom_ids(f"{self._out(name)}/output.jsonl")
            errors = self._custom_ids(f"{self._out(name)}/errors.jsonl")
            expected = {f"{name}-{i}" for i in range(self.requests)}
            both = outputs + errors
            if len(both) != len(set(both)) or set(both) != expected:
                problems.append(f"{name}: {len(both)} lines for {len(expected)} requests, or ids that differ")
            totals["error_lines"] += len(errors)
            totals["jobs"] += 1
            totals["requests"] += len(outputs)
            totals["completion_tokens"] += status["tokens"]["completion"]
            totals["wasted_tokens"] += status["tokens"]["wasted"]
            totals["resumed"] += status["requestCounts"]["resumed"]
        return {
            "what": "jobs on real vLLM workers while workers, operator, Redis, Prometheus, API server die",
            "chaos_minutes": round(chaos_seconds / 60, 1),
            "wall_minutes": round(wall_seconds / 60, 1),
            "actions_survived": dict(self.actions),
            "jobs_completed": totals["jobs"],
            "requests": totals["requests"],
            "exactly_once": not problems,
            "problems": problems,
            "error_lines": totals["error_lines"],
            "completion_tokens": totals["completion_tokens"],
            "wasted_tokens": totals["wasted_tokens"],
            "wasted_share": round(totals["wasted_tokens"] / max(1, totals["completion_tokens"]), 4),
            "requests_resumed_from_a_checkpoint": totals["resumed"],
            "timeline": self.events,
        }

    @staticmethod
    def _out(job: str) -> str:
        return f"{BUCKET}/out/{job}"

    def _custom_ids(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        text = self.fs.cat_file(path).decode()
        return [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]


def run(
    workdir: Path, minutes: float, seed: int, gap: float, requests: int, *, store_outage: float = 60.0
) -> dict[str, Any]:
    soak = Soak(workdir, seed, requests, store_outage)
    try:
        soak.start()
        return soak.run(minutes, gap)
    finally:
        soak.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gap", type=float, default=20.0, help="mean seconds between actions")
    parser.add_argument("--requests", type=int, default=400, help="requests per job")
    parser.add_argument("--store-outage", type=float, default=60.0, help="seconds the S3 server is frozen")
    args = parser.parse_args()
    run_in_scratch(
        "troughfill-chaos-",
        lambda scratch: run(
            scratch, args.minutes, args.seed, args.gap, args.requests, store_outage=args.store_outage
        ),
    )


if __name__ == "__main__":
    main()
