"""Bookkeeping shared by the rewrite rules: which sites were found, replaced or skipped, and why.

A *site* is one target subgraph (a Softmax, a SiLU, a norm) identified by its anchor node: the
node that every variant of the target contains (Softmax, Sigmoid, the ReduceMean of the
square, LayerNormalization, Erf or Tanh). The rules record their decisions here, and
`MatchReport` renders them as a Python object, JSON and a table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from onnx_spike.graph import FunctionSpec
from onnx_spike.operators import build_site_function
from onnx_spike.precision import Precision

# Operator kinds a user can select, and the default selection.
KINDS = ("softmax", "silu", "rmsnorm", "layernorm", "gelu")
DEFAULT_KINDS = ("softmax", "silu", "rmsnorm", "layernorm")

# Op types that mark a candidate site of each kind, with their domains.
ANCHORS = {
    "softmax": {("", "Softmax")},
    "silu": {("", "Sigmoid"), ("", "Swish"), ("com.microsoft", "QuickGelu")},
    "rmsnorm": {("", "ReduceMean"), ("", "RMSNormalization"), ("", "SimplifiedLayerNormalization"),
                ("com.microsoft", "SimplifiedLayerNormalization")},
    "layernorm": {("", "LayerNormalization"), ("", "ReduceMean")},
    "gelu": {("", "Erf"), ("", "Tanh"), ("", "Gelu"), ("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu")},
}

_LAYER_PATTERNS = [re.compile(p) for p in (r"layers?[._/](\d+)(?:[._/]|$)", r"\bh[._](\d+)(?:[._/]|$)",
                                           r"blocks?[._/](\d+)(?:[._/]|$)")]


def layer_index(*names: str | None) -> int | None:
    """The transformer layer a node belongs to, from its name or its weight's name."""
    for name in names:
        if not name:
            continue
        for pattern in _LAYER_PATTERNS:
            found = pattern.search(name)
            if found:
                return int(found.group(1))
    return None


@dataclass
class Site:
    name: str  # the anchor node's name, unique per model after conversion
    kind: str
    rule: str
    layer: int | None
    input_frac_bits: int
    function: str
    dim: int | None = None
    epsilon: float | None = None
    input_range: float | None = None  # max |x| seen in calibration, if any


@dataclass
class Skip:
    node: str
    kind: str
    reason: str


@dataclass
class MatchReport:
    """Per op kind: candidates found, replaced and skipped, with the reason for every skip."""

    model: str = ""
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        table = {}
        for kind in KINDS:
            replaced = sum(1 for s in self.sites if s.kind == kind)
            skipped = sum(1 for s in self.skipped if s.kind == kind)
            table[kind] = {"found": self.found.get(kind, replaced + skipped), "replaced": replaced, "skipped": skipped}
        return table

    @property
    def replaced(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict:
        return {"model": self.model, "counts": self.counts(), "sites": [dataclasses.asdict(s) for s in self.sites],
                "skipped": [dataclasses.asdict(s) for s in self.skipped], "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        lines = [f"Match report for {self.model}" if self.model else "Match report", "",
                 f"{'kind':<10} {'found':>6} {'replaced':>9} {'skipped':>8}"]
        for kind, row in self.counts().items():
            lines.append(f"{kind:<10} {row['found']:>6} {row['replaced']:>9} {row['skipped']:>8}")
        if self.skipped:
            lines += ["", "Skipped:"]
            lines += [f"  [{s.kind}] {s.node}: {s.reason}" for s in self.skipped]
        if self.notes:
            lines += ["", "Notes:"] + [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class SiteRecorder:
    """State shared by the rules of one conversion: selection, precision, functions, decisions."""

    def __init__(self, precision: Precision, kinds: tuple[str, ...], layers: set[int] | None = None,
                 node_pattern: str | None = None, input_ranges: dict[str, float] | None = None,
                 frac_bits_rule=None):
        self.precision = precision
        self.kinds = set(kinds)
        self.layers = layers
        self.node_pattern = re.compile(node_pattern) if node_pattern else None
        self.input_ranges = input_ranges or {}
        self.frac_bits_rule = frac_bits_rule
        self.functions: dict[str, FunctionSpec] = {}
        # (kind, precision, dim, epsilon) -> function: building one takes milliseconds, and a
        # 32-layer model has over a hundred sites that share a handful of functions.
        self._built: dict[tuple, FunctionSpec] = {}
        self.sites: list[Site] = []
        self.failures: dict[int, str] = {}  # id(anchor node) -> last reason
        self.replaced_anchors: set[int] = set()
        self.collect_only = False
        self.collected: dict[str, str] = {}  # site name -> input value name (for calibration)

    def selection_problem(self, kind: str, name: str, layer: int | None) -> str | None:
        if kind not in self.kinds:
            return f"{kind} not selected"
        if self.node_pattern and not self.node_pattern.search(name):
            return f"node name does not match the pattern {self.node_pattern.pattern!r}"
        if self.layers is not None:
            if layer is None:
                return "layer index unknown (no layer number in the node or weight name)"
            if layer not in self.layers:
                return f"layer {layer} not selected"
        return None

    def fail(self, anchor: ir.Node | None, reason: str) -> str:
        if anchor is not None:
            self.failures[id(anchor)] = reason
        return reason

    def site_function(self, kind: str, name: str, layer: int | None, rule: str, dim: int | None = None,
                      epsilon: float | None = None) -> tuple[FunctionSpec, Site]:
        """The spiking function for one site, with its input scale from calibration or the static rule."""
        from onnx_spike.passes.calibrate import site_precision

        precision, frac_bits, input_range = site_precision(self.precision, kind, name, self.input_ranges)
        key = (kind, precision, dim, epsilon if epsilon is not None else 1e-5)
        if key not in self._built:
            self._built[key] = build_site_function(kind, precision, dim=key[2], epsilon=key[3])
        function = self._built[key]
        self.functions.setdefault(function.name, function)
        site = Site(name=name, kind=kind, rule=rule, layer=layer, input_frac_bits=frac_bits, function=function.name,
                    dim=dim, epsilon=epsilon, input_range=input_range)
        return function, site

    def record(self, anchor: ir.Node, site: Site) -> None:
        self.replaced_anchors.add(id(anchor))
        self.failures.pop(id(anchor), None)
        self.sites.append(site)


def anchor_of(nodes, kind: str) -> ir.Node | None:
    """The anchor node of `kind` among matched nodes."""
    for node in nodes:
        if (node.domain or "", node.op_type) in ANCHORS[kind]:
            return node
    return None


def node_name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}:{node.outputs[0].name}"
