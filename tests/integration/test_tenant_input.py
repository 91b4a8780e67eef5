"""What a tenant's input can make the operator hold while indexing it (real redis-server and the
operator's indexing path): the raw bytes of one batch and one parsed line at a time, however the
lines are built."""

import json
import tracemalloc
import uuid
from pathlib import Path

from redis.asyncio import Redis

from tests.ledgertools import create_job, request_line, write_input
from troughfill.api.batchfile import MAX_JSON_CONTAINERS
from troughfill.ledger import JobKeys, JobLedger
from troughfill.results import index_input
from troughfill.storage import ObjectStore


async def test_lines_of_millions_of_tiny_objects_are_refused_unparsed(aredis: Redis, tmp_path: Path) -> None:
    """Three lines just under 4 MiB of `[{},{},...]` (about 1.3M objects each): indexing kept
    every parsed body of a batch, +343 MiB for such a job. Now each is an error line, found
    before parsing, and the valid lines around them are indexed as ever."""
    flood = json.dumps({"custom_id": "flood", "method": "POST", "url": "/v1/chat/completions"})[:-1]
    lines = [request_line("r0")]
    for k in range(3):
        lines.append(flood.replace("flood", f"flood-{k}") + ', "body": [' + "{}," * 1_300_000 + "{}]}")
        lines.append(request_line(f"r{k + 1}"))
    input_url = write_input(tmp_path / "in.jsonl", lines)
    ledger = JobLedger(aredis, JobKeys("team-b", "flood", uuid.uuid4().hex))
    await create_job(ledger, input_url, (tmp_path / "out").as_uri())
    tracemalloc.start()
    try:
        report = await index_input(ledger, ObjectStore())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.total, report.invalid) == (7, 3)
    assert peak < 48 << 20, f"indexing held {peak >> 20} MiB"  # about three raw lines' worth
    (segment,) = (tmp_path / "out").rglob("*.jsonl")  # the error lines, stored as a segment
    errors = [json.loads(line.split("\t", 2)[2]) for line in segment.read_text().splitlines()]
    assert {e["error"]["code"] for e in errors} == {"invalid_request"}
    assert all(f"over the {MAX_JSON_CONTAINERS} allowed" in e["error"]["message"] for e in errors)
    assert {e["error"]["line"] for e in errors} == {2, 4, 6}
