"""Precision sweep: perplexity, next-token agreement and operator errors against output bits.

For each number of fractional bits, the model is converted with all three op kinds at that
grid and with one kind at a time (the others left in float), and evaluated against the
original on the evaluation plays. The paper preset is evaluated beside the sweep. The fast
execution form is used for speed: it gives the same integers as the loop form (the tests
check this bit for bit), so the numbers are those of the loop form.

    python benchmarks/precision_sweep.py --original runs/smollm2/onnx --workdir runs/sweep \
        --bits 8,10,12,14,16,18 --windows 8 --json runs/sweep/sweep.json --plot docs/precision-sweep.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnx_spike import reference
from onnx_spike.operators import golden
from onnx_spike.passes.convert import ConvertOptions
from onnx_spike.pipeline import text as text_data
from onnx_spike.pipeline.convert import convert_path
from onnx_spike.pipeline.evaluate import evaluate, load_tokenizer
from onnx_spike.precision import preset, with_frac_bits

KIND_OPS = {"softmax": ("softmax",), "silu": ("silu",), "norm": ("rmsnorm", "layernorm")}


def precision_at(bits: int):
    precision = preset("default")
    for kind in ("softmax", "silu", "norm"):
        precision = with_frac_bits(precision, kind, bits)
    return precision


def operator_errors(precision) -> dict:
    """Mean and max error against the exact op on the authors' protocol (d = 64 / 576)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1024, 64)) * 7).astype(np.float32)
    hidden = rng.standard_normal((512, 576)).astype(np.float32)
    points = np.linspace(-8, 8, 20001).astype(np.float32)
    errors = {}
    for kind, x, exact in (("softmax", logits, reference.softmax(logits)),
                           ("silu", points, reference.silu(points)),
                           ("rmsnorm", hidden, reference.rms_norm(hidden, 1e-5))):
        difference = np.abs(golden(kind, x, precision).astype(np.float64) - exact)
        errors[kind] = {"mean": float(difference.mean()), "max": float(difference.max())}
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--bits", default="8,10,12,14,16,18")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows per point (8)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot", help="PNG path for the plot")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.original)
    plays = text_data.load_shakespeare_split().evaluation
    points = []

    def run(label: str, precision, ops) -> dict:
        output = workdir / label
        started = time.perf_counter()
        convert_path(args.original, output, ConvertOptions(ops=ops, precision=precision, form="fast"), overwrite=True)
        result = evaluate(args.original, output, plays, tokenizer, window_length=args.length,
                          num_windows=args.windows, saturation_windows=0).to_dict()
        print(f"{label:<22} ppl change {result['perplexity_change']:+.4%}  top-1 {result['top1_agreement']:.4f}"
              f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        return result

    for bits in [int(b) for b in args.bits.split(",")]:
        precision = precision_at(bits)
        entry = {"bits": bits, "operator_errors": operator_errors(precision), "all": None, "by_kind": {}}
        entry["all"] = run(f"all-{bits}", precision, ("softmax", "silu", "rmsnorm", "layernorm"))
        for kind, ops in KIND_OPS.items():
            entry["by_kind"][kind] = run(f"{kind}-{bits}", precision, ops)
        points.append(entry)
        Path(args.json).write_text(json.dumps({"points": points}, indent=2))

    paper = {"operator_errors": operator_errors(preset("paper")),
             "all": run("paper", preset("paper"), ("softmax", "silu", "rmsnorm", "layernorm"))}
    Path(args.json).write_text(json.dumps({"points": points, "paper": paper, "windows": args.windows,
                                           "length": args.length}, indent=2))
    print_table(points, paper)
    if args.plot:
        plot(points, paper, args.plot)


def print_table(points, paper) -> None:
    print(f"\n{'bits':>5} {'all: ppl':>10} {'top-1':>7} {'softmax':>10} {'silu':>10} {'norm':>10}   "
          f"{'softmax err':>11} {'silu err':>9} {'rms err':>9}")
    for p in points:
        kinds = " ".join(f"{p['by_kind'][k]['perplexity_change']:>+10.3%}" for k in KIND_OPS)
        errors = " ".join(f"{p['operator_errors'][k]['max']:>9.2e}" for k in ("softmax", "silu", "rmsnorm"))
        print(f"{p['bits']:>5} {p['all']['perplexity_change']:>+10.3%} {p['all']['top1_agreement']:>7.4f} "
              f"{kinds}   {errors}")
    print(f"paper {paper['all']['perplexity_change']:>+10.3%} {paper['all']['top1_agreement']:>7.4f}")


def plot(points, paper, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [p["bits"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, values in [("all three", [p["all"]["perplexity_change"] for p in points])] + [
            (f"{kind} only", [p["by_kind"][kind]["perplexity_change"] for p in points]) for kind in KIND_OPS]:
        left.plot(bits, [max(abs(v), 1e-5) * 100 for v in values], marker="o", label=label)
    left.axhline(abs(paper["all"]["perplexity_change"]) * 100, color="gray", linestyle="--",
                 label="paper preset, all three")
    left.set_yscale("log")
    left.set_xlabel("output fractional bits n (grid 2^-n)")
    left.set_ylabel("|perplexity change| (%)")
    left.set_title("SmolLM2-135M, 512-token windows")
    left.legend(fontsize=8)
    right.plot(bits, [p["all"]["top1_agreement"] * 100 for p in points], marker="o", label="all three")
    right.axhline(paper["all"]["top1_agreement"] * 100, color="gray", linestyle="--", label="paper preset")
    right.axhline(97, color="red", linestyle=":", label="target 97%")
    right.set_xlabel("output fractional bits n")
    right.set_ylabel("next-token top-1 agreement (%)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
