"""Property tests with Hypothesis over the golden models and the ONNX functions of every operator.

Random shapes (d = 1, odd d, up to 70), scales from 2^-40 to 2^24, constant rows, ties, and
sprinkled NaN, +-inf, float32 extremes and subnormals. Two properties:

- onnxruntime gives the golden model's result bit for bit, for every input, in float32 and fp16;
- for finite float32 inputs inside the encode range, the golden result is within `error_bound`
  of the exact op.

The default profile is derandomized with a modest example count, so the suite is repeatable and
fast. Set HYPOTHESIS_PROFILE=explore for a longer random search.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_spike import reference
from onnx_spike.operators import KINDS, error_bound, golden
from onnx_spike.passes.calibrate import saturation_limit
from onnx_spike.precision import preset

from conftest import run_operator

settings.register_profile("default", max_examples=200, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

PRESETS = ("default", "paper")
NORMS = ("rmsnorm", "layernorm")
# Norm sessions are built per normalized size, so their sizes come from a fixed set.
NORM_DIMS = (1, 2, 3, 7, 8, 33, 64)
SPECIAL_VALUES = (np.nan, np.inf, -np.inf, np.finfo(np.float32).max, np.finfo(np.float32).min, 3e38, -1e30,
                  np.finfo(np.float32).smallest_subnormal, -np.finfo(np.float32).tiny, 0.0, -0.0)
EXACT = {
    "softmax": reference.softmax,
    "silu": reference.silu,
    "gelu": reference.gelu_tanh,
    "rmsnorm": lambda x: reference.rms_norm(x, 1e-5),
    "layernorm": lambda x: reference.layer_norm(x, 1e-5),
}


@st.composite
def activations(draw, kind: str, special: bool, dtype=np.float32) -> np.ndarray:
    """A [rows, d] array of one scale, with optional constant rows, ties and special values."""
    rows = draw(st.integers(1, 4))
    dim = draw(st.sampled_from(NORM_DIMS) if kind in NORMS else st.integers(1, 70))
    unit = draw(arrays(np.float32, (rows, dim), elements=st.floats(-8, 8, width=32)))
    scale = np.float32(2.0 ** draw(st.integers(-40, 24)))
    with np.errstate(over="ignore"):
        x = (unit * scale).astype(dtype)

    for row in draw(st.lists(st.integers(0, rows - 1), max_size=2)):
        x[row] = x[row, 0]  # a constant row
    for row, column, source in draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, dim - 1),
                                                       st.integers(0, dim - 1)), max_size=3)):
        x[row, column] = x[row, source]  # a tie, often with the row max
    if special:
        for row, column, value in draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, dim - 1),
                                                          st.sampled_from(SPECIAL_VALUES)), max_size=4)):
            with np.errstate(over="ignore"):
                x[row, column] = dtype(value)
    return x


@st.composite
def encodable(draw, kind: str, preset_name: str) -> np.ndarray:
    """Finite float32 activations strictly inside the site's encode range."""
    x = draw(activations(kind, special=False))
    spec = preset(preset_name).norm if kind in NORMS else getattr(preset(preset_name), kind)
    limit = saturation_limit(kind, spec.input_frac_bits)
    return np.clip(x, -0.99 * limit, 0.99 * limit).astype(np.float32)


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_onnx_matches_golden(kind, preset_name, data):
    dtype = data.draw(st.sampled_from([np.float32, np.float16]), label="dtype")
    x = data.draw(activations(kind, special=True, dtype=dtype), label="x")
    expected = golden(kind, x, preset(preset_name))
    got = run_operator(kind, preset_name, x)
    mismatch = ~((got == expected) | (np.isnan(got) & np.isnan(expected)))
    note(f"mismatch at {np.argwhere(mismatch).tolist()}: onnx {got[mismatch]}, golden {expected[mismatch]}")
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_golden_within_error_bound(kind, preset_name, data):
    x = data.draw(encodable(kind, preset_name), label="x")
    precision = preset(preset_name)
    error = np.abs(golden(kind, x, precision).astype(np.float64) - EXACT[kind](x))
    bound = error_bound(kind, x, precision)
    over = error > bound
    note(f"over the bound at {np.argwhere(over).tolist()}: x {x[over]}, error {error[over]}, bound {bound[over]}")
    assert not over.any()
