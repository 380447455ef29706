"""Small builder for ONNX function bodies and Loop subgraphs.

The spiking operators are emitted as model-local functions with every parameter folded into
constants, so each body is written once in Python and instantiated per parameter set. This
module keeps that code close to the math: `b.op("Add", x, y)` returns the output name, and
`b.loop(...)` builds a `Loop` whose body is written with a nested builder.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "onnx_spike"
DOMAIN_VERSION = 1

# Integer types of the hot paths by name: (numpy type, ONNX type, the unsigned numpy type of
# the same width, its ONNX type). BitShift needs the unsigned one, because ONNX BitShift takes
# only unsigned types at the opsets these functions use.
INTEGER_DTYPES = {
    "int32": (np.int32, onnx.TensorProto.INT32, np.uint32, onnx.TensorProto.UINT32),
    "int64": (np.int64, onnx.TensorProto.INT64, np.uint64, onnx.TensorProto.UINT64),
    "uint32": (np.uint32, onnx.TensorProto.UINT32, np.uint32, onnx.TensorProto.UINT32),
    "uint64": (np.uint64, onnx.TensorProto.UINT64, np.uint64, onnx.TensorProto.UINT64),
}


def dtype_for_bits(bits: int) -> str:
    """Return the narrower signed type that fits non-negative values below 2^bits."""
    if bits <= 31:
        return "int32"
    if bits <= 63:
        return "int64"
    raise ValueError(f"a value of {bits} bits does not fit a signed 64-bit integer")


# ONNX attribute values that a node carries through `helper.make_node`.
AttributeValue = int | float | str | Sequence[int] | Sequence[float] | onnx.TensorProto | onnx.GraphProto


class GraphBuilder:
    """Collects nodes for one function body or one Loop body.

    Value names are unique within the builder and any nested Loop bodies, because a Loop body
    may read names of the enclosing scope and ONNX forbids shadowing them.
    """

    def __init__(self, prefix: str = "", counter: list[int] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._counter = counter if counter is not None else [0]
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self._prefix}{hint}_{self._counter[0]}"

    def op(self, op_type: str, *inputs: str, domain: str = "", name_hint: str | None = None,
           **attrs: AttributeValue) -> str:
        """Append one node with a single output and return the output name."""
        (output,) = self.op_multi(op_type, 1, *inputs, domain=domain, name_hint=name_hint, **attrs)
        return output

    def op_multi(self, op_type: str, num_outputs: int, *inputs: str, domain: str = "",
                 name_hint: str | None = None, **attrs: AttributeValue) -> list[str]:
        hint = name_hint or op_type.lower()
        outputs = [self.fresh(hint) for _ in range(num_outputs)]
        node = helper.make_node(op_type, list(inputs), outputs, name=self.fresh(f"n_{hint}"),
                                domain=domain, **attrs)
        self.nodes.append(node)
        return outputs

    def const(self, value: int | float | bool | np.ndarray, dtype: np.dtype | type | None = None) -> str:
        """Return the name of a Constant node holding `value` (deduplicated per builder)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("c")
            tensor = numpy_helper.from_array(array, name=name)
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_const"),
                                               value=tensor))
            self._constants[key] = name
        return self._constants[key]

    def shift(self, value: str, amount: int | str, direction: str) -> str:
        """BitShift of a uint64 value; `amount` is a constant or a uint64 tensor name."""
        if isinstance(amount, int):
            if amount == 0:
                return value
            amount = self.const(np.uint64(amount))
        return self.op("BitShift", value, amount, direction=direction, name_hint=f"shift_{direction.lower()}")

    def shr(self, value: str, amount: int | str) -> str:
        return self.shift(value, amount, "RIGHT")

    def shl(self, value: str, amount: int | str) -> str:
        return self.shift(value, amount, "LEFT")

    def u64(self, value: int) -> str:
        return self.const(np.uint64(value))

    def i64(self, value: int) -> str:
        return self.const(np.int64(value))

    def gate(self, mask: str, value: str) -> str:
        """`value` where `mask` holds, else 0, for uint64 (onnxruntime has no uint64 Where)."""
        return self.op("Mul", self.op("Cast", mask, to=13), value, name_hint="gate")

    def select(self, mask: str, if_true: str, if_false: str) -> str:
        """uint64 select: if_false + mask * (if_true - if_false), exact in modulo-2^64 arithmetic."""
        return self.op("Add", if_false, self.gate(mask, self.op("Sub", if_true, if_false)), name_hint="select")

    # Integer helpers for the hot paths. Values stay signed (Abs and negative intermediates need
    # that) or uint32, and are cast to the unsigned type of the same width only around BitShift.
    # A select is a 0/1 factor: in onnxruntime 1.32, Where ran about 30 times slower than an
    # int32 Add (docs/benchmarks.md lists the measured op costs).

    def int_const(self, value: int, dtype: str) -> str:
        return self.const(INTEGER_DTYPES[dtype][0](value))

    def cast(self, value: str, dtype: str) -> str:
        """Cast to an integer type by name ("int32", "uint32", ...); the caller keeps the value in range."""
        return self.op("Cast", value, to=INTEGER_DTYPES[dtype][1])

    def shr_int(self, value: str, amount: int | str, dtype: str, out: str | None = None) -> str:
        """Logical right shift of a non-negative `value` of type `dtype`.

        `amount` is a constant or a tensor of the unsigned type of the same width. The result
        has type `out` (default `dtype`); casting a non-negative value to the other signed type
        is exact when the caller keeps it in range.
        """
        if isinstance(amount, int):
            if amount == 0:
                return value if out in (None, dtype) else self.cast(value, out)
            amount = self.const(INTEGER_DTYPES[dtype][2](amount))
        unsigned = value if dtype.startswith("u") else self.op("Cast", value, to=INTEGER_DTYPES[dtype][3])
        shifted = self.op("BitShift", unsigned, amount, direction="RIGHT", name_hint="shift_right")
        target = out or dtype
        return shifted if INTEGER_DTYPES[target][1] == INTEGER_DTYPES[dtype][3] else self.cast(shifted, target)

    def shift_amount(self, amount: str, dtype: str) -> str:
        """Cast a non-negative shift amount to the unsigned type that BitShift on `dtype` needs."""
        return self.op("Cast", amount, to=INTEGER_DTYPES[dtype][3])

    def mul_mask(self, mask: str, value: str, dtype: str) -> str:
        """Return `value` where the bool `mask` is true, else 0, as Cast(mask) * value."""
        return self.op("Mul", self.cast(mask, dtype), value, name_hint="gate")

    def call(self, function: "FunctionSpec", *inputs: str) -> list[str]:
        """Call a function of the project's domain; returns its output names."""
        return self.op_multi(function.name, len(function.outputs), *inputs, domain=DOMAIN,
                             name_hint=function.kind.lower())

    def loop(self, trip_count: int | str, carried: Sequence[str],
             body: Callable[["GraphBuilder", str, list[str]], list[str]],
             name_hint: str = "loop") -> list[str]:
        """Build `Loop(trip_count, cond=true, carried...)` and return the final carried values.

        `body(builder, iteration, carried_in)` appends the step's nodes and returns the next
        carried values in the same order. The condition input is given explicitly because
        onnx's ReferenceEvaluator runs zero iterations when it is left empty.
        """
        trip = trip_count if isinstance(trip_count, str) else self.const(np.int64(trip_count))
        cond = self.const(np.bool_(True))

        inner = GraphBuilder(prefix=f"{name_hint}_", counter=self._counter)
        iteration = inner.fresh("iter")
        cond_in = inner.fresh("cond_in")
        carried_in = [inner.fresh("state_in") for _ in carried]
        carried_out = body(inner, iteration, carried_in)
        if len(carried_out) != len(carried):
            raise ValueError(f"loop body returned {len(carried_out)} states, expected {len(carried)}")
        cond_out = inner.op("Identity", cond_in, name_hint="cond_out")
        # A body output may not be a body input or an outer value: pass those through Identity.
        renamed = []
        for name in carried_out:
            if name in carried_in or not any(name in n.output for n in inner.nodes):
                name = inner.op("Identity", name, name_hint="state_out")
            renamed.append(name)

        untyped = onnx.TypeProto()
        graph = helper.make_graph(
            inner.nodes,
            self.fresh(f"{name_hint}_body"),
            [helper.make_tensor_value_info(iteration, onnx.TensorProto.INT64, []),
             helper.make_tensor_value_info(cond_in, onnx.TensorProto.BOOL, [])]
            + [helper.make_value_info(name, untyped) for name in carried_in],
            [helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, [])]
            + [helper.make_value_info(name, untyped) for name in renamed],
        )
        return self.op_multi("Loop", len(carried), trip, cond, *carried, name_hint=name_hint,
                             body=graph)


@dataclass
class FunctionSpec:
    """One model-local ONNX function and the functions its body calls."""

    kind: str
    params: dict
    inputs: list[str]
    outputs: list[str]
    nodes: list[onnx.NodeProto]
    calls: list["FunctionSpec"] = field(default_factory=list)
    doc: str = ""

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps([self.kind, self.params], sort_keys=True).encode()).hexdigest()
        return f"{self.kind}_{digest[:8]}"

    def to_proto(self, opset: int) -> onnx.FunctionProto:
        doc = self.doc + "\nparameters: " + json.dumps(self.params, sort_keys=True)
        return helper.make_function(
            DOMAIN, self.name, self.inputs, self.outputs, self.nodes,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
            doc_string=doc.strip(),
        )

    def closure(self) -> list["FunctionSpec"]:
        """This function and everything it calls, callees first, each name once."""
        seen: dict[str, FunctionSpec] = {}

        def visit(spec: FunctionSpec) -> None:
            for callee in spec.calls:
                visit(callee)
            seen.setdefault(spec.name, spec)

        visit(self)
        return list(seen.values())


_FAST_FORM: contextvars.ContextVar[bool] = contextvars.ContextVar("onnx_spike_fast_form", default=False)


@contextlib.contextmanager
def execution_form(form: str):
    """Build functions in the "loop" form (neuron dynamics in Loops, the reference) or the
    "fast" form (the same integers in closed form, integer Div allowed) inside this block."""
    if form not in ("loop", "fast"):
        raise ValueError(f"unknown execution form {form!r}; choose 'loop' or 'fast'")
    token = _FAST_FORM.set(form == "fast")
    try:
        yield
    finally:
        _FAST_FORM.reset(token)


def fast_form() -> bool:
    """Whether functions are being built in the fast form."""
    return _FAST_FORM.get()


def define_function(kind: str, params: dict, inputs: Sequence[str], num_outputs: int,
                    body: Callable[[GraphBuilder, list[str]], Sequence[str]],
                    calls: Sequence[FunctionSpec] = (), doc: str = "") -> FunctionSpec:
    """Build a FunctionSpec whose body is written by `body(builder, input_names)`."""
    builder = GraphBuilder()
    input_names = list(inputs)
    results = list(body(builder, input_names))
    if len(results) != num_outputs:
        raise ValueError(f"{kind}: body returned {len(results)} outputs, expected {num_outputs}")
    output_names = []
    constants = {out for node in builder.nodes if node.op_type == "Constant" for out in node.output}
    for i, name in enumerate(results):
        # A function output needs its own producing node: not an input, a shared constant or
        # another output. Other values are returned as they are, with no Identity copy.
        if name in input_names or name in constants or name in output_names:
            name = builder.op("Identity", name, name_hint=f"out{i}")
        output_names.append(name)
    params = dict(params)
    if fast_form():
        params["form"] = "fast"
    return FunctionSpec(kind=kind, params=params, inputs=input_names, outputs=output_names,
                        nodes=builder.nodes, calls=list(calls), doc=doc)
