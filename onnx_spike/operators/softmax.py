"""Spiking Softmax over the last axis: p_i = E_i / sum_j E_j with E = PWLExp(x - max(x)).

Integer state:
- currents X: int32, f fractional bits, saturating at +-(2^31 - 128) (`INT32_LIMIT`) on encode.
- row max: int32 by a comparator tree (ReduceMax).
- exp offset U = X - max(X) + K with K = 2H * 2^f + W, clamped to [0, K] without leaving
  int32: X is first raised to max(h - K, X) with h = max(max(X), -limit + K), and U is
  (X - h) + (K + h - max(X)); entries below max(X) - K read 0 either way.
- E: int64 in [0, 2^P] (P = exp.value_bits); the row max gives exactly 2^P.
- row sum S: int64 in [2^P, d * 2^P] (0 for a row of -inf, which the division reads as 1),
  below 2^62 for d < 2^(61 - P).
- output q: int64 in [0, 2^n], meaning q * 2^-n.

Special values, as the float op: a row with NaN or +inf, or with every entry -inf, is NaN; a
-inf entry gets 0 (its current saturates like finfo.min, so a separate mask keeps the two
apart); a row of finfo(float32).min saturates to equal currents and is uniform.

Error bound (derived in docs/error-bounds.md, checked by the tests): with the rounding
reciprocal division, |p_hat - p| <= p * (2 eps_exp + 2^(3-m)) + (1 + 2^-P * 2^(n+1)) * 2^-(n+1)
+ c_clip, where eps_exp is the chord error of the table, m the reciprocal bits and
c_clip = e^(-2H) the weight of an entry clipped below max - 2H.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from onnx_spike.fixedpoint import INT32_LIMIT
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.operators.site import DecodeBuilder, build_site, golden_site, row_all, row_any
from onnx_spike.precision import SoftmaxSpec
from onnx_spike.primitives import division, exp

INPUT_LIMIT = INT32_LIMIT
_AXES = np.array([-1], np.int64)


def _operands(spec: SoftmaxSpec) -> division.Operands:
    # Every E is at most 2^P and at most the row sum, which the row max alone brings to 2^P.
    return division.Operands(numerator_bits=spec.exp.value_bits + 1, denominator_bits=62, dtype="int64",
                             checked=True)


def softmax_counts(currents: np.ndarray, excluded: np.ndarray, spec: SoftmaxSpec) -> np.ndarray:
    """Golden integer core: currents -> int64 probabilities with n fractional bits."""
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    currents = currents.astype(np.int64)
    if currents.shape[-1] == 0:
        return np.zeros(currents.shape, dtype=np.int64)
    row_max = currents.max(axis=-1, keepdims=True)
    numerators = exp.pwl_exp(currents - row_max, table).astype(np.int64) * (~excluded)

    denominator = numerators.sum(axis=-1, keepdims=True)
    return division.divide(spec.division, numerators, denominator, spec.frac_bits, spec.rounding, _operands(spec))


def _special(y: np.ndarray, masks: dict) -> np.ndarray:
    bad_row = row_any(masks["nan"] | masks["pos_inf"]) | row_all(masks["neg_inf"])
    return np.where(bad_row, np.float32(np.nan), y)


def spiking_softmax(x: np.ndarray, spec: SoftmaxSpec) -> np.ndarray:
    """Golden model of the whole site (float in, float out)."""
    return golden_site(x, spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                       lambda currents, masks: softmax_counts(currents, masks["neg_inf"], spec), _special)


def build_softmax_core(spec: SoftmaxSpec) -> FunctionSpec:
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    exp_fn = exp.build_pwl_exp(spec.exp, spec.input_frac_bits, out_dtype="int64")
    divide_fn = division.build_divide(spec.division, spec.frac_bits, spec.rounding, _operands(spec))
    reach = table.span + table.width  # K: offsets U run over [0, K]
    limit = int(INPUT_LIMIT)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        currents, excluded = inputs
        row_max = b.op("ReduceMax", currents, b.const(_AXES), keepdims=1)
        # Per row: h = max(row max, -limit + K) keeps h - K and K + h - row max inside int32.
        high = b.op("Max", row_max, b.int_const(reach - limit, "int32"))
        floor = b.op("Sub", high, b.int_const(reach, "int32"))
        lift = b.op("Add", b.op("Sub", high, row_max), b.int_const(reach, "int32"))
        offset = b.op("Add", b.op("Sub", b.op("Max", currents, floor), high), lift)
        # A -inf entry reads the zero entry of the table.
        offset = b.mul_mask(b.op("Not", excluded), offset, "int32")
        (numerators,) = b.call(exp_fn, offset)

        denominator = b.op("ReduceSum", numerators, b.const(_AXES), keepdims=1)
        (counts,) = b.call(divide_fn, numerators, denominator)
        return [counts]

    return define_function("SoftmaxCore", asdict(spec), ["X", "Excluded"], 1, body, calls=[exp_fn, divide_fn],
                           doc="Integer Softmax over the last axis: comparator max, PWL-Exp, row sum, division.")


def build_spiking_softmax(spec: SoftmaxSpec) -> FunctionSpec:
    spec.validate()
    core = build_softmax_core(spec)

    def special(d: DecodeBuilder, y: str) -> str:
        # The float row max is +inf with a +inf entry and -inf when every entry is -inf.
        b = d.b
        bad = b.op("Or", d.row_any(d.masks["nan"]), b.op("IsInf", d.row_max()))
        return b.op("Add", y, d.pick(bad, float("nan"), 0.0))

    return build_site("Softmax", asdict(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits, core,
                      core_masks=["neg_inf"], decode_masks=["nan"], special=special, dtype="int32",
                      doc="Spiking Softmax over the last axis (float in, float out).")
