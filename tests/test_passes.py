"""Tests of the rewrite passes: exported zoo models, hand-built graph variants, selection,
the match report, output validity and calibrated input ranges.

Zoo models are exported once per session by tests/model_zoo.py (Optimum at opset 18, torch.onnx
dynamo at opset 18 and 23) into a pytest temporary folder. Variants that no exporter writes are
built with onnx.helper, and each test docstring names which of the two a graph comes from.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_spike.graph import DOMAIN
from onnx_spike.operators import error_bound
from onnx_spike.passes.calibrate import calibrated_frac_bits
from onnx_spike.passes.convert import (
    FUSED_ATTENTION_REASON,
    METADATA_KEY,
    AlreadyConvertedError,
    ConversionError,
    ConvertOptions,
)
from onnx_spike.passes.sites import KINDS, MatchReport
from onnx_spike.pipeline.convert import convert_file, inspect_path
from onnx_spike.precision import preset

PRECISION = preset("default")
SHAPE = [2, 3, 16]
FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
# Op types that a replaced site removes from the graph (GELU's only when GELU is selected).
ANCHOR_OPS = {"Softmax", "Sigmoid", "ReduceMean", "LayerNormalization", "RMSNormalization"}
GELU_ANCHOR_OPS = {"Erf", "Tanh", "Gelu"}


# ---------------------------------------------------------------------------------------------
# Helpers


def run_model(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in onnxruntime on the CPU, with the default graph optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def convert_model(model: onnx.ModelProto, tmp_path: Path, name: str = "model",
                  **options) -> tuple[onnx.ModelProto, MatchReport, Path]:
    """Save `model`, convert it with convert_file and load the result."""
    source = tmp_path / f"{name}.onnx"
    target = tmp_path / f"{name}.spiking.onnx"
    onnx.save(model, source)
    report = convert_file(source, target, ConvertOptions(**options))
    return onnx.load(target), report, target


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Count op types in the main graph and every nested subgraph (functions excluded)."""
    counts: collections.Counter = collections.Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(model.graph)
    return counts


def spiking_calls(model: onnx.ModelProto) -> int:
    return sum(1 for node in model.graph.node if node.domain == DOMAIN)


def replaced(report: MatchReport) -> dict[str, int]:
    """Replaced sites per kind, kinds with none left out."""
    return {kind: row["replaced"] for kind, row in report.counts().items() if row["replaced"]}


def tensor_info(name: str, shape=SHAPE, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def constant(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(np.array(value, dtype=dtype), name))


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 18, extra_opsets=(),
               ir_version: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "handbuilt", list(inputs), list(outputs), initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, 1) for domain in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def sample(shape=SHAPE, scale: float = 2.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def norm_weight(dim: int = SHAPE[-1], name: str = "norm.weight", seed: int = 1) -> onnx.TensorProto:
    values = 1.0 + 0.3 * np.random.default_rng(seed).normal(size=dim)
    return numpy_helper.from_array(values.astype(np.float32), name)


def rmsnorm_nodes(x: str, out: str, inverse: str = "div", prefix: str = "norm", eps: float = 1e-6) -> list:
    """Decomposed RMSNorm without weight: x * 1/sqrt(mean(x^2) + eps), as Optimum writes it
    ("div"), as dynamo writes it ("reciprocal"), or as x / sqrt(...) ("direct")."""
    p = prefix
    nodes = [constant(f"{p}_two", 2.0), constant(f"{p}_axes", [-1], np.int64), constant(f"{p}_eps", eps),
             helper.make_node("Pow", [x, f"{p}_two"], [f"{p}_square"], name=f"{p}/Pow"),
             helper.make_node("ReduceMean", [f"{p}_square", f"{p}_axes"], [f"{p}_mean"], name=f"{p}/ReduceMean",
                              keepdims=1),
             helper.make_node("Add", [f"{p}_mean", f"{p}_eps"], [f"{p}_sum"], name=f"{p}/Add"),
             helper.make_node("Sqrt", [f"{p}_sum"], [f"{p}_rms"], name=f"{p}/Sqrt")]
    if inverse == "div":
        nodes += [constant(f"{p}_one", 1.0),
                  helper.make_node("Div", [f"{p}_one", f"{p}_rms"], [f"{p}_inv"], name=f"{p}/Div"),
                  helper.make_node("Mul", [x, f"{p}_inv"], [out], name=f"{p}/Mul")]
    elif inverse == "reciprocal":
        nodes += [helper.make_node("Reciprocal", [f"{p}_rms"], [f"{p}_inv"], name=f"{p}/Reciprocal"),
                  helper.make_node("Mul", [x, f"{p}_inv"], [out], name=f"{p}/Mul")]
    else:
        nodes += [helper.make_node("Div", [x, f"{p}_rms"], [out], name=f"{p}/Div")]
    return nodes


def rms_reference(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)


def layernorm_reference(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=-1, keepdims=True)
    return centered / np.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)


def softmax_reference(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x64 = x.astype(np.float64)
    weights = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    return weights / weights.sum(axis=axis, keepdims=True)


def silu_reference(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / (1.0 + np.exp(-x64))


def gelu_tanh_reference(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))


def assert_within_bound(actual: np.ndarray, expected: np.ndarray, bound: np.ndarray, slack: float = 1e-6) -> None:
    """Require |actual - expected| <= bound + slack everywhere; `slack` covers float32 rounding."""
    error = np.abs(actual.astype(np.float64) - expected)
    excess = error - (bound + slack)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"error {error[worst]:.3g} at {worst} exceeds the bound {bound[worst]:.3g} "
                               f"(max error {error.max():.3g})")


# Largest gap between erf-GELU and tanh-GELU: 4.73e-4 at x = -2.70, found on a 1e-4 grid over
# [-8, 8]. The spiking GELU and its error bound follow the tanh form.
GELU_FORM_GAP = 4.8e-4


@functools.cache
def site_bound(kind: str) -> float:
    """Largest per-element error bound of one site on rows of 64 values drawn from N(0, 3^2),
    the width and about the activation scale of the zoo models."""
    x = np.random.default_rng(0).normal(scale=3.0, size=(64, 64))
    bound = float(error_bound(kind, x, PRECISION).max())
    return bound + GELU_FORM_GAP if kind == "gelu" else bound


def logits_tolerance(report: MatchReport) -> float:
    """Sum of the per-site bounds: each site's error reaches the logits through the residual
    stream with a gain near 1 in these 2-layer models (an estimate, not a proven bound)."""
    return sum(site_bound(site.kind) for site in report.sites)


# ---------------------------------------------------------------------------------------------
# Zoo models


@dataclass(frozen=True)
class ZooCase:
    arch: str
    exporter: str  # "optimum" (opset 18), "dynamo18" or "dynamo23"
    dtype: str
    sites: dict = field(hash=False)  # replaced sites per kind with the default op selection
    gelu: int = 0  # GELU sites, replaced only when "gelu" is selected
    fused_attention: int = 0  # Attention ops whose Softmax is reported as skipped
    variant_ops: tuple = ()  # op types the input must contain: the pattern variant under test

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.exporter}-{self.dtype}"


DECODER_SITES = {"softmax": 2, "silu": 2, "rmsnorm": 5}
ZOO_CASES = [
    ZooCase("llama", "optimum", "fp32", DECODER_SITES, variant_ops=("Softmax", "Sigmoid", "Pow", "Div")),
    ZooCase("mistral", "optimum", "fp32", DECODER_SITES, variant_ops=("Softmax", "Sigmoid", "Pow")),
    ZooCase("qwen2", "optimum", "fp32", DECODER_SITES, variant_ops=("Softmax", "Sigmoid", "Pow")),
    ZooCase("phi3", "optimum", "fp32", DECODER_SITES, variant_ops=("Softmax", "Sigmoid", "Pow")),
    ZooCase("qwen3", "optimum", "fp32", {"softmax": 2, "silu": 2, "rmsnorm": 9}, variant_ops=("Pow",)),
    ZooCase("gemma", "optimum", "fp32", {"softmax": 2, "rmsnorm": 5}, gelu=2, variant_ops=("Tanh",)),
    ZooCase("gpt2", "optimum", "fp32", {"softmax": 2, "layernorm": 5}, gelu=2,
            variant_ops=("LayerNormalization", "Tanh")),
    ZooCase("bert", "optimum", "fp32", {"softmax": 2, "layernorm": 6}, gelu=3,
            variant_ops=("LayerNormalization", "Erf")),
    ZooCase("llama", "optimum", "fp16", DECODER_SITES, variant_ops=("Cast", "Softmax")),
    ZooCase("bert", "optimum", "fp16", {"softmax": 2, "layernorm": 6}, gelu=3, variant_ops=("Erf",)),
    ZooCase("llama", "dynamo18", "fp32", DECODER_SITES, variant_ops=("Reciprocal", "Softmax")),
    ZooCase("gemma", "dynamo18", "fp32", {"softmax": 2, "rmsnorm": 5}, gelu=2, variant_ops=("Reciprocal", "Tanh")),
    ZooCase("llama", "dynamo23", "fp32", {"silu": 2, "rmsnorm": 5}, fused_attention=2,
            variant_ops=("RMSNormalization", "Attention")),
    ZooCase("qwen3", "dynamo23", "fp32", {"silu": 2, "rmsnorm": 9}, fused_attention=2,
            variant_ops=("RMSNormalization", "Attention")),
    ZooCase("bert", "dynamo23", "fp32", {"layernorm": 6}, gelu=3, fused_attention=2,
            variant_ops=("LayerNormalization", "Gelu", "Attention")),
]
ZOO_IDS = [case.id for case in ZOO_CASES]


class Zoo:
    """Exports and conversions of zoo models, each made once per test session."""

    def __init__(self, root: Path, model_zoo):
        self.root = root
        self.model_zoo = model_zoo
        self._exports: dict[str, Path] = {}
        self._conversions: dict[tuple, tuple[Path, MatchReport]] = {}
        self._logits: dict[Path, np.ndarray] = {}

    def export(self, arch: str, exporter: str = "optimum", dtype: str = "fp32") -> Path:
        key = f"{arch}-{exporter}-{dtype}"
        if key not in self._exports:
            if exporter == "optimum":
                path = self.model_zoo.export_optimum(arch, self.root / "exports", dtype=dtype)
            else:
                opset = int(exporter.removeprefix("dynamo"))
                path = self.model_zoo.export_dynamo(arch, self.root / "exports" / key / "model.onnx", opset=opset)
            self._exports[key] = path
        return self._exports[key]

    def convert(self, case: ZooCase, with_gelu: bool = False) -> tuple[Path, MatchReport]:
        key = (case.id, with_gelu)
        if key not in self._conversions:
            ops = KINDS if with_gelu else ConvertOptions().ops
            target = self.root / "converted" / f"{case.id}{'-gelu' if with_gelu else ''}.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            report = convert_file(self.export(case.arch, case.exporter, case.dtype), target, ConvertOptions(ops=ops))
            self._conversions[key] = (target, report)
        return self._conversions[key]

    def feeds(self, arch: str, model_path: Path) -> dict[str, np.ndarray]:
        """The zoo's example input for every graph input: ids, mask, positions, token types."""
        example = self.model_zoo.example_inputs(arch)
        batch, length = example["input_ids"].shape
        extra = {"position_ids": np.arange(length, dtype=np.int64)[None].repeat(batch, axis=0),
                 "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
        names = [value.name for value in onnx.load(str(model_path), load_external_data=False).graph.input]
        return {name: example[name] if name in example else extra[name] for name in names}

    def logits(self, arch: str, model_path: Path) -> np.ndarray:
        if model_path not in self._logits:
            logits = run_model(model_path, self.feeds(arch, model_path))[0]
            self._logits[model_path] = logits.astype(np.float32)
        return self._logits[model_path]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    model_zoo = pytest.importorskip("model_zoo", reason="the zoo needs the export extra (torch, optimum)")
    return Zoo(tmp_path_factory.mktemp("zoo"), model_zoo)


@pytest.fixture(scope="session")
def llama(zoo) -> Path:
    """The Optimum fp32 export of the 2-layer Llama."""
    return zoo.export("llama")


@pytest.mark.parametrize("case", ZOO_CASES, ids=ZOO_IDS)
def test_zoo_input_has_variant(zoo, case):
    """Exported: the graph contains the pattern variant that its case is meant to cover."""
    counts = op_counts(onnx.load(str(zoo.export(case.arch, case.exporter, case.dtype)), load_external_data=False))
    missing = [op for op in case.variant_ops if not counts[op]]
    assert not missing, f"{case.id} has no {missing}: {dict(counts)}"
    if case.exporter == "dynamo23":
        assert counts["Softmax"] == 0


@pytest.mark.parametrize("case", ZOO_CASES, ids=ZOO_IDS)
def test_zoo_counts_default_ops(zoo, case):
    """Exported: the default selection replaces every Softmax, SiLU and norm of the architecture."""
    path, report = zoo.convert(case)
    assert replaced(report) == case.sites
    model = onnx.load(str(path), load_external_data=False)
    assert spiking_calls(model) == sum(case.sites.values())
    left = {op: n for op, n in op_counts(model).items() if op in ANCHOR_OPS}
    assert left == {}


@pytest.mark.parametrize("case", ZOO_CASES, ids=ZOO_IDS)
def test_zoo_gelu_only_when_asked(zoo, case):
    """Exported: GELU sites are skipped as not selected by default and replaced when asked."""
    _, default_report = zoo.convert(case)
    gelu_skips = [skip for skip in default_report.skipped if skip.kind == "gelu"]
    assert len(gelu_skips) == case.gelu
    assert all(skip.reason == "gelu not selected" for skip in gelu_skips)

    path, report = zoo.convert(case, with_gelu=True)
    assert replaced(report) == {**case.sites, **({"gelu": case.gelu} if case.gelu else {})}
    left = {op: n for op, n in op_counts(onnx.load(str(path), load_external_data=False)).items()
            if op in ANCHOR_OPS | GELU_ANCHOR_OPS}
    assert left == {}


@pytest.mark.parametrize("case", [case for case in ZOO_CASES if case.fused_attention], ids=lambda case: case.id)
def test_zoo_fused_attention_reported(zoo, case):
    """Exported (dynamo, opset 23): the Softmax inside each Attention op is reported as skipped."""
    _, report = zoo.convert(case)
    counts = report.counts()["softmax"]
    assert counts == {"found": case.fused_attention, "replaced": 0, "skipped": case.fused_attention}
    reasons = [skip.reason for skip in report.skipped if skip.kind == "softmax"]
    assert reasons == [FUSED_ATTENTION_REASON] * case.fused_attention


LOGITS_CASES = [(case, False) for case in ZOO_CASES] + [(case, True) for case in ZOO_CASES if case.gelu]


@pytest.mark.parametrize("case, with_gelu", LOGITS_CASES,
                         ids=[f"{case.id}{'-gelu' if with_gelu else ''}" for case, with_gelu in LOGITS_CASES])
def test_zoo_logits_close(zoo, case, with_gelu):
    """Exported: original and converted models give close logits and the same argmax in onnxruntime."""
    original = zoo.export(case.arch, case.exporter, case.dtype)
    converted, report = zoo.convert(case, with_gelu)
    expected = zoo.logits(case.arch, original)
    actual = zoo.logits(case.arch, converted)

    tolerance = logits_tolerance(report)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    assert np.abs(actual - expected).max() <= tolerance
    np.testing.assert_array_equal(actual.argmax(axis=-1), expected.argmax(axis=-1))


@pytest.mark.parametrize("case", ZOO_CASES, ids=ZOO_IDS)
def test_zoo_output_valid(zoo, case):
    """Exported: the converted model passes the full checker and strict shape inference, as
    its input does."""
    original = onnx.load(str(zoo.export(case.arch, case.exporter, case.dtype)))
    onnx.checker.check_model(original, full_check=True)
    onnx.shape_inference.infer_shapes(original, strict_mode=True)

    path, _ = zoo.convert(case, with_gelu=True)
    converted = onnx.load(str(path))
    onnx.checker.check_model(converted, full_check=True)
    onnx.shape_inference.infer_shapes(converted, strict_mode=True)


@pytest.mark.parametrize("case", ZOO_CASES, ids=ZOO_IDS)
def test_zoo_interface_kept(zoo, case):
    """Exported: inputs, outputs, metadata, IR version and opsets are kept; the project's
    domain is added once and each function appears once."""
    original = onnx.load(str(zoo.export(case.arch, case.exporter, case.dtype)), load_external_data=False)
    path, report = zoo.convert(case, with_gelu=True)
    converted = onnx.load(str(path), load_external_data=False)

    assert converted.graph.input == original.graph.input
    assert converted.graph.output == original.graph.output
    assert converted.ir_version == original.ir_version
    for attribute in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(converted, attribute) == getattr(original, attribute), attribute
    original_metadata = {p.key: p.value for p in original.metadata_props}
    converted_metadata = {p.key: p.value for p in converted.metadata_props}
    assert {k: v for k, v in converted_metadata.items() if k != METADATA_KEY} == original_metadata

    opsets = [(o.domain, o.version) for o in converted.opset_import]
    assert sorted(opsets) == sorted([(o.domain, o.version) for o in original.opset_import] + [(DOMAIN, 1)])

    identifiers = [(f.domain, f.name, f.overload) for f in converted.functions]
    assert len(identifiers) == len(set(identifiers))
    assert {f.domain for f in converted.functions} == {DOMAIN}
    called = {node.op_type for node in converted.graph.node if node.domain == DOMAIN}
    assert called <= {f.name for f in converted.functions}
    assert len(called) < len(report.sites)  # sites of one kind and size share one function


@pytest.mark.parametrize("case", ZOO_CASES[:1], ids=ZOO_IDS[:1])
def test_zoo_metadata_records_sites(zoo, case):
    """Exported: metadata key onnx_spike contains each replaced site with its choices."""
    path, report = zoo.convert(case)
    converted = onnx.load(str(path), load_external_data=False)
    metadata = json.loads({p.key: p.value for p in converted.metadata_props}[METADATA_KEY])

    assert metadata["ops"] == list(ConvertOptions().ops)
    assert metadata["precision"] == PRECISION.to_dict()
    assert [site["name"] for site in metadata["sites"]] == [site.name for site in report.sites]
    called = {node.name: node.op_type for node in converted.graph.node if node.domain == DOMAIN}
    for site in metadata["sites"]:
        assert called[site["name"]] == site["function"]
        expected_bits = getattr(PRECISION, "norm" if site["kind"] == "rmsnorm" else site["kind"]).input_frac_bits
        assert site["input_frac_bits"] == expected_bits
        assert site["input_range"] is None
        if site["kind"] == "rmsnorm":
            assert site["dim"] == 64
            assert site["epsilon"] == pytest.approx(1e-6)


def test_inline_option(zoo, tmp_path):
    """Exported (Llama, Optimum): inline=True writes a model without local functions that runs
    and gives the same logits as the model with functions."""
    case = ZOO_CASES[0]
    with_functions, _ = zoo.convert(case)
    inlined_path = tmp_path / "inlined.onnx"
    report = convert_file(zoo.export(case.arch), inlined_path, ConvertOptions(inline=True))
    inlined = onnx.load(str(inlined_path))

    assert report.replaced == sum(case.sites.values())
    assert len(inlined.functions) == 0
    assert spiking_calls(inlined) == 0
    onnx.checker.check_model(inlined, full_check=True)
    np.testing.assert_allclose(zoo.logits(case.arch, inlined_path), zoo.logits(case.arch, with_functions),
                               rtol=0, atol=1e-6)


def test_already_converted_rejected(zoo, tmp_path):
    """Exported (Llama, Optimum): converting a converted model raises AlreadyConvertedError,
    with functions or inlined."""
    converted, _ = zoo.convert(ZOO_CASES[0])
    with pytest.raises(AlreadyConvertedError, match="converted before"):
        convert_file(converted, tmp_path / "twice.onnx", ConvertOptions())
    assert not (tmp_path / "twice.onnx").exists()

    inlined = tmp_path / "inlined.onnx"
    convert_file(zoo.export("llama"), inlined, ConvertOptions(inline=True))
    with pytest.raises(AlreadyConvertedError):
        convert_file(inlined, tmp_path / "twice-inlined.onnx", ConvertOptions())


# ---------------------------------------------------------------------------------------------
# Selection and the match report


def test_ops_subset(llama, tmp_path):
    """Exported (Llama, Optimum): only the selected kinds are replaced; the others are skipped
    as not selected."""
    report = convert_file(llama, tmp_path / "silu.onnx", ConvertOptions(ops=("silu",)))
    assert replaced(report) == {"silu": 2}
    skipped = collections.Counter((skip.kind, skip.reason) for skip in report.skipped)
    assert skipped == {("softmax", "softmax not selected"): 2, ("rmsnorm", "rmsnorm not selected"): 5}
    counts = op_counts(onnx.load(str(tmp_path / "silu.onnx"), load_external_data=False))
    assert counts["Softmax"] == 2
    assert counts["Sigmoid"] == 0


def test_layers_restriction(llama, tmp_path):
    """Exported (Llama, Optimum): layers={1} replaces layer 1 sites only; the final norm has no
    layer and is skipped with that reason."""
    report = inspect_path(llama, ConvertOptions(layers={1}))
    assert replaced(report) == {"softmax": 1, "silu": 1, "rmsnorm": 2}
    assert all(site.layer == 1 and "/layers.1/" in site.name for site in report.sites)
    reasons = {skip.node: skip.reason for skip in report.skipped}
    assert reasons["/model/layers.0/self_attn/Softmax"] == "layer 0 not selected"
    assert reasons["/model/norm/ReduceMean"].startswith("layer index unknown")
    assert len(reasons) == 5


def test_layers_restriction_dynamo(zoo):
    """Exported (Llama, dynamo opset 18): layer numbers come from torch.onnx name scopes, since
    node names such as node_mean_2 carry none."""
    report = inspect_path(zoo.export("llama", "dynamo18"), ConvertOptions(layers={0}))
    assert replaced(report) == {"softmax": 1, "silu": 1, "rmsnorm": 2}
    assert {site.layer for site in report.sites} == {0}


def test_layers_final_norm_not_in_last_layer(zoo):
    """Exported (GPT-2, Optimum): ln_f reads the last layer's residual but belongs to no layer."""
    report = inspect_path(zoo.export("gpt2"), ConvertOptions(layers={1}))
    assert "/transformer/ln_f/LayerNormalization" not in [site.name for site in report.sites]
    assert replaced(report) == {"softmax": 1, "layernorm": 2}


def test_node_pattern(llama, tmp_path):
    """Exported (Llama, Optimum): node_pattern keeps the sites whose anchor name matches."""
    report = convert_file(llama, tmp_path / "attention.onnx", ConvertOptions(node_pattern=r"self_attn|layers\.0/mlp"))
    assert sorted(site.name for site in report.sites) == ["/model/layers.0/mlp/act_fn/Sigmoid",
                                                          "/model/layers.0/self_attn/Softmax",
                                                          "/model/layers.1/self_attn/Softmax"]
    reasons = {skip.reason for skip in report.skipped}
    assert reasons == {"node name does not match the pattern 'self_attn|layers\\\\.0/mlp'"}
    assert len(report.skipped) == 6


def test_report_json_and_table(llama):
    """Exported (Llama, Optimum): the JSON and table forms carry the counts and every skip."""
    report = inspect_path(llama, ConvertOptions(ops=("softmax", "rmsnorm"), layers={0}))
    data = json.loads(report.to_json())
    assert data["model"] == str(llama)
    assert data["counts"]["softmax"] == {"found": 2, "replaced": 1, "skipped": 1}
    assert data["counts"]["silu"] == {"found": 2, "replaced": 0, "skipped": 2}
    assert data["counts"]["rmsnorm"] == {"found": 5, "replaced": 2, "skipped": 3}
    assert len(data["sites"]) == 3
    assert {"name", "kind", "rule", "layer", "input_frac_bits", "function"} <= set(data["sites"][0])
    assert {(skip["kind"], skip["reason"]) for skip in data["skipped"]} == {
        ("softmax", "layer 1 not selected"), ("silu", "silu not selected"), ("rmsnorm", "layer 1 not selected"),
        ("rmsnorm", "layer index unknown (no layer number in the node or weight name)")}

    table = report.to_table().splitlines()
    assert table[0] == f"Match report for {llama}"
    assert table[2].split() == ["kind", "found", "replaced", "skipped"]
    assert table[3].split() == ["softmax", "2", "1", "1"]
    assert table[5].split() == ["rmsnorm", "5", "2", "3"]
    assert "Skipped:" in table
    assert "  [silu] /model/layers.1/mlp/act_fn/Sigmoid: silu not selected" in table


@pytest.mark.parametrize("ops, message", [((), "op selection is empty"), (("softmax", "relu"), "unknown op kind")])
def test_invalid_ops_rejected(ops, message, tmp_path):
    """Hand-built: an empty or unknown op selection fails before anything is read or written."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"])], [tensor_info("x")], [tensor_info("y")])
    onnx.save(model, tmp_path / "in.onnx")
    with pytest.raises(ConversionError, match=message):
        convert_file(tmp_path / "in.onnx", tmp_path / "out.onnx", ConvertOptions(ops=ops))
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------------------------------------
# Calibrated input ranges


def test_input_range_sets_site_scale(llama, zoo, tmp_path):
    """Exported (Llama, Optimum): a calibrated range changes that site's input_frac_bits to the
    largest f with 2 * range inside the current range, and the metadata records it."""
    softmax_site = "/model/layers.0/self_attn/Softmax"
    norm_site = "/model/layers.1/input_layernorm/ReduceMean"
    # Softmax currents reach 2^(31 - f) and norm currents 2^(40 - f); with a headroom of 2:
    # f = floor(31 - log2(2 * 1e5)) = 13 and f = floor(40 - log2(2 * 3000)) = 27.
    ranges = {softmax_site: 1e5, norm_site: 3000.0}
    target = tmp_path / "calibrated.onnx"
    report = convert_file(llama, target, ConvertOptions(input_ranges=ranges))

    bits = {site.name: site.input_frac_bits for site in report.sites}
    assert bits[softmax_site] == 13 == calibrated_frac_bits(PRECISION, "softmax", 1e5)
    assert bits[norm_site] == 27 == calibrated_frac_bits(PRECISION, "rmsnorm", 3000.0)
    others = {name: value for name, value in bits.items() if name not in ranges}
    assert set(others.values()) <= {PRECISION.softmax.input_frac_bits, PRECISION.silu.input_frac_bits,
                                     PRECISION.norm.input_frac_bits}

    model = onnx.load(str(target), load_external_data=False)
    sites = {site["name"]: site for site in json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])["sites"]}
    assert sites[softmax_site]["input_frac_bits"] == 13
    assert sites[softmax_site]["input_range"] == 1e5
    assert sites[norm_site]["input_range"] == 3000.0
    assert sites["/model/layers.1/self_attn/Softmax"]["input_range"] is None
    # A site with its own scale gets its own function; the other Softmax keeps the shared one.
    assert sites[softmax_site]["function"] != sites["/model/layers.1/self_attn/Softmax"]["function"]

    expected = zoo.logits("llama", llama)
    actual = zoo.logits("llama", target)
    assert np.abs(actual - expected).max() <= logits_tolerance(report)


def test_input_range_clamped():
    """A tiny range is clamped to preset + 4 fractional bits, a huge one to the smallest f that
    the exponential table allows."""
    assert calibrated_frac_bits(PRECISION, "softmax", 1e-3) == PRECISION.softmax.input_frac_bits + 4
    assert calibrated_frac_bits(PRECISION, "softmax", 1e12) == 6  # 2H/K = 2^-6 must be on the 2^-f grid
    assert calibrated_frac_bits(PRECISION, "silu", 0.0) == PRECISION.silu.input_frac_bits


# ---------------------------------------------------------------------------------------------
# Hand-built variants


def test_softmax_inside_casts(tmp_path):
    """Hand-built (Optimum fp16 exports cast before the mask Add, but never cast back): fp16 ->
    Cast(float) -> Softmax -> Cast(fp16); the Softmax is replaced and the Casts stay."""
    nodes = [helper.make_node("Cast", ["x"], ["x32"], name="cast_in", to=FLOAT),
             helper.make_node("Softmax", ["x32"], ["p32"], name="softmax", axis=-1),
             helper.make_node("Cast", ["p32"], ["y"], name="cast_out", to=FLOAT16)]
    model = make_model(nodes, [tensor_info("x", dtype=FLOAT16)], [tensor_info("y", dtype=FLOAT16)])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"softmax": 1}
    assert op_counts(converted) == {"Cast": 2, report.sites[0].function: 1}
    x = sample().astype(np.float16)
    (y,) = run_model(path, {"x": x})
    assert y.dtype == np.float16
    x32 = x.astype(np.float32)
    expected = softmax_reference(x32)
    # fp16 output rounding: half a unit in the last place, 2^-11 relative.
    bound = error_bound("softmax", x32, PRECISION) + expected * 2.0**-11
    assert_within_bound(y.astype(np.float32), expected, bound)


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_softmax_other_axis(tmp_path, axis):
    """Hand-built (no exporter in the zoo writes it): Softmax over a non-last axis is replaced
    between two Transposes and matches the float op."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=axis)],
                       [tensor_info("x")], [tensor_info("y")])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"softmax": 1}
    assert op_counts(converted)["Transpose"] == 2
    x = sample()
    (y,) = run_model(path, {"x": x})
    (float_y,) = run_model(model, {"x": x})
    moved = np.moveaxis(x, axis, -1)
    bound = np.moveaxis(error_bound("softmax", moved, PRECISION), -1, axis)
    assert_within_bound(y, softmax_reference(x, axis), bound)
    assert_within_bound(y, float_y.astype(np.float64), bound)


@pytest.mark.parametrize("sigmoid_first", [False, True], ids=["mul-x-sigmoid", "mul-sigmoid-x"])
def test_silu_operand_orders(tmp_path, sigmoid_first):
    """Hand-built: Mul(x, Sigmoid(x)) as every exporter writes it, and Mul(Sigmoid(x), x)."""
    operands = ["s", "x"] if sigmoid_first else ["x", "s"]
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
             helper.make_node("Mul", operands, ["y"], name="mul")]
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"silu": 1}
    assert set(op_counts(converted)) == {report.sites[0].function}
    x = sample()
    (y,) = run_model(path, {"x": x})
    assert_within_bound(y, silu_reference(x), error_bound("silu", x, PRECISION))


def test_silu_not_matched_on_other_input(tmp_path):
    """Hand-built: x * Sigmoid(z) with z != x is a gate, not SiLU, and stays."""
    nodes = [helper.make_node("Sigmoid", ["z"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["x", "s"], ["y"], name="mul")]
    model = make_model(nodes, [tensor_info("x"), tensor_info("z")], [tensor_info("y")])
    onnx.save(model, tmp_path / "gate.onnx")
    report = inspect_path(tmp_path / "gate.onnx", ConvertOptions())
    assert report.replaced == 0
    assert [(skip.kind, skip.reason) for skip in report.skipped] == [("silu", "not part of a supported silu pattern")]


def test_swish_opset24(tmp_path):
    """Hand-built (ONNX Swish, new in opset 24; onnx 1.23 and onnxruntime 1.32 both run it):
    alpha = 1, given or defaulted, is replaced; alpha = 2 is skipped with its reason."""
    nodes = [helper.make_node("Swish", ["x"], ["a"], name="swish_one", alpha=1.0),
             helper.make_node("Swish", ["a"], ["b"], name="swish_default"),
             helper.make_node("Swish", ["b"], ["y"], name="swish_two", alpha=2.0)]
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")], opset=24)
    converted, report, path = convert_model(model, tmp_path)

    assert [site.name for site in report.sites] == ["swish_one", "swish_default"]
    assert [(skip.node, skip.reason) for skip in report.skipped] == [
        ("swish_two", "Swish with alpha 2 is not SiLU (only alpha = 1 is)")]
    assert op_counts(converted)["Swish"] == 1
    assert [o.version for o in converted.opset_import if o.domain == ""] == [24]
    x = sample()
    (y,) = run_model(path, {"x": x})
    a = silu_reference(x)
    b = silu_reference(a)
    expected = b / (1.0 + np.exp(-2.0 * b))
    # Two SiLU sites in a chain: the first error passes through SiLU (slope below 1.1) twice.
    bound = 1.1**2 * error_bound("silu", x, PRECISION) + 1.1 * error_bound("silu", a, PRECISION)
    assert_within_bound(y, expected, bound)


def test_quickgelu(tmp_path):
    """Hand-built (com.microsoft QuickGelu, x * sigmoid(alpha x)): alpha = 1 is SiLU and is
    replaced; alpha = 1.702, also the default, is skipped with its reason."""
    nodes = [helper.make_node("QuickGelu", ["x"], ["y"], name="quick_one", domain="com.microsoft", alpha=1.0),
             helper.make_node("QuickGelu", ["x"], ["z"], name="quick_1702", domain="com.microsoft", alpha=1.702),
             helper.make_node("QuickGelu", ["x"], ["w"], name="quick_default", domain="com.microsoft")]
    model = make_model(nodes, [tensor_info("x")], [tensor_info(name) for name in "yzw"],
                       extra_opsets=["com.microsoft"])
    converted, report, path = convert_model(model, tmp_path)

    assert [site.name for site in report.sites] == ["quick_one"]
    assert {skip.node: skip.reason for skip in report.skipped} == {
        "quick_1702": "QuickGelu with alpha 1.702 is not SiLU (only alpha = 1 is)",
        "quick_default": "QuickGelu with alpha 1.702 is not SiLU (only alpha = 1 is)"}
    assert op_counts(converted)["QuickGelu"] == 2
    x = sample()
    y, z, _ = run_model(path, {"x": x})
    _, float_z, _ = run_model(model, {"x": x})
    assert_within_bound(y, silu_reference(x), error_bound("silu", x, PRECISION))
    np.testing.assert_array_equal(z, float_z)


RMS_WEIGHT_FORMS = {
    # name: (nodes after the normalized value "n", description)
    "weight-right": [helper.make_node("Mul", ["n", "norm.weight"], ["y"], name="weight_mul")],
    "weight-left": [helper.make_node("Mul", ["norm.weight", "n"], ["y"], name="weight_mul")],
    "weight-identity": [helper.make_node("Identity", ["norm.weight"], ["shared_weight"], name="identity"),
                        helper.make_node("Mul", ["shared_weight", "n"], ["y"], name="weight_mul")],
    "one-plus-weight": [constant("one_w", 1.0),
                        helper.make_node("Add", ["one_w", "norm.weight"], ["scale"], name="one_plus"),
                        helper.make_node("Mul", ["n", "scale"], ["y"], name="weight_mul")],
}


@pytest.mark.parametrize("inverse", ["div", "reciprocal", "direct"])
@pytest.mark.parametrize("weight_form", list(RMS_WEIGHT_FORMS))
def test_rmsnorm_decomposed(tmp_path, weight_form, inverse):
    """Hand-built: decomposed RMSNorm with 1/rms as Div(1, .) (Optimum), Reciprocal (dynamo)
    or x / rms, and the weight on either side, through Identity (Optimum with shared weights)
    or as 1 + weight (Gemma before constant folding)."""
    nodes = rmsnorm_nodes("x", "n", inverse) + RMS_WEIGHT_FORMS[weight_form]
    weight = norm_weight()
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")], [weight])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"rmsnorm": 1}
    site = report.sites[0]
    assert (site.dim, site.epsilon, site.name) == (16, pytest.approx(1e-6), "norm/ReduceMean")
    counts = op_counts(converted)
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"} & set(counts)
    assert counts["Mul"] == 1
    onnx.checker.check_model(converted, full_check=True)

    x = sample()
    (y,) = run_model(path, {"x": x})
    w = numpy_helper.to_array(weight).astype(np.float64)
    scale = 1.0 + w if weight_form == "one-plus-weight" else w
    bound = error_bound("rmsnorm", x, PRECISION, epsilon=1e-6) * np.abs(scale)
    assert_within_bound(y, rms_reference(x) * scale, bound)


@pytest.mark.parametrize("domain", ["", "com.microsoft"], ids=["default-domain", "com.microsoft"])
def test_simplified_layernorm(tmp_path, domain):
    """Hand-built (onnxruntime's fused RMSNorm): SimplifiedLayerNormalization in the default
    and com.microsoft domains becomes the site and a Mul by the scale. onnx's checker does not
    know the op, so only the output is checked."""
    weight = norm_weight()
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "norm.weight"], ["y"], name="sln",
                            domain=domain, axis=-1, epsilon=1e-6)
    model = make_model([node], [tensor_info("x")], [tensor_info("y")], [weight],
                       extra_opsets=[domain] if domain else [])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"rmsnorm": 1}
    assert op_counts(converted) == {report.sites[0].function: 1, "Mul": 1}
    onnx.checker.check_model(converted, full_check=True)
    x = sample()
    (y,) = run_model(path, {"x": x})
    w = numpy_helper.to_array(weight).astype(np.float64)
    assert_within_bound(y, rms_reference(x) * w, error_bound("rmsnorm", x, PRECISION, epsilon=1e-6) * np.abs(w))


def test_rmsnormalization_opset23(tmp_path):
    """Hand-built (the op that dynamo writes at opset 23): RMSNormalization with a scale."""
    weight = norm_weight()
    node = helper.make_node("RMSNormalization", ["x", "norm.weight"], ["y"], name="rms", axis=-1, epsilon=1e-6)
    model = make_model([node], [tensor_info("x")], [tensor_info("y")], [weight], opset=23)
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"rmsnorm": 1}
    x = sample()
    (y,) = run_model(path, {"x": x})
    (float_y,) = run_model(model, {"x": x})
    w = numpy_helper.to_array(weight).astype(np.float64)
    assert_within_bound(y, float_y.astype(np.float64), error_bound("rmsnorm", x, PRECISION, epsilon=1e-6) * np.abs(w),
                        slack=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_layernormalization(tmp_path, with_bias):
    """Hand-built: LayerNormalization with and without bias (exports in the zoo always have one)."""
    weight = norm_weight()
    bias = numpy_helper.from_array((0.1 * np.arange(16) - 0.5).astype(np.float32), "norm.bias")
    inputs = ["x", "norm.weight", "norm.bias"] if with_bias else ["x", "norm.weight"]
    node = helper.make_node("LayerNormalization", inputs, ["y"], name="ln", axis=-1, epsilon=1e-5)
    model = make_model([node], [tensor_info("x")], [tensor_info("y")], [weight, bias] if with_bias else [weight])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"layernorm": 1}
    assert op_counts(converted) == {report.sites[0].function: 1, "Mul": 1, **({"Add": 1} if with_bias else {})}
    x = sample()
    (y,) = run_model(path, {"x": x})
    w = numpy_helper.to_array(weight).astype(np.float64)
    b = numpy_helper.to_array(bias).astype(np.float64) if with_bias else 0.0
    assert_within_bound(y, layernorm_reference(x) * w + b, error_bound("layernorm", x, PRECISION) * np.abs(w))


def test_layernormalization_other_axis_skipped(tmp_path):
    """Hand-built: LayerNormalization over the last two axes is skipped with the reason."""
    weight = numpy_helper.from_array(np.ones((3, 16), np.float32), "norm.weight")
    node = helper.make_node("LayerNormalization", ["x", "norm.weight"], ["y"], name="ln", axis=1)
    model = make_model([node], [tensor_info("x")], [tensor_info("y")], [weight])
    onnx.save(model, tmp_path / "ln.onnx")
    report = inspect_path(tmp_path / "ln.onnx", ConvertOptions())
    assert report.replaced == 0
    assert [(skip.node, skip.reason) for skip in report.skipped] == [
        ("ln", "LayerNormalization over axis 1, not the last axis alone")]


def test_layernorm_decomposed(tmp_path):
    """Hand-built (no exporter in the zoo writes it): (x - mean) / sqrt(var + eps), then weight
    and bias, is one LayerNorm site; the centering is part of the site, not left behind."""
    weight = norm_weight()
    bias = numpy_helper.from_array(np.full(16, 0.25, np.float32), "norm.bias")
    nodes = [constant("axes", [-1], np.int64), constant("two", 2.0), constant("eps", 1e-5),
             helper.make_node("ReduceMean", ["x", "axes"], ["mean"], name="ln/mean", keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["centered"], name="ln/Sub"),
             helper.make_node("Pow", ["centered", "two"], ["square"], name="ln/Pow"),
             helper.make_node("ReduceMean", ["square", "axes"], ["variance"], name="ln/variance", keepdims=1),
             helper.make_node("Add", ["variance", "eps"], ["shifted"], name="ln/Add"),
             helper.make_node("Sqrt", ["shifted"], ["std"], name="ln/Sqrt"),
             helper.make_node("Div", ["centered", "std"], ["n"], name="ln/Div"),
             helper.make_node("Mul", ["n", "norm.weight"], ["scaled"], name="ln/weight"),
             helper.make_node("Add", ["scaled", "norm.bias"], ["y"], name="ln/bias")]
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")], [weight, bias])
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"layernorm": 1}
    assert report.sites[0].name == "ln/variance"
    assert report.counts()["rmsnorm"]["replaced"] == 0
    assert op_counts(converted) == {report.sites[0].function: 1, "Mul": 1, "Add": 1}
    x = sample()
    (y,) = run_model(path, {"x": x})
    w = numpy_helper.to_array(weight).astype(np.float64)
    assert_within_bound(y, layernorm_reference(x) * w + 0.25, error_bound("layernorm", x, PRECISION) * np.abs(w))


def gelu_erf_nodes(half_first: bool) -> list:
    """0.5 x (1 + erf(x / sqrt 2)): Optimum multiplies by 0.5 last, dynamo before the x."""
    nodes = [constant("sqrt2", math.sqrt(2.0)), constant("one", 1.0), constant("half", 0.5),
             helper.make_node("Div", ["x", "sqrt2"], ["scaled"], name="gelu/Div"),
             helper.make_node("Erf", ["scaled"], ["erf"], name="gelu/Erf"),
             helper.make_node("Add", ["erf", "one"], ["erf1"], name="gelu/Add")]
    if half_first:
        return nodes + [helper.make_node("Mul", ["half", "erf1"], ["h"], name="gelu/Mul_half"),
                        helper.make_node("Mul", ["x", "h"], ["y"], name="gelu/Mul")]
    return nodes + [helper.make_node("Mul", ["x", "erf1"], ["xe"], name="gelu/Mul"),
                    helper.make_node("Mul", ["xe", "half"], ["y"], name="gelu/Mul_half")]


def gelu_tanh_nodes(cube: str) -> list:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(0.79788 (x + 0.044715 x^3))), cube as Pow or x*x*x."""
    nodes = [constant("half", 0.5), constant("three", 3.0), constant("cubic", 0.044715),
             constant("slope", math.sqrt(2.0 / math.pi)), constant("one", 1.0),
             helper.make_node("Mul", ["x", "half"], ["hx"], name="gelu/Mul_half")]
    if cube == "pow":
        nodes.append(helper.make_node("Pow", ["x", "three"], ["x3"], name="gelu/Pow"))
    else:
        nodes += [helper.make_node("Mul", ["x", "x"], ["x2"], name="gelu/Mul_square"),
                  helper.make_node("Mul", ["x", "x2"], ["x3"], name="gelu/Mul_cube")]
    return nodes + [helper.make_node("Mul", ["x3", "cubic"], ["cx3"], name="gelu/Mul_cubic"),
                    helper.make_node("Add", ["x", "cx3"], ["inner"], name="gelu/Add_inner"),
                    helper.make_node("Mul", ["inner", "slope"], ["argument"], name="gelu/Mul_slope"),
                    helper.make_node("Tanh", ["argument"], ["t"], name="gelu/Tanh"),
                    helper.make_node("Add", ["t", "one"], ["t1"], name="gelu/Add_one"),
                    helper.make_node("Mul", ["hx", "t1"], ["y"], name="gelu/Mul")]


GELU_FORMS = {"erf-half-last": gelu_erf_nodes(False), "erf-half-first": gelu_erf_nodes(True),
              "tanh-pow": gelu_tanh_nodes("pow"), "tanh-mul": gelu_tanh_nodes("mul")}


@pytest.mark.parametrize("form", list(GELU_FORMS))
def test_gelu_decomposed(tmp_path, form):
    """Hand-built: the erf GELU (BERT) and the tanh GELU (GPT-2, Gemma), replaced only when
    GELU is selected."""
    model = make_model(GELU_FORMS[form], [tensor_info("x")], [tensor_info("y")])
    onnx.save(model, tmp_path / "gelu.onnx")
    default = inspect_path(tmp_path / "gelu.onnx", ConvertOptions())
    assert default.replaced == 0
    assert [skip.reason for skip in default.skipped] == ["gelu not selected"]

    converted, report, path = convert_model(model, tmp_path, ops=KINDS)
    assert replaced(report) == {"gelu": 1}
    assert set(op_counts(converted)) == {report.sites[0].function}
    x = sample()
    (y,) = run_model(path, {"x": x})
    (float_y,) = run_model(model, {"x": x})
    bound = error_bound("gelu", x, PRECISION)
    assert_within_bound(y, gelu_tanh_reference(x), bound)
    assert_within_bound(y, float_y.astype(np.float64), bound + GELU_FORM_GAP)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_fused_opset20(tmp_path, approximate):
    """Hand-built (the op dynamo writes at opset 23, defined since opset 20): Gelu in both forms."""
    node = helper.make_node("Gelu", ["x"], ["y"], name="gelu", approximate=approximate)
    model = make_model([node], [tensor_info("x")], [tensor_info("y")], opset=20)
    converted, report, path = convert_model(model, tmp_path, ops=("gelu",))
    assert replaced(report) == {"gelu": 1}
    x = sample()
    (y,) = run_model(path, {"x": x})
    (float_y,) = run_model(model, {"x": x})
    assert_within_bound(y, float_y.astype(np.float64), error_bound("gelu", x, PRECISION) + GELU_FORM_GAP)


def if_model() -> onnx.ModelProto:
    """If(cond): the then-branch applies RMSNorm * weight, then SiLU; the else-branch applies
    Softmax. Both read x and the weight from the outer graph."""
    then_nodes = rmsnorm_nodes("x", "then_n", prefix="then_norm") + [
        helper.make_node("Mul", ["then_n", "norm.weight"], ["then_scaled"], name="then_norm/weight"),
        helper.make_node("Sigmoid", ["then_scaled"], ["then_gate"], name="then_silu/Sigmoid"),
        helper.make_node("Mul", ["then_scaled", "then_gate"], ["then_y"], name="then_silu/Mul")]
    else_nodes = [helper.make_node("Softmax", ["x"], ["else_y"], name="else_softmax", axis=-1)]
    then_branch = helper.make_graph(then_nodes, "then", [], [tensor_info("then_y")])
    else_branch = helper.make_graph(else_nodes, "else", [], [tensor_info("else_y")])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)
    return make_model([node], [tensor_info("x"), tensor_info("cond", shape=[], dtype=TensorProto.BOOL)],
                      [tensor_info("y")], [norm_weight()])


def test_if_branches(tmp_path):
    """Hand-built (no export in the zoo has If): sites in both branches of an If are replaced,
    and each branch still computes its function."""
    model = if_model()
    onnx.checker.check_model(model, full_check=True)
    converted, report, path = convert_model(model, tmp_path)

    assert replaced(report) == {"softmax": 1, "silu": 1, "rmsnorm": 1}
    counts = op_counts(converted)
    assert not (ANCHOR_OPS & set(counts))
    branches = {attribute.name: attribute.g for attribute in converted.graph.node[0].attribute}
    assert sum(node.domain == DOMAIN for node in branches["then_branch"].node) == 2
    assert sum(node.domain == DOMAIN for node in branches["else_branch"].node) == 1
    onnx.checker.check_model(converted, full_check=True)
    onnx.shape_inference.infer_shapes(converted, strict_mode=True)

    x = sample()
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    (then_y,) = run_model(path, {"x": x, "cond": np.array(True)})
    (else_y,) = run_model(path, {"x": x, "cond": np.array(False)})
    (float_then,) = run_model(model, {"x": x, "cond": np.array(True)})
    scaled = rms_reference(x) * w
    # The norm error passes through SiLU, whose slope stays below 1.1.
    then_bound = (1.1 * error_bound("rmsnorm", x, PRECISION, epsilon=1e-6) * np.abs(w)
                  + error_bound("silu", scaled, PRECISION))
    assert_within_bound(then_y, silu_reference(scaled), then_bound)
    assert_within_bound(then_y, float_then.astype(np.float64), then_bound, slack=1e-5)
    assert_within_bound(else_y, softmax_reference(x), error_bound("softmax", x, PRECISION))


# ---------------------------------------------------------------------------------------------
# Output validity on hand-built models


def metadata_model(opset: int = 18, ir_version: int = 10) -> onnx.ModelProto:
    """RMSNorm * weight, then Softmax, with model metadata set; ReduceMean takes its axes as an
    attribute below opset 18 and as an input from opset 18."""
    if opset >= 18:
        norm = rmsnorm_nodes("x", "n")
    else:
        norm = [node for node in rmsnorm_nodes("x", "n") if node.output[0] != "norm_axes"]
        reduce = next(node for node in norm if node.op_type == "ReduceMean")
        norm[norm.index(reduce)] = helper.make_node("ReduceMean", ["norm_square"], ["norm_mean"],
                                                    name="norm/ReduceMean", axes=[-1], keepdims=1)
    nodes = norm + [helper.make_node("Mul", ["n", "norm.weight"], ["scaled"], name="norm/weight"),
                    helper.make_node("Softmax", ["scaled"], ["y"], name="softmax", axis=-1)]
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")], [norm_weight()], opset=opset,
                       ir_version=ir_version)
    model.producer_name = "handbuilt"
    model.producer_version = "1.0"
    model.domain = "test.onnx_spike"
    model.model_version = 7
    model.doc_string = "RMSNorm and Softmax"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    return model


def test_handbuilt_interface_kept(tmp_path):
    """Hand-built: names, types and shapes of inputs and outputs, model metadata, IR version
    and opset imports are kept; only the domain and the metadata key are added."""
    model = metadata_model()
    onnx.checker.check_model(model, full_check=True)
    converted, report, _ = convert_model(model, tmp_path)

    assert report.replaced == 2
    assert report.notes == []
    assert converted.graph.input == model.graph.input
    assert converted.graph.output == model.graph.output
    assert (converted.ir_version, converted.producer_name, converted.producer_version) == (10, "handbuilt", "1.0")
    assert (converted.domain, converted.model_version, converted.doc_string) == (
        "test.onnx_spike", 7, "RMSNorm and Softmax")
    metadata = {p.key: p.value for p in converted.metadata_props}
    assert set(metadata) == {"author", "license", METADATA_KEY}
    assert (metadata["author"], metadata["license"]) == ("tests", "MIT")
    assert [(o.domain, o.version) for o in converted.opset_import] == [("", 18), (DOMAIN, 1)]
    onnx.checker.check_model(converted, full_check=True)
    onnx.shape_inference.infer_shapes(converted, strict_mode=True)


def test_functions_shared_between_sites(tmp_path):
    """Hand-built: eight Softmax sites call one function, which the model holds once, with its
    callees each once."""
    nodes = [helper.make_node("Softmax", [f"x{i}" if i else "x"], [f"x{i + 1}" if i < 7 else "y"], name=f"softmax{i}")
             for i in range(8)]
    model = make_model(nodes, [tensor_info("x")], [tensor_info("y")])
    converted, report, _ = convert_model(model, tmp_path)

    assert report.replaced == 8
    assert {node.op_type for node in converted.graph.node} == {report.sites[0].function}
    names = [function.name for function in converted.functions]
    assert len(names) == len(set(names))
    assert report.sites[0].function in names
    assert [o.domain for o in converted.opset_import].count(DOMAIN) == 1


@pytest.mark.parametrize("opset", [13, 14])
def test_old_opset_upgraded(tmp_path, opset):
    """Hand-built (opset 13/14, ReduceMean axes as an attribute, IR version 7): the model is
    upgraded to opset 18 and IR version 8 with notes in the report, then converted."""
    model = metadata_model(opset=opset, ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    converted, report, path = convert_model(model, tmp_path)

    assert report.replaced == 2
    assert report.notes == [f"upgraded the default-domain opset from {opset} to 18 with onnx.version_converter",
                            "raised the IR version from 7 to 8, the first that allows model-local functions"]
    assert [(o.domain, o.version) for o in converted.opset_import] == [("", 18), (DOMAIN, 1)]
    assert converted.ir_version == 8
    onnx.checker.check_model(converted, full_check=True)
    x = sample()
    (y,) = run_model(path, {"x": x})
    (float_y,) = run_model(model, {"x": x})
    assert np.abs(y - float_y).max() <= site_bound("rmsnorm") + site_bound("softmax")


def test_opset_too_new_rejected(tmp_path):
    """Hand-built: a default-domain opset newer than the functions were checked against fails
    with the supported range."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"])], [tensor_info("x")], [tensor_info("y")], opset=25)
    onnx.save(model, tmp_path / "new.onnx")
    with pytest.raises(ConversionError, match="newer than the newest supported"):
        convert_file(tmp_path / "new.onnx", tmp_path / "out.onnx", ConvertOptions())
