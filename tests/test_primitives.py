"""The three primitives: ONNX functions equal their golden models bit for bit, and the golden
models compute what their docstrings claim."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_spike.library import standalone_model
from onnx_spike.neuron import lif_step, population_count
from onnx_spike.precision import ExpSpec
from onnx_spike.primitives import division, exp, norm as polar

from conftest import make_session

U64 = np.uint64
rng = np.random.default_rng(20261204)
ELEM_TYPES = {np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.int64): onnx.TensorProto.INT64}


def run_function(spec, inputs: dict[str, np.ndarray], output_dtypes: list, optimize: bool = True) -> list[np.ndarray]:
    """Run one FunctionSpec on int32/int64 inputs as a checked standalone model in onnxruntime."""
    value_infos = [helper.make_tensor_value_info(name, ELEM_TYPES[array.dtype], [f"{name}_{i}" for i in range(array.ndim)])
                   for name, array in inputs.items()]
    rank = max(array.ndim for array in inputs.values())
    outputs = [helper.make_tensor_value_info(f"Y{i}", ELEM_TYPES[np.dtype(dtype)], [f"out_{j}" for j in range(rank)])
               for i, dtype in enumerate(output_dtypes)]
    model = standalone_model(spec, value_infos, outputs)
    onnx.checker.check_model(model, full_check=True)
    return make_session(model, optimize).run(None, inputs)


def test_bit_length_matches_python(optimize):
    values = rng.integers(0, 2**63 - 1, size=2000, dtype=np.int64) >> rng.integers(0, 63, size=2000)
    values[:6] = [0, 1, 2, 3, 2**62, 2**63 - 1]
    (onnx_out,) = run_function(division.build_bit_length(), {"X": values}, [np.int32], optimize)
    expected = np.array([int(v).bit_length() for v in values])
    np.testing.assert_array_equal(division.bit_length(values), expected)
    np.testing.assert_array_equal(onnx_out, expected)


@pytest.mark.parametrize("dtype,max_bits", [("int32", 26), ("int32", 31), ("int64", 34)])
def test_bit_length_with_narrow_range(optimize, dtype, max_bits):
    values = rng.integers(0, 2**max_bits, size=2000).astype(dtype) >> rng.integers(0, max_bits, size=2000).astype(dtype)
    values[:4] = [0, 1, 2**max_bits - 1, 2 ** (max_bits - 1)]
    (onnx_out,) = run_function(division.build_bit_length(dtype, max_bits), {"X": values}, [np.int32], optimize)
    np.testing.assert_array_equal(onnx_out, [int(v).bit_length() for v in values])


def test_lif_step_soft_reset_and_leak():
    membrane, spike = lif_step(np.array([10], U64), np.array([7], U64), np.array([8], U64))
    assert spike[0] == 1
    assert membrane[0] == 9
    membrane, spike = lif_step(np.array([16], U64), np.array([0], U64), np.array([100], U64), leak_shift=2)
    assert spike[0] == 0
    assert membrane[0] == 12


@pytest.mark.parametrize("neurons", [1, 2, 16, 64])
def test_population_count_is_clamped_floor(neurons):
    theta = rng.integers(1, 1000, size=500)
    membrane = rng.integers(0, 200_000, size=500)
    membrane[:3] = [0, theta[1] * neurons, theta[2] * neurons - 1]
    count, residual = population_count(membrane, theta, neurons)
    expected = np.minimum(membrane // theta, neurons)
    np.testing.assert_array_equal(count, expected)
    np.testing.assert_array_equal(residual, membrane - expected * theta)


def _numerators_denominators(rows: int, cols: int, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    denominators = rng.integers(1, 2**31, size=(rows, 1)) << rng.integers(0, max_bits - 31, size=(rows, 1))
    numerators = (rng.random((rows, cols)) * denominators).astype(np.int64)
    denominators[0] = 1
    numerators[0] = [0, 1] + [0] * (cols - 2)
    numerators[1, 0] = denominators[1, 0]  # A == B
    numerators[2, :] = denominators[2, 0]
    return numerators, denominators


@pytest.mark.parametrize("frac_bits,recip_bits", [(8, 8), (16, 24), (16, 30), (4, 12)])
def test_reciprocal_division_bit_exact(optimize, frac_bits, recip_bits):
    numerators, denominators = _numerators_denominators(64, 33, 58)
    spec = division.build_divide_reciprocal(frac_bits, recip_bits, rounding=True)
    (onnx_out,) = run_function(spec, {"A": numerators, "B": denominators}, [np.int64], optimize)
    golden = division.divide_reciprocal(numerators, denominators, frac_bits, recip_bits, rounding=True)
    np.testing.assert_array_equal(onnx_out, golden)

    exact = numerators.astype(np.float64) / denominators.astype(np.float64) * 2.0**frac_bits
    # Rounding to the grid, 2^-m relative and 2^(n-m) absolute from the shared pre-scale.
    bound = 0.5 + 2 * exact * 2.0**-recip_bits + 2.0 ** (frac_bits - recip_bits) + 1e-9
    assert np.all(np.abs(golden - exact) <= bound)


@pytest.mark.parametrize("frac_bits,recip_bits,rounding", [(16, 24, True), (8, 8, False), (16, 30, True)])
def test_reciprocal_exact_numerator_bit_exact(optimize, frac_bits, recip_bits, rounding):
    """The form that multiplies A unshifted (A * r fits 61 bits), as Softmax uses it."""
    numerator_bits = min(21, 60 - recip_bits)
    operands = division.Operands(numerator_bits=numerator_bits, denominator_bits=62, checked=True)
    denominators = rng.integers(1, 2**31, size=(48, 1)) << rng.integers(0, 25, size=(48, 1))
    numerators = np.minimum((rng.random((48, 17)) * denominators).astype(np.int64), 2**numerator_bits - 1)
    denominators = np.maximum(denominators, numerators.max(axis=1, keepdims=True))
    denominators[0] = 1
    numerators[0] = [0, 1] + [0] * 15
    denominators[1] = 2**numerator_bits - 1
    numerators[1] = np.minimum(numerators[1], denominators[1, 0])
    numerators[1, 0] = denominators[1, 0]  # A == B at the top of the numerator range
    spec = division.build_divide_reciprocal(frac_bits, recip_bits, rounding, operands)
    (onnx_out,) = run_function(spec, {"A": numerators, "B": denominators}, [np.int64], optimize)
    golden = division.divide_reciprocal(numerators, denominators, frac_bits, recip_bits, rounding, operands)
    np.testing.assert_array_equal(onnx_out, golden)

    exact = numerators.astype(np.float64) / denominators.astype(np.float64) * 2.0**frac_bits
    # Grid rounding plus 2^-m relative from each of the reciprocal's floor and B's right shift.
    bound = (0.5 if rounding else 1.0) + 2 * exact * 2.0**-recip_bits + 1e-9
    assert np.all(np.abs(golden - exact) <= bound)


def test_reciprocal_neuron_is_exact_floor():
    recip_bits = 20
    denominators = rng.integers(1 << recip_bits, (1 << (recip_bits + 1)) + 1, size=3000)
    counts = division.reciprocal_neuron(denominators, recip_bits)
    expected = np.array([(1 << (2 * recip_bits + 1)) // int(b) for b in denominators])
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("frac_bits,rounding,denominator_bits,strict", [
    (16, True, 22, False), (15, True, 22, True), (12, False, 26, False), (16, True, 30, False),
    (20, True, 40, True), (8, False, 62, False)])
def test_bitserial_division_is_exact(optimize, frac_bits, rounding, denominator_bits, strict):
    dtype = "int32" if denominator_bits <= 30 else "int64"
    operands = division.Operands(numerator_bits=denominator_bits, denominator_bits=denominator_bits, dtype=dtype,
                                 checked=strict, strict=strict)
    denominators = rng.integers(1, 2**denominator_bits, size=3000, dtype=np.int64) >> rng.integers(0, denominator_bits,
                                                                                                size=3000)
    denominators = np.maximum(denominators, 1)
    numerators = (rng.random(3000) * denominators).astype(np.int64)
    denominators[:5] = [1, 2, 2**denominator_bits - 1, 2**denominator_bits - 1, 7]
    numerators[:5] = [0, 1, 2**denominator_bits - 2, 1, 3]
    if not strict:
        denominators[5:7] = [1, 2**denominator_bits - 1]
        numerators[5:7] = denominators[5:7]  # A == B
    spec = division.build_divide_bitserial(frac_bits, rounding, operands)
    inputs = {"A": numerators.astype(dtype), "B": denominators.astype(dtype)}
    (onnx_out,) = run_function(spec, inputs, [np.dtype(dtype)], optimize)
    golden = division.divide_bitserial(numerators, denominators, frac_bits, rounding, strict)
    np.testing.assert_array_equal(onnx_out, golden)

    half = lambda b: b // 2 if rounding else 0
    expected = [((int(a) << frac_bits) + half(int(b))) // int(b) for a, b in zip(numerators, denominators)]
    np.testing.assert_array_equal(golden, expected)


@pytest.mark.parametrize("time_steps,neurons,guard", [(4, 64, 8), (16, 16, 0), (1, 256, 4), (256, 1, 8)])
def test_population_division_bit_exact(optimize, time_steps, neurons, guard):
    frac_bits = (time_steps * neurons).bit_length() - 1
    numerators, denominators = _numerators_denominators(40, 17, 50)
    spec = division.build_divide_population(frac_bits, time_steps, neurons, guard, rounding=False)
    (onnx_out,) = run_function(spec, {"A": numerators, "B": denominators}, [np.int64], optimize)
    golden = division.divide_population(numerators, denominators, frac_bits, time_steps, neurons, guard)
    np.testing.assert_array_equal(onnx_out, golden)

    # The group computes min(T*L, floor(A' / theta)) with theta = B' >> n after the pre-scale.
    scaled_num, scaled_den = division.normalize(numerators, np.maximum(denominators, 1), 2 * frac_bits + guard)
    theta = np.maximum(scaled_den >> U64(frac_bits), U64(1))
    expected = np.minimum(np.minimum(scaled_num, scaled_den << U64(1)) // theta, U64(time_steps * neurons))
    np.testing.assert_array_equal(golden, expected)


def test_population_division_per_element_int32(optimize):
    """Per-element denominators with a known narrow range, as the paper preset's SiLU uses them."""
    frac_bits, time_steps, neurons, guard = 8, 2, 128, 4
    operands = division.Operands(numerator_bits=21, denominator_bits=22, dtype="int32", checked=True)
    denominators = rng.integers(2**16, 2**21, size=(30, 40))
    numerators = (rng.random((30, 40)) * denominators).astype(np.int64)
    spec = division.build_divide_population(frac_bits, time_steps, neurons, guard, rounding=True, operands=operands)
    inputs = {"A": numerators.astype(np.int32), "B": denominators.astype(np.int32)}
    (onnx_out,) = run_function(spec, inputs, [np.int32], optimize)
    golden = division.divide_population(numerators, denominators, frac_bits, time_steps, neurons, guard, rounding=True)
    np.testing.assert_array_equal(onnx_out, golden)


@pytest.mark.parametrize("spec,input_frac_bits", [(ExpSpec(), 16), (ExpSpec(5.0, 64, 24), 16),
                                                  (ExpSpec(5.0, 64, 16), 12), (ExpSpec(6.0, 128, 20), 10)])
def test_pwl_exp_bit_exact_and_within_chord_bound(optimize, spec, input_frac_bits):
    table = exp.build_table(spec, input_frac_bits)
    span = table.span
    t = -rng.integers(0, span + 1, size=5000).astype(np.int64)
    knots = -np.arange(0, span + 1, table.width, dtype=np.int64)
    t = np.concatenate([t, knots, [0, -1, -span, -span - 1, -span - table.width, -(2**33)]]).astype(np.int64)
    offsets = exp.exp_offset(t, table)
    (onnx_out,) = run_function(exp.build_pwl_exp(spec, input_frac_bits), {"U": offsets}, [np.int64], optimize)
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
    magnitudes = rng.integers(0, 2**30, size=(rows, dim)) >> rng.integers(0, 30, size=(rows, 1))
    magnitudes[0] = 0
    magnitudes[1] = 2**40 - 1  # the largest leaf
    eps_leaf = 1000
    spec = polar.build_polar_norm(dim, eps_leaf, iterations)
    (onnx_out,) = run_function(spec, {"X": magnitudes}, [np.int64], optimize)
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
