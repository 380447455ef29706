"""Replace the Softmax, SiLU and norms of exported LLMs with spiking integer operators.

This is the `onnx-spike` command line. Exit codes: 0 success; 1 an error (the message says
what failed and what to do); 2 invalid command-line usage; 3 `convert` found nothing to
replace (pass --allow-empty to accept that); 4 `main` missed a fidelity target with the
default preset. Tracebacks are shown only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING_CONVERTED = 3

log = logging.getLogger("onnx_spike")


class UsageError(ValueError):
    """An invalid option value, found before any work."""


def _parse_layers(text: str | None) -> set[int] | None:
    if text is None:
        return None
    layers = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if low > high:
                    raise ValueError
                layers.update(range(low, high + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise UsageError(f"--layers: invalid range {part!r}; use e.g. 0-3,7") from None
    if any(layer < 0 for layer in layers):
        raise UsageError("--layers: layer indices must be non-negative")
    return layers


def _parse_ops(text: str) -> tuple[str, ...]:
    from onnx_spike.passes.sites import KINDS

    ops = tuple(op.strip().lower() for op in text.split(",") if op.strip())
    if not ops:
        raise UsageError(f"--ops: empty selection; choose from {','.join(KINDS)}")
    unknown = [op for op in ops if op not in KINDS]
    if unknown:
        raise UsageError(f"--ops: unknown op kind(s) {','.join(unknown)}; choose from {','.join(KINDS)}")
    return ops


def _int_at_least(minimum: int):
    """Return an argparse type function that accepts integers of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _lengths(text: str) -> list[int]:
    """Parse comma-separated window lengths of at least 2 tokens, as an argparse type."""
    parse = _int_at_least(2)
    lengths = [parse(part.strip()) for part in text.split(",") if part.strip()]
    if not lengths:
        raise argparse.ArgumentTypeError("empty list; give window lengths in tokens, e.g. 512,1024")
    return lengths


def _check_output_file(option: str, path: str | None) -> None:
    """Reject an output file whose folder does not exist, before any work."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"{option}: folder {Path(path).parent} does not exist; create it or choose another path")


def _precision(args):
    from onnx_spike.precision import Precision, PrecisionError, preset, with_frac_bits

    try:
        if args.precision_json:
            precision = Precision.from_dict(json.loads(Path(args.precision_json).read_text()))
        else:
            precision = preset(args.preset)
        for kind, bits in (("softmax", args.softmax_bits), ("silu", args.silu_bits), ("norm", args.norm_bits),
                           ("gelu", args.gelu_bits)):
            if bits is not None:
                precision = with_frac_bits(precision, kind, bits)
        return precision.validate()
    except (PrecisionError, TypeError) as error:
        source = f"--precision-json {args.precision_json}" if args.precision_json else "precision"
        raise UsageError(f"{source}: {error}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--precision-json: cannot read {args.precision_json}: {error}") from None


def _options(args):
    from onnx_spike.passes.convert import ConvertOptions

    if args.nodes:
        import re

        try:
            re.compile(args.nodes)
        except re.error as error:
            raise UsageError(f"--nodes: invalid regular expression {args.nodes!r}: {error}") from None
    return ConvertOptions(ops=_parse_ops(args.ops), precision=_precision(args), layers=_parse_layers(args.layers),
                          node_pattern=args.nodes, inline=getattr(args, "inline", False),
                          form=getattr(args, "form", "loop"))


def _add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("selection and precision")
    group.add_argument("--ops", default="softmax,silu,rmsnorm,layernorm",
                       help="comma-separated op kinds to replace: softmax, silu, rmsnorm, layernorm, gelu "
                            "(default: softmax,silu,rmsnorm,layernorm)")
    group.add_argument("--layers", help="replace only in these transformer layers, e.g. 0-3,7")
    group.add_argument("--nodes", help="replace only nodes whose name matches this regular expression")
    group.add_argument("--preset", default="default", choices=["default", "paper"],
                       help="precision preset (default: 16-bit Softmax and norms; paper: the 8-bit settings "
                            "of the NLSpike paper)")
    group.add_argument("--precision-json", help="JSON file with a full precision specification (overrides --preset)")
    for kind in ("softmax", "silu", "norm", "gelu"):
        group.add_argument(f"--{kind}-bits", type=int, help=f"fractional bits of the {kind} output grid")


def _write_json(path: str | None, data) -> None:
    if not path:
        return
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, target)


def _tokenizer_for(path: str, explicit: str | None):
    from onnx_spike.pipeline.evaluate import load_tokenizer

    if explicit:
        folder = Path(explicit)
    elif Path(path).is_dir():
        folder = Path(path)
    else:
        folder = Path(path).parent
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise UsageError(f"no tokenizer in {folder}; give an export folder or --tokenizer FOLDER")
    return load_tokenizer(folder)


def _text_windows(args, tokenizer, length: int, count: int):
    import numpy as np

    from onnx_spike.pipeline import text as text_data

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise UsageError(f"--text: text file {path} not found")
        plays = {"text": path.read_text(encoding="utf-8")}
    else:
        plays = text_data.load_shakespeare_split().evaluation
    ids = np.asarray(tokenizer(text_data.join_plays(plays), add_special_tokens=False)["input_ids"], np.int64)
    usable = min(count, len(ids) // length)
    if usable == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return plays, ids[:usable * length].reshape(usable, length)


# ---------------------------------------------------------------- commands


def cmd_export(args) -> int:
    from onnx_spike.pipeline.export import export_model, find_bundled_smollm2

    source = find_bundled_smollm2() if args.source == "smollm2" else Path(args.source)
    path = export_model(source, args.output, gguf_file=args.gguf_file, opset=args.opset,
                        with_past=not args.no_past, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {source} to {path}")
    return 0


def cmd_convert(args) -> int:
    from onnx_spike.pipeline.convert import NothingConvertedError, convert_path

    options = _options(args)
    _check_output_file("--report-json", args.report_json)
    if args.calibrate and not Path(args.calibrate).is_file():
        raise UsageError(f"--calibrate: text file {args.calibrate} not found")
    from onnx_spike.pipeline.convert import check_paths

    check_paths(args.input, args.output, args.overwrite)
    if args.calibrate:
        from onnx_spike.calibrate import calibration_windows, measure_ranges
        from onnx_spike.pipeline.convert import load_model_proto
        from onnx_spike.pipeline.runtime import model_file

        load_model_proto(model_file(args.input))  # a clear error for a bad model file before calibration
        tokenizer = _tokenizer_for(args.input, args.tokenizer)
        windows = calibration_windows(tokenizer, args.calibrate, args.calibration_length, args.calibration_windows)
        options.input_ranges = measure_ranges(model_file(args.input), windows, options)
    try:
        report = convert_path(args.input, args.output, options, overwrite=args.overwrite,
                              allow_empty=args.allow_empty)
    except NothingConvertedError as error:
        print(error.report.to_table())
        print(f"error: {error}; pass --allow-empty to write the model unchanged", file=sys.stderr)
        return EXIT_NOTHING_CONVERTED
    print(report.to_table())
    _write_json(args.report_json, report.to_dict())
    print(f"\nwrote {args.output}")
    return 0


def cmd_inspect(args) -> int:
    from onnx_spike.pipeline.convert import inspect_path

    report = inspect_path(args.model, _options(args))
    print(report.to_json() if args.json else report.to_table())
    return 0


def cmd_validate(args) -> int:
    from onnx_spike.pipeline.evaluate import validate
    from onnx_spike.pipeline.report import render_validation

    _check_output_file("--json", args.json)
    if args.histograms and Path(args.histograms).exists() and not Path(args.histograms).is_dir():
        raise UsageError(f"--histograms: {args.histograms} is a file, not a folder; give a folder for the PNG files")
    tokenizer = _tokenizer_for(args.original, args.tokenizer)
    _, windows = _text_windows(args, tokenizer, args.length, args.windows)
    result = validate(args.original, args.converted, windows, threads=args.threads)
    if args.histograms:
        from onnx_spike.pipeline.histograms import error_histograms, render_histograms

        result["histograms"] = error_histograms(args.original, args.converted, windows, args.histograms,
                                                threads=args.threads)
    print(render_validation(result))
    if args.histograms:
        print("\nError per op kind against the exact float op\n" + render_histograms(result["histograms"]))
    _write_json(args.json, result)
    return 0


def cmd_eval(args) -> int:
    from onnx_spike.pipeline.evaluate import evaluate
    from onnx_spike.pipeline.report import render_evaluation

    _check_output_file("--json", args.json)
    tokenizer = _tokenizer_for(args.baseline, args.tokenizer)
    plays, _ = _text_windows(args, tokenizer, 8, 1)
    results = []
    for length in args.lengths:
        result = evaluate(args.baseline, args.converted, plays, tokenizer, window_length=length,
                          num_windows=args.windows, cloze=not args.no_cloze, threads=args.threads)
        results.append(result.to_dict())
    print(render_evaluation(results))
    _write_json(args.json, {"baseline": str(args.baseline), "converted": str(args.converted), "results": results})
    return 0


def cmd_report(args) -> int:
    from onnx_spike.pipeline.energy import energy_report, render_energy

    _check_output_file("--json", args.json)
    tokenizer = _tokenizer_for(args.baseline, args.tokenizer)
    _, windows = _text_windows(args, tokenizer, args.length, 1)
    report = energy_report(args.baseline, args.converted, windows[0], sites_per_kind=args.sites,
                           threads=args.threads)
    print(render_energy(report))
    _write_json(args.json, report)
    return 0


def cmd_lm_eval(args) -> int:
    try:
        from onnx_spike.pipeline.lm_eval import (accuracy_rows, check_task_names, compare_accuracy,
                                                 make_task_manager, render_accuracy, render_comparison, run_lm_eval)
    except ImportError as error:
        raise RuntimeError(f"lm-eval is not installed ({error}); install it with "
                           "pip install -e '.[export,lmeval]'") from None
    from onnx_spike.pipeline.runtime import model_file

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise UsageError("--tasks: empty list; name lm-eval tasks, e.g. arc_easy,piqa")
    limit = None
    if args.limit is not None:
        try:
            limit = int(args.limit) if args.limit.isdigit() else float(args.limit)
        except ValueError:
            raise UsageError(f"--limit: invalid value {args.limit!r}; give a document count or a fraction "
                             "below 1") from None
        if limit <= 0 or (isinstance(limit, float) and limit >= 1):
            raise UsageError(f"--limit: {args.limit} is out of range; give a document count or a fraction "
                             "below 1")
    if args.include_path and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path: folder {args.include_path} not found")
    # Check both models before the first run, which can take hours on the standard tasks.
    for path in (args.model, args.baseline):
        if path:
            model_file(path)

    task_manager = make_task_manager(args.include_path)
    try:
        check_task_names(tasks, task_manager)
    except ValueError as error:
        raise UsageError(f"--tasks: {error}") from None
    options = dict(limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                   max_length=args.max_length, threads=args.threads, task_manager=task_manager,
                   log_samples=bool(args.baseline))
    converted = run_lm_eval(args.model, tasks, **options)
    if not args.baseline:
        print(render_accuracy(accuracy_rows(converted), label=str(args.model)))
        _write_json(args.json, {"model": str(args.model), "tasks": accuracy_rows(converted),
                                "results": {key: value for key, value in converted.items() if key != "samples"}})
        return 0

    baseline = run_lm_eval(args.baseline, tasks, **options)
    rows = compare_accuracy(converted, baseline)
    print(render_comparison(rows))
    _write_json(args.json, {"model": str(args.model), "baseline": str(args.baseline), "tasks": rows,
                            "results": {name: {key: value for key, value in results.items() if key != "samples"}
                                        for name, results in (("converted", converted), ("baseline", baseline))}})
    return 0


def cmd_main(args) -> int:
    from onnx_spike.pipeline.main_job import run_main_job
    from onnx_spike.precision import PRESETS

    unknown = [name for name in args.presets.split(",") if name not in PRESETS]
    if unknown:
        raise UsageError(f"--presets: unknown preset(s) {','.join(unknown)}; choose from {','.join(PRESETS)}")
    return run_main_job(Path(args.workdir), windows_512=args.windows, windows_1024=args.windows_1024,
                        presets=args.presets.split(","), threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-spike", description=__doc__.split("\n")[0].strip() or None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export an LLM to ONNX with Optimum (opset 18, no fused attention)")
    export.add_argument("source", help="a Hugging Face model folder, a .gguf file, or 'smollm2' for the bundled model")
    export.add_argument("output", help="output folder (loadable by optimum's ORTModelForCausalLM)")
    export.add_argument("--gguf-file", help="GGUF file name inside the source folder")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    export.add_argument("--no-past", action="store_true", help="export without the key/value cache")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="replace Softmax, SiLU and norms with spiking operators")
    convert.add_argument("input", help="a .onnx file or an export folder")
    convert.add_argument("output", help="output .onnx file or folder (same kind as the input)")
    _add_selection(convert)
    convert.add_argument("--calibrate", metavar="TEXT_FILE", help="measure per-site input ranges on this text")
    convert.add_argument("--calibration-windows", type=_int_at_least(1), default=4,
                         help="token windows of calibration text (4)")
    convert.add_argument("--calibration-length", type=_int_at_least(8), default=512,
                         help="tokens per calibration window, at least 8 (512)")
    convert.add_argument("--tokenizer", help="tokenizer folder, when the input is not an export folder")
    convert.add_argument("--inline", action="store_true", help="inline the spiking functions into the graph")
    convert.add_argument("--form", choices=["loop", "fast"], default="loop",
                         help="loop: neuron dynamics in ONNX Loops (the reference, default); fast: the same "
                              "integers in closed form, with integer Div, for deployment speed")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    convert.add_argument("--allow-empty", action="store_true", help="succeed even when nothing matched")
    convert.add_argument("--report-json", help="write the match report as JSON to this file")
    convert.set_defaults(func=cmd_convert)

    inspect = commands.add_parser("inspect", help="print the match report without writing anything")
    inspect.add_argument("model", help="a .onnx file or an export folder")
    _add_selection(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(func=cmd_inspect)

    for name, helptext in (("validate", "compare a converted model with its original on the same inputs"),
                           ("eval", "perplexity, next-token agreement and cloze accuracy, side by side")):
        sub = commands.add_parser(name, help=helptext)
        if name == "validate":
            sub.add_argument("original", help="original model (.onnx or export folder)")
            sub.add_argument("converted", help="converted model")
            sub.add_argument("--windows", type=_int_at_least(1), default=2, help="token windows to run (2)")
            sub.add_argument("--length", type=_int_at_least(2), default=128, help="tokens per window (128)")
            sub.add_argument("--histograms", metavar="DIR",
                             help="write a PNG histogram of the per-element error per op kind to this folder")
            sub.set_defaults(func=cmd_validate)
        else:
            sub.add_argument("converted", help="converted model")
            sub.add_argument("--baseline", required=True, help="original model")
            sub.add_argument("--lengths", type=_lengths, default=[512, 1024],
                             help="window lengths in tokens, comma-separated (512,1024)")
            sub.add_argument("--windows", type=_int_at_least(1), default=32, help="windows per length (32)")
            sub.add_argument("--no-cloze", action="store_true", help="skip the cloze items")
            sub.set_defaults(func=cmd_eval)
        sub.add_argument("--text", help="plain-text file (default: the evaluation plays of the shakespeare package)")
        sub.add_argument("--tokenizer", help="tokenizer folder, when the model is not an export folder")
        sub.add_argument("--threads", type=_int_at_least(1), help="onnxruntime intra-op threads")
        sub.add_argument("--json", help="write the results as JSON to this file")

    report = commands.add_parser("report", help="operation counts and an energy estimate of the spiking sites "
                                                "against the float ops they replace")
    report.add_argument("converted", help="converted model")
    report.add_argument("--baseline", required=True, help="original model, run to capture each site's input")
    report.add_argument("--text", help="plain-text file (default: the evaluation plays of the shakespeare package)")
    report.add_argument("--length", type=_int_at_least(2), default=128, help="tokens in the text window (128)")
    report.add_argument("--sites", type=_int_at_least(1),
                        help="measure this many sites per op kind and scale the totals (default: every site)")
    report.add_argument("--tokenizer", help="tokenizer folder, when the baseline is not an export folder")
    report.add_argument("--threads", type=_int_at_least(1), help="onnxruntime intra-op threads")
    report.add_argument("--json", help="write the report as JSON to this file")
    report.set_defaults(func=cmd_report)

    lm_eval = commands.add_parser("lm-eval", help="accuracy on lm-evaluation-harness tasks (needs the lmeval extra)")
    lm_eval.add_argument("model", help="export folder (original or converted) with model.onnx and the tokenizer")
    lm_eval.add_argument("--tasks", default="winogrande,hellaswag,arc_easy,arc_challenge,piqa",
                         help="comma-separated lm-eval task names (winogrande,hellaswag,arc_easy,arc_challenge,piqa); "
                              "their data must be in the Hugging Face datasets cache, or set HF_HUB_OFFLINE=0 "
                              "to download it")
    lm_eval.add_argument("--baseline", help="also evaluate this export folder and print both side by side")
    lm_eval.add_argument("--limit", help="documents per task: a count, or a fraction below 1 (default: all)")
    lm_eval.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (0)")
    lm_eval.add_argument("--include-path", help="folder of extra lm-eval task YAML configs")
    lm_eval.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    lm_eval.add_argument("--max-length", type=int,
                         help="context length in tokens (default: from the model's config.json)")
    lm_eval.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    lm_eval.add_argument("--json", help="write the accuracies and lm-eval's results as JSON to this file")
    lm_eval.set_defaults(func=cmd_lm_eval)

    main = commands.add_parser("main", help="the main job on the bundled SmolLM2: export, convert, evaluate")
    main.add_argument("--workdir", default="runs/smollm2", help="folder for exports and results (runs/smollm2)")
    main.add_argument("--windows", type=_int_at_least(0), default=36,
                      help="512-token windows (36: about 1000 cloze items)")
    main.add_argument("--windows-1024", type=_int_at_least(0), default=8, help="1024-token windows (8)")
    main.add_argument("--presets", default="default,paper", help="presets to evaluate (default,paper)")
    main.add_argument("--threads", type=_int_at_least(1), help="onnxruntime intra-op threads")
    main.set_defaults(func=cmd_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except UsageError as error:
        if args.debug:
            raise
        print(f"onnx-spike {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"onnx-spike {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # an unexpected error is a bug, so report it as one; --debug shows the traceback
        if args.debug:
            raise
        print(f"onnx-spike {args.command}: internal error: {type(error).__name__}: {error}; rerun with --debug "
              "for the traceback and report it", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
