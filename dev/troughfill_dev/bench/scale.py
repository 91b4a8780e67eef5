"""A million-request job end to end on the local cluster, against a stand-in engine.

    python -m troughfill_dev.bench.scale [--requests 1000000] [--workers 4] [--max-tokens 4]

Starts Redis (AOF on, as deployed), Prometheus (an online-GPUs gauge this script serves, at
0: the whole pool is a trough), the local control plane with one node of `--workers` GPUs, and
`troughfill operator`. Then, as a user does, applies a pool, a template and one BatchInference
of `--requests` chat requests; the operator indexes the input, starts one worker pod per GPU,
the workers claim, call, store and commit, and the operator merges. The engine in each worker
pod is the *stand-in* (troughfill_dev.standin): it answers without a model, so what is
measured is troughfill's pipeline (operator, ledger, workers, storage, merge), not a model.

Measured: requests/s end to end (BatchInference created -> Completed) and while working
(InProgress -> Finalizing); indexing and finalize time (the ledger's own state times); peak RSS
(VmHWM) of the operator and of each worker process; Redis `used_memory` per request at its peak
and after finalize (the job's keys stay until the retention expires them), and what the job's
own keys take after finalize (MEMORY USAGE, without Redis's fixed costs); and exactly once:
every custom_id in output.jsonl once, errors.jsonl empty. Prints one JSON object.

Needs scripts/setup.sh and scripts/setup_k8s.sh sourced. Every process of the run (control
plane, node agent, pods, engines, Redis, operator) shares this host's CPUs: `cpus` in the
output says how many there were.
"""

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from kubernetes import client

from troughfill import constants
from troughfill.ledger import JobKeys
from troughfill_dev.bench import online_gpus_gauge, run_in_scratch
from troughfill_dev.localcluster import start_prometheus, start_redis
from troughfill_dev.localcluster.services import wait_until
from troughfill_dev.localcluster.stack import start_local_cluster, start_operator

GOALS = {"requests_per_s": 20_000, "operator_peak_rss_mb": 300, "redis_bytes_per_request_after_finalize": 40}
NAMESPACE = "default"
JOB = "million"


def write_input(path: Path, count: int, max_tokens: int) -> int:
    """`count` chat requests (about 150 bytes each); the file's size."""
    with path.open("w") as out:
        for i in range(count):
            message = f'{{"role":"user","content":"classify ticket {i}"}}'
            body = f'{{"model":"m","messages":[{message}],"max_tokens":{max_tokens}}}'
            out.write(
                f'{{"custom_id":"req-{i}","method":"POST","url":"/v1/chat/completions","body":{body}}}\n'
            )
    return path.stat().st_size


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pids(job_uid: str) -> list[int]:
    """This job's `troughfill worker run` processes (pods run as local processes here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in argv and b"run" in argv and any(job_uid.encode() in part for part in argv):
            found.append(int(entry.name))
    return found


@dataclass
class Watcher:
    """Samples peak RSS of the job's worker processes every second while they live."""

    job_uid: str = ""
    peaks: dict[int, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            if not self.job_uid:
                continue
            for pid in worker_pids(self.job_uid):
                rss = peak_rss_mb(pid)
                if rss is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), rss)


def manifests(
    workdir: Path, prometheus_url: str, workers: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A pool of the node's GPUs (all trough), the stand-in's template, and the job."""
    root = workdir.resolve().as_uri()
    kind = {"apiVersion": constants.GROUP_VERSION}
    pool = {
        **kind, "kind": "BatchPool", "metadata": {"name": "scale"},
        "spec": {
            "gpus": {"nodeSelector": {"troughfill.dev/node-agent": "true"}},
            "online": {"prometheusURL": prometheus_url, "gpusInUseQuery": "sum(online_gpus)"},
            "headroomGPUs": 0, "scaleUpDelay": "0s", "minUsefulTime": "0s",
            "defaultQuota": {"maxGPUs": workers, "storage": [{"prefix": f"{root}/"}]},
        },
    }  # fmt: skip
    template = {
        **kind, "kind": "ModelTemplate", "metadata": {"name": "standin"},
        "spec": {
            "poolRef": "scale", "image": "troughfill/standin:bench",
            "model": {"uri": "/models/none", "servedModelName": "standin"},
            "gpusPerWorker": 1, "coldStartSeconds": 5,
            "engine": {"command": [sys.executable, "-m", "troughfill_dev.standin"]},
        },
    }  # fmt: skip
    job = {
        **kind, "kind": "BatchInference", "metadata": {"name": JOB, "namespace": NAMESPACE},
        "spec": {
            "inputURL": (workdir / "requests.jsonl").resolve().as_uri(),
            "outputURL": f"{root}/out/", "templateRef": "standin", "maxWorkers": workers,
        },
    }  # fmt: skip
    return [pool, template], job


def run(workdir: Path, requests: int, workers: int, max_tokens: int) -> dict[str, Any]:
    processes: list[Any] = []
    watcher = Watcher()
    sampler = threading.Thread(target=watcher.run, daemon=True)
    try:
        _, exporter = online_gpus_gauge()
        store = start_redis(workdir / "redis", appendonly=True)
        processes.append(store)
        prometheus = start_prometheus(workdir / "prometheus", [exporter], "1s")
        processes.append(prometheus)
        cluster = start_local_cluster(workdir / "cluster", nodes=1, gpus=workers)
        processes.append(cluster)
        operator = start_operator(
            workdir / "operator", cluster, redis_url=store.url, prometheus_url=prometheus.url, interval=1.0
        )
        processes.append(operator)
        written = time.monotonic()
        size = write_input(workdir / "requests.jsonl", requests, max_tokens)
        write_seconds = time.monotonic() - written
        ledger = redis.Redis.from_url(store.url)
        baseline = int(ledger.info("memory")["used_memory"])
        pool_and_template, job = manifests(workdir, prometheus.url, workers)
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(pool_and_template))
        sampler.start()
        created = time.monotonic()
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
        custom = client.CustomObjectsApi(cluster.api)
        uid = custom.get_namespaced_custom_object(
            constants.API_GROUP, constants.API_VERSION, NAMESPACE, "batchinferences", JOB
        )["metadata"]["uid"]
        watcher.job_uid = uid
        redis_peak = 0

        def ended() -> bool:
            nonlocal redis_peak
            redis_peak = max(redis_peak, int(ledger.info("memory")["used_memory"]))
            obj = custom.get_namespaced_custom_object(
                constants.API_GROUP, constants.API_VERSION, NAMESPACE, "batchinferences", JOB
            )
            return obj.get("status", {}).get("phase") in {"completed", "failed", "expired", "cancelled"}

        wait_until(ended, 6 * 3600, "the job ending", interval=1.0)
        end_to_end = time.monotonic() - created
        status = custom.get_namespaced_custom_object(
            constants.API_GROUP, constants.API_VERSION, NAMESPACE, "batchinferences", JOB
        )["status"]
        if status["phase"] != "completed":
            raise RuntimeError(f"job ended {status['phase']}: {status.get('conditions')}")
        times = state_times(ledger, JobKeys(NAMESPACE, JOB, uid))
        after = int(ledger.info("memory")["used_memory"])
        job_keys = job_key_bytes(ledger, JobKeys(NAMESPACE, JOB, uid))
        operator_rss = peak_rss_mb(operator.process.pid)
        verified = verify(workdir / "out", requests)
        watcher.stop.set()
        return {
            "what": "one BatchInference end to end on the local cluster; the engine is a stand-in (no model)",
            "requests": requests,
            "workers": workers,
            "cpus": os.cpu_count(),
            "input_mb": round(size / 1e6, 1),
            "requests_per_s": {
                "end_to_end": round(requests / end_to_end),
                "working": round(requests / (times["finalizing"] - times["in_progress"])),
            },
            "seconds": {
                "write_input": round(write_seconds, 1),
                "end_to_end": round(end_to_end, 1),
                "index": round(times["in_progress"] - times["validating"], 1),
                "work": round(times["finalizing"] - times["in_progress"], 1),
                "finalize": round(times["completed"] - times["finalizing"], 1),
            },
            "peak_rss_mb": {
                "operator": round(operator_rss or 0.0, 1),
                "workers": sorted(round(v, 1) for v in watcher.peaks.values()),
            },
            "redis_bytes_per_request": {
                "peak": round((redis_peak - baseline) / requests, 1),
                "after_finalize": round((after - baseline) / requests, 1),
                "job_keys_after_finalize": round(job_keys / requests, 1),
            },
            "exactly_once": verified,
            "status_counts": status.get("requestCounts"),
            "goals": GOALS,
        }
    finally:
        watcher.stop.set()
        for process in reversed(processes):
            process.stop()


def state_times(ledger: Any, keys: JobKeys) -> dict[str, float]:
    """When the job entered each state, by the ledger's (Redis's) clock."""
    times: dict[str, float] = {}
    for k, v in ledger.hgetall(keys.key("meta")).items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        if name.startswith("at:"):
            times[name[3:]] = float(v)
    return times


def job_key_bytes(ledger: Any, keys: JobKeys) -> int:
    """What the job's own keys take (MEMORY USAGE, exact), without Redis's fixed costs."""
    pattern = keys.prefix.replace("[", "\\[").replace("]", "\\]") + "*"
    return sum(
        int(ledger.memory_usage(key, samples=0) or 0) for key in ledger.scan_iter(match=pattern, count=1000)
    )


def verify(out: Path, requests: int) -> bool:
    """Every custom_id once in output.jsonl, nothing in errors.jsonl (a bitmap, not a set)."""
    seen = bytearray(requests)
    with (out / "output.jsonl").open("rb") as lines:
        for line in lines:
            record = json.loads(line)
            index = int(record["custom_id"].removeprefix("req-"))
            if seen[index]:
                raise AssertionError(f"{record['custom_id']} twice in the output")
            if record["response"]["status_code"] != 200:
                raise AssertionError(f"{record['custom_id']}: {record['response']}")
            seen[index] = 1
    if (out / "errors.jsonl").stat().st_size:
        raise AssertionError("errors.jsonl is not empty")
    missing = requests - sum(seen)
    if missing:
        raise AssertionError(f"{missing} custom_ids missing from the output")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    run_in_scratch(
        "troughfill-scale-", lambda scratch: run(scratch, args.requests, args.workers, args.max_tokens)
    )


if __name__ == "__main__":
    main()
