"""Helpers for ledger tests: a controllable clock, input files, a worker that fakes an engine
(results are derived from the request; the ledger and storage underneath are real)."""

import json
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from troughfill import constants
from troughfill.api import Endpoint
from troughfill.api.batchfile import RequestLine, output_record
from troughfill.ledger import Claim, JobConfig, JobKeys, JobLedger, Outcome
from troughfill.ledger.ledger import Redis
from troughfill.ledger.port import WorkerLedger
from troughfill.ledger.service import LedgerService, Limits
from troughfill.results import ResultWriter, load_requests
from troughfill.storage import ObjectStore, RecordKind, SegmentRecord
from troughfill_dev.localcluster import free_port


@dataclass
class FakeClock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def request_line(custom_id: str, url: str = "/v1/chat/completions", **overrides: Any) -> str:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "tiny", "messages": [{"role": "user", "content": f"say {custom_id}"}]},
    }
    line.update(overrides)
    return json.dumps(line)


def write_input(path: Path, lines: Iterable[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path.as_uri()


def new_ledger(
    client: Redis, clock: FakeClock | None = None, namespace: str = "team-a", name: str = "job"
) -> JobLedger:
    keys = JobKeys(namespace, name, uuid.uuid4().hex)
    return JobLedger(client, keys, clock=clock) if clock else JobLedger(client, keys)


async def create_job(
    ledger: JobLedger,
    input_url: str,
    output_url: str,
    *,
    max_attempts: int = 3,
    lease_seconds: float = 10.0,
    endpoint: Endpoint = Endpoint.CHAT_COMPLETIONS,
) -> JobConfig:
    config = JobConfig(input_url, output_url, endpoint, max_attempts, lease_seconds)
    assert await ledger.create(config)
    return config


def tokens_for(index: int) -> int:
    return 1 + index % 5


def fake_result(ledger: WorkerLedger, index: int, request: RequestLine) -> tuple[SegmentRecord, Outcome]:
    """What an engine would answer, derived from the request so tests can check it."""
    body = {
        "object": "chat.completion",
        "echo": request.custom_id,
        "usage": {"completion_tokens": tokens_for(index)},
    }
    record = output_record(
        ledger.job_token, index, request.custom_id, status_code=200, body=body, upstream_id=f"up-{index}"
    )
    return (
        SegmentRecord(index, RecordKind.OUTPUT, record),
        Outcome(index, prompt_tokens=2, completion_tokens=tokens_for(index)),
    )


@dataclass
class FakeWorker:
    """Claims, 'generates' and commits through the real ledger and storage."""

    ledger: WorkerLedger
    store: ObjectStore
    output_url: str
    name: str
    claim: Claim | None = None
    writer: ResultWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = ResultWriter(self.ledger, self.store, self.output_url, writer=self.name)

    async def take(self, count: int) -> bool:
        idle = self.claim is None and not self.writer.records
        self.claim = await self.ledger.claim(self.name, count, idle=idle)
        return self.claim is not None

    async def work(self, count: int) -> list[int]:
        """'Generate' up to `count` results of the current claim into the buffer."""
        assert self.claim is not None
        buffered = {record.index for record in self.writer.records}
        todo = [i for i in self.claim.indices if i not in buffered][:count]
        for index, request in zip(todo, await load_requests(self.ledger, self.store, todo), strict=True):
            self.writer.add(*fake_result(self.ledger, index, request))
        return todo

    async def flush(self) -> int:
        return await self.writer.flush(self.claim.lease_id if self.claim else None)

    async def finish(self) -> None:
        """Everything left of the claim, committed, lease given back."""
        assert self.claim is not None
        await self.work(len(self.claim.indices))
        await self.flush()
        await self.ledger.release(self.name, self.claim.lease_id)
        self.claim = None

    def crash(self) -> None:
        """The process dies: buffered results and the claim are gone; the lease stays until it expires."""
        self.writer.records.clear()
        self.writer.outcomes.clear()
        self.claim = None


async def drain(
    ledger: WorkerLedger, store: ObjectStore, output_url: str, name: str = "rescuer", chunk: int = 50
) -> None:
    """A healthy worker finishing whatever is pending."""
    worker = FakeWorker(ledger, store, output_url, name)
    while await worker.take(chunk):
        await worker.finish()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def standin_worker(keys: JobKeys, *standin_args: str, concurrency: int = 8) -> list[str]:
    """The command of one burst worker (`troughfill worker run`) for the job, with its own
    stand-in engine (troughfill_dev.standin) given `standin_args`."""
    return [
        sys.executable, "-m", "troughfill.cli", "worker", "run",
        "--job", f"{keys.namespace}/{keys.name}/{keys.uid}",
        "--worker-id", "w",
        "--burst",
        "--concurrency", str(concurrency),
        "--engine-port", "auto",
        "--",
        sys.executable, "-m", "troughfill_dev.standin",
        "--port", constants.ENGINE_PORT_PLACEHOLDER,
        *standin_args,
    ]  # fmt: skip


@dataclass
class Service:
    url: str
    client: Redis
    service: LedgerService


async def serve(client: Redis, limits: Limits | None = None) -> tuple[Service, web.AppRunner]:
    """The ledger service (the real aiohttp application) on a free loopback port."""
    service = LedgerService(client, limits)
    runner = web.AppRunner(service.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Service(f"http://127.0.0.1:{port}", client, service), runner
