"""Tests of file conversion: the input is never changed, external data stays external, export
folders keep their other files, and output paths are checked before anything is written.

Every model here is hand-built with onnx.helper: MatMul by a weight matrix, RMSNorm with a
weight, then Softmax, which gives one rmsnorm and one softmax site.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spike.graph import DOMAIN
from onnx_spike.operators import error_bound
from onnx_spike.passes.convert import ConversionError, ConvertOptions
from onnx_spike.pipeline.convert import NothingConvertedError, convert_file, convert_path
from onnx_spike.precision import preset

IN_DIM = 256
HIDDEN = 512
WEIGHT_BYTES = IN_DIM * HIDDEN * 4
EXPORT_FILES = {"config.json": '{"model_type": "llama"}', "tokenizer.json": '{"version": "1.0"}',
                "tokenizer_config.json": "{}", "generation_config.json": '{"do_sample": false}',
                "special_tokens_map.json": "{}"}


def site_model(hidden: int = HIDDEN) -> onnx.ModelProto:
    """x [2, 3, 16] -> MatMul(proj [16, hidden]) -> RMSNorm * weight -> Softmax -> y."""
    rng = np.random.default_rng(0)
    projection = numpy_helper.from_array((rng.normal(size=(IN_DIM, hidden)) * 0.3).astype(np.float32), "proj.weight")
    weight = numpy_helper.from_array((1.0 + 0.1 * rng.normal(size=hidden)).astype(np.float32), "norm.weight")

    def const(name, value, dtype=np.float32):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))

    nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["h"], name="proj"),
             const("two", 2.0), const("axes", [-1], np.int64), const("eps", 1e-6), const("one", 1.0),
             helper.make_node("Pow", ["h", "two"], ["square"], name="norm/Pow"),
             helper.make_node("ReduceMean", ["square", "axes"], ["mean"], name="norm/ReduceMean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["shifted"], name="norm/Add"),
             helper.make_node("Sqrt", ["shifted"], ["rms"], name="norm/Sqrt"),
             helper.make_node("Div", ["one", "rms"], ["inverse"], name="norm/Div"),
             helper.make_node("Mul", ["h", "inverse"], ["n"], name="norm/Mul"),
             helper.make_node("Mul", ["norm.weight", "n"], ["scaled"], name="norm/weight"),
             helper.make_node("Softmax", ["scaled"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "sites", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, IN_DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, hidden])],
                              initializer=[projection, weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def plain_model() -> onnx.ModelProto:
    """A graph without any target op: y = x + 1."""
    one = numpy_helper.from_array(np.ones(IN_DIM, np.float32), "one")
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"], name="add")], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, IN_DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, IN_DIM])],
                              initializer=[one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> None:
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def sample() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(2, 3, IN_DIM)).astype(np.float32)


def assert_outputs_close(original: Path, converted: Path) -> None:
    """The converted model's output is within the two sites' bounds of the original's."""
    x = sample()
    expected = run(original, x)
    actual = run(converted, x)
    precision = preset("default")
    # The norm error enters the Softmax, whose slope is at most 1/2, times the weight (near 1).
    bound = error_bound("softmax", expected, precision) + 0.5 * 1.5 * error_bound("rmsnorm", expected, precision)
    assert np.all(np.abs(actual - expected) <= bound + 1e-6)


def staging_left(folder: Path) -> list[str]:
    return [item.name for item in folder.iterdir() if item.name.startswith(".")]


def test_input_file_unchanged(tmp_path):
    """The input .onnx and its external data file are byte-for-byte the same after conversion."""
    source = tmp_path / "model.onnx"
    save_external(site_model(), source)
    before = {name: sha256(tmp_path / name) for name in ("model.onnx", "weights.bin")}
    mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in before}

    report = convert_file(source, tmp_path / "spiking.onnx", ConvertOptions())

    assert report.replaced == 2
    assert {name: sha256(tmp_path / name) for name in before} == before
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in before} == mtimes


def test_external_data_kept_external(tmp_path):
    """Weights stored as external data are written to <output>_data beside the output, the
    protobuf stays small, and the converted model runs."""
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source = source_dir / "model.onnx"
    save_external(site_model(), source)
    target = tmp_path / "out" / "spiking.onnx"
    target.parent.mkdir()

    convert_file(source, target, ConvertOptions())

    data = target.parent / "spiking.onnx_data"
    assert sorted(item.name for item in target.parent.iterdir()) == ["spiking.onnx", "spiking.onnx_data"]
    assert data.stat().st_size >= WEIGHT_BYTES
    assert target.stat().st_size < WEIGHT_BYTES
    model = onnx.load(str(target), load_external_data=False)
    projection = next(t for t in model.graph.initializer if t.name == "proj.weight")
    assert projection.data_location == TensorProto.EXTERNAL
    assert {entry.key: entry.value for entry in projection.external_data}["location"] == "spiking.onnx_data"
    onnx.checker.check_model(str(target), full_check=True)
    assert_outputs_close(source, target)


def test_embedded_weights_stay_embedded(tmp_path):
    """A model with its weights inside the protobuf is written the same way, without a data file."""
    source = tmp_path / "model.onnx"
    onnx.save(site_model(), source)
    target = tmp_path / "spiking.onnx"

    convert_file(source, target, ConvertOptions())

    assert not (tmp_path / "spiking.onnx_data").exists()
    assert target.stat().st_size > WEIGHT_BYTES
    assert_outputs_close(source, target)


def test_missing_external_data_rejected(tmp_path):
    """An input whose external data file is gone fails with the expected path in the message."""
    source = tmp_path / "model.onnx"
    save_external(site_model(), source)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ConversionError, match="external data file weights.bin not found"):
        convert_file(source, tmp_path / "spiking.onnx", ConvertOptions())
    assert not (tmp_path / "spiking.onnx").exists()


def test_folder_copies_export_files(tmp_path):
    """Converting an export folder converts every .onnx in it and copies the config and
    tokenizer files unchanged, but not the input's external data file."""
    source = tmp_path / "export"
    source.mkdir()
    save_external(site_model(), source / "model.onnx")
    onnx.save(plain_model(), source / "embed.onnx")
    for name, text in EXPORT_FILES.items():
        (source / name).write_text(text)
    target = tmp_path / "spiking"

    report = convert_path(source, target, ConvertOptions())

    assert report.replaced == 2
    names = sorted(item.name for item in target.iterdir())
    assert names == sorted([*EXPORT_FILES, "model.onnx", "model.onnx_data", "embed.onnx"])
    for name, text in EXPORT_FILES.items():
        assert (target / name).read_text() == text
    converted = onnx.load(str(target / "model.onnx"), load_external_data=False)
    assert sum(node.domain == DOMAIN for node in converted.graph.node) == 2
    untouched = onnx.load(str(target / "embed.onnx"))
    assert [node.op_type for node in untouched.graph.node] == ["Add"]
    assert_outputs_close(source / "model.onnx", target / "model.onnx")


def test_output_exists_needs_overwrite(tmp_path):
    """An existing output is left alone unless overwrite is set; with it, it is replaced."""
    source = tmp_path / "model.onnx"
    onnx.save(site_model(), source)
    target = tmp_path / "spiking.onnx"
    target.write_bytes(b"previous output")

    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        convert_file(source, target, ConvertOptions())
    assert target.read_bytes() == b"previous output"

    report = convert_file(source, target, ConvertOptions(), overwrite=True)
    assert report.replaced == 2
    assert sum(node.domain == DOMAIN for node in onnx.load(str(target)).graph.node) == 2


def test_output_folder_not_empty_needs_overwrite(tmp_path):
    """A non-empty output folder is rejected unless overwrite is set."""
    source = tmp_path / "export"
    source.mkdir()
    onnx.save(site_model(), source / "model.onnx")
    target = tmp_path / "spiking"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(ConversionError, match="is not empty; pass --overwrite"):
        convert_path(source, target, ConvertOptions())
    assert sorted(item.name for item in target.iterdir()) == ["notes.txt"]


def test_output_equal_to_input_rejected(tmp_path):
    """The input cannot be the output, however the path is spelled, for a file or a folder."""
    source = tmp_path / "model.onnx"
    onnx.save(site_model(), source)
    digest = sha256(source)
    for target in (source, tmp_path / "." / "model.onnx", tmp_path / "sub" / ".." / "model.onnx"):
        with pytest.raises(ConversionError, match="is the input file"):
            convert_file(source, target, ConvertOptions(), overwrite=True)
    with pytest.raises(ConversionError, match="is the input folder"):
        convert_path(tmp_path, tmp_path, ConvertOptions(), overwrite=True)
    assert sha256(source) == digest


def test_nothing_converted(tmp_path):
    """A model without target ops raises NothingConvertedError and writes nothing, unless
    allow_empty is set."""
    source = tmp_path / "plain.onnx"
    onnx.save(plain_model(), source)
    target = tmp_path / "spiking.onnx"

    with pytest.raises(NothingConvertedError, match="no site was replaced; nothing written") as raised:
        convert_file(source, target, ConvertOptions())
    assert raised.value.report.replaced == 0
    assert not target.exists()
    assert staging_left(tmp_path) == []

    report = convert_file(source, target, ConvertOptions(), allow_empty=True)
    assert report.replaced == 0
    converted = onnx.load(str(target))
    assert [node.op_type for node in converted.graph.node] == ["Add"]
    assert DOMAIN not in [o.domain for o in converted.opset_import]


def test_failed_check_keeps_previous_output(tmp_path, monkeypatch):
    """When the written model fails the checker, the previous output and the folder are left
    as they were: the model is staged in a temporary folder and renamed only after the check."""
    source = tmp_path / "model.onnx"
    save_external(site_model(), source)
    target = tmp_path / "spiking.onnx"
    target.write_bytes(b"previous output")

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("rejected by the test")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ConversionError, match="fails onnx.checker, so nothing was written: rejected by the test"):
        convert_file(source, target, ConvertOptions(), overwrite=True)
    assert target.read_bytes() == b"previous output"
    assert not (tmp_path / "spiking.onnx_data").exists()
    assert staging_left(tmp_path) == []


@pytest.mark.slow
def test_model_above_2gb(tmp_path):
    """A synthetic model with 2.34 GiB of external initializers converts, with its data
    streamed to the new data file. The graph is three [13107200, 16] float tables feeding
    Gather, then Softmax. A protobuf cannot exceed 2 GiB, so no tensor may be inlined."""
    rows, width = 13_107_200, 16
    chunk = np.full((rows // 16, width), 0.01, np.float32)
    tensor_bytes = rows * width * 4
    data = tmp_path / "model.onnx_data"
    initializers = []
    with data.open("wb") as handle:
        for index in range(3):
            for _ in range(16):
                handle.write(chunk.tobytes())
            tensor = TensorProto(name=f"table{index}", data_type=TensorProto.FLOAT, dims=[rows, width],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(index * tensor_bytes)),
                               ("length", str(tensor_bytes))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
    nodes = [helper.make_node("Gather", [f"table{index}", "ids"], [f"row{index}"], axis=0) for index in range(3)]
    nodes += [helper.make_node("Add", ["row0", "row1"], ["sum01"]), helper.make_node("Add", ["sum01", "row2"], ["sum"]),
              helper.make_node("Softmax", ["sum"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])],
                              initializer=initializers)
    source = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), source)
    assert data.stat().st_size > 2 * 2**30
    stamp = (data.stat().st_size, data.stat().st_mtime_ns)

    target = tmp_path / "out" / "spiking.onnx"
    target.parent.mkdir()
    report = convert_file(source, target, ConvertOptions())

    assert report.replaced == 1
    assert (data.stat().st_size, data.stat().st_mtime_ns) == stamp
    assert target.stat().st_size < 2**20
    assert (target.parent / "spiking.onnx_data").stat().st_size == 3 * tensor_bytes
    model = onnx.load(str(target), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer if t.name.startswith("table"))
    onnx.checker.check_model(str(target))
    offsets = sorted(int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer
                     if t.name.startswith("table"))
    assert len(offsets) == 3
    with (target.parent / "spiking.onnx_data").open("rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            np.testing.assert_array_equal(np.frombuffer(handle.read(64), np.float32), np.full(16, 0.01, np.float32))
