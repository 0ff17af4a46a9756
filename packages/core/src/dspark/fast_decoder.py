"""A lean Gemma 3 decoder step over the engine's slot KV cache.

HF's Gemma 3 forward spends a fifth of a one-token CPU step outside the weight products
(measured on the 2-core box: ~1,900 small ATen calls per token, module dispatch, mask
construction, output capturing). This module runs the same computation with the same
weights and fewer, larger operations:

* q/k/v and gate/up are one product each (row-concatenated copies of the weights, made
  once and rebuilt if a source weight changes in place);
* RMSNorm as HF computes it (float32, ``x * rsqrt(mean(x^2) + eps) * (1 + w)``), with the
  ``1 + w`` factor precomputed;
* rotary embeddings computed once per layer type and step, as HF does;
* attention per request over its own span of the slot store (one small product per
  single-token row, SDPA with the row's mask for verify rows), no padded batch, no
  per-step masks of the whole batch.

Same arithmetic as HF's modules up to the summation order of the concatenated products
and of the attention kernel (a few fp32 ulps; ``tests/core/test_fast_decoder.py`` bounds
the difference against HF's forward and checks greedy identity). Used by
:class:`dspark.slot_cache.SlotKVCache` when :func:`supports` says the target qualifies
(text Gemma 3 without attention soft-capping or bidirectional attention, eager or SDPA
attention, no autograd); anything else keeps HF's forward.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dspark import packed_linear

if TYPE_CHECKING:
    from dspark.slot_cache import SlotKVCache, _Spans
    from dspark.target import Target

log = logging.getLogger(__name__)

_GEMMA3 = ("Gemma3TextModel",)


def supports(target: Target) -> str | None:
    """None if :class:`FastGemma3` can run ``target``'s decoder, else why not."""
    dec = target.decoder
    name = type(dec).__name__
    if name not in _GEMMA3:
        return f"{name} is not a Gemma 3 text decoder"
    cfg = target.config
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(cfg, "hidden_activation", None) != "gelu_pytorch_tanh":
        return f"activation {getattr(cfg, 'hidden_activation', None)!r}"
    if set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}:
        return f"layer types {set(cfg.layer_types)}"
    for layer in dec.layers:
        a = layer.self_attn
        if any(getattr(a, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention biases"
    rot = dec.rotary_emb
    for ty in set(cfg.layer_types):
        if not hasattr(rot, f"{ty}_inv_freq") or rot.rope_type.get(ty) != "default":
            return f"rope type {rot.rope_type.get(ty)!r} for {ty}"
    return None


class _Fused:
    """Row-concatenated copy of a few weights, rebuilt when any of them changes."""

    def __init__(self, *weights: torch.Tensor) -> None:
        self.src = weights
        self.sizes = [int(w.shape[0]) for w in weights]
        self._key: tuple[tuple[int, int], ...] | None = None
        self.weight: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        key = tuple((w.data_ptr(), w._version) for w in self.src)
        if key != self._key:
            # a normal tensor even when built inside inference mode: its oneDNN-packed copy
            # is cached by version counter, which inference tensors do not have
            with torch.inference_mode(False), torch.no_grad():
                self.weight = torch.cat([w.detach() for w in self.src], 0)
            self._key = key
        assert self.weight is not None
        return self.weight


def _rms(x: torch.Tensor, w1: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with the (1 + weight) factor precomputed in float32."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * w1).type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------- the step's elementwise parts
# Between the weight products a layer runs only elementwise work and row reductions (norms,
# rotary, residual adds, the gated activation): eager, about a hundred small ATen calls per
# layer. These three functions hold all of it, so that ``torch.compile`` can turn each into
# one fused kernel (FastGemma3(compile=True)); eager they compute exactly what the loop
# computed before they existed.


def _qkv_post(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
              hq: int, hkv: int, d: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R, N, (hq + 2 hkv) d] fused projection -> q, k (normed, rotated), v as [R, N, H, d]."""
    R, N = qkv.shape[0], qkv.shape[1]
    nq, nk = hq * d, hkv * d
    q = _rms(qkv[..., :nq].reshape(R, N, hq, d), wq, eps)
    k = _rms(qkv[..., nq:nq + nk].reshape(R, N, hkv, d), wk, eps)
    v = qkv[..., nq + nk:].reshape(R, N, hkv, d)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _residual_norms(out: torch.Tensor, residual: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sandwich-norm residual step: x = residual + rms(out) and the next block's input
    rms(x) (the MLP's pre-norm, the next layer's input norm, or the final norm)."""
    x = residual + _rms(out, w_post, eps)
    return x, _rms(x, w_next, eps)


def _gated_gelu(gu: torch.Tensor) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    return F.gelu(gu[..., :inter], approximate="tanh") * gu[..., inter:]


_KERNELS = {"qkv_post": _qkv_post, "residual_norms": _residual_norms, "gated_gelu": _gated_gelu}


class FastGemma3:
    """The decoder step of a Gemma 3 target, reading its weights (see module doc)."""

    def __init__(self, target: Target, compile: bool = False) -> None:
        why = supports(target)
        if why:
            raise ValueError(f"the fast decoder cannot run this target: {why}")
        self.target = target
        dec = target.decoder
        cfg = target.config
        self.cfg = cfg
        self.eps = float(cfg.rms_norm_eps)
        self.types = list(cfg.layer_types)
        self.hq, self.hkv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.d = int(cfg.head_dim)
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.layers = []
        for layer in dec.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "qkv": _Fused(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                "o": a.o_proj.weight,
                "gu": _Fused(m.gate_proj.weight, m.up_proj.weight),
                "down": m.down_proj.weight,
                "norms": (layer.input_layernorm, a.q_norm, a.k_norm, layer.post_attention_layernorm,
                          layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm),
            })
        self.final_norm = dec.norm
        self.compiled = bool(compile)
        self._kernels = dict(_KERNELS)
        if compile:
            self._kernels = {k: torch.compile(f, fullgraph=True) for k, f in _KERNELS.items()}
        self._w1_key: tuple[tuple[int, int], ...] | None = None
        self._w1: list[tuple[torch.Tensor, ...]] = []
        self._final_w1: torch.Tensor | None = None

    # ------------------------------------------------------------------ weights
    def _norm_factors(self) -> None:
        norms = [n for L in self.layers for n in L["norms"]] + [self.final_norm]
        key = tuple((n.weight.data_ptr(), n.weight._version) for n in norms)
        if key == self._w1_key:
            return
        with torch.no_grad():
            self._w1 = [tuple(1.0 + n.weight.detach().float() for n in L["norms"]) for L in self.layers]
            self._final_w1 = 1.0 + self.final_norm.weight.detach().float()
        self._w1_key = key

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.target.packing and x.dtype == torch.float32 and x.device.type == "cpu" and 2 <= rows <= 64:
            return packed_linear.packed(w).linear(x)
        return F.linear(x, w)

    # ------------------------------------------------------------------ rotary
    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        rot = self.target.decoder.rotary_emb
        out = {}
        for ty in set(self.types):
            inv = getattr(rot, f"{ty}_inv_freq")
            scale = getattr(rot, f"{ty}_attention_scaling")
            freqs = pos[..., None].float() * inv.to(device=pos.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * scale).to(dtype)[:, :, None]  # [R, N, 1, D]
            sin = (emb.sin() * scale).to(dtype)[:, :, None]
            out[ty] = (cos, sin)
        return out

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def forward(self, kv: SlotKVCache, ids: torch.Tensor, pos: torch.Tensor, spans: dict[str, _Spans],
                rows: torch.Tensor, taps: dict[int, int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``ids`` / ``pos`` [R, N] on the target's device; ``rows`` [R, 1] the requests'
        slots; writes the new keys/values into ``kv`` at ``pos``. Returns the final normed
        hidden states [R, N, d] and the outputs of the layers in ``taps``."""
        self._norm_factors()
        dec = self.target.decoder
        R, N = ids.shape
        x = dec.embed_tokens(ids)
        kv.grow(self.hkv, self.d, x.dtype, x.device)
        rope = self._rope(pos, x.dtype)
        captured: dict[int, torch.Tensor] = {}
        hq, hkv, d, eps = self.hq, self.hkv, self.d, self.eps
        grp = hq // hkv
        n_layers = len(self.layers)
        assert self._final_w1 is not None
        h = _rms(x, self._w1[0][0], eps)
        for li, (L, w1) in enumerate(zip(self.layers, self._w1)):
            cos, sin = rope[self.types[li]]
            q, k, v = self._run("qkv_post", self._linear(h, L["qkv"].get()), cos, sin, w1[1], w1[2], hq, hkv, d, eps)
            K, V = kv.keys[li], kv.values[li]
            K[rows, :, pos] = k.to(K.dtype)  # [R, N, Hkv, D] at advanced indices (slot, position)
            V[rows, :, pos] = v.to(V.dtype)
            att = self._attend(q, K, V, spans[self.types[li]], grp)  # [R, N, Hq * D]
            x, h = self._run("residual_norms", self._linear(att, L["o"]), x, w1[3], w1[4], eps)
            g = self._run("gated_gelu", self._linear(h, L["gu"].get()))
            w_next = self._w1[li + 1][0] if li + 1 < n_layers else self._final_w1
            x, h = self._run("residual_norms", self._linear(g, L["down"]), x, w1[5], w_next, eps)
            if li in taps:
                captured[li] = x
        return h, captured

    def _run(self, name: str, *args):
        """One of the step's elementwise parts, compiled where that was asked for and works;
        a compiled part that fails (no C++ compiler, an unsupported op) is logged once and
        the step goes on eager, never crashes."""
        try:
            return self._kernels[name](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager is always correct
            if not self.compiled:
                raise
            log.warning("compiled decoder step unavailable (%s: %s); running it eager", type(e).__name__, str(e)[:200])
            self._kernels = dict(_KERNELS)
            self.compiled = False
            return _KERNELS[name](*args)

    def _attend(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, spans: _Spans, grp: int) -> torch.Tensor:
        R, N, hq, d = q.shape
        hkv = K.shape[1]
        outs = []
        for r, (slot, lo, hi, mask) in enumerate(spans.rows):
            k, v = K[slot, :, lo:hi], V[slot, :, lo:hi]  # [Hkv, L, D]
            if mask is None:  # one query: its heads grouped onto their key/value head
                qr = q[r, 0].reshape(hkv, grp, d)
                w = torch.softmax(torch.bmm(qr, k.transpose(1, 2)) * self.scaling, dim=-1, dtype=torch.float32)
                o = torch.bmm(w.to(v.dtype), v)  # [Hkv, grp, D]
                outs.append(o.reshape(1, 1, hq * d))
            else:
                qr = q[r].transpose(0, 1)[None]  # [1, Hq, N, D]
                o = F.scaled_dot_product_attention(qr, k[None], v[None], attn_mask=mask, scale=self.scaling,
                                                   enable_gqa=grp > 1)
                outs.append(o.transpose(1, 2).reshape(1, N, hq * d))
        return torch.cat(outs)
