"""Turn FunctionSpecs into model-local FunctionProtos and wrap one in a runnable model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import helper

from onnx_spike.graph import DOMAIN, DOMAIN_VERSION, FunctionSpec

# Function bodies use ReduceMax/ReduceSum with axes as an input (opset 18).
MIN_OPSET = 18
# Newest default-domain opset the bodies were checked against (onnx 1.23 defines up to 25).
MAX_OPSET = 24


def function_protos(specs: Iterable[FunctionSpec], opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos for `specs` and everything they call, callees first, each name once."""
    ordered: dict[str, FunctionSpec] = {}
    for spec in specs:
        for item in spec.closure():
            ordered.setdefault(item.name, item)
    return [item.to_proto(opset) for item in ordered.values()]


def standalone_model(spec: FunctionSpec, inputs: Sequence[onnx.ValueInfoProto],
                     outputs: Sequence[onnx.ValueInfoProto], opset: int = MIN_OPSET,
                     ir_version: int = 10) -> onnx.ModelProto:
    """A model whose graph is one call of `spec`, with the given typed inputs and outputs."""
    node = helper.make_node(spec.name, [v.name for v in inputs], [v.name for v in outputs],
                            domain=DOMAIN, name=spec.kind)
    graph = helper.make_graph([node], spec.kind, list(inputs), list(outputs))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=function_protos([spec], opset),
        ir_version=ir_version,
        producer_name="onnx-spike",
    )
    return model
