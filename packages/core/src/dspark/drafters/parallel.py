"""DFlash and DSpark drafters: the parallel backbone, plus (DSpark) a sequential Markov or
RNN head and a confidence head.

- ``dflash``: every slot samples independently from the backbone's logits U_k.
- ``dspark``: slots are sampled left to right from softmax((U_k + B_k(x_{k-1}, ...)) / T);
  the corrected fp32 distribution is exactly what the verifier receives. The confidence
  head gives c_k, the chance draft k survives given its prefix did, for the scheduler.

The drafter shares the target's embedding and LM head, frozen and never saved with it.
Its inference cache holds context K/V only (features of committed tokens); the block's
own K/V are recomputed each round and discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dspark.drafters.backbone import LayerKV, ParallelBackbone, block_mask, pad_kv
from dspark.drafters.base import DraftState, Proposal
from dspark.drafters.linked import DraftConfig, LinkedDrafter
from dspark.drafters.vocab import DraftVocab
from dspark.heads.confidence import ConfidenceHead
from dspark.heads.markov import MarkovHead, TransitionRows
from dspark.heads.rnn import RNNHead
from dspark import kernels
from dspark.sampling import exponential, inverse_cdf, temperature_probs, uniform

HEADS = {"markov": MarkovHead, "rnn": RNNHead}


@dataclass
class BlockOutput:
    """Teacher-forced outputs for nb blocks of g slots (training and tests).

    hidden: [B, nb, g, d]; logits: [B, nb, g, K] fp32 corrected logits (base + head bias);
    base_logits: [B, nb, g, K] fp32; conf_logits: [B, nb, g] or None.
    """

    hidden: torch.Tensor
    base_logits: torch.Tensor
    logits: torch.Tensor
    conf_logits: torch.Tensor | None


class _RowCache:
    """Per-request context K/V (one tensor pair per draft layer, batch 1) in buffers that
    grow by doubling, so a round's newly committed positions are written in place instead
    of copying the whole context (no per-round work over the context)."""

    def __init__(self) -> None:
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self.length = 0

    @property
    def kv(self) -> list[LayerKV] | None:
        """Per-layer views of the first ``length`` positions, or None before any."""
        if not self._k:
            return None
        n = self.length
        return [LayerKV(k[:, :, :n], v[:, :, :n]) for k, v in zip(self._k, self._v)]

    def append(self, new: list[LayerKV]) -> None:
        """Add the K/V of the next positions ([1, Hkv, n, hd] per layer)."""
        end = self.length + new[0].k.shape[2]
        if not self._k or end > self._k[0].shape[2]:
            cap = max(end, 2 * (self._k[0].shape[2] if self._k else 0), 64)

            def grown(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
                buf = like.new_empty((like.shape[0], like.shape[1], cap, like.shape[3]))
                if old is not None:
                    buf[:, :, : self.length] = old[:, :, : self.length]
                return buf

            olds_k = self._k or [None] * len(new)
            olds_v = self._v or [None] * len(new)
            self._k = [grown(o, l.k) for o, l in zip(olds_k, new)]
            self._v = [grown(o, l.v) for o, l in zip(olds_v, new)]
        for k, v, l in zip(self._k, self._v, new):
            k[:, :, self.length : end] = l.k
            v[:, :, self.length : end] = l.v
        self.length = end


class ParallelDrafter(LinkedDrafter):
    """DFlash / DSpark drafter. Build with ``for_target``, load with ``from_pretrained``."""

    def __init__(self, cfg: DraftConfig, target_config: Any, vocab: DraftVocab | None = None) -> None:
        super().__init__(cfg, target_config, vocab)
        if cfg.kind not in ("dflash", "dspark"):
            raise ValueError(f"ParallelDrafter builds dflash or dspark drafters, not {cfg.kind!r}")
        self.backbone = ParallelBackbone(target_config, cfg.num_layers, len(cfg.feature_layers))
        d, k = cfg.hidden_size, self.vocab.size
        self.head = HEADS[cfg.head](k, cfg.rank, d) if cfg.head != "none" else None
        self.conf = ConfidenceHead(d, cfg.rank) if cfg.confidence and self.head is not None else None
        self._transitions = TransitionRows()

    def block_inputs(self, anchors: torch.Tensor) -> torch.Tensor:
        """[...] anchor ids -> [..., g] block ids: anchor then g-1 mask tokens."""
        masks = torch.full((*anchors.shape, self.cfg.gamma - 1), self.cfg.mask_token_id, device=anchors.device)
        return torch.cat([anchors[..., None], masks], dim=-1)

    # ------------------------------------------------------------------ training view
    def forward_blocks(self, feats: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor) -> BlockOutput:
        """Teacher-forced forward of nb blocks per sequence.

        feats [B, T, m*d] target features at positions 0..T-1; input_ids [B, T];
        anchors [B, nb] anchor positions (slot j of a block predicts input_ids[a + j + 1];
        the Markov/RNN/confidence heads take the ground-truth previous token).
        """
        B, T = input_ids.shape
        nb, g = anchors.shape[1], self.cfg.gamma
        pos_ctx = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = self.backbone.context_kv(feats, pos_ctx)
        blk_ids = self.block_inputs(input_ids.gather(1, anchors))  # [B, nb, g]
        blk_pos = anchors[..., None] + torch.arange(g, device=anchors.device)  # [B, nb, g]
        mask = block_mask(pos_ctx, torch.ones_like(pos_ctx, dtype=torch.bool), anchors, g)
        h = self.backbone(self.embed(blk_ids.reshape(B, nb * g)), blk_pos.reshape(B, nb * g), ctx, mask)
        h = h.reshape(B, nb, g, -1)
        base = self.draft_logits(h)
        prev_pos = (blk_pos).clamp_max(T - 1)  # slot k's previous token sits at a + k
        prev = self.vocab.encode(input_ids.gather(1, prev_pos.reshape(B, -1)).reshape(B, nb, g))
        return self._apply_heads(h, base, prev)

    def _apply_heads(self, h: torch.Tensor, base: torch.Tensor, prev: torch.Tensor) -> BlockOutput:
        if self.head is None:
            return BlockOutput(h, base, base, None)
        logits = base + self.head.block_bias(prev, h).float()
        conf = self.conf.logits(h, self.head.prev_embedding(prev)) if self.conf is not None else None
        return BlockOutput(h, base, logits, conf)

    # ------------------------------------------------------------------ inference
    def _extend_all(self, state: DraftState) -> list[_RowCache]:
        """Append each request's newly committed features to its context K/V.

        Rows with the same number of new tokens are projected in one batched call."""
        rows = [self._cache.setdefault(rid, _RowCache()) for rid in state.request_ids]
        dev = self._lm_w.device
        for n, idx in self._groups_by_new_tokens(state.features).items():
            feats = torch.stack([state.features[i] for i in idx]).to(dev)
            start = torch.tensor([rows[i].length for i in idx], device=dev)
            kv = self.backbone.context_kv(feats, start[:, None] + torch.arange(n, device=dev))
            for j, i in enumerate(idx):
                r = rows[i]
                r.append([LayerKV(l.k[j : j + 1], l.v[j : j + 1]) for l in kv])
        self._check_context(state.request_ids, state.seqs, [r.length for r in rows], [r.kv is not None for r in rows])
        return rows

    def _batched_ctx(self, rows: list[_RowCache]) -> tuple[list[LayerKV], torch.Tensor | None]:
        """Stack per-request context K/V into a right-padded batch plus the block mask."""
        if len(rows) == 1:
            return rows[0].kv, None
        out, valid = [], None
        per_row = [r.kv for r in rows]
        for layer in range(len(self.backbone.layers)):
            kv, valid = pad_kv([kvs[layer] for kvs in per_row])
            out.append(kv)
        g = self.cfg.gamma
        blk = torch.ones(len(rows), g, g, dtype=torch.bool, device=valid.device)
        return out, torch.cat([valid[:, None, :].expand(-1, g, -1), blk], 2)

    @torch.inference_mode()
    def propose(self, state: DraftState) -> Proposal:
        if state.features is None:
            raise RuntimeError(f"{self.name} drafter needs target features: the engine must pass DraftState.features")
        self._need_target()
        rows = self._extend_all(state)
        g = self.cfg.gamma
        dev = self._lm_w.device
        anchors = torch.tensor([s[-1] for s in state.seqs], device=dev)
        anchor_pos = torch.tensor([len(s) - 1 for s in state.seqs], device=dev)
        ctx, mask = self._batched_ctx(rows)
        pos = anchor_pos[:, None] + torch.arange(g, device=dev)
        h = self.backbone(self.embed(self.block_inputs(anchors)), pos, ctx, mask)  # [B, g, d]
        # the block runs at its trained length (its attention is bidirectional), but the draft
        # logits and the head's left-to-right loop only for the k slots asked for: slot j of
        # the head depends on slots < j alone, so the first k slots are the same as when all
        # g are drawn (the random draws too: _sample draws for g slots and keeps k)
        k = min(g, state.max_draft)
        h = h[:, :k]
        base = self.draft_logits(h)
        tokens, probs, conf = self._sample(h, base, self.vocab.encode(anchors), state, draws=g)
        lens = torch.full((len(rows),), k, dtype=torch.long)
        return self._proposal(self.vocab.decode(tokens).cpu(), lens, probs, conf)

    def _sample(
        self, h: torch.Tensor, base: torch.Tensor, prev: torch.Tensor, state: DraftState, draws: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draft tokens at the target's temperature (top-k / top-p shape only the target:
        any draft distribution is lossless). Without a head every slot is independent;
        with one, the Markov / RNN loop runs left to right (kernels.markov_sample /
        rnn_sample). Returns draft-vocab tokens [B, g], fp32 probs [B, g, K] (exactly
        what the tokens were drawn from), calibrated confidences [B, g] or None.
        ``draws`` (>= g): slots' worth of random numbers to take from the generators, of
        which the first g are used, so a shorter proposal keeps the random stream of a full one."""
        temp = state.params.temperature
        B, g, K = base.shape
        n = g if draws is None else draws
        if n < g:
            raise ValueError(f"draws ({n}) must cover the {g} slots sampled")
        if self.head is not None and kernels.get_backend() == "triton":  # forced: the fused kernels
            noise = None if temp == 0 else exponential((B, n * K), state.generator, base.device).view(B, n, K)[:, :g].contiguous()
            if isinstance(self.head, MarkovHead):
                tok, probs = kernels.markov_sample(base, self.head.w1.weight, self.head.w2.weight, prev, temp, noise)
            else:
                cell = self.head.cell
                tok, probs = kernels.rnn_sample(base, h, self.head.w1.weight, cell.weight, cell.bias, self.head.w2.weight, prev, temp, noise)
        else:
            # one uniform per slot, drawn by inverse CDF (the exponential race needed K per slot)
            u = None if temp == 0 else uniform((B, n), state.generator, base.device, torch.float64)[:, :g].contiguous()
            if self.head is None:
                probs = temperature_probs(base, temp)
                tok = probs.argmax(-1) if u is None else inverse_cdf(probs.view(B * g, K), u.view(-1)).view(B, g)
                return tok, probs, None
            tok, probs = self._sequential(h, base, prev, temp, u)
        conf = None
        if self.conf is not None:
            prevs = torch.cat([prev[:, None], tok[:, :-1]], 1)  # x_0 = anchor, then the drafts
            conf = self.calibrator.apply(torch.sigmoid(self.conf.logits(h, self.head.prev_embedding(prevs)).float()))
        return tok, probs, conf

    def _sequential(
        self, h: torch.Tensor, base: torch.Tensor, prev: torch.Tensor, temp: float, u: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-to-right head loop: slot k draws from softmax((U_k + B_k) / T), B_k from the
        previous draft (Markov: a cached transition row; RNN: one cell step). Same semantics
        as kernels.markov_sample / rnn_sample, one uniform per slot instead of K noise draws."""
        B, g, K = base.shape
        markov = isinstance(self.head, MarkovHead)
        state = None if markov else self.head.init_state(B, base.device)
        toks, probs = [], []
        x = prev
        for k in range(g):
            if markov:
                bias = self._transitions(self.head, x)
            else:
                bias, state = self.head.step(state, x, h[:, k])
            p = temperature_probs(base[:, k] + bias.float(), temp)
            x = p.argmax(-1) if u is None else inverse_cdf(p, u[:, k])
            toks.append(x)
            probs.append(p)
        return torch.stack(toks, 1), torch.stack(probs, 1)
