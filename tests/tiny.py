"""Tiny random-init targets of the real architectures, for fast CPU tests."""

from __future__ import annotations

import torch

from dspark.target import Target


def tiny_gemma3(vocab: int = 64, sliding_window: int = 8, layers: int = 3, seed: int = 0, init_std: float = 0.02) -> Target:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        max_position_embeddings=512,
        initializer_range=init_std,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Gemma3ForCausalLM(cfg).float().eval()
    return Target(model, tokenizer=None, name="tiny-gemma3")


def tiny_qwen3(vocab: int = 64, layers: int = 2, seed: int = 0) -> Target:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen3ForCausalLM(cfg).float().eval()
    return Target(model, tokenizer=None, name="tiny-qwen3")
