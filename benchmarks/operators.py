"""Time the spiking operators against the native float ops in onnxruntime on the CPU.

Each spiking operator (both precision presets) runs as a standalone model
(`onnx_spike.operators.operator_model`) next to the float op that an exporter writes for it.
The shapes are those of SmolLM2-135M: attention scores [1, 9, 128, 128] and
[1, 9, 1024, 1024] for Softmax, hidden states [1, 128, 576] for the norms, and MLP
activations [1, 128, 1536] for SiLU and GELU. All sessions run in one process with the same
thread count. For each case the
script records the median and minimum wall time of several runs and the minimum thread CPU
time of a one-thread session, which other processes on the machine disturb less. It also
records the ratios to the native op, the error of both against the exact op in float64 on the
same input, and a per-op-type breakdown of the spiking operator from onnxruntime's profiler.

Usage:
    python benchmarks/operators.py --output results.json [--skip-large] [--threads 2] [--forms loop fast]
        [--op-costs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import onnx_spike
from onnx_spike import reference
from onnx_spike.operators import operator_model
from onnx_spike.precision import preset

EPSILON = 1e-5

# (kind, shape, input scale): SmolLM2-135M has 9 heads, hidden size 576 and MLP size 1536.
CASES = [
    ("softmax", (1, 9, 128, 128), 3.0),
    ("softmax", (1, 9, 1024, 1024), 3.0),
    ("silu", (1, 128, 1536), 3.0),
    ("gelu", (1, 128, 1536), 3.0),
    ("rmsnorm", (1, 128, 576), 1.0),
    ("layernorm", (1, 128, 576), 1.0),
]
LARGE_ELEMENTS = 1 << 22

EXACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "softmax": reference.softmax,
    "silu": reference.silu,
    "gelu": reference.gelu_erf,
    "rmsnorm": lambda x: reference.rms_norm(x, EPSILON),
    "layernorm": lambda x: reference.layer_norm(x, EPSILON),
}

NATIVE_DESCRIPTION = {
    "softmax": "Softmax",
    "silu": "Sigmoid + Mul",
    "gelu": "Erf GELU (5 ops)",
    "rmsnorm": "decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Div, Mul)",
    "layernorm": "LayerNormalization",
}


def native_model(kind: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """Build the float op as an exporter writes it (opset 18), without weight or bias."""
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, list(shape))

    def const(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name],
                                value=helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))

    if kind == "softmax":
        nodes = [helper.make_node("Softmax", ["X"], ["Y"], axis=-1)]
    elif kind == "silu":
        nodes = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
    elif kind == "gelu":
        nodes = [const("r2", 2**-0.5), const("one", 1.0), const("half", 0.5),
                 helper.make_node("Mul", ["X", "r2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["b"]), helper.make_node("Mul", ["X", "b"], ["c"]),
                 helper.make_node("Mul", ["c", "half"], ["Y"])]
    elif kind == "rmsnorm":
        axes = helper.make_node("Constant", [], ["axes"],
                                value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1]))
        nodes = [const("two", 2.0), const("eps", EPSILON), const("one", 1.0), axes,
                 helper.make_node("Pow", ["X", "two"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["X", "inv"], ["Y"])]
    elif kind == "layernorm":
        dim = shape[-1]
        weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [dim], [1.0] * dim)
        bias = helper.make_tensor("b", onnx.TensorProto.FLOAT, [dim], [0.0] * dim)
        nodes = [helper.make_node("Constant", [], ["w"], value=weight),
                 helper.make_node("Constant", [], ["b"], value=bias),
                 helper.make_node("LayerNormalization", ["X", "w", "b"], ["Y"], axis=-1, epsilon=EPSILON)]
    else:
        raise ValueError(f"unknown operator kind {kind!r}")
    graph = helper.make_graph(nodes, f"native_{kind}", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def session_options(threads: int, profile_prefix: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def make_session(model: onnx.ModelProto, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, profile_prefix),
                                providers=["CPUExecutionProvider"])


def time_session(session: ort.InferenceSession, x: np.ndarray, repeats: int, warmup: int) -> dict:
    """Time `session.run`: median and minimum wall time in milliseconds after `warmup` runs."""
    feed = {"X": x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}


def cpu_time_session(model: onnx.ModelProto, x: np.ndarray, repeats: int, warmup: int) -> dict:
    """Time `session.run` in thread CPU milliseconds on one intra-op thread without spinning.

    The calling thread does all the work, so its CPU time is the op's cost, and other
    processes on the machine inflate it far less than the wall time (memory and cache
    contention remain).
    """
    options = session_options(1)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"X": x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        session.run(None, feed)
        times.append((time.thread_time() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}


def profile_breakdown(model: onnx.ModelProto, x: np.ndarray, threads: int, runs: int, warmup: int) -> dict:
    """Sum the kernel time per op type and per ONNX function (ms per call) from onnxruntime's profiler.

    The session runs `warmup + runs` times and only the last `runs` calls count: the first
    calls grow the memory arena and take several times longer. Worker threads do not spin, so
    that busy-waiting shows in no node's time. A node inside a Loop body is
    counted under its own op type, and the Loop row keeps only the Loop's own time (its wall
    time minus the nodes it ran). The profiler adds a few microseconds per node, so the total
    exceeds the timed median, most for graphs with many small nodes.
    """
    with tempfile.TemporaryDirectory() as folder:
        options = session_options(threads, os.path.join(folder, "profile"))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, {"X": x})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)

    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and any(low <= e["ts"] < high for low, high in windows)]
    loops = [(e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"].get("op_name") == "Loop"]

    per_type: dict[str, float] = defaultdict(float)
    per_function: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in nodes:
        op_type = event["args"].get("op_name", "?")
        duration = event["dur"] / 1e3 / runs
        inside_loop = any(low < event["ts"] < high for low, high in loops)
        if op_type == "Loop":
            duration -= sum(e["dur"] for e in nodes if event["ts"] < e["ts"] < event["ts"] + event["dur"]
                            and e["args"].get("op_name") != "Loop") / 1e3 / runs
            if inside_loop:
                continue  # a nested Loop's own time stays in the outer Loop's row
        per_type[op_type] += duration
        counts[op_type] += 1
        # onnxruntime names an inlined node after the functions around it: _inlfunc_<Name>_<hash>...
        functions = re.findall(r"_inlfunc_([A-Za-z0-9]+?)_[0-9a-f]{8}", event["name"])
        per_function[functions[-1] if functions else "(graph)"] += duration

    ordered = sorted(per_type.items(), key=lambda item: -item[1])
    return {"ms_per_call": {op: round(ms, 4) for op, ms in ordered},
            "nodes_per_call": {op: counts[op] // runs for op, _ in ordered},
            "ms_per_call_by_function": {name: round(ms, 4) for name, ms in
                                        sorted(per_function.items(), key=lambda item: -item[1])},
            "total_kernel_ms": round(sum(per_type.values()), 4)}


OP_COST_ELEMENTS = 147456  # one [1, 9, 128, 128] attention score tensor

# (label, op type, input type, second input: "tensor", "scalar" or None, attributes)
OP_COSTS = [
    ("Add int32", "Add", "int32", "tensor", {}),
    ("Add int64", "Add", "int64", "tensor", {}),
    ("Add uint32", "Add", "uint32", "tensor", {}),
    ("Add uint64", "Add", "uint64", "tensor", {}),
    ("Mul int32", "Mul", "int32", "tensor", {}),
    ("Mul int64", "Mul", "int64", "tensor", {}),
    ("Mul uint64", "Mul", "uint64", "tensor", {}),
    ("GreaterOrEqual int32", "GreaterOrEqual", "int32", "tensor", {}),
    ("GreaterOrEqual int64", "GreaterOrEqual", "int64", "tensor", {}),
    ("BitShift uint32 by a constant", "BitShift", "uint32", "scalar", {"direction": "RIGHT"}),
    ("BitShift uint64 by a constant", "BitShift", "uint64", "scalar", {"direction": "RIGHT"}),
    ("Cast int64 -> uint64", "Cast", "int64", None, {"to": onnx.TensorProto.UINT64}),
    ("Cast bool -> int32", "Cast", "bool", None, {"to": onnx.TensorProto.INT32}),
    ("Where int32", "Where", "int32", "tensor", {}),
    ("Gather int64 from 1026 entries", "Gather", "int32", None, {}),
    ("GatherElements int64 from 1026 entries", "GatherElements", "int32", None, {}),
]


def op_costs(repeats: int) -> dict:
    """Time single ops on OP_COST_ELEMENTS elements: minimum thread CPU time in ms.

    Each op runs on one intra-op thread without spinning, so the calling thread's CPU time is
    the op's cost, and other processes on the machine disturb it little.
    """
    numpy_types = {"int32": np.int32, "int64": np.int64, "uint32": np.uint32, "uint64": np.uint64,
                   "bool": np.bool_}
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(np.arange(1026, dtype=np.int64), "table")
    results = {}
    for label, op_type, input_type, second, attrs in OP_COSTS:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(numpy_types[input_type]))
        shape = [OP_COST_ELEMENTS]
        if op_type in ("Gather", "GatherElements"):
            feed = {"X": rng.integers(0, 1026, OP_COST_ELEMENTS).astype(np.int32)}
            nodes = [helper.make_node("Constant", [], ["T"], value=table), helper.make_node(op_type, ["T", "X"], ["Y"])]
            inputs = [helper.make_tensor_value_info("X", elem, shape)]
        elif op_type == "Where":
            feed = {"C": rng.random(OP_COST_ELEMENTS) < 0.5,
                    "X": rng.integers(0, 1000, OP_COST_ELEMENTS).astype(np.int32),
                    "Z": rng.integers(0, 1000, OP_COST_ELEMENTS).astype(np.int32)}
            nodes = [helper.make_node("Where", ["C", "X", "Z"], ["Y"])]
            inputs = [helper.make_tensor_value_info("C", onnx.TensorProto.BOOL, shape),
                      helper.make_tensor_value_info("X", elem, shape), helper.make_tensor_value_info("Z", elem, shape)]
        else:
            values = rng.integers(0, 2, OP_COST_ELEMENTS) if input_type == "bool" else rng.integers(1, 1000, OP_COST_ELEMENTS)
            feed = {"X": values.astype(numpy_types[input_type])}
            inputs = [helper.make_tensor_value_info("X", elem, shape)]
            names = ["X"]
            nodes = []
            if second == "tensor":
                feed["Z"] = rng.integers(1, 1000, OP_COST_ELEMENTS).astype(numpy_types[input_type])
                inputs.append(helper.make_tensor_value_info("Z", elem, shape))
                names.append("Z")
            elif second == "scalar":
                constant = numpy_helper.from_array(np.array(3, dtype=numpy_types[input_type]), "K")
                nodes.append(helper.make_node("Constant", [], ["K"], value=constant))
                names.append("K")
            nodes.append(helper.make_node(op_type, names, ["Y"], **attrs))
        if op_type == "GreaterOrEqual":
            output_type = onnx.TensorProto.BOOL
        elif op_type == "Cast":
            output_type = attrs["to"]
        elif op_type in ("Gather", "GatherElements"):
            output_type = onnx.TensorProto.INT64
        else:
            output_type = elem
        output = helper.make_tensor_value_info("Y", output_type, shape)
        model = helper.make_model(helper.make_graph(nodes, "op", inputs, [output]),
                                  opset_imports=[helper.make_opsetid("", 18)])
        options = session_options(1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            session.run(None, feed)
            times.append((time.thread_time() - start) * 1e3)
        results[label] = round(min(times), 4)
        print(f"  {label:42s} {results[label]:7.3f} ms", flush=True)
    return {"elements": OP_COST_ELEMENTS, "threads": 1, "ms": results}


def errors(output: np.ndarray, exact: np.ndarray) -> dict:
    error = np.abs(output.astype(np.float64) - exact)
    return {"mean": float(error.mean()), "max": float(error.max())}


def make_input(kind: str, shape: tuple[int, ...], scale: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def machine() -> dict:
    info = {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "onnx_spike": os.path.dirname(onnx_spike.__file__),
            "load_average": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket"):
            info[key.strip()] = value.strip()
    return info


def run_case(kind: str, shape: tuple[int, ...], scale: float, presets: list[str], args) -> list[dict]:
    x = make_input(kind, shape, scale, seed=sum(shape))
    exact = EXACT[kind](x)
    native_model_proto = native_model(kind, shape)
    native = make_session(native_model_proto, args.threads)
    native_time = time_session(native, x, args.repeats, args.warmup)
    native_cpu = cpu_time_session(native_model_proto, x, args.repeats, args.warmup)
    native_errors = errors(native.run(None, {"X": x})[0], exact)

    rows = []
    for preset_name, form in [(p, f) for p in presets for f in args.forms]:
        model = operator_model(kind, preset(preset_name), list(shape), epsilon=EPSILON, form=form)
        large = x.size >= LARGE_ELEMENTS
        spiking = make_session(model, args.threads)
        started = time.perf_counter()
        output = spiking.run(None, {"X": x})[0]
        first_ms = (time.perf_counter() - started) * 1e3
        repeats = max(3, args.repeats // 4) if large else args.repeats
        spiking_time = time_session(spiking, x, repeats, 1 if large else args.warmup)
        spiking_cpu = cpu_time_session(model, x, 2 if large else args.repeats, 1 if large else args.warmup)
        row = {
            "kind": kind, "shape": list(shape), "preset": preset_name, "form": form,
            "native_op": NATIVE_DESCRIPTION[kind],
            "native": native_time, "spiking": spiking_time, "spiking_first_run_ms": first_ms,
            "native_cpu_1thread": native_cpu, "spiking_cpu_1thread": spiking_cpu,
            "ratio": spiking_time["median_ms"] / native_time["median_ms"],
            "cpu_ratio": spiking_cpu["min_ms"] / native_cpu["min_ms"],
            "native_error": native_errors, "spiking_error": errors(output, exact),
        }
        if args.profile and not large:
            row["profile"] = profile_breakdown(model, x, args.profile_threads, args.profile_runs, args.warmup)
        rows.append(row)
        print(f"  {kind:9s} {str(list(shape)):20s} {preset_name:7s} {form:4s} spiking {spiking_time['median_ms']:9.2f} ms"
              f"  native {native_time['median_ms']:7.3f} ms  ratio {row['ratio']:8.1f}"
              f"  (1-thread CPU: {spiking_cpu['min_ms']:9.2f} / {native_cpu['min_ms']:7.3f} ms)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'operator':9s} {'shape':20s} {'preset':7s} {'form':4s} {'spiking ms':>11s} {'native ms':>10s} "
              f"{'ratio':>8s} {'cpu1 ms':>9s} {'cpu1 ratio':>10s} {'mean err':>9s} {'max err':>9s} "
              f"{'native max':>10s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['kind']:9s} {str(row['shape']):20s} {row['preset']:7s} {row['form']:4s} "
              f"{row['spiking']['median_ms']:11.2f} {row['native']['median_ms']:10.3f} {row['ratio']:8.1f} "
              f"{row['spiking_cpu_1thread']['min_ms']:9.2f} {row['cpu_ratio']:10.1f} "
              f"{row['spiking_error']['mean']:9.2e} {row['spiking_error']['max']:9.2e} "
              f"{row['native_error']['max']:10.2e}")
    for row in rows:
        profile = row.get("profile")
        if not profile:
            continue
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile["ms_per_call"].items())[:6])
        print(f"{row['kind']} {row['preset']} {row['form']} {row['shape']}: {top} (ms per call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSON file to write")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per session (default 20; "
                        "a quarter of that, at least 3, for the [1, 9, 1024, 1024] scores)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--presets", nargs="+", default=["default", "paper"], help="precision presets to run")
    parser.add_argument("--forms", nargs="+", default=["loop", "fast"], choices=["loop", "fast"],
                        help="execution forms to run (default: both)")
    parser.add_argument("--kinds", nargs="+", default=sorted(set(kind for kind, _, _ in CASES)),
                        help="operator kinds to run (default: all)")
    parser.add_argument("--skip-large", action="store_true",
                        help="skip the [1, 9, 1024, 1024] attention scores (up to seconds per call)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the onnxruntime profiler breakdown")
    parser.add_argument("--profile-runs", type=int, default=5, help="runs averaged in the profile (default 5)")
    parser.add_argument("--profile-threads", type=int, default=1,
                        help="onnxruntime intra-op threads of the profiled session (default 1: the kernel "
                             "times then add up to the CPU time and vary less when the machine is shared)")
    parser.add_argument("--op-costs", action="store_true",
                        help="also time single ops (Add, Mul, Where, Gather, ...) on 147456 elements, one thread")
    args = parser.parse_args()

    info = machine()
    print(f"onnxruntime {info['onnxruntime']}, {info.get('Model name', '?')}, {args.threads} threads", flush=True)
    rows = []
    for kind, shape, scale in CASES:
        if kind not in args.kinds:
            continue
        if args.skip_large and np.prod(shape) >= LARGE_ELEMENTS:
            continue
        rows.extend(run_case(kind, shape, scale, args.presets, args))

    result = {"machine": info, "threads": args.threads, "profile_threads": args.profile_threads,
              "repeats": args.repeats, "warmup": args.warmup, "rows": rows}
    if args.op_costs:
        print("single ops, thread CPU time (min):", flush=True)
        result["op_costs"] = op_costs(max(args.repeats, 20))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
