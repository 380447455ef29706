"""Spiking RMSNorm and LayerNorm over the last axis, without their affine weight and bias.

RMSNorm: y_i = sign(x_i) * sqrt(d) * Div(|x_i| * G^D, PolarNorm(x)). Scaling the numerator by
the same constant gain G^D that the CORDIC tree puts on the denominator keeps A <= B (up to
the CORDIC error), so the quotient |x_i| / ||v|| stays in [0, 1]; it is computed with
n + ceil(log2 sqrt(d)) + guard fractional bits and then multiplied by the constant sqrt(d),
so the output keeps n fractional bits.

LayerNorm: LayerNorm(x) equals RMSNorm(z) for z = d*x - sum(x) with epsilon d^2 * eps, so the
mean is removed exactly in integers (no division by d) and the RMSNorm path follows.

The weight (and bias) stay as the float Mul (and Add) of the original graph, like the other
linear layers that the conversion leaves in float.

Integer state:
- currents X: int64, f fractional bits, saturating at +-2^40 (`INT40_LIMIT`) on encode.
- LayerNorm: sum(x) int64 < d * 2^40; z = d*x - sum(x), |z| < 2^(41 + log2 d); the tree reads
  |z| >> s with s = ceil(log2(2d)), so its leaves stay below 2^40.
- leaves: int64 < 2^40 (+ the epsilon leaf round(sqrt(eps * d) * 2^f), shifted alike).
- N = PolarNorm: int64 < 2^62 (checked per d).
- A = (|z| * Gm + 2^(g-1)) >> g with Gm = round(G^D * 2^g), g chosen so |z| * Gm < 2^62.
- quotient u: int64 in [0, ~2^k], k = n + ceil(log2 sqrt d) + guard.
- output: int64 |y| <= ~sqrt(d) * 2^n, signed by Clip(z, -1, 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict

import numpy as np

from onnx_spike.fixedpoint import INT40_LIMIT
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.operators.site import DecodeBuilder, build_site, golden_site, row_any
from onnx_spike.precision import NormSpec
from onnx_spike.primitives import division, norm as polar

INPUT_LIMIT = INT40_LIMIT
_SQRT_D_BITS = 16


class NormPlan:
    """The constants of one norm site, derived from (spec, d, eps, layer)."""

    def __init__(self, spec: NormSpec, dim: int, epsilon: float, center: bool):
        if dim < 1:
            raise ValueError(f"norm: the normalized dimension must be at least 1, got {dim}")
        polar.check_range(dim, spec.cordic_iterations)
        self.spec = spec
        self.dim = dim
        self.epsilon = float(epsilon)
        self.center = center

        # LayerNorm's z = d*x - sum(x) is d times larger; shift it back under 2^40.
        self.leaf_shift = math.ceil(math.log2(2 * dim)) if center else 0
        eps_scale = dim if center else 1
        eps_leaf = math.sqrt(self.epsilon * dim) * eps_scale * 2.0**spec.input_frac_bits / 2.0**self.leaf_shift
        self.eps_leaf = int(round(eps_leaf))
        if self.eps_leaf >= 1 << polar.LEAF_BITS:
            raise ValueError(f"norm: epsilon {epsilon} is too large for input_frac_bits {spec.input_frac_bits}")

        depth = polar.tree_depth(dim)
        self.gain = polar.cordic_gain(spec.cordic_iterations) ** depth
        self.gain_shift = 62 - polar.LEAF_BITS - math.ceil(math.log2(self.gain)) - 1
        self.gain_multiplier = round(self.gain * 2**self.gain_shift)

        sqrt_bits = math.ceil(math.log2(math.sqrt(dim)))
        if spec.division.method == "reciprocal":
            self.quotient_bits = min(spec.frac_bits + sqrt_bits + spec.quotient_guard_bits,
                                     spec.division.reciprocal_bits)
            self.division = spec.division
        elif spec.division.method == "bitserial":
            self.quotient_bits = spec.frac_bits + sqrt_bits + spec.quotient_guard_bits
            self.division = spec.division
        else:
            # The population group widens to T * L = 2^(n + ceil(log2 sqrt d)), keeping T.
            self.quotient_bits = spec.frac_bits + sqrt_bits
            steps = min(spec.division.time_steps, 1 << self.quotient_bits)
            self.division = dataclasses.replace(spec.division, time_steps=steps,
                                                neurons=(1 << self.quotient_bits) // steps)
        self.sqrt_dim = round(math.sqrt(dim) * 2**_SQRT_D_BITS)
        self.output_shift = self.quotient_bits + _SQRT_D_BITS - spec.frac_bits

    def params(self) -> dict:
        return {"spec": asdict(self.spec), "dim": self.dim, "epsilon": self.epsilon, "center": self.center}


# ---------------------------------------------------------------- golden model


def _operands(plan: NormPlan) -> division.Operands:
    # A = |z| * G^D < 2^(41 + log2 G^D) and the root < 2^62; A may exceed B by the CORDIC error.
    numerator_bits = polar.LEAF_BITS + 1 + math.ceil(math.log2(plan.gain))
    return division.Operands(numerator_bits=numerator_bits, denominator_bits=62, dtype="int64", checked=False)


def norm_counts(currents: np.ndarray, plan: NormPlan) -> np.ndarray:
    """Golden integer core: int64 currents [..., d] -> int64 output with n fractional bits."""
    spec = plan.spec
    flat = currents.reshape(-1, plan.dim).astype(np.int64)
    if plan.center:
        total = flat.sum(axis=1, keepdims=True)
        flat = flat * np.int64(plan.dim) - total
    negative = flat < 0
    magnitude = np.abs(flat) >> plan.leaf_shift

    root = polar.polar_norm(magnitude, plan.eps_leaf, spec.cordic_iterations).astype(np.int64)
    numerator = (magnitude * np.int64(plan.gain_multiplier) + np.int64(1 << (plan.gain_shift - 1))) >> plan.gain_shift
    quotient = division.divide(plan.division, numerator, root, plan.quotient_bits, spec.rounding, _operands(plan))

    half = np.int64(1 << (plan.output_shift - 1)) if spec.rounding else np.int64(0)
    scaled = (quotient * np.int64(plan.sqrt_dim) + half) >> plan.output_shift
    return np.where(negative, -scaled, scaled).reshape(currents.shape)


def _special(y: np.ndarray, masks: dict, center: bool) -> np.ndarray:
    inf = masks["pos_inf"] | masks["neg_inf"]
    nan_row = row_any(masks["nan"])
    inf_row = row_any(inf)
    if center:
        return np.where(nan_row | inf_row, np.float32(np.nan), y)
    # Float RMSNorm: mean(x^2) = inf gives 1/rms = 0, so finite entries become 0 and inf * 0 NaN.
    y = np.where(inf_row, np.float32(0), y)
    return np.where(nan_row | inf, np.float32(np.nan), y)


def spiking_norm(x: np.ndarray, plan: NormPlan) -> np.ndarray:
    return golden_site(x, plan.spec.input_frac_bits, INPUT_LIMIT, plan.spec.frac_bits,
                       lambda currents, _: norm_counts(currents, plan),
                       lambda y, masks: _special(y, masks, plan.center))


# ---------------------------------------------------------------- ONNX functions


def build_norm_core(plan: NormPlan) -> FunctionSpec:
    spec = plan.spec
    polar_fn = polar.build_polar_norm(plan.dim, plan.eps_leaf, spec.cordic_iterations)
    divide_fn = division.build_divide(plan.division, plan.quotient_bits, spec.rounding, _operands(plan))

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (currents,) = inputs
        shape = b.op("Shape", currents)
        flat = b.op("Reshape", currents, b.const(np.array([-1, plan.dim], np.int64)))
        if plan.center:
            total = b.op("ReduceSum", flat, b.const(np.array([1], np.int64)), keepdims=1)
            flat = b.op("Sub", b.op("Mul", flat, b.i64(plan.dim)), total)
        magnitude = b.shr_int(b.op("Abs", flat), plan.leaf_shift, "int64")

        (root,) = b.call(polar_fn, magnitude)
        numerator = b.op("Add", b.op("Mul", magnitude, b.i64(plan.gain_multiplier)), b.i64(1 << (plan.gain_shift - 1)))
        numerator = b.shr_int(numerator, plan.gain_shift, "int64")
        (quotient,) = b.call(divide_fn, numerator, root)

        scaled = b.op("Mul", quotient, b.i64(plan.sqrt_dim))
        if spec.rounding:
            scaled = b.op("Add", scaled, b.i64(1 << (plan.output_shift - 1)))
        scaled = b.shr_int(scaled, plan.output_shift, "int64")
        # The sign of z; z = 0 gives a zero output anyway.
        signed = b.op("Mul", scaled, b.op("Clip", flat, b.i64(-1), b.i64(1)))
        # allowzero: a zero in the shape (an empty sequence) is a size, not "copy this dim".
        return [b.op("Reshape", signed, shape, allowzero=1)]

    kind = "LayerNormCore" if plan.center else "RmsNormCore"
    return define_function(kind, plan.params(), ["X"], 1, body, calls=[polar_fn, divide_fn],
                           doc="Integer normalization over the last axis: PolarNorm, gain-matched numerator, "
                               "division, sqrt(d) scaling.")


def build_spiking_norm(plan: NormPlan) -> FunctionSpec:
    plan.spec.validate()

    def special(d: DecodeBuilder, y: str) -> str:
        b = d.b
        # x * 0 is NaN at NaN and +-inf entries; its row sum flags rows with any of them.
        zero_or_nan = d.zero_or_nan()
        nonfinite_row = b.op("IsNaN", d.row_sum(zero_or_nan))
        if plan.center:
            return b.op("Add", y, d.pick(nonfinite_row, float("nan"), 0.0))
        # Float RMSNorm: mean(x^2) = inf gives 1/rms = 0, so finite entries become 0 and inf * 0 NaN.
        scale = d.pick(d.row_any(d.masks["nan"]), float("nan"), d.pick(nonfinite_row, 0.0, 1.0))
        return b.op("Add", b.op("Mul", y, scale), zero_or_nan)

    kind = "LayerNorm" if plan.center else "RmsNorm"
    return build_site(kind, plan.params(), plan.spec.input_frac_bits, INPUT_LIMIT, plan.spec.frac_bits,
                      build_norm_core(plan), core_masks=[], decode_masks=[] if plan.center else ["nan"],
                      special=special, dtype="int64",
                      doc=f"Spiking {kind} over the last axis without weight or bias (float in, float out).")
