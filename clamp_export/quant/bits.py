"""The ``--bits`` spec: ``wXaY`` (X, Y in 2..8)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from clamp_export.errors import UserError

_PATTERN = re.compile(r"^w([2-8])a([2-8])$")


@dataclass(frozen=True)
class BitsSpec:
    """Weights of qkv/proj/fc1/fc2 at ``weight``; every activation point at ``act``.

    The patch embedding and the head keep ``edge`` bits on input and weight (DESIGN §2: both
    stay at 8 by default).
    """

    weight: int
    act: int
    edge: int = 8

    @classmethod
    def parse(cls, text: str) -> BitsSpec:
        m = _PATTERN.match(text.strip().lower())
        if not m:
            raise UserError(
                f"malformed --bits {text!r}: expected wXaY with X and Y from 2 to 8, e.g. w8a8 or w4a8"
            )
        return cls(weight=int(m.group(1)), act=int(m.group(2)))

    def __str__(self) -> str:
        return f"w{self.weight}a{self.act}"

    def to_dict(self) -> dict:
        return asdict(self)
