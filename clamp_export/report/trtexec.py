"""GPU compute time of an engine from ``trtexec --exportTimes``, where trtexec is on PATH.

The report's own latency is host time: Polygraphy's runner, copies to and from the GPU
included. trtexec's trace separates the GPU compute of each inference (``computeMs``) from its
host-to-device and device-to-host copies, the number TensorRT's own docs compare engines by.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path


def summarize(trace: list[dict]) -> dict:
    """Median / p90 / p99 GPU compute and median latency (ms) of a trtexec times trace."""
    compute = sorted(float(t["computeMs"]) for t in trace)
    latency = [float(t["latencyMs"]) for t in trace if "latencyMs" in t]

    def q(p: float) -> float:
        return round(compute[min(len(compute) - 1, int(p * len(compute)))], 4)

    return {
        "gpu_compute_p50_ms": round(statistics.median(compute), 4),
        "gpu_compute_p90_ms": q(0.9),
        "gpu_compute_p99_ms": q(0.99),
        "latency_p50_ms": round(statistics.median(latency), 4) if latency else None,
        "inferences": len(compute),
    }


def gpu_compute(
    engine: Path, input_name: str, shape: tuple[int, ...], seconds: float
) -> dict | None:
    """trtexec's timing of ``engine`` at one input shape; None without trtexec, and the
    reason where it fails (a report must not stop on a second opinion)."""
    exe = shutil.which("trtexec")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        cmd = [
            exe,
            f"--loadEngine={engine}",
            f"--shapes={input_name}:{'x'.join(map(str, shape))}",
            f"--exportTimes={times}",
            "--warmUp=200",
            f"--duration={max(1, round(seconds))}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + seconds)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"error": f"trtexec did not finish: {e}"}
        if proc.returncode != 0 or not times.is_file():
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            return {"error": f"trtexec exited {proc.returncode}: {lines[-1] if lines else ''}"}
        return summarize(json.loads(times.read_text()))
