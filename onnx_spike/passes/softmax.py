"""Softmax rules: `Softmax(x)` over the last axis, or over another axis through a Transpose.

The Softmax of any float type is replaced in place; Casts that an fp16 export puts around it
stay as they are, and so does the exporter's IsNaN/Where guard for fully masked rows (the
spiking Softmax returns NaN for such rows, as the float op does).
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_spike.passes.base import SpikeRule, is_last_axis, rank


def _axis(node: ir.Node) -> int:
    attribute = node.attributes.get("axis")
    return -1 if attribute is None else attribute.as_int()


class SoftmaxLastAxis(SpikeRule):
    kind = "softmax"

    def pattern(self, op, x):
        return op.Softmax(x, _allow_other_attributes=True)

    def site_check(self, context, anchor, x, **_):
        axis = _axis(anchor)
        if is_last_axis(axis, x):
            return None
        if rank(x) is None:
            return f"Softmax over axis {axis} of a tensor of unknown rank"
        return None

    def rewrite(self, op, x, **bindings):
        axis = _axis(self._anchor)
        if is_last_axis(axis, x):
            return self.call_site(op, x, {"x": x})
        # Move the axis last, apply the site, move it back (the permutation is its own inverse).
        value_rank = rank(x)
        axis = axis % value_rank
        perm = list(range(value_rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        moved = op.Transpose(x, perm=perm)
        return op.Transpose(self.call_site(op, moved, {"x": x}), perm=perm)


def rules(recorder):
    return [SoftmaxLastAxis.rule(recorder)]
