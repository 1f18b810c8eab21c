"""Tiny randomly initialised models of every supported architecture, built in the tests (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from sinkquant.models import LoadedModel, random_model

VOCAB = 49152  # SmolLM2's tokenizer is reused, so the vocab must cover its ids


def tiny_config(arch: str) -> PretrainedConfig:
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                sliding_window=64, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "gemma3", "gpt2", "opt", "gpt_neox")


def tiny_model(arch: str, tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    return random_model(tiny_config(arch), tokenizer, spec=f"tiny-{arch}")


def tiny_folder(arch: str, tokenizer, folder: Path) -> Path:
    """A tiny model of `arch` saved as a safetensors folder with its tokenizer, as `--model FOLDER` reads it."""
    tiny_model(arch, tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
