"""Online demand from Prometheus, turned into the planner's OnlineSignal."""

from troughfill.signals.prometheus import PrometheusSignals, SignalReading, SignalSource

__all__ = ["PrometheusSignals", "SignalReading", "SignalSource"]
