"""Hard values through converted graphs: attention masks of -inf and finfo(float32).min, fully
masked rows, NaN and inf activations, activations far outside the calibrated range, zero rows
into the norms, empty sequences, batch > 1, and fp16 and bf16 models. The converted graph must
give what the original gives (within the documented error bounds), or fail the same way."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spike.calibrate import measure_ranges
from onnx_spike.operators import error_bound, golden, operator_model
from onnx_spike.passes.convert import ConvertOptions
from onnx_spike.pipeline.convert import convert_path
from onnx_spike.pipeline.evaluate import count_saturation, validate
from onnx_spike.pipeline.runtime import make_session, spiking_sites, window_feeds
from onnx_spike.precision import preset

from conftest import make_session as session_of, run_operator
from tiny_llama import save_one_layer_llama

PRESETS = ("default", "paper")
FLOAT32_MIN = np.finfo(np.float32).min


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ------------------------------------------------------------------ attention, as Optimum exports it


def attention_model(heads: int = 2, head_dim: int = 4) -> onnx.ModelProto:
    """MatMul, Add(mask), Softmax(axis=-1), Where(IsNaN(p), 0, p), MatMul, with the guarded
    probabilities as a second output."""
    q = helper.make_tensor_value_info("Q", TensorProto.FLOAT, ["batch", heads, "seq", head_dim])
    k = helper.make_tensor_value_info("KT", TensorProto.FLOAT, ["batch", heads, head_dim, "keys"])
    v = helper.make_tensor_value_info("V", TensorProto.FLOAT, ["batch", heads, "keys", head_dim])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", "keys"])
    out = helper.make_tensor_value_info("O", TensorProto.FLOAT, ["batch", heads, "seq", head_dim])
    probs = helper.make_tensor_value_info("P", TensorProto.FLOAT, ["batch", heads, "seq", "keys"])
    nodes = [helper.make_node("MatMul", ["Q", "KT"], ["scores"], name="attn/MatMul"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="attn/Add"),
             helper.make_node("Softmax", ["masked"], ["softmax"], axis=-1, name="attn/Softmax"),
             helper.make_node("IsNaN", ["softmax"], ["is_nan"], name="attn/IsNaN"),
             helper.make_node("Where", ["is_nan", "zero", "softmax"], ["P"], name="attn/Where"),
             helper.make_node("MatMul", ["P", "V"], ["O"], name="attn/MatMul_1")]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph(nodes, "attention", [q, k, v, mask], [out, probs], [zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module")
def attention_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attention")
    original = folder / "attention.onnx"
    onnx.save(attention_model(), str(original))
    files = {"original": original}
    for name in PRESETS:
        files[name] = folder / f"spiking_{name}.onnx"
        report = convert_path(original, files[name], ConvertOptions(precision=preset(name)))
        assert [site.kind for site in report.sites] == ["softmax"]
    return files


def attention_inputs(fill: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Q, K, V and a mask with `fill` on some keys and on every key of two rows."""
    rng = np.random.default_rng(seed)
    batch, seq, keys = 2, 3, 5
    mask = np.zeros((batch, 1, seq, keys), np.float32)
    mask[0, 0, 0, 3:] = fill  # partly masked
    mask[0, 0, 1, :] = fill  # fully masked
    mask[1, 0, 0, 0] = fill
    mask[1, 0, 2, :] = fill  # fully masked
    return {"Q": rng.standard_normal((batch, 2, seq, 4)).astype(np.float32),
            "KT": rng.standard_normal((batch, 2, 4, keys)).astype(np.float32),
            "V": rng.standard_normal((batch, 2, keys, 4)).astype(np.float32), "mask": mask}


def softmax_bound(feeds: dict[str, np.ndarray], preset_name: str) -> np.ndarray:
    """error_bound of the Softmax input; -inf keys, exact zeros in both models, count as FLOAT32_MIN."""
    with np.errstate(invalid="ignore"):
        masked = np.matmul(feeds["Q"], feeds["KT"]) + feeds["mask"]
    masked = np.where(np.isneginf(masked), FLOAT32_MIN, masked)
    return error_bound("softmax", masked, preset(preset_name))


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("fill", [-np.inf, FLOAT32_MIN], ids=["-inf", "finfo-min"])
def test_attention_mask_matches_original(attention_files, preset_name, fill):
    feeds = attention_inputs(fill)
    out_original, p_original = _run(attention_files["original"], feeds)
    out_spiking, p_spiking = _run(attention_files[preset_name], feeds)

    assert not np.isnan(p_spiking).any()
    assert not np.isnan(out_spiking).any()
    bound = softmax_bound(feeds, preset_name)
    assert np.all(np.abs(p_spiking - p_original) <= bound)
    value_bound = np.matmul(bound, np.abs(feeds["V"])) + 1e-6
    assert np.all(np.abs(out_spiking - out_original) <= value_bound)

    # Masked keys get exactly zero weight in both.
    partly_masked = p_spiking[0, :, 0, 3:]
    assert np.array_equal(partly_masked, np.zeros_like(partly_masked))
    fully_masked = [(0, 1), (1, 2)]
    for batch, row in fully_masked:
        if np.isneginf(fill):
            # The float Softmax returns NaN, and the exporter's guard turns it into zeros.
            assert np.array_equal(p_original[batch, :, row], np.zeros_like(p_original[batch, :, row]))
            assert np.array_equal(p_spiking[batch, :, row], p_original[batch, :, row])
            assert np.array_equal(out_spiking[batch, :, row], out_original[batch, :, row])
        else:
            # Every key equal: a uniform row.
            np.testing.assert_allclose(p_original[batch, :, row], 0.2, rtol=1e-6)
            np.testing.assert_allclose(p_spiking[batch, :, row], 0.2, atol=bound[batch, :, row].max())


@pytest.mark.parametrize("preset_name", PRESETS)
def test_attention_nan_and_inf_scores(attention_files, preset_name):
    feeds = attention_inputs(-np.inf, seed=1)
    feeds["Q"][0, 0, 2, 1] = np.nan  # a NaN score row
    feeds["mask"][1, 0, 1, 2] = np.inf  # a +inf score
    feeds["mask"][0, 0, 2, 4] = FLOAT32_MIN
    out_original, p_original = _run(attention_files["original"], feeds)
    out_spiking, p_spiking = _run(attention_files[preset_name], feeds)

    np.testing.assert_array_equal(np.isnan(p_spiking), np.isnan(p_original))
    np.testing.assert_array_equal(np.isnan(out_spiking), np.isnan(out_original))
    # The guard zeroes the rows that the float Softmax turns into NaN, in both models.
    assert np.array_equal(p_original[0, 0, 2], np.zeros(5, np.float32))
    assert np.array_equal(p_spiking[0, 0, 2], p_original[0, 0, 2])
    assert np.array_equal(p_spiking[1, :, 1], p_original[1, :, 1])
    finite_rows = np.isfinite(np.matmul(feeds["Q"], feeds["KT"]) + feeds["mask"]).all(axis=-1)
    assert np.all(np.abs(p_spiking - p_original)[finite_rows] <= softmax_bound(feeds, preset_name)[finite_rows])


# ------------------------------------------------------------------ a tiny Llama with hard embedding rows

NAN_TOKEN, POS_INF_TOKEN, NEG_INF_TOKEN, HUGE_TOKEN, ZERO_TOKEN = 10, 11, 12, 13, 14
HUGE = 1e5  # above the static RMSNorm encode limit 2^(40 - 24) = 65536


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """A 1-layer Llama with a key/value cache, exported by Optimum in fp32 and fp16."""
    pytest.importorskip("torch")
    pytest.importorskip("optimum.onnxruntime")
    from onnx_spike.pipeline.export import export_model

    source = save_one_layer_llama(tmp_path_factory)
    exports = tmp_path_factory.mktemp("onnx")
    return {dtype: export_model(source, exports / dtype, dtype=dtype, progress=False) for dtype in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def hard_llama(tiny_exports, tmp_path_factory) -> dict[str, Path]:
    """The fp32 export with NaN, +inf, -inf, huge and zero embedding rows, and its conversions.

    The rows go into a new initializer that only the embedding Gather reads, because the tied
    lm_head reads the original one and would spread the special values into every logit.
    """
    folder = tmp_path_factory.mktemp("hard")
    original = folder / "original"
    shutil.copytree(tiny_exports["fp32"], original)
    model = onnx.load(str(original / "model.onnx"))
    gather = next(node for node in model.graph.node if node.op_type == "Gather")
    table = next(t for t in model.graph.initializer if t.name == gather.input[0])
    weights = numpy_helper.to_array(table).copy()
    weights[NAN_TOKEN, 3] = np.nan
    weights[POS_INF_TOKEN, 5] = np.inf
    weights[NEG_INF_TOKEN, 7] = -np.inf
    weights[HUGE_TOKEN] = HUGE * np.where(np.arange(weights.shape[1]) % 2, 1.0, -1.0)
    weights[ZERO_TOKEN] = 0.0
    model.graph.initializer.append(numpy_helper.from_array(weights, "hard_embedding"))
    gather.input[0] = "hard_embedding"
    onnx.save(model, str(original / "model.onnx"))

    files = {"original": original}
    for name in PRESETS:
        files[name] = folder / name
        convert_path(original, files[name], ConvertOptions(precision=preset(name)))
    return files


def _logits(path: Path, tokens) -> np.ndarray:
    session = make_session(path)
    return session.run(["logits"], window_feeds(session, np.asarray([tokens])))[0]


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("token", [NAN_TOKEN, POS_INF_TOKEN, NEG_INF_TOKEN], ids=["nan", "+inf", "-inf"])
def test_special_activations_match_original(hard_llama, preset_name, token):
    tokens = [5, 6, token, 7, 8]
    original = _logits(hard_llama["original"], tokens)
    spiking = _logits(hard_llama[preset_name], tokens)
    assert np.isnan(original).any()
    np.testing.assert_array_equal(np.isnan(spiking), np.isnan(original))
    np.testing.assert_array_equal(np.isinf(spiking), np.isinf(original))


@pytest.mark.parametrize("preset_name", PRESETS)
def test_zero_embedding_row_stays_finite(hard_llama, preset_name):
    tokens = [5, ZERO_TOKEN, 6, ZERO_TOKEN]
    original = _logits(hard_llama["original"], tokens)
    spiking = _logits(hard_llama[preset_name], tokens)
    assert np.isfinite(spiking).all()
    np.testing.assert_allclose(spiking, original, atol=0.02 if preset_name == "paper" else 1e-3)


def test_huge_activations_saturate_and_are_counted(hard_llama):
    windows = np.array([[5, HUGE_TOKEN, 6, 7], [5, 6, 7, 8]])
    totals = count_saturation(hard_llama["original"], hard_llama["default"], windows)
    norms = {name: entry for name, entry in totals.items() if entry["kind"] == "rmsnorm"}
    first = norms["/model/layers.0/input_layernorm/ReduceMean"]
    assert first["limit"] == 2.0 ** 16
    assert first["max_abs"] == HUGE
    assert first["saturated"] == 32  # every element of the one huge row
    assert first["total"] == 2 * 4 * 32
    assert all(entry["saturated"] == 0 for entry in totals.values() if entry["kind"] in ("softmax", "silu"))

    # The clipped row keeps its direction, so the normalized output barely moves.
    original = _logits(hard_llama["original"], windows[0])
    spiking = _logits(hard_llama["default"], windows[0])
    np.testing.assert_allclose(spiking, original, atol=1e-3)


def test_activations_beyond_calibrated_range(hard_llama, tmp_path):
    """Calibrated on ordinary tokens, then fed the huge row: the validate report counts the clipping
    per site, and the converted model's outputs are the original's, with no extra outputs."""
    options = ConvertOptions()
    ordinary = np.array([[5, 6, 7, 8, 9, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26, 27]])
    options.input_ranges = measure_ranges(hard_llama["original"], ordinary, options, progress=False)
    converted = tmp_path / "calibrated"
    convert_path(hard_llama["original"], converted, options)
    sites = {site["name"]: site for site in spiking_sites(converted)}
    assert all(site["input_range"] is not None for site in sites.values())

    windows = np.array([[5, 6, HUGE_TOKEN, 7]])
    result = validate(hard_llama["original"], converted, windows, progress=False)
    saturation = result["saturation"]
    assert set(saturation) == set(sites)
    for name, entry in saturation.items():
        assert entry["saturated"] <= entry["total"], name
        if entry["kind"] == "rmsnorm":  # a small calibrated range gives a finer scale, so a lower limit
            assert entry["limit"] < 2.0 ** (40 - 24), name
    assert saturation["/model/layers.0/input_layernorm/ReduceMean"]["saturated"] == 32
    assert set(result["outputs"]) == {output.name for output in make_session(hard_llama["original"]).get_outputs()}
    converted_outputs = [output.name for output in make_session(converted).get_outputs()]
    assert converted_outputs == [output.name for output in make_session(hard_llama["original"]).get_outputs()]


# ------------------------------------------------------------------ shapes: empty, batch, dynamic


def _feeds(session: ort.InferenceSession, batch: int, length: int, past: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(4, 64, size=(batch, length), dtype=np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, past + length), np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(past, past + length, dtype=np.int64), (batch, length)).copy()
        else:
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = rng.standard_normal((batch, spec.shape[1], past, spec.shape[3])).astype(dtype)
    return feeds


@pytest.fixture(scope="module")
def converted_exports(tiny_exports, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("converted")
    converted = {}
    for dtype, path in tiny_exports.items():
        converted[dtype] = folder / dtype
        report = convert_path(path, converted[dtype], ConvertOptions())
        assert {site.kind for site in report.sites} == {"softmax", "silu", "rmsnorm"}
    return converted


@pytest.mark.parametrize("batch,length,past", [(1, 1, 0), (3, 7, 0), (2, 1, 5), (4, 3, 2)])
def test_batch_and_dynamic_lengths(tiny_exports, converted_exports, batch, length, past):
    original = make_session(tiny_exports["fp32"])
    spiking = make_session(converted_exports["fp32"])
    feeds = _feeds(original, batch, length, past)
    for name, a, b in zip([o.name for o in original.get_outputs()], original.run(None, feeds),
                          spiking.run(None, feeds)):
        assert b.shape == a.shape, name
        np.testing.assert_allclose(b, a, atol=1e-3, err_msg=name)
    # The last batch row, run alone, gives the same logits.
    alone = spiking.run(["logits"], {name: value[-1:] for name, value in feeds.items()})[0]
    np.testing.assert_allclose(spiking.run(["logits"], feeds)[0][-1:], alone, atol=1e-5)


def test_fp16_model(tiny_exports, converted_exports):
    original = make_session(tiny_exports["fp16"])
    spiking = make_session(converted_exports["fp16"])
    feeds = _feeds(original, 2, 6, 3)
    a, b = original.run(["logits"], feeds)[0], spiking.run(["logits"], feeds)[0]
    assert b.dtype == a.dtype
    np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), atol=2e-3)


def _node_of_error(error: Exception) -> str | None:
    found = re.search(r"Name:'([^']+)'", str(error))
    return found.group(1) if found else None


@pytest.mark.parametrize("past", [0, 2])
def test_empty_sequence_fails_like_original(tiny_exports, converted_exports, past):
    original = make_session(tiny_exports["fp32"])
    spiking = make_session(converted_exports["fp32"])
    feeds = _feeds(original, 2, 0, past)
    with pytest.raises(Exception) as original_error:
        original.run(None, feeds)
    with pytest.raises(Exception) as spiking_error:
        spiking.run(None, feeds)
    assert type(spiking_error.value) is type(original_error.value)
    assert _node_of_error(spiking_error.value) == _node_of_error(original_error.value)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_of_empty_middle_axis(kind):
    model = operator_model(kind, preset("default"), ["batch", "seq", 8])
    x = np.zeros((2, 0, 8), np.float32)
    y = session_of(model).run(None, {"X": x})[0]
    assert y.shape == (2, 0, 8)


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("kind", ["softmax", "silu", "gelu", "rmsnorm", "layernorm"])
def test_empty_rows(kind, preset_name):
    x = np.zeros((0, 8), np.float32)
    y = run_operator(kind, preset_name, x)
    assert y.shape == (0, 8)
    assert golden(kind, x, preset(preset_name)).shape == (0, 8)


@pytest.mark.parametrize("preset_name", PRESETS)
def test_softmax_over_empty_axis(preset_name):
    """A [rows, 0] Softmax, as attention over zero keys gives: onnxruntime returns it empty, like
    the float op, although the function body reduces over the empty axis."""
    model = operator_model("softmax", preset(preset_name), ["batch", "keys"])
    y = session_of(model).run(None, {"X": np.zeros((3, 0), np.float32)})[0]
    assert y.shape == (3, 0)


def test_softmax_golden_over_empty_axis():
    assert golden("softmax", np.zeros((3, 0), np.float32), preset("default")).shape == (3, 0)


# ------------------------------------------------------------------ zero rows into the norms


@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("dim", [1, 7, 64, 576])
def test_zero_and_constant_rows_into_norms(preset_name, dim):
    x = np.zeros((3, dim), np.float32)
    x[1] = 3.5
    x[2] = -1e4
    for kind in ("rmsnorm", "layernorm"):
        y = run_operator(kind, preset_name, x)
        assert np.isfinite(y).all(), kind
        np.testing.assert_array_equal(y, golden(kind, x, preset(preset_name)))
        assert np.array_equal(y[0], np.zeros(dim, np.float32)), f"{kind}: a zero row must stay zero"
    # LayerNorm of a constant row is zero, as in the float op; RMSNorm gives its sign.
    assert np.array_equal(run_operator("layernorm", preset_name, x)[1:], np.zeros((2, dim), np.float32))
    rms = run_operator("rmsnorm", preset_name, x)
    np.testing.assert_allclose(rms[1:], np.sign(x[1:]), atol=2.0 ** -7)


# ------------------------------------------------------------------ bf16


def bf16_model() -> onnx.ModelProto:
    """Softmax, SiLU and RMSNorm computed in bf16, between float32 casts."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])
    bf16 = TensorProto.BFLOAT16
    initializers = [helper.make_tensor("two", bf16, [], [2.0]), helper.make_tensor("eps", bf16, [], [1e-5]),
                    helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Cast", ["X"], ["x"], to=bf16),
             helper.make_node("Softmax", ["x"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("Sigmoid", ["x"], ["gate"], name="silu/Sigmoid"),
             helper.make_node("Mul", ["x", "gate"], ["silu"], name="silu/Mul"),
             helper.make_node("Add", ["probs", "silu"], ["h"], name="residual"),
             helper.make_node("Pow", ["h", "two"], ["square"], name="norm/Pow"),
             helper.make_node("ReduceMean", ["square", "axes"], ["mean"], name="norm/ReduceMean"),
             helper.make_node("Add", ["mean", "eps"], ["shifted"], name="norm/Add"),
             helper.make_node("Sqrt", ["shifted"], ["rms"], name="norm/Sqrt"),
             helper.make_node("Reciprocal", ["rms"], ["inverse"], name="norm/Reciprocal"),
             helper.make_node("Mul", ["h", "inverse"], ["normed"], name="norm/Mul"),
             helper.make_node("Cast", ["normed"], ["Y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_bf16_model_converts(tmp_path):
    """onnxruntime's CPU provider has no bf16 Softmax or Sigmoid, so the original does not load.
    The conversion is checked structurally, and its bf16 spiking Softmax is run on its own."""
    original = tmp_path / "bf16.onnx"
    onnx.save(bf16_model(), str(original))
    with pytest.raises(RuntimeError, match="onnxruntime cannot load"):
        make_session(original)

    converted = tmp_path / "spiking.onnx"
    report = convert_path(original, converted, ConvertOptions())
    assert sorted(site.kind for site in report.sites) == ["rmsnorm", "silu", "softmax"]
    model = onnx.load(str(converted))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_bf16_softmax_runs_bit_exact(tmp_path):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])
    nodes = [helper.make_node("Cast", ["X"], ["x"], to=TensorProto.BFLOAT16),
             helper.make_node("Softmax", ["x"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("Cast", ["probs"], ["Y"], to=TensorProto.FLOAT)]
    original = tmp_path / "bf16_softmax.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]),
              str(original))
    converted = tmp_path / "spiking.onnx"
    convert_path(original, converted, ConvertOptions(ops=("softmax",)))

    values = (np.random.default_rng(0).standard_normal((16, 8)) * 4).astype(np.float32)
    values[0] = [np.nan, 1, 2, 3, 4, 5, 6, 7]
    values[1] = -np.inf
    values[2, :4] = FLOAT32_MIN
    got = make_session(converted).run(None, {"X": values})[0]
    as_bf16 = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    expected = golden("softmax", as_bf16, preset("default")).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
