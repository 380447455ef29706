"""Base class of the rewrite rules: pattern, check and rewrite kept apart, as in onnxscript.

Each rule replaces one target subgraph with a call of the site's spiking function. `check`
returns a MatchResult that says why a candidate was rejected, and the reason is also stored in
the SiteRecorder so the match report can list it. The affine weight and bias of a norm are not
part of any pattern: they stay as the graph's own float Mul and Add.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from onnx_spike.graph import DOMAIN
from onnx_spike.passes.sites import SiteRecorder, anchor_of, layer_index, node_name


class SpikeRule(pattern.RewriteRuleClassBase):
    kind: str = ""

    def __init__(self, recorder: SiteRecorder, name: str | None = None):
        super().__init__(name or type(self).__name__)
        self.recorder = recorder
        self._anchor: ir.Node | None = None

    # Subclasses implement `pattern`, `site_check` and `site_rewrite`.

    def site_check(self, context, anchor: ir.Node, **bindings) -> str | None:
        """Return a reason to reject this candidate, or None to accept it."""
        return None

    def find_anchor(self, nodes) -> ir.Node | None:
        """The node that identifies the site among the matched nodes."""
        return anchor_of(nodes, self.kind)

    def check(self, context, **bindings) -> pattern.MatchResult:
        result = pattern.MatchResult()
        anchor = self.find_anchor(context.nodes)
        if anchor is None:
            return result.fail("no anchor node in the match")
        name = node_name(anchor)
        problem = self.recorder.selection_problem(self.kind, name, self.layer_of(anchor, bindings))
        problem = problem or self.site_check(context, anchor, **bindings)
        if problem:
            return result.fail(self.recorder.fail(anchor, problem))
        self._anchor = anchor
        if self.recorder.collect_only:
            self.recorder.collected[name] = self.site_input(bindings).name
            return result.fail("collecting sites only")
        return result

    def layer_of(self, anchor: ir.Node, bindings) -> int | None:
        names = [anchor.name] + [v.name for v in bindings.values() if isinstance(v, ir.Value)]
        return layer_index(*names)

    def site_input(self, bindings) -> ir.Value:
        return bindings["x"]

    def call_site(self, op, x: ir.Value, bindings, dim: int | None = None, epsilon: float | None = None) -> ir.Value:
        """Emit the spiking function call for the current anchor and record the site."""
        anchor = self._anchor
        name = node_name(anchor)
        function, site = self.recorder.site_function(self.kind, name, self.layer_of(anchor, bindings), self.name,
                                                     dim=dim, epsilon=epsilon)
        output = getattr(op, function.name)(x, _domain=DOMAIN)
        output.producer().name = name
        self.recorder.record(anchor, site)
        return output


def constant(value: ir.Value | None):
    """The scalar Python value of a constant input, or None."""
    return _ir_utils.get_singleton_value(value)


def last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    dim = shape[-1]
    return dim if isinstance(dim, int) else None


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def is_last_axis(axis: int, value: ir.Value) -> bool:
    if axis == -1:
        return True
    value_rank = rank(value)
    return value_rank is not None and axis == value_rank - 1
