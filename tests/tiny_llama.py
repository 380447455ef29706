"""A tiny random Llama exported with Optimum, its word-level tokenizer and synthetic plays.

Shared by the pipeline and report tests. The text uses 200 alphabetic words in lines that
end with a period, so every line ends with a cloze target word.
"""

from __future__ import annotations

import numpy as np

WORDS = [f"wrd{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(200)]


def play_text(seed: int, lines: int = 400) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) + "." for _ in range(lines))


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", "."] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_input_names=["input_ids", "attention_mask"])


def save_one_layer_llama(tmp_path_factory):
    """Save a seeded 1-layer Llama with a 64-token vocabulary and return its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def export_tiny_llama(tmp_path_factory, tokenizer):
    """Save a seeded 2-layer Llama with `tokenizer` and export it with Optimum; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnx_spike.pipeline.export import export_model

    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return export_model(folder, tmp_path_factory.mktemp("onnx") / "original", progress=False)
