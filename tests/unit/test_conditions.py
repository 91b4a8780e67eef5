"""Conditions: transitions move lastTransitionTime, repeats do not (so unchanged status is not rewritten)."""

from datetime import UTC, datetime, timedelta

import pytest

from troughfill import constants
from troughfill.api.conditions import (
    Condition,
    ConditionStatus,
    JobConditionType,
    Reason,
    find_condition,
    is_true,
    set_condition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def running(
    conditions: list[Condition],
    *,
    now: datetime,
    status: ConditionStatus = ConditionStatus.TRUE,
    reason: Reason = Reason.WORKERS_READY,
    message: str = "",
) -> list[Condition]:
    return set_condition(
        conditions, JobConditionType.RUNNING, status=status, reason=reason, message=message, now=now
    )


def test_first_set_appends_with_the_current_time() -> None:
    conditions = running([], now=T0, message="2 ready")
    assert len(conditions) == 1
    assert conditions[0].last_transition_time == T0
    assert is_true(conditions, JobConditionType.RUNNING)


def test_same_status_keeps_the_transition_time_and_equal_input_gives_equal_output() -> None:
    first = running([], now=T0, message="2")
    assert running(first, now=T1, message="2") == first  # nothing to write
    reworded = running(first, now=T1, message="3")
    assert reworded[0].last_transition_time == T0
    assert reworded[0].message == "3"


def test_flip_moves_the_transition_time_and_keeps_order() -> None:
    conditions = set_condition(
        [], JobConditionType.ADMITTED, status=ConditionStatus.TRUE, reason=Reason.ADMITTED, message="", now=T0
    )
    conditions = running(conditions, now=T0)
    conditions = running(conditions, now=T1, status=ConditionStatus.FALSE, reason=Reason.ONLINE_DEMAND)
    assert [c.type for c in conditions] == ["Admitted", "Running"]
    found = find_condition(conditions, JobConditionType.RUNNING)
    assert found is not None
    assert (found.status, found.reason, found.last_transition_time) == ("False", "OnlineDemand", T1)
    assert not is_true(conditions, JobConditionType.RUNNING)


def test_condition_list_is_bounded() -> None:
    conditions = []
    for index in range(constants.MAX_CONDITIONS):
        conditions = set_condition(
            conditions,
            f"Type{index}",
            status=ConditionStatus.TRUE,
            reason=Reason.ADMITTED,
            message="",
            now=T0,
        )
    with pytest.raises(ValueError, match="more than 16 condition types"):
        set_condition(
            conditions, "OneMore", status=ConditionStatus.TRUE, reason=Reason.ADMITTED, message="", now=T0
        )


def test_reasons_are_unique_camel_case() -> None:
    values = [reason.value for reason in Reason]
    assert len(values) == len(set(values))
    assert all(value[0].isupper() and value.isalnum() for value in values)
