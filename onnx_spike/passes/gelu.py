"""GELU rules (opt-in): the erf form, the tanh form, and the fused Gelu ops.

All are replaced by the spiking GELU, x * sigma(1.5958 (x + 0.044715 x^3)), which is within
1e-3 of both erf-GELU and tanh-GELU. Erf form: 0.5 * x * (1 + Erf(x / sqrt(2))). Tanh form:
0.5 * x * (1 + Tanh(0.79788 (x + 0.044715 x^3))), with the cube as Pow(x, 3) or x * x * x.
The factor 0.5 may multiply first or last, which gives three structures.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import pattern

from onnx_spike.passes.base import NearOpFilter, SpikeRule, constant


def _close(value, expected: float, tolerance: float = 2e-3) -> bool:
    return isinstance(value, (float, int)) and abs(value - expected) <= tolerance * abs(expected)


class DecomposedGelu(SpikeRule):
    kind = "gelu"

    def __init__(self, recorder, form: str, structure: int, root_filter=None):
        super().__init__(recorder, f"Gelu{form.title()}{structure}", root_filter)
        self.form = form
        self.structure = structure

    def pattern(self, op, x, c_scale, c_one, c_half, c_cubic, c_three):
        if self.form == "erf":
            scaled = pattern.OrValue([op.Div(x, c_scale), op.Mul(x, c_scale)], tag_var="scale_op",
                                     tag_values=["div", "mul"])
            core = op.Erf(scaled)
        else:
            cube = pattern.OrValue([op.Pow(x, c_three), op.Mul(x, op.Mul(x, x))], tag_var="cube_op",
                                   tag_values=["pow", "mul"])
            core = op.Tanh(op.Mul(op.Add(x, op.Mul(c_cubic, cube)), c_scale))
        plus_one = op.Add(core, c_one)
        if self.structure == 0:
            return op.Mul(op.Mul(x, plus_one), c_half)
        if self.structure == 1:
            return op.Mul(x, op.Mul(c_half, plus_one))
        return op.Mul(op.Mul(x, c_half), plus_one)

    def site_check(self, context, anchor, x, c_scale, c_one, c_half, c_cubic=None, c_three=None,
                   scale_op=None, cube_op=None, **_):
        if not _close(constant(c_one), 1.0) or not _close(constant(c_half), 0.5):
            return "GELU constants 1 and 0.5 not found"
        if self.form == "erf":
            expected = math.sqrt(2.0) if scale_op == "div" else 1.0 / math.sqrt(2.0)
            if not _close(constant(c_scale), expected):
                return f"Erf argument is not x / sqrt(2) (constant {constant(c_scale)})"
            return None
        if not _close(constant(c_scale), math.sqrt(2.0 / math.pi)) or not _close(constant(c_cubic), 0.044715):
            return "Tanh argument is not 0.7979 * (x + 0.044715 x^3)"
        if cube_op == "pow" and constant(c_three) != 3:
            return "cube is not Pow(x, 3)"
        return None

    def rewrite(self, op, x, **_):
        return self.call_site(op, x, {"x": x})


class FusedGelu(SpikeRule):
    kind = "gelu"

    def __init__(self, recorder, op_type: str, domain: str):
        super().__init__(recorder, f"Fused{op_type}{'Contrib' if domain else ''}")
        self.op_type = op_type
        self.domain = domain

    def pattern(self, op, x):
        return getattr(op, self.op_type)(x, _domain=self.domain, _allow_other_attributes=True)

    def rewrite(self, op, x, **_):
        return self.call_site(op, x, {"x": x})


def rules(recorder):
    built = []
    # Every pattern ends in a Mul whose Erf or Tanh lies at most 3 producers up, so other nodes
    # are skipped before any of the 800+ commuted variants is tried.
    near_core = NearOpFilter({"Erf", "Tanh"}, depth=3)
    for form in ("erf", "tanh"):
        for structure in range(3):
            built.append(DecomposedGelu.commuted_rule(recorder, form, structure, near_core))
    for op_type, domain in [("Gelu", ""), ("Gelu", "com.microsoft"), ("FastGelu", "com.microsoft")]:
        built.append(FusedGelu.rule(recorder, op_type, domain))
    return built
