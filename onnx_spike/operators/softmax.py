"""Spiking Softmax over the last axis: p_i = E_i / sum_j E_j with E = PWLExp(x - max(x)).

Integer state:
- currents X: int64, f fractional bits, saturating at +-2^31 (`INT32_LIMIT`) on encode.
- t = X - max(X): int64 in [-2^32, 0]; the max is a comparator tree (ReduceMax).
- E: uint64 in [0, 2^P] (P = exp.value_bits); the row max gives exactly 2^P.
- row sum S: uint64 in [2^P, d * 2^P], below 2^63 for d < 2^(63 - P).
- output q: uint64 in [0, 2^n], meaning q * 2^-n.

Special values, as the float op: a row with NaN or +inf, or with every entry -inf, is NaN; a
-inf entry gets 0 (its current saturates like finfo.min, so a separate mask keeps the two
apart); a row of finfo(float32).min saturates to equal currents and is uniform.

Error bound (derived in docs/error-bounds.md, checked by the tests): with the rounding
reciprocal division, |p_hat - p| <= p * (2 eps_exp + 2^(3-m)) + (1 + 2^-P * 2^(n+1)) * 2^-(n+1)
+ c_clip, where eps_exp is the chord error of the table, m the reciprocal bits and
c_clip = e^(-2H) the weight of an entry clipped below max - 2H.
"""

from __future__ import annotations

import numpy as np

from onnx_spike.fixedpoint import INT32_LIMIT
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.neuron import U64
from onnx_spike.operators.site import DecodeBuilder, build_site, golden_site, row_all, row_any
from onnx_spike.precision import SoftmaxSpec
from onnx_spike.primitives import division, exp

INPUT_LIMIT = INT32_LIMIT


def softmax_counts(currents: np.ndarray, excluded: np.ndarray, spec: SoftmaxSpec) -> np.ndarray:
    """Golden integer core: int64 currents -> uint64 probabilities with n fractional bits."""
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    row_max = currents.max(axis=-1, keepdims=True)
    numerators = exp.pwl_exp(currents - row_max, table) * (~excluded).astype(U64)

    denominator = numerators.astype(np.int64).sum(axis=-1, keepdims=True).astype(U64)
    return division.divide(spec.division, numerators, denominator, spec.frac_bits, spec.rounding)


def _special(y: np.ndarray, masks: dict) -> np.ndarray:
    bad_row = row_any(masks["nan"] | masks["pos_inf"]) | row_all(masks["neg_inf"])
    return np.where(bad_row, np.float32(np.nan), y)


def spiking_softmax(x: np.ndarray, spec: SoftmaxSpec) -> np.ndarray:
    """Golden model of the whole site (float in, float out)."""
    return golden_site(x, spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                       lambda currents, masks: softmax_counts(currents, masks["neg_inf"], spec), _special)


def build_softmax_core(spec: SoftmaxSpec) -> FunctionSpec:
    exp_fn = exp.build_pwl_exp(spec.exp, spec.input_frac_bits)
    divide_fn = division.build_divide(spec.division, spec.frac_bits, spec.rounding)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        currents, excluded = inputs
        row_max = b.op("ReduceMax", currents, b.const(np.array([-1], np.int64)), keepdims=1)
        (numerators,) = b.call(exp_fn, b.op("Sub", currents, row_max))
        numerators = b.gate(b.op("Not", excluded), numerators)

        signed = b.op("Cast", numerators, to=7)
        denominator = b.op("ReduceSum", signed, b.const(np.array([-1], np.int64)), keepdims=1)
        (counts,) = b.call(divide_fn, numerators, b.op("Cast", denominator, to=13))
        return [b.op("Cast", counts, to=7)]

    return define_function("SoftmaxCore", _params(spec), ["X", "Excluded"], 1, body, calls=[exp_fn, divide_fn],
                           doc="Integer Softmax over the last axis: comparator max, PWL-Exp, row sum, division.")


def build_spiking_softmax(spec: SoftmaxSpec) -> FunctionSpec:
    spec.validate()
    core = build_softmax_core(spec)

    def special(d: DecodeBuilder, y: str) -> str:
        b = d.b
        bad = b.op("Or", d.row_any(b.op("Or", d.masks["nan"], d.masks["pos_inf"])), d.row_all(d.masks["neg_inf"]))
        return d.set_where(y, bad, np.nan)

    return build_site("Softmax", _params(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits, core,
                      lambda m: [m["currents"], m["neg_inf"]], special,
                      doc="Spiking Softmax over the last axis (float in, float out).")


def _params(spec: SoftmaxSpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)
