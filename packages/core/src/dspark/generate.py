"""Batch-1 reference loops: the autoregressive baseline and the speculative oracle.

These are deliberately small and readable. The batched engine (engine.py) is tested
against them: same greedy output token for token, same sampling distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dspark.drafters.base import Drafter, DraftState
from dspark.errors import InvalidRequestError
from dspark.metrics import SpecStats
from dspark.sampling import SamplingParams, probs_from_logits, sample, sample_from_logits
from dspark.target import Target


@dataclass
class GenerationConfig:
    """max_new_tokens > 0; stop_token_ids None means the target's end-of-sequence ids;
    seed None means unseeded."""

    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")

    def stops(self, target: Target) -> list[int]:
        return list(self.stop_token_ids) if self.stop_token_ids is not None else target.eos_token_ids

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: Literal["stop", "length"]
    stats: SpecStats


def check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise InvalidRequestError("empty prompt: at least one token is needed")
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def _ids(tokens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long, device=device)


def _decoder_step(target: Target, capacity: int) -> Callable[[list[int]], torch.Tensor]:
    """tokens -> the final hidden state [1, d] after feeding them: through a one-slot
    :class:`~dspark.slot_cache.SlotKVCache` and the lean decoder step where the target
    has one (:mod:`dspark.fast_decoder`), else HF's forward over a plain cache."""
    from dspark.slot_cache import SlotKVCache

    kv = SlotKVCache(target, slots=1, capacity=capacity)  # decides (and refuses) as the engine does
    if kv.fast is not None:
        kv.add(0)
        return lambda toks: kv.forward([0], [toks], logits="last_hidden")[0][:, -1]
    cache = target.new_cache(rollback=False)  # plain decoding never rolls back
    return lambda toks: target.forward(_ids(toks, target.device), cache, logits="none",
                                       final_hidden=True).final_hidden[:, -1]


@torch.inference_mode()
def ar_generate(target: Target, prompt_ids: Sequence[int], cfg: GenerationConfig) -> GenerationResult:
    """Plain autoregressive decoding with a KV cache (greedy or sampled)."""
    check_prompt(prompt_ids, target.vocab_size)
    gen, stops, params = cfg.generator(target.device), set(cfg.stops(target)), cfg.sampling
    stats = SpecStats()
    t0 = time.perf_counter()
    # the final hidden state, not logits: target.next_tokens may pick through the LM head's fp16 screen
    step = _decoder_step(target, len(prompt_ids) + min(cfg.max_new_tokens, 512))  # grows if needed
    hidden = step(list(prompt_ids))
    out: list[int] = []
    reason: Literal["stop", "length"] = "length"
    while True:
        tok = int(target.next_tokens(hidden, params, gen)[0])
        out.append(tok)
        stats.record(0, 0)
        if tok in stops:
            reason = "stop"
            break
        if len(out) >= cfg.max_new_tokens:
            break
        hidden = step([tok])
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
    return GenerationResult(out, reason, stats)


@torch.inference_mode()
def speculative_generate_reference(
    target: Target,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    cfg: GenerationConfig,
    num_draft: int = 7,
) -> GenerationResult:
    """The oracle: one request, one readable draft -> verify -> commit loop.

    Written independently of verify.py (scalar acceptance tests, inline residual) so
    the two implementations check each other.
    """
    check_prompt(prompt_ids, target.vocab_size)
    gen, stops, params = cfg.generator(target.device), set(cfg.stops(target)), cfg.sampling
    stats = SpecStats()
    t0 = time.perf_counter()
    cache = target.new_cache()
    seq = list(prompt_ids)
    logits = target.forward(_ids(seq, target.device), cache, logits="last").logits[:, -1]
    seq.append(int(sample_from_logits(logits, params, gen)[0]))  # the first anchor
    out = [seq[-1]]
    while out[-1] not in stops and len(out) < cfg.max_new_tokens:
        budget = min(num_draft, cfg.max_new_tokens - len(out) - 1)
        prop = drafter.propose(DraftState([seq], [0], budget, params, gen))
        n = min(int(prop.lens[0]), budget)
        drafts = prop.tokens[0, :n].tolist()
        # one target call scores the anchor and every draft: n + 1 distributions
        logits = target.forward(_ids([seq[-1], *drafts], target.device), cache, logits="all").logits[0]
        p = probs_from_logits(logits, params)  # [n+1, V] fp32; one-hot when greedy
        new: list[int] = []
        accepted = 0
        for i, x in enumerate(drafts):
            q_x = 1.0 if prop.probs is None else float(prop.probs[0, i, x])
            if params.greedy:
                ok = x == int(p[i].argmax())
            else:
                ok = float(torch.rand((), generator=gen, device=p.device)) * q_x < float(p[i, x])
            if not ok:
                # rejected: resample from what the target wants and the draft over-offered
                q = torch.zeros_like(p[i])
                if prop.probs is None:
                    q[x] = 1.0
                else:
                    q = prop.probs[0, i].float()
                r = (p[i] - q).clamp_min(0)
                r = p[i] if float(r.sum()) <= 1e-6 else r
                new.append(int(r.argmax()) if params.greedy else int(sample(r[None], gen)[0]))
                break
            new.append(x)
            accepted += 1
            if x in stops:  # a stop token among the accepted drafts ends generation here
                break
        else:
            # every draft survived: the target's next distribution gives a bonus token
            new.append(int(p[n].argmax()) if params.greedy else int(sample(p[n][None], gen)[0]))
        stats.record(n, accepted)
        target.rollback(cache, n - accepted)  # keep the anchor and the accepted drafts
        for t in new:
            seq.append(t)
            out.append(t)
            if t in stops or len(out) >= cfg.max_new_tokens:
                break
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - t0
    reason: Literal["stop", "length"] = "stop" if out[-1] in stops else "length"
    return GenerationResult(out, reason, stats)
