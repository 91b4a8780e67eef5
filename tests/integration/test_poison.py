"""A request that crashes the engine is found and dead-lettered alone (real worker processes,
real Redis, the stand-in engine told to die on one request's text, as a segfaulting engine
would): the innocent requests that were in the engine with it are charged nothing."""

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

from redis.asyncio import Redis

from tests.ledgertools import create_job, read_jsonl, request_line, standin_worker, write_input
from troughfill.api import Endpoint
from troughfill.ledger import JobKeys, JobLedger
from troughfill.results import finalize, index_input
from troughfill.storage import ObjectStore
from troughfill.worker.runner import ExitCode
from troughfill_dev.localcluster import RedisServer

POISON = "POISON-PILL"


def run_worker(redis: RedisServer, keys: JobKeys, log: Path) -> int:
    """One worker, with its own stand-in engine, until it exits: what a pod's container does
    once (the kubelet restarts it)."""
    command = standin_worker(keys, "--crash-on", POISON)
    env = {**os.environ, "TROUGHFILL_REDIS_URL": redis.url}
    with log.open("ab") as out:
        done = subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False
        )
        return done.returncode


async def test_a_request_that_kills_the_engine_twice_alone_is_dead_lettered_and_nobody_else_is_charged(
    aredis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    lines = [
        request_line(
            f"r{i}", body={"model": "m", "messages": [{"role": "user", "content": POISON if i == 5 else "q"}]}
        )
        for i in range(30)
    ]
    input_url = write_input(tmp_path / "in.jsonl", lines)
    ledger = JobLedger(aredis, JobKeys("team-a", "poison", uuid.uuid4().hex))
    await create_job(
        ledger, input_url, (tmp_path / "out").as_uri(), endpoint=Endpoint.CHAT_COMPLETIONS, max_attempts=3
    )
    await index_input(ledger, ObjectStore())

    codes = []
    for _ in range(6):  # a crash-looping pod, restarted until the job is done
        codes.append(await asyncio.to_thread(run_worker, redis_server, ledger.keys, tmp_path / "w.log"))
        if codes[-1] == ExitCode.OK:
            break
        if len(codes) == 1:  # the first crash took the poison with the others in the engine
            suspects = await aredis.llen(ledger.keys.key("suspects"))
            assert suspects > 1, (tmp_path / "w.log").read_text()
    log = (tmp_path / "w.log").read_text()
    # Three crashes: in a crowd, then alone twice; then a clean run finishes the rest.
    assert codes == [ExitCode.ENGINE_DIED] * 3 + [ExitCode.OK], log
    progress = await ledger.progress()
    assert (progress.completed, progress.failed, progress.dead) == (29, 1, 1)
    assert progress.failed_attempts == 0  # no request was charged for a crash
    await finalize(ledger, ObjectStore())
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("r5", "request_crashed_engine")]
    outputs = read_jsonl(tmp_path / "out" / "output.jsonl")
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"r{i}" for i in range(30) if i != 5)
    assert all(json.dumps(o).count("ok") >= 1 for o in outputs)
