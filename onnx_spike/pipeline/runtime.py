"""Run exported causal LMs in onnxruntime: sessions, inputs for one window, site inputs.

A model is a `.onnx` file or an export folder with `model.onnx`. Inputs are built from the
model's own input list: `input_ids`, `attention_mask` (all ones), `position_ids`,
`token_type_ids` (zeros) and empty `past_key_values.*` when the export has a cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_spike.passes.calibrate import saturation_limit

log = logging.getLogger(__name__)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(double)": np.float64}


def model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.onnx"
        if not candidate.exists():
            raise FileNotFoundError(f"{path} has no model.onnx; give an export folder or a .onnx file")
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    return path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Return the onnxruntime options for running original and converted models alike."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The memory pattern (one block planned from the first run's allocations) took a converted
    # SmolLM2's peak RSS in a 1024-token prefill from 2.2 GB to 3.4 GB, and the float model's not
    # at all (docs/benchmarks.md).
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """Create an onnxruntime CPU session; raise RuntimeError naming the file when onnxruntime cannot load it."""
    file = model_file(path)
    try:
        return ort.InferenceSession(str(file), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's exceptions derive from Exception only
        raise RuntimeError(f"onnxruntime cannot load {file}: {error}") from error


def window_feeds(session: ort.InferenceSession, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one forward pass over `tokens` ([batch, length] int64) with an empty cache."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim == 1:
        tokens = tokens[None]
    batch, length = tokens.shape
    feeds = {}
    for spec in session.get_inputs():
        dtype = _NUMPY_TYPES.get(spec.type, np.float32)
        if spec.name == "input_ids":
            feeds[spec.name] = tokens
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, length), dtype=dtype)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(length, dtype=dtype), (batch, length)).copy()
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros((batch, length), dtype=dtype)
        elif spec.name.startswith("past_key_values") or spec.name.startswith("past"):
            # Batch first, an empty sequence axis (2), and the static sizes elsewhere.
            shape = [d if isinstance(d, int) else 0 for d in spec.shape]
            shape[0] = batch
            shape[2] = 0
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
        else:
            raise ValueError(f"model input {spec.name!r} ({spec.type}) is not one this tool knows how to fill; it "
                             "fills input_ids, attention_mask, position_ids, token_type_ids and past_key_values.*, "
                             "as in an Optimum text-generation export")
    return feeds


def logits_of(session: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
    output = "logits" if any(o.name == "logits" for o in session.get_outputs()) else session.get_outputs()[0].name
    return session.run([output], window_feeds(session, tokens))[0]


# ---------------------------------------------------------------- site inputs and saturation


def spiking_sites(converted: str | os.PathLike) -> list[dict]:
    """The per-site records of a converted model, with the name of each site's input value."""
    from onnx_spike.pipeline.convert import load_model_proto

    proto = load_model_proto(model_file(converted))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if "onnx_spike" not in metadata:
        raise ValueError(f"{converted} has no onnx_spike metadata, so it is not a converted model; give the output "
                         "of onnx-spike convert")
    sites = {site["name"]: site for site in json.loads(metadata["onnx_spike"])["sites"]}

    def visit(graph):
        for node in graph.node:
            if node.domain == "onnx_spike" and node.name in sites:
                sites[node.name]["input"] = node.input[0]
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(proto.graph)
    return list(sites.values())


class SiteProbe:
    """The original model with the inputs of the converted sites exposed as extra outputs."""

    def __init__(self, original: str | os.PathLike, sites: list[dict], threads: int | None = None):
        path = model_file(original)
        proto = onnx.load(str(path), load_external_data=False)
        graph_values = {v.name for v in proto.graph.value_info} | {i.name for i in proto.graph.input}
        graph_values |= {out for node in proto.graph.node for out in node.output}
        self.sites = [site for site in sites if site.get("input") in graph_values]
        existing = {o.name for o in proto.graph.output}
        for name in sorted({site["input"] for site in self.sites} - existing):
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
        self._staging = Path(tempfile.mkdtemp(prefix="onnx-spike-probe-"))
        for item in path.parent.iterdir():
            if item.is_file() and item.suffix != ".onnx":
                os.symlink(item.resolve(), self._staging / item.name)
        probe_path = self._staging / path.name
        onnx.save(proto, str(probe_path))
        self.session = make_session(probe_path, threads)

    def close(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def count(self, tokens: np.ndarray, totals: dict[str, dict] | None = None) -> dict[str, dict]:
        """Add, per site, how many finite activations its encode would clip on this window."""
        totals = totals if totals is not None else {}
        names = sorted({site["input"] for site in self.sites})
        values = dict(zip(names, self.session.run(names, window_feeds(self.session, tokens))))
        for site in self.sites:
            x = values[site["input"]].astype(np.float64)
            finite = np.isfinite(x)
            if site["kind"] == "softmax":
                finite &= x > -1e30  # attention masks (finfo.min) saturate by design
            limit = saturation_limit(site["kind"], site["input_frac_bits"])
            entry = totals.setdefault(site["name"], {"kind": site["kind"], "saturated": 0, "total": 0,
                                                     "max_abs": 0.0, "limit": limit})
            entry["saturated"] += int(np.count_nonzero(np.abs(x[finite]) >= limit))
            entry["total"] += int(np.count_nonzero(finite))
            if finite.any():
                entry["max_abs"] = max(entry["max_abs"], float(np.abs(x[finite]).max()))
        return totals
