"""Tiny randomly initialised models for fast tests: built from a config, nothing downloaded.

The tokenizer is character level (every printable ASCII character is one token), so names of different
lengths get different token counts and digits are single tokens, as in SmolLM2, Qwen and Gemma.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with a ChatML chat template and offsets."""
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # TransformerBridge reloads a tokenizer from `name_or_path` unless it already adds BOS.
    tokenizer.init_kwargs.update(name_or_path="tiny-char", add_bos_token=True)
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A small Llama config with grouped-query attention (4 query heads, 2 key/value heads) and a gated MLP."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=5,
        pad_token_id=0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised tiny Llama and its tokenizer, in float32 and eval mode."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), **overrides)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer
