"""Operation counts, energy estimate and error histograms on a tiny random Llama."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import pytest
from onnx import helper

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.onnxruntime")

from onnx_spike import cli  # noqa: E402
from onnx_spike.fixedpoint import INT32_LIMIT  # noqa: E402
from onnx_spike.operators.site import encode_currents  # noqa: E402
from onnx_spike.pipeline import energy  # noqa: E402
from onnx_spike.pipeline.energy import (CountingEvaluator, SiteRunner, energy_report, float_op_counts,  # noqa: E402
                                        function_closure, model_functions)
from onnx_spike.pipeline.histograms import error_histograms, model_precision, site_precision  # noqa: E402
from onnx_spike.pipeline.runtime import SiteProbe, model_file, spiking_sites, window_feeds  # noqa: E402
from onnx_spike.primitives import division, exp  # noqa: E402
from tiny_llama import play_text  # noqa: E402

LENGTH = 48
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(play_text(1, 200))
    return path


@pytest.fixture(scope="module")
def windows(tokenizer, text_file):
    ids = np.asarray(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"], np.int64)
    return ids[:2 * LENGTH].reshape(2, LENGTH)


@pytest.fixture(scope="module")
def report(exported, converted, windows):
    return energy_report(exported, converted, windows[0], progress=False)


@pytest.fixture(scope="module")
def site_inputs(exported, converted, windows):
    """Each site's input on the first window, captured independently of the report."""
    probe = SiteProbe(exported, spiking_sites(converted))
    try:
        names = sorted({site["input"] for site in probe.sites})
        values = dict(zip(names, probe.session.run(names, window_feeds(probe.session, windows[:1]))))
        return {site["name"]: values[site["input"]] for site in probe.sites}
    finally:
        probe.close()


def _by_name(report: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in report["sites"]}


# ---------------------------------------------------------------- counts on the model


def test_report_measures_every_site(report, converted):
    assert report["sites_total"] == report["sites_measured"] == len(spiking_sites(converted)) == 9
    assert report["sites_not_probed"] == []
    for entry in report["sites"]:
        core = entry["spiking"]["core"]
        for category in ("add", "compare", "shift", "mul_shift_add"):
            assert core[category] > 0, (entry["name"], category)
        assert entry["spiking"]["spikes"] > 0
        assert entry["spiking"]["neuron_steps"] > entry["spiking"]["spikes"]
        assert entry["spiking"]["loop_iterations"] > 0
        assert entry["spiking_energy_pj"]["total"] > 0
        assert entry["float_energy_pj"]["total"] > 0
    lut_kinds = {entry["kind"] for entry in report["sites"] if entry["spiking"]["core"]["lut"] > 0}
    assert lut_kinds == {"softmax", "silu"}


def test_kind_totals_equal_site_sums(report):
    for kind, totals in report["kinds"].items():
        entries = [entry for entry in report["sites"] if entry["kind"] == kind]
        assert totals["sites"] == totals["measured_sites"] == len(entries)
        assert totals["scale"] == 1.0
        for scope in ("core", "interface"):
            for category in energy.SPIKING_CATEGORIES:
                expected = sum(entry["spiking"][scope][category] for entry in entries)
                assert totals["measured"]["spiking"][scope][category] == expected
                assert totals["estimated"]["spiking"][scope][category] == expected
        assert totals["measured"]["spiking"]["spikes"] == sum(entry["spiking"]["spikes"] for entry in entries)
        assert totals["measured"]["elements"] == sum(entry["elements"] for entry in entries)
    for key in ("spikes", "neuron_steps", "loop_iterations"):
        assert report["total"]["spiking"][key] == sum(entry["spiking"][key] for entry in report["sites"])


def test_reference_equals_onnxruntime_bit_for_bit(report, converted, site_inputs):
    assert all(entry["bit_exact"] for entry in report["sites"])
    runner = SiteRunner(converted)
    for site in spiking_sites(converted):
        x = site_inputs[site["name"]]
        counted, _ = runner.evaluator(site["function"], x).run(x)
        runtime = runner.run_onnxruntime(site["function"], x)
        assert counted.dtype == runtime.dtype == x.dtype
        assert counted.tobytes() == runtime.tobytes(), site["name"]


def test_softmax_spikes_equal_reciprocal_popcount(report, converted, site_inputs):
    """The reciprocal neuron builds its count r as 2r + spike per step, so its spikes are the set
    bits of r. Softmax runs one such neuron per row and no other neuron."""
    precision = model_precision(converted)
    measured = _by_name(report)
    softmax_sites = [site for site in spiking_sites(converted) if site["kind"] == "softmax"]
    assert softmax_sites
    for site in softmax_sites:
        spec = site_precision(precision, site).softmax
        assert spec.division.method == "reciprocal"
        x = site_inputs[site["name"]].astype(np.float32)
        currents = encode_currents(x, spec.input_frac_bits, INT32_LIMIT)
        excluded = np.isneginf(x)
        table = exp.build_table(spec.exp, spec.input_frac_bits)
        numerators = exp.pwl_exp(currents - currents.max(axis=-1, keepdims=True), table).astype(np.int64)
        denominator = (numerators * ~excluded).sum(axis=-1, keepdims=True)
        m = spec.division.reciprocal_bits
        _, scaled = division.normalize(denominator, denominator, m + 1)
        reciprocal = division.reciprocal_neuron(scaled.astype(np.int64), m)

        counts = measured[site["name"]]["spiking"]
        assert counts["spikes"] == int(np.bitwise_count(reciprocal).sum())
        assert counts["neuron_steps"] == denominator.size * (m + 2)


def _static_iterations(functions: dict[str, onnx.FunctionProto], name: str) -> int:
    """Sum of the constant trip counts of every Loop a call of `name` runs (no nested loops)."""
    function = functions[name]
    constants = {node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
                 for node in function.node if node.op_type == "Constant"}
    total = 0
    for node in function.node:
        if node.op_type == "Loop":
            total += int(constants[node.input[0]])
        elif node.domain == "onnx_spike":
            total += _static_iterations(functions, node.op_type)
    return total


def test_loop_iterations_equal_trip_counts(report, converted):
    functions = model_functions(onnx.load(str(model_file(converted)), load_external_data=False))
    for entry in report["sites"]:
        assert entry["spiking"]["loop_iterations"] == _static_iterations(functions, entry["function"])


def test_loop_without_cond_is_rejected():
    # onnx's ReferenceEvaluator runs no iteration when the optional cond input is empty.
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["state_in", "one"], ["state_out"])], "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", onnx.TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", onnx.TensorProto.FLOAT, ["n"])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("t", onnx.TensorProto.INT64, [], [3])),
         helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", onnx.TensorProto.FLOAT, [], [1.0])),
         helper.make_node("Loop", ["trips", "", "X"], ["Y"], body=body)], "loop",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with pytest.raises(RuntimeError, match="ran 0 iterations"):
        CountingEvaluator(model).run(np.zeros(2, np.float32))


# ---------------------------------------------------------------- counting rules and energy


def _mul_model(dtype: int, constant: np.ndarray) -> onnx.ModelProto:
    """Y = (X * c) * X with c a Constant node."""
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(constant, "c")),
         helper.make_node("Mul", ["X", "c"], ["scaled"]),
         helper.make_node("Mul", ["scaled", "X"], ["Y"])], "products",
        [helper.make_tensor_value_info("X", dtype, ["n"])], [helper.make_tensor_value_info("Y", dtype, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_integer_products_cost_popcounts():
    model = _mul_model(onnx.TensorProto.INT64, np.array(5, np.int64))
    _, counts = CountingEvaluator(model).run(np.array([3, 8], np.int64))
    # By the constant 5 (2 set bits): 2 per element. Run-time 15 * 3 and 40 * 8: min(4, 2) + min(2, 1).
    assert counts.core["mul_shift_add"] == 2 * 2 + 2 + 1
    assert counts.integer_products == 4


def test_float_products_by_kind_of_operand():
    _, by_power_of_two = CountingEvaluator(_mul_model(onnx.TensorProto.FLOAT, np.array(0.25, np.float32))).run(
        np.array([1.0, 0.0], np.float32))
    # X * 0.25 is a shift. The second product has the mask X = [1, 0] as an operand.
    assert by_power_of_two.core["shift"] == 2
    assert by_power_of_two.core["logic"] == 2
    _, general = CountingEvaluator(_mul_model(onnx.TensorProto.FLOAT, np.array(0.3, np.float32))).run(
        np.array([1.5, 2.0], np.float32))
    assert general.core["float_mul"] == 4


def test_float_op_counts_follow_the_model():
    assert float_op_counts("softmax", (2, 3, 4)) == {"additions": 24, "multiplies": 0, "macs": 0, "exp": 24,
                                                     "division": 24, "sqrt": 0, "erf_or_tanh": 0}
    assert float_op_counts("silu", (5, 6))["exp"] == float_op_counts("silu", (5, 6))["multiplies"] == 30
    rms = float_op_counts("rmsnorm", (2, 8))
    assert (rms["macs"], rms["sqrt"], rms["division"], rms["multiplies"]) == (16, 2, 2, 16)
    layer = float_op_counts("layernorm", (2, 8))
    assert (layer["additions"], layer["multiplies"], layer["macs"]) == (32, 18, 16)
    gelu = float_op_counts("gelu", (3, 4))
    assert (gelu["erf_or_tanh"], gelu["multiplies"]) == (12, 36)


def test_energy_equals_counts_times_constants(report):
    for entry in report["sites"]:
        for scope in ("core", "interface"):
            tally = entry["spiking"][scope]
            accumulates = sum(tally[c] for c in ("add", "compare", "shift", "lut", "logic", "mul_shift_add"))
            expected = accumulates * 0.9 + tally["float_mul"] * 4.6
            assert entry["spiking_energy_pj"][scope] == pytest.approx(expected, rel=1e-12)
        floats = entry["float"]
        special = floats["exp"] + floats["division"] + floats["sqrt"] + floats["erf_or_tanh"]
        expected = (floats["additions"] * 0.9 + (floats["multiplies"] + floats["macs"]) * 4.6
                    + special * energy.SPECIAL_FUNCTION_MACS * 4.6)
        assert entry["float_energy_pj"]["total"] == pytest.approx(expected, rel=1e-12)
    total = report["total"]
    assert total["spiking_energy_pj"]["total"] == pytest.approx(
        sum(entry["spiking_energy_pj"]["total"] for entry in report["sites"]), rel=1e-12)
    assert report["energy_ratio"] == pytest.approx(
        total["float_energy_pj"]["total"] / total["spiking_energy_pj"]["total"])


def test_sampled_sites_scale_kind_totals(exported, converted, windows, report):
    sampled = energy_report(exported, converted, windows[0], sites_per_kind=1, progress=False)
    assert sampled["sites_measured"] == 3
    full = _by_name(report)
    rms = sampled["kinds"]["rmsnorm"]
    assert (rms["sites"], rms["measured_sites"], rms["scale"]) == (5, 1, 5.0)
    (entry,) = [e for e in sampled["sites"] if e["kind"] == "rmsnorm"]
    assert entry["spiking"] == full[entry["name"]]["spiking"]
    assert rms["estimated"]["spiking"]["core"]["add"] == 5 * entry["spiking"]["core"]["add"]


def test_function_closure_lists_callees_first(converted):
    functions = model_functions(onnx.load(str(model_file(converted)), load_external_data=False))
    site = next(site for site in spiking_sites(converted) if site["kind"] == "softmax")
    names = [function.name for function in function_closure(functions, site["function"])]
    assert names[-1] == site["function"]
    assert any(name.startswith("SoftmaxCore_") for name in names)
    assert any(name.startswith("Encode_") for name in names)


# ---------------------------------------------------------------- histograms and command line


def test_histograms_are_valid_pngs(exported, converted, windows, tmp_path):
    import matplotlib.image

    results = error_histograms(exported, converted, windows, tmp_path / "histograms", progress=False)
    assert set(results) == {"softmax", "silu", "rmsnorm"}
    for kind, entry in results.items():
        path = tmp_path / "histograms" / f"{kind}.png"
        assert entry["file"] == str(path)
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200
        assert width > 300
        assert entry["elements"] > 0
        assert 0 < entry["max_abs_error"] <= entry["max_bound"]
        assert entry["above_bound"] == 0


def test_report_cli_writes_json(exported, converted, text_file, tmp_path, capsys):
    output = tmp_path / "energy.json"
    argv = ["report", str(converted), "--baseline", str(exported), "--text", str(text_file), "--length", "32",
            "--sites", "1", "--json", str(output)]
    assert cli.main(argv) == 0
    data = json.loads(output.read_text())
    assert data["tokens"] == 32
    assert data["sites_measured"] == 3
    assert data["sites_total"] == 9
    printed = capsys.readouterr().out
    assert "total" in printed
    assert "Estimate, not a measurement" in printed


def test_validate_cli_writes_histograms(exported, converted, text_file, tmp_path, capsys):
    folder = tmp_path / "plots"
    argv = ["validate", str(exported), str(converted), "--text", str(text_file), "--windows", "1", "--length", "32",
            "--histograms", str(folder)]
    assert cli.main(argv) == 0
    assert sorted(path.name for path in folder.iterdir()) == ["rmsnorm.png", "silu.png", "softmax.png"]
    assert "above bound" in capsys.readouterr().out


def test_gather_elements_large_table():
    # onnx's own GatherElements accepts at most 64 entries, and the exp table has K + 2.
    table = np.arange(1026, dtype=np.int64) * 3
    indices = np.array([0, 63, 64, 1025, 700], dtype=np.int64)
    node = helper.make_node("GatherElements", ["T", "I"], ["Y"], axis=0)
    graph = helper.make_graph(
        [node], "gather", [helper.make_tensor_value_info("I", onnx.TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.INT64, [5])],
        [onnx.numpy_helper.from_array(table, "T")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (result,) = energy._Evaluator(model).run(None, {"I": indices})
    np.testing.assert_array_equal(result, table[indices])
