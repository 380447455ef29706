"""Base class of the rewrite rules: pattern, check and rewrite kept apart, as in onnxscript.

Each rule replaces one target subgraph with a call of the site's spiking function. `check`
returns a MatchResult that says why a candidate was rejected, and the reason is also stored in
the SiteRecorder so the match report can list it. The affine weight and bias of a norm are not
part of any pattern: they stay as the graph's own float Mul and Add.
"""

from __future__ import annotations

import ast

import onnx_ir as ir
from onnxscript.rewriter import _basics, _ir_utils, _matcher, pattern

from onnx_spike.graph import DOMAIN
from onnx_spike.passes.sites import SiteRecorder, anchor_of, layer_index, node_name


class NearOpFilter:
    """Accepts a node when one of `op_types` is the node or one of its producers at most
    `depth` steps up, so that rules with many commuted variants skip unrelated nodes.

    Each result is cached per node for one conversion: the rewriter tries every rule on a node
    before it moves to the next one, so the upstream graph of a node does not change between
    the lookups of one visit.
    """

    def __init__(self, op_types: set[str], depth: int):
        self.op_types = frozenset(op_types)
        self.depth = depth
        self._cache: dict[int, tuple[ir.Node, bool]] = {}

    def __call__(self, node: ir.Node) -> bool:
        entry = self._cache.get(id(node))
        if entry is not None and entry[0] is node:
            return entry[1]
        found = self._search(node, self.depth)
        self._cache[id(node)] = (node, found)
        return found

    def _search(self, node: ir.Node, depth: int) -> bool:
        if node.op_type in self.op_types:
            return True
        if depth == 0:
            return False
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and self._search(producer, depth - 1):
                return True
        return False


def _spike_matcher(accept: NearOpFilter | None) -> type[_matcher.SimplePatternMatcher]:
    """Build a matcher class that rejects a node at once unless its op type is the pattern's
    root op and `accept` (when given) passes it.

    The pattern matcher would reject such nodes too, but only after setting up a match. Since
    every rule is tried at every node, that setup was most of the conversion time of a large
    graph. The result is a class, not an instance, because onnxscript builds one matcher per
    pattern from it.
    """
    reason = None if accept is None else (f"no {'/'.join(sorted(accept.op_types))} within {accept.depth} "
                                          "producers of the node")

    class SpikeMatcher(_matcher.SimplePatternMatcher):
        def __init__(self, graph_pattern):
            super().__init__(graph_pattern)
            root = graph_pattern.output_nodes[0].op_identifier() if graph_pattern.has_single_output_node else None
            self._root = None
            self._mismatch = None
            if root is not None:
                domain = "" if root[0] == "ai.onnx" else root[0]
                self._root = (domain, root[1])
                self._mismatch = f"node is not a {root[1]}"

        def match(self, model, graph_or_function, node, **kwargs) -> _basics.MatchResult:
            if self._root is not None:
                domain = node.domain if node.domain != "ai.onnx" else ""
                if node.op_type != self._root[1] or domain != self._root[0]:
                    return _basics.MatchResult().fail(self._mismatch)
            if accept is not None and not accept(node):
                return _basics.MatchResult().fail(reason)
            return super().match(model, graph_or_function, node, **kwargs)

    return SpikeMatcher


class SpikeRule(pattern.RewriteRuleClassBase):
    kind: str = ""

    def __init__(self, recorder: SiteRecorder, name: str | None = None, root_filter: NearOpFilter | None = None):
        super().__init__(name or type(self).__name__)
        self.recorder = recorder
        self.root_filter = root_filter
        self._anchor: ir.Node | None = None

    @classmethod
    def rule(cls, *args, **kwargs) -> pattern.RewriteRule:
        """Build the rewrite rule of one instance as RewriteRuleClassBase.rule does, with a
        matcher that skips nodes that cannot be the pattern's root."""
        instance = cls(*args, **kwargs)
        return pattern.RewriteRule(instance.pattern, instance.rewrite, instance.check,
                                   matcher=_spike_matcher(instance.root_filter),
                                   name=instance.name, remove_nodes=instance.remove_nodes,
                                   graph_pre_visitor=instance.setup, graph_post_visitor=instance.cleanup,
                                   as_function=instance.as_function)

    # Subclasses implement `pattern`, `site_check` and `site_rewrite`.

    def site_check(self, context, anchor: ir.Node, **bindings) -> str | None:
        """Return a reason to reject this candidate, or None to accept it."""
        return None

    @classmethod
    def commuted_rule(cls, *args, **kwargs) -> pattern.RewriteRule:
        """Build one rule that tries every commuted variant of the instance's pattern (Add and
        Mul operands in either order) at each node.

        RewriteRule.commute returns one rule per variant instead, and onnxscript tries every rule
        at every node. The GELU patterns have 800+ variants, so the per-node overhead of the
        rewriter dominated the conversion. Here the variants share one rule, and a node that
        fails the root filter costs one check. The first variant that matches is used, and its
        condition decides: variants differ in which operand must be a computed subgraph, so
        two of them match the same nodes only when both operands have the same structure.
        """
        instance = cls(*args, **kwargs)
        plain = pattern.RewriteRule(instance.pattern, instance.rewrite, instance.check, name=instance.name)
        variants = plain._target_pattern.commute()
        accept = instance.root_filter
        single_matcher = _spike_matcher(None)

        class VariantsMatcher(_matcher.PatternMatcher):
            def __init__(self, graph_pattern):
                super().__init__(graph_pattern)
                self._matchers = [single_matcher(variant) for variant in variants]

            def match(self, model, graph_or_function, node, **kwargs) -> _basics.MatchResult:
                if accept is not None and not accept(node):
                    return _basics.MatchResult().fail("no candidate anchor near the node")
                result = _basics.MatchResult().fail("no variant matched")
                for matcher in self._matchers:
                    result = matcher.match(model, graph_or_function, node, **kwargs)
                    if result:
                        break
                return result

        return pattern.RewriteRule(plain._target_pattern, instance.rewrite, instance.check, matcher=VariantsMatcher,
                                   name=instance.name, remove_nodes=instance.remove_nodes,
                                   graph_pre_visitor=instance.setup, graph_post_visitor=instance.cleanup,
                                   as_function=instance.as_function)

    def find_anchor(self, nodes) -> ir.Node | None:
        """Return the node that identifies the site among the matched nodes."""
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
        # Activation names are not used: a norm's input is often the previous layer's residual
        # (GPT-2's ln_f reads /transformer/h.1/Add_1_output_0), so only the anchor's own name,
        # its torch.onnx name scopes and the names of matched weights count.
        names = [anchor.name, *torch_name_scopes(anchor)]
        names += [v.name for v in bindings.values() if isinstance(v, ir.Value) and v.is_initializer()]
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


def torch_name_scopes(node: ir.Node) -> list[str]:
    """Return the module paths that torch.onnx (dynamo) stores on a node, innermost first."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return []
    try:
        parsed = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return []
    return [str(scope) for scope in reversed(parsed)] if isinstance(parsed, list) else []


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
