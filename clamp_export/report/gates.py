"""CI gates on a report: each passes or fails with the measured value beside its limit.

A failed gate makes the command exit 1 (bad input stays 2); ``--junit`` writes the gates as JUnit
XML test cases, which CI systems display.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

from clamp_export.errors import UserError

# the float baselines: neither quantized nor meant to agree with the fake-quant model
FLOAT_BACKENDS = ("torch-fp32", "ort-fp32", "trt-fp16")


@dataclass(frozen=True)
class Gates:
    max_top1_drop: float | None = None  # points of top-1 below FP32, per quantized backend
    min_agreement: float | None = None  # top-1 agreement with the fake-quant model, in [0, 1]
    max_mean_logit_error: float | None = None  # mean |logit - fake-quant logit|
    min_speedup: float | None = None  # quantized over its float baseline, on the same runtime
    speedup_batch: int = 8

    def __post_init__(self) -> None:
        for name, value, ok in (
            ("--max-top1-drop", self.max_top1_drop, lambda v: v >= 0),
            ("--min-agreement", self.min_agreement, lambda v: 0 <= v <= 1),
            ("--max-mean-logit-error", self.max_mean_logit_error, lambda v: v >= 0),
            ("--min-speedup", self.min_speedup, lambda v: v > 0),
        ):
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise UserError(f"{name} {value} is impossible; see --help for its range")

    @classmethod
    def parse_speedup(cls, text: str | None) -> tuple[float | None, int]:
        """``R`` or ``R@BATCH`` (default batch 8)."""
        if text is None:
            return None, 8
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:@\s*(\d+))?\s*", text)
        try:
            ratio = float(m.group(1)) if m else float("nan")
        except ValueError:
            ratio = float("nan")
        if not m or not math.isfinite(ratio):
            raise UserError(f"malformed --min-speedup {text!r}: expected R or R@BATCH, e.g. 1.3@8")
        return ratio, int(m.group(2) or 8)

    def any(self) -> bool:
        return any(v is not None for k, v in asdict(self).items() if k != "speedup_batch")


@dataclass
class GateResult:
    name: str
    passed: bool
    message: str


def evaluate(gates: Gates, report: dict) -> list[GateResult]:
    out: list[GateResult] = []
    acc = report["backends"]
    fp32 = acc.get("torch-fp32", {}).get("top1")
    for name, b in acc.items():
        quantized = name not in FLOAT_BACKENDS
        if (
            gates.max_top1_drop is not None
            and quantized
            and fp32 is not None
            and b.get("top1") is not None
        ):
            drop = 100 * (fp32 - b["top1"])
            out.append(
                GateResult(
                    f"max-top1-drop[{name}]",
                    drop <= gates.max_top1_drop,
                    f"{name} top-1 {100 * b['top1']:.2f}% is {drop:.2f} pt below FP32 "
                    f"(limit {gates.max_top1_drop:g})",
                )
            )
        if name in FLOAT_BACKENDS or name == "torch-fakequant":
            continue
        if gates.min_agreement is not None:
            out.append(
                GateResult(
                    f"min-agreement[{name}]",
                    b["agreement"] >= gates.min_agreement,
                    f"{name} agrees with fake-quant on {100 * b['agreement']:.2f}% "
                    f"(limit {100 * gates.min_agreement:.2f}%)",
                )
            )
        if gates.max_mean_logit_error is not None:
            err = b["logit_error"]["mean_abs"]
            out.append(
                GateResult(
                    f"max-mean-logit-error[{name}]",
                    err <= gates.max_mean_logit_error,
                    f"{name} mean |logit error| {err:.4g} (limit {gates.max_mean_logit_error:g})",
                )
            )
    if gates.min_speedup is not None:
        at = report.get("latency", {}).get(str(gates.speedup_batch))
        if at is None:
            raise UserError(
                f"--min-speedup at batch {gates.speedup_batch}, but the latency sweep did not time "
                "that batch; add it to --batch"
            )
        for name, lat in at.items():
            # a deployed backend against its runtime's float graph; fake-quant is slow by design
            if "speedup" in lat and not name.startswith("torch-"):
                r = lat["speedup"]["ratio"]
                out.append(
                    GateResult(
                        f"min-speedup[{name}@{gates.speedup_batch}]",
                        r >= gates.min_speedup,
                        f"{name} runs {r:.2f}x its baseline {lat['speedup']['over']} at batch "
                        f"{gates.speedup_batch} (limit {gates.min_speedup:g}x)",
                    )
                )
    return out


def junit_xml(results: list[GateResult], suite: str) -> str:
    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(sum(not r.passed for r in results)),
    )
    for r in results:
        case = ET.SubElement(root, "testcase", classname=suite, name=r.name)
        if not r.passed:
            ET.SubElement(case, "failure", message=r.message).text = r.message
        else:
            ET.SubElement(case, "system-out").text = r.message
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
