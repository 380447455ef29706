"""Tiny randomly initialised transformers exported to ONNX, for testing graph rewrites.

Every model is built from a transformers config object in code and never loaded
from a model hub, so the exports work offline. Each config has 2 layers, hidden
size 64, 4 attention heads and a vocabulary of 256. On a 2-core CPU with torch
2.13, one Optimum export took 0.2-0.7 s and one dynamo export 1.0-2.6 s.

Two exporters are covered:

* ``export_optimum``: ``optimum.exporters.onnx.main_export`` (TorchScript-based)
  at opset 18 with no optimization level, which keeps Softmax, the decomposed
  RMSNorm, ``LayerNormalization`` and ``Sigmoid`` + ``Mul`` visible.
* ``export_dynamo``: ``torch.onnx.export(..., dynamo=True)`` with fixed example
  input shapes.

Importing this module needs the ``export`` extra (torch, transformers, optimum).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

# Set before transformers is imported so that nothing tries to reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from optimum.exporters.onnx import main_export  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

SEED = 0
OPTIMUM_OPSET = 18
EXAMPLE_BATCH = 1
EXAMPLE_SEQUENCE_LENGTH = 8

# Packages whose versions enter the cache key of an Optimum export.
_KEY_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx")

# Sizes shared by the decoder configs. head_dim is explicit because Gemma and
# Qwen3 default to 256 and 128, not hidden_size / num_attention_heads.
_DECODER_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=128,
)


def llama_config() -> PretrainedConfig:
    return LlamaConfig(**_DECODER_SIZES)


def mistral_config() -> PretrainedConfig:
    # sliding_window keeps its default (4096), longer than max_position_embeddings.
    return MistralConfig(**_DECODER_SIZES)


def qwen2_config() -> PretrainedConfig:
    return Qwen2Config(**_DECODER_SIZES)


def qwen3_config() -> PretrainedConfig:
    # Qwen3 adds an RMSNorm over head_dim to q and to k in every layer.
    return Qwen3Config(**_DECODER_SIZES)


def phi3_config() -> PretrainedConfig:
    # The defaults pad_token_id=32000 and eos_token_id=32000 lie outside the
    # 256-token vocabulary, and the embedding rejects such a padding_idx.
    return Phi3Config(**_DECODER_SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma_config() -> PretrainedConfig:
    # Gemma's RMSNorm multiplies by (1 + weight), and its MLP uses tanh GELU.
    return GemmaConfig(**_DECODER_SIZES)


def gpt2_config() -> PretrainedConfig:
    # GPT-2 uses LayerNorm and the tanh GELU ("gelu_new").
    return GPT2Config(
        n_embd=64,
        n_inner=128,
        n_layer=2,
        n_head=4,
        vocab_size=256,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )


def bert_config() -> PretrainedConfig:
    # BERT uses LayerNorm and the erf GELU ("gelu").
    return BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
    )


ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": llama_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "phi3": phi3_config,
    "gemma": gemma_config,
    "gpt2": gpt2_config,
    "bert": bert_config,
}

ENCODER_ARCHITECTURES = frozenset({"bert"})
DECODER_ARCHITECTURES = frozenset(ARCHITECTURES) - ENCODER_ARCHITECTURES


def default_task(arch: str) -> str:
    """Return the Optimum task used when ``export_optimum`` gets ``task=None``."""
    _check_arch(arch)
    return "fill-mask" if arch in ENCODER_ARCHITECTURES else "text-generation"


def build_model(arch: str, seed: int = SEED) -> PreTrainedModel:
    """Build a randomly initialised fp32 model in eval mode, deterministic for a seed.

    Decoders get a causal-LM head and encoders a masked-LM head. transformers
    initialises norm weights to 1 (0 for Gemma's 1 + weight form) and biases to 0.
    Every 1-D parameter therefore gets N(0, 0.1) noise added, so that a rewrite
    which drops or misplaces a norm weight or bias changes the output, and so
    that the exporter cannot share one initializer between equal-valued weights.
    """
    config = ARCHITECTURES[_check_arch(arch)]()
    model_class = AutoModelForMaskedLM if arch in ENCODER_ARCHITECTURES else AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model_class.from_config(config, dtype=torch.float32)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))

    return model.eval()


def example_inputs(
    arch: str, batch: int = EXAMPLE_BATCH, sequence_length: int = EXAMPLE_SEQUENCE_LENGTH
) -> dict[str, np.ndarray]:
    """Return int64 ``input_ids`` and an all-ones ``attention_mask``, fixed by SEED."""
    vocab_size = ARCHITECTURES[_check_arch(arch)]().vocab_size
    rng = np.random.default_rng(SEED)
    return {
        "input_ids": rng.integers(0, vocab_size, size=(batch, sequence_length), dtype=np.int64),
        "attention_mask": np.ones((batch, sequence_length), dtype=np.int64),
    }


def export_optimum(
    arch: str,
    out_dir: str | Path,
    dtype: str = "fp32",
    task: str | None = None,
) -> Path:
    """Export ``arch`` with Optimum at opset 18 and return the path of its model.onnx.

    ``task`` defaults to ``default_task(arch)``. Decoders also accept
    "text-generation-with-past" and BERT accepts "feature-extraction". The
    export goes to ``out_dir/<arch>-optimum-<dtype>`` for the default task and
    to ``out_dir/<arch>-optimum-<dtype>-<task>`` otherwise. A folder whose
    zoo_key.json matches (arch, dtype, task, opset, seed, config, SHA-256 of
    this file, package versions) is reused without exporting again.

    Optimum validates the export against PyTorch in onnxruntime. It only logs
    a warning when the outputs differ by more than its tolerance, so this
    function does not check numerics. main_export raises RuntimeError when
    onnxruntime cannot load the model, and the folder then keeps that
    model.onnx without zoo_key.json.

    NOTE: with torch 2.13 and optimum-onnx 0.1.0 the fp16 exports are mixed
    precision. The TorchScript exporter runs the attention from the mask Add
    onwards in fp32, and with it o_proj and the residual stream (for Gemma,
    every op after the first attention), storing those weights as fp32
    initializers. For gpt2 this gives LayerNormalization an fp32 input and
    fp16 weights, so the gpt2 fp16 export fails to load.
    """
    _check_arch(arch)
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"Invalid dtype {dtype!r}: expected 'fp32' or 'fp16'.")
    task = task or default_task(arch)

    suffix = "" if task == default_task(arch) else f"-{task}"
    export_dir = Path(out_dir) / f"{arch}-optimum-{dtype}{suffix}"
    model_path = export_dir / "model.onnx"
    key = _cache_key(arch, dtype=dtype, task=task, opset=OPTIMUM_OPSET)
    key_path = export_dir / "zoo_key.json"
    if model_path.exists() and key_path.exists() and json.loads(key_path.read_text()) == key:
        return model_path

    key_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"zoo-{arch}-") as checkpoint_dir:
        # The checkpoint is always saved in fp32. main_export loads it in `dtype`.
        build_model(arch).save_pretrained(checkpoint_dir)
        main_export(
            checkpoint_dir,
            export_dir,
            task=task,
            opset=OPTIMUM_OPSET,
            dtype=dtype,
            optimize=None,
            local_files_only=True,
            library_name="transformers",
        )

    key_path.write_text(json.dumps(key, indent=1, sort_keys=True))
    return model_path


def export_dynamo(arch: str, out_path: str | Path, opset: int = 18) -> Path:
    """Export ``arch`` in fp32 with ``torch.onnx.export(dynamo=True)`` to ``out_path``.

    The graph has the static input shapes of ``example_inputs(arch)``, inputs
    ``input_ids`` and ``attention_mask``, and one output named ``logits``.
    Weights are stored inside the .onnx file. Exporter errors propagate.
    """
    model = build_model(arch)
    if arch in DECODER_ARCHITECTURES:
        # With the cache on, the model returns a DynamicCache, which torch.export
        # rejects as an output type.
        model.config.use_cache = False

    inputs = {name: torch.from_numpy(array) for name, array in example_inputs(arch).items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (),
        str(out_path),
        kwargs=inputs,
        input_names=list(inputs),
        output_names=["logits"],
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    return out_path


def count_ops(model_path: str | Path) -> dict[str, int]:
    """Count nodes per op type in the main graph, nested subgraphs and model-local functions.

    Keys are "op_type" for the default ONNX domain and "domain::op_type"
    otherwise. A function's body is counted once, however many nodes call it.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    counts: collections.Counter[str] = collections.Counter()

    def visit(nodes) -> None:
        for node in nodes:
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[name] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph in attribute.graphs:
                        visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return dict(counts)


def _check_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}: expected one of {sorted(ARCHITECTURES)}.")
    return arch


def _cache_key(arch: str, **fields) -> dict:
    # The key contains the SHA-256 of this file in place of the model-building
    # code, so any edit here invalidates every cached export.
    key = {
        "arch": arch,
        **fields,
        "seed": SEED,
        "config": ARCHITECTURES[arch]().to_diff_dict(),
        "model_zoo_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "packages": {name: importlib.metadata.version(name) for name in _KEY_PACKAGES},
    }
    # Round-trip through JSON so that tuples compare equal to the stored lists.
    return json.loads(json.dumps(key, sort_keys=True))
