"""lm-evaluation-harness integration on a tiny random Llama and a local multiple-choice task:
the scores of OnnxSpikeLM against log-probabilities computed from the onnxruntime logits, the
task accuracies against the same computation, and the `lm-eval` command."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from onnx_spike import cli  # noqa: E402
from onnx_spike.passes.convert import ConvertOptions  # noqa: E402
from onnx_spike.pipeline.convert import convert_path  # noqa: E402
from onnx_spike.pipeline.evaluate import log_softmax  # noqa: E402
from onnx_spike.pipeline.export import export_model  # noqa: E402
from onnx_spike.pipeline.lm_eval import (  # noqa: E402
    OnnxSpikeLM,
    accuracy_rows,
    make_task_manager,
    run_lm_eval,
)
from onnx_spike.pipeline.runtime import logits_of  # noqa: E402

TASK = "onnx_spike_tiny_choice"
VOCAB = 256
MAX_POSITIONS = 128
# Questions of 3 to 6 words and 2 to 4 choices of 1 to 3 words, over the words w0..w251.
ITEMS = [
    {"question": "w10 w11 w12", "choices": ["w20 w21", "w30", "w40 w41 w42"], "answer": 0},
    {"question": "w50 w51 w52 w53", "choices": ["w60", "w61 w62"], "answer": 1},
    {"question": "w70 w71 w72 w73 w74", "choices": ["w80 w81", "w82", "w83 w84", "w85"], "answer": 2},
    {"question": "w90 w91 w92", "choices": ["w100 w101 w102", "w103"], "answer": 0},
    {"question": "w110 w111 w112 w113 w114 w115", "choices": ["w120", "w121", "w122"], "answer": 1},
    {"question": "w130 w131 w132", "choices": ["w140 w141", "w142 w143 w144"], "answer": 1},
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return export_model(folder, tmp_path_factory.mktemp("onnx") / "original", progress=False)


@pytest.fixture(scope="module")
def converted(exported, tmp_path_factory):
    output = tmp_path_factory.mktemp("spiking") / "converted"
    convert_path(exported, output, ConvertOptions())
    return output


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=folder / "datasets-cache"))
    return folder


@pytest.fixture(scope="module")
def task_manager(task_dir):
    return make_task_manager(task_dir)


@pytest.fixture(scope="module", params=["original", "converted"])
def model_dir(request, exported, converted):
    return exported if request.param == "original" else converted


def direct_score(session, tokens: list[int], count: int) -> tuple[float, bool]:
    """Log-probability and greedy flag of the last `count` tokens, from one unbatched forward pass."""
    log_probs = log_softmax(logits_of(session, np.asarray(tokens[:-1]))[0])
    targets = np.asarray(tokens[-count:])
    rows = np.arange(len(tokens) - 1 - count, len(tokens) - 1)
    return float(log_probs[rows, targets].sum()), bool(np.all(log_probs[rows].argmax(-1) == targets))


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(arguments), idx=0)


def test_loglikelihood_matches_direct_logits(model_dir):
    lm = OnnxSpikeLM(model_dir, batch_size=3, progress=False)
    pairs = [("w10 w11 w12", " w20 w21"), ("w50 w51 w52 w53", " w61 w62"), ("w9", " w17"),
             ("w1 w2 w3 w4 w5 w6 w7", " w8 w9 w10")]

    scores = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)

    assert len(scores) == len(pairs)
    for (context, continuation), (score, greedy) in zip(pairs, scores):
        tokens = lm.tok_encode(context + continuation)
        expected_score, expected_greedy = direct_score(lm.session, tokens, len(continuation.split()))
        assert score == pytest.approx(expected_score, abs=1e-6)
        assert greedy == expected_greedy


def test_loglikelihood_empty_context_uses_bos(model_dir):
    lm = OnnxSpikeLM(model_dir, progress=False)

    [(score, _greedy)] = lm.loglikelihood([request("loglikelihood", "", "w7 w8")], disable_tqdm=True)

    expected, _ = direct_score(lm.session, [1, 11, 12], 2)
    assert lm.prefix_token_id == 1
    assert score == pytest.approx(expected, abs=1e-6)


def test_loglikelihood_truncates_to_max_length(exported):
    lm = OnnxSpikeLM(exported, max_length=4, progress=False)
    tokens = lm.tok_encode("w1 w2 w3 w4 w5 w6 w7 w8")

    [(score, _greedy)] = lm.loglikelihood([request("loglikelihood", "w1 w2 w3 w4 w5 w6", " w7 w8")],
                                          disable_tqdm=True)

    # Only the last max_length + 1 tokens enter: 4 inputs predicting the last 4 tokens.
    expected, _ = direct_score(lm.session, tokens[-5:], 2)
    assert score == pytest.approx(expected, abs=1e-6)


def test_max_length_from_config(exported):
    assert OnnxSpikeLM(exported, progress=False).max_length == MAX_POSITIONS


def test_loglikelihood_rolling_sums_windows(exported):
    text = "w1 w2 w3 w4 w5 w6 w7"
    whole = OnnxSpikeLM(exported, progress=False)
    windowed = OnnxSpikeLM(exported, max_length=3, progress=False)
    tokens = whole.tok_encode(text)

    [full] = whole.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    [rolled] = windowed.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)

    expected, _ = direct_score(whole.session, [whole.prefix_token_id] + tokens, len(tokens))
    assert full == pytest.approx(expected, abs=1e-6)
    # Windows of 3 tokens see less context, so the sum differs but stays finite and negative.
    assert np.isfinite(rolled)
    assert rolled < 0
    assert rolled != pytest.approx(full, abs=1e-9)


def test_generate_until_matches_greedy_logits(model_dir):
    lm = OnnxSpikeLM(model_dir, progress=False)
    prompt = "w5 w17 w42 w99 w3"
    tokens = lm.tok_encode(prompt)
    expected = []
    for _ in range(6):
        next_token = int(logits_of(lm.session, np.asarray(tokens + expected))[0, -1].argmax())
        expected.append(next_token)
        if next_token == lm.eot_token_id:
            break

    [text] = lm.generate_until([request("generate_until", prompt, {"until": ["</never>"], "max_gen_toks": 6})],
                               disable_tqdm=True)

    assert text == lm.tok_decode(expected)


def test_generate_until_stops_at_sequence(exported):
    lm = OnnxSpikeLM(exported, progress=False)
    [free] = lm.generate_until([request("generate_until", "w5 w17", {"until": [], "max_gen_toks": 4})],
                               disable_tqdm=True)
    stop_word = free.split()[1]

    [text] = lm.generate_until([request("generate_until", "w5 w17", {"until": [stop_word], "max_gen_toks": 4})],
                               disable_tqdm=True)

    assert text == free.split(stop_word)[0]


def test_generate_without_cache_matches_cache(exported):
    cached = OnnxSpikeLM(exported, progress=False)
    uncached = OnnxSpikeLM(exported, progress=False)
    uncached._cache_outputs = None
    prompt = cached.tok_encode("w8 w60 w200 w31")

    assert cached._cache_outputs is not None
    assert cached.greedy_tokens(prompt, 5) == uncached.greedy_tokens(prompt, 5)


def test_static_shape_export_pads_to_fixed_length(exported, tmp_path):
    model_zoo = pytest.importorskip("model_zoo")
    path = model_zoo.export_dynamo("llama", tmp_path / "static" / "model.onnx")
    lm = OnnxSpikeLM(path, tokenizer=exported, progress=False)
    tokens = lm.tok_encode("w1 w2 w3 w4 w5 w6")
    padded = tokens[:5] + [lm.tokenizer.pad_token_id] * (model_zoo.EXAMPLE_SEQUENCE_LENGTH - 5)

    scores = lm.loglikelihood([request("loglikelihood", "w1 w2", " w3"),
                               request("loglikelihood", "w1 w2 w3 w4", " w5 w6")])
    [text] = lm.generate_until([request("generate_until", "w1 w2", {"until": [], "max_gen_toks": 3})])

    log_probs = log_softmax(logits_of(lm.session, np.asarray(padded))[0])
    assert lm.max_length == model_zoo.EXAMPLE_SEQUENCE_LENGTH
    assert lm.batch_size == model_zoo.EXAMPLE_BATCH
    assert scores[1][0] == pytest.approx(log_probs[3, tokens[4]] + log_probs[4, tokens[5]], abs=1e-6)
    assert len(text.split()) == 3


def test_run_lm_eval_accuracy_matches_direct(model_dir, task_dir, task_manager, tmp_path):
    output = tmp_path / "results.json"

    results = run_lm_eval(model_dir, [TASK], include_path=task_dir, output_json=output, task_manager=task_manager,
                          progress=False)

    metrics = results["results"][TASK]
    assert set(metrics) >= {"acc,none", "acc_norm,none", "acc_stderr,none"}
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert 0.0 <= metrics["acc_norm,none"] <= 1.0
    assert results["n-samples"][TASK]["effective"] == len(ITEMS)

    lm = OnnxSpikeLM(model_dir, progress=False)
    correct, correct_norm = [], []
    for item in ITEMS:
        scores = [direct_score(lm.session, lm.tok_encode(f"{item['question']} {choice}"), len(choice.split()))[0]
                  for choice in item["choices"]]
        # acc_norm divides by the choice's length in characters, without the " " before it.
        normalized = [score / len(choice) for score, choice in zip(scores, item["choices"])]
        correct.append(int(np.argmax(scores)) == item["answer"])
        correct_norm.append(int(np.argmax(normalized)) == item["answer"])
    assert metrics["acc,none"] == pytest.approx(np.mean(correct))
    assert metrics["acc_norm,none"] == pytest.approx(np.mean(correct_norm))

    written = json.loads(output.read_text())
    assert written["results"][TASK]["acc,none"] == metrics["acc,none"]
    assert "samples" not in written


def test_run_lm_eval_limit(exported, task_dir, task_manager):
    results = run_lm_eval(exported, TASK, limit=2, include_path=task_dir, task_manager=task_manager,
                          progress=False)

    assert results["n-samples"][TASK]["effective"] == 2


def test_run_lm_eval_unknown_task(exported, task_manager):
    with pytest.raises(ValueError, match="onnx_spike_tiny_choise.*did you mean onnx_spike_tiny_choice"):
        run_lm_eval(exported, ["onnx_spike_tiny_choise"], task_manager=task_manager)


def test_cli_lm_eval_baseline_table(converted, exported, task_dir, tmp_path, capsys):
    output = tmp_path / "comparison.json"

    code = cli.main(["lm-eval", str(converted), "--baseline", str(exported), "--tasks", TASK,
                     "--include-path", str(task_dir), "--json", str(output)])

    printed = capsys.readouterr().out
    assert code == 0
    assert "baseline" in printed
    assert "converted" in printed
    assert "difference" in printed
    table = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines() if line.startswith(TASK)}
    assert set(table) == {(TASK, "acc"), (TASK, "acc_norm")}
    written = json.loads(output.read_text())
    rows = {row["metric"]: row for row in written["tasks"]}
    for metric, row in rows.items():
        assert float(table[(TASK, metric)][0]) == pytest.approx(row["baseline"], abs=5e-5)
        assert float(table[(TASK, metric)][1]) == pytest.approx(row["converted"], abs=5e-5)
        assert row["difference"] == pytest.approx(row["converted"] - row["baseline"])
        assert row["paired_stderr"] is not None
    assert [row["value"] for row in accuracy_rows(written["results"]["baseline"])] == \
        [rows["acc"]["baseline"], rows["acc_norm"]["baseline"]]


def test_cli_lm_eval_unknown_task_is_usage_error(exported, task_dir, task_manager, monkeypatch, capsys):
    monkeypatch.setattr("onnx_spike.pipeline.lm_eval.make_task_manager", lambda include_path: task_manager)

    code = cli.main(["lm-eval", str(exported), "--tasks", "no_such_task", "--include-path", str(task_dir)])

    assert code == cli.EXIT_USAGE
    assert "no_such_task" in capsys.readouterr().err


def test_cli_lm_eval_missing_baseline(exported, tmp_path, capsys):
    code = cli.main(["lm-eval", str(exported), "--baseline", str(tmp_path / "absent"), "--tasks", TASK])

    assert code == cli.EXIT_ERROR
    assert "absent" in capsys.readouterr().err
