"""Per-element error bounds of the spiking operators as built, against the exact float op.

Each bound is `relative term * |exact| + absolute term` (+ a clip term for Softmax), with
every source of error of the integer algorithm listed; docs/error-bounds.md derives them.
The tests require every measured error to stay inside these bounds on random and
adversarial inputs. Sources, with Delta = 2^-n the output grid:

- input grid: encode rounds x to 2^-(f+1);
- exp table: chord error eps_exp = w^2/8 e^w (relative, the chord lies above e^t), plus at
  most 1.5 output units of knot, slope and evaluation rounding (2^-P each);
- division: bit-serial form exact up to its rounding or floor; reciprocal form within
  2 * 2^-m relative (floor of the reciprocal and the right shift of B) plus 2^-m absolute
  (the same right shift of A, where the form shifts A); population form within 2^(1-g) grid
  steps (the floor in theta = B >> n) plus the floor of the count;
- output grid: Delta / 2 when rounding, Delta when flooring;
- CORDIC tree: D * 2^(1 - 2 * iterations) relative, plus the truncated shifts.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_spike.operators.norm import NormPlan
from onnx_spike.precision import DivisionSpec, SiluSpec, SoftmaxSpec
from onnx_spike.primitives import exp, norm as polar


def _division_relative(spec: DivisionSpec) -> float:
    return 2.0 * 2.0**-spec.reciprocal_bits if spec.method == "reciprocal" else 0.0


def _division_absolute_steps(spec: DivisionSpec, rounding: bool, frac_bits: int) -> float:
    """Absolute error of the division in steps of its own output grid 2^-frac_bits."""
    if spec.method == "bitserial":
        return 0.5 if rounding else 1.0
    if spec.method == "reciprocal":
        return (0.5 if rounding else 1.0) + 2.0 ** (frac_bits - spec.reciprocal_bits)
    # Floor of the count, plus theta's own floor: q * 2^-(n+g-1) <= 2^(1-g) steps.
    return (0.5 if rounding else 1.0) + 2.0 ** (1 - spec.theta_guard_bits)


def softmax_bound(x: np.ndarray, spec: SoftmaxSpec) -> np.ndarray:
    """Bound on |p_hat - p| per element for finite rows of `x` (last axis)."""
    x = np.asarray(x, dtype=np.float64)
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    dim = x.shape[-1]
    shifted = x - x.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    exact = weights / weights.sum(axis=-1, keepdims=True)

    eps = table.relative_chord_error
    input_grid = 2.0 * 2.0**-spec.input_frac_bits  # x and max(x) each rounded by 2^-(f+1)
    unit = 2.0**-spec.exp.value_bits
    clip = math.exp(-2.0 * spec.exp.half_range)
    # Each numerator's rounding moves the row sum too, at most d * 1.5 units against a sum of
    # at least 2^P (the row max alone).
    relative = (2.0 * eps + input_grid + dim * 1.5 * unit + dim * clip
                + _division_relative(spec.division))
    absolute = 1.5 * unit + _division_absolute_steps(spec.division, spec.rounding, spec.frac_bits) * 2.0**-spec.frac_bits
    clipped = shifted < -2.0 * spec.exp.half_range
    return relative * exact + absolute + np.where(clipped, exact, 0.0)


def silu_bound(x: np.ndarray, spec: SiluSpec, derivative_bound: float = 1.1,
               argument: np.ndarray | None = None) -> np.ndarray:
    """Bound on |y_hat - y| per element for y = x * sigma(z), z = x unless given (GELU)."""
    x = np.asarray(x, dtype=np.float64)
    z = x if argument is None else np.asarray(argument, dtype=np.float64)
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    eps = table.relative_chord_error
    unit = 2.0**-spec.exp.value_bits
    magnitude = np.abs(x)
    grid = (0.5 if spec.rounding else 1.0) * 2.0**-spec.frac_bits
    input_grid = derivative_bound * 2.0**-(spec.input_frac_bits + 1)
    sigma_steps = (_division_absolute_steps(spec.division, spec.rounding, spec.sigmoid_frac_bits)
                   * 2.0**-spec.sigmoid_frac_bits)

    if spec.form == "symmetric":
        tail = np.exp(-np.abs(z))
        error_q = tail * (eps + _division_relative(spec.division)) + 1.5 * unit + sigma_steps
        clip = np.where(np.abs(z) > 2.0 * spec.exp.half_range, tail, 0.0)
        return magnitude * (error_q + clip) + grid + input_grid

    # Paper form: e^-x is scaled by e^H in the table, so its unit is e^H * 2^-P; x < -H gives 0
    # instead of SiLU(x), and x > H reads e^-x as 0, so sigma is 1 instead of sigma(x).
    half_range = spec.exp.half_range
    error_q = eps + math.exp(half_range) * 1.5 * unit + sigma_steps + 2.0 ** -spec.exp.value_bits
    exact = x / (1.0 + np.exp(-x))
    upper_clip = np.where(x > half_range, magnitude * np.exp(-magnitude), 0.0)
    inside = magnitude * error_q + grid + input_grid + upper_clip
    return np.where(x < -half_range, np.abs(exact) + grid, inside)


def norm_bound(x: np.ndarray, plan: NormPlan) -> np.ndarray:
    """Bound on |y_hat - y| per element of RMSNorm / LayerNorm (without weight)."""
    spec = plan.spec
    x = np.asarray(x, dtype=np.float64)
    dim = plan.dim
    if plan.center:
        centered = x - x.mean(axis=-1, keepdims=True)
    else:
        centered = x
    rms = np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + plan.epsilon)
    exact = centered / rms

    depth = polar.tree_depth(dim)
    iterations = spec.cordic_iterations
    unit = 2.0**-spec.input_frac_bits * 2.0**plan.leaf_shift / (dim if plan.center else 1)
    # Truncated shifts: about 2 * iterations units per merge along a root path, against a root
    # of at least G^D * ||v||.
    norm_units = rms * math.sqrt(dim) / unit
    truncation = 2.0 * iterations * depth / np.maximum(norm_units, 1.0)
    relative = (depth * 2.0 ** (1 - 2 * iterations) + truncation + _division_relative(plan.division)
                + 2.0**-plan.gain_shift + 2.0**-16)
    quotient_steps = (_division_absolute_steps(plan.division, spec.rounding, plan.quotient_bits)
                      * 2.0**-plan.quotient_bits)
    grid = (0.5 if spec.rounding else 1.0) * 2.0**-spec.frac_bits
    # Encode rounds by 2^-(f+1); LayerNorm's leaves also drop leaf_shift bits of z = d*x - sum(x).
    leaf_unit = 2.0**plan.leaf_shift / dim if plan.center else 0.0
    input_grid = (1.0 + leaf_unit) * 2.0**-spec.input_frac_bits / rms
    absolute = math.sqrt(dim) * quotient_steps + grid + input_grid * (1.0 + np.abs(exact))
    return relative * np.abs(exact) + absolute
