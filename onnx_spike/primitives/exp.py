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

Evaluation (golden model, uint64): u = t + 2H * 2^f clamped to [0, 2H * 2^f]; segment i = floor(u / W) by a
shift (W a power of two) or a multiply by a magic constant and a shift (checked exact over the
whole input range when the table is built); dz = u - i*W; E = V_i + ((S_i * dz + 2^(q-1)) >> q),
the chord evaluated from its left knot (the `a*x + b` form loses bits to cancellation near the
top). t < -2H gives 0.

Error against e^t: the chord lies above the convex e^t by at most eps_exp = w^2/8 * e^w
relative (H^2/(2K^2) * e^(2H/K) in the paper's notation), plus 1 output unit of rounding.

The ONNX function computes the same values with one Gather per element. Its input is the
offset U = t + 2H * 2^f + W, which the caller clamps to [0, 2H * 2^f + W] (int32); the table
gets a zero entry in front, so every U < W (t < -2H) reads value 0 and slope 0 and needs no
separate mask. Each int64 entry packs a knot value and its slope (`PackedTable`), unpacked
with one shift: in onnxruntime 1.32 a Gather from the table took about 0.5 ms for 147456
elements on one thread of the benchmark machine, an int64 Add 0.03 to 0.13 ms, so one Gather
of a packed entry beats two Gathers.
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


def _magic_divisor(divisor: int, max_dividend: int, limit_bits: int = 62) -> tuple[int, int]:
    """(M, s) with floor(x * M >> s) == floor(x / divisor) for all 0 <= x <= max_dividend,
    and max_dividend * M < 2^limit_bits."""
    if divisor == 1:
        return 1, 0
    x = np.arange(max_dividend + 1, dtype=np.uint64)
    expected = x // np.uint64(divisor)
    for shift in range(1, 40):
        magic = -(-(1 << shift) // divisor)
        if max_dividend * magic >= 1 << limit_bits:
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


@dataclass(frozen=True)
class PackedTable:
    """One int64 entry per segment, with a zero entry in front for offsets below the table.

    ``slope_high`` layout (when it fits 62 bits): entry = S << base_bits | (V << q) + 2^(q-1),
    so V * 2^q + 2^(q-1) + S * dz = entry + S * (dz - 2^base_bits) and E is that >> q.
    ``value_high`` layout otherwise: entry = V << slope_bits | S, V = entry >> slope_bits and
    S = entry - (V << slope_bits), E = V + ((S * dz + 2^(q-1)) >> q).
    """

    entries: np.ndarray  # int64 [K + 2]
    slope_high: bool
    field_shift: int  # base_bits (slope_high) or slope_bits (value_high)
    magic: int  # segment = ((U >> index_shift) * magic) >> magic_shift, checked up to U = span + W
    magic_shift: int


@lru_cache(maxsize=64)
def pack_table(spec: ExpSpec, input_frac_bits: int) -> PackedTable:
    table = build_table(spec, input_frac_bits)
    values = [0] + [int(v) for v in table.values]
    slopes = [0] + [int(v) for v in table.slopes]
    slope_bits = max(max(slopes).bit_length(), 1)
    base_bits = table.value_bits + table.slope_shift + 1  # V * 2^q + 2^(q-1) < 2^base_bits
    half = 1 << (table.slope_shift - 1)
    if slope_bits + base_bits <= 62:
        entries = [(slope << base_bits) + (value << table.slope_shift) + half for value, slope in zip(values, slopes)]
        slope_high, field_shift = True, base_bits
    elif table.value_bits + 1 + slope_bits <= 62:
        entries = [(value << slope_bits) + slope for value, slope in zip(values, slopes)]
        slope_high, field_shift = False, slope_bits
    else:
        raise ValueError(f"exp table: values of {table.value_bits + 1} bits and slopes of {slope_bits} bits "
                         "do not fit one int64 entry; lower value_bits or slope_frac_bits")
    # The zero entry shifts every segment up by one, so the offsets reach span + W.
    magic, magic_shift = _magic_divisor(table.width >> table.index_shift,
                                        (table.span + table.width) >> table.index_shift, limit_bits=31)
    return PackedTable(np.array(entries, dtype=np.int64), slope_high, field_shift, magic, magic_shift)


def exp_offset(t: np.ndarray, table: ExpTable) -> np.ndarray:
    """Compute the ONNX function's input U = t + span + W, clamped to [0, span + W] (int32)."""
    shifted = np.asarray(t, dtype=np.int64) + np.int64(table.span + table.width)
    return np.clip(shifted, 0, table.span + table.width).astype(np.int32)


def build_pwl_exp(spec: ExpSpec, input_frac_bits: int, out_dtype: str = "int64") -> FunctionSpec:
    """E ~ e^t * 2^P from the int32 offset U = t + span + W in [0, span + W]; E has type out_dtype.

    Integer state: U, the segment and its offset dz < W are int32 (span + W < 2^31 for every
    valid spec); the packed entry, S * (dz - 2^base_bits) and the unrounded value are int64.
    """
    table = build_table(spec, input_frac_bits)
    packed = pack_table(spec, input_frac_bits)
    if table.span + table.width >= 1 << 31:
        raise ValueError("exp table: span + W must stay below 2^31 for the int32 offset")
    q = table.slope_shift

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (offset,) = inputs
        segment = b.shr_int(offset, table.index_shift, "int32")
        if packed.magic != 1:
            segment = b.shr_int(b.op("Mul", segment, b.int_const(packed.magic, "int32")), packed.magic_shift, "int32")
        within = b.cast(b.op("Sub", offset, b.op("Mul", segment, b.int_const(table.width, "int32"))), "int64")
        # GatherElements on the flattened segments reads the same entries as Gather, 6 times faster
        # in onnxruntime 1.32 (docs/benchmarks.md).
        flat = b.op("Reshape", segment, b.const(np.array([-1], np.int64)))
        entry = b.op("GatherElements", b.const(packed.entries), flat, axis=0)
        entry = b.op("Reshape", entry, b.op("Shape", offset), allowzero=1)

        if packed.slope_high:
            slope = b.shr_int(entry, packed.field_shift, "int64")
            lowered = b.op("Sub", within, b.int_const(1 << packed.field_shift, "int64"))
            unrounded = b.op("Add", entry, b.op("Mul", slope, lowered))
            return [b.shr_int(unrounded, q, "int64", out=out_dtype)]

        value = b.shr_int(entry, packed.field_shift, "int64")
        slope = b.op("Sub", entry, b.op("Mul", value, b.int_const(1 << packed.field_shift, "int64")))
        rise = b.op("Add", b.op("Mul", slope, within), b.int_const(1 << (q - 1), "int64"))
        result = b.op("Add", value, b.shr_int(rise, q, "int64"))
        return [result if out_dtype == "int64" else b.cast(result, out_dtype)]

    params = {"half_range": spec.half_range, "segments": spec.segments, "value_bits": spec.value_bits,
              "slope_frac_bits": spec.slope_frac_bits, "input_frac_bits": input_frac_bits, "out_dtype": out_dtype}
    return define_function("PwlExp", params, ["U"], 1, body,
                           doc="Piecewise-linear e^t * 2^P from the int32 offset U = t + 2H * 2^f + W "
                               "clamped to [0, 2H * 2^f + W]; 0 for U < W (t below -2H).")
