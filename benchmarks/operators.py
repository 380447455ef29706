"""Time the spiking operators against the native float ops in onnxruntime on the CPU.

Each spiking operator (both precision presets) runs as a standalone model
(`onnx_spike.operators.operator_model`) next to the float op that an exporter writes for it,
at the shapes of SmolLM2-135M: attention scores [1, 9, 128, 128] and [1, 9, 1024, 1024] for
Softmax, hidden states [1, 128, 576] for the norms, MLP activations [1, 128, 1536] for SiLU
and GELU. All sessions run in one process with the same thread count. For each case the
script records the median and minimum wall time of several runs, the ratio to the native
op, the error of both against the exact op in float64 on the same input, and a per-op-type
breakdown of the spiking operator from onnxruntime's profiler.

Usage:
    python benchmarks/operators.py --output results.json [--skip-large] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

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
    """The float op as an exporter writes it (opset 18), without weight or bias."""
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
    """Median and minimum wall time of `session.run` in milliseconds, after `warmup` runs."""
    feed = {"X": x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeats}


def profile_breakdown(model: onnx.ModelProto, x: np.ndarray, threads: int, runs: int) -> dict:
    """Kernel time per op type, in ms per call, from onnxruntime's profiler over `runs` calls.

    Nodes inside Loop bodies are reported under their own op type; the Loop row keeps only
    its own time (the wall time of the Loop minus the time of the nodes it ran).
    """
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(model, threads, os.path.join(folder, "profile"))
        session.run(None, {"X": x})  # the first run allocates; keep it out of the profile
        session.end_profiling()
        session = make_session(model, threads, os.path.join(folder, "profile"))
        for _ in range(runs):
            session.run(None, {"X": x})
        path = session.end_profiling()
        with open(path) as handle:
            events = json.load(handle)

    per_type: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op_type = event.get("args", {}).get("op_name", "?")
        per_type[op_type] += event["dur"] / 1e3 / runs
        calls[op_type] += 1
    inner = sum(ms for op_type, ms in per_type.items() if op_type != "Loop")
    if "Loop" in per_type:
        # Loop kernel time includes its body; keep the Loop's own overhead only.
        per_type["Loop"] = max(per_type["Loop"] - inner_loop_time(events, runs), 0.0)
    ordered = sorted(per_type.items(), key=lambda item: -item[1])
    return {"ms_per_call": {op: round(ms, 4) for op, ms in ordered},
            "nodes_per_call": {op: calls[op] // runs for op, _ in ordered},
            "total_kernel_ms": round(inner + per_type.get("Loop", 0.0), 4)}


def inner_loop_time(events: list[dict], runs: int) -> float:
    """Kernel time in ms per call of the nodes that ran inside Loop bodies.

    onnxruntime names the kernel events of a subgraph node after the node, and the builder
    prefixes every Loop body node with its loop's name hint and an underscore, so the nodes
    that run inside a Loop are the ones whose event timestamps fall inside a Loop event.
    """
    loops = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "Loop"
             and e.get("name", "").endswith("_kernel_time")]
    loops.sort()
    total = 0.0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event.get("args", {}).get("op_name") == "Loop":
            continue
        start = event["ts"]
        if any(low <= start < high for low, high in loops):
            total += event["dur"]
    return total / 1e3 / runs


def errors(output: np.ndarray, exact: np.ndarray) -> dict:
    error = np.abs(output.astype(np.float64) - exact)
    return {"mean": float(error.mean()), "max": float(error.max())}


def make_input(kind: str, shape: tuple[int, ...], scale: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def machine() -> dict:
    info = {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "cpu_count": os.cpu_count()}
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
    native = make_session(native_model(kind, shape), args.threads)
    native_time = time_session(native, x, args.repeats, args.warmup)
    native_errors = errors(native.run(None, {"X": x})[0], exact)

    rows = []
    for preset_name in presets:
        model = operator_model(kind, preset(preset_name), list(shape), epsilon=EPSILON)
        large = x.size >= LARGE_ELEMENTS
        spiking = make_session(model, args.threads)
        started = time.perf_counter()
        output = spiking.run(None, {"X": x})[0]
        first_ms = (time.perf_counter() - started) * 1e3
        repeats = max(3, args.repeats // 4) if large else args.repeats
        spiking_time = time_session(spiking, x, repeats, 1 if large else args.warmup)
        row = {
            "kind": kind, "shape": list(shape), "preset": preset_name,
            "native_op": NATIVE_DESCRIPTION[kind],
            "native": native_time, "spiking": spiking_time, "spiking_first_run_ms": first_ms,
            "ratio": spiking_time["median_ms"] / native_time["median_ms"],
            "native_error": native_errors, "spiking_error": errors(output, exact),
        }
        if args.profile and not large:
            row["profile"] = profile_breakdown(model, x, args.threads, args.profile_runs)
        rows.append(row)
        print(f"  {kind:9s} {str(list(shape)):20s} {preset_name:7s} spiking {spiking_time['median_ms']:9.2f} ms"
              f"  native {native_time['median_ms']:7.3f} ms  ratio {row['ratio']:8.1f}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'operator':9s} {'shape':20s} {'preset':7s} {'spiking ms':>11s} {'native ms':>10s} "
              f"{'ratio':>8s} {'mean err':>9s} {'max err':>9s} {'native max':>10s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['kind']:9s} {str(row['shape']):20s} {row['preset']:7s} "
              f"{row['spiking']['median_ms']:11.2f} {row['native']['median_ms']:10.3f} {row['ratio']:8.1f} "
              f"{row['spiking_error']['mean']:9.2e} {row['spiking_error']['max']:9.2e} "
              f"{row['native_error']['max']:10.2e}")
    for row in rows:
        profile = row.get("profile")
        if not profile:
            continue
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile["ms_per_call"].items())[:6])
        print(f"{row['kind']} {row['preset']} {row['shape']}: {top} (ms per call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSON file to write")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per session (default 20; "
                        "a quarter of that, at least 3, for the [1, 9, 1024, 1024] scores)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--presets", nargs="+", default=["default", "paper"], help="precision presets to run")
    parser.add_argument("--kinds", nargs="+", default=sorted(set(kind for kind, _, _ in CASES)),
                        help="operator kinds to run (default: all)")
    parser.add_argument("--skip-large", action="store_true",
                        help="skip the [1, 9, 1024, 1024] attention scores (seconds per call for the paper preset)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the onnxruntime profiler breakdown")
    parser.add_argument("--profile-runs", type=int, default=5, help="runs averaged in the profile (default 5)")
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

    result = {"machine": info, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
              "rows": rows}
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
