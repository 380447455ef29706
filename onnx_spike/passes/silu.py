"""SiLU rules: `x * Sigmoid(x)` in either operand order, `Swish(x, alpha=1)` (opset 24) and
com.microsoft `QuickGelu(x, alpha=1)`."""

from __future__ import annotations

from onnx_spike.passes.base import NearOpFilter, SpikeRule


class SigmoidTimesInput(SpikeRule):
    kind = "silu"

    def __init__(self, recorder, input_first: bool):
        super().__init__(recorder, f"SigmoidTimesInput{'' if input_first else 'Swapped'}",
                         NearOpFilter({"Sigmoid"}, depth=1))
        self.input_first = input_first

    def pattern(self, op, x):
        gate = op.Sigmoid(x)
        return op.Mul(x, gate) if self.input_first else op.Mul(gate, x)

    def rewrite(self, op, x, **_):
        return self.call_site(op, x, {"x": x})


class AlphaOneSilu(SpikeRule):
    """A fused x * sigmoid(alpha * x) op that is SiLU when alpha is 1."""

    kind = "silu"

    def __init__(self, recorder, op_type: str, domain: str):
        super().__init__(recorder, f"{op_type}AlphaOne")
        self.op_type = op_type
        self.domain = domain

    def pattern(self, op, x):
        return getattr(op, self.op_type)(x, _domain=self.domain, _allow_other_attributes=True)

    def site_check(self, context, anchor, **_):
        attribute = anchor.attributes.get("alpha")
        if attribute is not None:
            alpha = attribute.as_float()
        else:
            alpha = 1.0 if self.op_type == "Swish" else 1.702  # the ops' default alphas
        if alpha != 1.0:
            return f"{self.op_type} with alpha {alpha:g} is not SiLU (only alpha = 1 is)"
        return None

    def rewrite(self, op, x, **_):
        return self.call_site(op, x, {"x": x})


def rules(recorder):
    return [SigmoidTimesInput.rule(recorder, input_first=True), SigmoidTimesInput.rule(recorder, input_first=False),
            AlphaOneSilu.rule(recorder, "Swish", ""), AlphaOneSilu.rule(recorder, "QuickGelu", "com.microsoft")]
