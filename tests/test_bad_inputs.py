"""Bad input files, unsupported models and invalid options. Each case ends in a correct result or
in a clear error. The error names the file, node or value and what to do, exits non-zero, shows no
traceback unless --debug, and leaves no output file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_spike import cli
from onnx_spike.library import MAX_OPSET, MIN_OPSET
from onnx_spike.passes.convert import AlreadyConvertedError, ConvertOptions
from onnx_spike.pipeline import convert as pipeline_convert
from onnx_spike.pipeline.convert import convert_path
from onnx_spike.pipeline.runtime import make_session

from tiny_llama import save_one_layer_llama

# ------------------------------------------------------------------ helpers


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in this process; return (exit code, stdout, stderr) and check for tracebacks."""
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse exits with 2 on invalid usage
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "Traceback" not in out
    return code, out, err


def softmax_rmsnorm_model(opset: int = 18, ir_version: int = 10, dim: int | str = 8,
                          initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """Y = RMSNorm(Softmax(X)) as an exporter writes it, with ReduceMean axes fitting the opset."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", dim])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", dim])
    initializers = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                    helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5])]
    last_axis = -1 if opset >= 11 else 2  # negative axes came with opset 11
    if opset >= 18:
        initializers.append(helper.make_tensor("axes", TensorProto.INT64, [1], [-1]))
        mean = helper.make_node("ReduceMean", ["square", "axes"], ["mean"], name="norm/ReduceMean")
    else:
        mean = helper.make_node("ReduceMean", ["square"], ["mean"], axes=[last_axis], name="norm/ReduceMean")
    nodes = [helper.make_node("Softmax", ["X"], ["probs"], axis=last_axis, name="attn/Softmax"),
             helper.make_node("Pow", ["probs", "two"], ["square"], name="norm/Pow"), mean,
             helper.make_node("Add", ["mean", "eps"], ["shifted"], name="norm/Add"),
             helper.make_node("Sqrt", ["shifted"], ["rms"], name="norm/Sqrt"),
             helper.make_node("Reciprocal", ["rms"], ["inverse"], name="norm/Reciprocal"),
             helper.make_node("Mul", ["probs", "inverse"], ["Y"], name="norm/Mul")]
    inputs = [x]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers]
    graph = helper.make_graph(nodes, "softmax_rmsnorm", inputs, [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def relu_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"], name="relu")], "relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def folder_listing(folder: Path) -> dict[str, bytes]:
    return {item.name: item.read_bytes() for item in sorted(folder.iterdir()) if item.is_file()}


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save(softmax_rmsnorm_model(), tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A 1-layer Llama exported by Optimum, weights inside model.onnx, with a tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("optimum.onnxruntime")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from onnx_spike.pipeline.export import export_model

    source = save_one_layer_llama(tmp_path_factory)
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", "."] +
                                                 [f"w{i}" for i in range(59)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(source)
    return export_model(source, tmp_path_factory.mktemp("onnx") / "export", progress=False, with_past=False)


@pytest.fixture(scope="module")
def external_export(tiny_export, tmp_path_factory) -> Path:
    """The tiny export with its weights in model.onnx_data."""
    folder = tmp_path_factory.mktemp("external") / "export"
    shutil.copytree(tiny_export, folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
              size_threshold=256)
    assert (folder / "model.onnx_data").stat().st_size > 10_000
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive step fail the test, so an option error must come before any work."""
    import onnx_spike.calibrate
    import onnx_spike.pipeline.evaluate
    import onnx_spike.pipeline.export
    import onnx_spike.pipeline.main_job

    def started(*_args, **_kwargs):
        raise AssertionError("work started although an option is invalid")

    for module, name in ((pipeline_convert, "convert_path"), (pipeline_convert, "inspect_path"),
                         (onnx_spike.calibrate, "measure_ranges"), (onnx_spike.pipeline.evaluate, "validate"),
                         (onnx_spike.pipeline.evaluate, "evaluate"), (onnx_spike.pipeline.export, "export_model"),
                         (onnx_spike.pipeline.main_job, "run_main_job")):
        monkeypatch.setattr(module, name, started)


# ------------------------------------------------------------------ files


def test_missing_input_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "missing.onnx" in err
    assert "not found" in err
    assert not (tmp_path / "out.onnx").exists()


def test_empty_input_file(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = run_cli(capsys, "convert", empty, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "empty.onnx is empty" in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.97])
def test_truncated_model(tiny_export, tmp_path, capsys, fraction):
    data = (tiny_export / "model.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[:int(len(data) * fraction)])
    code, _, err = run_cli(capsys, "convert", cut, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "cut.onnx" in err
    assert "complete" in err or "truncated" in err
    assert not (tmp_path / "out.onnx").exists()


def test_model_cut_after_graph(tmp_path, capsys):
    """A file cut right after the graph field still parses; the missing opset import gives it away."""
    model = softmax_rmsnorm_model()
    full = model.SerializeToString()
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    del graph_only.opset_import[:]
    prefix = graph_only.SerializeToString()
    assert full.startswith(prefix)
    assert len(prefix) < len(full)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(prefix)
    code, _, err = run_cli(capsys, "convert", cut, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "cut.onnx" in err
    assert "truncated or corrupt" in err


def test_graph_with_undefined_value(tmp_path, capsys):
    model = softmax_rmsnorm_model()
    del model.graph.node[0]  # the Softmax that defines "probs"
    path = save(model, tmp_path / "holed.onnx")
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "norm/Pow" in err
    assert "'probs'" in err
    assert "truncated or corrupt" in err


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b"this is a text file, not a model\n",
                                     b'{"model": "json"}'], ids=["random-bytes", "text", "json"])
def test_not_an_onnx_file(tmp_path, capsys, content):
    path = tmp_path / "not_a_model.onnx"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "not_a_model.onnx" in err
    assert "not a readable ONNX model" in err or "no graph" in err or "truncated or corrupt" in err
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_model_with_calibration(tiny_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:model.stat().st_size // 2])
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    code, _, err = run_cli(capsys, "convert", folder, tmp_path / "out", "--calibrate", text)
    assert code == cli.EXIT_ERROR
    assert "model.onnx is not a readable ONNX model" in err
    assert not (tmp_path / "out").exists()


def test_calibrated_convert_succeeds(tiny_export, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    code, _, _ = run_cli(capsys, "convert", tiny_export, tmp_path / "out", "--calibrate", text,
                         "--calibration-length", "16", "--calibration-windows", "2")
    assert code == 0
    metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    sites = json.loads(metadata["onnx_spike"])["sites"]
    assert all(site["input_range"] is not None for site in sites)


def test_folder_without_model(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "convert", folder, tmp_path / "out")
    assert code == cli.EXIT_ERROR
    assert "folder without .onnx files" in err
    assert "model.onnx" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "inspect", folder)
    assert code == cli.EXIT_ERROR
    assert "without .onnx files" in err


def test_input_folder_given_as_file_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "model.onnx" / "inner.onnx")
    assert code == cli.EXIT_ERROR
    assert "not found" in err


def test_external_data_missing(external_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(external_export, folder)
    (folder / "model.onnx_data").unlink()
    code, _, err = run_cli(capsys, "convert", folder, tmp_path / "out")
    assert code == cli.EXIT_ERROR
    assert "model.onnx_data not found" in err
    assert "move it back" in err
    assert not (tmp_path / "out").exists()


def test_external_data_moved(external_export, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "model.onnx"
    moved.parent.mkdir()
    shutil.copy(external_export / "model.onnx", moved)
    code, _, err = run_cli(capsys, "convert", moved, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert str(moved.parent / "model.onnx_data") in err
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_truncated(external_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(external_export, folder)
    data = folder / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    code, _, err = run_cli(capsys, "convert", folder, tmp_path / "out")
    assert code == cli.EXIT_ERROR
    assert "model.onnx_data is truncated" in err
    assert "tensor" in err
    assert not (tmp_path / "out").exists()


def test_external_data_converts(external_export, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "convert", external_export, tmp_path / "out")
    assert code == 0
    assert (tmp_path / "out" / "model.onnx_data").stat().st_size > 10_000
    make_session(tmp_path / "out")


def test_output_is_input(model_file, tiny_export, capsys):
    before = model_file.read_bytes()
    code, _, err = run_cli(capsys, "convert", model_file, model_file, "--overwrite")
    assert code == cli.EXIT_ERROR
    assert "is the input file" in err
    assert model_file.read_bytes() == before
    code, _, err = run_cli(capsys, "convert", tiny_export, tiny_export, "--overwrite")
    assert code == cli.EXIT_ERROR
    assert "is the input folder" in err


def test_output_under_regular_file(model_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "convert", model_file, blocker / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "a_file" in err
    assert "which is a file" in err


def test_output_folder_missing(model_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", model_file, tmp_path / "no" / "such" / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "does not exist" in err


def test_output_in_immutable_folder(model_file, tmp_path, capsys):
    """Root ignores permission bits, so the folder is made immutable with chattr instead."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed, and root can write into any folder whatever its mode")
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs root on a file system with the immutable flag)")
    try:
        code, _, err = run_cli(capsys, "convert", model_file, folder / "out.onnx")
        assert code == cli.EXIT_ERROR
        assert "locked" in err
        assert "not writable" in err
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_output_exists_needs_overwrite(model_file, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    output.write_bytes(b"previous output")
    code, _, err = run_cli(capsys, "convert", model_file, output)
    assert code == cli.EXIT_ERROR
    assert "already exists" in err
    assert "--overwrite" in err
    assert output.read_bytes() == b"previous output"
    code, _, _ = run_cli(capsys, "convert", model_file, output, "--overwrite")
    assert code == 0
    assert onnx.load(str(output)).functions


def test_output_folder_not_empty_needs_overwrite(tiny_export, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("previous")
    code, _, err = run_cli(capsys, "convert", tiny_export, output, "--ops", "softmax")
    assert code == cli.EXIT_ERROR
    assert "not empty" in err
    assert "--overwrite" in err
    assert folder_listing(output) == {"keep.txt": b"previous"}


def test_output_kind_differs_from_input(model_file, tiny_export, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    code, _, err = run_cli(capsys, "convert", model_file, folder, "--overwrite")
    assert code == cli.EXIT_ERROR
    assert "is a folder" in err
    assert ".onnx file" in err
    file = tmp_path / "a_file.onnx"
    file.write_bytes(b"x")
    code, _, err = run_cli(capsys, "convert", tiny_export, file, "--overwrite")
    assert code == cli.EXIT_ERROR
    assert "is a file" in err
    assert "folder" in err
    assert file.read_bytes() == b"x"


def _disk_full_after(monkeypatch, written_bytes: int = 4096) -> None:
    """Make onnx_ir's save write `written_bytes` of the file, then fail with ENOSPC."""

    def save_until_full(model, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * written_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pipeline_convert.ir, "save", save_until_full)


def test_disk_full_keeps_previous_file(model_file, tmp_path, capsys, monkeypatch):
    output_folder = tmp_path / "out"
    output_folder.mkdir()
    output = output_folder / "spiking.onnx"
    assert run_cli(capsys, "convert", model_file, output)[0] == 0
    before = folder_listing(output_folder)

    _disk_full_after(monkeypatch)
    code, _, err = run_cli(capsys, "convert", model_file, output, "--overwrite", "--preset", "paper")
    assert code == cli.EXIT_ERROR
    assert "spiking.onnx" in err
    assert "No space left on device" in err
    assert "unchanged" in err
    assert folder_listing(output_folder) == before
    assert sorted(item.name for item in output_folder.iterdir()) == ["spiking.onnx"]


def test_disk_full_keeps_previous_folder(external_export, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    assert run_cli(capsys, "convert", external_export, output, "--ops", "softmax")[0] == 0
    before = folder_listing(output)

    _disk_full_after(monkeypatch)
    code, _, err = run_cli(capsys, "convert", external_export, output, "--overwrite")
    assert code == cli.EXIT_ERROR
    assert "No space left on device" in err
    assert folder_listing(output) == before  # model.onnx, its data file and the copied configs
    assert not [item for item in output.iterdir() if item.name.startswith(".")]


def test_disk_full_removes_new_folder(tiny_export, tmp_path, capsys, monkeypatch):
    _disk_full_after(monkeypatch)
    code, _, err = run_cli(capsys, "convert", tiny_export, tmp_path / "out")
    assert code == cli.EXIT_ERROR
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        cli.main(["--debug", "convert", str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx")])


def test_unexpected_error_without_traceback(model_file, tmp_path, capsys, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(pipeline_convert, "convert_path", broken)
    code, _, err = run_cli(capsys, "convert", model_file, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "internal error: KeyError" in err
    assert "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "convert", str(model_file), str(tmp_path / "out.onnx")])


def test_cli_subprocess_has_no_traceback(tmp_path):
    """The command in a fresh interpreter, as a user runs it, on a file that is not a model."""
    path = tmp_path / "notes.onnx"
    path.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "onnx_spike.cli", "convert", str(path), str(tmp_path / "out.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == cli.EXIT_ERROR
    assert "notes.onnx" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("opset,ir_version", [(7, 3), (11, 6), (13, 7), (17, 8)])
def test_old_opset_upgraded(tmp_path, capsys, opset, ir_version):
    model = softmax_rmsnorm_model(opset, ir_version, initializers_as_inputs=ir_version < 4)
    onnx.checker.check_model(model)
    path = save(model, tmp_path / "old.onnx")
    code, out, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == 0
    assert f"upgraded the default-domain opset from {opset} to {MIN_OPSET}" in out
    x = np.random.default_rng(opset).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(tmp_path / "out.onnx", x), run_model(path, x), atol=1e-3)


def test_opset_that_cannot_be_upgraded(tmp_path, capsys):
    # IR 3 needs every initializer listed as a graph input; the version converter rejects this one.
    path = save(softmax_rmsnorm_model(7, 3), tmp_path / "old.onnx")
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "old.onnx" in err
    assert "opset 7" in err
    assert f"export at opset {MIN_OPSET} or newer" in err


@pytest.mark.parametrize("opset", sorted({MIN_OPSET, 21, MAX_OPSET}))
def test_supported_opsets_convert(tmp_path, capsys, opset):
    path = save(softmax_rmsnorm_model(opset), tmp_path / "model.onnx")
    code, out, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == 0
    assert "upgraded" not in out
    x = np.random.default_rng(opset).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(tmp_path / "out.onnx", x), run_model(path, x), atol=1e-3)


@pytest.mark.parametrize("opset", [MAX_OPSET + 1, MAX_OPSET + 4])
def test_newer_opset_rejected(tmp_path, capsys, opset):
    path = save(softmax_rmsnorm_model(opset), tmp_path / "new.onnx")
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert f"opset {opset} is newer than the newest supported ({MAX_OPSET})" in err
    assert f"export at opset {MIN_OPSET} to {MAX_OPSET}" in err
    assert "new.onnx" in err


def test_newer_ir_version_rejected(tmp_path, capsys):
    path = save(softmax_rmsnorm_model(ir_version=onnx.IR_VERSION + 1), tmp_path / "new_ir.onnx")
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert f"IR version {onnx.IR_VERSION + 1} is newer" in err
    assert "new_ir.onnx" in err
    assert not (tmp_path / "out.onnx").exists()


def test_old_ir_version_raised(tmp_path, capsys):
    path = save(softmax_rmsnorm_model(ir_version=7), tmp_path / "model.onnx")
    code, out, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == 0
    assert "raised the IR version from 7 to 8" in out
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == 8


def test_custom_domain_left_alone(tmp_path, capsys):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 8])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 8])
    nodes = [helper.make_node("Softmax", ["X"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("FancyOp", ["probs"], ["Z"], domain="com.example", name="fancy", mode="fast")]
    model = helper.make_model(helper.make_graph(nodes, "custom", [x], [z]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    path = save(model, tmp_path / "custom.onnx")
    code, _, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == 0
    converted = onnx.load(str(tmp_path / "out.onnx"))
    by_name = {node.name: node for node in converted.graph.node}
    assert by_name["softmax"].domain == "onnx_spike"
    assert by_name["fancy"].domain == "com.example"
    assert by_name["fancy"].op_type == "FancyOp"
    assert by_name["fancy"].attribute[0].s == b"fast"
    assert {(o.domain, o.version) for o in converted.opset_import} >= {("com.example", 1), ("", 18)}


def test_already_converted(model_file, tmp_path, capsys):
    first = tmp_path / "first.onnx"
    assert run_cli(capsys, "convert", model_file, first)[0] == 0
    code, _, err = run_cli(capsys, "convert", first, tmp_path / "second.onnx")
    assert code == cli.EXIT_ERROR
    assert "first.onnx" in err
    assert "converted before" in err
    assert "convert the original" in err
    assert not (tmp_path / "second.onnx").exists()
    with pytest.raises(AlreadyConvertedError):
        convert_path(first, tmp_path / "second.onnx", ConvertOptions())


def test_no_target_ops(tmp_path, capsys):
    path = save(relu_model(), tmp_path / "relu.onnx")
    code, out, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_NOTHING_CONVERTED
    assert "relu.onnx" in err
    assert "--allow-empty" in err
    assert "softmax" in out  # the match report is printed
    assert not (tmp_path / "out.onnx").exists()
    code, _, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx", "--allow-empty")
    assert code == 0
    assert [node.op_type for node in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["Relu"]


def test_no_default_opset(tmp_path, capsys):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Fancy", ["X"], ["Y"], domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("com.example", 1)])
    path = save(model, tmp_path / "custom_only.onnx")
    code, _, err = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == cli.EXIT_ERROR
    assert "custom_only.onnx" in err
    assert "no default-domain" in err


def test_norm_with_symbolic_size_skipped(tmp_path, capsys):
    path = save(softmax_rmsnorm_model(dim="hidden"), tmp_path / "symbolic.onnx")
    code, out, _ = run_cli(capsys, "convert", path, tmp_path / "out.onnx")
    assert code == 0
    assert "[rmsnorm] norm/ReduceMean: normalized dimension unknown" in out
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(tmp_path / "out.onnx", x), run_model(path, x), atol=1e-3)


def test_validate_rejects_unconverted_model(tiny_export, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    code, _, err = run_cli(capsys, "validate", tiny_export, tiny_export, "--text", text, "--length", "8")
    assert code == cli.EXIT_ERROR
    assert "not a converted model" in err


def test_validate_folder_without_model(tokenizer_folder, tmp_path, capsys):
    converted = tmp_path / "converted"
    converted.mkdir()
    save(relu_model(), converted / "decoder.onnx")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 59}" for i in range(400)))
    code, _, err = run_cli(capsys, "validate", tokenizer_folder, converted, "--text", text, "--length", "8")
    assert code == cli.EXIT_ERROR
    assert f"{converted} has no model.onnx" in err


def test_bf16_model_unloadable_names_file(tmp_path):
    x = helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 8])
    y = helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["batch", 8])
    nodes = [helper.make_node("Sigmoid", ["X"], ["gate"], name="gate"), helper.make_node("Mul", ["X", "gate"], ["Y"])]
    path = save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "bf16.onnx")
    with pytest.raises(RuntimeError, match="onnxruntime cannot load .*bf16.onnx"):
        make_session(path)


# ------------------------------------------------------------------ options


def _precision_file(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


PRECISION_FILES = {
    "invalid-json": ("{softmax:", "cannot read"),
    "list": ([1, 2], "must be a JSON object"),
    "unknown-section": ({"attention": {}}, "unknown field(s) attention"),
    "unknown-field": ({"softmax": {"bogus_bits": 3}}, "softmax: unknown field(s) bogus_bits"),
    "unknown-nested-field": ({"silu": {"exp": {"knots": 3}}}, "silu.exp: unknown field(s) knots"),
    "wrong-type": ({"softmax": {"rounding": "no"}}, "softmax.rounding must be of type bool"),
    "section-not-object": ({"norm": 5}, "norm must be a JSON object"),
    "negative-time-steps": ({"softmax": {"division": {"method": "population", "time_steps": -4}}}, "time_steps"),
    "negative-bits": ({"softmax": {"frac_bits": -3}}, "softmax.frac_bits"),
    "too-wide-input": ({"norm": {"input_frac_bits": 60}}, "norm.input_frac_bits"),
    "too-wide-reciprocal": ({"norm": {"division": {"reciprocal_bits": 40}}}, "reciprocal_bits"),
}


@pytest.mark.parametrize("case", sorted(PRECISION_FILES))
def test_invalid_precision_json(model_file, tmp_path, capsys, no_work, case):
    content, message = PRECISION_FILES[case]
    path = _precision_file(tmp_path, f"{case}.json", content)
    code, _, err = run_cli(capsys, "convert", model_file, tmp_path / "out.onnx", "--precision-json", path)
    assert code == cli.EXIT_USAGE
    assert message in err
    assert f"{case}.json" in err
    assert not (tmp_path / "out.onnx").exists()


def test_unreadable_precision_json(model_file, tmp_path, capsys, no_work):
    for path in (tmp_path / "missing.json", tmp_path):
        code, _, err = run_cli(capsys, "convert", model_file, tmp_path / "out.onnx", "--precision-json", path)
        assert code == cli.EXIT_USAGE
        assert f"--precision-json: cannot read {path}" in err


CONVERT_OPTIONS = [
    (["--ops", "softmax,bogus"], "unknown op kind(s) bogus"),
    (["--ops", ","], "empty selection"),
    (["--ops", ""], "empty selection"),
    (["--layers", "x"], "--layers: invalid range 'x'"),
    (["--layers", "3-1"], "--layers: invalid range '3-1'"),
    (["--layers", "1,,2"], "--layers: invalid range ''"),
    (["--layers", "-1"], "--layers: invalid range '-1'"),
    (["--layers", "1-"], "--layers: invalid range '1-'"),
    (["--nodes", "(unclosed"], "--nodes: invalid regular expression"),
    (["--preset", "bogus"], "invalid choice: 'bogus'"),
    (["--softmax-bits", "-4"], "softmax.frac_bits"),
    (["--softmax-bits", "x"], "invalid int value: 'x'"),
    (["--silu-bits", "0"], "silu.frac_bits"),
    (["--norm-bits", "23"], "norm.frac_bits"),
    (["--norm-bits", "40"], "norm.frac_bits"),
    (["--gelu-bits", "99"], "gelu.frac_bits"),
    (["--calibrate", "missing.txt"], "--calibrate: text file missing.txt not found"),
    (["--calibrate", "text.txt", "--calibration-windows", "0"], "--calibration-windows: must be at least 1, got 0"),
    (["--calibrate", "text.txt", "--calibration-length", "0"], "--calibration-length: must be at least 8, got 0"),
    (["--calibrate", "text.txt", "--calibration-length", "-5"], "--calibration-length: must be at least 8, got -5"),
    (["--report-json", "no_folder/report.json"], "--report-json: folder no_folder does not exist"),
]


@pytest.mark.parametrize("argv,message", CONVERT_OPTIONS, ids=[" ".join(argv) for argv, _ in CONVERT_OPTIONS])
def test_invalid_convert_option(model_file, tmp_path, capsys, monkeypatch, no_work, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("w1 w2 w3. " * 100)
    code, _, err = run_cli(capsys, "convert", model_file, tmp_path / "out.onnx", *argv)
    assert code == cli.EXIT_USAGE
    assert message in err
    assert not (tmp_path / "out.onnx").exists()
    assert not (tmp_path / "no_folder").exists()


@pytest.mark.parametrize("argv,message", [(["--ops", "bogus"], "unknown op kind(s) bogus"),
                                          (["--layers", "a-b"], "--layers: invalid range 'a-b'")],
                         ids=["ops", "layers"])
def test_invalid_inspect_option(model_file, capsys, no_work, argv, message):
    code, _, err = run_cli(capsys, "inspect", model_file, *argv)
    assert code == cli.EXIT_USAGE
    assert message in err


@pytest.fixture
def tokenizer_folder(tiny_export, tmp_path) -> Path:
    """A folder with the tokenizer and no model: option errors must come before the models are read."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for item in tiny_export.iterdir():
        if item.name.startswith("tokenizer") or item.name == "special_tokens_map.json":
            shutil.copy(item, folder / item.name)
    return folder


EVALUATION_OPTIONS = [
    ("validate", ["--windows", "0"], "--windows: must be at least 1, got 0"),
    ("validate", ["--windows", "-2"], "--windows: must be at least 1, got -2"),
    ("validate", ["--length", "0"], "--length: must be at least 2, got 0"),
    ("validate", ["--length", "1"], "--length: must be at least 2, got 1"),
    ("validate", ["--threads", "-1"], "--threads: must be at least 1, got -1"),
    ("validate", ["--text", "missing.txt"], "--text: text file missing.txt not found"),
    ("validate", ["--json", "no_folder/result.json"], "--json: folder no_folder does not exist"),
    ("eval", ["--lengths", "0"], "--lengths: must be at least 2, got 0"),
    ("eval", ["--lengths", "512,a"], "--lengths: invalid integer 'a'"),
    ("eval", ["--lengths", ","], "--lengths: empty list"),
    ("eval", ["--windows", "0"], "--windows: must be at least 1, got 0"),
    ("eval", ["--threads", "0"], "--threads: must be at least 1, got 0"),
    ("eval", ["--text", "missing.txt"], "--text: text file missing.txt not found"),
    ("eval", ["--json", "no_folder/result.json"], "--json: folder no_folder does not exist"),
]


@pytest.mark.parametrize("command,argv,message", EVALUATION_OPTIONS,
                         ids=[f"{command} {' '.join(argv)}" for command, argv, _ in EVALUATION_OPTIONS])
def test_invalid_evaluation_option(tokenizer_folder, tmp_path, capsys, monkeypatch, no_work, command, argv, message):
    monkeypatch.chdir(tmp_path)
    models = ([tokenizer_folder, tmp_path / "converted"] if command == "validate"
              else [tmp_path / "converted", "--baseline", tokenizer_folder])
    code, _, err = run_cli(capsys, command, *models, *argv)
    assert code == cli.EXIT_USAGE
    assert message in err
    assert not (tmp_path / "no_folder").exists()


MAIN_OPTIONS = [(["--windows", "-1"], "--windows: must be at least 0, got -1"),
                (["--windows-1024", "x"], "--windows-1024: invalid integer 'x'"),
                (["--threads", "0"], "--threads: must be at least 1, got 0"),
                (["--presets", "default,bogus"], "--presets: unknown preset(s) bogus")]


@pytest.mark.parametrize("argv,message", MAIN_OPTIONS, ids=[" ".join(argv) for argv, _ in MAIN_OPTIONS])
def test_invalid_main_option(tmp_path, capsys, no_work, argv, message):
    code, _, err = run_cli(capsys, "main", "--workdir", tmp_path / "work", *argv)
    assert code == cli.EXIT_USAGE
    assert message in err
    assert not (tmp_path / "work").exists()


def test_invalid_export_option(tmp_path, capsys, no_work):
    code, _, err = run_cli(capsys, "export", tmp_path / "source", tmp_path / "out", "--dtype", "int8")
    assert code == cli.EXIT_USAGE
    assert "invalid choice: 'int8'" in err
    code, _, err = run_cli(capsys, "export", tmp_path / "source", tmp_path / "out", "--opset", "eighteen")
    assert code == cli.EXIT_USAGE
    assert "invalid int value: 'eighteen'" in err
    assert not (tmp_path / "out").exists()
