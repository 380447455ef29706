"""The end-to-end pipeline on a tiny random Llama: CLI convert/inspect/validate/eval, the
evaluation numbers against an independent computation, and the converted export folder as a
deployment artifact for optimum's ORTModelForCausalLM."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.onnxruntime")

from onnx_spike import cli  # noqa: E402
from onnx_spike.pipeline.evaluate import cloze_targets, evaluate, log_softmax, validate  # noqa: E402
from onnx_spike.pipeline.runtime import SiteProbe, logits_of, make_session, spiking_sites  # noqa: E402
from tiny_llama import play_text  # noqa: E402


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    return {"first": play_text(1), "second": play_text(2)}


def test_convert_cli_writes_folder_with_tokenizer(converted, exported):
    assert (converted / "model.onnx").exists()
    assert (converted / "config.json").read_text() == (exported / "config.json").read_text()
    assert (converted / "tokenizer.json").exists()
    kinds = [site["kind"] for site in spiking_sites(converted)]
    assert kinds.count("softmax") == 2
    assert kinds.count("silu") == 2
    assert kinds.count("rmsnorm") == 5


def test_inspect_cli_prints_counts(exported, capsys):
    assert cli.main(["inspect", str(exported)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:8]}
    assert rows["softmax"] == ["2", "2", "0"]
    assert rows["silu"] == ["2", "2", "0"]
    assert rows["rmsnorm"] == ["5", "5", "0"]


def test_convert_cli_nothing_matched_exit_code(exported, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli.main(["convert", str(exported), str(output), "--ops", "layernorm"]) == cli.EXIT_NOTHING_CONVERTED
    assert not output.exists() or not (output / "model.onnx").exists()
    assert "--allow-empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--ops", "softmax,bogus"], "unknown op kind"),
    (["--ops", ","], "empty selection"),
    (["--layers", "3-1"], "invalid range"),
    (["--softmax-bits", "-4"], "frac_bits"),
    (["--norm-bits", "40"], "frac_bits"),
    (["--nodes", "(unclosed"], "regular expression"),
])
def test_convert_cli_rejects_invalid_options(exported, tmp_path, capsys, argv, message):
    output = tmp_path / "out"
    assert cli.main(["convert", str(exported), str(output), *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_evaluate_matches_direct_computation(exported, converted, tokenizer, plays):
    result = evaluate(exported, converted, plays, tokenizer, window_length=64, num_windows=3, min_context=8,
                      progress=False).to_dict()
    windows, targets = cloze_targets(tokenizer, plays, 64, 3, 8)

    nll_original = nll_converted = 0.0
    agree = 0
    session_original, session_converted = make_session(exported), make_session(converted)
    for tokens in windows:
        log_p = log_softmax(logits_of(session_original, tokens)[0])
        log_q = log_softmax(logits_of(session_converted, tokens)[0])
        nll_original -= log_p[np.arange(63), tokens[1:]].sum()
        nll_converted -= log_q[np.arange(63), tokens[1:]].sum()
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
    assert result["tokens"] == 3 * 63
    assert result["perplexity_original"] == pytest.approx(np.exp(nll_original / 189), rel=1e-9)
    assert result["perplexity_converted"] == pytest.approx(np.exp(nll_converted / 189), rel=1e-9)
    assert result["top1_agreement"] == pytest.approx(agree / (3 * 64))
    assert abs(result["perplexity_change"]) < 0.01
    assert result["cloze"]["items"] == len(targets) > 10
    assert set(result["saturation"]) == {site["name"] for site in spiking_sites(converted)}


def test_cloze_targets_are_line_final_words(tokenizer, plays):
    windows, targets = cloze_targets(tokenizer, plays, 64, 4, 8)
    vocab = {v: k for k, v in tokenizer.get_vocab().items()}
    for target in targets:
        tokens = windows[target.window][target.position:target.position + len(target.token_ids)]
        assert tuple(tokens) == target.token_ids
        assert vocab[int(tokens[0])] == target.word
        # The next token in the text ends the line.
        follower = windows[target.window][target.position + len(target.token_ids)] \
            if target.position + len(target.token_ids) < 64 else None
        assert follower is None or vocab[int(follower)] == "."
        assert target.position >= 8


def test_validate_reports_outputs_and_agreement(exported, converted, tokenizer, plays):
    windows, _ = cloze_targets(tokenizer, plays, 32, 2, 1)
    result = validate(exported, converted, windows, progress=False)
    assert "logits" in result["outputs"]
    assert 0 < result["outputs"]["logits"]["max_abs_diff"] < 0.05
    assert result["outputs"]["logits"]["nan_mismatch"] == 0
    assert result["top1_agreement"] >= 0.9
    assert all(entry["saturated"] == 0 for entry in result["saturation"].values())


def test_saturation_counts_clipped_activations(exported, converted, tokenizer, plays):
    sites = spiking_sites(converted)
    narrow = [dict(site, input_frac_bits=44) for site in sites if site["kind"] == "rmsnorm"]
    probe = SiteProbe(exported, narrow)
    try:
        windows, _ = cloze_targets(tokenizer, plays, 16, 1, 1)
        totals = probe.count(windows[0])
    finally:
        probe.close()
    for entry in totals.values():
        assert entry["limit"] == 2.0 ** (40 - 44)
        assert entry["saturated"] == 0 or entry["max_abs"] >= entry["limit"]
    assert any(entry["saturated"] > 0 for entry in totals.values())


def test_eval_cli_writes_json(exported, converted, tmp_path, plays, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(plays["first"])
    output = tmp_path / "eval.json"
    argv = ["eval", str(converted), "--baseline", str(exported), "--text", str(text_file), "--lengths", "32,64",
            "--windows", "2", "--json", str(output)]
    assert cli.main(argv) == 0
    data = json.loads(output.read_text())
    assert [r["window_length"] for r in data["results"]] == [32, 64]
    assert "ppl orig" in capsys.readouterr().out


def test_converted_folder_generates_with_optimum(converted, exported):
    from optimum.onnxruntime import ORTModelForCausalLM

    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    original = ORTModelForCausalLM.from_pretrained(exported).generate(prompt, max_new_tokens=6, do_sample=False)
    spiking = ORTModelForCausalLM.from_pretrained(converted).generate(prompt, max_new_tokens=6, do_sample=False)
    assert spiking.shape == (1, 11)
    assert spiking[0, :5].tolist() == prompt[0].tolist()
    assert spiking.tolist() == original.tolist()


def test_fast_form_conversion_gives_identical_logits(exported, converted, tmp_path, tokenizer, plays):
    fast = tmp_path / "fast"
    assert cli.main(["convert", str(exported), str(fast), "--form", "fast"]) == 0
    windows, _ = cloze_targets(tokenizer, plays, 48, 2, 1)
    loop_session, fast_session = make_session(converted), make_session(fast)
    for tokens in windows:
        np.testing.assert_array_equal(logits_of(fast_session, tokens), logits_of(loop_session, tokens))
    ops = set()
    import onnx

    for function in onnx.load(str(fast / "model.onnx")).functions:
        ops |= {node.op_type for node in function.node}
    assert "Div" in ops
    assert "Loop" not in ops


def test_main_job_logits_check(exported, converted, tmp_path, tokenizer, plays):
    from onnx_spike.pipeline.main_job import check_same_logits

    fast = tmp_path / "fast"
    paper = tmp_path / "paper"
    assert cli.main(["convert", str(exported), str(fast), "--form", "fast"]) == 0
    assert cli.main(["convert", str(exported), str(paper), "--preset", "paper"]) == 0
    check_same_logits(converted, fast, tokenizer, plays, threads=1, length=32)
    with pytest.raises(RuntimeError, match="different logits"):
        check_same_logits(converted, paper, tokenizer, plays, threads=1, length=32)


def test_fidelity_rows_check_targets_both_ways():
    from onnx_spike.pipeline.report import fidelity_rows

    def result(change, top1=0.99, cloze_difference=0.0):
        return {"window_length": 512, "perplexity_original": 10.0, "perplexity_converted": 10.0 * (1 + change),
                "perplexity_change": change, "top1_agreement": top1,
                "cloze": {"items": 1000, "difference": cloze_difference, "standard_error": 0.001}}

    rows = fidelity_rows("default", [result(0.005), result(0.02), result(-0.3), result(0.0, top1=0.9),
                                     result(0.0, cloze_difference=-0.01)])
    assert [row["meets_targets"] for row in rows] == [True, False, False, False, False]
