"""Target profiles (DESIGN §3): the numerics each deployment target actually runs.

Calibration and search run under the profile, so the fake-quant model computes what the engine
computes, and ``QParams.validate`` refuses parameters the target cannot execute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clamp_export.errors import UserError


@dataclass(frozen=True)
class TargetProfile:
    name: str
    act_signed: bool  # int8 (True) or uint8 (False) container for activations
    act_symmetric: bool  # zero-point pinned at 0
    # Below 8 bits, activations are a Clip onto 2^b levels of the int8 grid (DESIGN §4). With
    # ``act_window`` those levels may be any run of the grid that holds 0, not only the centred
    # one: the graph keeps zero-point 0 and the Clip bounds carry the offset, so one-sided ranges
    # (softmax, GELU) keep all 2^b levels where a symmetric grid leaves them half.
    act_window: bool = False
    weight_signed: bool = True
    weight_symmetric: bool = True
    weight_axis_per_channel: bool = True
    float_dtype: str = "float32"  # the float type of the exported graph
    opset: int = 17
    allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)

    @property
    def weight_only_blocks(self) -> bool:
        """Runs INT4 weight-only graphs (w4a16): blocked int4 DequantizeLinear at opset 21.
        A property, not a field: the profile's fields key stored results."""
        return self.name in WEIGHT_ONLY_TARGETS

    def to_dict(self) -> dict:
        return asdict(self)


WEIGHT_ONLY_TARGETS = ("trt",)
WEIGHT_ONLY_OPSET = 21  # int4 and blocked DequantizeLinear

PROFILES: dict[str, TargetProfile] = {
    # TensorRT: symmetric only, zero-points 0; strongly typed FP16 graph. FP16 Q/DQ scales need
    # opset 19 (QuantizeLinear gained float16 inputs/scales there).
    "trt": TargetProfile(
        name="trt",
        act_signed=True,
        act_symmetric=True,
        act_window=True,
        float_dtype="float16",
        opset=19,
    ),
    # ONNX Runtime CPU: uint8 asymmetric activations keep the bit that one-sided ranges
    # (post-softmax, post-GELU) would otherwise waste.
    "ort": TargetProfile(name="ort", act_signed=False, act_symmetric=False),
}


def get_profile(name: str) -> TargetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(
            f"unknown --target {name!r}; choose one of: {', '.join(PROFILES)}"
        ) from None
