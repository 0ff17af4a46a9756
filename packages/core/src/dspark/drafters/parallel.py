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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from dspark.drafters.backbone import LayerKV, ParallelBackbone, block_mask
from dspark.drafters.base import DraftState, Proposal
from dspark.drafters.vocab import DraftVocab
from dspark.heads.calibration import STSCalibrator
from dspark.heads.confidence import ConfidenceHead
from dspark.heads.markov import MarkovHead
from dspark.heads.rnn import RNNHead
from dspark.sampling import probs_from_logits, sample

HEADS = {"markov": MarkovHead, "rnn": RNNHead}


@dataclass
class DraftConfig:
    """Everything needed to rebuild a drafter; stored as config.json with the weights."""

    kind: Literal["dflash", "dspark"] = "dspark"
    target_name: str = ""
    target_model_type: str = ""
    target_vocab_size: int = 0
    target_num_layers: int = 0
    hidden_size: int = 0
    feature_layers: list[int] = field(default_factory=list)
    num_layers: int = 2
    gamma: int = 7
    mask_token_id: int = 0
    head: Literal["markov", "rnn", "none"] = "markov"
    rank: int = 256
    confidence: bool = True
    draft_vocab_size: int = 0  # 0 = the full target vocabulary

    def validate(self) -> None:
        if self.kind not in ("dflash", "dspark"):
            raise ValueError(f"drafter kind must be dflash or dspark, got {self.kind!r}")
        if self.head not in ("markov", "rnn", "none"):
            raise ValueError(f"head must be markov, rnn or none, got {self.head!r}")
        if self.kind == "dflash" and (self.head != "none" or self.confidence):
            raise ValueError("a dflash drafter has no sequential or confidence head (head=none, confidence=false)")
        if self.kind == "dspark" and self.head == "none":
            raise ValueError("a dspark drafter needs head=markov or head=rnn")
        if self.gamma < 1 or self.num_layers < 1:
            raise ValueError(f"gamma and num_layers must be >= 1, got {self.gamma}, {self.num_layers}")
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one target layer")
        bad = [i for i in self.feature_layers if not 0 <= i < self.target_num_layers]
        if bad:
            raise ValueError(f"feature_layers {bad} out of range for a {self.target_num_layers}-layer target")
        if not 0 <= self.mask_token_id < self.target_vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the target vocabulary")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """Per-request context K/V (one tensor pair per draft layer, batch 1)."""

    def __init__(self) -> None:
        self.kv: list[LayerKV] | None = None
        self.length = 0


class ParallelDrafter(nn.Module):
    """DFlash / DSpark drafter. Build with :meth:`for_target`, load with
    :meth:`from_pretrained` (``dspark.drafters.checkpoint``)."""

    def __init__(self, cfg: DraftConfig, target_config: Any, vocab: DraftVocab | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.kind
        self.target_config = target_config
        self.feature_layers = list(cfg.feature_layers)
        self.backbone = ParallelBackbone(target_config, cfg.num_layers, len(cfg.feature_layers))
        self.vocab = vocab if vocab is not None else DraftVocab.full(cfg.target_vocab_size)
        if self.vocab.target_vocab_size != cfg.target_vocab_size:
            raise ValueError("draft vocabulary was built for another target vocabulary size")
        cfg.draft_vocab_size = 0 if self.vocab.is_full else self.vocab.size
        d, k = cfg.hidden_size, self.vocab.size
        self.head = HEADS[cfg.head](k, cfg.rank, d) if cfg.head != "none" else None
        self.conf = ConfidenceHead(d, cfg.rank) if cfg.confidence and self.head is not None else None
        self.calibrator = STSCalibrator()
        # frozen target pieces, attached (not owned, not saved)
        self._embed: nn.Module | None = None
        self._lm_w: torch.Tensor | None = None
        self._softcap: float | None = None
        self._cache: dict[int, _RowCache] = {}

    # ------------------------------------------------------------------ target link
    @classmethod
    def for_target(cls, target: Any, kind: str = "dspark", vocab: DraftVocab | None = None, **overrides: Any) -> ParallelDrafter:
        """A fresh (untrained) drafter shaped for ``target``."""
        c = target.config
        base = dict(
            kind=kind,
            target_name=target.name,
            target_model_type=c.model_type,
            target_vocab_size=target.vocab_size,
            target_num_layers=target.num_layers,
            hidden_size=target.hidden_size,
            head="markov" if kind == "dspark" else "none",
            confidence=kind == "dspark",
        )
        base.update(overrides)
        if "feature_layers" not in base:
            n = target.num_layers
            base["feature_layers"] = sorted({max(1, round(i * (n - 2) / 4)) for i in range(5)})
        drafter = cls(DraftConfig(**base), c, vocab)
        drafter.attach(target)
        return drafter

    def attach(self, target: Any) -> None:
        """Share the target's frozen embedding and LM head (after an identity check)."""
        c = self.cfg
        checks = {
            "model_type": (c.target_model_type, target.config.model_type),
            "vocab_size": (c.target_vocab_size, target.vocab_size),
            "hidden_size": (c.hidden_size, target.hidden_size),
            "num_layers": (c.target_num_layers, target.num_layers),
        }
        bad = {k: v for k, v in checks.items() if v[0] != v[1]}
        if bad:
            detail = ", ".join(f"{k}: drafter {a} vs target {b}" for k, (a, b) in bad.items())
            raise ValueError(f"drafter was trained for target {c.target_name!r}, not {target.name!r} ({detail})")
        # bypass nn.Module registration: the target owns these, the drafter only borrows
        object.__setattr__(self, "_embed", target.model.get_input_embeddings())
        w = target.get_lm_head_weight()
        object.__setattr__(self, "_lm_w", w if self.vocab.is_full else w[self.vocab.ids.to(w.device)].detach())
        self._softcap = getattr(target.config, "final_logit_softcapping", None)
        self.to(device=w.device)

    def _need_target(self) -> None:
        if self._embed is None or self._lm_w is None:
            raise RuntimeError("drafter is not attached to a target: call attach(target)")

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        self._need_target()
        return self._embed(ids)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., K] fp32 logits over the draft vocabulary."""
        self._need_target()
        logits = (hidden.to(self._lm_w.dtype) @ self._lm_w.T).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

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
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(state.features):
            if f is not None and len(f):
                groups.setdefault(len(f), []).append(i)
        dev = self._lm_w.device
        for n, idx in groups.items():
            feats = torch.stack([state.features[i] for i in idx]).to(dev)
            start = torch.tensor([rows[i].length for i in idx], device=dev)
            kv = self.backbone.context_kv(feats, start[:, None] + torch.arange(n, device=dev))
            for j, i in enumerate(idx):
                r = rows[i]
                new = [LayerKV(l.k[j : j + 1], l.v[j : j + 1]) for l in kv]
                r.kv = new if r.kv is None else [LayerKV(torch.cat([a.k, b.k], 2), torch.cat([a.v, b.v], 2)) for a, b in zip(r.kv, new)]
                r.length += n
        for rid, r, s in zip(state.request_ids, rows, state.seqs):
            if r.length != len(s) - 1 or r.kv is None:
                raise RuntimeError(
                    f"drafter context for request {rid} holds {r.length} positions but the anchor is at "
                    f"{len(s) - 1}: features must be given for every committed token exactly once"
                )
        return rows

    def _batched_ctx(self, rows: list[_RowCache]) -> tuple[list[LayerKV], torch.Tensor | None]:
        """Stack per-request context K/V into a right-padded batch plus a key mask."""
        if len(rows) == 1:
            return rows[0].kv, None
        out = []
        for layer in range(len(self.backbone.layers)):
            # [Hkv, T, hd] -> [T, Hkv, hd] so pad_sequence pads the time axis
            ks = pad_sequence([r.kv[layer].k[0].transpose(0, 1) for r in rows], batch_first=True)
            vs = pad_sequence([r.kv[layer].v[0].transpose(0, 1) for r in rows], batch_first=True)
            out.append(LayerKV(ks.transpose(1, 2), vs.transpose(1, 2)))
        lengths = torch.tensor([r.length for r in rows], device=self._lm_w.device)
        tmax, g = int(lengths.max()), self.cfg.gamma
        valid = torch.arange(tmax, device=lengths.device)[None, :] < lengths[:, None]
        blk = torch.ones(len(rows), g, g, dtype=torch.bool, device=lengths.device)
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
        base = self.draft_logits(h)
        tokens, probs, conf = self._sample(h, base, self.vocab.encode(anchors), state)
        k = min(g, state.max_draft)
        lens = torch.full((len(rows),), k, dtype=torch.long)
        full_probs = self.vocab.scatter_probs(probs[:, :k])
        return Proposal(self.vocab.decode(tokens[:, :k]).cpu(), lens, full_probs, None if conf is None else conf[:, :k])

    def _sample(
        self, h: torch.Tensor, base: torch.Tensor, prev: torch.Tensor, state: DraftState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Left-to-right sampling (independent per slot without a head).
        Returns draft-vocab tokens [B, g], fp32 probs [B, g, K], confidences [B, g] or None."""
        params, gen = state.params, state.generator
        if self.head is None:
            probs = probs_from_logits(base, params)
            if params.greedy:
                return probs.argmax(-1), probs, None
            return torch.stack([sample(probs[:, k], gen) for k in range(base.shape[1])], 1), probs, None
        B, g = base.shape[:2]
        hstate = self.head.init_state(B, h.device)
        toks, probs, confs = [], [], []
        for k in range(g):
            if self.conf is not None:
                confs.append(torch.sigmoid(self.conf.logits(h[:, k], self.head.prev_embedding(prev)).float()))
            bias, hstate = self.head.step(hstate, prev, h[:, k])
            p = probs_from_logits(base[:, k] + bias.float(), params)  # temperature after the bias
            x = p.argmax(-1) if params.greedy else sample(p, gen)
            toks.append(x)
            probs.append(p)
            prev = x
        conf = self.calibrator.apply(torch.stack(confs, 1)) if confs else None
        return torch.stack(toks, 1), torch.stack(probs, 1), conf

    def release(self, request_ids: Sequence[int]) -> None:
        for rid in request_ids:
            self._cache.pop(rid, None)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str) -> None:
        from dspark.drafters.checkpoint import save_drafter

        save_drafter(self, path)

    @classmethod
    def from_pretrained(cls, path: str, target: Any) -> ParallelDrafter:
        from dspark.drafters.checkpoint import load_drafter

        return load_drafter(path, target, cls)
