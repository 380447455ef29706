"""Check that every function of the project's domain uses only spike-native arithmetic.

Core functions may hold integer and bool values only, with the ops that a neuromorphic core
runs: add, subtract, compare, select, max/min, shifts, small table gathers, integer casts
and integer multiply. The boundary functions (Encode, *Decode) may also use the float ops
of the interface: Cast, Mul, Round, Clip, IsNaN, IsInf, Where and CastLike. Div, Exp, Log,
Sqrt, Pow, Reciprocal, Sigmoid, Tanh, Erf, Softmax and normalization ops appear nowhere,
except integer Div in functions built in the fast execution form, which computes the neuron
counts in closed form.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from onnx_spike.graph import DOMAIN

INTEGER_OPS = frozenset({
    "Add", "Sub", "Mul", "Neg", "Abs", "Max", "Min", "Clip", "Where", "Not", "And", "Or",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "BitShift", "Gather", "GatherElements",
    "ReduceMax", "ReduceMin", "ReduceSum", "Cast", "Constant", "Identity", "Loop", "Shape",
    "Reshape", "Expand", "Slice", "Concat",
})
BOUNDARY_OPS = INTEGER_OPS | {"Round", "IsNaN", "IsInf", "CastLike"}
INTEGER_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
})


# The fast execution form computes the neuron counts in closed form and may divide integers.
FAST_FORM_OPS = frozenset({"Div"})


def is_fast_form(function: onnx.FunctionProto) -> bool:
    return '"form": "fast"' in function.doc_string


def is_boundary(function_name: str) -> bool:
    kind = function_name.rsplit("_", 1)[0]
    return kind == "Encode" or kind.endswith("Decode")


def _nodes(nodes) -> Iterator[onnx.NodeProto]:
    for node in nodes:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g.node)
            for graph in attr.graphs:
                yield from _nodes(graph.node)


def violations(model: onnx.ModelProto) -> list[str]:
    """Messages naming each function and node that breaks the rules; empty when all is well."""
    problems = []
    for function in model.functions:
        if function.domain != DOMAIN:
            continue
        boundary = is_boundary(function.name)
        allowed = BOUNDARY_OPS if boundary else INTEGER_OPS
        if is_fast_form(function):
            allowed = allowed | FAST_FORM_OPS
        for node in _nodes(function.node):
            where = f"function {function.name}, node {node.name or node.op_type}"
            if node.domain == DOMAIN:
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in allowed:
                problems.append(f"{where}: op {node.domain or 'ai.onnx'}.{node.op_type} is not allowed")
                continue
            if boundary:
                continue
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i not in INTEGER_TYPES:
                    problems.append(f"{where}: Cast to a non-integer type {attr.i}")
                if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type not in INTEGER_TYPES:
                    problems.append(f"{where}: Constant of non-integer type {attr.t.data_type}")
    return problems
