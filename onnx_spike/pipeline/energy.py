"""Operation counts and an energy estimate of the spiking sites, against the float ops they replace.

Every replaced site is measured on its own input from a real text window. The original model
runs with the site inputs exposed (`SiteProbe`). The site's function then runs alone in
onnx's `ReferenceEvaluator`, instrumented to count how many elements each executed node of
the site's functions processes, each iteration of a `Loop` body counted. The same input runs
through onnxruntime, and the two outputs must be equal bit for bit, so the counted execution
is the one that onnxruntime performs. Each `Loop` must run exactly its
trip count of iterations (onnx's evaluator runs none when the optional `cond` input is
empty), or the measurement fails.

Counting rules for the spiking side, per element of a node's output (elements of the input
minus elements of the output for ReduceSum, ReduceMax and ReduceMin):

- add: Add, Sub, Neg, Abs, ReduceSum; but Add(x, x), a doubling, is a shift.
- compare: GreaterOrEqual, Greater, Less, LessOrEqual, Equal, Max, Min, ReduceMax,
  ReduceMin, and Clip (one comparison per bound given).
- shift: BitShift, and Add(x, x).
- lut: Gather and GatherElements (one table read per output element).
- logic: Not, And, Or, Xor, Where, IsNaN, IsInf and Round.
- mul_shift_add, the integer products: a product with a constant costs popcount(|c|)
  shift-and-add accumulates. A product of two run-time values costs min(popcount(|a|),
  popcount(|b|)): the operand with fewer set bits is taken as the binary-weighted spike
  train, each spike adding a shifted copy of the other operand. Which operand is the spike
  count cannot be read from the graph, so this rule takes the cheaper one. A 0/1 gate (a
  spike cast to an integer) then costs one accumulate per spike.
- float products, in Encode and the Decode functions only. A product by the constant 0 (the
  NaN test `x * 0`) or by an operand whose values are all 0 or +-1 (a mask) counts as logic.
  A product by a constant power of two (the scales 2^f and 2^-n) counts as a shift. Any
  other counts as float_mul.
- moves, not costed: Cast, CastLike, Identity, Reshape, Shape, Slice, Concat, Expand,
  Squeeze, Unsqueeze, Transpose, Constant.
- spikes: the True elements of every GreaterOrEqual inside a Loop body, the threshold test
  of the integrate-and-fire neurons (the bit-serial and reciprocal division neurons and the
  population group; the bit-length bisection and the CORDIC tree run outside loops or
  without GreaterOrEqual). `neuron_steps` is the number of such tests, so the firing rate
  is spikes / neuron_steps. Spikes are not costed on their own: the accumulates that a
  spike triggers are already counted in add and mul_shift_add.

Ops of Encode and the *Decode functions (the float interface) are reported apart from the
integer core.

Model of the float op each site replaced, with N elements in rows of d (R = N / d rows):

- Softmax: N exps, N additions, N divisions.
- SiLU: one sigmoid (an exp and a division) and one multiply per element.
- RMSNorm: N MACs for the sum of squares, one square root and one division per row, and
  N multiplies.
- LayerNorm: as RMSNorm, plus the mean: N additions for the row sum, R multiplies by 1/d
  and N subtractions to center.
- GELU: one erf or tanh and 3 multiplies per element.

Energy estimate (an estimate, not a measurement), 45 nm CMOS constants as the spiking
literature uses them (Horowitz, "Computing's energy problem", ISSCC 2014): 0.9 pJ per
accumulate (the 32-bit float add) and 4.6 pJ per multiply-accumulate (32-bit float multiply
plus add). Assumptions:

- every counted spiking operation (add, compare, shift, lut, logic, mul_shift_add) costs one
  accumulate, and a float product in the interface one MAC. In the same table a 32-bit
  integer add costs about 0.1 pJ, so the spiking side is costed high rather than low.
- memory traffic, table reads beyond the one accumulate, and data movement are not costed
  on either side.
- the ops are those of the dense graph as onnxruntime runs it. Event-driven hardware that
  skips a gated update when no spike arrives would do fewer.
- every float multiply costs one MAC (a bare 32-bit float multiply is 3.7 pJ in the source).
- a special-function evaluation (exp, division, square root, erf or tanh) costs
  `SPECIAL_FUNCTION_MACS` MACs, about what a range reduction and a short polynomial or two
  Newton steps take; the counts are reported separately, so other costs can be applied.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpFunction, OpRun
from tqdm.auto import tqdm

from onnx_spike.audit import is_boundary
from onnx_spike.graph import DOMAIN, DOMAIN_VERSION
from onnx_spike.pipeline.runtime import SiteProbe, model_file, session_options, spiking_sites, window_feeds

ENERGY_AC_PJ = 0.9
ENERGY_MAC_PJ = 4.6
SPECIAL_FUNCTION_MACS = 8

SPIKING_CATEGORIES = ("add", "compare", "shift", "lut", "logic", "mul_shift_add", "float_mul")
AC_CATEGORIES = ("add", "compare", "shift", "lut", "logic", "mul_shift_add")
SPECIAL_FUNCTIONS = ("exp", "division", "sqrt", "erf_or_tanh")

_ADD_OPS = frozenset({"Add", "Sub", "Neg", "Abs"})
_COMPARE_OPS = frozenset({"GreaterOrEqual", "Greater", "Less", "LessOrEqual", "Equal", "Max", "Min"})
_REDUCE_OPS = {"ReduceSum": "add", "ReduceMax": "compare", "ReduceMin": "compare"}
_LOGIC_OPS = frozenset({"Not", "And", "Or", "Xor", "Where", "IsNaN", "IsInf", "Round"})
_MOVE_OPS = frozenset({"Cast", "CastLike", "Identity", "Reshape", "Shape", "Slice", "Concat", "Expand", "Squeeze",
                       "Unsqueeze", "Transpose", "Constant"})
_NUMPY_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
                  np.dtype(np.float64): onnx.TensorProto.DOUBLE}


# ---------------------------------------------------------------- one site as a standalone model


def model_functions(proto: onnx.ModelProto) -> dict[str, onnx.FunctionProto]:
    """Return the project's FunctionProtos of a converted model, by name."""
    return {function.name: function for function in proto.functions if function.domain == DOMAIN}


def function_closure(functions: dict[str, onnx.FunctionProto], name: str) -> list[onnx.FunctionProto]:
    """Return `name` and every function of the domain it calls, callees first."""
    ordered: dict[str, onnx.FunctionProto] = {}

    def calls(nodes):
        for node in nodes:
            if node.domain == DOMAIN:
                yield node.op_type
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from calls(attribute.g.node)

    def visit(function_name: str) -> None:
        if function_name in ordered:
            return
        if function_name not in functions:
            raise ValueError(f"function {function_name} is called but not found in the converted model; "
                             "convert the original model again")
        for callee in calls(functions[function_name].node):
            visit(callee)
        ordered[function_name] = functions[function_name]

    visit(name)
    return list(ordered.values())


def site_model(functions: dict[str, onnx.FunctionProto], function_name: str, dtype: np.dtype, rank: int,
               opset: int) -> onnx.ModelProto:
    """Build a model `Y = function_name(X)` for a float input of `dtype` and `rank` (symbolic sizes)."""
    elem_type = _NUMPY_TO_ONNX.get(np.dtype(dtype))
    if elem_type is None:
        raise ValueError(f"site input of type {dtype} is not supported; expected float32, float16 or float64")
    shape = [f"d{i}" for i in range(rank)]
    node = helper.make_node(function_name, ["X"], ["Y"], domain=DOMAIN, name="site")
    graph = helper.make_graph([node], "site", [helper.make_tensor_value_info("X", elem_type, shape)],
                              [helper.make_tensor_value_info("Y", elem_type, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                             functions=function_closure(functions, function_name), ir_version=10,
                             producer_name="onnx-spike")


def default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# ---------------------------------------------------------------- the counting evaluator


@dataclass
class SiteCounts:
    """Counts of one execution of a site function."""

    core: Counter = field(default_factory=Counter)
    interface: Counter = field(default_factory=Counter)
    op_types: Counter = field(default_factory=Counter)  # "core/Add" etc. -> elements processed
    other_ops: Counter = field(default_factory=Counter)  # op types outside the rules, costed as "logic"
    spikes: int = 0
    neuron_steps: int = 0
    loop_iterations: int = 0
    integer_products: int = 0

    def to_dict(self) -> dict:
        return {"core": {c: int(self.core[c]) for c in SPIKING_CATEGORIES},
                "interface": {c: int(self.interface[c]) for c in SPIKING_CATEGORIES},
                "moves": int(self.core["moves"] + self.interface["moves"]),
                "spikes": int(self.spikes), "neuron_steps": int(self.neuron_steps),
                "loop_iterations": int(self.loop_iterations), "integer_products": int(self.integer_products),
                "op_types": dict(sorted((k, int(v)) for k, v in self.op_types.items())),
                "other_ops": dict(self.other_ops)}


@dataclass(frozen=True)
class _NodeInfo:
    op_type: str
    function: str
    interface: bool
    in_loop: bool
    constant_inputs: tuple[bool, ...]
    doubling: bool  # Add(x, x): a left shift by one


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of |values| per element (numpy's bitwise_count takes the absolute value)."""
    values = np.asarray(values)
    if values.dtype == np.bool_:
        return values.astype(np.int64)
    return np.bitwise_count(values).astype(np.int64)


def _is_power_of_two(values: np.ndarray) -> bool:
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    mantissa, _ = np.frexp(magnitude)
    return magnitude.size > 0 and bool(np.all(mantissa == 0.5))


def _is_mask(values: np.ndarray) -> bool:
    values = np.asarray(values)
    return values.size > 0 and bool(np.all((values == 0) | (np.abs(values) == 1)))


class GatherElements(OpRun):  # onnx keys a replacement op by its class name
    """GatherElements for the reference evaluator.

    onnx's own implementation uses `numpy.choose`, which accepts at most 64 table entries, and
    the exponential's table has K + 2.
    """

    op_domain = ""

    def _run(self, data, indices, axis=None):
        axis = 0 if axis is None else axis
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


class _Evaluator(ReferenceEvaluator):
    """ReferenceEvaluator with `GatherElements`, also in the evaluators it builds for functions."""

    def __init__(self, proto, *args, new_ops=None, **kwargs):
        super().__init__(proto, *args, new_ops=[GatherElements, *(new_ops or [])], **kwargs)


class CountingEvaluator:
    """A ReferenceEvaluator of one site model whose nodes tally the counting rules as they run."""

    def __init__(self, model: onnx.ModelProto):
        self.evaluator = _Evaluator(model)
        self._counts = SiteCounts()
        self._loop_runs: dict[int, int] = {}
        self._instrument(self.evaluator, function="", constants=frozenset(), in_loop=False, seen=set())

    def run(self, x: np.ndarray) -> tuple[np.ndarray, SiteCounts]:
        self._counts = SiteCounts()
        (y,) = self.evaluator.run(None, {"X": x})
        return y, self._counts

    # ---- instrumentation

    def _instrument(self, evaluator, function: str, constants: frozenset, in_loop: bool, seen: set) -> None:
        proto = evaluator.proto_
        proto = proto.graph if isinstance(proto, onnx.ModelProto) else proto
        scope_constants = constants | {out for node in proto.node if node.op_type == "Constant" for out in node.output}
        for node in evaluator.rt_nodes_:
            if isinstance(node, OpFunction):
                impl = node.impl_
                if id(impl) not in seen:
                    seen.add(id(impl))
                    self._instrument(impl, impl.proto_.name, frozenset(), False, seen)
                continue
            if node.op_type == "Loop":
                self._instrument(node.body, function, scope_constants, True, seen)
                self._wrap_loop(node, function)
                continue
            inputs = list(node.onnx_node.input)
            info = _NodeInfo(node.op_type, function, is_boundary(function), in_loop,
                             tuple(name in scope_constants for name in inputs),
                             doubling=len(inputs) == 2 and inputs[0] == inputs[1])
            self._wrap_node(node, info)

    def _wrap_node(self, node, info: _NodeInfo) -> None:
        original = node.run

        def run(*args, **kwargs):
            outputs = original(*args, **kwargs)
            self._record(info, args, outputs)
            return outputs

        node.run = run

    def _wrap_loop(self, node, function: str) -> None:
        original_run = node.run
        original_body_run = node.body.run
        key = id(node)

        def body_run(*args, **kwargs):
            self._loop_runs[key] += 1
            return original_body_run(*args, **kwargs)

        def run(*args, **kwargs):
            trip_count = args[0]
            self._loop_runs[key] = 0
            outputs = original_run(*args, **kwargs)
            iterations = self._loop_runs.pop(key)
            expected = None if trip_count is None or np.size(trip_count) == 0 else int(trip_count)
            if expected is None or iterations != expected:
                raise RuntimeError(f"Loop {node.onnx_node.name!r} in {function} ran {iterations} iterations in the "
                                   f"reference evaluator, not its trip count {expected}; the counts would be wrong")
            self._counts.loop_iterations += iterations
            return outputs

        node.body.run = body_run
        node.run = run

    def _record(self, info: _NodeInfo, inputs, outputs) -> None:
        counts = self._counts
        tally = counts.interface if info.interface else counts.core
        op = info.op_type
        output = outputs[0]
        size = int(np.size(output))
        scope = "interface" if info.interface else "core"

        if op in _MOVE_OPS:
            category, amount = "moves", size
        elif op == "Add" and info.doubling:
            category, amount = "shift", size
        elif op in _ADD_OPS:
            category, amount = "add", size
        elif op in _COMPARE_OPS:
            category, amount = "compare", size
        elif op in _REDUCE_OPS:
            category, amount = _REDUCE_OPS[op], int(np.size(inputs[0])) - size
        elif op == "Clip":
            bounds = sum(1 for value in inputs[1:] if value is not None and np.size(value) > 0)
            category, amount = "compare", size * bounds
        elif op == "BitShift":
            category, amount = "shift", size
        elif op in ("Gather", "GatherElements"):
            category, amount = "lut", size
        elif op in _LOGIC_OPS:
            category, amount = "logic", size
        elif op == "Mul":
            category, amount = self._product(info, inputs, output)
        else:
            counts.other_ops[op] += size
            category, amount = "logic", size
        tally[category] += amount
        counts.op_types[f"{scope}/{op}"] += int(np.size(inputs[0])) if op in _REDUCE_OPS else size

        if op == "GreaterOrEqual" and info.in_loop:
            counts.spikes += int(np.count_nonzero(output))
            counts.neuron_steps += size

    def _product(self, info: _NodeInfo, inputs, output) -> tuple[str, int]:
        size = int(np.size(output))
        a, b = inputs
        constant = next((value for value, is_constant in zip(inputs, info.constant_inputs) if is_constant), None)
        if np.issubdtype(np.asarray(output).dtype, np.integer):
            self._counts.integer_products += size
            if constant is not None:
                cost = np.broadcast_to(_popcount(constant), np.shape(output))
            else:
                cost = np.broadcast_to(np.minimum(_popcount(a), _popcount(b)), np.shape(output))
            return "mul_shift_add", int(cost.sum())
        if constant is not None and np.all(np.asarray(constant) == 0):
            return "logic", size
        if constant is not None and _is_power_of_two(constant):
            return "shift", size
        if _is_mask(a) or _is_mask(b):
            return "logic", size
        return "float_mul", size


# ---------------------------------------------------------------- float model and energy


def float_op_counts(kind: str, shape: tuple[int, ...]) -> dict[str, int]:
    """Count the operations of the float op a site replaced, on an input of `shape` (the model in the
    module docstring)."""
    elements = int(np.prod(shape))
    dim = int(shape[-1]) if shape else 1
    rows = elements // max(dim, 1)
    counts = {"additions": 0, "multiplies": 0, "macs": 0, "exp": 0, "division": 0, "sqrt": 0, "erf_or_tanh": 0}
    if kind == "softmax":
        counts.update(exp=elements, additions=elements, division=elements)
    elif kind == "silu":
        counts.update(exp=elements, division=elements, multiplies=elements)
    elif kind == "gelu":
        counts.update(erf_or_tanh=elements, multiplies=3 * elements)
    elif kind == "rmsnorm":
        counts.update(macs=elements, sqrt=rows, division=rows, multiplies=elements)
    elif kind == "layernorm":
        counts.update(macs=elements, sqrt=rows, division=rows, multiplies=elements + rows, additions=2 * elements)
    else:
        raise ValueError(f"unknown site kind {kind!r}")
    return counts


def float_energy_pj(counts: dict[str, int]) -> dict[str, float]:
    arithmetic = counts["additions"] * ENERGY_AC_PJ + (counts["multiplies"] + counts["macs"]) * ENERGY_MAC_PJ
    special = sum(counts[name] for name in SPECIAL_FUNCTIONS) * SPECIAL_FUNCTION_MACS * ENERGY_MAC_PJ
    return {"arithmetic": arithmetic, "special": special, "total": arithmetic + special}


def spiking_energy_pj(counts: dict) -> dict[str, float]:
    """Cost the counted ops: core (the integer operator) and interface (Encode, Decode)."""
    energy = {}
    for scope in ("core", "interface"):
        tally = counts[scope]
        energy[scope] = (sum(tally[c] for c in AC_CATEGORIES) * ENERGY_AC_PJ + tally["float_mul"] * ENERGY_MAC_PJ)
    energy["total"] = energy["core"] + energy["interface"]
    return energy


# ---------------------------------------------------------------- the report


def _sample(sites: list[dict], per_kind: int | None) -> list[dict]:
    """Pick up to `per_kind` sites of each kind, spread evenly over the model's order."""
    if not per_kind:
        return list(sites)
    chosen = []
    for kind in dict.fromkeys(site["kind"] for site in sites):
        of_kind = [site for site in sites if site["kind"] == kind]
        picks = np.unique(np.linspace(0, len(of_kind) - 1, min(per_kind, len(of_kind))).round().astype(int))
        chosen += [of_kind[i] for i in picks]
    return chosen


class SiteRunner:
    """Runs site functions of a converted model in the counting evaluator and in onnxruntime."""

    def __init__(self, converted: str | os.PathLike, threads: int | None = None):
        proto = onnx.load(str(model_file(converted)), load_external_data=False)
        self.functions = model_functions(proto)
        self.opset = default_opset(proto)
        self.threads = threads
        self._evaluators: dict[tuple, CountingEvaluator] = {}
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    def _model(self, function: str, x: np.ndarray) -> onnx.ModelProto:
        return site_model(self.functions, function, x.dtype, x.ndim, self.opset)

    def session(self, function: str, x: np.ndarray) -> ort.InferenceSession:
        key = (function, x.dtype.str, x.ndim)
        if key not in self._sessions:
            self._sessions[key] = ort.InferenceSession(self._model(function, x).SerializeToString(),
                                                       session_options(self.threads),
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def evaluator(self, function: str, x: np.ndarray) -> CountingEvaluator:
        key = (function, x.dtype.str, x.ndim)
        if key not in self._evaluators:
            self._evaluators[key] = CountingEvaluator(self._model(function, x))
        return self._evaluators[key]

    def run_onnxruntime(self, function: str, x: np.ndarray) -> np.ndarray:
        return self.session(function, x).run(None, {"X": x})[0]

    def measure(self, site: dict, x: np.ndarray) -> dict:
        """Count the ops of one site on its input `x`, cost them, and check the output bit for bit."""
        y_reference, counts = self.evaluator(site["function"], x).run(x)
        y_runtime = self.run_onnxruntime(site["function"], x)
        bit_exact = (y_reference.dtype == y_runtime.dtype and y_reference.shape == y_runtime.shape
                     and y_reference.tobytes() == y_runtime.tobytes())
        spiking = counts.to_dict()
        floats = float_op_counts(site["kind"], x.shape)
        energy = spiking_energy_pj(spiking)
        float_energy = float_energy_pj(floats)
        return {"name": site["name"], "kind": site["kind"], "layer": site.get("layer"), "function": site["function"],
                "shape": list(x.shape), "elements": int(x.size), "bit_exact": bool(bit_exact),
                "spiking": spiking, "spiking_energy_pj": energy, "float": floats, "float_energy_pj": float_energy,
                "energy_ratio": float_energy["total"] / energy["total"] if energy["total"] else math.inf}



def _add_into(total: dict, entry: dict, scale: float = 1.0) -> None:
    for key, value in entry.items():
        if isinstance(value, dict):
            _add_into(total.setdefault(key, {}), value, scale)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value * scale


def _kind_totals(measured: list[dict], counts_by_kind: dict[str, int]) -> dict[str, dict]:
    """Sum the measured sites per kind, and scale each sum to every site of the kind."""
    totals = {}
    for kind, site_count in counts_by_kind.items():
        entries = [entry for entry in measured if entry["kind"] == kind]
        summed: dict = {}
        for entry in entries:
            _add_into(summed, {key: entry[key] for key in ("elements", "spiking", "spiking_energy_pj", "float",
                                                            "float_energy_pj")})
        factor = site_count / len(entries) if entries else 0.0
        scaled: dict = {}
        _add_into(scaled, summed, factor)
        totals[kind] = {"sites": site_count, "measured_sites": len(entries), "scale": factor,
                        "measured": summed, "estimated": scaled}
    return totals


def energy_report(original: str | os.PathLike, converted: str | os.PathLike, tokens: np.ndarray,
                  sites_per_kind: int | None = None, threads: int | None = None, progress: bool = True) -> dict:
    """Measure every site (or `sites_per_kind` of each kind) on one token window of `tokens`.

    Returns per-site entries, per-kind sums and an estimated total over all sites. A kind with
    unmeasured sites is scaled by (its sites) / (its measured sites), so the mean of its
    measured sites stands for the others.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
    sites = spiking_sites(converted)
    chosen = _sample(sites, sites_per_kind)
    probe = SiteProbe(original, chosen, threads)
    try:
        names = sorted({site["input"] for site in probe.sites})
        values = dict(zip(names, probe.session.run(names, window_feeds(probe.session, tokens))))
        probed = probe.sites
    finally:
        probe.close()
    unprobed = [site["name"] for site in chosen if site not in probed]

    runner = SiteRunner(converted, threads)
    measured = []
    for site in tqdm(probed, desc="count site ops", disable=not progress):
        measured.append(runner.measure(site, values[site["input"]]))
    if not all(entry["bit_exact"] for entry in measured):
        failed = [entry["name"] for entry in measured if not entry["bit_exact"]]
        raise RuntimeError(f"the reference evaluator and onnxruntime disagree on {len(failed)} sites "
                           f"(first: {failed[0]}); the counts do not describe onnxruntime's execution")

    counts_by_kind = Counter(site["kind"] for site in sites)
    kinds = _kind_totals(measured, dict(counts_by_kind))
    total: dict = {}
    for entry in kinds.values():
        _add_into(total, entry["estimated"])
    spiking_pj = total.get("spiking_energy_pj", {}).get("total", 0.0)
    float_pj = total.get("float_energy_pj", {}).get("total", 0.0)
    return {
        "original": str(original), "converted": str(converted), "tokens": int(tokens.shape[1]),
        "constants": {"accumulate_pj": ENERGY_AC_PJ, "mac_pj": ENERGY_MAC_PJ,
                      "special_function_macs": SPECIAL_FUNCTION_MACS},
        "sites_total": len(sites), "sites_measured": len(measured), "sites_not_probed": unprobed,
        "extrapolation": ("per kind, the sum over measured sites times (sites of the kind) / (measured sites "
                          "of the kind)"),
        "sites": measured, "kinds": kinds, "total": total,
        "energy_ratio": float_pj / spiking_pj if spiking_pj else math.inf,
    }


# ---------------------------------------------------------------- rendering


def _format_count(value: float) -> str:
    value = float(value)
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.0f}"


def render_energy(report: dict, max_sites: int = 200) -> str:
    """Render the report as a table: per site, per kind and in total."""
    columns = ("add", "compare", "shift", "lut", "logic", "mul_shift_add")
    labels = ("add", "compare", "shift", "lut", "logic", "mul")
    header = (f"{'site':<56} {'elements':>9} " + " ".join(f"{label:>8}" for label in labels)
              + f" {'spikes':>8} {'rate':>6} {'spiking uJ':>10} {'float uJ':>9} {'ratio':>6}")

    def row(label: str, elements: float, spiking: dict, energy: dict, float_energy: dict) -> str:
        core, interface = spiking["core"], spiking["interface"]
        cells = " ".join(f"{_format_count(core.get(c, 0) + interface.get(c, 0)):>8}" for c in columns)
        steps = spiking.get("neuron_steps", 0)
        rate = spiking.get("spikes", 0) / steps if steps else 0.0
        ratio = float_energy["total"] / energy["total"] if energy["total"] else math.inf
        return (f"{label[-56:]:<56} {_format_count(elements):>9} {cells} {_format_count(spiking.get('spikes', 0)):>8} "
                f"{rate:>6.3f} {energy['total'] * 1e-6:>10.3f} {float_energy['total'] * 1e-6:>9.3f} {ratio:>6.2f}")

    constants = report["constants"]
    lines = [f"Operation counts and energy estimate of {report['converted']} on one window of "
             f"{report['tokens']} tokens ({report['sites_measured']} of {report['sites_total']} sites measured)",
             "Columns: operations of the core and the interface (Encode, Decode) together; mul counts the "
             "shift-and-add accumulates of integer products; rate = spikes per neuron step; ratio = float energy "
             "/ spiking energy.", "", header]
    for entry in report["sites"][:max_sites]:
        lines.append(row(entry["name"], entry["elements"], entry["spiking"], entry["spiking_energy_pj"],
                         entry["float_energy_pj"]))
    if len(report["sites"]) > max_sites:
        lines.append(f"... {len(report['sites']) - max_sites} more sites in the JSON")
    lines += ["", "Per kind (all sites; a kind with unmeasured sites is scaled from its measured ones)", header]
    for kind, entry in report["kinds"].items():
        if not entry["measured_sites"]:
            lines.append(f"{kind:<56} no site measured")
            continue
        estimated = entry["estimated"]
        label = f"{kind} ({entry['measured_sites']}/{entry['sites']} sites, x{entry['scale']:.3g})"
        lines.append(row(label, estimated["elements"], estimated["spiking"], estimated["spiking_energy_pj"],
                         estimated["float_energy_pj"]))
    total = report["total"]
    if total:
        lines.append(row("total", total["elements"], total["spiking"], total["spiking_energy_pj"],
                         total["float_energy_pj"]))
        floats = total["float"]
        lines += ["", f"float ops replaced: {_format_count(floats['additions'])} additions, "
                      f"{_format_count(floats['multiplies'] + floats['macs'])} multiplies or MACs, "
                      f"{_format_count(floats['exp'])} exp, {_format_count(floats['division'])} divisions, "
                      f"{_format_count(floats['sqrt'])} square roots, {_format_count(floats['erf_or_tanh'])} erf/tanh",
                  f"spiking energy: core {total['spiking_energy_pj']['core'] * 1e-6:.3f} uJ, interface (Encode, "
                  f"Decode) {total['spiking_energy_pj']['interface'] * 1e-6:.3f} uJ; float energy: arithmetic "
                  f"{total['float_energy_pj']['arithmetic'] * 1e-6:.3f} uJ, special functions "
                  f"{total['float_energy_pj']['special'] * 1e-6:.3f} uJ"]
    if report["sites_not_probed"]:
        lines.append(f"not measured (input not a value of the original model): {len(report['sites_not_probed'])} "
                     "sites, scaled like unmeasured sites of their kind")
    lines += ["", f"Estimate, not a measurement: {constants['accumulate_pj']} pJ per accumulate and "
                  f"{constants['mac_pj']} pJ per MAC (45 nm, Horowitz ISSCC 2014); every counted spiking op is one "
                  f"accumulate, an integer product costs popcount shift-and-adds, a special function "
                  f"{constants['special_function_macs']} MACs; memory traffic not costed. Rules: docs/energy.md."]
    return "\n".join(lines)
