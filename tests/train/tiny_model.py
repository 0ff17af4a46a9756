"""A tiny random Gemma 3 (or Qwen3) saved as a real HF model directory with a byte-level
tokenizer, so the whole training pipeline (and, for Qwen3, vLLM) can run against it."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model_dir(path: Path, family: str = "gemma3", init_std: float = 0.02) -> Path:
    """``family`` gemma3 (hidden 32) or qwen3 (hidden 128, head_dim 64: sizes vLLM's CPU
    attention accepts). Token ids: 0 pad, 1 eos, 2 bos, 3 mask, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<pad>", "<eos>", "<bos>", "<mask>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", mask_token="<mask>")
    torch.manual_seed(0)
    if family == "qwen3":
        qcfg = Qwen3Config(
            vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, initializer_range=init_std,
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
        Qwen3ForCausalLM(qcfg).save_pretrained(path)
        fast.save_pretrained(path)
        return path
    if family != "gemma3":
        raise ValueError(f"family must be gemma3 or qwen3, got {family!r}")
    cfg = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=init_std,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path
