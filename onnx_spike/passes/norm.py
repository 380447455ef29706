"""Normalization rules: RMSNorm and LayerNorm, decomposed or fused, over the last axis.

The pattern ends at the normalized value x / rms(x); the weight Mul (either operand order,
through Identity, or a folded `1 + weight`) and a LayerNorm bias stay as the graph's own
float ops. Fused ops (RMSNormalization, SimplifiedLayerNormalization, LayerNormalization) are
rewritten to the site followed by an explicit Mul by their scale (and Add of their bias).

Decomposed RMSNorm: Pow(x, 2) -> ReduceMean(last axis) -> Add(eps) -> Sqrt -> Div(1, .) or
Reciprocal -> Mul(x, .), or Div(x, rms). Decomposed LayerNorm: the same on x - ReduceMean(x).
"""

from __future__ import annotations

import math

import numpy as np
from onnxscript.rewriter import _ir_utils

from onnx_spike.passes.base import NearOpFilter, SpikeRule, constant, is_last_axis, last_dim


def _last_axis_reduction(node, data) -> str | None:
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.as_int() != 1:
        return "ReduceMean without keepdims"
    axes = _ir_utils.get_numpy_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None and node.attributes.get("axes") is not None:
        axes = np.array(node.attributes["axes"].as_ints())
    if axes is None or np.asarray(axes).size != 1 or not is_last_axis(int(np.asarray(axes).reshape(-1)[0]), data):
        return "ReduceMean is not over the last axis alone"
    return None


def _epsilon(eps) -> float | str:
    value = constant(eps)
    if not isinstance(value, (float, int)) or not math.isfinite(value) or value < 0:
        return "epsilon is not a constant non-negative scalar"
    return float(value)


class DecomposedNorm(SpikeRule):
    """x / sqrt(mean(x^2) + eps), with x centered first for LayerNorm."""

    def __init__(self, recorder, center: bool, inverse: str, root_filter=None):
        self.kind = "layernorm" if center else "rmsnorm"
        super().__init__(recorder, f"Decomposed{'LayerNorm' if center else 'RmsNorm'}{inverse.title()}", root_filter)
        self.center = center
        self.inverse = inverse

    def pattern(self, op, x, exponent, eps, one):
        data = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True)) if self.center else x
        mean_square = op.ReduceMean(op.Pow(data, exponent), _allow_other_inputs=True, _allow_other_attributes=True)
        rms = op.Sqrt(op.Add(mean_square, eps))
        if self.inverse == "div":
            return op.Mul(data, op.Div(one, rms))
        if self.inverse == "reciprocal":
            return op.Mul(data, op.Reciprocal(rms))
        return op.Div(data, rms)

    def find_anchor(self, nodes):
        # The ReduceMean of the square, as counted by the driver; a LayerNorm also has the
        # ReduceMean of its mean, which is not the anchor.
        for node in nodes:
            if node.op_type == "ReduceMean" and node.inputs[0] is not None:
                producer = node.inputs[0].producer()
                if producer is not None and producer.op_type == "Pow":
                    return node
        return None

    def site_check(self, context, anchor, x, exponent, eps, one=None, **_):
        if constant(exponent) != 2:
            return "the square is not Pow(x, 2)"
        reductions = [node for node in context.nodes if node.op_type == "ReduceMean"]
        for node in reductions:
            problem = _last_axis_reduction(node, x)
            if problem:
                return problem
        if self.inverse == "div" and constant(one) != 1:
            return "Div numerator is not the constant 1"
        epsilon = _epsilon(eps)
        if isinstance(epsilon, str):
            return epsilon
        if last_dim(x) is None:
            return "normalized dimension unknown (the last axis has no static size)"
        return None

    def rewrite(self, op, x, eps, **_):
        return self.call_site(op, x, {"x": x}, dim=last_dim(x), epsilon=float(constant(eps)))


class FusedNorm(SpikeRule):
    """RMSNormalization / SimplifiedLayerNormalization / LayerNormalization with last-axis scale."""

    def __init__(self, recorder, op_type: str, domain: str, with_bias: bool):
        self.kind = "layernorm" if op_type == "LayerNormalization" else "rmsnorm"
        super().__init__(recorder, f"{op_type}{'WithBias' if with_bias else ''}")
        self.op_type = op_type
        self.domain = domain
        self.with_bias = with_bias

    def pattern(self, op, x, scale, bias):
        inputs = [x, scale, bias] if self.with_bias else [x, scale]
        return getattr(op, self.op_type)(*inputs, _domain=self.domain, _allow_other_attributes=True,
                                         _outputs=1)

    def site_check(self, context, anchor, x, scale, **_):
        axis = anchor.attributes.get("axis")
        if axis is not None and not is_last_axis(axis.as_int(), x):
            return f"{self.op_type} over axis {axis.as_int()}, not the last axis alone"
        for extra in anchor.outputs[1:]:
            if extra is not None and extra.uses():
                return f"{self.op_type} output {extra.name} (mean or inverse std) is used"
        if len(anchor.inputs) > (3 if self.with_bias else 2):
            return "unexpected inputs"
        if last_dim(x) is None:
            return "normalized dimension unknown (the last axis has no static size)"
        return None

    def rewrite(self, op, x, scale, bias=None, **_):
        epsilon = self._anchor.attributes.get("epsilon")
        epsilon = 1e-5 if epsilon is None else epsilon.as_float()
        y = self.call_site(op, x, {"x": x}, dim=last_dim(x), epsilon=epsilon)
        if x.dtype is not None and scale.dtype is not None and x.dtype != scale.dtype:
            y = op.CastLike(y, scale)
        y = op.Mul(y, scale)
        return op.Add(y, bias) if self.with_bias else y


def rules(recorder, kinds=("rmsnorm", "layernorm")):
    """Build the rules of the norm kinds in `kinds`."""
    built = []
    # Each decomposed pattern ends in a Mul or Div whose ReduceMean is 4 producers up at most.
    near_mean = NearOpFilter({"ReduceMean"}, depth=4)
    # LayerNorm first: an RMSNorm pattern also matches a centered chain (its x is then the Sub
    # output), and for one anchor the first matching rule wins.
    for center, kind in ((True, "layernorm"), (False, "rmsnorm")):
        if kind not in kinds:
            continue
        for inverse in ("div", "reciprocal", "direct"):
            built.append(DecomposedNorm.commuted_rule(recorder, center, inverse, near_mean))
    if "rmsnorm" in kinds:
        for op_type, domain in [("RMSNormalization", ""), ("SimplifiedLayerNormalization", ""),
                                ("SimplifiedLayerNormalization", "com.microsoft")]:
            built.append(FusedNorm.rule(recorder, op_type, domain, with_bias=False))
    if "layernorm" in kinds:
        built.append(FusedNorm.rule(recorder, "LayerNormalization", "", with_bias=True))
        built.append(FusedNorm.rule(recorder, "LayerNormalization", "", with_bias=False))
    return built
