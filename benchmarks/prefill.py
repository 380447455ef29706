"""Prefill and decode speed, and session memory, of converted LMs against the float model.

Each model runs in its own subprocess (so its peak RSS is its own), and the timings of all
models are taken in one invocation, alternating models per repetition so that machine noise
hits them alike; ratios to the float model are what to compare across machines.

    python benchmarks/prefill.py --original runs/smollm2/onnx \
        --converted default=runs/smollm2/spiking-default paper=runs/smollm2/spiking-paper \
        --lengths 128,1024 --repeats 3 --json runs/bench-prefill.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import ctypes, json, resource, sys, time
import numpy as np
import onnxruntime as ort
sys.path.insert(0, {repo!r})
from onnx_spike.pipeline.runtime import model_file, session_options, window_feeds

path, lengths, repeats, threads, decode_context = {path!r}, {lengths!r}, {repeats!r}, {threads!r}, {context!r}
rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
options = session_options(threads)
options.enable_mem_pattern = {memory_pattern!r}
session = ort.InferenceSession(str(model_file(path)), options, providers=["CPUExecutionProvider"])
load_seconds = time.perf_counter() - started
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_now_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


# What the session keeps: the resident set after glibc returns its free pages to the system.
# Without the trim the same model's RSS after loading differed by up to 280 MB between processes.
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_retained = rss_now_kb()
except (OSError, AttributeError):
    rss_retained = None
rng = np.random.default_rng(0)
result = {{"load_seconds": load_seconds, "prefill": {{}}, "decode": None}}
for length in lengths:
    tokens = rng.integers(100, 20000, size=(1, length))
    session.run(None, window_feeds(session, tokens))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, window_feeds(session, tokens))
        times.append(time.perf_counter() - t)
    result["prefill"][str(length)] = times

names = [o.name for o in session.get_outputs()]
presents = [n for n in names if n.startswith("present")]
if presents and decode_context:
    tokens = rng.integers(100, 20000, size=(1, decode_context))
    outputs = dict(zip(names, session.run(None, window_feeds(session, tokens))))
    feeds = {{}}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values"):
            feeds[spec.name] = outputs[spec.name.replace("past_key_values", "present")]
    feeds["input_ids"] = np.array([[42]], dtype=np.int64)
    feeds["attention_mask"] = np.ones((1, decode_context + 1), dtype=np.int64)
    if any(s.name == "position_ids" for s in session.get_inputs()):
        feeds["position_ids"] = np.array([[decode_context]], dtype=np.int64)
    session.run(None, feeds)
    times = []
    for _ in range(repeats * 5):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    result["decode"] = {{"context": decode_context, "times": times}}
result["rss_loaded_kb"] = rss_loaded
result["rss_retained_kb"] = rss_retained
result["rss_peak_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result["rss_start_kb"] = rss_start
print("RESULT" + json.dumps(result))
"""


def run_worker(path: str, lengths: list[int], repeats: int, threads: int, context: int,
               memory_pattern: bool) -> dict:
    code = WORKER.format(repo=str(Path(__file__).resolve().parents[1]), path=path, lengths=lengths,
                         repeats=repeats, threads=threads, context=context, memory_pattern=memory_pattern)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker for {path} failed:\n{completed.stderr[-2000:]}")
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def machine() -> dict:
    cpu = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="float model (.onnx or export folder)")
    parser.add_argument("--converted", nargs="+", required=True, help="LABEL=PATH of converted models")
    parser.add_argument("--lengths", default="128,1024", help="prefill lengths in tokens (128,1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per length (3)")
    parser.add_argument("--rounds", type=int, default=2, help="worker rounds per model, alternating models (2)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (2)")
    parser.add_argument("--decode-context", type=int, default=128, help="context length for decode timing (128)")
    parser.add_argument("--memory-pattern", choices=["on", "off"], default="off",
                        help="onnxruntime's memory pattern: off (default, as onnx-spike's own sessions) "
                             "lowers the peak of long prefills, on speeds up the fast form's decode")
    parser.add_argument("--load-only", action="store_true",
                        help="only load each model (--rounds times) and report the RSS after loading")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    lengths = [] if args.load_only else [int(v) for v in args.lengths.split(",")]
    context = 0 if args.load_only else args.decode_context
    models = {"float": args.original}
    for item in args.converted:
        label, _, path = item.partition("=")
        models[label] = path

    samples: dict[str, list[dict]] = {label: [] for label in models}
    for round_index in range(args.rounds):
        for label, path in models.items():
            print(f"round {round_index + 1}/{args.rounds}: {label}", file=sys.stderr)
            samples[label].append(run_worker(path, lengths, args.repeats, args.threads, context,
                                            args.memory_pattern == "on"))

    summary = {}
    for label, runs in samples.items():
        # Medians: the RSS after loading the same model varied by up to 30% between processes.
        entry = {"prefill_ms": {}, "rss_peak_mb": statistics.median(r["rss_peak_kb"] for r in runs) / 1024,
                 "rss_loaded_mb": statistics.median(r["rss_loaded_kb"] for r in runs) / 1024,
                 "rss_retained_mb": (statistics.median(r["rss_retained_kb"] for r in runs) / 1024
                                     if all(r.get("rss_retained_kb") for r in runs) else None),
                 "load_seconds": statistics.median(r["load_seconds"] for r in runs)}
        for length in lengths:
            times = [t for r in runs for t in r["prefill"][str(length)]]
            entry["prefill_ms"][str(length)] = statistics.median(times) * 1000
        decodes = [t for r in runs if r["decode"] for t in r["decode"]["times"]]
        entry["decode_ms"] = statistics.median(decodes) * 1000 if decodes else None
        summary[label] = entry

    base = summary["float"]
    header = f"{'model':<10} " + " ".join(f"{'prefill ' + str(n):>14} {'ratio':>6}" for n in lengths)
    header += (f" {'decode':>9} {'ratio':>6} {'retained':>10} {'ratio':>6} {'loaded RSS':>10} {'ratio':>6}"
               f" {'peak RSS':>9} {'ratio':>6}")
    print(header)
    for label, entry in summary.items():
        row = f"{label:<10} "
        for length in lengths:
            value = entry["prefill_ms"][str(length)]
            row += f"{value:>11.1f} ms {value / base['prefill_ms'][str(length)]:>6.2f} "
        if entry["decode_ms"] is not None:
            row += f"{entry['decode_ms']:>6.1f} ms {entry['decode_ms'] / base['decode_ms']:>6.2f}"
        else:
            row += " " * 17
        if entry["rss_retained_mb"] and base["rss_retained_mb"]:
            row += f" {entry['rss_retained_mb']:>7.0f} MB {entry['rss_retained_mb'] / base['rss_retained_mb']:>6.2f}"
        else:
            row += " " * 17
        row += f" {entry['rss_loaded_mb']:>7.0f} MB {entry['rss_loaded_mb'] / base['rss_loaded_mb']:>6.2f}"
        row += f" {entry['rss_peak_mb']:>6.0f} MB {entry['rss_peak_mb'] / base['rss_peak_mb']:>6.2f}"
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "summary": summary,
                                               "samples": samples}, indent=2))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
