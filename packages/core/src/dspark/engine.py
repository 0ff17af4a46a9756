"""The speculative decoding engine: draft -> verify -> commit over a batch of requests.

Each round every active request gets a draft of its own length (ragged, possibly 0),
the target scores ``[anchor, drafts]`` for every request, and :func:`dspark.verify.verify`
decides what is committed. Requests finish independently (stop token or token budget).

Two ways to run the target, with identical results:
- ``kv``: rollback-able KV caches (the real path): one preallocated slot cache for the whole
  batch where the target supports it, else one HF cache per request;
- ``recompute``: no cache, the whole right-padded batch is re-run each round. Causal
  attention makes right padding harmless, so this path is exact and lets tests push tens
  of thousands of tiny requests through the real engine in one forward per round.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dspark import packed_linear
from dspark.drafters.base import Drafter, DraftState, Proposal
from dspark.generate import GenerationConfig, GenerationResult, check_prompt
from dspark.metrics import SpecStats
from dspark.scheduler import PrefixScheduler
from dspark import kernels
from dspark.sampling import SamplingParams, probs_from_logits
from dspark.target import Target
from dspark.verify import VerifyOutput, draws, pick, verify, verify_slot

CacheMode = Literal["kv", "recompute"]
_DRAFT_SEED_SALT = 0x5DEECE66D  # a request's draft generator: seeded from its seed, never equal to it
# equal-length prompts share a prefill forward of at most this many tokens and rows (the
# rows bound the [rows, vocab] last-token logits)
PREFILL_TOKENS, PREFILL_ROWS = 4096, 64


Feats = list[torch.Tensor] | None  # per row: [n, m*d] target features of the fed tokens


def _concat_taps(taps: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """{layer: [B, n, d]} -> [B, n, m*d] in the drafter's layer order."""
    return torch.cat([taps[i] for i in layers], dim=-1)


class _KVRunner:
    """One HF ``DynamicCache`` per request, one target forward per request: the reference
    path, and the fallback for targets :mod:`dspark.batch_verify` does not support.
    Invariant: cache r holds seqs[r][:-1] (all but the anchor)."""

    def __init__(self, target: Target, feature_layers: Sequence[int] | None) -> None:
        self.target = target
        self.layers = list(feature_layers) if feature_layers else []
        self.caches: dict[int, object] = {}
        self.batched = False  # one target forward per request

    def _fwd(self, r: int, ids: list[int], hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.target.forward(torch.tensor([ids], device=self.target.device), self.caches[r],
                                  logits="none" if hidden else "all", taps=self.layers, final_hidden=hidden)
        res = out.final_hidden if hidden else out.logits
        return res[0], (_concat_taps(out.taps, self.layers)[0] if self.layers else None)

    def prefill(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        logits, feats = [], []
        for r in rows:
            self.caches[r] = self.target.new_cache()
            lg, f = self._fwd(r, list(seqs[r]), hidden)
            logits.append(lg[-1])
            feats.append(f)
            self.target.rollback(self.caches[r], 0)
        return torch.stack(logits), (feats if self.layers else None)

    def score(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], drafts: list[list[int]], k: int,
              hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        width = self.target.hidden_size if hidden else self.target.vocab_size
        dtype = self.target.dtype if hidden else torch.float32
        out = torch.empty((len(rows), k + 1, width), device=self.target.device, dtype=dtype)
        feats = []
        for i, (r, d) in enumerate(zip(rows, drafts)):
            lg, f = self._fwd(r, [seqs[r][-1], *d], hidden)
            out[i, : len(d) + 1] = lg
            out[i, len(d) + 1 :] = lg[-1:]  # padding, never read by the verifier
            feats.append(f)
        return out, (feats if self.layers else None)  # [B, k+1, V] (or [B, k+1, d] hidden)

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        self.target.rollback(self.caches[row], fed_drafts - accepted)

    def release(self, row: int) -> None:
        self.caches.pop(row, None)


class _SlotRunner:
    """All requests in one preallocated :class:`~dspark.slot_cache.SlotKVCache`, every
    round one target forward for the whole ragged batch, keys written in place (no
    per-step gather or copy). Prefill computes the LM head for the last prompt token
    only. Invariant as :class:`_KVRunner`: request r holds seqs[r][:-1]."""

    def __init__(self, target: Target, feature_layers: Sequence[int] | None) -> None:
        from dspark.slot_cache import SlotKVCache

        self.target = target
        self.layers = list(feature_layers) if feature_layers else []
        self.kv = SlotKVCache(target)
        self.batched = True  # one target forward for the whole ragged batch

    def prefill(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        # prompts of the same length share a forward (no padding), up to PREFILL_TOKENS
        # tokens each; prompts of other lengths (they differ by hundreds of tokens) get their own
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            self.kv.add(r)
            by_len.setdefault(len(seqs[r]), []).append(i)
        logits: list[torch.Tensor | None] = [None] * len(rows)
        feats: list[torch.Tensor | None] = [None] * len(rows)
        for n, idx in by_len.items():
            per = max(1, min(PREFILL_ROWS, PREFILL_TOKENS // n))
            for c in range(0, len(idx), per):
                part = idx[c : c + per]
                lg, taps = self.kv.forward([rows[i] for i in part], [list(seqs[rows[i]]) for i in part], self.layers,
                                           logits="last_hidden" if hidden else "last")
                cat = _concat_taps(taps, self.layers) if self.layers else None
                for j, i in enumerate(part):
                    logits[i] = lg[j, -1]
                    if cat is not None:
                        feats[i] = cat[j]
        return torch.stack(logits), (feats if self.layers else None)

    def score(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], drafts: list[list[int]], k: int,
              hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        fed = [[seqs[r][-1], *d] for r, d in zip(rows, drafts)]
        lg, taps = self.kv.forward(list(rows), fed, self.layers, logits="hidden" if hidden else "all")
        n = lg.shape[1]  # longest fed row: at most k + 1
        out = lg  # [B, k+1, V] fp32 (or [B, k+1, d] hidden) when some row verifies all k drafts
        if n < k + 1:
            out = torch.empty((len(rows), k + 1, lg.shape[-1]), device=lg.device, dtype=lg.dtype)
            out[:, :n] = lg
            out[:, n:] = lg[:, n - 1 : n]  # padding, never read by the verifier
        cat = _concat_taps(taps, self.layers) if self.layers else None
        return out, ([cat[i, : len(f)] for i, f in enumerate(fed)] if self.layers else None)

    def extend(self, rows: Sequence[int], tails: list[list[int]]) -> tuple[torch.Tensor, Feats]:
        """Feed more drafts after what :meth:`score` fed (the second wave of a round whose
        first wave took each request's first drafts only): final hidden states ``[S, n, d]``
        and each row's tapped features for the tokens fed."""
        h, taps = self.kv.forward(list(rows), tails, self.layers, logits="hidden")
        cat = _concat_taps(taps, self.layers) if self.layers else None
        return h, ([cat[i, : len(t)] for i, t in enumerate(tails)] if self.layers else None)

    def commit(self, row: int, fed_drafts: int, accepted: int) -> None:
        self.kv.rollback(row, fed_drafts - accepted)

    def release(self, row: int) -> None:
        self.kv.release(row)


class _RecomputeRunner:
    """No cache: each round re-runs every active sequence, right-padded, in one forward."""

    def __init__(self, target: Target, feature_layers: Sequence[int] | None) -> None:
        self.target = target
        self.layers = list(feature_layers) if feature_layers else []

    def _run(self, rows_tokens: list[list[int]], hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = max(len(t) for t in rows_tokens)
        ids = torch.zeros((len(rows_tokens), width), dtype=torch.long)
        for i, t in enumerate(rows_tokens):
            ids[i, : len(t)] = torch.tensor(t)
        out = self.target.forward(ids.to(self.target.device), None, logits="none" if hidden else "all",
                                  taps=self.layers, final_hidden=hidden)
        return (out.final_hidden if hidden else out.logits), (_concat_taps(out.taps, self.layers) if self.layers else None)

    def prefill(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        toks = [list(seqs[r]) for r in rows]
        logits, f = self._run(toks, hidden)
        last = torch.tensor([len(t) - 1 for t in toks], device=logits.device)
        feats = [f[i, : len(t)] for i, t in enumerate(toks)] if f is not None else None
        return logits[torch.arange(len(toks)), last], feats

    def score(self, rows: Sequence[int], seqs: Mapping[int, Sequence[int]], drafts: list[list[int]], k: int,
              hidden: bool = False) -> tuple[torch.Tensor, Feats]:
        toks = [list(seqs[r]) + d for r, d in zip(rows, drafts)]
        logits, f = self._run(toks, hidden)
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


@dataclass
class _Request:
    rid: int
    seq: list[int]  # prompt + generated; the last token is the anchor
    cfg: GenerationConfig
    stops: set[int]
    gen: torch.Generator | None  # the verifier's draws (acceptance, corrections, bonus)
    dgen: torch.Generator | None  # the drafter's draws: whether a batchmate makes this request's
    # drafter run in a step where its drafts go unused must not move the verifier's stream
    out: list[int] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    finish_reason: Literal["stop", "length"] | None = None
    pending: torch.Tensor | None = None  # target features the drafter has not seen yet

    def take_pending(self) -> torch.Tensor | None:
        p, self.pending = self.pending, None
        return p


class SpeculativeEngine:
    """Batched speculative decoding with any :class:`Drafter` (or none: plain AR).

    num_draft: the most draft tokens verified per request per round (gamma).
    scheduler: optionally trims each request's draft to the verify length a
        :class:`~dspark.scheduler.PrefixScheduler` picks from the drafter's confidences.
    batch_verify: keep every request in one preallocated slot cache and verify them all in
        one target forward (:mod:`dspark.slot_cache`); None picks it whenever the target
        supports it (:func:`dspark.batch_verify.supports`), False forces one HF cache and
        one forward per request (the reference path).
    """

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None,
        num_draft: int = 7,
        cache_mode: CacheMode = "kv",
        scheduler: PrefixScheduler | None = None,
        batch_verify: bool | None = None,
    ) -> None:
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        if cache_mode not in ("kv", "recompute"):
            raise ValueError(f"cache_mode must be kv or recompute, got {cache_mode!r}")
        self.target, self.drafter, self.num_draft, self.cache_mode = target, drafter, num_draft, cache_mode
        # a trained drafter's block forward multiplies a few rows too: same oneDNN path as
        # the target's layers where the target uses it (dspark.packed_linear)
        if getattr(target, "packing", False):
            for m in (drafter, getattr(drafter, "drafter", None)):
                if isinstance(m, nn.Module):
                    packed_linear.install(m)
        self.scheduler = scheduler
        self.batch_verify = batch_verify  # None: one forward per step where the target supports it
        self._requests: dict[int, _Request] = {}
        self._new: list[int] = []
        self._next_id = 0
        self._run = None
        self.last_round: list[tuple[int, int, int]] = []  # (request id, verified drafts, accepted) of the last step
        # sampled rounds with drafts: how many leading slots are verified through the LM
        # head's screen before the rest goes through the full head (0: full head only)
        self.screen_verify = 2
        # sampled rounds of at least ``wave_min_batch`` requests (too many rows for the
        # screen): the first ``wave_verify`` slots are verified one at a time through the
        # exact LM head, only for the requests still accepting, and the rest in one product:
        # a request stops costing head rows at its first rejection (evaluation at batch 32,
        # gamma 7, tau ~1.5: 0.74-0.76x the time of one product over all 256 slots).
        # Below the threshold one product over every slot is cheaper (each slot-wise
        # product reads the whole head again, and at a few rows reading it is the cost).
        self.wave_verify = 2
        self.wave_min_batch = 16
        # in those rounds the target's decoder layers also run in two waves: the anchor and
        # the first ``wave_verify`` drafts of every request, then the rest of the drafts only
        # for the requests that accepted all of those (slot-cache runner only)
        self.wave_forward = True

    def _propose(self, state: DraftState) -> Proposal:
        if self.drafter is None or state.max_draft == 0:
            n = len(state.seqs)
            return Proposal(torch.zeros((n, 0), dtype=torch.long), torch.zeros(n, dtype=torch.long))
        return self.drafter.propose(state)

    def _schedule(self, prop: Proposal, lens: torch.Tensor, active: list[int], draft_s: float = 0.0, params: SamplingParams | None = None) -> torch.Tensor:
        if prop.confidence is None and self.scheduler.needs_confidence:
            raise ValueError(
                f"scheduler policy {self.scheduler.policy!r} needs drafter confidences; "
                f"drafter {getattr(self.drafter, 'name', '?')!r} has no confidence head"
            )
        survival = [
            torch.cumprod(prop.confidence[i, : int(n)].float().cpu(), 0) if prop.confidence is not None else torch.ones(int(n))
            for i, n in enumerate(lens)
        ]
        kw = {"group": params} if "group" in inspect.signature(self.scheduler.verify_lengths).parameters else {}
        chosen = torch.minimum(lens, torch.tensor(self.scheduler.verify_lengths(survival, active, **kw), dtype=torch.long))
        if hasattr(self.scheduler, "observe"):
            self.scheduler.observe(draft_s, survival, chosen.tolist())
        return chosen

    # ------------------------------------------------------------------ continuous batching
    def _runner(self):
        if self._run is None:
            layers = getattr(self.drafter, "feature_layers", None)
            if self.cache_mode == "kv":
                from dspark import batch_verify

                slots = batch_verify.supports(self.target) if self.batch_verify is None else self.batch_verify
                self._run = _SlotRunner(self.target, layers) if slots else _KVRunner(self.target, layers)
            else:
                self._run = _RecomputeRunner(self.target, layers)
        return self._run

    def add_request(self, prompt_ids: Sequence[int], cfg: GenerationConfig, seed: int | None = None) -> int:
        """Queue a request; it is prefilled at the next :meth:`step`. ``seed`` overrides
        ``cfg.seed``; with neither, the request is seeded from fresh OS entropy. Every
        request draws from generators of its own (one for verification, one for drafting),
        so its samples do not depend on which other requests share the batch. Returns the
        request id."""
        check_prompt(prompt_ids, self.target.vocab_size)
        rid = self._next_id
        self._next_id += 1
        s = cfg.seed if seed is None else seed
        if s is None:  # unseeded: fresh entropy, still a generator of its own (never the global RNG)
            s = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        gen = torch.Generator(device=self.target.device).manual_seed(s)
        dgen = torch.Generator(device=self.target.device).manual_seed((s ^ _DRAFT_SEED_SALT) & (2**63 - 1))
        self._requests[rid] = _Request(rid, list(prompt_ids), cfg, set(cfg.stops(self.target)), gen, dgen)
        self._new.append(rid)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self._new) or any(r.finish_reason is None for r in self._requests.values())

    def pop_result(self, rid: int) -> GenerationResult:
        """The result of a finished request (and forget it)."""
        r = self._requests[rid]
        if r.finish_reason is None:
            raise ValueError(f"request {rid} is still running")
        del self._requests[rid]
        r.stats.new_tokens = len(r.out)
        return GenerationResult(r.out, r.finish_reason, r.stats)

    def cancel(self, rid: int) -> None:
        """Drop a request now (finished or not): frees its KV cache and drafter state.
        Unknown ids are ignored, so a cancel that races a finish is harmless."""
        r = self._requests.pop(rid, None)
        if r is None:
            return
        if rid in self._new:
            self._new.remove(rid)
            return
        if r.finish_reason is None:
            self._runner().release(rid)
            if self.drafter is not None:
                self.drafter.release([rid])

    def finish_reason(self, rid: int) -> str | None:
        """"stop" / "length" once request ``rid`` has finished, else None."""
        return self._requests[rid].finish_reason

    @property
    def num_running(self) -> int:
        return sum(r.finish_reason is None for r in self._requests.values())

    def _emit(self, r: _Request, tokens: list[int], stopped: bool) -> None:
        r.seq.extend(tokens)
        r.out.extend(tokens)
        if stopped or (tokens and tokens[-1] in r.stops):
            r.finish_reason = "stop"
        elif len(r.out) >= r.cfg.max_new_tokens:
            r.finish_reason = "length"
        if r.finish_reason is not None:
            self._runner().release(r.rid)
            if self.drafter is not None:
                self.drafter.release([r.rid])

    @torch.inference_mode()
    def step(self) -> dict[int, list[int]]:
        """One engine step: prefill newly added requests (their first token), then one
        draft -> verify -> commit round for every running request, grouped by sampling
        params. Returns the tokens each request gained in this step."""
        runner, gained = self._runner(), {}
        self.last_round = []
        if self.scheduler is not None and hasattr(self.scheduler, "begin_step"):
            self.scheduler.begin_step()  # async budgets count engine steps, not per-group calls
        if self._new:
            t0 = time.perf_counter()
            new, self._new = self._new, []
            reqs = [self._requests[i] for i in new]
            seqs = {r.rid: r.seq for r in reqs}
            last_hidden, feats = runner.prefill(new, seqs, hidden=True)
            firsts = [0] * len(reqs)
            by_params: dict[SamplingParams, list[int]] = {}
            for i, r in enumerate(reqs):
                by_params.setdefault(r.cfg.sampling, []).append(i)
            for params, idx in by_params.items():  # one draw per row from its own generator
                got = self.target.next_tokens(last_hidden[idx], params, [reqs[i].gen for i in idx]).tolist()
                for i, t in zip(idx, got):
                    firsts[i] = t
            for i, r in enumerate(reqs):
                first = firsts[i]
                if feats is not None:
                    r.pending = feats[i]  # the drafter has not seen the prompt yet
                self._emit(r, [first], False)
                r.stats.seconds += (time.perf_counter() - t0) / len(reqs)
                gained[r.rid] = [first]
        running = [r for r in self._requests.values() if r.finish_reason is None and r.rid not in gained]
        groups: dict[SamplingParams, list[_Request]] = {}
        for r in running:
            groups.setdefault(r.cfg.sampling, []).append(r)
        for params, reqs in groups.items():
            for rid, toks in self._round(reqs, params).items():
                gained.setdefault(rid, []).extend(toks)
        return gained

    def _round(self, reqs: list[_Request], params: SamplingParams) -> dict[int, list[int]]:
        runner = self._runner()
        t0 = time.perf_counter()
        ids = [r.rid for r in reqs]
        seqs = {r.rid: r.seq for r in reqs}
        # never draft past the token budget: a round emits at most drafts + 1 tokens
        room = torch.tensor([r.cfg.max_new_tokens - len(r.out) - 1 for r in reqs])
        gens = [r.gen for r in reqs] if all(r.gen is not None for r in reqs) else None
        dgens = [r.dgen for r in reqs] if gens is not None else None
        needs_feats = getattr(self.drafter, "feature_layers", None)
        max_draft = min(self.num_draft, int(room.max()))
        gate = getattr(self.scheduler, "should_draft", None)  # schedulers without draft gating just draft
        if gate is not None and not gate(len(reqs)):
            max_draft = 0  # plain decoding this step; the drafter catches up on its features later
        t_d = time.perf_counter()
        if max_draft == 0:
            prop = self._propose(DraftState([r.seq for r in reqs], ids, 0, params, dgens, None))
        else:
            state = DraftState(
                [r.seq for r in reqs], ids, max_draft, params, dgens,
                [r.take_pending() for r in reqs] if needs_feats else None,
            )
            prop = self._propose(state)
        t_d = time.perf_counter() - t_d
        lens = torch.minimum(prop.lens.cpu(), room)
        if self.scheduler is not None and bool((lens > 0).any()):
            lens = self._schedule(prop, lens, ids, t_d, params)
        k = prop.tokens.shape[1]
        drafts = [prop.tokens[i, : int(lens[i])].tolist() for i in range(len(reqs))]
        fed = [len(d) for d in drafts]  # drafts in the target's cache after scoring (rolled back on commit)
        # the target's choices straight from its hidden states (through the LM head's fp16
        # screen, dspark.screened_head) when no draft needs the full distribution: greedy
        # rounds, and sampled rounds that verify no draft
        rows = int((lens + 1).sum()) if params.greedy else (0 if bool((lens > 0).any()) else len(reqs))
        if rows and self.target.screens(rows, params):
            hidden, feats = runner.score(ids, seqs, drafts, k, hidden=True)
            res = self._decide(hidden, prop.tokens, lens, params, gens)
        elif params.greedy and self._waves(len(reqs), lens):
            hidden, feats, fed, extend = self._score_in_waves(runner, ids, seqs, drafts, k)
            res = self._decide_greedy_by_slot(hidden, prop.tokens, lens, params, extend)
        elif not params.greedy and self.screen_verify and self.target.screens(len(reqs), params):
            # sampled drafts: the first slots verified through the screen, one slot at a
            # time, the full LM head only for the slots reached past them
            hidden, feats = runner.score(ids, seqs, drafts, k, hidden=True)
            res = self._verify_screened(hidden, prop.tokens, lens, prop, params, gens)
        elif not params.greedy and self._waves(len(reqs), lens):
            hidden, feats, fed, extend = self._score_in_waves(runner, ids, seqs, drafts, k)
            res = self._verify_by_slot(hidden, prop.tokens, lens, prop, params, gens, extend)
        else:
            logits, feats = runner.score(ids, seqs, drafts, k)
            res = verify(logits, prop.tokens, lens, prop.probs, params, gens)  # stops: per request, below
        out: dict[int, list[int]] = {}
        share = (time.perf_counter() - t0) / len(reqs)
        for i, r in enumerate(reqs):
            n_acc = int(res.num_accepted[i])
            conf = None if prop.confidence is None else prop.confidence[i].tolist()
            r.stats.record(int(lens[i]), n_acc, conf)
            self.last_round.append((r.rid, int(lens[i]), n_acc))
            r.stats.seconds += share
            runner.commit(r.rid, fed[i], n_acc)
            if feats is not None:  # the anchor and the accepted drafts, after anything not yet seen
                new_f = feats[i][: n_acc + 1]
                r.pending = new_f if r.pending is None else torch.cat([r.pending, new_f])
            new = res.emitted(i)
            cut = next((j + 1 for j, t in enumerate(new) if t in r.stops), None)  # first stop token ends it
            new = new if cut is None else new[:cut]
            out[r.rid] = new
            self._emit(r, new, cut is not None)
        return out

    def _score_in_waves(self, runner, ids: list[int], seqs, drafts: list[list[int]], k: int):
        """The target forward of a slot-by-slot round, itself in two waves where the runner
        can extend a request's rows (``wave_forward``): first the anchor and the first
        ``wave_verify`` drafts of every request; the remaining drafts only for the requests
        that accepted all of those, when the verifier gets there (``extend``, called with
        their batch indices). At tau ~1.5 most requests stop within two slots, so most of
        the k + 1 rows per request are never run through the decoder layers. Causal
        attention makes each position's hidden state the same as in one forward.
        Returns hidden [B, k + 1, d], features per request, drafts fed per request (the
        list ``extend`` updates) and ``extend`` (None: one forward, everything fed)."""
        w = self.wave_verify
        fed = [len(d) for d in drafts]
        if not (self.wave_forward and hasattr(runner, "extend") and max(fed) > w):
            hidden, feats = runner.score(ids, seqs, drafts, k, hidden=True)
            return hidden, feats, fed, None
        hidden, feats = runner.score(ids, seqs, [d[:w] for d in drafts], k, hidden=True)
        fed = [min(n, w) for n in fed]

        def extend(rows: list[int]) -> None:
            todo = [i for i in rows if len(drafts[i]) > fed[i]]
            if not todo:
                return
            h, f = runner.extend([ids[i] for i in todo], [drafts[i][fed[i]:] for i in todo])
            for j, i in enumerate(todo):
                n = len(drafts[i]) - fed[i]
                hidden[i, fed[i] + 1 : fed[i] + 1 + n] = h[j, :n]
                if feats is not None:
                    feats[i] = torch.cat([feats[i], f[j]])
                fed[i] = len(drafts[i])

        return hidden, feats, fed, extend

    def _waves(self, batch: int, lens: torch.Tensor) -> bool:
        """Whether this round verifies slot by slot (see ``wave_verify``)."""
        return bool(self.wave_verify) and batch >= self.wave_min_batch and bool((lens > 0).any())

    def _decide_greedy_by_slot(self, hidden: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor, params: SamplingParams,
                               extend=None) -> VerifyOutput:
        """:meth:`_decide` for greedy rounds of large batches: the target's argmax slot by
        slot, only for the requests whose drafts all matched so far; after ``wave_verify``
        slots, every remaining slot of the survivors in one product. The same decisions
        as comparing every slot at once (accept while the draft equals the argmax)."""
        B, k1 = hidden.shape[0], hidden.shape[1]
        out = torch.full((B, k1), -1, dtype=torch.long)
        n_acc = torch.zeros(B, dtype=torch.long)
        tokens, lens = tokens.cpu(), lens.cpu()
        active = list(range(B))
        for pos in range(k1):
            if not active:
                break
            if pos >= self.wave_verify:
                if extend is not None:
                    extend(active)  # the survivors' remaining drafts through the target
                sub_lens = lens[active] - pos
                slots = torch.arange(k1 - pos)[None, :] <= sub_lens[:, None]
                choice = torch.zeros((len(active), k1 - pos), dtype=torch.long)
                choice[slots] = self.target.next_tokens(hidden[active, pos:][slots], params).cpu()
                o, n = kernels.rejection_greedy(choice, tokens[active, pos:], sub_lens)
                out[active, pos:] = o
                n_acc[active] += n
                break
            choice = self.target.next_tokens(hidden[active, pos], params).cpu()
            still = []
            for j, i in enumerate(active):
                out[i, pos] = choice[j]
                if int(lens[i]) > pos and int(choice[j]) == int(tokens[i, pos]):
                    n_acc[i] += 1
                    still.append(i)
            active = still
        return VerifyOutput(tokens=out, num_accepted=n_acc, num_emitted=n_acc + 1, stopped=torch.zeros(B, dtype=torch.bool))

    def _verify_by_slot(self, hidden: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor,
                        prop: Proposal, params: SamplingParams, gens, extend=None) -> VerifyOutput:
        """:func:`verify` at T > 0 for large batches, from the final hidden states: slot by
        slot, the target's logits only for the requests still accepting
        (:func:`dspark.verify.verify_slot`); after ``wave_verify`` slots, every remaining
        slot of the survivors in one product. The random numbers are drawn up front as
        :func:`verify` draws them, so the output is the one :func:`verify` would give."""
        B, k1 = hidden.shape[0], hidden.shape[1]
        dev = hidden.device
        lens_c = lens.cpu()
        u, noise = draws(lens_c.to(dev), k1 - 1, self.target.vocab_size, gens, dev)
        tokens = tokens.to(dev)
        out = torch.full((B, k1), -1, dtype=torch.long)
        n_acc = torch.zeros(B, dtype=torch.long)
        active = list(range(B))
        for pos in range(k1):
            if not active:
                break
            bonus = [i for i in active if int(lens_c[i]) == pos]
            if bonus:  # every draft accepted: the bonus token, from the target's distribution
                p = probs_from_logits(self.target.lm_head(hidden[bonus, pos])[:, None], params)[:, 0]
                out[bonus, pos] = pick(p, noise[bonus]).cpu()
            ver = [i for i in active if int(lens_c[i]) > pos]
            if not ver:
                break
            if pos >= self.wave_verify:
                if extend is not None:
                    extend(ver)  # the survivors' remaining drafts through the target
                p = probs_from_logits(self.target.lm_head(hidden[ver, pos:]), params)  # [A, k1 - pos, V]
                q = prop.rows_probs(ver, pos, rest=True)
                q = None if q is None else q.to(dev)
                o, n = kernels.rejection_sample(p, tokens[ver, pos:], (lens_c[ver] - pos).to(dev), q, u[ver, pos:], noise[ver])
                out[ver, pos:] = o.cpu()
                n_acc[ver] += n.cpu()
                break
            q = prop.rows_probs(ver, pos)
            q = None if q is None else q.to(dev)
            ok, tok = verify_slot(self.target.lm_head(hidden[ver, pos]), tokens[ver, pos], q, params, u[ver, pos], noise[ver])
            ok, tok = ok.cpu(), tok.cpu()
            still = []
            for j, i in enumerate(ver):
                out[i, pos] = tok[j]
                if ok[j]:
                    n_acc[i] += 1
                    still.append(i)
            active = still
        return VerifyOutput(tokens=out, num_accepted=n_acc, num_emitted=n_acc + 1, stopped=torch.zeros(B, dtype=torch.bool))

    def _decide(self, hidden: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor, params: SamplingParams, gens) -> VerifyOutput:
        """:func:`verify` for the rounds that need only the target's own choices: the argmax
        at every verified slot (greedy), or one draw at the anchor (no drafts)."""
        B, k1 = hidden.shape[0], hidden.shape[1]
        if params.greedy:
            slots = torch.arange(k1)[None, :] <= lens[:, None]  # [B, k+1] the slots verify reads
            choice = torch.zeros((B, k1), dtype=torch.long)
            choice[slots] = self.target.next_tokens(hidden[slots], params).cpu()
            out, n_acc = kernels.rejection_greedy(choice, tokens.cpu(), lens)
        else:
            out = torch.full((B, k1), -1, dtype=torch.long)
            out[:, 0] = self.target.next_tokens(hidden[:, 0], params, gens).cpu()
            n_acc = torch.zeros(B, dtype=torch.long)
        return VerifyOutput(tokens=out, num_accepted=n_acc, num_emitted=n_acc + 1, stopped=torch.zeros(B, dtype=torch.bool))

    def _verify_screened(self, hidden: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor,
                         prop: Proposal, params: SamplingParams, gens) -> VerifyOutput:
        """:func:`verify` at T > 0 from the final hidden states: slot by slot, the requests
        still accepting verify their next draft through the LM head's screen
        (:meth:`ScreenedHead.verify_step`, exact); once ``screen_verify`` slots are done,
        the rest of every surviving request's draft is verified from full logits in one
        product. Most rounds end at the first rejection, so most never pay for the
        full [k+1, V] logits."""
        B, k1 = hidden.shape[0], hidden.shape[1]
        head = self.target._screened_head()
        T = params.temperature
        out = torch.full((B, k1), -1, dtype=torch.long)
        n_acc = torch.zeros(B, dtype=torch.long)
        tokens, lens = tokens.cpu(), lens.cpu()
        sub = lambda idx: None if gens is None else [gens[i] for i in idx]  # noqa: E731
        active = list(range(B))
        for pos in range(k1):
            if not active:
                break
            bonus = [i for i in active if int(lens[i]) == pos]
            if bonus:  # every draft accepted: the bonus token
                out[bonus, pos] = self.target.next_tokens(hidden[bonus, pos], params, sub(bonus)).cpu()
            ver = [i for i in active if int(lens[i]) > pos]
            if not ver:
                break
            if pos >= self.screen_verify or head is None or not self.target.screens(len(ver), params):
                rest = self.target.lm_head(hidden[ver, pos:])  # [A, k1 - pos, V]
                q = prop.rows_probs(ver, pos, rest=True)
                r = verify(rest, tokens[ver, pos:], lens[ver] - pos, q, params, sub(ver))
                out[ver, pos:] = r.tokens.cpu()
                n_acc[ver] += r.num_accepted.cpu()
                break
            q = prop.rows_probs(ver, pos)
            ok, corr = head.verify_step(hidden[ver, pos].float(), tokens[ver, pos], q, T, sub(ver))
            active = []
            for j, i in enumerate(ver):
                if ok[j]:
                    out[i, pos] = tokens[i, pos]
                    n_acc[i] += 1
                    active.append(i)
                else:
                    out[i, pos] = corr[j]
        return VerifyOutput(tokens=out, num_accepted=n_acc, num_emitted=n_acc + 1, stopped=torch.zeros(B, dtype=torch.bool))

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[GenerationResult]:
        """Generate for every prompt (token ids); results are in prompt order. Request i
        is seeded with ``cfg.seed + i``."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        for p in prompts:
            check_prompt(p, self.target.vocab_size)
        ids = [self.add_request(p, cfg, None if cfg.seed is None else cfg.seed + i) for i, p in enumerate(prompts)]
        while any(self._requests[i].finish_reason is None for i in ids):
            self.step()
        return [self.pop_result(i) for i in ids]
