"""Primitive 3: PolarNorm, N ~ G^D * ||[x_1 .. x_d, sqrt(eps*d)]||_2 by a CORDIC merge tree.

The d magnitudes and the epsilon leaf (d + 1 leaves) are merged pairwise, level by level.
Each merge runs `iterations` CORDIC vectoring steps on magnitudes, both coordinates updated
from the old values together:

    x' = x + (|y| >> k),   |y'| = | |y| - (x >> k) |,   k = 0 .. iterations - 1

which is `s = sign(y); x' = x + s*(y >> k); y' = y - s*(x >> k)` with the shift applied to the
magnitude (truncation toward zero) so that only unsigned shifts are needed. Every merge scales
its result by the CORDIC gain G = prod_k sqrt(1 + 2^-2k) (1.6468 for 8 or more iterations).
When a level has an odd count, the last element is carried up and scaled by G with a
shift-and-add of the bits of G, so every leaf reaches the root with the same gain G^D,
D = ceil(log2(d + 1)).

Integer state: leaves <= 2^40; every tree value <= G^D * sqrt(d + 1) * 2^40, checked below
2^62 when the function is built (d up to about 2^17). The golden model keeps them in uint64.
The ONNX function keeps x in uint64 and y in int64 within a merge, and the levels in int64.

Error: each merge is within about 2^(-2*iterations + 1) relative of G * hypot, so the root is
within about D * 2^(-2*iterations + 1) relative of G^D * ||v||, plus the truncation of the
shifted terms (at most `iterations` units per merge).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnx_spike.graph import FunctionSpec, GraphBuilder, define_function, fast_form
from onnx_spike.neuron import U64

LEAF_BITS = 40
_GAIN_BITS = 24  # bits of G used by the carry's shift-and-add


def cordic_gain(iterations: int) -> float:
    return math.prod(math.sqrt(1.0 + 2.0 ** (-2 * k)) for k in range(iterations))


def tree_depth(dim: int) -> int:
    return math.ceil(math.log2(dim + 1))


def _gain_shifts(iterations: int) -> list[int]:
    """Shifts j with G ~ sum 2^-j, from the binary digits of G rounded to _GAIN_BITS bits."""
    scaled = round(cordic_gain(iterations) * (1 << _GAIN_BITS))
    return [_GAIN_BITS - bit for bit in range(scaled.bit_length()) if scaled >> bit & 1]


def check_range(dim: int, iterations: int) -> None:
    bound = cordic_gain(iterations) ** tree_depth(dim) * math.sqrt(dim + 1) * 2.0**LEAF_BITS
    if bound >= 2.0**62:
        raise ValueError(f"PolarNorm over {dim} elements could exceed 2^62 in uint64; the largest "
                         "supported normalized dimension is about 2^17")


# ---------------------------------------------------------------- golden model


def cordic_merge(x: np.ndarray, y: np.ndarray, iterations: int) -> np.ndarray:
    x = x.astype(U64)
    y = y.astype(U64)
    for k in range(iterations):
        x_step = y >> U64(k)
        y_step = x >> U64(k)
        x = x + x_step
        y = np.maximum(y, y_step) - np.minimum(y, y_step)
    return x


def carry_gain(value: np.ndarray, iterations: int) -> np.ndarray:
    total = np.zeros_like(value, dtype=U64)
    for shift in _gain_shifts(iterations):
        total = total + (value.astype(U64) >> U64(shift))
    return total


def polar_norm(magnitudes: np.ndarray, eps_leaf: int, iterations: int) -> np.ndarray:
    """[N, d] uint64 magnitudes -> [N, 1] root of the merge tree."""
    leaf = np.full((magnitudes.shape[0], 1), eps_leaf, dtype=U64)
    level = np.concatenate([magnitudes.astype(U64), leaf], axis=1)
    while level.shape[1] > 1:
        count = level.shape[1]
        pairs = count // 2
        merged = cordic_merge(level[:, 0:2 * pairs:2], level[:, 1:2 * pairs:2], iterations)
        if count % 2:
            merged = np.concatenate([merged, carry_gain(level[:, count - 1:], iterations)], axis=1)
        level = merged
    return level


# ---------------------------------------------------------------- ONNX function


def build_polar_norm(dim: int, eps_leaf: int, iterations: int) -> FunctionSpec:
    """Build the ONNX twin of `polar_norm` on int64 magnitudes [N, d].

    The values are those of the golden model's uint64 state, all below 2^62. Each merge keeps
    x in uint64, where it is only shifted and added to, and y in int64, which `Abs` needs, so
    that one Cast per shift remains. In onnxruntime 1.32 this ran 5% faster than int64 state
    with two casts around each shift, and 14% faster than uint64 state with Max and Min for
    |y - x'|. The loop form runs the iterations of a merge level in a Loop. The fast form
    unrolls them with constant shifts, up to 0.5 ms faster per [128, 576] norm, but its
    thousands of nodes take about 125 MB more memory in a loaded SmolLM2 (docs/benchmarks.md).
    """
    check_range(dim, iterations)
    unsigned = onnx.TensorProto.UINT64
    signed = onnx.TensorProto.INT64

    def iterate(b: GraphBuilder, x: str, y: str, amount: str) -> tuple[str, str]:
        y_step = b.op("BitShift", b.op("Cast", y, to=unsigned), amount, direction="RIGHT")
        x_step = b.op("Cast", b.op("BitShift", x, amount, direction="RIGHT"), to=signed)
        return b.op("Add", x, y_step), b.op("Abs", b.op("Sub", y, x_step))

    def merge(b: GraphBuilder, x: str, y: str) -> str:
        # Step k = 0 shifts by nothing, so it runs first without the shifts.
        x, y = b.op("Add", x, y), b.op("Abs", b.op("Sub", y, x))
        if iterations == 1:
            return x
        x = b.op("Cast", x, to=unsigned)
        if fast_form():
            for k in range(1, iterations):
                x, y = iterate(b, x, y, b.const(np.uint64(k)))
        else:

            def step(s: GraphBuilder, iteration: str, state: list[str]) -> list[str]:
                amount = s.op("Cast", s.op("Add", iteration, s.i64(1)), to=unsigned)
                return list(iterate(s, *state, amount))

            x, y = b.loop(iterations - 1, [x, y], step, name_hint="cordic")
        return b.op("Cast", x, to=signed)

    def body(b: GraphBuilder, inputs: list[str]) -> list[str]:
        (magnitudes,) = inputs
        first = b.op("Slice", magnitudes, b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64)),
                     b.const(np.array([1], np.int64)))
        leaf = b.op("Add", b.op("Mul", first, b.i64(0)), b.i64(eps_leaf))
        level = b.op("Concat", magnitudes, leaf, axis=1)

        count = dim + 1
        while count > 1:
            pairs = count // 2

            def take(start: int, stop: int, step: int) -> str:
                return b.op("Slice", level, b.const(np.array([start], np.int64)), b.const(np.array([stop], np.int64)),
                            b.const(np.array([1], np.int64)), b.const(np.array([step], np.int64)))

            merged = merge(b, take(0, 2 * pairs, 2), take(1, 2 * pairs, 2))
            if count % 2:
                carried = take(count - 1, count, 1)
                shifts = _gain_shifts(iterations)
                scaled = b.shr_int(carried, shifts[0], "int64")
                for shift in shifts[1:]:
                    scaled = b.op("Add", scaled, b.shr_int(carried, shift, "int64"))
                merged = b.op("Concat", merged, scaled, axis=1)
            level = merged
            count = pairs + count % 2
        return [level]

    params = {"dim": dim, "eps_leaf": eps_leaf, "iterations": iterations}
    return define_function("PolarNorm", params, ["X"], 1, body,
                           doc="G^D * l2 norm of [|x|, eps leaf] over the last axis of a [N, d] int64 "
                               "input by a CORDIC merge tree; output [N, 1].")
