"""Verify many requests in ONE target forward, each with its own KV cache.

Requests hold caches of different lengths (and Gemma's sliding layers hold only the last
``window - 1`` tokens). For a step we gather every request's cached keys/values into one
left-padded batch cache, run ``[R, N]`` new tokens (right-padded, explicit positions)
with an attention mask per layer type that hides the padding and applies causality and
the sliding window by absolute position, and append each request's new keys/values back
to its own cache. Rollback then works per request exactly as after a single forward.

Supported: HF decoders that take a per-layer-type mask mapping (``attention_mask`` as a
dict, the transformers v5 idiom of Gemma 3, Qwen3, ...) with full and sliding attention
layers, under the eager or SDPA attention kernels. :func:`supports` says whether a target
qualifies; the engine falls back to one forward per request otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from dspark.target import Target

_TYPES = ("full_attention", "sliding_attention")


def layer_types(target: Target) -> list[str]:
    cfg = target.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * target.num_layers
    return list(types)


def supports(target: Target) -> bool:
    """Whether :func:`batched_forward` can run this target exactly."""
    try:
        src = inspect.getsource(type(target.decoder).forward)
    except (OSError, TypeError):
        return False
    impl = getattr(target.config, "_attn_implementation", None) or "eager"
    return (
        "causal_mask_mapping := attention_mask, dict" in src
        and set(layer_types(target)) <= set(_TYPES)
        and impl in ("eager", "sdpa")
    )


def _stored(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.keys, layer.values


@torch.inference_mode()
def batched_forward(
    target: Target, caches: Sequence[Any], tokens: Sequence[Sequence[int]], taps: Sequence[int] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Feed ``tokens[r]`` after ``caches[r]`` for every r in one forward.

    Returns logits [R, N, V] (rows past ``len(tokens[r])`` are padding) and the tapped
    layer outputs {layer: [R, N, d]}. Each cache gains exactly its own new tokens, as if
    it had been fed alone; the caller rolls back rejected ones as usual.
    """
    from transformers import DynamicCache

    R = len(tokens)
    lens = [len(t) for t in tokens]
    if R == 0 or min(lens) == 0:
        raise ValueError("every request needs at least one token to verify")
    N = max(lens)
    dev = target.device
    ids = torch.zeros((R, N), dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(list(t), dtype=torch.long)
        ids[i, len(t) :] = t[-1]
    past = torch.tensor([target.cache_length(c) for c in caches], dtype=torch.long)  # tokens each request has seen
    q_pos = past[:, None] + torch.arange(N)[None, :]  # [R, N]

    types = layer_types(target)
    big = DynamicCache()
    kinfo: dict[str, tuple[int, torch.Tensor]] = {}  # type -> (padded past length, key positions [R, S+N] or -1 for pad)
    for li, ty in enumerate(types):
        ks, vs = zip(*(_stored(c.layers[li]) for c in caches))
        stored = [int(k.shape[-2]) for k in ks]
        S = max(stored)
        k0 = ks[0]
        kp = k0.new_zeros((R, k0.shape[1], S, k0.shape[-1]))
        vp = vs[0].new_zeros((R, vs[0].shape[1], S, vs[0].shape[-1]))
        for i, (k, v, s) in enumerate(zip(ks, vs, stored)):
            if s:
                kp[i, :, S - s :] = k[0]
                vp[i, :, S - s :] = v[0]
        big.update(kp, vp, li)
        pos = torch.full((R, S + N), -1, dtype=torch.long)
        for i, s in enumerate(stored):
            # a request's stored keys are its most recent ``s`` tokens: positions past-s .. past-1
            pos[i, S - s : S] = torch.arange(int(past[i]) - s, int(past[i]))
            pos[i, S:] = q_pos[i]
        if ty in kinfo:
            if kinfo[ty][0] != S or not torch.equal(kinfo[ty][1], pos):
                raise RuntimeError(f"layers of type {ty} hold different cache lengths; cannot share one mask")
        else:
            kinfo[ty] = (S, pos)

    dtype = target.dtype
    neg = torch.finfo(dtype).min
    window = getattr(target.config, "sliding_window", None)
    masks = {}
    for ty, (S, kpos) in kinfo.items():
        q = q_pos[:, :, None]  # [R, N, 1]
        k = kpos[:, None, :]  # [R, 1, S+N]
        ok = (k >= 0) & (k <= q)
        if ty == "sliding_attention" and window:
            ok &= k > q - window
        m = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, neg)
        masks[ty] = m[:, None].to(dev)  # [R, 1, N, S+N]

    out = target.forward(ids, big, logits="all", taps=taps, model_kwargs={"attention_mask": masks, "position_ids": q_pos.to(dev)})
    for li, ty in enumerate(types):
        S = kinfo[ty][0]
        layer = big.layers[li]
        for i, c in enumerate(caches):
            n = lens[i]
            c.layers[li].update(layer.keys[i : i + 1, :, S : S + n], layer.values[i : i + 1, :, S : S + n])
    return out.logits, out.taps
