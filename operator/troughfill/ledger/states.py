"""The job state machine: OpenAI's batch statuses and the only moves between them."""

from types import MappingProxyType

from troughfill.api.batchinference import Phase
from troughfill.errors import TroughfillError

# finalizing merges the output, then ends completed, or expired when the completion window
# ran out first; cancelling merges what was done, then ends cancelled.
TRANSITIONS: MappingProxyType[Phase, frozenset[Phase]] = MappingProxyType(
    {
        Phase.VALIDATING: frozenset({Phase.IN_PROGRESS, Phase.FAILED, Phase.CANCELLING}),
        Phase.IN_PROGRESS: frozenset({Phase.FINALIZING, Phase.FAILED, Phase.CANCELLING}),
        Phase.FINALIZING: frozenset({Phase.COMPLETED, Phase.EXPIRED, Phase.FAILED}),
        Phase.CANCELLING: frozenset({Phase.CANCELLED, Phase.FAILED}),
        Phase.COMPLETED: frozenset(),
        Phase.FAILED: frozenset(),
        Phase.EXPIRED: frozenset(),
        Phase.CANCELLED: frozenset(),
    }
)

TERMINAL: frozenset[Phase] = frozenset(state for state, moves in TRANSITIONS.items() if not moves)
# States in which results may still be committed; finalizing closes the ledger first.
ACCEPTING_RESULTS: frozenset[Phase] = frozenset({Phase.VALIDATING, Phase.IN_PROGRESS, Phase.CANCELLING})


def sources_of(target: Phase) -> frozenset[Phase]:
    """Every state from which `target` may be entered."""
    return frozenset(state for state, moves in TRANSITIONS.items() if target in moves)


class InvalidTransitionError(TroughfillError):
    def __init__(self, current: Phase | None, target: Phase) -> None:
        super().__init__(
            f"cannot move a job from {current.value if current else 'nothing'} to {target.value}"
        )
        self.current = current
        self.target = target
