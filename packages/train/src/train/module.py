"""Lightning distillation of a drafter against the frozen target.

The module receives a built drafter and the target; it does not build either. Target
features come from the batch (offline cache) or are computed in the step (online mode).
With ``top_ids`` / ``top_logp`` in the batch (the target's cached top-k log-probabilities,
train.features.build_topk) the losses compare against that truncated distribution and
the step never runs the target's 262k-row LM head (dspark.losses.truncated_terms).
Objectives (dspark.losses, on the fused kernel terms):
- dspark: 0.1 CE + 0.9 TV + 1.0 confidence BCE over anchored blocks, weights exp(-(k-1)/4);
- dflash: CE only over the same blocks;
- eagle3: training-time test over ``ttt_steps`` steps, step s weighted 0.8^(s-1), soft
  cross-entropy against the target distribution, at ``anchors_per_seq`` random supervised
  positions per sequence (the chain itself runs over every position).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from dspark.losses import (
    combine_terms, draft_with_outside, dspark_loss, live_tau, position_weights, target_with_outside, truncated_soft_ce,
    truncated_terms,
)
from train.anchors import sample_anchors


def _target_ext_at(target: Any, final_hidden: torch.Tensor, vocab: Any, chunk: int = 256) -> torch.Tensor:
    """Rows of target final hidden [N, d] -> target logits [N, K+1] over the draft
    vocabulary with the target's outside-vocabulary mass as the last column (chunked)."""
    ids = vocab.ids.to(final_hidden.device)
    return torch.cat([target_with_outside(target.lm_head(final_hidden[s : s + chunk]), ids)
                      for s in range(0, final_hidden.shape[0], chunk)])


class DistillModule(L.LightningModule):
    def __init__(
        self,
        drafter: torch.nn.Module,
        target: Any,
        kind: str,
        lr: float = 6e-4,
        warmup_frac: float = 0.04,
        total_steps: int = 1000,
        anchors_per_seq: int = 16,
        loss_weights: tuple[float, float, float] = (0.1, 0.9, 1.0),
        ttt_steps: int = 7,
        ttt_decay: float = 0.8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("dspark", "dflash", "eagle3"):
            raise ValueError(f"cannot train a {kind!r} drafter")
        self.drafter = drafter
        object.__setattr__(self, "target", target)  # frozen and not part of the checkpoint
        self.kind, self.lr, self.warmup_frac, self.total_steps = kind, lr, warmup_frac, max(1, total_steps)
        self.anchors_per_seq, self.loss_weights = anchors_per_seq, loss_weights
        self.ttt_steps, self.ttt_decay = ttt_steps, ttt_decay
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    # a torch.Generator cannot cross into a spawned process (ddp_spawn): ship its state
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["gen"] = self.gen.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(state["gen"]), dtype=torch.uint8))
        super().__setstate__({**state, "gen": gen})

    # ------------------------------------------------------------------ features
    def features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [B, T, m*d], final hidden [B, T, d]) from the batch (cache) or the target."""
        if "feats" in batch:
            return batch["feats"], batch["final"]
        with torch.no_grad():
            out = self.target.forward(batch["input_ids"], taps=self.drafter.feature_layers, final_hidden=True, logits="none")
        feats = torch.cat([out.taps[i] for i in self.drafter.feature_layers], -1)
        return feats, out.final_hidden

    # ------------------------------------------------------------------ losses
    def block_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["loss_mask"]
        feats, final = self.features(batch)
        g = self.drafter.cfg.gamma
        anchors, valid, slot_mask = sample_anchors(mask.cpu(), g, self.anchors_per_seq, self.gen, self._row_generators(batch))
        anchors, valid, slot_mask = anchors.to(ids.device), valid.to(ids.device), slot_mask.to(ids.device)
        out = self.drafter.forward_blocks(feats, ids, anchors)
        T = ids.shape[1]
        pos = anchors[..., None] + torch.arange(g, device=ids.device)  # target hidden predicting slot j
        B, n = anchors.shape
        sel = valid.reshape(-1)
        labels = ids.gather(1, (pos + 1).clamp_max(T - 1).reshape(B, -1)).reshape(B * n, g)[sel]
        d_logits = out.logits.reshape(B * n, g, -1)
        if not bool(sel.all()):  # indexing copies [rows, g, K] and scatters its gradient back: only when needed
            d_logits = d_logits[sel]
        vocab = self.drafter.vocab
        K = d_logits.shape[-1]
        y = vocab.encode(labels)
        y = torch.where(y >= K, torch.full_like(y, -100), y)  # labels outside the draft vocabulary: no CE
        conf = out.conf_logits.reshape(B * n, g)[sel] if out.conf_logits is not None else None
        w_ce, w_tv, w_conf = self.loss_weights if self.kind == "dspark" else (1.0, 0.0, 0.0)
        m = slot_mask.reshape(B * n, g)[sel]
        if "top_ids" in batch:  # truncated target from the cache: no LM head
            tid, tlp = (self._at(batch[k], pos, T)[sel].reshape(-1, batch[k].shape[-1]) for k in ("top_ids", "top_logp"))
            ce, l1, acc = truncated_terms(d_logits.reshape(-1, K), self._draft_ids(tid, K), tlp, y.reshape(-1))
            terms = combine_terms(ce.view(-1, g), l1.view(-1, g), acc.view(-1, g), m, conf, w_ce, w_tv, w_conf)
        else:  # exact: the target's LM head on its final hidden states at those positions,
            # once per distinct position (the blocks of nearby anchors overlap: at 64 anchors
            # per ~200-token sequence, ~2x fewer rows of the 262k-row head)
            where = (torch.arange(B, device=pos.device)[:, None, None] * T + pos.clamp_max(T - 1)).reshape(B * n, g)[sel]
            uniq, inv = torch.unique(where.reshape(-1), return_inverse=True)
            t_ext = _target_ext_at(self.target, final.reshape(B * T, -1)[uniq], vocab)[inv]
            d_ext = draft_with_outside(d_logits.reshape(-1, K))
            terms = dspark_loss(d_ext.view(-1, g, K + 1), t_ext.view(-1, g, K + 1), y, m, conf, w_ce, w_tv, w_conf)
        # combine_terms normalises by this process's slot weight; rescale to the global batch's
        weight = (position_weights(g, device=m.device)[None, :] * m.float()).sum()
        loss = terms.loss * self._global_share(weight.reshape(1))[0]
        return {"loss": loss, "local_loss": terms.loss.detach(), "ce": terms.ce, "tv": terms.tv, "conf": terms.conf,
                "tau_est": torch.tensor(live_tau(terms.accept))}

    # ------------------------------------------------------------------ data parallelism
    def _row_generators(self, batch: dict[str, torch.Tensor]) -> list[torch.Generator] | None:
        """One generator per example, seeded by (seed, optimiser step, dataset index), so the
        anchors an example gets do not depend on which process or batch position it lands in.
        None for batches without indices (direct calls): those use ``self.gen``."""
        if "index" not in batch:
            return None
        step = int(self.global_step) if self._trainer is not None else 0
        return [torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_033 + int(i)) for i in batch["index"].tolist()]

    def _global_share(self, local: torch.Tensor) -> torch.Tensor:
        """Per-term factors world * local / sum over processes of local: a loss normalised by
        this process's count, times its factor, has DDP's gradient average equal the loss
        normalised over the whole global batch (one process: all ones, no communication)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return torch.ones_like(local, dtype=torch.float32)
        total = local.detach().float().clone()
        dist.all_reduce(total)
        return dist.get_world_size() * local.detach().float() / total.clamp_min(1e-8)

    @staticmethod
    def _at(x: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
        """x [B, T, k], pos [B, n, g] -> [B * n, g, k] rows of x at those positions."""
        B, n, g = pos.shape
        idx = pos.clamp_max(T - 1).reshape(B, -1, 1).expand(-1, -1, x.shape[-1])
        return x.gather(1, idx).reshape(B * n, g, x.shape[-1])

    def _draft_ids(self, target_ids: torch.Tensor, K: int) -> torch.Tensor:
        """Target ids -> draft-vocabulary ids, -1 outside the draft vocabulary."""
        d = self.drafter.vocab.encode(target_ids)
        return torch.where(d >= K, torch.full_like(d, -1), d)

    def ttt_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["loss_mask"].bool()
        feats, final = self.features(batch)
        B, T = ids.shape
        vocab = self.drafter.vocab
        total = torch.zeros((), device=ids.device)
        local = torch.zeros((), device=ids.device)
        accept = []
        j = torch.arange(T, device=ids.device)
        # position j predicts x_{j+2}; the target's distribution for it is read at j+1. It
        # is the same for every TTT step, so the 262k-row LM head runs once per batch.
        lab_ok = torch.zeros_like(mask)
        lab_ok[:, : T - 2] = mask[:, 2:]
        need = lab_ok & (j + 2 < T)[None, :]
        if self.anchors_per_seq and self.anchors_per_seq < T:
            # supervise anchors_per_seq random positions per sequence (the same number of
            # predictions per step as the block drafters)
            gens = self._row_generators(batch)
            if gens is None:
                score = torch.rand(need.shape, generator=self.gen)
            else:
                score = torch.stack([torch.rand(T, generator=g) for g in gens])
            score = score.to(ids.device).masked_fill(~need, -1.0)
            keep = torch.zeros_like(need)
            keep.scatter_(1, score.topk(self.anchors_per_seq, dim=1).indices, True)
            need = need & keep
        # steps >= 2 of the unroll run only where a supervised position's chain passes
        # (Eagle3Drafter._ttt_sparse: same values there, ~3x less work at 16 of ~250 positions)
        hidden = self.drafter.forward_ttt(feats, ids, self.ttt_steps, return_hidden=True, need=need)
        # rows supervised at each TTT step, and this process's share of them over the global batch
        counts = torch.stack([((j - s + 1 >= 0)[None, :] & need).sum() for s in range(1, len(hidden) + 1)])
        share = self._global_share(counts)
        if not need.any():
            return {"loss": total + 0 * sum(h.sum() for h in hidden), "ce": total.detach(), "tau_est": torch.tensor(1.0)}
        row = torch.full(need.shape, -1, dtype=torch.long, device=ids.device)
        row[need] = torch.arange(int(need.sum()), device=ids.device)
        truncated = "top_ids" in batch
        if truncated:  # the target's cached top-k at j+1: no LM head
            K = vocab.size
            nxt = need[:, :-1]
            top_ids = self._draft_ids(batch["top_ids"][:, 1:][nxt], K)
            top_logp = batch["top_logp"][:, 1:][nxt]
        else:
            hid_need = final[:, 1:][need[:, :-1]]
            vid = vocab.ids.to(final.device)
            p_all = torch.cat([torch.softmax(self.target.lm_head(hid_need[c : c + 256]), -1).index_select(-1, vid)
                               for c in range(0, hid_need.shape[0], 256)])
        for s, h in enumerate(hidden, start=1):
            sel = (j - s + 1 >= 0)[None, :] & need
            if not sel.any():
                continue
            d = self.drafter.logits(h[sel])  # [N, K]
            if truncated:
                ce_rows, l1 = truncated_soft_ce(d, top_ids[row[sel]], top_logp[row[sel]])
                ce = ce_rows.mean()
            else:
                p_t = p_all[row[sel]]
                ce = -(p_t * torch.log_softmax(d, -1)).sum(-1).mean()
                # analytic acceptance 1 - 0.5 ||p_d - p_t||_1 over the full vocabulary (p_d is 0 outside)
                l1 = (torch.softmax(d, -1) - p_t).abs().sum(-1) + (1 - p_t.sum(-1))
            total = total + self.ttt_decay ** (s - 1) * ce * share[s - 1]
            local = local + self.ttt_decay ** (s - 1) * ce.detach()
            accept.append((1 - 0.5 * l1).mean().detach())
        tau = live_tau(torch.stack(accept)) if accept else 1.0
        return {"loss": total, "local_loss": local, "ce": local, "tau_est": torch.tensor(tau)}

    # ------------------------------------------------------------------ lightning hooks
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.ttt_loss(batch) if self.kind == "eagle3" else self.block_loss(batch)
        self.log("loss", out.get("local_loss", out["loss"]).detach(), prog_bar=True)  # this process's own mean
        self.log("tau_est", out["tau_est"], prog_bar=True)
        for k in ("ce", "tv", "conf"):
            if k in out:
                self.log(f"loss_{k}", out[k])
        return out["loss"]

    def configure_optimizers(self):
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warm = max(1, int(self.warmup_frac * self.total_steps))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}
