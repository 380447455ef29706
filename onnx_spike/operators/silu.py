"""Spiking SiLU, x * sigma(x), and GELU, x * sigma(z(x)), from PWL-Exp and division.

``symmetric`` form (default): with a = |x| and z = |z(x)|,
q = sigma(-z) = e^-z / (1 + e^-z) is a division A / B with A = E = PWLExp(-z) and
B = 2^P + E in [2^P, 2^(P+1)], so A <= B/2 and the table is only read on [-2H, 0]. Then
y = -a*q for x < 0 and y = a*(1 - q) otherwise. Nothing is clipped at -H: below -2H the
exact |SiLU| is under 2H * e^(-2H) (4.5e-4 at H = 5, 1.8e-6 at H = 8).

``paper`` form: sigma(x) = 1 / (1 + e^-x) with e^-x read from [-H, H] (e^H above, 0 below)
as C / (C + E) with C = round(e^-H * 2^P), and y = 0 for x < -H, floored to the grid.

GELU uses the tanh form z(x) = 1.5958 * (x + 0.044715 x^3), which is within 4.7e-4 of
erf-GELU on the real line, computed in integers with x clipped to +-6 for the cubic (beyond
that |z| > 2H and sigma is 0 or 1 in the table's range).

Integer state:
- currents X: int64, f fractional bits, saturating at +-2^31 (`INT32_LIMIT`) on encode.
- a = |x|: uint64 < 2^31; E: uint64 in [0, 2^P]; B: [2^P, 2^(P+1)].
- q: uint64 in [0, 2^s] with s = sigmoid_frac_bits.
- product a * q: < 2^(31 + s) <= 2^55.
- output: int64 |y| < 2^(31 + n - f), n fractional bits.
- GELU: |x| clipped to 6 * 2^f, x^2 and x^3 kept at f fractional bits (< 2^(2f + 6)),
  z = (C1 * x + C3 * x^3) >> 20 with C1 = round(1.5957691 * 2^20), C3 = round(0.0713548 * 2^20).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from onnx_spike.fixedpoint import INT32_LIMIT
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.neuron import U64
from onnx_spike.operators.site import DecodeBuilder, build_site, golden_site
from onnx_spike.precision import GeluSpec, SiluSpec
from onnx_spike.primitives import division, exp

INPUT_LIMIT = INT32_LIMIT
GELU_SLOPE = math.sqrt(2.0 / math.pi) * 2.0  # 1.5957691: sigma(2u) = (1 + tanh(u)) / 2
GELU_CUBIC = 0.044715
_GELU_CONST_BITS = 20
_GELU_CLIP = 6


def _output_shift(spec: SiluSpec) -> int:
    shift = spec.input_frac_bits + spec.sigmoid_frac_bits - spec.frac_bits
    if shift < 1:
        raise ValueError("silu: input_frac_bits + sigmoid_frac_bits must exceed frac_bits")
    return shift


def _paper_constant(spec: SiluSpec) -> int:
    return round(math.exp(-spec.exp.half_range) * 2**spec.exp.value_bits)


# ---------------------------------------------------------------- golden model


def _round_magnitude(magnitude: np.ndarray, negative: np.ndarray, shift: int, rounding: bool) -> np.ndarray:
    """Shift |y| to the output grid: round half away from zero, or floor toward -inf."""
    if rounding:
        offset = np.full_like(magnitude, U64(1 << (shift - 1)))
    else:
        offset = negative.astype(U64) * U64((1 << shift) - 1)
    scaled = ((magnitude + offset) >> U64(shift)).astype(np.int64)
    return np.where(negative, -scaled, scaled)


def gelu_argument(currents: np.ndarray, frac_bits: int) -> np.ndarray:
    """Integer z = 1.5958 * (x + 0.044715 x^3) at f fractional bits (int64)."""
    clipped = np.clip(currents, -(_GELU_CLIP << frac_bits), _GELU_CLIP << frac_bits)
    magnitude = np.abs(clipped).astype(U64)
    square = (magnitude * magnitude) >> U64(frac_bits)
    cube = ((square * magnitude) >> U64(frac_bits)).astype(np.int64)
    cube = np.where(clipped < 0, -cube, cube)
    c1, c3 = _gelu_constants()
    total = clipped * np.int64(c1) + cube * np.int64(c3)
    scaled = (np.abs(total).astype(U64) >> U64(_GELU_CONST_BITS)).astype(np.int64)
    return np.where(total < 0, -scaled, scaled)


def _gelu_constants() -> tuple[int, int]:
    return (round(GELU_SLOPE * 2**_GELU_CONST_BITS), round(GELU_SLOPE * GELU_CUBIC * 2**_GELU_CONST_BITS))


def silu_counts(currents: np.ndarray, spec: SiluSpec, argument: np.ndarray | None = None) -> np.ndarray:
    """Golden integer core: int64 currents -> int64 output with n fractional bits.

    `argument` is the integer z of x * sigma(z) (GELU); None means z = x (SiLU).
    """
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    negative = currents < 0
    magnitude = np.abs(currents).astype(U64)
    shift = _output_shift(spec)
    one = U64(1 << spec.sigmoid_frac_bits)

    if spec.form == "symmetric":
        z = np.abs(currents if argument is None else argument)
        numerator = exp.pwl_exp(-z, table)
        denominator = numerator + U64(1 << spec.exp.value_bits)
        q = division.divide(spec.division, numerator, denominator, spec.sigmoid_frac_bits, spec.rounding)
        product = magnitude * q
        result = np.where(negative, product, (magnitude << U64(spec.sigmoid_frac_bits)) - product).astype(U64)
        return _round_magnitude(result, negative, shift, spec.rounding)

    half_range = int(spec.exp.half_range * 2**spec.input_frac_bits)
    numerator = exp.pwl_exp(-currents - half_range, table)
    constant = U64(_paper_constant(spec))
    q = division.divide(spec.division, np.full_like(numerator, constant), numerator + constant,
                        spec.sigmoid_frac_bits, spec.rounding)
    q = np.minimum(q, one)
    result = _round_magnitude(magnitude * q, negative, shift, spec.rounding)
    return np.where(currents < -half_range, np.int64(0), result)


def _silu_special(y: np.ndarray, masks: dict) -> np.ndarray:
    y = np.where(masks["nan"] | masks["neg_inf"], np.float32(np.nan), y)
    return np.where(masks["pos_inf"], np.float32(np.inf), y)


def spiking_silu(x: np.ndarray, spec: SiluSpec) -> np.ndarray:
    return golden_site(x, spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                       lambda currents, _: silu_counts(currents, spec), _silu_special)


def spiking_gelu(x: np.ndarray, spec: GeluSpec) -> np.ndarray:
    return golden_site(x, spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                       lambda c, _: silu_counts(c, spec, gelu_argument(c, spec.input_frac_bits)), _silu_special)


# ---------------------------------------------------------------- ONNX functions


def _signed_round(b: GraphBuilder, magnitude: str, negative: str, shift: int, rounding: bool) -> str:
    if rounding:
        offset = b.u64(1 << (shift - 1))
    else:
        offset = b.gate(negative, b.u64((1 << shift) - 1))
    scaled = b.op("Cast", b.shr(b.op("Add", magnitude, offset), shift), to=7)
    return b.op("Where", negative, b.op("Neg", scaled), scaled)


def build_gelu_argument(frac_bits: int) -> FunctionSpec:
    c1, c3 = _gelu_constants()

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (currents,) = inputs
        clipped = b.op("Clip", currents, b.i64(-(_GELU_CLIP << frac_bits)), b.i64(_GELU_CLIP << frac_bits))
        magnitude = b.op("Cast", b.op("Abs", clipped), to=13)
        square = b.shr(b.op("Mul", magnitude, magnitude), frac_bits)
        cube = b.op("Cast", b.shr(b.op("Mul", square, magnitude), frac_bits), to=7)
        negative = b.op("Less", clipped, b.i64(0))
        cube = b.op("Where", negative, b.op("Neg", cube), cube)

        total = b.op("Add", b.op("Mul", clipped, b.i64(c1)), b.op("Mul", cube, b.i64(c3)))
        scaled = b.op("Cast", b.shr(b.op("Cast", b.op("Abs", total), to=13), _GELU_CONST_BITS), to=7)
        return [b.op("Where", b.op("Less", total, b.i64(0)), b.op("Neg", scaled), scaled)]

    return define_function("GeluArgument", {"frac_bits": frac_bits}, ["X"], 1, body,
                           doc="Integer z = 1.5958 * (x + 0.044715 x^3) with x clipped to +-6.")


def build_silu_core(spec: SiluSpec, gelu: bool = False) -> FunctionSpec:
    exp_fn = exp.build_pwl_exp(spec.exp, spec.input_frac_bits)
    divide_fn = division.build_divide(spec.division, spec.sigmoid_frac_bits, spec.rounding)
    argument_fn = build_gelu_argument(spec.input_frac_bits) if gelu else None
    shift = _output_shift(spec)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (currents,) = inputs
        negative = b.op("Less", currents, b.i64(0))
        magnitude = b.op("Cast", b.op("Abs", currents), to=13)

        if spec.form == "symmetric":
            argument = b.call(argument_fn, currents)[0] if argument_fn else currents
            (numerator,) = b.call(exp_fn, b.op("Neg", b.op("Abs", argument)))
            denominator = b.op("Add", numerator, b.u64(1 << spec.exp.value_bits))
            (q,) = b.call(divide_fn, numerator, denominator)
            product = b.op("Mul", magnitude, q)
            complement = b.op("Sub", b.shl(magnitude, spec.sigmoid_frac_bits), product)
            result = b.select(negative, product, complement)
            return [_signed_round(b, result, negative, shift, spec.rounding)]

        half_range = int(spec.exp.half_range * 2**spec.input_frac_bits)
        (numerator,) = b.call(exp_fn, b.op("Sub", b.op("Neg", currents), b.i64(half_range)))
        constant = b.u64(_paper_constant(spec))
        constants = b.op("Add", b.op("Mul", numerator, b.u64(0)), constant)
        (q,) = b.call(divide_fn, constants, b.op("Add", numerator, constant))
        q = b.op("Min", q, b.u64(1 << spec.sigmoid_frac_bits))
        result = _signed_round(b, b.op("Mul", magnitude, q), negative, shift, spec.rounding)
        clipped = b.op("Less", currents, b.i64(-half_range))
        return [b.op("Where", clipped, b.i64(0), result)]

    calls = [exp_fn, divide_fn] + ([argument_fn] if argument_fn else [])
    kind = "GeluCore" if gelu else "SiluCore"
    return define_function(kind, asdict(spec), ["X"], 1, body, calls=calls,
                           doc="Integer x * sigma(z) from PWL-Exp and a division neuron per element.")


def _special_onnx(d: DecodeBuilder, y: str) -> str:
    b = d.b
    y = d.set_where(y, b.op("Or", d.masks["nan"], d.masks["neg_inf"]), np.nan)
    return d.set_where(y, d.masks["pos_inf"], np.inf)


def build_spiking_silu(spec: SiluSpec) -> FunctionSpec:
    spec.validate()
    return build_site("Silu", asdict(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                      build_silu_core(spec), lambda m: [m["currents"]], _special_onnx,
                      doc="Spiking SiLU x * sigma(x) (float in, float out).")


def build_spiking_gelu(spec: GeluSpec) -> FunctionSpec:
    spec.validate()
    return build_site("Gelu", asdict(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                      build_silu_core(spec, gelu=True), lambda m: [m["currents"]], _special_onnx,
                      doc="Spiking GELU x * sigma(1.5958 (x + 0.044715 x^3)) (float in, float out).")
