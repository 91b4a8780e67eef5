"""Trace-driven simulator: online demand from public traces, the real planner, and the baselines."""

from troughfill.sim.scenario import Scenario, plot, run

__all__ = ["Scenario", "plot", "run"]
