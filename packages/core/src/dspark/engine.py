"""The speculative decoding engine: draft -> verify -> commit over a batch of requests.

Each round every active request gets a draft of its own length (ragged, possibly 0),
the target scores ``[anchor, drafts]`` for every request, and :func:`dspark.verify.verify`
decides what is committed. Requests finish independently (stop token or token budget).

Two ways to run the target, with identical results:
- ``kv``: one rollback-able KV cache per request (the real path);
- ``recompute``: no cache, the whole right-padded batch is re-run each round. Causal
  attention makes right padding harmless, so this path is exact and lets tests push tens
  of thousands of tiny requests through the real engine in one forward per round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import torch

from dspark.drafters.base import Drafter, DraftState, Proposal
from dspark.generate import GenerationConfig, GenerationResult, check_prompt
from dspark.metrics import SpecStats
from dspark.sampling import sample_from_logits
from dspark.target import Target
from dspark.verify import verify

CacheMode = Literal["kv", "recompute"]


class _KVRunner:
    """One KV cache per request; invariant: cache r holds seqs[r][:-1] (all but the anchor)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.caches: dict[int, object] = {}

    def prefill(self, rows: Sequence[int], seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        out = []
        for r in rows:
            self.caches[r] = self.target.new_cache()
            ids = torch.tensor([list(seqs[r])], device=self.target.device)
            out.append(self.target.forward(ids, self.caches[r], logits="last").logits[0, -1])
            self.target.rollback(self.caches[r], 0)
        return torch.stack(out)  # [B, V]

    def score(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], drafts: list[list[int]], k: int) -> torch.Tensor:
        out = torch.empty((len(rows), k + 1, self.target.vocab_size), device=self.target.device)
        for i, (r, d) in enumerate(zip(rows, drafts)):
            ids = torch.tensor([[seqs[r][-1], *d]], device=self.target.device)
            lg = self.target.forward(ids, self.caches[r], logits="all").logits[0]
            out[i, : len(d) + 1] = lg
            out[i, len(d) + 1 :] = lg[-1:]  # padding, never read by the verifier
        return out  # [B, k+1, V]

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        self.target.rollback(self.caches[row], fed_drafts - accepted)

    def release(self, row: int) -> None:
        self.caches.pop(row, None)


class _RecomputeRunner:
    """No cache: each round re-runs every active sequence, right-padded, in one forward."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def _run(self, rows_tokens: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in rows_tokens)
        ids = torch.zeros((len(rows_tokens), width), dtype=torch.long)
        for i, t in enumerate(rows_tokens):
            ids[i, : len(t)] = torch.tensor(t)
        return self.target.forward(ids.to(self.target.device), None, logits="all").logits

    def prefill(self, rows: Sequence[int], seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        toks = [list(seqs[r]) for r in rows]
        logits = self._run(toks)
        last = torch.tensor([len(t) - 1 for t in toks], device=logits.device)
        return logits[torch.arange(len(toks)), last]

    def score(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], drafts: list[list[int]], k: int) -> torch.Tensor:
        toks = [list(seqs[r]) + d for r, d in zip(rows, drafts)]
        logits = self._run(toks)
        # slot j of row i is the position of the anchor + j (clamped into the real tokens)
        start = torch.tensor([len(seqs[r]) - 1 for r in rows], device=logits.device)
        pos = start[:, None] + torch.arange(k + 1, device=logits.device)[None, :]
        lens = torch.tensor([len(t) - 1 for t in toks], device=logits.device)
        pos = torch.minimum(pos, lens[:, None])
        return logits[torch.arange(len(rows), device=logits.device)[:, None], pos]

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        pass

    def release(self, row: int) -> None:
        pass


class SpeculativeEngine:
    """Batched speculative decoding with any :class:`Drafter` (or none: plain AR).

    num_draft: the most draft tokens verified per request per round (gamma).
    """

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None,
        num_draft: int = 7,
        cache_mode: CacheMode = "kv",
    ) -> None:
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        if cache_mode not in ("kv", "recompute"):
            raise ValueError(f"cache_mode must be kv or recompute, got {cache_mode!r}")
        self.target, self.drafter, self.num_draft, self.cache_mode = target, drafter, num_draft, cache_mode

    def _propose(self, state: DraftState) -> Proposal:
        if self.drafter is None or state.max_draft == 0:
            n = len(state.seqs)
            return Proposal(torch.zeros((n, 0), dtype=torch.long), torch.zeros(n, dtype=torch.long))
        return self.drafter.propose(state)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[GenerationResult]:
        """Generate for every prompt (token ids); results are in prompt order."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        for p in prompts:
            check_prompt(p, self.target.vocab_size)
        gen, stops, params = cfg.generator(), cfg.stops(self.target), cfg.sampling
        stop_set = set(stops)
        runner = _KVRunner(self.target) if self.cache_mode == "kv" else _RecomputeRunner(self.target)
        B = len(prompts)
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in range(B)]
        stats = [SpecStats() for _ in range(B)]
        reasons: list[Literal["stop", "length"]] = ["length"] * B

        t0 = time.perf_counter()
        first = sample_from_logits(runner.prefill(range(B), seqs), params, gen).tolist()
        active: list[int] = []
        for r, t in enumerate(first):
            seqs[r].append(t)
            outs[r].append(t)
            if t in stop_set:
                reasons[r] = "stop"
            elif len(outs[r]) < cfg.max_new_tokens:
                active.append(r)
        elapsed = time.perf_counter() - t0
        for r in range(B):
            stats[r].seconds += elapsed / B

        while active:
            t_round = time.perf_counter()
            # never draft past the token budget: a round emits at most drafts + 1 tokens
            room = torch.tensor([cfg.max_new_tokens - len(outs[r]) - 1 for r in active])
            state = DraftState([seqs[r] for r in active], active, min(self.num_draft, int(room.max())), params, gen)
            prop = self._propose(state)
            lens = torch.minimum(prop.lens.cpu(), room)
            k = prop.tokens.shape[1]
            drafts = [prop.tokens[i, : int(lens[i])].tolist() for i in range(len(active))]
            logits = runner.score(active, seqs, drafts, k)
            res = verify(logits, prop.tokens, lens, prop.probs, params, gen, stops)
            still: list[int] = []
            for i, r in enumerate(active):
                n_acc = int(res.num_accepted[i])
                stats[r].record(int(lens[i]), n_acc)
                runner.commit(r, int(lens[i]), n_acc)
                new = res.emitted(i)
                seqs[r].extend(new)
                outs[r].extend(new)
                if bool(res.stopped[i]):
                    reasons[r] = "stop"
                elif len(outs[r]) < cfg.max_new_tokens:
                    still.append(r)
            finished = [r for r in active if r not in set(still)]
            for r in finished:
                runner.release(r)
            if self.drafter is not None and finished:
                self.drafter.release(finished)
            share = (time.perf_counter() - t_round) / len(active)
            for r in active:
                stats[r].seconds += share
            active = still

        results = []
        for r in range(B):
            stats[r].new_tokens = len(outs[r])
            results.append(GenerationResult(outs[r], reasons[r], stats[r]))
        return results
