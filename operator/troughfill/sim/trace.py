"""Online demand in GPUs, second by second, from a public load trace.

- The rate trace (ServeGen-style CSV: ts, rate_rps, active_clients, model) gives requests/s per
  10-minute window. All-zero windows are gaps in the data, not idle time: they are interpolated.
  Rates are interpolated linearly between window centres.
- Sub-window burstiness comes from a per-request trace (Azure LLM inference CSV: TIMESTAMP,
  ContextTokens, GeneratedTokens): its per-second arrival counts, smoothed over
  `burst_window_seconds`, normalised to mean 1. Each 10-minute window gets a seeded random
  10-minute slice of it, renormalised so the window's mean rate is the trace's.
- requests/s become GPUs through `per_gpu_rps` (whole GPUs, rounded up), and online serving's
  own autoscaler holds GPUs for `online_scale_down_seconds` after it needed them (the HPA's
  default 300 s scale-down stabilisation): online scales up at once and releases slowly.
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RateTrace:
    window_seconds: int
    starts: FloatArray
    """Window start times (seconds from the trace's first window)."""
    rates: FloatArray
    """Requests/s per window, gaps filled."""
    gaps: int
    """Windows that were all-zero in the data and were interpolated."""


def load_rate_trace(path: Path, model: str | None = None) -> RateTrace:
    """One model's rate series (the first model in the file when `model` is None)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows")
    chosen = model or rows[0]["model"]
    series = sorted((float(r["ts"]), float(r["rate_rps"])) for r in rows if r["model"] == chosen)
    if len(series) < 2:
        raise ValueError(f"{path}: fewer than two windows for model {chosen!r}")
    starts = np.array([s for s, _ in series])
    rates = np.array([r for _, r in series])
    window = round(float(np.median(np.diff(starts))))
    missing = rates <= 0
    if missing.all():
        raise ValueError(f"{path}: model {chosen!r} has no non-zero window")
    filled = rates.copy()
    filled[missing] = np.interp(starts[missing], starts[~missing], rates[~missing])
    return RateTrace(window_seconds=window, starts=starts - starts[0], rates=filled, gaps=int(missing.sum()))


def load_burst_profile(path: Path, smooth_seconds: int) -> FloatArray:
    """Per-second arrival rate of a per-request trace, smoothed, mean 1."""
    with path.open(newline="") as handle:
        stamps = [row["TIMESTAMP"] for row in csv.DictReader(handle)]
    if not stamps:
        raise ValueError(f"{path}: no requests")
    times = np.array([datetime.fromisoformat(s[:26]).timestamp() for s in stamps])
    seconds = (times - times.min()).astype(np.int64)
    counts = np.bincount(seconds).astype(np.float64)
    profile = moving_average(counts, max(1, smooth_seconds))
    normalised: FloatArray = profile / profile.mean()
    return normalised


def moving_average(values: FloatArray, width: int) -> FloatArray:
    """Centred moving average, same length (edges use what they have)."""
    if width <= 1:
        return values.copy()
    kernel = np.ones(width)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    result: FloatArray = sums / counts
    return result


def sliding_max(values: IntArray, width: int) -> IntArray:
    """max(values[i - width + 1 .. i]) for every i (trailing window), in O(n) (van Herk / Gil-Werman)."""
    if width <= 1:
        return values.copy()
    n = len(values)
    padded_length = -(-n // width) * width
    padded = np.full(padded_length, np.iinfo(np.int64).min, dtype=np.int64)
    padded[:n] = values
    blocks = padded.reshape(-1, width)
    prefix = np.maximum.accumulate(blocks, axis=1).ravel()
    suffix = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()
    result = np.empty(n, dtype=np.int64)
    head = min(width - 1, n)
    result[:head] = np.maximum.accumulate(values[:head])  # windows not yet full
    if n >= width:
        ends = np.arange(width - 1, n)
        result[width - 1 :] = np.maximum(suffix[ends - width + 1], prefix[ends])
    return result


@dataclass(frozen=True)
class OnlineDemand:
    """Per-second online demand over the simulated span."""

    rps: FloatArray
    gpus: IntArray
    """GPUs online serving wants to hold each second (after its own scale-down stabilisation)."""
    per_gpu_rps: float
    gaps: int


def online_demand(
    trace: RateTrace,
    burst_profile: FloatArray | None,
    *,
    per_gpu_rps: float | None,
    target_peak_gpus: float,
    days: float | None,
    seed: int,
    online_scale_down_seconds: int = 300,
    start_seconds: float = 0.0,
) -> OnlineDemand:
    """Online demand for `days` (all of the trace when None) from `start_seconds` on.

    When `per_gpu_rps` is None it is chosen so that the 99.9th percentile of demand needs
    `target_peak_gpus` GPUs (the online fleet is sized for its peaks, not its rare spikes)."""
    window = trace.window_seconds
    span = trace.starts[-1] + window - start_seconds
    total_seconds = int(min(span, days * 86_400) if days else span)
    seconds = start_seconds + np.arange(total_seconds, dtype=np.float64)
    centres = trace.starts + window / 2
    rps = np.interp(seconds, centres, trace.rates)
    if burst_profile is not None and len(burst_profile) > window:
        rng = np.random.default_rng(seed)
        factors = np.empty(total_seconds)
        first_window = int(start_seconds // window)
        offset_in_window = int(start_seconds - first_window * window)
        position = 0
        index = first_window
        while position < total_seconds:
            start = int(rng.integers(0, len(burst_profile) - window))
            piece = burst_profile[start : start + window]
            piece = piece / piece.mean()
            if index == first_window:
                piece = piece[offset_in_window:]
            take = min(len(piece), total_seconds - position)
            factors[position : position + take] = piece[:take]
            position += take
            index += 1
        rps = rps * factors
    if per_gpu_rps is None:
        per_gpu_rps = float(np.quantile(rps, 0.999)) / target_peak_gpus
    needed = np.ceil(rps / per_gpu_rps - 1e-9).astype(np.int64)
    held = sliding_max(needed, online_scale_down_seconds)
    return OnlineDemand(rps=rps, gpus=held, per_gpu_rps=per_gpu_rps, gaps=trace.gaps)


def resample_mean(values: Sequence[float] | FloatArray, every: int) -> FloatArray:
    """Means of consecutive blocks of `every` samples (for plots and compact reports)."""
    array = np.asarray(values, dtype=np.float64)
    usable = len(array) // every * every
    result: FloatArray = array[:usable].reshape(-1, every).mean(axis=1)
    return result
