"""troughfill's own errors: one base, so a caller can tell ours from a library's.

The specific errors live beside the code that raises them and derive from TroughfillError:
ledger.JobNotRecordedError, ledger.InvalidTransitionError, ledger.LedgerClosedError,
worker.engine.EngineDeadError and EngineHttpError, kube.peering.PeeringUnavailableError.
"""


class TroughfillError(Exception):
    """Base of every error troughfill raises on purpose."""
