"""The spiking operators: bit-exact against the golden model in onnxruntime, inside their error
bounds against the exact op, and at least as accurate as the authors' float reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_spike import audit, reference
from onnx_spike.operators import KINDS, error_bound, golden, operator_model
from onnx_spike.precision import preset

from conftest import make_session, run_operator

rng = np.random.default_rng(7)
PRESETS = ("default", "paper")
EXACT = {
    "softmax": reference.softmax,
    "silu": reference.silu,
    "gelu": reference.gelu_tanh,
    "rmsnorm": lambda x: reference.rms_norm(x, 1e-5),
    "layernorm": lambda x: reference.layer_norm(x, 1e-5),
}


def _inputs(kind: str, dim: int) -> list[np.ndarray]:
    """Random and edge inputs of shape [rows, dim] for one kind."""
    scale = 7.0 if kind == "softmax" else 3.0
    cases = [(rng.standard_normal((64, dim)) * scale).astype(np.float32)]
    edges = np.zeros((8, dim), np.float32)
    edges[1] = 1.0  # all equal
    edges[2, :] = -3.0
    edges[2, 0] = edges[2, -1] = 2.0  # a tie for the max
    edges[3] = np.linspace(-40, 40, dim)
    edges[4] = 1e-6 * rng.standard_normal(dim)
    edges[5] = 5e4 * rng.standard_normal(dim)  # beyond the int32 currents of Softmax and SiLU
    edges[6] = -np.abs(rng.standard_normal(dim)) * 20
    edges[7, ::2] = 2.0**-20
    cases.append(edges)
    return cases


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind,dim", [("softmax", 1), ("softmax", 7), ("softmax", 64), ("softmax", 1000),
                                      ("silu", 33), ("gelu", 33), ("rmsnorm", 1), ("rmsnorm", 7), ("rmsnorm", 576),
                                      ("layernorm", 2), ("layernorm", 96), ("layernorm", 576)])
def test_onnx_equals_golden_bit_exact(optimize, preset_name, kind, dim):
    precision = preset(preset_name)
    for x in _inputs(kind, dim):
        onnx_out = run_operator(kind, preset_name, x, optimize)
        np.testing.assert_array_equal(onnx_out, golden(kind, x, precision))


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_bit_exact_at_5120(kind):
    x = rng.standard_normal((3, 5120)).astype(np.float32) * 2
    np.testing.assert_array_equal(run_operator(kind, "default", x), golden(kind, x, preset("default")))


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind,dim", [("softmax", 1), ("softmax", 64), ("softmax", 1024), ("silu", 257),
                                      ("gelu", 257), ("rmsnorm", 7), ("rmsnorm", 576), ("layernorm", 64),
                                      ("layernorm", 576)])
def test_error_within_bound(preset_name, kind, dim):
    precision = preset(preset_name)
    for x in _inputs(kind, dim)[:1] + [_inputs(kind, dim)[1][:5]]:
        if kind in ("silu", "gelu"):
            x = x.reshape(-1)
            x = x[np.abs(x) < 1000]
        error = np.abs(golden(kind, x, precision).astype(np.float64) - EXACT[kind](x))
        bound = error_bound(kind, x, precision)
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert np.all(error <= bound), f"x={x[worst]} error={error[worst]} bound={bound[worst]}"


def test_silu_bound_holds_on_dense_grid():
    x = np.linspace(-40, 40, 80001).astype(np.float32)
    for preset_name in PRESETS:
        precision = preset(preset_name)
        error = np.abs(golden("silu", x, precision) - reference.silu(x))
        assert np.all(error <= error_bound("silu", x, precision))


# ------------------------------------------------------------------ the authors' protocol


def _softmax_errors(preset_name, dim):
    x = (np.random.default_rng(dim).standard_normal((4096, dim)) * 7).astype(np.float32)
    error = np.abs(golden("softmax", x, preset(preset_name)) - reference.softmax(x))
    return error.mean(), error.max()


# Authors' float reference measured against the exact op (mean, max).
REFERENCE_SOFTMAX = {8: (7.8e-4, 4.6e-3), 64: (2.2e-4, 4.6e-3), 256: (8.2e-5, 4.5e-3)}
REFERENCE_RMSNORM = {64: (2.0e-3, 4.1e-3), 576: (2.0e-3, 4.3e-3)}


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_default_softmax_beats_reference(dim):
    mean, worst = _softmax_errors("default", dim)
    ref_mean, ref_max = REFERENCE_SOFTMAX[dim]
    assert mean <= ref_mean / 10
    assert worst <= ref_max / 10


def test_default_silu_beats_reference_on_both_ranges():
    precision = preset("default")
    for low, high in [(-5, 5), (-8, 8)]:
        x = np.linspace(low, high, 20001).astype(np.float32)
        error = np.abs(golden("silu", x, precision) - reference.silu(x))
        assert error.mean() <= 2.0e-3
        assert error.max() <= 4.6e-3


@pytest.mark.parametrize("dim", [8, 64, 256, 576])
def test_default_rmsnorm_beats_reference(dim):
    x = np.random.default_rng(dim).standard_normal((4096 if dim < 500 else 1024, dim)).astype(np.float32)
    error = np.abs(golden("rmsnorm", x, preset("default")) - reference.rms_norm(x, 1e-5))
    assert error.mean() <= 2.0e-3 / 10
    assert error.max() <= 4.1e-3 / 10


def test_gelu_within_1e3_of_erf_and_tanh():
    x = np.linspace(-8, 8, 16001).astype(np.float32)
    y = golden("gelu", x, preset("default"))
    assert np.abs(y - reference.gelu_erf(x)).max() <= 1e-3
    assert np.abs(y - reference.gelu_tanh(x)).max() <= 1e-3


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_paper_preset_matches_float_reference(dim):
    """The integer paper preset has the error of the authors' float semantics."""
    mean, worst = _softmax_errors("paper", dim)
    ref_mean, ref_max = REFERENCE_SOFTMAX[dim]
    assert mean == pytest.approx(ref_mean, rel=0.1)
    assert worst == pytest.approx(ref_max, rel=0.1)


def test_float_reference_reproduces_published_errors():
    x = np.random.default_rng(1).standard_normal((4096, 64)) * 7
    error = np.abs(reference.paper_softmax(x) - reference.softmax(x))
    assert error.mean() == pytest.approx(2.2e-4, rel=0.1)
    x = np.linspace(-8, 8, 20001)
    assert np.abs(reference.paper_silu(x) - reference.silu(x)).max() == pytest.approx(3.3e-2, rel=0.05)
    x = np.random.default_rng(2).standard_normal((4096, 64))
    error = np.abs(reference.paper_rms_norm(x) - reference.rms_norm(x, 1e-5))
    assert error.mean() == pytest.approx(2.0e-3, rel=0.1)
    assert error.max() == pytest.approx(4.1e-3, rel=0.1)


def test_uniform_softmax_keeps_mass_at_1024():
    x = (1e-3 * np.random.default_rng(3).standard_normal((16, 1024))).astype(np.float32)
    mass = golden("softmax", x, preset("default")).sum(axis=-1)
    assert np.all(np.abs(mass - 1.0) <= 0.01)
    bound = error_bound("softmax", x, preset("default"))
    assert np.all(np.abs(golden("softmax", x, preset("default")) - reference.softmax(x)) <= bound)
    paper_mass = golden("softmax", x, preset("paper")).sum(axis=-1)
    assert np.all(paper_mass < 0.5)  # the 8-bit floor drops every 1/1024 entry


# ------------------------------------------------------------------ special values


def _float_op_model(kind: str, dim: int) -> onnx.ModelProto:
    """The float op as an exporter writes it, to compare special values in onnxruntime."""
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["batch", dim])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["batch", dim])
    const = lambda name, value: helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, onnx.TensorProto.FLOAT, [], [value]))
    if kind == "softmax":
        nodes = [helper.make_node("Softmax", ["X"], ["Y"], axis=-1)]
    elif kind == "silu":
        nodes = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
    elif kind == "gelu":
        nodes = [const("r2", 2**-0.5), const("one", 1.0), const("half", 0.5),
                 helper.make_node("Mul", ["X", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["b"]), helper.make_node("Mul", ["X", "b"], ["c"]),
                 helper.make_node("Mul", ["c", "half"], ["Y"])]
    elif kind == "rmsnorm":
        axes = helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1]))
        nodes = [const("two", 2.0), const("eps", 1e-5), const("one", 1.0), axes,
                 helper.make_node("Pow", ["X", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["X", "inv"], ["Y"])]
    else:
        scale = helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", onnx.TensorProto.FLOAT, [dim], [1.0] * dim))
        bias = helper.make_node("Constant", [], ["b"], value=helper.make_tensor("b", onnx.TensorProto.FLOAT, [dim], [0.0] * dim))
        nodes = [scale, bias, helper.make_node("LayerNormalization", ["X", "w", "b"], ["Y"], axis=-1, epsilon=1e-5)]
    return helper.make_model(helper.make_graph(nodes, kind, [x], [y]), opset_imports=[helper.make_opsetid("", 18)])


SPECIAL_ROWS = {
    "softmax": [[np.nan, 1, 2, 3], [np.inf, 1, 2, 3], [-np.inf] * 4, [np.finfo(np.float32).min] * 4,
                [-np.inf, np.finfo(np.float32).min, np.finfo(np.float32).min, -np.inf], [0, -np.inf, 1, -np.inf],
                [3e38, 0, -3e38, 1]],
    "silu": [[np.nan, np.inf, -np.inf, 0.0], [1e30, -1e30, 65504, -65504], [40.0, -40.0, 1e-30, -1e-30]],
    # Finite inputs whose square overflows float32 are saturation, not special values: the float
    # op returns a zero row, the spiking op the saturated result (test_saturated_currents_do_not_wrap).
    "rmsnorm": [[np.nan, 1, 2, 3], [np.inf, 1, 2, 3], [-np.inf, 1, 2, 3], [0, 0, 0, 0]],
    "layernorm": [[np.nan, 1, 2, 3], [np.inf, 1, 2, 3], [0, 0, 0, 0], [5, 5, 5, 5]],
}
SPECIAL_ROWS["gelu"] = SPECIAL_ROWS["silu"]


@pytest.mark.parametrize("kind", KINDS)
def test_special_values_match_float_op(kind):
    x = np.array(SPECIAL_ROWS[kind], np.float32)
    expected = make_session(_float_op_model(kind, 4)).run(None, {"X": x})[0]
    for preset_name in PRESETS:
        spiking = run_operator(kind, preset_name, x)
        np.testing.assert_array_equal(np.isnan(spiking), np.isnan(expected), err_msg=f"{kind} {preset_name}")
        finite = np.isfinite(expected) & (np.abs(expected) < 1e4)
        assert np.allclose(spiking[finite], expected[finite], atol=0.02), (kind, preset_name, spiking, expected)
        assert np.array_equal(spiking[np.isinf(expected)], expected[np.isinf(expected)])


def test_saturated_currents_do_not_wrap():
    precision = preset("default")
    y = golden("silu", np.array([1e30, -1e30, 3e38, 65504], np.float32), precision)
    assert y[0] == y[2] == y[3] == pytest.approx(32768, rel=1e-4)  # saturates at 2^(31 - 16)
    assert y[1] == 0.0
    y = golden("rmsnorm", np.array([[1e30, -1e30, 0, 0]], np.float32), precision)
    assert y[0, 0] > 1.0
    assert y[0, 1] < -1.0
    assert y[0, 2] == 0.0
    y = golden("softmax", np.array([[1e30, 0, -1e30]], np.float32), precision)
    np.testing.assert_array_equal(y, [[1.0, 0.0, 0.0]])


# ------------------------------------------------------------------ the models themselves


@pytest.mark.parametrize("opset", [18, 21, 23])
@pytest.mark.parametrize("kind", KINDS)
def test_model_passes_checker_and_strict_inference(kind, opset):
    for preset_name in PRESETS:
        model = operator_model(kind, preset(preset_name), ["batch", "seq", 64], opset=opset)
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
        assert audit.violations(model) == []
        loops = [node for function in model.functions for node in function.node if node.op_type == "Loop"]
        assert loops, f"{kind}: no Loop in any function body"
        x = rng.standard_normal((2, 3, 64)).astype(np.float32)
        np.testing.assert_array_equal(make_session(model).run(None, {"X": x})[0], golden(kind, x, preset(preset_name)))


def test_fp16_site_matches_golden():
    x = (rng.standard_normal((4, 64)) * 4).astype(np.float16)
    for kind in KINDS:
        y = run_operator(kind, "default", x)
        assert y.dtype == np.float16
        np.testing.assert_array_equal(y, golden(kind, x, preset("default")))


def test_audit_flags_float_op_in_core():
    model = operator_model("silu", preset("default"), ["n", 8])
    core = next(f for f in model.functions if f.name.startswith("SiluCore"))
    core.node.append(helper.make_node("Exp", [core.input[0]], ["bad"], name="sneaky_exp"))
    problems = audit.violations(model)
    assert any("sneaky_exp" in p and "Exp" in p for p in problems)


# ------------------------------------------------------------------ the fast execution form


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_form_bit_identical_to_loop_form(kind, preset_name):
    precision = preset(preset_name)
    shape = ["batch", 96]
    loop_model = operator_model(kind, precision, shape)
    fast_model = operator_model(kind, precision, shape, form="fast")
    fast_ops = {node.op_type for function in fast_model.functions for node in function.node}
    assert "Loop" not in fast_ops
    # SiLU and GELU read sigma from a table of the golden values. The others divide with Div.
    assert "GatherElements" in fast_ops if kind in ("silu", "gelu") else "Div" in fast_ops
    assert audit.violations(fast_model) == []
    onnx.checker.check_model(fast_model, full_check=True)
    for x in _inputs(kind, 96):
        loop_out = make_session(loop_model).run(None, {"X": x})[0]
        fast_out = make_session(fast_model).run(None, {"X": x})[0]
        np.testing.assert_array_equal(fast_out, loop_out)
        np.testing.assert_array_equal(fast_out, golden(kind, x, precision))


@pytest.mark.parametrize("kind", ["silu", "gelu"])
def test_sigma_table_every_offset(kind):
    # Every input on the grid 2^-16 from -(2H + 1/64) to +(2H + 1/64). For SiLU these reach every
    # exp offset U of the default preset, on both signs. GELU reads the offsets of its argument.
    precision = preset("default")
    reach = 16 * 2**16 + 1024
    x = (np.arange(-reach - 8, reach + 9, dtype=np.int64) / 2.0**16).astype(np.float32)[None, :]
    fast_model = operator_model(kind, precision, [1, x.shape[1]], form="fast")
    fast_out = make_session(fast_model).run(None, {"X": x})[0]
    np.testing.assert_array_equal(fast_out, golden(kind, x, precision))


def test_audit_rejects_div_in_loop_form():
    model = operator_model("softmax", preset("default"), ["n", 8])
    core = next(f for f in model.functions if f.name.startswith("SoftmaxCore"))
    core.node.append(helper.make_node("Div", [core.input[0], core.input[0]], ["bad"], name="sneaky_div"))
    assert any("sneaky_div" in p for p in audit.violations(model))
