"""The ``--bits`` spec: ``wXaY`` (X, Y in 2..8), ``w4a16`` (INT4 weight-only), ``mp:W[xA]``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from clamp_export.errors import UserError

# how the softmax output's 2^b levels are laid out: one uniform grid, or twin-uniform (a fine grid
# below 1/8 of its range and a coarse one above; quant.math.twin_scale)
SOFTMAX_LEVELS = ("uniform", "twin")

_PATTERN = re.compile(r"^w([2-8])a([2-8]|16)$")
FLOAT_BITS = 16  # a point at 16 bits is not quantized: it stays in the graph's float type
BLOCK_SIZES = (64, 128)  # INT4 weight-only blocks TensorRT documents
_MP_PATTERN = re.compile(r"^mp:(\d+(?:\.\d+)?)(?:x(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class BitsSpec:
    """Weights of qkv/proj/fc1/fc2 at ``weight``; every activation point at ``act``.

    The patch embedding and the head keep ``edge`` bits on input and weight (DESIGN §2: both
    stay at 8 by default).
    """

    weight: int
    act: int
    edge: int = 8
    # mixed precision: per-layer bits chosen by the search under these averages (weight bits are
    # averaged over parameters, activation bits over quant points); weight/act are the start
    mp_weight: float | None = None
    mp_act: float | None = None
    # weight-only (act 16): int4 weights in blocks of this many input channels, one scale each
    block: int = 64

    @property
    def weight_only(self) -> bool:
        """w4a16: INT4 blocked weights, FP16 activations, the patch embedding and head in FP16."""
        return self.act >= FLOAT_BITS

    @property
    def mixed(self) -> bool:
        return self.mp_weight is not None

    @classmethod
    def parse(cls, text: str) -> BitsSpec:
        t = text.strip().lower()
        mp = _MP_PATTERN.match(t)
        if mp:
            w = float(mp.group(1))
            a = float(mp.group(2)) if mp.group(2) else None
            if not 2 <= w <= 8 or (a is not None and not 2 <= a <= 8):
                raise UserError(
                    f"malformed --bits {text!r}: mixed-precision averages must lie in 2..8"
                )
            return cls(weight=8, act=8, mp_weight=w, mp_act=a)
        m = _PATTERN.match(t)
        if not m:
            raise UserError(
                f"malformed --bits {text!r}: expected wXaY with X and Y from 2 to 8 (e.g. w8a8, w4a8), "
                "or mp:W / mp:WxA for mixed precision (e.g. mp:4.7, mp:4.7x6)"
            )
        weight, act = int(m.group(1)), int(m.group(2))
        if act == FLOAT_BITS and weight != 4:
            raise UserError(
                f"malformed --bits {text!r}: weight-only quantization is w4a16 (INT4 weights in "
                "blocks, FP16 activations), the weight-only format TensorRT runs natively"
            )
        if act == FLOAT_BITS:
            return cls(weight=4, act=FLOAT_BITS, edge=FLOAT_BITS)
        return cls(weight=weight, act=act)

    def with_block(self, block: int) -> BitsSpec:
        """The weight-only block size; TensorRT documents 64 and 128 only."""
        if block not in BLOCK_SIZES:
            raise UserError(
                f"--block-size {block}: TensorRT runs INT4 weight-only blocks of "
                f"{' or '.join(map(str, BLOCK_SIZES))} input channels"
            )
        return replace(self, block=block)

    def __str__(self) -> str:
        if self.mixed:
            return f"mp:{self.mp_weight:g}" + (
                f"x{self.mp_act:g}" if self.mp_act is not None else ""
            )
        return f"w{self.weight}a{self.act}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.weight_only:  # no blocks: keys of earlier recipes stay as they were
            del d["block"]
        return d
