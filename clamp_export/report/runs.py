"""The summary of several runs (``clamp-export run a.yaml b.yaml``): one row per pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clamp_export.errors import UserError
from clamp_export.report.stage import DEPLOYED, REPORT_HTML, pct


@dataclass
class Outcome:
    name: str
    out: str
    seconds: float
    report: dict | None = None
    error: str | None = None  # the one line of a pipeline that stopped on bad input

    @classmethod
    def of(cls, name: str, out: str, run: Callable[[], dict], log) -> Outcome:
        """Runs one pipeline; bad input stops it, not the pipelines after it."""
        t0 = time.time()
        try:
            report = run()
        except UserError as e:
            message = " ".join(str(e).split())
            log(f"clamp-export: error: {name}: {message}")
            return cls(name, out, time.time() - t0, error=message)
        return cls(name, out, time.time() - t0, report=report)

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in (self.report or {}).get("gates", []) if not g["passed"]]

    @property
    def exit_code(self) -> int:
        return 2 if self.error else 1 if self.failed_gates else 0


def _row(o: Outcome) -> tuple[str, ...]:
    if o.report is None:
        return (o.name, "-", "-", "-", "-", "ERROR", f"{o.seconds:.0f}", o.error or "")
    r = o.report
    acc = r["backends"]
    deployed = next((acc[n] for n in DEPLOYED if n in acc), None)
    fp32 = acc.get("torch-fp32", {}).get("top1")
    gates = r["gates"]
    verdict = "no gates" if not gates else "FAIL" if o.failed_gates else "pass"
    verdict += f" {len(gates) - len(o.failed_gates)}/{len(gates)}" if gates else ""
    return (
        o.name,
        f"{r['bits']} → {r['target']}",
        pct(fp32),
        pct(deployed and deployed["top1"]),
        pct(deployed and deployed["agreement"]),
        verdict,
        f"{o.seconds:.0f}",
        str(Path(o.out) / REPORT_HTML),
    )


def summary(outcomes: list[Outcome]) -> str:
    """A plain table: the pipeline, FP32 and deployed top-1, agreement, gates, time, report."""
    rows = [("pipeline", "bits", "FP32", "deployed", "agree", "gates", "s", "report")]
    rows += [_row(o) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
