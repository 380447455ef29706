"""The three primitives: ONNX functions equal their golden models bit for bit, and the golden
models compute what their docstrings claim."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_spike.neuron import lif_step, population_count
from onnx_spike.precision import ExpSpec
from onnx_spike.primitives import division, exp, norm as polar

from conftest import run_function

U64 = np.uint64
rng = np.random.default_rng(20261204)


def test_bit_length_matches_python(optimize):
    values = rng.integers(0, 2**63 - 1, size=2000, dtype=np.uint64) >> rng.integers(0, 63, size=2000).astype(U64)
    values[:6] = [0, 1, 2, 3, 2**62, 2**63 - 1]
    (onnx_out,) = run_function(division.build_bit_length(), {"X": values}, [np.uint64], optimize)
    expected = np.array([int(v).bit_length() for v in values], dtype=U64)
    np.testing.assert_array_equal(division.bit_length(values), expected)
    np.testing.assert_array_equal(onnx_out, expected)


def test_lif_step_soft_reset_and_leak():
    membrane, spike = lif_step(np.array([10], U64), np.array([7], U64), np.array([8], U64))
    assert spike[0] == 1 and membrane[0] == 9
    membrane, spike = lif_step(np.array([16], U64), np.array([0], U64), np.array([100], U64), leak_shift=2)
    assert spike[0] == 0 and membrane[0] == 12


@pytest.mark.parametrize("neurons", [1, 2, 16, 64])
def test_population_count_is_clamped_floor(neurons):
    theta = rng.integers(1, 1000, size=500).astype(U64)
    membrane = rng.integers(0, 200_000, size=500).astype(U64)
    membrane[:3] = [0, theta[1] * U64(neurons), theta[2] * U64(neurons) - U64(1)]
    shifted = [theta << U64(b) for b in range(neurons.bit_length())]
    count, charge = population_count(membrane, shifted, neurons)
    expected = np.minimum(membrane // theta, U64(neurons))
    np.testing.assert_array_equal(count, expected)
    np.testing.assert_array_equal(charge, expected * theta)


def _numerators_denominators(rows: int, cols: int, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    denominators = (rng.integers(1, 2**31, size=(rows, 1)).astype(U64)
                    << rng.integers(0, max_bits - 31, size=(rows, 1)).astype(U64))
    numerators = (rng.random((rows, cols)) * denominators).astype(U64)
    denominators[0] = 1
    numerators[0] = [0, 1] + [0] * (cols - 2)
    numerators[1, 0] = denominators[1, 0]  # A == B
    numerators[2, :] = denominators[2, 0]
    return numerators, denominators


@pytest.mark.parametrize("frac_bits,recip_bits", [(8, 8), (16, 24), (16, 30), (4, 12)])
def test_reciprocal_division_bit_exact(optimize, frac_bits, recip_bits):
    numerators, denominators = _numerators_denominators(64, 33, 58)
    spec = division.build_divide_reciprocal(frac_bits, recip_bits, rounding=True)
    (onnx_out,) = run_function(spec, {"A": numerators, "B": denominators}, [np.uint64], optimize)
    golden = division.divide_reciprocal(numerators, denominators, frac_bits, recip_bits, rounding=True)
    np.testing.assert_array_equal(onnx_out, golden)

    exact = numerators.astype(np.float64) / denominators.astype(np.float64) * 2.0**frac_bits
    # Rounding to the grid, 2^-m relative and 2^(n-m) absolute from the shared pre-scale.
    bound = 0.5 + 2 * exact * 2.0**-recip_bits + 2.0 ** (frac_bits - recip_bits) + 1e-9
    assert np.all(np.abs(golden - exact) <= bound)


def test_reciprocal_neuron_is_exact_floor():
    recip_bits = 20
    denominators = rng.integers(1 << recip_bits, (1 << (recip_bits + 1)) + 1, size=3000).astype(U64)
    counts = division.reciprocal_neuron(denominators, recip_bits)
    expected = np.array([(1 << (2 * recip_bits + 1)) // int(b) for b in denominators], dtype=U64)
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("time_steps,neurons,guard", [(4, 64, 8), (16, 16, 0), (1, 256, 4), (256, 1, 8)])
def test_population_division_bit_exact(optimize, time_steps, neurons, guard):
    frac_bits = (time_steps * neurons).bit_length() - 1
    numerators, denominators = _numerators_denominators(40, 17, 50)
    spec = division.build_divide_population(frac_bits, time_steps, neurons, guard, rounding=False)
    (onnx_out,) = run_function(spec, {"A": numerators, "B": denominators}, [np.uint64], optimize)
    golden = division.divide_population(numerators, denominators, frac_bits, time_steps, neurons, guard)
    np.testing.assert_array_equal(onnx_out, golden)

    # The group computes min(T*L, floor(A' / theta)) with theta = B' >> n after the pre-scale.
    scaled_num, scaled_den = division.normalize(numerators, np.maximum(denominators, U64(1)), 2 * frac_bits + guard)
    theta = np.maximum(scaled_den >> U64(frac_bits), U64(1))
    expected = np.minimum(np.minimum(scaled_num, scaled_den << U64(1)) // theta, U64(time_steps * neurons))
    np.testing.assert_array_equal(golden, expected)


@pytest.mark.parametrize("spec,input_frac_bits", [(ExpSpec(), 16), (ExpSpec(5.0, 64, 24), 16),
                                                  (ExpSpec(5.0, 64, 16), 12), (ExpSpec(6.0, 128, 20), 10)])
def test_pwl_exp_bit_exact_and_within_chord_bound(optimize, spec, input_frac_bits):
    table = exp.build_table(spec, input_frac_bits)
    span = table.span
    t = -rng.integers(0, span + 1, size=5000).astype(np.int64)
    knots = -np.arange(0, span + 1, table.width, dtype=np.int64)
    t = np.concatenate([t, knots, [0, -1, -span, -span - 1, -(2**33), 5]]).astype(np.int64)
    (onnx_out,) = run_function(exp.build_pwl_exp(spec, input_frac_bits), {"T": t}, [np.uint64], optimize)
    golden = exp.pwl_exp(t, table)
    np.testing.assert_array_equal(onnx_out, golden)

    inside = (t >= -span) & (t <= 0)
    exact = np.exp(t[inside] / 2.0**input_frac_bits) * 2.0**spec.value_bits
    error = golden[inside].astype(np.float64) - exact
    assert np.all(error <= exact * table.relative_chord_error + 1.5)
    assert np.all(error >= -1.5)  # the chord lies above e^t, up to rounding
    assert np.all(golden[t < -span] == 0)
    assert golden[t == 0][0] == 2**spec.value_bits


def test_exp_table_rejects_off_grid_knots():
    with pytest.raises(ValueError, match="knot spacing"):
        exp.build_table(ExpSpec(5.0, 48, 20), 8)


@pytest.mark.parametrize("dim", [1, 2, 7, 64, 576, 5120])
def test_polar_norm_bit_exact_and_within_cordic_bound(optimize, dim):
    iterations = 8 if dim > 1000 else 12
    rows = 4 if dim > 1000 else 32
    magnitudes = rng.integers(0, 2**30, size=(rows, dim)).astype(U64) >> rng.integers(0, 30, size=(rows, 1)).astype(U64)
    magnitudes[0] = 0
    magnitudes[1] = 2**40 - 1  # the largest leaf
    eps_leaf = 1000
    spec = polar.build_polar_norm(dim, eps_leaf, iterations)
    (onnx_out,) = run_function(spec, {"X": magnitudes}, [np.uint64], optimize)
    golden = polar.polar_norm(magnitudes, eps_leaf, iterations)
    np.testing.assert_array_equal(onnx_out, golden)

    depth = polar.tree_depth(dim)
    total_gain = polar.cordic_gain(iterations) ** depth
    exact = np.sqrt((magnitudes.astype(np.float64) ** 2).sum(axis=1, keepdims=True) + eps_leaf**2) * total_gain
    relative = depth * 2.0 ** (1 - 2 * iterations) + 2.0**-23
    # Truncated shifts: at most 2 units per iteration and merge, amplified by the gains above.
    truncation = 2 * iterations * depth * total_gain
    assert np.all(np.abs(golden - exact) <= exact * relative + truncation)


def test_polar_norm_rejects_dimension_beyond_uint64():
    with pytest.raises(ValueError, match="2\\^62"):
        polar.check_range(2**20, 12)


def test_cordic_gain_value():
    assert math.isclose(polar.cordic_gain(8), 1.6467, rel_tol=1e-4)
