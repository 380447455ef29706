"""Convert files: a `.onnx` file or an export folder in, the same kind out.

The input is never modified. The converted model is written into a temporary folder beside
the output, checked with `onnx.checker` (by path, so models above 2 GB work), and only then
moved into place with `os.replace`, so an interrupted or failed run leaves any previous
output intact. Weights stored as external data are streamed tensor by tensor into the new
data file and are never inlined into the protobuf.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.inliner
import onnx_ir as ir

from onnx_spike.passes.convert import ConversionError, ConvertOptions, convert_ir, prepare
from onnx_spike.passes.sites import MatchReport

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class NothingConvertedError(ConversionError):
    """No site matched; the CLI maps this to its own exit code."""

    def __init__(self, message: str, report: MatchReport):
        super().__init__(message)
        self.report = report


def _external_tensors(proto: onnx.ModelProto):
    """Yield (tensor name, location, offset, length) of every tensor stored as external data."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                length = int(entries["length"]) if "length" in entries else None
                yield tensor.name, entries["location"], int(entries.get("offset", 0)), length


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    return {location for _, location, _, _ in _external_tensors(proto)}


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    """Check that every external data file exists and is long enough for the tensors stored in it."""
    sizes: dict[str, int] = {}
    for name, location, offset, length in _external_tensors(proto):
        data_path = path.parent / location
        if location not in sizes:
            if not data_path.is_file():
                raise ConversionError(f"{path}: external data file {location} not found next to the model "
                                      f"(expected {data_path}); move it back beside the .onnx file")
            sizes[location] = data_path.stat().st_size
        if length is not None and offset + length > sizes[location]:
            raise ConversionError(f"{path}: external data file {data_path} is truncated: tensor {name} needs bytes "
                                  f"{offset} to {offset + length} but the file has {sizes[location]}; copy the "
                                  "complete file again")


def _check_graph_complete(path: Path, proto: onnx.ModelProto) -> None:
    """Reject a main graph whose nodes read values that nothing defines, as a cut-off file can give."""
    graph = proto.graph
    defined = {value.name for value in graph.input}
    defined |= {tensor.name for tensor in graph.initializer}
    defined |= {sparse.values.name for sparse in graph.sparse_initializer}
    defined |= {output for node in graph.node for output in node.output}
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                raise ConversionError(f"{path}: node {node.name or node.op_type!r} reads {name!r}, which no node, "
                                      "graph input or initializer defines; the file is truncated or corrupt")
    for output in graph.output:
        if output.name not in defined:
            raise ConversionError(f"{path}: graph output {output.name!r} is not produced by any node; the file is "
                                  "truncated or corrupt")


def load_model_proto(path: Path) -> onnx.ModelProto:
    """Load the graph of an ONNX file without its external data, with clear errors."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise ConversionError(f"{path} is a folder; give the .onnx file, or a folder that contains {MODEL_FILE}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty; it is not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError and others
        raise ConversionError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error}); "
                              "check that the file is complete") from error
    if not proto.graph.node and not proto.graph.output:
        raise ConversionError(f"{path} contains no graph; it is not an ONNX model or it is truncated")
    _check_graph_complete(path, proto)
    _check_external_data(path, proto)
    return proto


def _check_output(input_path: Path, output_path: Path, overwrite: bool) -> None:
    if output_path.resolve() == input_path.resolve():
        raise ConversionError(f"output {output_path} is the input file; choose another output path "
                              "(the input is never modified)")
    if output_path.exists() and not overwrite:
        raise ConversionError(f"output {output_path} already exists; pass --overwrite to replace it")
    if output_path.is_dir():
        raise ConversionError(f"output {output_path} is a folder, but the input is a file; give a .onnx file path")
    _check_output_parent(output_path)


def _check_output_parent(output_path: Path) -> None:
    parent = output_path.parent
    if not parent.exists():
        raise ConversionError(f"output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConversionError(f"output {output_path} is inside {parent}, which is a file, not a folder; "
                              "choose another output path")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"output folder {parent} is not writable; choose another output path")


def _convert_in_memory(input_path: Path, options: ConvertOptions) -> tuple[ir.Model, MatchReport, bool]:
    proto = load_model_proto(input_path)
    external = bool(_external_locations(proto))
    report = MatchReport(model=str(input_path))
    try:
        model = prepare(proto, report)
        del proto
        ir.external_data.set_base_dir(model.graph, str(input_path.parent))
        convert_ir(model, options, report)
    except ConversionError as error:
        error.args = (f"{input_path}: {error}",)  # name the file, and keep the error's type
        raise
    return model, report, external


def convert_file(input_path: str | os.PathLike, output_path: str | os.PathLike, options: ConvertOptions,
                 overwrite: bool = False, allow_empty: bool = False) -> MatchReport:
    """Convert one ONNX file; returns the match report."""
    input_path, output_path = Path(input_path), Path(output_path)
    options.validate()
    _check_output(input_path, output_path, overwrite)
    model, report, external = _convert_in_memory(input_path, options)
    if report.replaced == 0 and not allow_empty:
        raise NothingConvertedError(f"{input_path}: no site was replaced; nothing written", report)

    write_model(model, output_path, external=external, inline=options.inline)
    log.info("wrote %s (%d sites replaced)", output_path, report.replaced)
    return report


def write_model(model: ir.Model, output_path: Path, external: bool, inline: bool = False) -> None:
    """Save atomically: write and check in a temporary folder, then rename into place."""
    data_name = f"{output_path.name}_data" if external else None
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    try:
        staged = staging / output_path.name
        ir.save(model, staged, external_data=data_name, size_threshold_bytes=1024 if external else 2**62)
        if inline:
            proto = onnx.load(str(staged), load_external_data=False)
            proto = onnx.inliner.inline_local_functions(proto)
            onnx.save(proto, str(staged))
        try:
            onnx.checker.check_model(str(staged), full_check=False)
        except onnx.checker.ValidationError as error:
            raise ConversionError(f"the converted model for {output_path} fails onnx.checker, so nothing was "
                                  f"written: {error}; please report this with the input model") from error
        # NOTE: each rename is atomic, but a crash between the two leaves the new data file beside
        # the previous model file, which then reads the wrong weights.
        if data_name:
            os.replace(staging / data_name, output_path.parent / data_name)
        os.replace(staged, output_path)
    except OSError as error:
        raise OSError(error.errno, f"writing {output_path} failed ({error.strerror or error}); any previous "
                                   "output is unchanged") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy a file through a temporary name beside the target, so a failed copy leaves the target as it was."""
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, f"copying {source} to {target} failed ({error.strerror or error})") from error


def check_paths(input_path: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool = False) -> None:
    """Check the input and output paths of `convert_path` before any work; raise with what to do."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: file or folder not found")
    if input_path.is_file():
        _check_output(input_path, output_path, overwrite)
        return

    if not any(input_path.glob("*.onnx")):
        raise ConversionError(f"{input_path} is a folder without .onnx files; give an export folder "
                              f"(with {MODEL_FILE}) or a .onnx file")
    if output_path.resolve() == input_path.resolve():
        raise ConversionError(f"output {output_path} is the input folder; choose another output folder")
    if output_path.exists() and not output_path.is_dir():
        raise ConversionError(f"output {output_path} is a file, but the input is a folder; give a folder path")
    if output_path.exists() and any(output_path.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {output_path} is not empty; pass --overwrite to replace its files")
    _check_output_parent(output_path / MODEL_FILE if output_path.exists() else output_path)


def convert_path(input_path: str | os.PathLike, output_path: str | os.PathLike, options: ConvertOptions,
                 overwrite: bool = False, allow_empty: bool = False) -> MatchReport:
    """Convert a `.onnx` file, or an export folder (every .onnx in it; other files copied)."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_paths(input_path, output_path, overwrite)
    if input_path.is_file():
        return convert_file(input_path, output_path, options, overwrite, allow_empty)

    models = sorted(input_path.glob("*.onnx"))
    options.validate()
    converted = []
    combined = MatchReport(model=str(input_path))
    data_files = set()
    for model_path in models:
        data_files |= _external_locations(load_model_proto(model_path))
        model, report, external = _convert_in_memory(model_path, options)
        converted.append((model_path, model, external))
        _merge(combined, report)
    if combined.replaced == 0 and not allow_empty:
        raise NothingConvertedError(f"{input_path}: no site was replaced in any model; nothing written", combined)

    created = not output_path.exists()
    output_path.mkdir(parents=True, exist_ok=True)
    try:
        for item in sorted(input_path.iterdir()):
            if item.suffix == ".onnx" or item.name in data_files or item.is_dir():
                continue
            _copy_atomic(item, output_path / item.name)
        for model_path, model, external in converted:
            write_model(model, output_path / model_path.name, external=external, inline=options.inline)
    except BaseException:
        if created:  # a folder that this call created contains nothing worth keeping
            shutil.rmtree(output_path, ignore_errors=True)
        raise
    return combined


def _merge(combined: MatchReport, report: MatchReport) -> None:
    combined.sites += report.sites
    combined.skipped += report.skipped
    combined.notes += report.notes
    for kind, count in report.found.items():
        combined.found[kind] = combined.found.get(kind, 0) + count


def inspect_path(path: str | os.PathLike, options: ConvertOptions) -> MatchReport:
    """The match report of a conversion, without writing anything."""
    path = Path(path)
    files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise ConversionError(f"{path} is a folder without .onnx files")
    combined = MatchReport(model=str(path))
    for file in files:
        _, report, _ = _convert_in_memory(file, options)
        _merge(combined, report)
    return combined
