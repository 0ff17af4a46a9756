"""What every trained drafter shares: its config, the draft vocabulary, and the link to
the target's frozen embedding and LM head (borrowed, identity-checked, never saved)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dspark import packed_linear
from dspark.drafters.base import Proposal
from dspark.drafters.vocab import DraftVocab
from dspark.heads.calibration import STSCalibrator

KINDS = ("dflash", "dspark", "eagle3")


@dataclass
class DraftConfig:
    """Everything needed to rebuild a drafter; stored in config.json with the weights.

    gamma: draft tokens per round (block size for dflash/dspark, chain length for eagle3).
    """

    kind: Literal["dflash", "dspark", "eagle3"] = "dspark"
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

    @classmethod
    def defaults_for(cls, kind: str) -> dict[str, Any]:
        if kind == "dspark":
            return {"head": "markov", "confidence": True}
        if kind == "eagle3":
            return {"head": "none", "confidence": False, "num_layers": 1}
        return {"head": "none", "confidence": False}

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"drafter kind must be one of {KINDS}, got {self.kind!r}")
        if self.head not in ("markov", "rnn", "none"):
            raise ValueError(f"head must be markov, rnn or none, got {self.head!r}")
        if self.kind != "dspark" and (self.head != "none" or self.confidence):
            raise ValueError(f"a {self.kind} drafter has no sequential or confidence head (head=none, confidence=false)")
        if self.kind == "dspark" and self.head == "none":
            raise ValueError("a dspark drafter needs head=markov or head=rnn")
        if self.kind == "eagle3" and self.num_layers != 1:
            raise ValueError("an eagle3 drafter has exactly one decoder layer (num_layers=1)")
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


def default_feature_layers(num_layers: int) -> list[int]:
    """Five layers spread over depth, never the first (embedding-like) nor the last."""
    return sorted({max(1, round(i * (num_layers - 2) / 4)) for i in range(5)})


class LinkedDrafter(nn.Module):
    """Base of the trained drafters. Subclasses build their modules in ``__init__`` and
    implement ``propose``; ``self._cache`` holds per-request inference state."""

    def __init__(self, cfg: DraftConfig, target_config: Any, vocab: DraftVocab | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.kind
        self.target_config = target_config
        self.feature_layers = list(cfg.feature_layers)
        self.vocab = vocab if vocab is not None else DraftVocab.full(cfg.target_vocab_size)
        if self.vocab.target_vocab_size != cfg.target_vocab_size:
            raise ValueError("draft vocabulary was built for another target vocabulary size")
        cfg.draft_vocab_size = 0 if self.vocab.is_full else self.vocab.size
        self.calibrator = STSCalibrator()
        # frozen target pieces, borrowed by attach() (not registered, not saved)
        self._embed: nn.Module | None = None
        self._lm_w: torch.Tensor | None = None
        self._softcap: float | None = None
        self._packing = False
        self._cache: dict[int, Any] = {}

    def _proposal(self, tokens: torch.Tensor, lens: torch.Tensor, probs: torch.Tensor | None,
                  confidence: torch.Tensor | None = None) -> Proposal:
        """A Proposal from draft-vocabulary probs [B, K, Kd]: they stay over the draft
        vocabulary (``support``), so the full [B, K, V] tensor is built only if asked for."""
        if probs is None or self.vocab.is_full:
            return Proposal(tokens, lens, probs, confidence)
        return Proposal(tokens, lens, probs, confidence, support=self.vocab.ids, vocab_size=self.vocab.target_vocab_size)

    @classmethod
    def for_target(cls, target: Any, kind: str, vocab: DraftVocab | None = None, **overrides: Any) -> LinkedDrafter:
        """A fresh (untrained) drafter of ``kind`` shaped for ``target``."""
        base: dict[str, Any] = dict(
            kind=kind,
            target_name=target.name,
            target_model_type=target.config.model_type,
            target_vocab_size=target.vocab_size,
            target_num_layers=target.num_layers,
            hidden_size=target.hidden_size,
            feature_layers=default_feature_layers(target.num_layers),
        )
        base.update(DraftConfig.defaults_for(kind))
        base.update(overrides)
        drafter = cls(DraftConfig(**base), target.config, vocab)
        drafter.attach(target)
        return drafter

    def attach(self, target: Any) -> None:
        """Share the target's frozen embedding and LM head, after an identity check."""
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
        w = target.get_lm_head_weight()
        # object.__setattr__ bypasses nn.Module registration: the target owns these
        object.__setattr__(self, "_embed", target.model.get_input_embeddings())
        object.__setattr__(self, "_lm_w", w if self.vocab.is_full else w[self.vocab.ids.to(w.device)].detach())
        self._softcap = getattr(target.config, "final_logit_softcapping", None)
        self._packing = bool(getattr(target, "packing", False))  # few-row products through oneDNN
        self.to(device=w.device)

    def _need_target(self) -> None:
        if self._embed is None or self._lm_w is None:
            raise RuntimeError("drafter is not attached to a target: call attach(target)")

    @property
    def device(self) -> torch.device:
        self._need_target()
        return self._lm_w.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> the target's (frozen) input embeddings."""
        self._need_target()
        return self._embed(ids)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., K] fp32 logits over the draft vocabulary (frozen LM head rows)."""
        self._need_target()
        w = self._lm_w
        x = hidden.to(w.dtype)
        rows = x.numel() // x.shape[-1]
        if not torch.is_grad_enabled() and w.dtype == torch.float32 and rows <= 64:
            if rows >= 2 and w.device.type == "cpu" and self._packing:
                # oneDNN on a prepacked copy of the rows (dspark.packed_linear), as the target's layers
                logits = packed_linear.packed(w).linear(x)
            else:
                # a few rows at inference: W @ x^T streams W once in its own layout (~1.3-2x
                # faster on CPU than x @ W^T in fp32; bf16 prefers the plain product)
                logits = (w @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], w.shape[0]).float()
        else:
            logits = (x @ w.T).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @staticmethod
    def _groups_by_new_tokens(features: Sequence[torch.Tensor | None]) -> dict[int, list[int]]:
        """Rows with newly committed features, grouped by how many (one batched call each)."""
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(features):
            if f is not None and len(f):
                groups.setdefault(len(f), []).append(i)
        return groups

    def _check_context(self, request_ids: Sequence[int], seqs: Sequence[Sequence[int]], lengths: Sequence[int], ready: Sequence[bool]) -> None:
        """The context must cover exactly the positions before each request's anchor."""
        for rid, s, n, ok in zip(request_ids, seqs, lengths, ready):
            if n != len(s) - 1 or not ok:
                raise RuntimeError(
                    f"{self.name} drafter context for request {rid} holds {n} positions but the anchor is at "
                    f"{len(s) - 1}: features must be given for every committed token exactly once"
                )

    def release(self, request_ids: Sequence[int]) -> None:
        for rid in request_ids:
            self._cache.pop(rid, None)

    def save_pretrained(self, path: str) -> None:
        from dspark.drafters.checkpoint import save_drafter

        save_drafter(self, path)

    @classmethod
    def from_pretrained(cls, path: str, target: Any) -> LinkedDrafter:
        from dspark.drafters.checkpoint import load_drafter

        return load_drafter(path, target)
