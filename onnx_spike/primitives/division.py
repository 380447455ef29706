"""Primitive 1: division by neurons, q ~ A / B for 0 <= A <= B, on an output grid of 2^-n.

Two forms, each a NumPy golden model and an ONNX function with the same steps:

``reciprocal`` (project default). A and B are shifted by the same per-denominator amount so
that B has exactly m + 1 bits (the pre-scale of the denominator stage). One bit-serial IF
neuron then divides 2^m by B: its membrane starts at 2^m << (m + 1), its threshold starts at
B << (m + 1) and halves every step, and the spike of step k is worth 2^(m + 1 - k), so after
m + 2 steps the count is r = floor(2^(2m+1) / B) in (2^m, 2^(m+1)] with no floor on a threshold.
Each numerator then costs one product and one shift: q = (A * r + half) >> (2m + 1 - n).
When B is shared by a row (Softmax, norms), the neuron runs once per row.

``population`` (the paper's group). B and A are pre-scaled to 2n + g bits, the threshold is
theta = B >> n, A enters the membrane at the first step, and each of T steps a population of L
neurons with thresholds theta .. L*theta fires c[t] times, which is subtracted as c[t] * theta.
q = sum c[t] = min(T*L, floor(A / theta)).

Integer state (uint64 throughout):
- bit length e of B: 0 .. 64.
- reciprocal form: normalised B in [2^m, 2^(m+1)], A likewise after the same shift (A <= B,
  values above 2^(m+2) - 1 saturate there), membrane <= 2^(2m+1), threshold <= 2^(2m+2),
  count r <= 2^(m+1), product A * r < 2^(2m+3) <= 2^63 for m <= 30.
- population form: B in [2^(2n+g-1), 2^(2n+g)), theta >= 2^(n+g-1), membrane <= 2^(2n+g+1),
  count q <= T * L = 2^n.
"""

from __future__ import annotations

import numpy as np

from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function
from onnx_spike.neuron import U64, population_count

_BIT_LENGTH_STEPS = (32, 16, 8, 4, 2, 1)


# ---------------------------------------------------------------- golden model


def bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of uint64 values by a comparator bisection (0 for 0)."""
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


def reciprocal_neuron(denominator: np.ndarray, recip_bits: int) -> np.ndarray:
    """floor(2^(2m+1) / B) for B in [2^m, 2^(m+1)] by one bit-serial IF neuron, m + 2 steps."""
    frac = recip_bits + 1
    threshold = denominator.astype(U64) << U64(frac)
    membrane = np.full_like(threshold, U64(1) << U64(recip_bits + frac))
    count = np.zeros_like(threshold)
    for _ in range(frac + 1):
        spike = membrane >= threshold
        membrane = membrane - np.where(spike, threshold, U64(0)).astype(U64)
        count = (count << U64(1)) + spike.astype(U64)
        threshold = threshold >> U64(1)
    return count


def divide_reciprocal(numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, recip_bits: int,
                      rounding: bool = True) -> np.ndarray:
    """q ~ A / B * 2^n by the normalised reciprocal neuron; A broadcasts against B."""
    denominator = np.maximum(denominator.astype(U64), U64(1))
    scaled_num, scaled_den = normalize(numerator, denominator, recip_bits + 1)
    scaled_num = np.minimum(scaled_num, U64((1 << (recip_bits + 2)) - 1))

    recip = reciprocal_neuron(scaled_den, recip_bits)
    shift = 2 * recip_bits + 1 - frac_bits
    half = U64(1 << (shift - 1)) if rounding else U64(0)
    return (scaled_num * recip + half) >> U64(shift)


def divide_population(numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, time_steps: int,
                      neurons: int, guard_bits: int, rounding: bool = False) -> np.ndarray:
    """q = min(T*L, floor(A / theta)) with theta = B >> n, by T steps of an L-neuron group."""
    denominator = np.maximum(denominator.astype(U64), U64(1))
    scaled_num, scaled_den = normalize(numerator, denominator, 2 * frac_bits + guard_bits)
    scaled_num = np.minimum(scaled_num, scaled_den << U64(1))
    theta = np.maximum(scaled_den >> U64(frac_bits), U64(1))
    shifted = [theta << U64(b) for b in range(neurons.bit_length())]

    membrane = scaled_num + (theta >> U64(1) if rounding else U64(0))
    membrane, theta_b = np.broadcast_arrays(membrane, theta)
    membrane = membrane.astype(U64)
    shifted = [np.broadcast_to(s, membrane.shape) for s in shifted]
    total = np.zeros_like(membrane)
    for _ in range(time_steps):
        count, charge = population_count(membrane, shifted, neurons)
        membrane = membrane - charge
        total = total + count
    return total


# ---------------------------------------------------------------- ONNX functions


def build_bit_length() -> FunctionSpec:
    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (rest,) = inputs
        length = b.op("Mul", rest, b.u64(0))
        for step in _BIT_LENGTH_STEPS:
            upper = b.shr(rest, step)
            nonzero = b.op("Greater", upper, b.u64(0))
            rest = b.select(nonzero, upper, rest)
            length = b.op("Add", length, b.gate(nonzero, b.u64(step)))
        last = b.op("Cast", b.op("Greater", rest, b.u64(0)), to=13)
        return [b.op("Add", length, last)]

    return define_function("BitLength", {}, ["X"], 1, body,
                           doc="Bit length of uint64 values by a comparator bisection (0 for 0).")


def build_normalize(target_bits: int) -> FunctionSpec:
    bit_length_fn = build_bit_length()

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = inputs
        (length,) = b.call(bit_length_fn, denominator)
        length = b.op("Cast", length, to=7)
        left = b.op("Cast", b.op("Max", b.op("Sub", b.i64(target_bits), length), b.i64(0)), to=13)
        right = b.op("Cast", b.op("Max", b.op("Sub", length, b.i64(target_bits)), b.i64(0)), to=13)
        scaled_den = b.shr(b.shl(denominator, left), right)
        scaled_num = b.shr(b.shl(numerator, left), right)
        return [scaled_num, scaled_den]

    return define_function("Normalize", {"target_bits": target_bits}, ["A", "B"], 2, body,
                           calls=[bit_length_fn],
                           doc="Shift A and B by the same amount so that B has target_bits bits.")


def build_reciprocal_neuron(recip_bits: int) -> FunctionSpec:
    frac = recip_bits + 1

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (denominator,) = inputs
        threshold = b.shl(denominator, frac)
        membrane = b.op("Expand", b.u64(1 << (recip_bits + frac)), b.op("Shape", threshold))
        count = b.op("Mul", threshold, b.u64(0))

        def step(s: GraphBuilder, _iteration: str, state: list[str]) -> list[str]:
            membrane, threshold, count = state
            spike = s.op("GreaterOrEqual", membrane, threshold)
            membrane = s.op("Sub", membrane, s.gate(spike, threshold))
            count = s.op("Add", s.shl(count, 1), s.op("Cast", spike, to=13))
            threshold = s.shr(threshold, 1)
            return [membrane, threshold, count]

        _, _, count = b.loop(frac + 1, [membrane, threshold, count], step, name_hint="recip")
        return [count]

    return define_function("ReciprocalNeuron", {"recip_bits": recip_bits}, ["B"], 1, body,
                           doc="floor(2^(2m+1) / B) for B in [2^m, 2^(m+1)] by a bit-serial IF neuron.")


def build_divide_reciprocal(frac_bits: int, recip_bits: int, rounding: bool) -> FunctionSpec:
    normalize_fn = build_normalize(recip_bits + 1)
    neuron_fn = build_reciprocal_neuron(recip_bits)
    shift = 2 * recip_bits + 1 - frac_bits

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = inputs
        denominator = b.op("Max", denominator, b.u64(1))
        scaled_num, scaled_den = b.call(normalize_fn, numerator, denominator)
        scaled_num = b.op("Min", scaled_num, b.u64((1 << (recip_bits + 2)) - 1))

        (recip,) = b.call(neuron_fn, scaled_den)
        product = b.op("Mul", scaled_num, recip)
        if rounding:
            product = b.op("Add", product, b.u64(1 << (shift - 1)))
        return [b.shr(product, shift)]

    params = {"frac_bits": frac_bits, "recip_bits": recip_bits, "rounding": rounding}
    return define_function("DivideReciprocal", params, ["A", "B"], 1, body, calls=[normalize_fn, neuron_fn],
                           doc="q ~ A / B * 2^n: shared pre-scale, reciprocal neuron, one product per A.")


def build_divide_population(frac_bits: int, time_steps: int, neurons: int, guard_bits: int,
                            rounding: bool) -> FunctionSpec:
    normalize_fn = build_normalize(2 * frac_bits + guard_bits)
    levels = neurons.bit_length() - 1

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        numerator, denominator = inputs
        denominator = b.op("Max", denominator, b.u64(1))
        scaled_num, scaled_den = b.call(normalize_fn, numerator, denominator)
        scaled_num = b.op("Min", scaled_num, b.shl(scaled_den, 1))
        theta = b.op("Max", b.shr(scaled_den, frac_bits), b.u64(1))
        shifted = [b.shl(theta, bit) for bit in range(levels + 1)]

        membrane = scaled_num
        if rounding:
            membrane = b.op("Add", membrane, b.shr(theta, 1))
        # Broadcast once so the Loop state keeps one shape.
        membrane = b.op("Add", membrane, b.op("Mul", theta, b.u64(0)))
        total = b.op("Mul", membrane, b.u64(0))

        def step(s: GraphBuilder, _iteration: str, state: list[str]) -> list[str]:
            membrane, total = state
            count = s.op("Mul", membrane, s.u64(0))
            charge = count
            for bit in reversed(range(levels)):
                fires = s.op("Cast", s.op("GreaterOrEqual", membrane, s.op("Add", charge, shifted[bit])), to=13)
                charge = s.op("Add", charge, s.op("Mul", fires, shifted[bit]))
                count = s.op("Add", s.shl(count, 1), fires)
            top = s.op("Cast", s.op("GreaterOrEqual", membrane, shifted[levels]), to=13)
            count = s.op("Add", count, top)
            charge = s.op("Add", charge, s.op("Mul", top, shifted[0]))
            return [s.op("Sub", membrane, charge), s.op("Add", total, count)]

        _, total = b.loop(time_steps, [membrane, total], step, name_hint="population")
        return [total]

    params = {"frac_bits": frac_bits, "time_steps": time_steps, "neurons": neurons,
              "guard_bits": guard_bits, "rounding": rounding}
    return define_function("DividePopulation", params, ["A", "B"], 1, body, calls=[normalize_fn],
                           doc="q = min(T*L, floor(A / theta)), theta = B >> n, by an L-neuron group over T steps.")


def build_divide(spec, frac_bits: int, rounding: bool) -> FunctionSpec:
    """The ONNX division function for a DivisionSpec."""
    if spec.method == "reciprocal":
        return build_divide_reciprocal(frac_bits, spec.reciprocal_bits, rounding)
    return build_divide_population(frac_bits, spec.time_steps, spec.neurons, spec.theta_guard_bits, rounding)


def divide(spec, numerator: np.ndarray, denominator: np.ndarray, frac_bits: int, rounding: bool) -> np.ndarray:
    """Golden twin of `build_divide`."""
    if spec.method == "reciprocal":
        return divide_reciprocal(numerator, denominator, frac_bits, spec.reciprocal_bits, rounding)
    return divide_population(numerator, denominator, frac_bits, spec.time_steps, spec.neurons,
                             spec.theta_guard_bits, rounding)
