"""The float boundary of a spiking site: encode to integer currents, decode spike counts.

Encode: `x * 2^f`, round half to even, clip to +-limit, NaN to 0, cast to int64. The limit is
a float32 value that the cast represents exactly: onnxruntime casts any out-of-range float,
+-inf and NaN to INT_MIN, so saturation must happen before the cast. Currents are int64 in
every path; `INT32_LIMIT` gives int32-range currents (the largest float32 not above
2^31 - 1) and `INT40_LIMIT` the wider range of the norms.

Decode: `count * 2^-n` in float32, exact while |count| < 2^24.

The NumPy functions here are the golden model of the ONNX functions built here, op for op.
"""

from __future__ import annotations

import numpy as np

from onnx_spike.graph import GraphBuilder, FunctionSpec, define_function

INT32_LIMIT = 2147483520.0  # largest float32 <= 2^31 - 1
INT40_LIMIT = float(1 << 40)


def encode(x: np.ndarray, frac_bits: int, limit: float) -> np.ndarray:
    """Float activations to int64 currents with `frac_bits` fractional bits, saturating."""
    x32 = np.asarray(x).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = x32 * np.float32(2.0**frac_bits)
    rounded = np.round(scaled)
    clipped = np.clip(rounded, np.float32(-limit), np.float32(limit))
    clipped = np.where(np.isnan(x32), np.float32(0), clipped)
    return clipped.astype(np.int64)


def decode(counts: np.ndarray, frac_bits: int) -> np.ndarray:
    """Integer spike counts with `frac_bits` fractional bits to float32."""
    return counts.astype(np.float32) * np.float32(2.0**-frac_bits)


def saturated(x: np.ndarray, frac_bits: int, limit: float) -> np.ndarray:
    """Mask of finite activations that `encode` clips (infinities are special values, not counted)."""
    x32 = np.asarray(x).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.abs(x32.astype(np.float64) * 2.0**frac_bits)
    return np.isfinite(x32) & (np.round(scaled) > limit)


def build_encode(frac_bits: int, limit: float) -> FunctionSpec:
    """ONNX twin of `encode`, plus the special-value masks the decoders need.

    Outputs: currents (int64), is_nan, is_pos_inf, is_neg_inf (bool), all shaped like X.
    """

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (x,) = inputs
        x32 = b.op("Cast", x, to=1)

        scaled = b.op("Mul", x32, b.const(np.float32(2.0**frac_bits)))
        rounded = b.op("Round", scaled)
        clipped = b.op("Clip", rounded, b.const(np.float32(-limit)), b.const(np.float32(limit)))

        is_nan = b.op("IsNaN", x32)
        finite = b.op("Where", is_nan, b.const(np.float32(0)), clipped)
        currents = b.op("Cast", finite, to=7)

        is_pos_inf = b.op("IsInf", x32, detect_negative=0)
        is_neg_inf = b.op("IsInf", x32, detect_positive=0)
        return [currents, is_nan, is_pos_inf, is_neg_inf]

    return define_function("Encode", {"frac_bits": frac_bits, "limit": limit}, ["X"], 4, body,
                           doc="Encode float activations to int64 currents, saturating before the cast.")
