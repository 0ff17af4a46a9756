"""Eagle3 baseline: an autoregressive one-layer drafter.

Position j reads [embed(x_{j+1}) ; feature_j] (width 2d) and predicts x_{j+2}. The
feature is the fused target feature f_j = W_fc [h(l1); ...; h(lm)] at positions the
target has verified, and the drafter's own previous output hidden state while it chains
ahead of the target. The layer is the target family's decoder layer with q/k/v reading
2d inputs; embedding and LM head are the target's, frozen.

Training-time test (TTT, ``forward_ttt``): step 1 uses target features; step s re-feeds
step s-1's output hidden from the previous position, with the attention pattern chain
drafting produces (step-1 keys up to j-s+1, then one key of each later step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dspark.drafters.backbone import InjectedLayer, init_linears, LayerKV, Rotary, draft_layer_config, family_layer_class, pad_kv, rope_theta
from dspark.drafters.base import DraftState, Proposal
from dspark.drafters.linked import DraftConfig, LinkedDrafter
from dspark.drafters.vocab import DraftVocab
from dspark.sampling import sample, temperature_probs


class _RowCache:
    """Per request: the layer's K/V of committed positions, and the output hidden of the
    last one (which predicts the first draft token)."""

    def __init__(self) -> None:
        self.kv: LayerKV | None = None
        self.last: torch.Tensor | None = None  # [d]

    @property
    def length(self) -> int:
        return 0 if self.kv is None else int(self.kv.k.shape[2])


class Eagle3Drafter(LinkedDrafter):
    def __init__(self, cfg: DraftConfig, target_config: Any, vocab: DraftVocab | None = None) -> None:
        super().__init__(cfg, target_config, vocab)
        if cfg.kind != "eagle3":
            raise ValueError(f"Eagle3Drafter builds eagle3 drafters, not {cfg.kind!r}")
        lcfg = draft_layer_config(target_config, 1)
        layer = family_layer_class(lcfg)(lcfg, 0)
        d = lcfg.hidden_size
        a = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # attention reads [embedding ; feature]
            old = getattr(a, name)
            setattr(a, name, nn.Linear(2 * d, old.out_features, bias=old.bias is not None))
        norm_cls = type(layer.input_layernorm)
        eps = getattr(lcfg, "rms_norm_eps", 1e-6)
        self.fc = nn.Linear(len(cfg.feature_layers) * d, d, bias=False)
        self.hidden_norm = norm_cls(d, eps=eps)
        self.layer = InjectedLayer(layer, Rotary(a.head_dim, rope_theta(lcfg)))
        self.norm = norm_cls(d, eps=eps)
        init_linears(self)

    # ------------------------------------------------------------------ pieces
    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., m*d] raw target features -> [..., d]."""
        return self.fc(feats.to(self.fc.weight.dtype))

    def step(
        self, tokens: torch.Tensor, feat: torch.Tensor, pos: torch.Tensor, past: LayerKV | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, LayerKV]:
        """tokens [B, L] (x_{j+1}), feat [B, L, d], pos [B, L] -> (output hidden [B, L, d], new K/V)."""
        emb = self.embed(tokens).to(feat.dtype)
        qkv_in = torch.cat([self.layer.layer.input_layernorm(emb), self.hidden_norm(feat)], dim=-1)
        return self.layer.attend(feat, qkv_in, pos, past, mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.draft_logits(self.norm(hidden))

    # ------------------------------------------------------------------ training view
    def forward_ttt(
        self, feats: torch.Tensor, input_ids: torch.Tensor, steps: int = 7, return_hidden: bool = False,
        need: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Training-time test unroll.

        feats [B, T, m*d] target features, input_ids [B, T]. Returns ``steps`` tensors of
        fp32 logits [B, T, K]; element s-1 at position j is step s's prediction of
        x_{j+2}, made from a feature chain that started at position j-s+1. Valid where
        j-s+1 >= 0 and j+2 < T.

        ``need`` [B, T] bool (with ``return_hidden``): the positions whose outputs will be
        read. Step 1 still runs everywhere (every later step attends to its keys); step
        s >= 2 runs only where a needed position's chain passes (:meth:`_ttt_sparse`), with
        the same values there. Elsewhere the returned hidden states are zero.
        """
        if need is not None:
            if not return_hidden:
                raise ValueError("forward_ttt(need=...) returns hidden states: pass return_hidden=True")
            if need.shape != input_ids.shape:
                raise ValueError(f"need {tuple(need.shape)} must match input_ids {tuple(input_ids.shape)}")
            return self._ttt_sparse(feats, input_ids, steps, need)
        B, T = input_ids.shape
        dev = input_ids.device
        tok = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # x_{j+1} (last is padding)
        pos = torch.arange(T, device=dev).expand(B, T)
        j = torch.arange(T, device=dev)
        feat = self.fuse(feats)
        keys_k: list[torch.Tensor] = []
        keys_v: list[torch.Tensor] = []
        out: list[torch.Tensor] = []
        for s in range(1, steps + 1):
            # step-1 keys at positions <= j-s+1; step r keys (2 <= r <= s) at position j-s+r
            masks = [j[None, :] <= (j[:, None] - s + 1)]
            masks += [j[None, :] == (j[:, None] - s + r) for r in range(2, s + 1)]
            mask = torch.cat(masks, dim=1).expand(B, T, -1)
            past = None if not keys_k else LayerKV(torch.cat(keys_k, 2), torch.cat(keys_v, 2))
            hidden, new = self.step(tok, feat, pos, past, mask)
            keys_k.append(new.k)
            keys_v.append(new.v)
            out.append(hidden if return_hidden else self.logits(hidden))
            # next step's feature at position j is this step's output at position j-1
            feat = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        return out

    def _ttt_sparse(self, feats: torch.Tensor, input_ids: torch.Tensor, steps: int, need: torch.Tensor) -> list[torch.Tensor]:
        """forward_ttt for the positions ``need`` marks. Step s at position p reads step s-1
        at p-1 and the keys of step r at p-s+r, so the positions step s must run are
        P_s = {p : some needed j has p <= j <= p + steps - s}; P_s is closed under what
        step s reads (p-1 and p-s+r lie in P_{s-1} and P_r). Each row gathers its own P_s
        (right-padded to the batch's longest), so the work of steps >= 2 scales with the
        needed positions instead of with T."""
        B, T = input_ids.shape
        dev = input_ids.device
        tok = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        pos_all = torch.arange(T, device=dev)
        feat = self.fuse(feats)
        h1, kv1 = self.step(tok, feat, pos_all.expand(B, T), None, (pos_all[None, :] <= pos_all[:, None]).expand(B, T, T))
        out = [h1]
        keys_k, keys_v = [kv1.k], [kv1.v]
        prev_dense = h1
        # dist[b, p]: how far the nearest needed position at or after p lies (> T where none)
        ahead = torch.where(need, pos_all.expand(B, T), torch.full((B, T), 2 * T, device=dev, dtype=torch.long))
        dist = torch.flip(torch.cummin(torch.flip(ahead, [1]), 1).values, [1]) - pos_all[None, :]
        idxs: list[torch.Tensor] = []
        for s in range(2, steps + 1):
            run = dist <= steps - s  # [B, T] positions step s must run
            L = max(1, int(run.sum(1).max()))
            # per row: its positions in order, padded with T (sorts last)
            order = torch.where(run, pos_all.expand(B, T), torch.full_like(dist, T))
            idx = order.sort(1).values[:, :L]  # [B, L]
            p = idx.clamp_max(T - 1)
            # the feature of step s at p is step s-1's output at p - 1 (zero at p = 0)
            shifted = torch.cat([torch.zeros_like(prev_dense[:, :1]), prev_dense[:, :-1]], dim=1)
            f = shifted.gather(1, p[..., None].expand(-1, -1, shifted.shape[-1]))
            t = tok.gather(1, p)
            # keys: step 1 at positions <= p-s+1; step r (2 <= r < s) at exactly p-s+r; its own
            masks = [pos_all[None, None, :] <= (p[..., None] - s + 1)]
            for r, ir in zip(range(2, s), idxs):
                masks.append((ir[:, None, :] == (p[..., None] - s + r)) & (ir[:, None, :] < T))
            own = torch.eye(L, dtype=torch.bool, device=dev)[None].expand(B, L, L)
            mask = torch.cat(masks + [own], dim=2)  # padding queries see their own key: no empty rows
            past = LayerKV(torch.cat(keys_k, 2), torch.cat(keys_v, 2))
            h, new = self.step(t, f, p, past, mask)
            keys_k.append(new.k)
            keys_v.append(new.v)
            idxs.append(idx)
            # scatter into a dense [B, T(+1 padding slot), d] buffer; padding lands in column T
            dense = torch.zeros(B, T + 1, h.shape[-1], device=dev, dtype=h.dtype)
            dense = dense.scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), h)[:, :T]
            out.append(dense)
            prev_dense = dense
        return out

    # ------------------------------------------------------------------ inference
    def _extend_all(self, state: DraftState) -> list[_RowCache]:
        rows = [self._cache.setdefault(rid, _RowCache()) for rid in state.request_ids]
        dev = self.device
        for n, idx in self._groups_by_new_tokens(state.features).items():
            start = torch.tensor([rows[i].length for i in idx], device=dev)
            pos = start[:, None] + torch.arange(n, device=dev)
            tokens = torch.tensor(
                [[state.seqs[i][int(p) + 1] for p in pos[j]] for j, i in enumerate(idx)], device=dev
            )  # x_{j+1}: committed (the last one is the anchor)
            feat = self.fuse(torch.stack([state.features[i] for i in idx]).to(dev))
            if all(rows[i].kv is None for i in idx):
                past, mask = None, torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None].expand(len(idx), -1, -1)
            else:
                kvs = [rows[i].kv if rows[i].kv is not None else self._empty_kv() for i in idx]
                past, valid = pad_kv(kvs)
                causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None].expand(len(idx), -1, -1)
                mask = torch.cat([valid[:, None, :].expand(-1, n, -1), causal], dim=2)
            hidden, new = self.step(tokens, feat, pos, past, mask)
            for j, i in enumerate(idx):
                r = rows[i]
                add = LayerKV(new.k[j : j + 1], new.v[j : j + 1])
                r.kv = add if r.kv is None else LayerKV(torch.cat([r.kv.k, add.k], 2), torch.cat([r.kv.v, add.v], 2))
                r.last = hidden[j, -1]
        self._check_context(state.request_ids, state.seqs, [r.length for r in rows], [r.last is not None for r in rows])
        return rows

    def _empty_kv(self) -> LayerKV:
        a = self.layer
        z = torch.zeros(1, a.n_kv, 0, a.head_dim, device=self.device, dtype=self.fc.weight.dtype)
        return LayerKV(z, z)

    @torch.inference_mode()
    def propose(self, state: DraftState) -> Proposal:
        if state.features is None:
            raise RuntimeError("eagle3 drafter needs target features: the engine must pass DraftState.features")
        self._need_target()
        rows = self._extend_all(state)
        k = min(self.cfg.gamma, state.max_draft)
        B, dev = len(rows), self.device
        params, gen = state.params, state.generator
        if len(rows) == 1:
            past, valid = rows[0].kv, None
        else:
            past, valid = pad_kv([r.kv for r in rows])
        hidden = torch.stack([r.last for r in rows])[:, None]  # [B, 1, d]
        pos = torch.tensor([len(s) - 1 for s in state.seqs], device=dev)[:, None]  # the anchor's position
        toks, probs = [], []
        for step in range(k):
            p = temperature_probs(self.logits(hidden[:, -1]), params.temperature)
            x = p.argmax(-1) if params.greedy else sample(p, gen)
            toks.append(x)
            probs.append(p)
            if step == k - 1:
                break
            # chain: the drafted token with the drafter's own hidden state as its feature
            mask = None if valid is None else torch.cat([valid, torch.ones(B, step + 1, dtype=torch.bool, device=dev)], 1)[:, None]
            hidden, new = self.step(self.vocab.decode(x)[:, None], hidden[:, -1:], pos + step, past, mask)
            past = LayerKV(torch.cat([past.k, new.k], 2), torch.cat([past.v, new.v], 2))
        tokens = self.vocab.decode(torch.stack(toks, 1)) if toks else torch.zeros(B, 0, dtype=torch.long)
        return self._proposal(tokens.cpu(), torch.full((B,), k, dtype=torch.long), torch.stack(probs, 1) if probs else None)
