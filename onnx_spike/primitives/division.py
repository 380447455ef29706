"""Primitive 1: division by neurons, q ~ A / B * 2^n for 0 <= A <= B, on an output grid of 2^-n.

Three forms, each a NumPy golden model and an ONNX function with the same steps:

``bitserial`` (per-element default of SiLU and GELU). One IF neuron whose membrane starts at A
and doubles every step (equivalently, its threshold B halves); it spikes when the membrane
reaches B and then subtracts B (soft reset), and the count is shifted left by one bit per step.
After n + 1 steps the count is q = floor(A * 2^n / B) exactly; with rounding the neuron runs
one step more and q = (count + 1) >> 1 = floor(A * 2^n / B + 1/2). When A < B is known, the
first step (the integer bit, always 0) is skipped.

``reciprocal`` (row-shared default of Softmax and the norms). B is shifted by L or R bits so
that it has exactly m + 1 bits, and the bit-serial neuron divides 2^m by it: m + 2 steps give
r = floor(2^(2m+1) / B_s) in (2^m, 2^(m+1)]. Each numerator then costs one product and one
shift by a per-denominator amount: q = (A * r + half) >> (2m + 1 - n - L + R) while A * r fits
62 bits (`Operands.numerator_bits` + m + 1 <= 61), else q = (min(A >> R, 2^(m+2-L) - 1) * r
+ half) >> (2m + 1 - n - L). When B is shared by a row, the neuron runs once per row.

``population`` (the paper's group). B and A are pre-scaled to 2n + g bits, the threshold is
theta = B >> n, A enters the membrane at the first step, and each of T steps a population of L
neurons with thresholds theta .. L*theta fires c[t] times, which is subtracted as c[t] * theta.
q = sum c[t] = min(T*L, floor(A / theta)).

Integer state (signed; BitShift runs on the unsigned type of the same width):
- bit length of B: int32, 0 .. 63 (B < 2^63).
- bitserial: membrane in [0, 2B), count < 2^(n+2); int32 when B < 2^30, else int64.
- reciprocal: B_s in [2^m, 2^(m+1)], r <= 2^(m+1) (int64 per denominator); product A * r
  < 2^61 in the first form and < 2^(2m+3) <= 2^63 (m <= 30) in the second.
- population (B < 2^62): B_s in [2^(2n+g-1), 2^(2n+g)), theta >= 2^(n+g-1), membrane below
  2^(2n+g) when A <= B (one bit more for A <= 2B, one more with rounding), count q <= T * L
  = 2^n; int32 when the membrane fits 31 bits, uint32 for 32 bits, else int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_spike.graph import fast_form, FunctionSpec, GraphBuilder, define_function, dtype_for_bits
from onnx_spike.neuron import U64, population_count

_BIT_LENGTH_STEPS = (32, 16, 8, 4, 2, 1)
# Largest right shift of the reciprocal form's product; see `_exact_numerator`.
_MAX_PRODUCT_SHIFT = 62


@dataclass(frozen=True)
class Operands:
    """Guarantees of a caller about A and B, which let the division function pick narrow types.

    - numerator_bits, denominator_bits: A < 2^numerator_bits and B < 2^denominator_bits.
    - dtype: the type of A, B and Q in the function's signature ("int32" or "int64").
    - checked: 0 <= A <= B is guaranteed, so the function skips its clamps of A; the results are the
      same either way, because the clamps do nothing on such inputs. B < 1 is always read as 1.
    - strict: A < B is guaranteed as well, so the bit-serial neuron skips its first step, whose
      spike (the integer bit of A / B) is always 0, and starts from the doubled membrane 2A.
    """

    numerator_bits: int = 63
    denominator_bits: int = 63
    dtype: str = "int64"
    checked: bool = False
    strict: bool = False


GENERIC = Operands()


# ---------------------------------------------------------------- golden model


def bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of non-negative values below 2^64 by a comparator bisection (0 for 0)."""
    rest = values.astype(U64)
    length = np.zeros_like(rest)
    for step in _BIT_LENGTH_STEPS:
        upper = rest >> U64(step)
        nonzero = upper != 0
        rest = np.where(nonzero, upper, rest).astype(U64)
        length = length + np.where(nonzero, U64(step), U64(0)).astype(U64)
    return length + (rest != 0).astype(U64)


def normalize(numerator: np.ndarray, denominator: np.ndarray, target_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift A and B by the same amount so that B has `target_bits` bits (B >= 1)."""
    length = bit_length(denominator).astype(np.int64)
    left = np.maximum(target_bits - length, 0).astype(U64)
    right = np.maximum(length - target_bits, 0).astype(U64)
    scaled_den = (denominator.astype(U64) << left) >> right
    scaled_num = (numerator.astype(U64) << left) >> right
    return scaled_num, scaled_den


def divide_bitserial(numerator: np.ndarray, denominator: np.ndarray, frac_bits: int,
                     rounding: bool = True, strict: bool = False) -> np.ndarray:
    """q = floor(A * 2^n / B) (rounding: floor(A * 2^n / B + 1/2)) by one IF neuron.

    `strict` (A < B guaranteed) skips the first step, which cannot spike.
    """
    denominator = np.maximum(np.asarray(denominator, dtype=np.int64), 1)
    membrane = np.clip(np.asarray(numerator, dtype=np.int64), 0, denominator)
    membrane, denominator = np.broadcast_arrays(membrane, denominator)
    count = np.zeros(membrane.shape, dtype=np.int64)
    if strict:
        membrane = 2 * membrane
    for _ in range(frac_bits + 1 + int(rounding) - int(strict)):
        spike = (membrane >= denominator).astype(np.int64)
        membrane = membrane - spike * denominator
        count = 2 * count + spike
        membrane = 2 * membrane
    return (count + 1) >> 1 if rounding else count


def reciprocal_neuron(denominator: np.ndarray, recip_bits: int) -> np.ndarray:
    """floor(2^(2m+1) / B) for B in [2^m, 2^(m+1)]: the bit-serial neuron on 2^m / B, m + 2 steps."""
    return divide_bitserial(np.int64(1 << recip_bits), denominator, recip_bits + 1, rounding=False)


def _exact_numerator(operands: Operands, recip_bits: int) -> bool:
    """Return whether A * r fits 61 bits, so that the reciprocal form multiplies A unshifted.

    Then A * r + half < 2^62, and a shift capped at 62 gives the same result as the full one.
    """
    return operands.numerator_bits + recip_bits + 1 <= 61


def divide_reciprocal(numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, recip_bits: int,
                      rounding: bool = True, operands: Operands = GENERIC) -> np.ndarray:
    """q ~ A / B * 2^n by the normalised reciprocal neuron; A broadcasts against B."""
    m = recip_bits
    denominator = np.maximum(np.asarray(denominator, dtype=np.int64), 1)
    length = bit_length(denominator).astype(np.int64)
    left = np.maximum(m + 1 - length, 0)
    right = np.maximum(length - (m + 1), 0)
    scaled_den = (denominator.astype(U64) << left.astype(U64)) >> right.astype(U64)
    recip = reciprocal_neuron(scaled_den.astype(np.int64), m)

    numerator = np.maximum(np.asarray(numerator, dtype=np.int64), 0)
    if _exact_numerator(operands, m):
        numerator = np.minimum(numerator, (1 << operands.numerator_bits) - 1)
        product = numerator * recip
        shift = np.minimum(2 * m + 1 - frac_bits - left + right, _MAX_PRODUCT_SHIFT)
    else:
        shifted = (numerator.astype(U64) >> right.astype(U64)).astype(np.int64)
        product = np.minimum(shifted, ((1 << (m + 2)) >> left) - 1) * recip
        shift = 2 * m + 1 - frac_bits - left
    half = (np.int64(1) << (shift - 1)) if rounding else np.int64(0)
    return ((product + half).astype(U64) >> shift.astype(U64)).astype(np.int64)


def divide_population(numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, time_steps: int,
                      neurons: int, guard_bits: int, rounding: bool = False) -> np.ndarray:
    """q = min(T*L, floor(A / theta)) with theta = B >> n, by T steps of an L-neuron group."""
    denominator = np.maximum(np.asarray(denominator, dtype=np.int64), 1)
    numerator = np.clip(np.asarray(numerator, dtype=np.int64), 0, 2 * denominator)
    scaled_num, scaled_den = normalize(numerator, denominator, 2 * frac_bits + guard_bits)
    scaled_num = np.minimum(scaled_num, scaled_den << U64(1)).astype(np.int64)
    theta = np.maximum(scaled_den >> U64(frac_bits), U64(1)).astype(np.int64)

    membrane = scaled_num + (theta >> 1 if rounding else 0)
    membrane, theta = np.broadcast_arrays(membrane, theta)
    total = np.zeros(membrane.shape, dtype=np.int64)
    for _ in range(time_steps):
        count, membrane = population_count(membrane, theta, neurons)
        total = total + count
    return total


# ---------------------------------------------------------------- ONNX functions


def _bit_length_steps(max_bits: int) -> list[int]:
    """Bisection steps for values below 2^max_bits: the powers of two below max_bits.

    The largest of them, s, has 2s >= max_bits, so the rest starts below 2^(2s) as each step needs.
    """
    return [step for step in _BIT_LENGTH_STEPS if step < max_bits or step == 1]


def emit_bit_length(b: GraphBuilder, values: str, dtype: str, max_bits: int) -> str:
    """Bit length (int32) of non-negative `values` of type `dtype` below 2^max_bits.

    Each step compares the rest with 2^s and shifts it right by s where it is at least that,
    so the rest stays below 2^(2s') before the next step s' = s / 2.
    """
    unsigned = {"int32": 12, "int64": 13}[dtype]
    unsigned_type = np.uint32 if dtype == "int32" else np.uint64
    rest = b.op("Cast", values, to=unsigned)
    length = None
    for step in _bit_length_steps(max_bits):
        reaches = b.op("GreaterOrEqual", rest, b.const(unsigned_type(1 << step)))
        amount = b.op("Mul", b.cast(reaches, "int32"), b.int_const(step, "int32"))
        length = amount if length is None else b.op("Add", length, amount)
        rest = b.op("BitShift", rest, b.op("Cast", amount, to=unsigned), direction="RIGHT")
    return b.op("Add", length, b.cast(b.op("GreaterOrEqual", rest, b.const(unsigned_type(1))), "int32"))


def build_bit_length(dtype: str = "int64", max_bits: int = 63) -> FunctionSpec:
    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        return [emit_bit_length(b, inputs[0], dtype, max_bits)]

    return define_function("BitLength", {"dtype": dtype, "max_bits": max_bits}, ["X"], 1, body,
                           doc="Bit length (int32) of non-negative integers by a comparator bisection (0 for 0).")


def emit_bitserial_neuron(b: GraphBuilder, numerator: str, denominator: str, steps: int, dtype: str,
                          numerator_bits: int | None = None) -> str:
    """Emit `steps` steps of the bit-serial IF neuron on 0 <= A <= B (type `dtype`); return the count.

    The membrane stays in [0, 2B) because it starts at A <= B, a spike leaves it below B, and
    the doubling brings it below 2B.
    """
    zero = b.int_const(0, dtype)
    if numerator_bits is None:
        numerator_bits = 31 if dtype in ("int32", "uint32") else 62
    if fast_form() and numerator_bits + steps - 1 <= 62:
        # Closed form of the same count: the neuron's spikes are the bits of floor(A * 2^(k-1) / B)
        # for k steps and A <= B (exact: both are non-negative, so Div truncates to the floor).
        scaled = b.op("Mul", b.cast(numerator, "int64"), b.i64(1 << (steps - 1)))
        return b.cast(b.op("Div", scaled, b.cast(denominator, "int64")), dtype)

    def step(s: GraphBuilder, _iteration: str, state: list[str]) -> list[str]:
        membrane, count = state
        spike = s.cast(s.op("GreaterOrEqual", membrane, denominator), dtype)
        reset = s.op("Sub", membrane, s.op("Mul", spike, denominator))
        count = s.op("Add", s.op("Add", count, count), spike)
        return [s.op("Add", reset, reset), count]

    count = b.op("Mul", numerator, zero)
    _, count = b.loop(steps, [numerator, count], step, name_hint="bitserial")
    return count


def build_divide_bitserial(frac_bits: int, rounding: bool, operands: Operands = GENERIC) -> FunctionSpec:
    work = dtype_for_bits(max(operands.denominator_bits + 1, frac_bits + 2))
    if operands.denominator_bits > 62:
        raise ValueError("bitserial division: B must stay below 2^62 so that the membrane (< 2B) fits int64")

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = (b.cast(v, work) if work != operands.dtype else v for v in inputs)
        denominator = b.op("Max", denominator, b.int_const(1, work))
        if not operands.checked:
            numerator = b.op("Min", b.op("Max", numerator, b.int_const(0, work)), denominator)
        if operands.strict:
            numerator = b.op("Add", numerator, numerator)
        steps = frac_bits + 1 + int(rounding) - int(operands.strict)
        count = emit_bitserial_neuron(b, numerator, denominator, steps, work)
        if rounding:
            count = b.shr_int(b.op("Add", count, b.int_const(1, work)), 1, work)
        return [count if work == operands.dtype else b.cast(count, operands.dtype)]

    params = {"frac_bits": frac_bits, "rounding": rounding, "operands": vars(operands)}
    return define_function("DivideBitserial", params, ["A", "B"], 1, body,
                           doc="q = floor(A * 2^n / B) (or rounded) for 0 <= A <= B by one IF neuron, "
                               "n + 1 steps (n + 2 with rounding).")


def build_divide_reciprocal(frac_bits: int, recip_bits: int, rounding: bool,
                            operands: Operands = GENERIC) -> FunctionSpec:
    m = recip_bits
    exact = _exact_numerator(operands, m)
    right_possible = operands.denominator_bits > m + 1

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = (b.cast(v, "int64") if operands.dtype != "int64" else v for v in inputs)
        denominator = b.op("Max", denominator, b.i64(1))
        # Per denominator: the shifts that give B_s exactly m + 1 bits, and the neuron.
        length = emit_bit_length(b, denominator, "int64", operands.denominator_bits)
        left = b.op("Max", b.op("Sub", b.int_const(m + 1, "int32"), length), b.int_const(0, "int32"))
        scaled_den = b.op("BitShift", b.op("Cast", denominator, to=13), b.shift_amount(left, "int64"),
                          direction="LEFT")
        if right_possible:
            right = b.op("Max", b.op("Sub", length, b.int_const(m + 1, "int32")), b.int_const(0, "int32"))
            right_u = b.shift_amount(right, "int64")
            scaled_den = b.op("BitShift", scaled_den, right_u, direction="RIGHT")
        recip = emit_bitserial_neuron(b, b.i64(1 << m), b.cast(scaled_den, "int64"), m + 2, "int64",
                                      numerator_bits=m + 1)

        # Per numerator: one product and one shift.
        shift = b.op("Sub", b.int_const(2 * m + 1 - frac_bits, "int32"), left)
        if exact:
            if right_possible:
                shift = b.op("Min", b.op("Add", shift, right), b.int_const(_MAX_PRODUCT_SHIFT, "int32"))
            if not operands.checked:
                numerator = b.op("Min", b.op("Max", numerator, b.i64(0)), b.i64((1 << operands.numerator_bits) - 1))
            product = b.op("Mul", numerator, recip)
        else:
            if not operands.checked:
                numerator = b.op("Max", numerator, b.i64(0))
            if right_possible:
                numerator = b.shr_int(numerator, right_u, "int64")
            limit = b.op("Sub", b.op("BitShift", b.u64(1 << (m + 2)), b.shift_amount(left, "int64"),
                                     direction="RIGHT"), b.u64(1))
            numerator = b.op("Min", numerator, b.cast(limit, "int64"))
            product = b.op("Mul", numerator, recip)
        shift_u = b.shift_amount(shift, "int64")
        if rounding:
            half = b.op("BitShift", b.u64(1), b.shift_amount(b.op("Sub", shift, b.int_const(1, "int32")), "int64"),
                        direction="LEFT")
            product = b.op("Add", product, b.cast(half, "int64"))
        return [b.shr_int(product, shift_u, "int64", out=operands.dtype)]

    params = {"frac_bits": frac_bits, "recip_bits": recip_bits, "rounding": rounding, "operands": vars(operands)}
    return define_function("DivideReciprocal", params, ["A", "B"], 1, body,
                           doc="q ~ A / B * 2^n: per-denominator shift and reciprocal neuron, one product "
                               "and one shift per A.")


def emit_population(b: GraphBuilder, membrane: str, theta: str, time_steps: int, neurons: int, dtype: str) -> str:
    """T steps of an L-neuron group with thresholds theta .. L*theta; returns the total count.

    `membrane` must have the full shape (theta may broadcast against it).

    Each step finds the count bit by bit from the most significant one. A neuron of threshold
    theta * 2^k fires when the residual membrane reaches it, and its charge is subtracted. The
    top neuron, tested last against theta, brings the count to L. This gives the same count and
    charge as the comparisons of the full membrane with the partial sums of the thresholds.
    """
    levels = neurons.bit_length() - 1
    if fast_form():
        # Closed form: T steps of L neurons emit min(T*L, floor(v / theta)) spikes in total.
        quotient = b.op("Div", b.cast(membrane, "int64"), b.cast(theta, "int64"))
        return b.cast(b.op("Min", quotient, b.i64(time_steps * neurons)), dtype)
    thresholds = [theta] + [b.op("Mul", theta, b.int_const(1 << bit, dtype)) for bit in range(1, levels)]

    def step(s: GraphBuilder, _iteration: str, state: list[str]) -> list[str]:
        membrane, total = state
        for bit in list(reversed(range(levels))) + [0]:
            fires = s.cast(s.op("GreaterOrEqual", membrane, thresholds[bit]), dtype)
            membrane = s.op("Sub", membrane, s.op("Mul", fires, thresholds[bit]))
            weight = fires if bit == 0 else s.op("Mul", fires, s.int_const(1 << bit, dtype))
            total = s.op("Add", total, weight)
        return [membrane, total]

    total = b.op("Mul", membrane, b.int_const(0, dtype))
    _, total = b.loop(time_steps, [membrane, total], step, name_hint="population")
    return total


def build_divide_population(frac_bits: int, time_steps: int, neurons: int, guard_bits: int,
                            rounding: bool, operands: Operands = GENERIC) -> FunctionSpec:
    target = 2 * frac_bits + guard_bits
    # Membrane bound: A_s <= B_s < 2^target when A <= B (2 B_s otherwise), plus theta / 2 when
    # rounding. uint32 Add and Mul ran as fast as int32 ones, and 3 to 4 times faster than
    # 64-bit ones, in onnxruntime 1.32 (docs/benchmarks.md).
    membrane_bits = target + (0 if operands.checked else 1) + int(rounding)
    work = "uint32" if membrane_bits == 32 else dtype_for_bits(membrane_bits)
    right_possible = operands.denominator_bits > target
    # The pre-scale shifts run on uint32 where the shifted values stay below 2^32.
    narrow = target <= 32 and operands.checked
    den_shift = "uint32" if narrow and operands.denominator_bits <= 32 else "uint64"
    num_shift = "uint32" if narrow and operands.numerator_bits <= 32 else "uint64"

    def convert(b: GraphBuilder, value: str, source: str, dtype: str) -> str:
        return value if source == dtype else b.cast(value, dtype)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = inputs
        source = operands.dtype
        if not operands.checked:
            numerator, denominator = (convert(b, v, source, "int64") for v in inputs)
            source = "int64"
        denominator = b.op("Max", denominator, b.int_const(1, source))
        if not operands.checked:
            numerator = b.op("Min", b.op("Max", numerator, b.i64(0)), b.op("Add", denominator, denominator))
        length = emit_bit_length(b, denominator, source, operands.denominator_bits)
        left = b.op("Max", b.op("Sub", b.int_const(target, "int32"), length), b.int_const(0, "int32"))
        right = (b.op("Max", b.op("Sub", length, b.int_const(target, "int32")), b.int_const(0, "int32"))
                 if right_possible else None)

        def prescale(value: str, shift_type: str) -> str:
            shifted = b.op("BitShift", convert(b, value, source, shift_type), b.cast(left, shift_type),
                           direction="LEFT")
            if right is not None:
                shifted = b.op("BitShift", shifted, b.cast(right, shift_type), direction="RIGHT")
            return convert(b, shifted, shift_type, work)

        scaled_den = prescale(denominator, den_shift)
        scaled_num = prescale(numerator, num_shift)
        if not operands.checked:
            scaled_num = b.op("Min", scaled_num, b.op("Add", scaled_den, scaled_den))
        theta = b.op("Max", b.shr_int(scaled_den, frac_bits, work), b.int_const(1, work))

        membrane = scaled_num
        if rounding:
            membrane = b.op("Add", membrane, b.shr_int(theta, 1, work))
        total = emit_population(b, membrane, theta, time_steps, neurons, work)
        return [convert(b, total, work, operands.dtype)]

    params = {"frac_bits": frac_bits, "time_steps": time_steps, "neurons": neurons,
              "guard_bits": guard_bits, "rounding": rounding, "operands": vars(operands)}
    return define_function("DividePopulation", params, ["A", "B"], 1, body,
                           doc="q = min(T*L, floor(A / theta)), theta = B >> n, by an L-neuron group over T steps.")


def build_divide(spec, frac_bits: int, rounding: bool, operands: Operands = GENERIC) -> FunctionSpec:
    """The ONNX division function for a DivisionSpec."""
    if spec.method == "bitserial":
        return build_divide_bitserial(frac_bits, rounding, operands)
    if spec.method == "reciprocal":
        return build_divide_reciprocal(frac_bits, spec.reciprocal_bits, rounding, operands)
    return build_divide_population(frac_bits, spec.time_steps, spec.neurons, spec.theta_guard_bits, rounding,
                                   operands)


def divide(spec, numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, rounding: bool,
           operands: Operands = GENERIC) -> np.ndarray:
    """Golden twin of `build_divide` (int64 result)."""
    if spec.method == "bitserial":
        return divide_bitserial(numerator, denominator, frac_bits, rounding, operands.strict)
    if spec.method == "reciprocal":
        return divide_reciprocal(numerator, denominator, frac_bits, spec.reciprocal_bits, rounding, operands)
    return divide_population(numerator, denominator, frac_bits, spec.time_steps, spec.neurons,
                             spec.theta_guard_bits, rounding)
