"""DFlash-style parallel backbone: one forward drafts a whole block of g tokens.

- Context features: raw outputs of m target layers, concatenated per token and projected,
  H_ctx = RMSNorm(W_c [h(l1); ...; h(lm)]).
- Block: the anchor's embedding, then g-1 mask-token embeddings; slot j predicts the
  token at anchor_pos + j + 1.
- KV injection: every draft layer attends from the block's queries to
  [W_k H_ctx ; W_k H_block] (each layer projects the shared H_ctx with its own K/V
  weights; the context is not propagated through layers).
- Mask: a block sees context positions strictly before its anchor and every slot of its
  own block (bidirectional). Positions are absolute (the target's).
- Draft layers are the target family's own decoder layers (Gemma 3, Qwen3, Llama, ...):
  their projections, q/k norms, MLP and norms are reused; only the attention wiring
  (queries from the block, keys/values from context + block) is ours.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence


def family_layer_class(config) -> type[nn.Module]:
    """The decoder-layer class of a HF causal-LM family (``Gemma3DecoderLayer``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"no causal-LM family known for model_type {config.model_type!r}")
    module = importlib.import_module(f"transformers.models.{_module_dir(config.model_type)}.modeling_{_module_dir(config.model_type)}")
    cls = getattr(module, name.replace("ForCausalLM", "DecoderLayer"), None)
    if cls is None:
        raise ValueError(f"{module.__name__} has no decoder layer class for {name}")
    return cls


def _module_dir(model_type: str) -> str:
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


def rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp:
        rp = rp["full_attention"]
    return float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def draft_layer_config(target_config, num_layers: int):
    """The target's config, cut to ``num_layers`` full-attention layers."""
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = num_layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = ["full_attention"] * num_layers
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = None
    cfg._attn_implementation = "sdpa"
    return cfg


def init_linears(module: nn.Module, std: float = 0.02) -> None:
    """Fresh draft weights: every Linear ~ N(0, std), zero biases (norms keep their
    family's identity init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Rotary(nn.Module):
    """Standard rotary embedding at absolute positions (rotate-half convention)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, H, L, hd], pos [B, L] -> rotated x."""
        ang = pos[:, None, :, None].float() * self.inv_freq  # [B, 1, L, hd/2]
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class LayerKV:
    """Projected context keys/values of one draft layer: [B, Hkv, T, hd] each."""

    k: torch.Tensor
    v: torch.Tensor


class InjectedLayer(nn.Module):
    """A family decoder layer whose attention reads context K/V injected from outside."""

    def __init__(self, layer: nn.Module, rotary: Rotary) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        a = layer.self_attn
        self.head_dim = a.head_dim
        self.n_heads = a.q_proj.out_features // a.head_dim
        self.n_kv = a.k_proj.out_features // a.head_dim
        # Gemma-style "sandwich" norms around attention and MLP, else Llama/Qwen style
        self.sandwich = hasattr(layer, "pre_feedforward_layernorm")

    def _heads(self, x: torch.Tensor, proj: nn.Linear, norm: nn.Module | None, n: int) -> torch.Tensor:
        B, L, _ = x.shape
        h = proj(x).view(B, L, n, self.head_dim)
        if norm is not None:
            h = norm(h)
        return h.transpose(1, 2)  # [B, n, L, hd]

    def context_kv(self, h_ctx: torch.Tensor, pos: torch.Tensor) -> LayerKV:
        """h_ctx [B, T, d] projected context, pos [B, T] -> this layer's K/V of the context."""
        a = self.layer.self_attn
        k = self.rotary(self._heads(h_ctx, a.k_proj, getattr(a, "k_norm", None), self.n_kv), pos)
        v = self._heads(h_ctx, a.v_proj, None, self.n_kv)
        return LayerKV(k, v)

    def attend(
        self, res: torch.Tensor, qkv_in: torch.Tensor, pos: torch.Tensor, past: LayerKV | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, LayerKV]:
        """Attention of the new positions over [past ; new] keys, then the MLP.

        res [B, L, d] residual stream; qkv_in [B, L, d_in] what q/k/v project (the normed
        block for DFlash, [embedding ; feature] for Eagle3); pos [B, L] absolute
        positions; past K/V [B, Hkv, T, hd] or None; mask [B, L, T+L] bool or None.
        Returns the layer output [B, L, d] and the new positions' K/V.
        """
        lay, a = self.layer, self.layer.self_attn
        q = self.rotary(self._heads(qkv_in, a.q_proj, getattr(a, "q_norm", None), self.n_heads), pos)
        k = self.rotary(self._heads(qkv_in, a.k_proj, getattr(a, "k_norm", None), self.n_kv), pos)
        v = self._heads(qkv_in, a.v_proj, None, self.n_kv)
        new = LayerKV(k, v)
        if past is not None:
            k = torch.cat([past.k.to(k.dtype), k], dim=2)
            v = torch.cat([past.v.to(v.dtype), v], dim=2)
        # grouped-query heads read their shared K/V in place: copying the context's K/V per
        # query head made a layer's attention ~1.5x slower at context 512 (2-core CPU)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None], scale=a.scaling,
                                             enable_gqa=self.n_heads != self.n_kv)
        h = a.o_proj(att.transpose(1, 2).reshape(res.shape[0], res.shape[1], -1))
        if self.sandwich:
            h = res + lay.post_attention_layernorm(h)
            return h + lay.post_feedforward_layernorm(lay.mlp(lay.pre_feedforward_layernorm(h))), new
        h = res + h
        return h + lay.mlp(lay.post_attention_layernorm(h)), new

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ctx: LayerKV, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, d] block hidden, pos [B, L], injected context K/V [B, Hkv, T, hd],
        mask [B, L, T+L] bool (True = may attend) or None (all visible)."""
        return self.attend(x, self.layer.input_layernorm(x), pos, ctx, mask)[0]


def pad_kv(kvs: list[LayerKV]) -> tuple[LayerKV, torch.Tensor]:
    """Right-pad per-request K/V ([1, Hkv, T_i, hd] each) into one batch.
    Returns the batched K/V [B, Hkv, T_max, hd] and valid [B, T_max] bool."""
    lengths = torch.tensor([kv.k.shape[2] for kv in kvs], device=kvs[0].k.device)
    # [Hkv, T, hd] -> [T, Hkv, hd] so pad_sequence pads the time axis
    k = pad_sequence([kv.k[0].transpose(0, 1) for kv in kvs], batch_first=True).transpose(1, 2)
    v = pad_sequence([kv.v[0].transpose(0, 1) for kv in kvs], batch_first=True).transpose(1, 2)
    valid = torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None]
    return LayerKV(k, v), valid


class ParallelBackbone(nn.Module):
    """Context projector + injected draft layers + final norm."""

    def __init__(self, target_config, num_layers: int, num_features: int) -> None:
        super().__init__()
        cfg = draft_layer_config(target_config, num_layers)
        layer_cls = family_layer_class(cfg)
        d = cfg.hidden_size
        layers = [layer_cls(cfg, i) for i in range(num_layers)]
        norm_cls = type(layers[0].input_layernorm)
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.hidden_size = d
        self.fc = nn.Linear(num_features * d, d, bias=False)
        self.ctx_norm = norm_cls(d, eps=eps)
        rotary = Rotary(layers[0].self_attn.head_dim, rope_theta(cfg))
        self.layers = nn.ModuleList([InjectedLayer(lay, rotary) for lay in layers])
        self.norm = norm_cls(d, eps=eps)  # the family's fresh norm is the identity
        init_linears(self)

    @torch.no_grad()
    def init_from_target(self, target_layers: nn.ModuleList, final_norm: nn.Module, feature_layers: list[int]) -> list[int]:
        """Warm start from the target's own last decoder layers.

        Draft layer i takes the weights of target layer L - n + i (n draft layers of an
        L-layer target); the context projection starts as the identity on the deepest
        tapped layer's features (zeros on the others) and ``ctx_norm`` as the first copied
        layer's input norm that reads it (the layer after the deepest tapped one, if it is
        copied, else the first copied layer). That copied layer's injected keys/values then
        equal the ones it computes inside the target whenever it is a full-attention layer
        (the drafter's rotary uses the full-attention theta); the others start close to
        theirs. The final norm is the target's. Returns the copied target layer indices.
        """
        n, total = len(self.layers), len(target_layers)
        if n > total:
            raise ValueError(f"cannot warm-start {n} draft layers from a {total}-layer target")
        src = list(range(total - n, total))
        for lay, i in zip(self.layers, src):
            lay.layer.load_state_dict(target_layers[i].state_dict())
        d = self.hidden_size
        deepest = max(range(len(feature_layers)), key=lambda j: feature_layers[j])
        self.fc.weight.zero_()
        self.fc.weight[:, deepest * d:(deepest + 1) * d] = torch.eye(d, dtype=self.fc.weight.dtype)
        reader = feature_layers[deepest] + 1
        self.ctx_norm.load_state_dict(target_layers[reader if reader in src else src[0]].input_layernorm.state_dict())
        self.norm.load_state_dict(final_norm.state_dict())
        return src

    def project_context(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., T, m*d] concatenated target-layer features -> [..., T, d]."""
        return self.ctx_norm(self.fc(feats.to(self.fc.weight.dtype)))

    def context_kv(self, feats: torch.Tensor, pos: torch.Tensor) -> list[LayerKV]:
        """Per-layer context K/V from raw features [B, T, m*d] at positions [B, T]."""
        h = self.project_context(feats)
        return [lay.context_kv(h, pos) for lay in self.layers]

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, ctx: list[LayerKV], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, d] block embeddings -> [B, L, d] normed hidden states."""
        h = x.to(self.fc.weight.dtype)
        for lay, kv in zip(self.layers, ctx):
            h = lay(h, pos, kv, mask)
        return self.norm(h)


def block_mask(ctx_pos: torch.Tensor, ctx_valid: torch.Tensor, anchors: torch.Tensor, gamma: int) -> torch.Tensor:
    """Attention mask for nb blocks of g slots against T context positions.

    ctx_pos [B, T] absolute positions; ctx_valid [B, T] bool (False = padding);
    anchors [B, nb] anchor positions -> [B, nb*g, T + nb*g] bool.
    Block b sees context positions < anchors[b] and the slots of block b only.
    """
    B, nb = anchors.shape
    q_anchor = anchors.repeat_interleave(gamma, dim=1)  # [B, nb*g]
    see_ctx = (ctx_pos[:, None, :] < q_anchor[:, :, None]) & ctx_valid[:, None, :]
    blk = torch.arange(nb, device=anchors.device).repeat_interleave(gamma)
    see_blk = (blk[:, None] == blk[None, :]).expand(B, -1, -1)
    return torch.cat([see_ctx, see_blk], dim=2)
