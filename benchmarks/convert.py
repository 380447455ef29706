"""Time `convert_file` on a 32-layer Llama-shaped export against `onnx.load` + `onnx.save`.

The model is a randomly initialised LlamaConfig: 32 layers, hidden size 512, MLP size 1408,
8 heads of 64 with 4 KV heads and a vocabulary of 2048, which is about 96 M parameters or
385 MB in fp32. It is exported with Optimum at opset 18 (task text-generation) and saved again
with its weights as external data, as large exports are.

Each measured step runs in a fresh Python process, which reports the step's wall time and its
peak resident set size (VmHWM on Linux) before and after the step. So imports are not timed,
and one step's memory does not hide another's. The steps are:

- load+save: `onnx.load` with the external data, then `onnx.save` with external data;
- convert: `onnx_spike.pipeline.convert.convert_file` with the default options.

The target is a conversion time of at most 3x the load+save time. `--profile` also runs the
conversion once under cProfile and prints the functions with the most cumulative time.

Usage:
    python benchmarks/convert.py [--output convert-benchmark.json] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 3.0
CONFIG = dict(num_hidden_layers=32, hidden_size=512, intermediate_size=1408, vocab_size=2048,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
VERSIONS = ("onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "protobuf", "torch", "transformers",
            "optimum", "optimum-onnx")


def maxrss_mib() -> float:
    """Return the peak resident set size of this process so far, in MiB.

    Linux: VmHWM from /proc/self/status, the peak of this program's own memory. ru_maxrss is
    not used there because a child starts with at least the RSS of the parent at fork time
    (the fork copies the parent's memory map), which would hide the step's own peak.
    Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_step(step: str, source: Path, target: Path) -> dict:
    """Run one step in this process and return its time and memory (the child side)."""
    import onnx

    from onnx_spike.passes.convert import ConvertOptions
    from onnx_spike.pipeline.convert import convert_file

    before = maxrss_mib()
    start = time.perf_counter()
    if step == "load+save":
        model = onnx.load(str(source))
        onnx.save(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{target.name}_data", size_threshold=1024)
        extra = {}
    elif step == "convert":
        report = convert_file(source, target, ConvertOptions(), overwrite=True)
        extra = {"sites": report.replaced, "counts": report.counts()}
    else:
        raise ValueError(f"unknown step {step!r}; expected 'load+save' or 'convert'")
    seconds = time.perf_counter() - start
    return {"step": step, "seconds": seconds, "maxrss_before_mib": before, "maxrss_after_mib": maxrss_mib(),
            **extra}


def measure(step: str, source: Path, target: Path) -> dict:
    """Run one step in a fresh Python process and return what it reports."""
    for stale in (target, target.with_name(f"{target.name}_data")):
        stale.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", step, str(source), str(target)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def build_model(folder: Path) -> Path:
    """Export the Llama-shaped model with Optimum and save it with external data."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    checkpoint = folder / "checkpoint"
    LlamaForCausalLM(LlamaConfig(**CONFIG)).eval().save_pretrained(checkpoint)
    export = folder / "export"
    main_export(str(checkpoint), str(export), task="text-generation", opset=18, optimize=None,
                local_files_only=True, library_name="transformers")
    shutil.rmtree(checkpoint)

    model_dir = folder / "model"
    model_dir.mkdir()
    model = onnx.load(str(export / "model.onnx"))
    onnx.save(model, str(model_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=1024)
    shutil.rmtree(export)
    return model_dir / "model.onnx"


def describe_model(path: Path) -> dict:
    import onnx
    import numpy as np

    proto = onnx.load(str(path), load_external_data=False)
    parameters = sum(int(np.prod(tensor.dims)) for tensor in proto.graph.initializer)
    return {"nodes": len(proto.graph.node), "initializers": len(proto.graph.initializer), "parameters": parameters,
            "protobuf_bytes": path.stat().st_size,
            "data_bytes": path.with_name("model.onnx_data").stat().st_size}


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return {"cpu": fields.get("Model name", platform.processor()), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def profile_conversion(source: Path, target: Path, top: int) -> str:
    import cProfile
    import io
    import pstats

    from onnx_spike.passes.convert import ConvertOptions
    from onnx_spike.pipeline.convert import convert_file

    profiler = cProfile.Profile()
    profiler.runcall(convert_file, source, target, ConvertOptions(), overwrite=True)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(top)
    return stream.getvalue()


def summarize(runs: list[dict]) -> dict:
    times = [run["seconds"] for run in runs]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_rss_mib": max(run["maxrss_after_mib"] for run in runs),
            "rss_after_imports_mib": statistics.median(run["maxrss_before_mib"] for run in runs),
            "step_rss_mib": max(run["maxrss_after_mib"] - run["maxrss_before_mib"] for run in runs),
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="convert-benchmark.json",
                        help="path of the JSON file to write (default convert-benchmark.json)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step, alternating (default 3)")
    parser.add_argument("--workdir", type=Path, help="folder for the model and outputs; kept, and an "
                        "existing model.onnx there is reused (default: a temporary folder, removed)")
    parser.add_argument("--profile", action="store_true", help="also profile one conversion with cProfile")
    parser.add_argument("--profile-top", type=int, default=30, help="functions to print from the profile")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        step, source, target = args.child
        print(json.dumps(run_step(step, Path(source), Path(target))))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnx-spike-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        source = workdir / "model" / "model.onnx"
        if not source.exists():
            start = time.perf_counter()
            build_model(workdir)
            print(f"built {source} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        outputs = workdir / "outputs"
        outputs.mkdir(exist_ok=True)

        load_before = os.getloadavg()
        runs: dict[str, list[dict]] = {"load+save": [], "convert": []}
        for index in range(args.repeats):
            for step, name in (("load+save", "resaved.onnx"), ("convert", "spiking.onnx")):
                result = measure(step, source, outputs / name)
                runs[step].append(result)
                print(f"run {index + 1}/{args.repeats} {step}: {result['seconds']:.2f} s, "
                      f"peak RSS {result['maxrss_after_mib']:.0f} MiB", file=sys.stderr)

        summary = {step: summarize(step_runs) for step, step_runs in runs.items()}
        ratio = summary["convert"]["median_s"] / summary["load+save"]["median_s"]
        # Other processes on the machine slow both steps; the load average shows how busy it was.
        load = {"before": load_before, "after": os.getloadavg()}
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "load_average": load,
                  "versions": versions(), "config": CONFIG, "model": describe_model(source),
                  "output_bytes": {"protobuf": (outputs / "spiking.onnx").stat().st_size,
                                   "data": (outputs / "spiking.onnx_data").stat().st_size},
                  "sites": runs["convert"][-1]["counts"], "steps": summary, "ratio": ratio,
                  "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO}

        print(f"{'step':<10} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13} {'step RSS MiB':>13}")
        for step, row in summary.items():
            print(f"{step:<10} {row['median_s']:>9.2f} {row['min_s']:>7.2f} {row['peak_rss_mib']:>13.0f} "
                  f"{row['step_rss_mib']:>13.0f}")
        print(f"convert / load+save = {ratio:.2f} (target <= {TARGET_RATIO:g})")

        if args.profile:
            result["profile"] = profile_conversion(source, outputs / "profiled.onnx", args.profile_top)
            print(result["profile"])
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
