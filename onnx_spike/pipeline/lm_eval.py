"""Run lm-evaluation-harness tasks on an export folder (original or converted) with onnxruntime.

`OnnxSpikeLM` is an lm-eval language model backed by an onnxruntime session on the folder's
`model.onnx` and the tokenizer saved beside it. `run_lm_eval` builds one and passes it to
`lm_eval.simple_evaluate`, because lm-eval 0.4 finds models by name only in its built-in
registry. The command line wraps both:

    pip install -e '.[export,lmeval]'
    onnx-spike lm-eval runs/smollm2/converted-default --baseline runs/smollm2/original \\
        --tasks winogrande,hellaswag,arc_easy,arc_challenge,piqa --json lm-eval.json

The standard tasks read their data with Hugging Face `datasets` (allenai/winogrande,
Rowan/hellaswag, allenai/ai2_arc and baber/piqa in lm-eval 0.4.13). The command line sets
HF_HUB_OFFLINE=1 unless it is already set, so the data must be in the `datasets` cache
(HF_HOME or HF_DATASETS_CACHE). Run once with HF_HUB_OFFLINE=0 on a machine with network
access to fill the cache, or copy the data to local files and point a task of your own at
them with --include-path (a YAML config with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`).

NOTE: the standard tasks have not been run with this module, because the machine it was
written on has no copy of their data. The tests run a small local multiple-choice task on a
tiny random Llama, with lm-eval 0.4.13.

Scoring follows lm-eval's Hugging Face backend (HFLM). A context and continuation are
truncated on the left to `max_length` + 1 tokens. The log-probability is the sum over the
continuation's tokens, and the greedy flag is true when each of those tokens is the argmax.
Sequences of one batch are padded on the right. The exports are causal, so the logits at the
real positions do not depend on the padding.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from onnx_spike.pipeline.evaluate import load_tokenizer, log_softmax, paired_difference
from onnx_spike.pipeline.runtime import make_session, model_file, window_feeds

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("winogrande", "hellaswag", "arc_easy", "arc_challenge", "piqa")
# The fallback context length of lm-eval's HFLM when neither config nor tokenizer sets one.
DEFAULT_MAX_LENGTH = 2048
# transformers' model_max_length when the tokenizer config sets none (int(1e30)).
_TOKENIZER_UNSET_LENGTH = 1000000000000000019884624838656
_CONFIG_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
ACCURACY_METRICS = ("acc", "acc_norm")


@dataclass
class _ScoredSequence:
    """One loglikelihood request after truncation: the model input and the tokens it scores."""

    inputs: list[int]
    targets: list[int]


def config_max_length(folder: Path, tokenizer=None) -> int:
    """Read the context length from config.json, then the tokenizer, as lm-eval's HFLM does."""
    config_path = folder / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        for section in (config.get("text_config") or {}, config):
            for key in _CONFIG_LENGTH_KEYS:
                if isinstance(section.get(key), int) and section[key] > 0:
                    return section[key]
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _TOKENIZER_UNSET_LENGTH:
        return length
    return DEFAULT_MAX_LENGTH


class OnnxSpikeLM(TemplateLM):
    """An lm-eval model that runs an ONNX causal LM export folder on the onnxruntime CPU provider.

    Args:
        model_path: an export folder with `model.onnx`, or a `.onnx` file.
        tokenizer: the tokenizer folder, by default the model's folder.
        batch_size: the maximum number of sequences per forward pass.
        max_batch_tokens: the maximum of sequences × padded length per forward pass, which bounds
            the logits memory (batch × length × vocabulary floats).
        max_length: the context length in tokens, by default from the config.json beside the model
            (n_positions, max_position_embeddings or n_ctx), then the tokenizer, then 2048. An
            export with a fixed sequence length caps it.
        max_gen_toks: the default number of new tokens for `generate_until`.
        add_bos_token: passed to the tokenizer as `add_special_tokens`. None keeps the tokenizer's
            default, as HFLM does.
        threads: onnxruntime intra-op threads.
        progress: show tqdm progress bars.
    """

    def __init__(self, model_path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 batch_size: int = 8, max_batch_tokens: int = 8192, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, threads: int | None = None,
                 progress: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
        self.model_path = model_file(model_path)
        folder = Path(tokenizer) if tokenizer else self.model_path.parent
        if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"no tokenizer in {folder}; give an export folder or a tokenizer folder")
        self.tokenizer = load_tokenizer(folder)
        self.session = make_session(self.model_path, threads)
        self.add_bos_token = add_bos_token
        self.max_gen_toks = max_gen_toks
        self.progress = progress

        outputs = [output.name for output in self.session.get_outputs()]
        self._logits_name = "logits" if "logits" in outputs else outputs[0]
        input_ids = next((spec for spec in self.session.get_inputs() if spec.name == "input_ids"), None)
        if input_ids is None:
            raise ValueError(f"{self.model_path} has no input_ids input; it is not a causal LM export")
        batch_dim, length_dim = input_ids.shape[0], input_ids.shape[1]
        # Exports with fixed input shapes (e.g. torch.onnx dynamo) get every batch padded to them.
        self._static_batch = batch_dim if isinstance(batch_dim, int) else None
        self._static_length = length_dim if isinstance(length_dim, int) else None
        self.batch_size = min(batch_size, self._static_batch) if self._static_batch else batch_size
        self.max_batch_tokens = max_batch_tokens

        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        length = max_length or config_max_length(self.model_path.parent, self.tokenizer)
        if self._static_length:
            length = min(length, self._static_length)
        self._max_length = length
        self._cache_outputs = self._cache_output_names(outputs)
        candidates = (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0)
        self._pad_id = next(token for token in candidates if token is not None)

    # ------------------------------------------------------------ tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # The token that replaces an empty context: BOS where the tokenizer has one, as in HFLM.
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """Model details that `simple_evaluate` adds to the results' config."""
        return {"model_path": str(self.model_path), "max_length": self.max_length, "batch_size": self.batch_size}

    # ------------------------------------------------------------ forward passes

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        """Run one padded batch and return its logits, [rows, padded length, vocabulary]."""
        length = self._static_length or max(len(sequence) for sequence in sequences)
        rows = self._static_batch or len(sequences)
        tokens = np.full((rows, length), self._pad_id, dtype=np.int64)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = sequence
        logits = self.session.run([self._logits_name], window_feeds(self.session, tokens))[0]
        if logits.ndim != 3 or logits.shape[1] != length:
            raise ValueError(f"{self.model_path}: output {self._logits_name} has shape {list(logits.shape)}; "
                             f"expected logits for every position, [batch, {length}, vocabulary]")
        return logits

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Group indices, longest sequences first, into batches within batch_size and max_batch_tokens."""
        order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index]))
        batches, start = [], 0
        while start < len(order):
            padded_length = self._static_length or len(sequences[order[start]])
            size = max(1, min(self.batch_size, self.max_batch_tokens // padded_length))
            batches.append(order[start:start + size])
            start += size
        return batches

    def _truncate(self, context: list[int], continuation: list[int]) -> _ScoredSequence:
        if not context:
            raise ValueError("a loglikelihood request has no context tokens; lm-eval's loglikelihood "
                             "puts the prefix token there for an empty context")
        # NOTE: as in HFLM, a continuation longer than max_length has only its last max_length tokens
        # scored; _loglikelihood_tokens logs how many requests that affects.
        whole = (context + continuation)[-(self.max_length + 1):]
        return _ScoredSequence(inputs=whole[:-1], targets=whole[-min(len(continuation), len(whole) - 1):])

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score (cache key, context tokens, continuation tokens) requests in padded batches."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        scored: dict[int, _ScoredSequence] = {}
        for index, (_key, context, continuation) in enumerate(requests):
            if continuation:
                scored[index] = self._truncate(list(context), list(continuation))
            else:
                results[index] = (0.0, True)  # the empty string has probability 1

        too_long = sum(len(request[2]) > self.max_length for request in requests)
        if too_long:
            log.warning("%d continuation(s) are longer than max_length %d tokens; only their last %d tokens "
                        "are scored", too_long, self.max_length, self.max_length)
        indices = list(scored)
        inputs = [scored[index].inputs for index in indices]
        with tqdm(total=len(indices), desc="loglikelihood", disable=disable_tqdm or not self.progress) as bar:
            for batch in self._batches(inputs):
                logits = self.forward([inputs[position] for position in batch])
                for row, position in enumerate(batch):
                    index = indices[position]
                    results[index] = self._score(logits[row], scored[index])
                    key = requests[index][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, results[index])
                bar.update(len(batch))
        return results

    @staticmethod
    def _score(logits: np.ndarray, sequence: _ScoredSequence) -> tuple[float, bool]:
        end = len(sequence.inputs)
        count = len(sequence.targets)
        log_probs = log_softmax(logits[end - count:end])
        targets = np.asarray(sequence.targets)
        total = float(log_probs[np.arange(count), targets].sum())
        greedy = bool(np.all(log_probs.argmax(axis=-1) == targets))
        return total, greedy

    # ------------------------------------------------------------ rolling loglikelihood

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum the log-probabilities of whole strings, in windows of max_length tokens (lm-eval's
        rolling windows with one token of context, so every token is predicted once)."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            token_windows = get_rolling_token_windows(token_list=self.tok_encode(string),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(index)

        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (score, _greedy) in zip(owners, scores):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------ greedy generation

    def _cache_output_names(self, outputs: list[str]) -> dict[str, str] | None:
        """Map each past_key_values input to its present output, or None when the export has no
        usable key/value cache (then every generation step reruns the whole sequence)."""
        if self._static_length or self._static_batch:
            return None
        past = [spec.name for spec in self.session.get_inputs() if spec.name.startswith("past_key_values")]
        if not past:
            return None
        names = {name: name.replace("past_key_values", "present", 1) for name in past}
        if not all(output in outputs for output in names.values()):
            return None
        return names

    def _cached_step_feeds(self, token: int, past_length: int, present: dict[str, np.ndarray]) -> dict:
        feeds = {}
        for spec in self.session.get_inputs():
            integer = np.int32 if spec.type == "tensor(int32)" else np.int64
            if spec.name == "input_ids":
                feeds[spec.name] = np.array([[token]], dtype=integer)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, past_length + 1), dtype=integer)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.array([[past_length]], dtype=integer)
            elif spec.name == "token_type_ids":
                feeds[spec.name] = np.zeros((1, 1), dtype=integer)
            elif spec.name in self._cache_outputs:
                feeds[spec.name] = present[self._cache_outputs[spec.name]]
            else:
                raise ValueError(f"model input {spec.name!r} ({spec.type}) is not one this tool knows how to fill")
        return feeds

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int, until: tuple[str, ...] = ()) -> list[int]:
        """Generate up to `max_new_tokens` tokens by argmax. Generation stops early when the decoded
        tokens contain one of the `until` strings, the EOS token is generated or the sequence
        reaches max_length."""
        budget = min(max_new_tokens, self.max_length - len(prompt))
        if budget <= 0:
            return []
        until = tuple(term for term in until if term)
        if self._cache_outputs is None:
            return self._greedy_without_cache(prompt, budget, until)
        return self._greedy_with_cache(prompt, budget, until)

    def _finished(self, generated: list[int], budget: int, until: tuple[str, ...]) -> bool:
        if generated[-1] == self.eot_token_id or len(generated) >= budget:
            return True
        if not until:
            return False
        text = self.tok_decode(generated, skip_special_tokens=False)
        return any(term in text for term in until)

    def _greedy_without_cache(self, prompt: list[int], budget: int, until: tuple[str, ...]) -> list[int]:
        sequence, generated = list(prompt), []
        while True:
            token = int(self.forward([sequence])[0, len(sequence) - 1].argmax())
            generated.append(token)
            sequence.append(token)
            if self._finished(generated, budget, until):
                return generated

    def _greedy_with_cache(self, prompt: list[int], budget: int, until: tuple[str, ...]) -> list[int]:
        present_names = list(self._cache_outputs.values())
        feeds = window_feeds(self.session, np.asarray([prompt], dtype=np.int64))
        past_length, generated = len(prompt), []
        while True:
            outputs = self.session.run([self._logits_name, *present_names], feeds)
            token = int(outputs[0][0, -1].argmax())
            generated.append(token)
            if self._finished(generated, budget, until):
                return generated
            feeds = self._cached_step_feeds(token, past_length, dict(zip(present_names, outputs[1:])))
            past_length += 1

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, one request at a time, cut at the first stop sequence."""
        eos_text = ""
        if self.eot_token_id is not None:
            eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [term for term in ([until] if isinstance(until, str) else until) if term]
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new_tokens = self.max_gen_toks
            for alias in ("max_gen_toks", "max_new_tokens", "max_tokens"):
                if kwargs.get(alias) is not None:
                    max_new_tokens = int(kwargs[alias])
                    break
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                log.warning("generate_until: sampling %s was requested, but this model decodes greedily",
                            {key: kwargs.get(key) for key in ("do_sample", "temperature")})
            if max_new_tokens >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new_tokens} leaves no room for the context "
                                 f"in max_length {self.max_length}")

            prompt = self.tok_encode(context) or [self.prefix_token_id]
            prompt = prompt[-(self.max_length - max_new_tokens):]
            text = self.tok_decode(self.greedy_tokens(prompt, max_new_tokens, tuple(until)))
            for term in until:
                text = text.split(term)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


# ---------------------------------------------------------------- running tasks


def make_task_manager(include_path: str | os.PathLike | None = None) -> TaskManager:
    """Build lm-eval's task index of the built-in tasks and the YAML configs under `include_path`."""
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"task folder {include_path} not found")
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_task_names(tasks: list[str], task_manager: TaskManager) -> None:
    """Raise ValueError naming the tasks missing from lm-eval's task index, with close matches."""
    known = set(task_manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if not unknown:
        return
    hints = []
    for task in unknown:
        close = difflib.get_close_matches(task, known, n=3)
        hints.append(f"{task} (did you mean {', '.join(close)}?)" if close else task)
    raise ValueError(f"unknown lm-eval task(s): {'; '.join(hints)}; list the known tasks with "
                     "`lm-eval ls tasks` (lm-eval 0.4.13), or give the folder of your own task configs "
                     "with --include-path")


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_results_json(results: dict, path: str | os.PathLike) -> None:
    """Write the results, without the per-sample logs, atomically as JSON."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    data = {key: value for key, value in results.items() if key != "samples"}
    temporary.write_text(json.dumps(data, indent=2, default=_json_value))
    os.replace(temporary, target)


def run_lm_eval(model_path: str | os.PathLike, tasks: list[str] | str, limit: int | float | None = None,
                num_fewshot: int | None = 0, include_path: str | os.PathLike | None = None,
                output_json: str | os.PathLike | None = None, *, batch_size: int = 8,
                max_length: int | None = None, threads: int | None = None, log_samples: bool = False,
                task_manager: TaskManager | None = None, progress: bool = True) -> dict:
    """Evaluate an export folder on lm-eval tasks and return `simple_evaluate`'s results.

    `tasks` is a list of task names or one comma-separated string. `limit` caps the documents
    per task (a float below 1 is a fraction). With `log_samples`, the results contain the
    per-document scores under "samples", which `compare_accuracy` uses for the paired standard
    error. `output_json` receives the results without the samples. A given `task_manager` is used
    in place of one built from `include_path`, so that several runs share one task index.
    """
    if isinstance(tasks, str):
        tasks = [task.strip() for task in tasks.split(",") if task.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given; name at least one lm-eval task, e.g. arc_easy")
    task_manager = task_manager or make_task_manager(include_path)
    check_task_names(tasks, task_manager)

    model = OnnxSpikeLM(model_path, batch_size=batch_size, max_length=max_length, threads=threads,
                        progress=progress)
    log.info("running lm-eval tasks %s on %s", ",".join(tasks), model.model_path)
    results = simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=task_manager, log_samples=log_samples)
    if results is None:
        raise RuntimeError("lm-eval returned no results; this process is not its rank 0")
    results["model_path"] = str(model.model_path)
    if output_json:
        write_results_json(results, output_json)
    return results


# ---------------------------------------------------------------- accuracy tables


def accuracy_rows(results: dict) -> list[dict]:
    """List the accuracy metrics (acc, acc_norm) per task, with their standard errors."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for metric in ACCURACY_METRICS:
            value = metrics.get(f"{metric},none")
            if isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,none")
                rows.append({"task": task, "metric": metric, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def _per_document(results: dict, task: str, metric: str) -> dict[int, float]:
    return {sample["doc_id"]: float(sample[metric]) for sample in results.get("samples", {}).get(task, [])
            if metric in sample}


def compare_accuracy(converted: dict, baseline: dict) -> list[dict]:
    """Pair the accuracies of two runs per task and metric, with the difference (converted -
    baseline). When both results have samples, add the paired standard error over the shared
    documents."""
    baseline_values = {(row["task"], row["metric"]): row["value"] for row in accuracy_rows(baseline)}
    rows = []
    for row in accuracy_rows(converted):
        key = (row["task"], row["metric"])
        if key not in baseline_values:
            continue
        entry = {"task": row["task"], "metric": row["metric"], "baseline": baseline_values[key],
                 "converted": row["value"], "difference": row["value"] - baseline_values[key],
                 "paired_stderr": None}
        documents_converted = _per_document(converted, *key)
        documents_baseline = _per_document(baseline, *key)
        shared = sorted(set(documents_converted) & set(documents_baseline))
        if len(shared) > 1:
            paired = paired_difference(np.array([documents_baseline[d] for d in shared]),
                                       np.array([documents_converted[d] for d in shared]))
            entry["paired_stderr"] = paired["standard_error"]
        rows.append(entry)
    return rows


def _number(value: float | None, width: int, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>+{width}.4f}" if signed else f"{value:>{width}.4f}"


def render_accuracy(rows: list[dict], label: str = "") -> str:
    """Format `accuracy_rows` output (one model) as a text table."""
    lines = [f"lm-eval accuracy{' of ' + label if label else ''}", "",
             f"{'task':<28} {'metric':<9} {'value':>8} {'stderr':>8}"]
    for row in rows:
        lines.append(f"{row['task']:<28} {row['metric']:<9} {_number(row['value'], 8)} {_number(row['stderr'], 8)}")
    return "\n".join(lines)


def render_comparison(rows: list[dict]) -> str:
    """Format `compare_accuracy` output as a side-by-side text table."""
    lines = ["lm-eval accuracy, baseline and converted", "",
             f"{'task':<28} {'metric':<9} {'baseline':>9} {'converted':>9} {'difference':>10} {'paired SE':>9}"]
    for row in rows:
        lines.append(f"{row['task']:<28} {row['metric']:<9} {_number(row['baseline'], 9)} "
                     f"{_number(row['converted'], 9)} {_number(row['difference'], 10, signed=True)} "
                     f"{_number(row['paired_stderr'], 9)}")
    return "\n".join(lines)
