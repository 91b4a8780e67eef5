"""The ledger service's wire format: one typed body per operation, with the bounds the service
enforces before anything reaches Redis. Client (ledger.remote) and server (ledger.service) both
use these models, so what a worker may send is written down once.

Every bound is the operator's, never the caller's: a worker (whatever a tenant made of it) can
name only indices below its job's total, send at most MAX_BATCH of them, claim at most MAX_CLAIM,
and send text no longer than a request's output could be.
"""

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from troughfill import constants
from troughfill.ledger.contract import Heartbeat

MAX_CLAIM = 4096
"""Most requests one claim may lease (a worker claims about its in-flight limit)."""
MAX_BATCH = 10_000
MAX_COMMIT = 100_000
"""Most outcomes one commit (one stored segment) may carry."""
"""Most indices or outcomes one call may carry."""
MAX_PARTIAL_CHARS = 1 << 20
"""Longest saved partial output (about 250k tokens of text)."""
MAX_PARTIALS_CHARS = 8 << 20
"""Most text one save of partial outputs may carry."""
MAX_TOKENS_PER_REQUEST = (1 << 32) - 1
"""Token counts of one request (the ledger packs them as 32-bit numbers)."""
MAX_WASTE_PER_CALL = 1 << 40
MAX_MESSAGE_CHARS = 2048
MAX_HEARTBEAT_TTL_SECONDS = 600.0
MAX_BODY_BYTES = 16 << 20
"""The largest request body the service reads."""

WorkerId = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", min_length=1, max_length=253)
]
"""A worker's id: its pod's name (a DNS subdomain)."""
SEGMENT_ID = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}-[0-9a-f]{16}")
SegmentId = Annotated[str, StringConstraints(pattern=f"^{SEGMENT_ID.pattern}$")]
"""What storage.segments.new_segment_id makes: a name, never a path."""
Index = Annotated[int, Field(ge=0, lt=constants.MAX_REQUESTS_PER_JOB)]
LeaseId = Annotated[int, Field(ge=1, le=(1 << 62))]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_REQUEST)]
StopHow = Literal["0", "1", "crash"]
"""How a nack counts: not at all (a shutdown), one failed attempt, or a crash (suspects)."""


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Empty(Body):
    pass


class WorkerBody(Body):
    worker: WorkerId


class ClaimBody(WorkerBody):
    max_count: int = Field(ge=1, le=MAX_CLAIM)
    idle: bool = False


class LeaseBody(WorkerBody):
    lease_id: LeaseId


class NackBody(LeaseBody):
    indices: list[Index] = Field(max_length=MAX_BATCH)
    how: StopHow


OutcomeWire = tuple[Index, bool, Tokens, Tokens, Tokens, bool]
"""One request's result as the ledger counts it: index, failed, prompt, completion and cached
tokens, resumed (an array, not an object: a commit carries many)."""


class CommitBody(Body):
    segment_id: SegmentId
    lease_id: LeaseId | None = None
    outcomes: list[OutcomeWire] = Field(max_length=MAX_COMMIT)


class PartialWire(Body):
    text: str = Field(max_length=MAX_PARTIAL_CHARS)
    tokens: Tokens
    prompt_tokens: Tokens | None = None


class SavePartialsBody(Body):
    partials: dict[Index, PartialWire] = Field(max_length=MAX_BATCH)


class IndicesBody(Body):
    indices: list[Index] = Field(max_length=MAX_BATCH)


class HeartbeatBody(WorkerBody):
    beat: Heartbeat
    ttl: float = Field(ge=1.0, le=MAX_HEARTBEAT_TTL_SECONDS)


class WasteBody(Body):
    tokens: int = Field(ge=0, le=MAX_WASTE_PER_CALL)


class InputChangedBody(Body):
    message: str = Field(max_length=MAX_MESSAGE_CHARS)


OPERATIONS: dict[str, type[Body]] = {
    "config": Empty,
    "claim": ClaimBody,
    "renew": LeaseBody,
    "release": LeaseBody,
    "nack": NackBody,
    "reap": Empty,
    "commit": CommitBody,
    "save-partials": SavePartialsBody,
    "load-partials": IndicesBody,
    "drop-partials": IndicesBody,
    "spans": IndicesBody,
    "pending": Empty,
    "progress": Empty,
    "heartbeat": HeartbeatBody,
    "last-heartbeat": WorkerBody,
    "clear-heartbeat": WorkerBody,
    "stop-mode": WorkerBody,
    "record-waste": WasteBody,
    "input-changed": InputChangedBody,
}
"""Every operation a job's worker may ask for (POST /v1/job/<operation>), and its body."""

PROGRESS_COUNTS = (
    "total", "completed", "failed", "dead", "failed_attempts", "prompt_tokens", "completion_tokens",
    "cached_tokens", "wasted_tokens", "leases", "indexed", "resumed",
)  # fmt: skip
"""What `progress` answers besides the state (a worker needs no more)."""
