"""The convert driver: run the selected rules over a model and return a valid converted model.

Steps: check the opset (upgrade models older than the functions support, with onnx's version
converter), infer shapes so the norms know their size, count the candidate sites, apply the
rules with onnxscript's rewriter (subgraphs of If and Loop included), add each spiking
function once with the project's domain, and record the per-site choices in the model's
metadata under `onnx_spike`, so that a conversion is reproducible and inspectable.

Everything works on the graph: weights stored as external data are never read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

import onnx_spike
from onnx_spike.graph import DOMAIN, DOMAIN_VERSION, execution_form
from onnx_spike.library import MAX_OPSET, MIN_OPSET, function_protos
from onnx_spike.passes import gelu, norm, silu, softmax
from onnx_spike.passes.sites import ANCHORS, DEFAULT_KINDS, KINDS, MatchReport, SiteRecorder, Skip, node_name
from onnx_spike.precision import Precision, preset

log = logging.getLogger(__name__)

METADATA_KEY = "onnx_spike"
# Model-local functions (FunctionProto in ModelProto.functions) came with IR version 8.
MIN_FUNCTION_IR_VERSION = 8
RULE_MODULES = {"softmax": [softmax], "silu": [silu], "rmsnorm": [norm], "layernorm": [norm], "gelu": [gelu]}


# Attention ops that compute their Softmax internally (ONNX opset 23 and onnxruntime contrib
# ops). No rule can reach that Softmax, so each such node is reported as a skipped softmax site.
FUSED_ATTENTION = {("", "Attention"), ("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                   ("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "PackedAttention"),
                   ("com.microsoft", "PackedMultiHeadAttention")}
FUSED_ATTENTION_REASON = ("the Softmax is fused inside this attention op and is not replaced; export without "
                          "fused attention (for example torch.onnx at opset 18) to replace it")


class ConversionError(ValueError):
    """The model cannot be converted as requested; the message gives the reason and what to do."""


class AlreadyConvertedError(ConversionError):
    """The model already contains spiking functions of this project."""


@dataclass
class ConvertOptions:
    ops: tuple[str, ...] = DEFAULT_KINDS
    precision: Precision = field(default_factory=lambda: preset("default"))
    layers: set[int] | None = None
    node_pattern: str | None = None
    input_ranges: dict[str, float] | None = None  # site name -> calibrated max |x|
    inline: bool = False
    form: str = "loop"  # "loop": neuron dynamics in Loops (the reference); "fast": closed form

    def validate(self) -> "ConvertOptions":
        if not self.ops:
            raise ConversionError("the op selection is empty; choose at least one of " + ", ".join(KINDS))
        if self.form not in ("loop", "fast"):
            raise ConversionError(f"unknown execution form {self.form!r}; choose loop or fast")
        unknown = [kind for kind in self.ops if kind not in KINDS]
        if unknown:
            raise ConversionError(f"unknown op kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
        self.precision.validate()
        return self


def _rules(recorder: SiteRecorder, kinds) -> list:
    modules = []
    for kind in kinds:
        for module in RULE_MODULES[kind]:
            if module not in modules:
                modules.append(module)
    # Norm rules come before Softmax/SiLU rules only by module order; their anchors never overlap.
    built = []
    for module in modules:
        if module is norm:
            built += norm.rules(recorder, [kind for kind in kinds if kind in ("rmsnorm", "layernorm")])
        else:
            built += module.rules(recorder)
    return built


def _iter_nodes(graph: ir.Graph):
    for node in graph:
        yield node
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                yield from _iter_nodes(attribute.value)
            elif attribute.type == ir.AttributeType.GRAPHS:
                for subgraph in attribute.value:
                    yield from _iter_nodes(subgraph)


def _candidate_kind(node: ir.Node) -> str | None:
    """The kind a node is a candidate anchor of, or None."""
    key = (node.domain or "", node.op_type)
    if key == ("", "ReduceMean"):
        square = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if square is None or square.op_type != "Pow":
            return None
        base = square.inputs[0].producer() if square.inputs[0] is not None else None
        if base is not None and base.op_type == "Sub":
            mean = base.inputs[1].producer() if len(base.inputs) > 1 and base.inputs[1] is not None else None
            if mean is not None and mean.op_type == "ReduceMean":
                return "layernorm"
        return "rmsnorm"
    if key == ("", "Tanh"):
        return "gelu" if _feeds_gelu_tail(node) else None
    if key in FUSED_ATTENTION:
        return "softmax"
    for kind, anchors in ANCHORS.items():
        if key in anchors and key != ("", "ReduceMean"):
            return kind
    return None


def _feeds_gelu_tail(node: ir.Node) -> bool:
    """A Tanh whose output is increased by a constant and multiplied: likely a GELU."""
    for use in node.outputs[0].uses():
        if use.node.op_type == "Add":
            return True
    return False


def upgrade_opset(proto: onnx.ModelProto, report: MatchReport) -> onnx.ModelProto:
    """Upgrade a model below MIN_OPSET with the onnx version converter; reject unknown newer ones."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ConversionError("the model imports no default-domain (ai.onnx) opset, so it has no standard op to "
                              "replace; if it was exported with standard ops, the file is truncated or corrupt")
    if opset > MAX_OPSET:
        raise ConversionError(f"default-domain opset {opset} is newer than the newest supported ({MAX_OPSET}); "
                              f"export at opset {MIN_OPSET} to {MAX_OPSET}")
    if opset >= MIN_OPSET:
        return proto
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as error:  # the converter raises several unrelated types
        raise ConversionError(f"opset {opset} is older than {MIN_OPSET} and the onnx version converter could not "
                              f"upgrade it: {error}; export at opset {MIN_OPSET} or newer") from error
    report.notes.append(f"upgraded the default-domain opset from {opset} to {MIN_OPSET} with onnx.version_converter")
    return upgraded


def prepare(proto: onnx.ModelProto, report: MatchReport) -> ir.Model:
    """Opset check, shape inference, IR conversion. `proto` must not hold weights it does not need."""
    if any(o.domain == DOMAIN for o in proto.opset_import) or any(f.domain == DOMAIN for f in proto.functions):
        raise AlreadyConvertedError("the model already contains onnx_spike functions (it was converted before); "
                                    "convert the original model instead")
    if proto.ir_version > onnx.IR_VERSION:
        raise ConversionError(f"IR version {proto.ir_version} is newer than the newest that onnx {onnx.__version__} "
                              f"supports ({onnx.IR_VERSION}); upgrade onnx or export with an older exporter")
    proto = upgrade_opset(proto, report)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as error:  # shape inference is best effort here
        report.notes.append(f"shape inference failed ({error}); sites with unknown sizes are skipped")
    return ir.serde.deserialize_model(proto)


def convert_ir(model: ir.Model, options: ConvertOptions, report: MatchReport | None = None) -> MatchReport:
    """Rewrite `model` in place and return the match report."""
    options.validate()
    report = report or MatchReport()
    opset = model.opset_imports.get("", None) or model.opset_imports.get("ai.onnx")

    candidates = {}
    for node in _iter_nodes(model.graph):
        kind = _candidate_kind(node)
        if kind is not None:
            candidates[id(node)] = (node, kind)
    for _, kind in candidates.values():
        report.found[kind] = report.found.get(kind, 0) + 1

    recorder = SiteRecorder(options.precision, options.ops, options.layers, options.node_pattern,
                            options.input_ranges)
    used_before = {name for name, value in model.graph.initializers.items() if value.uses()}
    # A kind without candidate anchors cannot match, so its rules (800+ for GELU) are not tried.
    rules = _rules(recorder, [kind for kind in options.ops if report.found.get(kind)])
    if rules:
        with execution_form(options.form):
            pattern.RewriteRuleSet(rules).apply_to_model(model)
    _remove_dead_constants(model.graph, used_before)

    for node, kind in candidates.values():
        if id(node) in recorder.replaced_anchors:
            continue
        reason = recorder.failures.get(id(node))
        if reason is None and (node.domain or "", node.op_type) in FUSED_ATTENTION and kind in options.ops:
            reason = FUSED_ATTENTION_REASON
        if reason is None:
            reason = (f"{kind} not selected" if kind not in options.ops
                      else f"not part of a supported {kind} pattern")
        report.skipped.append(Skip(node=node_name(node), kind=kind, reason=reason))
    report.sites.extend(recorder.sites)

    if recorder.sites:
        for proto in function_protos(recorder.functions.values(), opset):
            function = ir.serde.deserialize_function(proto)
            model.functions[function.identifier()] = function
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        if model.ir_version < MIN_FUNCTION_IR_VERSION:
            report.notes.append(f"raised the IR version from {model.ir_version} to {MIN_FUNCTION_IR_VERSION}, "
                                "the first that allows model-local functions")
            model.ir_version = MIN_FUNCTION_IR_VERSION
        model.metadata_props[METADATA_KEY] = json.dumps({
            "version": onnx_spike.__version__,
            "precision": options.precision.to_dict(),
            "ops": list(options.ops),
            "form": options.form,
            "sites": [vars(site) for site in recorder.sites],
        })
    return report


def _remove_dead_constants(graph: ir.Graph, used_before: set[str]) -> None:
    """Drop the Constant nodes and initializers that only the replaced subgraphs used."""
    for node in list(_iter_nodes(graph)):
        if node.op_type == "Constant" and not node.domain and not any(out.uses() for out in node.outputs):
            if not any(out.is_graph_output() for out in node.outputs):
                node.graph.remove(node, safe=True)
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if name in used_before and not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            del graph.initializers[name]


def collect_sites(proto: onnx.ModelProto, options: ConvertOptions) -> dict[str, str]:
    """Site name -> name of its input value, without changing anything (for calibration)."""
    report = MatchReport()
    model = prepare(proto, report)
    recorder = SiteRecorder(options.precision, options.ops, options.layers, options.node_pattern)
    recorder.collect_only = True
    pattern.RewriteRuleSet(_rules(recorder, options.ops)).apply_to_model(model)
    return recorder.collected
