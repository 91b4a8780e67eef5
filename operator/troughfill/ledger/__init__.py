"""The work ledger in Redis: job state, request leases, completions, usage, partial output."""

from troughfill.ledger.contract import Heartbeat, StopMode
from troughfill.ledger.keys import JobKeys
from troughfill.ledger.ledger import (
    Claim,
    JobConfig,
    JobLedger,
    JobNotRecordedError,
    LedgerClosedError,
    LedgerCorruptError,
    Outcome,
    Partial,
    Progress,
    connect,
    id_buckets,
)
from troughfill.ledger.outputs import OutputClaims
from troughfill.ledger.states import TERMINAL, TRANSITIONS, InvalidTransitionError

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Claim",
    "Heartbeat",
    "InvalidTransitionError",
    "JobConfig",
    "JobKeys",
    "JobLedger",
    "JobNotRecordedError",
    "LedgerClosedError",
    "LedgerCorruptError",
    "Outcome",
    "OutputClaims",
    "Partial",
    "Progress",
    "StopMode",
    "connect",
    "id_buckets",
]
