"""Pure planning: which batch workers should run, given capacity, online demand and the jobs.

No I/O and no clock: the operator and the simulator pass snapshots in and carry the memory.
"""

from troughfill.planner.coldstart import ColdStarts
from troughfill.planner.forecast import seasonal_forecast
from troughfill.planner.model import (
    Forecast,
    JobPlan,
    JobState,
    Limit,
    OnlineSignal,
    Plan,
    PlannerMemory,
    PoolPolicy,
    Quota,
    SignalState,
    Snapshot,
    Stop,
    StopMode,
    WorkerState,
)
from troughfill.planner.plan import plan

__all__ = [
    "ColdStarts",
    "Forecast",
    "JobPlan",
    "JobState",
    "Limit",
    "OnlineSignal",
    "Plan",
    "PlannerMemory",
    "PoolPolicy",
    "Quota",
    "SignalState",
    "Snapshot",
    "Stop",
    "StopMode",
    "WorkerState",
    "plan",
    "seasonal_forecast",
]
