"""Primitive 2: piecewise-linear exponential, E ~ e^t * 2^P for t in [-2H, 0].

This is the paper's PWL-Exp on [-H, H] shifted by -H (Softmax feeds it x - max(x), SiLU
feeds it -|x|), with values scaled so that e^0 is exactly 2^P: the row max of a Softmax lands
on the top knot and its numerator needs no rounding.

Table (built once per parameter set, integer LUTs):
- knots t_i = -2H + i*w, w = 2H/K, i = 0 .. K; the spacing in input units W = w * 2^f must be
  a whole number, so every knot lies on the input grid.
- values V_i = round(e^(t_i) * 2^P), at most 2^P (P + 1 bits; the top knot is 2^P exactly).
- slopes S_i = round((e^(t_{i+1}) - e^(t_i)) * 2^(P+q) / W) with q = ceil(log2 W) + extra bits,
  so the slope rounding adds at most 2^-(extra+1) output units over a whole segment.

Evaluation (uint64): u = t + 2H * 2^f clamped to [0, 2H * 2^f]; segment i = floor(u / W) by a
shift (W a power of two) or a multiply by a magic constant and a shift (checked exact over the
whole input range when the table is built); dz = u - i*W; E = V_i + ((S_i * dz + 2^(q-1)) >> q),
the chord evaluated from its left knot (the `a*x + b` form loses bits to cancellation near the
top). t < -2H gives 0.

Error against e^t: the chord lies above the convex e^t by at most eps_exp = w^2/8 * e^w
relative (H^2/(2K^2) * e^(2H/K) in the paper's notation), plus 1 output unit of rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.neuron import U64
from onnx_spike.precision import ExpSpec


@dataclass(frozen=True)
class ExpTable:
    input_frac_bits: int
    value_bits: int
    span: int  # 2H in input units
    width: int  # W, the knot spacing in input units
    slope_shift: int  # q
    values: np.ndarray  # uint64 [K + 1]
    slopes: np.ndarray  # uint64 [K + 1], last entry 0
    index_shift: int  # segment = ((u >> index_shift) * magic) >> magic_shift
    magic: int  # 1 when W is a power of two
    magic_shift: int

    @property
    def relative_chord_error(self) -> float:
        w = self.width / 2.0**self.input_frac_bits
        return w * w / 8.0 * math.exp(w)


def _magic_divisor(divisor: int, max_dividend: int) -> tuple[int, int]:
    """(M, s) with floor(x * M >> s) == floor(x / divisor) for all 0 <= x <= max_dividend."""
    if divisor == 1:
        return 1, 0
    x = np.arange(max_dividend + 1, dtype=np.uint64)
    expected = x // np.uint64(divisor)
    for shift in range(1, 40):
        magic = -(-(1 << shift) // divisor)
        if max_dividend * magic >= 1 << 62:
            break
        if np.array_equal((x * np.uint64(magic)) >> np.uint64(shift), expected):
            return magic, shift
    raise ValueError(f"no exact magic multiplier for division by {divisor} up to {max_dividend}")


@lru_cache(maxsize=64)
def build_table(spec: ExpSpec, input_frac_bits: int) -> ExpTable:
    width = spec.segment_width_units(input_frac_bits)
    span = width * spec.segments
    scale = 2.0**spec.value_bits
    knots = -2.0 * spec.half_range + np.arange(spec.segments + 1) * (2.0 * spec.half_range / spec.segments)
    exact = np.exp(knots)
    exact[-1] = 1.0

    values = np.round(exact * scale).astype(np.uint64)
    slope_shift = max(1, math.ceil(math.log2(width))) + spec.slope_frac_bits
    slopes = np.zeros(spec.segments + 1, dtype=np.uint64)
    slopes[:-1] = np.round((exact[1:] - exact[:-1]) * scale * 2.0**slope_shift / width).astype(np.uint64)

    index_shift = (width & -width).bit_length() - 1  # trailing zeros of W
    odd_width = width >> index_shift
    magic, magic_shift = _magic_divisor(odd_width, span >> index_shift)
    return ExpTable(input_frac_bits, spec.value_bits, span, width, slope_shift, values, slopes,
                    index_shift, magic, magic_shift)


# ---------------------------------------------------------------- golden model


def pwl_exp(t: np.ndarray, table: ExpTable) -> np.ndarray:
    """E ~ e^t * 2^P for int64 t in units of 2^-f; 0 below -2H."""
    shifted = t.astype(np.int64) + np.int64(table.span)
    below = shifted < 0
    u = np.clip(shifted, 0, table.span).astype(U64)

    segment = ((u >> U64(table.index_shift)) * U64(table.magic)) >> U64(table.magic_shift)
    offset = u - segment * U64(table.width)
    index = segment.astype(np.int64)
    rise = (table.slopes[index] * offset + U64(1 << (table.slope_shift - 1))) >> U64(table.slope_shift)
    value = table.values[index] + rise
    return value * (~below).astype(U64)


# ---------------------------------------------------------------- ONNX function


def build_pwl_exp(spec: ExpSpec, input_frac_bits: int) -> FunctionSpec:
    table = build_table(spec, input_frac_bits)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (t,) = inputs
        shifted = b.op("Add", t, b.i64(table.span))
        below = b.op("Less", shifted, b.i64(0))
        u = b.op("Cast", b.op("Clip", shifted, b.i64(0), b.i64(table.span)), to=13)

        segment = b.shr(u, table.index_shift)
        if table.magic != 1:
            segment = b.shr(b.op("Mul", segment, b.u64(table.magic)), table.magic_shift)
        offset = b.op("Sub", u, b.op("Mul", segment, b.u64(table.width)))
        index = b.op("Cast", segment, to=7)

        slope = b.op("Gather", b.const(table.slopes), index)
        rise = b.op("Add", b.op("Mul", slope, offset), b.u64(1 << (table.slope_shift - 1)))
        value = b.op("Add", b.op("Gather", b.const(table.values), index), b.shr(rise, table.slope_shift))
        return [b.gate(b.op("Not", below), value)]

    params = {"half_range": spec.half_range, "segments": spec.segments, "value_bits": spec.value_bits,
              "slope_frac_bits": spec.slope_frac_bits, "input_frac_bits": input_frac_bits}
    return define_function("PwlExp", params, ["T"], 1, body,
                           doc="Piecewise-linear e^t * 2^P for int64 t <= 0 in units of 2^-f; 0 below -2H.")
