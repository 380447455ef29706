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
- currents X: int32, f fractional bits, saturating at +-(2^31 - 128) (`INT32_LIMIT`) on encode.
- a = |x|: int32 < 2^31; exp offset U: int32 in [0, 2H * 2^f + W]; E: int32 in [0, 2^P];
  B: int32 in [2^P, 2^(P+1)] (P <= 28).
- q: int32 in [0, 2^s] with s = sigmoid_frac_bits; the factor (q or 2^s - q) likewise.
- product a * factor: int64 < 2^(31 + s) <= 2^55.
- output: |y| < 2^(31 + n - f) with n fractional bits; int32 when that fits, else int64.
  Its sign is Clip(x, -1, 1), which is also right for x = 0 because then y = 0.
- GELU: m = min(a, 6 * 2^f) < 2^27, m^2 and m^3 kept at f fractional bits in int64
  (< 2^(2f + 6)), |z| = (C1 * m + C3 * m^3) >> 20 with C1 = round(1.5957691 * 2^20),
  C3 = round(0.0713548 * 2^20), an int32 below 2^(f + 6).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import lru_cache

import numpy as np

from onnx_spike.fixedpoint import INT32_LIMIT
from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function, dtype_for_bits, fast_form
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


def _output_dtype(spec: SiluSpec) -> str:
    return dtype_for_bits(31 + spec.frac_bits - spec.input_frac_bits + 1)


def _paper_constant(spec: SiluSpec) -> int:
    return round(math.exp(-spec.exp.half_range) * 2**spec.exp.value_bits)


def _operands(spec: SiluSpec) -> division.Operands:
    # A = E <= 2^P (or C < 2^P) and B = 2^P + E (or C + E) < 2^(P+2); A <= B, and A < B in the
    # symmetric form (B - A = 2^P), while the paper form has A = B where E = 0.
    bits = spec.exp.value_bits
    return division.Operands(numerator_bits=bits + 1, denominator_bits=bits + 2,
                             dtype="int32" if bits <= 28 else "int64", checked=True,
                             strict=spec.form == "symmetric")


# ---------------------------------------------------------------- golden model


def _round_magnitude(magnitude: np.ndarray, negative: np.ndarray, shift: int, rounding: bool) -> np.ndarray:
    """Shift |y| to the output grid: round half away from zero, or floor toward -inf."""
    if rounding:
        offset = np.int64(1 << (shift - 1))
    else:
        offset = negative.astype(np.int64) * np.int64((1 << shift) - 1)
    scaled = (magnitude + offset) >> shift
    return np.where(negative, -scaled, scaled)


def gelu_argument(currents: np.ndarray, frac_bits: int) -> np.ndarray:
    """Integer z = 1.5958 * (x + 0.044715 x^3) at f fractional bits (int64)."""
    clipped = np.clip(currents.astype(np.int64), -(_GELU_CLIP << frac_bits), _GELU_CLIP << frac_bits)
    magnitude = np.abs(clipped)
    square = (magnitude * magnitude) >> frac_bits
    cube = (square * magnitude) >> frac_bits
    cube = np.where(clipped < 0, -cube, cube)
    c1, c3 = _gelu_constants()
    total = clipped * np.int64(c1) + cube * np.int64(c3)
    scaled = np.abs(total) >> _GELU_CONST_BITS
    return np.where(total < 0, -scaled, scaled)


def _gelu_constants() -> tuple[int, int]:
    return (round(GELU_SLOPE * 2**_GELU_CONST_BITS), round(GELU_SLOPE * GELU_CUBIC * 2**_GELU_CONST_BITS))


def sigma_counts(exponential: np.ndarray, spec: SiluSpec) -> np.ndarray:
    """Return the core's q from E = PWLExp(t): E / (2^P + E) (symmetric) or C / (C + E) (paper)."""
    exponential = exponential.astype(np.int64)
    if spec.form == "symmetric":
        denominator = exponential + np.int64(1 << spec.exp.value_bits)
        return division.divide(spec.division, exponential, denominator, spec.sigmoid_frac_bits, spec.rounding,
                               _operands(spec))
    constant = np.int64(_paper_constant(spec))
    q = division.divide(spec.division, np.full_like(exponential, constant), exponential + constant,
                        spec.sigmoid_frac_bits, spec.rounding, _operands(spec))
    return np.minimum(q, np.int64(1 << spec.sigmoid_frac_bits))


def silu_counts(currents: np.ndarray, spec: SiluSpec, argument: np.ndarray | None = None) -> np.ndarray:
    """Golden integer core: currents -> int64 output with n fractional bits.

    `argument` is the integer z of x * sigma(z) (GELU); None means z = x (SiLU).
    """
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    currents = currents.astype(np.int64)
    negative = currents < 0
    magnitude = np.abs(currents)
    shift = _output_shift(spec)

    if spec.form == "symmetric":
        z = np.abs(currents if argument is None else argument.astype(np.int64))
        q = sigma_counts(exp.pwl_exp(-z, table), spec)
        factor = np.where(negative, q, np.int64(1 << spec.sigmoid_frac_bits) - q)
        return _round_magnitude(magnitude * factor, negative, shift, spec.rounding)

    half_range = int(spec.exp.half_range * 2**spec.input_frac_bits)
    q = sigma_counts(exp.pwl_exp(-currents - half_range, table), spec)
    result = _round_magnitude(magnitude * q, negative, shift, spec.rounding)
    return np.where(currents < -half_range, np.int64(0), result)


@lru_cache(maxsize=8)
def sigma_table(spec: SiluSpec) -> np.ndarray:
    """Return the core's q for every exp offset U in [0, K] (K = 2H * 2^f + W), by the golden steps.

    q depends on x only through U, so the fast form reads it from this table with one
    GatherElements instead of evaluating the exponential and the division per element. The
    entries are the golden model's own values, so the two forms agree bit for bit.
    """
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    reach = table.span + table.width
    offsets = np.arange(reach + 1, dtype=np.int64)
    q = sigma_counts(exp.pwl_exp(offsets - reach, table), spec)
    return q.astype(np.uint16 if spec.sigmoid_frac_bits < 16 else np.int32)


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


def build_gelu_magnitude(frac_bits: int) -> FunctionSpec:
    """|z| of `gelu_argument` from a = |x| (int32 in, int32 out): z has the sign of x."""
    c1, c3 = _gelu_constants()

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (magnitude,) = inputs
        clipped = b.cast(b.op("Min", magnitude, b.int_const(_GELU_CLIP << frac_bits, "int32")), "int64")
        square = b.shr_int(b.op("Mul", clipped, clipped), frac_bits, "int64")
        cube = b.shr_int(b.op("Mul", square, clipped), frac_bits, "int64")
        total = b.op("Add", b.op("Mul", clipped, b.i64(c1)), b.op("Mul", cube, b.i64(c3)))
        return [b.shr_int(total, _GELU_CONST_BITS, "int64", out="int32")]

    return define_function("GeluMagnitude", {"frac_bits": frac_bits}, ["A"], 1, body,
                           doc="Integer |z| = 1.5958 * (a + 0.044715 a^3) >> 20 for a = |x| clipped to 6.")


def _signed_output(b: GraphBuilder, currents: str, magnitude: str, factor: str, shift: int, rounding: bool,
                   out_dtype: str) -> str:
    """sign(x) * round(a * factor / 2^shift): half away from zero, or floor toward -inf."""
    product = b.op("Mul", b.cast(magnitude, "int64"), b.cast(factor, "int64"))
    if rounding:
        offset = b.i64(1 << (shift - 1))
    else:
        # Floor toward -inf: round the magnitude of a negative y up.
        negative = b.op("Neg", b.op("Clip", currents, b.int_const(-1, "int32"), b.int_const(0, "int32")))
        offset = b.op("Mul", b.cast(negative, "int64"), b.i64((1 << shift) - 1))
    scaled = b.shr_int(b.op("Add", product, offset), shift, "int64", out=out_dtype)
    sign = b.op("Clip", currents, b.int_const(-1, "int32"), b.int_const(1, "int32"))
    return b.op("Mul", scaled, sign if out_dtype == "int32" else b.cast(sign, out_dtype))


def build_silu_core(spec: SiluSpec, gelu: bool = False) -> FunctionSpec:
    table = exp.build_table(spec.exp, spec.input_frac_bits)
    operands = _operands(spec)
    exp_fn = exp.build_pwl_exp(spec.exp, spec.input_frac_bits, out_dtype=operands.dtype)
    divide_fn = division.build_divide(spec.division, spec.sigmoid_frac_bits, spec.rounding, operands)
    argument_fn = build_gelu_magnitude(spec.input_frac_bits) if gelu else None
    shift = _output_shift(spec)
    out_dtype = _output_dtype(spec)
    one = 1 << spec.sigmoid_frac_bits
    reach = table.span + table.width  # K: offsets U run over [0, K]

    lookup = fast_form()

    def sigma(b: GraphBuilder, offset: str) -> str:
        """Compute q from the int32 exp offset: the exponential and the division, or the fast form's table."""
        if lookup:
            flat = b.op("Reshape", offset, b.const(np.array([-1], np.int64)))
            q = b.op("GatherElements", b.const(sigma_table(spec)), flat, axis=0)
            return b.op("Reshape", b.cast(q, operands.dtype), b.op("Shape", offset), allowzero=1)
        (numerator,) = b.call(exp_fn, offset)
        if spec.form == "symmetric":
            denominator = b.op("Add", numerator, b.int_const(1 << spec.exp.value_bits, operands.dtype))
            (q,) = b.call(divide_fn, numerator, denominator)
            return q
        constant = b.int_const(_paper_constant(spec), operands.dtype)
        constants = b.op("Expand", constant, b.op("Shape", numerator))
        (q,) = b.call(divide_fn, constants, b.op("Add", numerator, constant))
        return b.op("Min", q, b.int_const(one, operands.dtype))

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (currents,) = inputs
        magnitude = b.op("Abs", currents)
        dtype = operands.dtype

        if spec.form == "symmetric":
            argument = b.call(argument_fn, magnitude)[0] if argument_fn else magnitude
            # U = K - |z| >= K - 2^31 + 128, inside int32.
            offset = b.op("Max", b.op("Sub", b.int_const(reach, "int32"), argument), b.int_const(0, "int32"))
            q = sigma(b, offset)
            # q for x < 0 and 2^s - q for x >= 0 (either for x = 0, where a = 0): |[x > 0] * 2^s - q|.
            positive = b.op("Clip", currents, b.int_const(0, "int32"), b.int_const(1, "int32"))
            upper = b.op("Mul", positive if dtype == "int32" else b.cast(positive, dtype), b.int_const(one, dtype))
            factor = b.op("Abs", b.op("Sub", upper, q))
            return [_signed_output(b, currents, magnitude, factor, shift, spec.rounding, out_dtype)]

        half_range = int(spec.exp.half_range * 2**spec.input_frac_bits)
        # t = -x - H * 2^f, so U = H * 2^f + W - x, clamped by clamping x to [-H * 2^f, H * 2^f + W].
        raised = b.op("Clip", currents, b.int_const(-half_range, "int32"),
                      b.int_const(half_range + table.width, "int32"))
        offset = b.op("Sub", b.int_const(half_range + table.width, "int32"), raised)
        q = sigma(b, offset)
        # y = 0 below -H.
        inside = b.cast(b.op("GreaterOrEqual", currents, b.int_const(-half_range, "int32")), dtype)
        q = b.op("Mul", q, inside)
        return [_signed_output(b, currents, magnitude, q, shift, spec.rounding, out_dtype)]

    calls = ([] if lookup else [exp_fn, divide_fn]) + ([argument_fn] if argument_fn else [])
    kind = "GeluCore" if gelu else "SiluCore"
    return define_function(kind, asdict(spec), ["X"], 1, body, calls=calls,
                           doc="Integer x * sigma(z) from PWL-Exp and a division neuron per element.")


def _special_onnx(d: DecodeBuilder, y: str) -> str:
    # x * [x = +inf]: +inf at +inf, NaN at -inf and NaN (inf * 0, NaN * 0), +-0 elsewhere.
    b = d.b
    return b.op("Add", y, b.op("Mul", d.x, b.op("Cast", d.masks["pos_inf"], to=1)))


def build_spiking_silu(spec: SiluSpec) -> FunctionSpec:
    spec.validate()
    return build_site("Silu", asdict(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                      build_silu_core(spec), core_masks=[], decode_masks=["pos_inf"], special=_special_onnx,
                      dtype="int32", doc="Spiking SiLU x * sigma(x) (float in, float out).")


def build_spiking_gelu(spec: GeluSpec) -> FunctionSpec:
    spec.validate()
    return build_site("Gelu", asdict(spec), spec.input_frac_bits, INPUT_LIMIT, spec.frac_bits,
                      build_silu_core(spec, gelu=True), core_masks=[], decode_masks=["pos_inf"],
                      special=_special_onnx, dtype="int32",
                      doc="Spiking GELU x * sigma(1.5958 (x + 0.044715 x^3)) (float in, float out).")
