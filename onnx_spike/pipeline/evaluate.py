"""Validate and evaluate a converted LM against its original, side by side on the same text.

`validate`: a few windows through both models; per output the max and mean absolute
difference, next-token top-1 agreement and the KL divergence of the next-token
distributions.

`evaluate`: perplexity over non-overlapping token windows, the same agreement and KL over all
positions, and last-word cloze accuracy. The cloze items are read from the same forward
windows: every line of the evaluation plays whose last word falls inside a window, after at
least `min_context` tokens of it, is one item; its score is the sum of the log-probabilities
of the word's tokens, and it is correct when the argmax at each of those positions is the
word's token (what greedy decoding would write). The accuracy difference is paired per item,
with its standard error.

Both report, per converted site, how many activations saturated at the site's encode on
the first windows (the original model is run with the site inputs exposed).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from onnx_spike.pipeline import text as text_data
from onnx_spike.pipeline.runtime import SiteProbe, logits_of, make_session, spiking_sites

log = logging.getLogger(__name__)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class WindowStats:
    """Running sums over the positions of all windows."""

    nll_original: float = 0.0
    nll_converted: float = 0.0
    tokens: int = 0
    agree: int = 0
    positions: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    max_abs_logit_diff: float = 0.0
    sum_abs_logit_diff: float = 0.0
    logit_count: int = 0

    def add(self, tokens: np.ndarray, original: np.ndarray, converted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_p = log_softmax(original[0])
        log_q = log_softmax(converted[0])
        targets = tokens[1:]
        rows = np.arange(len(targets))
        self.nll_original -= float(log_p[rows, targets].sum())
        self.nll_converted -= float(log_q[rows, targets].sum())
        self.tokens += len(targets)

        self.agree += int(np.count_nonzero(log_p.argmax(-1) == log_q.argmax(-1)))
        self.positions += log_p.shape[0]
        kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))

        difference = np.abs(original.astype(np.float64) - converted.astype(np.float64))
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(np.nanmax(difference)))
        self.sum_abs_logit_diff += float(np.nansum(difference))
        self.logit_count += difference.size
        return log_p, log_q

    def summary(self) -> dict:
        ppl_original = math.exp(self.nll_original / self.tokens)
        ppl_converted = math.exp(self.nll_converted / self.tokens)
        return {
            "tokens": self.tokens,
            "perplexity_original": ppl_original,
            "perplexity_converted": ppl_converted,
            "perplexity_change": ppl_converted / ppl_original - 1.0,
            "top1_agreement": self.agree / self.positions,
            "kl_mean": self.kl_sum / self.positions,
            "kl_max": self.kl_max,
            "logits_max_abs_diff": self.max_abs_logit_diff,
            "logits_mean_abs_diff": self.sum_abs_logit_diff / max(self.logit_count, 1),
        }


@dataclass
class ClozeTarget:
    window: int
    position: int  # index of the first target token in the window
    token_ids: tuple[int, ...]
    word: str


def cloze_targets(tokenizer, plays: dict[str, str], window_length: int, num_windows: int,
                  min_context: int) -> tuple[np.ndarray, list[ClozeTarget]]:
    """Token windows of the joined plays, and the line-final words that fall inside them."""
    joined = text_data.join_plays(plays)
    encoding = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    offsets = encoding["offset_mapping"]
    count = min(num_windows, len(ids) // window_length)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window_length}")
    windows = ids[:count * window_length].reshape(count, window_length)

    start_of = {start: index for index, (start, _end) in enumerate(offsets)}
    play_offsets, position = {}, 0
    for play, content in plays.items():
        play_offsets[play] = position
        position += len(content) + len(text_data.PLAY_SEPARATOR)

    targets = []
    for candidate in text_data.find_cloze_candidates(plays):
        space = play_offsets[candidate.play] + candidate.space_offset
        word_end = space + 1 + len(candidate.word)
        # Byte-level BPE tokens start at the space before a word; word-level tokens at the word.
        first = start_of.get(space, start_of.get(space + 1))
        if first is None or first >= count * window_length:
            continue
        last = first
        while last < len(offsets) and offsets[last][1] < word_end:
            last += 1
        if last >= len(offsets) or offsets[last][1] != word_end:
            continue  # a token runs past the word: the target would include punctuation
        window, offset = divmod(first, window_length)
        if offset < min_context or offset + (last - first) >= window_length:
            continue
        targets.append(ClozeTarget(window, offset, tuple(int(t) for t in ids[first:last + 1]), candidate.word))
    return windows, targets


def score_cloze(target: ClozeTarget, log_probs: np.ndarray) -> tuple[float, bool]:
    rows = np.arange(target.position - 1, target.position - 1 + len(target.token_ids))
    tokens = np.asarray(target.token_ids)
    picked = log_probs[rows, tokens]
    return float(picked.sum()), bool(np.all(log_probs[rows].argmax(-1) == tokens))


def paired_difference(original: np.ndarray, converted: np.ndarray) -> dict:
    difference = converted.astype(np.float64) - original.astype(np.float64)
    n = len(difference)
    return {"items": n, "accuracy_original": float(original.mean()), "accuracy_converted": float(converted.mean()),
            "difference": float(difference.mean()),
            "standard_error": float(difference.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}


@dataclass
class EvaluationResult:
    window_length: int
    windows: int
    stats: dict
    cloze: dict | None = None
    saturation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"window_length": self.window_length, "windows": self.windows, **self.stats,
                "cloze": self.cloze, "saturation": self.saturation}


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def evaluate(original: str | os.PathLike, converted: str | os.PathLike, plays: dict[str, str], tokenizer,
             window_length: int = 512, num_windows: int = 32, min_context: int = 32, cloze: bool = True,
             saturation_windows: int = 2, threads: int | None = None, progress: bool = True) -> EvaluationResult:
    """Perplexity, agreement, KL and cloze of `converted` against `original` on `plays`."""
    spiking_sites(converted)  # fails early when `converted` is not a converted model
    windows, targets = cloze_targets(tokenizer, plays, window_length, num_windows, min_context)
    by_window: dict[int, list[ClozeTarget]] = {}
    for target in targets:
        by_window.setdefault(target.window, []).append(target)

    session_original = make_session(original, threads)
    session_converted = make_session(converted, threads)
    stats = WindowStats()
    scores_original, scores_converted, correct_original, correct_converted = [], [], [], []
    for index in tqdm(range(len(windows)), desc=f"evaluate {window_length}-token windows", disable=not progress):
        tokens = windows[index]
        log_p, log_q = stats.add(tokens, logits_of(session_original, tokens), logits_of(session_converted, tokens))
        for target in by_window.get(index, []):
            score, correct = score_cloze(target, log_p)
            scores_original.append(score)
            correct_original.append(correct)
            score, correct = score_cloze(target, log_q)
            scores_converted.append(score)
            correct_converted.append(correct)

    cloze_result = None
    if cloze and correct_original:
        cloze_result = paired_difference(np.array(correct_original), np.array(correct_converted))
        cloze_result["mean_log_prob_original"] = float(np.mean(scores_original))
        cloze_result["mean_log_prob_converted"] = float(np.mean(scores_converted))

    saturation = count_saturation(original, converted, windows[:saturation_windows], threads)
    return EvaluationResult(window_length, len(windows), stats.summary(), cloze_result, saturation)


def count_saturation(original, converted, windows: np.ndarray, threads: int | None = None) -> dict:
    """Per site: activations clipped at the encode, over `windows`, from the original model's values."""
    if len(windows) == 0:
        return {}
    sites = spiking_sites(converted)
    probe = SiteProbe(original, sites, threads)
    try:
        totals: dict[str, dict] = {}
        for tokens in windows:
            probe.count(tokens, totals)
    finally:
        probe.close()
    return totals


def validate(original: str | os.PathLike, converted: str | os.PathLike, windows: np.ndarray,
             threads: int | None = None, progress: bool = True) -> dict:
    """Run both models on `windows` ([n, length] token ids); compare every output and the next-token
    distributions."""
    spiking_sites(converted)  # fails early when `converted` is not a converted model
    session_original = make_session(original, threads)
    session_converted = make_session(converted, threads)
    names = [o.name for o in session_original.get_outputs()]
    converted_names = [o.name for o in session_converted.get_outputs()]
    if names != converted_names:
        raise ValueError(f"the outputs of {converted} ({converted_names}) differ from those of {original} ({names}); "
                         "give the converted model together with the original it was converted from")
    from onnx_spike.pipeline.runtime import window_feeds

    per_output = {name: {"max_abs_diff": 0.0, "sum_abs_diff": 0.0, "count": 0, "nan_mismatch": 0} for name in names}
    stats = WindowStats()
    for tokens in tqdm(windows, desc="validate", disable=not progress):
        outputs_original = session_original.run(None, window_feeds(session_original, tokens))
        outputs_converted = session_converted.run(None, window_feeds(session_converted, tokens))
        for name, a, b in zip(names, outputs_original, outputs_converted):
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            entry = per_output[name]
            entry["nan_mismatch"] += int(np.count_nonzero(np.isnan(a64) != np.isnan(b64)))
            both = ~np.isnan(a64) & ~np.isnan(b64)
            difference = np.abs(a64[both] - b64[both])
            if difference.size:
                entry["max_abs_diff"] = max(entry["max_abs_diff"], float(difference.max()))
                entry["sum_abs_diff"] += float(difference.sum())
                entry["count"] += difference.size
        logits_index = names.index("logits") if "logits" in names else 0
        stats.add(tokens, outputs_original[logits_index], outputs_converted[logits_index])

    outputs = {name: {"max_abs_diff": e["max_abs_diff"], "mean_abs_diff": e["sum_abs_diff"] / max(e["count"], 1),
                      "nan_mismatch": e["nan_mismatch"]} for name, e in per_output.items()}
    summary = stats.summary()
    return {"windows": int(len(windows)), "window_length": int(windows.shape[1]), "outputs": outputs,
            "top1_agreement": summary["top1_agreement"], "kl_mean": summary["kl_mean"], "kl_max": summary["kl_max"],
            "perplexity_original": summary["perplexity_original"],
            "perplexity_converted": summary["perplexity_converted"],
            "saturation": count_saturation(original, converted, windows, threads)}
