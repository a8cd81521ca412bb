"""Latency of several backends, measured interleaved so that their ratios hold on a shared machine.

trtexec's conventions: warm-up first, then timed runs until both a minimum count and a minimum
duration are reached; p50 / p90 / p99, mean, min, and throughput in images/s. Every round times
each backend once, in a rotating order, so load that comes and goes hits all of them alike; a
quantized backend's speed-up is the median over rounds of its float baseline's time over its own
(a paired ratio, not a ratio of two medians taken at different moments).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from clamp_export.runtime.backends import Backend


@dataclass(frozen=True)
class Timing:
    warmup: int = 3
    min_runs: int = 20
    min_seconds: float = 1.0  # per batch size, all backends together
    max_seconds: float = 30.0


@dataclass
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q * (len(sorted_ms) - 1)))]


def summarize(ms: list[float], batch: int) -> Latency:
    s = sorted(ms)
    return Latency(
        p50_ms=statistics.median(s),
        p90_ms=_percentile(s, 0.90),
        p99_ms=_percentile(s, 0.99),
        mean_ms=statistics.fmean(s),
        min_ms=s[0],
        runs=len(s),
        images_per_s=1000.0 * batch / statistics.median(s),
    )


def time_interleaved(
    backends: dict[str, Backend], batch: int, x: torch.Tensor, timing: Timing = Timing()
) -> dict[str, dict]:
    """{backend: latency dict (+ "speedup" over its baseline when that ran too)} at ``batch``."""
    names = list(backends)
    for name in names:
        for _ in range(timing.warmup):
            backends[name].run_batch(x)
    times: dict[str, list[float]] = {n: [] for n in names}
    start, rounds = time.perf_counter(), 0
    while True:
        order = names[rounds % len(names) :] + names[: rounds % len(names)]
        for name in order:
            t = time.perf_counter()
            backends[name].run_batch(x)
            times[name].append((time.perf_counter() - t) * 1000)
        rounds += 1
        elapsed = time.perf_counter() - start
        if (
            rounds >= timing.min_runs and elapsed >= timing.min_seconds
        ) or elapsed >= timing.max_seconds:
            break
    out = {n: summarize(times[n], batch).to_dict() for n in names}
    for name in names:
        base = backends[name].baseline
        if base in times:
            ratios = [b / q for b, q in zip(times[base], times[name], strict=True)]
            out[name]["speedup"] = {"over": base, "ratio": statistics.median(ratios)}
    return out
