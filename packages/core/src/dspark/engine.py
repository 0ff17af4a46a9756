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
from dspark.scheduler import PrefixScheduler
from dspark.sampling import sample_from_logits
from dspark.target import Target
from dspark.verify import verify

CacheMode = Literal["kv", "recompute"]


Feats = list[torch.Tensor] | None  # per row: [n, m*d] target features of the fed tokens


def _concat_taps(taps: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """{layer: [B, n, d]} -> [B, n, m*d] in the drafter's layer order."""
    return torch.cat([taps[i] for i in layers], dim=-1)


class _KVRunner:
    """One KV cache per request; invariant: cache r holds seqs[r][:-1] (all but the anchor)."""

    def __init__(self, target: Target, feature_layers: Sequence[int] | None) -> None:
        self.target = target
        self.layers = list(feature_layers) if feature_layers else []
        self.caches: dict[int, object] = {}

    def _fwd(self, r: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.target.forward(torch.tensor([ids], device=self.target.device), self.caches[r], logits="all", taps=self.layers)
        return out.logits[0], (_concat_taps(out.taps, self.layers)[0] if self.layers else None)

    def prefill(self, rows: Sequence[int], seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Feats]:
        logits, feats = [], []
        for r in rows:
            self.caches[r] = self.target.new_cache()
            lg, f = self._fwd(r, list(seqs[r]))
            logits.append(lg[-1])
            feats.append(f)
            self.target.rollback(self.caches[r], 0)
        return torch.stack(logits), (feats if self.layers else None)

    def score(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], drafts: list[list[int]], k: int) -> tuple[torch.Tensor, Feats]:
        out = torch.empty((len(rows), k + 1, self.target.vocab_size), device=self.target.device)
        feats = []
        for i, (r, d) in enumerate(zip(rows, drafts)):
            lg, f = self._fwd(r, [seqs[r][-1], *d])
            out[i, : len(d) + 1] = lg
            out[i, len(d) + 1 :] = lg[-1:]  # padding, never read by the verifier
            feats.append(f)
        return out, (feats if self.layers else None)  # [B, k+1, V]

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        self.target.rollback(self.caches[row], fed_drafts - accepted)

    def release(self, row: int) -> None:
        self.caches.pop(row, None)


class _RecomputeRunner:
    """No cache: each round re-runs every active sequence, right-padded, in one forward."""

    def __init__(self, target: Target, feature_layers: Sequence[int] | None) -> None:
        self.target = target
        self.layers = list(feature_layers) if feature_layers else []

    def _run(self, rows_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = max(len(t) for t in rows_tokens)
        ids = torch.zeros((len(rows_tokens), width), dtype=torch.long)
        for i, t in enumerate(rows_tokens):
            ids[i, : len(t)] = torch.tensor(t)
        out = self.target.forward(ids.to(self.target.device), None, logits="all", taps=self.layers)
        return out.logits, (_concat_taps(out.taps, self.layers) if self.layers else None)

    def prefill(self, rows: Sequence[int], seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Feats]:
        toks = [list(seqs[r]) for r in rows]
        logits, f = self._run(toks)
        last = torch.tensor([len(t) - 1 for t in toks], device=logits.device)
        feats = [f[i, : len(t)] for i, t in enumerate(toks)] if f is not None else None
        return logits[torch.arange(len(toks)), last], feats

    def score(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], drafts: list[list[int]], k: int) -> tuple[torch.Tensor, Feats]:
        toks = [list(seqs[r]) + d for r, d in zip(rows, drafts)]
        logits, f = self._run(toks)
        # slot j of row i is the position of the anchor + j (clamped into the real tokens)
        start = torch.tensor([len(seqs[r]) - 1 for r in rows], device=logits.device)
        pos = start[:, None] + torch.arange(k + 1, device=logits.device)[None, :]
        lens = torch.tensor([len(t) - 1 for t in toks], device=logits.device)
        pos = torch.minimum(pos, lens[:, None])
        feats = None
        if f is not None:
            feats = [f[i, int(start[i]) : len(t)] for i, t in enumerate(toks)]
        return logits[torch.arange(len(rows), device=logits.device)[:, None], pos], feats

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        pass

    def release(self, row: int) -> None:
        pass


class SpeculativeEngine:
    """Batched speculative decoding with any :class:`Drafter` (or none: plain AR).

    num_draft: the most draft tokens verified per request per round (gamma).
    scheduler: optionally trims each request's draft to the verify length a
        :class:`~dspark.scheduler.PrefixScheduler` picks from the drafter's confidences.
    """

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None,
        num_draft: int = 7,
        cache_mode: CacheMode = "kv",
        scheduler: PrefixScheduler | None = None,
    ) -> None:
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        if cache_mode not in ("kv", "recompute"):
            raise ValueError(f"cache_mode must be kv or recompute, got {cache_mode!r}")
        self.target, self.drafter, self.num_draft, self.cache_mode = target, drafter, num_draft, cache_mode
        self.scheduler = scheduler

    def _propose(self, state: DraftState) -> Proposal:
        if self.drafter is None or state.max_draft == 0:
            n = len(state.seqs)
            return Proposal(torch.zeros((n, 0), dtype=torch.long), torch.zeros(n, dtype=torch.long))
        return self.drafter.propose(state)

    def _schedule(self, prop: Proposal, lens: torch.Tensor, active: list[int]) -> torch.Tensor:
        if prop.confidence is None and self.scheduler.needs_confidence:
            raise ValueError(
                f"scheduler policy {self.scheduler.policy!r} needs drafter confidences; "
                f"drafter {getattr(self.drafter, 'name', '?')!r} has no confidence head"
            )
        survival = [
            torch.cumprod(prop.confidence[i, : int(n)].float().cpu(), 0) if prop.confidence is not None else torch.ones(int(n))
            for i, n in enumerate(lens)
        ]
        chosen = torch.tensor(self.scheduler.verify_lengths(survival, active), dtype=torch.long)
        return torch.minimum(lens, chosen)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[GenerationResult]:
        """Generate for every prompt (token ids); results are in prompt order."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        for p in prompts:
            check_prompt(p, self.target.vocab_size)
        gen, stops, params = cfg.generator(), cfg.stops(self.target), cfg.sampling
        stop_set = set(stops)
        layers = getattr(self.drafter, "feature_layers", None)
        runner = (_KVRunner if self.cache_mode == "kv" else _RecomputeRunner)(self.target, layers)
        B = len(prompts)
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in range(B)]
        stats = [SpecStats() for _ in range(B)]
        reasons: list[Literal["stop", "length"]] = ["length"] * B

        t0 = time.perf_counter()
        last_logits, feats = runner.prefill(range(B), seqs)
        # features of committed tokens the drafter has not seen yet (the prompt, at first)
        pending: dict[int, torch.Tensor] = dict(enumerate(feats)) if feats is not None else {}
        first = sample_from_logits(last_logits, params, gen).tolist()
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
            state = DraftState(
                [seqs[r] for r in active],
                active,
                min(self.num_draft, int(room.max())),
                params,
                gen,
                [pending.pop(r) for r in active] if layers else None,
            )
            prop = self._propose(state)
            lens = torch.minimum(prop.lens.cpu(), room)
            if self.scheduler is not None and bool((lens > 0).any()):
                lens = self._schedule(prop, lens, active)
            k = prop.tokens.shape[1]
            drafts = [prop.tokens[i, : int(lens[i])].tolist() for i in range(len(active))]
            logits, feats = runner.score(active, seqs, drafts, k)
            res = verify(logits, prop.tokens, lens, prop.probs, params, gen, stops)
            still: list[int] = []
            for i, r in enumerate(active):
                n_acc = int(res.num_accepted[i])
                conf = None if prop.confidence is None else prop.confidence[i].tolist()
                stats[r].record(int(lens[i]), n_acc, conf)
                runner.commit(r, int(lens[i]), n_acc)
                if feats is not None:
                    pending[r] = feats[i][: n_acc + 1]  # the anchor and the accepted drafts
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
