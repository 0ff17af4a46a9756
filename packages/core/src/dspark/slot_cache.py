"""A preallocated KV cache with one slot per request: the engine's batched target path.

Every decoder layer keeps keys and values in one tensor ``[slots, kv_heads, capacity,
head_dim]``; a request owns a slot and its keys sit at their absolute positions
(``[0, length)``), sliding-window layers included. A forward over ``[R, N]`` new tokens
writes each request's new keys in place at ``length_r .. length_r + N - 1``; nothing is
copied per step. Rollback is a length change: what lies past a request's length is never
attended to (attention is causal by absolute position), so rejected drafts and right
padding need no cleanup.

Attention runs per request (:func:`ragged_attention`, registered with transformers as
the ``"dspark_slots"`` attention for the duration of a forward) over a view of that
request's own keys: ``[0, hi_r)`` on full layers, the last ``window`` positions on sliding
ones (by absolute position: exactly the window HF's own sliding mask applies). A padded
batch would make every request read the longest request's keys: with one 1,163-token
prompt among eight short ones that is 5x the key/value bytes of the real contexts, and
attention was 14 % of a c = 8 decode step on the 2-core CPU before this change.

Compared with :func:`dspark.batch_verify.batched_forward` over HF ``DynamicCache`` s this
removes, per step, the gather of every request's keys into a padded batch, the write-back
and the ``torch.cat`` that grows each cache by a token (a full copy of the layer).
Capacity grows by doubling (one copy, amortised) and a freed slot is refilled by moving
the last slot into it (one copy per finished request).

Works for the targets :func:`dspark.batch_verify.supports` accepts (HF decoders that take
a per-layer-type mask mapping: Gemma 3, Qwen3, Llama, ...). For Gemma 3 the step runs
through :mod:`dspark.fast_decoder` (same weights and arithmetic, without HF's per-op
overhead) unless ``fast=False`` or ``target.fast_decoder = False`` (read when the cache is
made).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from dspark.batch_verify import layer_types
from dspark.target import Target


class SlotKVCache:
    """Per-layer ``[slots, H, capacity, D]`` key/value storage, one slot per request id.

    The decoder calls :meth:`update` once per layer inside a forward that
    :meth:`forward` set up; nothing else of HF's cache API is used on this path.
    """

    def __init__(self, target: Target, slots: int = 4, capacity: int = 256, fast: bool | None = None) -> None:
        """``fast``: run steps through :mod:`dspark.fast_decoder` (None: as
        ``target.fast_decoder`` says, which by default means where it supports the model)."""
        self.target = target
        self.fast = _fast_decoder(target, target.fast_decoder if fast is None else fast)
        self.types = layer_types(target)
        self.window = getattr(target.config, "sliding_window", None)
        self.keys: list[torch.Tensor | None] = [None] * target.num_layers
        self.values: list[torch.Tensor | None] = [None] * target.num_layers
        self._slots0, self._cap0 = max(1, slots), max(8, capacity)
        self.slot_of: dict[int, int] = {}  # request id -> slot
        self._rid_at: list[int] = []  # slot -> request id
        self.length: dict[int, int] = {}  # request id -> tokens stored
        self._step: dict[str, Any] | None = None  # the forward in progress

    # ------------------------------------------------------------------ slots
    @property
    def num_slots(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[0])

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])

    def add(self, rid: int) -> None:
        """Give request ``rid`` the next free slot (empty)."""
        if rid in self.slot_of:
            raise ValueError(f"request {rid} already holds slot {self.slot_of[rid]}")
        self.slot_of[rid] = len(self.slot_of)
        self._rid_at.append(rid)
        self.length[rid] = 0

    @torch.inference_mode()  # the storage is made in inference mode: move it in the same mode
    def release(self, rid: int) -> None:
        """Free ``rid``'s slot; the request in the last slot moves into it (slots stay 0..n-1)."""
        slot = self.slot_of.pop(rid, None)
        if slot is None:
            return
        del self.length[rid]
        last = len(self.slot_of)  # the highest slot still in use, before the move
        mover = self._rid_at.pop()
        if slot == last:
            return
        self._rid_at[slot] = mover
        n = self.length[mover]
        if self.keys[0] is not None and n:
            for store in (self.keys, self.values):
                for t in store:
                    t[slot, :, :n] = t[last, :, :n]
        self.slot_of[mover] = slot

    def rollback(self, rid: int, n: int) -> None:
        """Forget the last ``n`` tokens of request ``rid``."""
        if n < 0:
            raise ValueError(f"rollback count must be >= 0, got {n}")
        if n > self.length[rid]:
            raise ValueError(f"request {rid} holds {self.length[rid]} tokens; cannot roll back {n}")
        self.length[rid] -= n

    def _ensure(self, like: torch.Tensor, slots: int, need: int) -> None:
        """Storage for at least ``slots`` slots of ``need`` positions (grows by doubling)."""
        _, h, _, d = like.shape
        self._grow(h, d, like.dtype, like.device, slots, need)

    def _grow(self, h: int, d: int, dtype: torch.dtype, device: torch.device, slots: int, need: int) -> None:
        cur_s, cur_c = self.num_slots, self.capacity
        if cur_s >= slots and cur_c >= need:
            return
        new_s = max(slots, self._slots0, 2 * cur_s if cur_s < slots else cur_s)
        new_c = max(need, self._cap0, 2 * cur_c if cur_c < need else cur_c)
        for store in (self.keys, self.values):
            for li, old in enumerate(store):
                fresh = torch.zeros((new_s, h, new_c, d), dtype=dtype, device=device)
                if old is not None:
                    fresh[:cur_s, :, :cur_c] = old
                store[li] = fresh

    def grow(self, h: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        """Inside :meth:`forward`: make room for the step in progress (all layers at once)."""
        st = self._step
        if st is None:
            raise RuntimeError("SlotKVCache.grow called outside SlotKVCache.forward")
        self._grow(h, d, dtype, device, st["slots_needed"], st["need"])

    # ------------------------------------------------------------------ the decoder's hook
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: Any = None, **_: Any):
        st = self._step
        if st is None:
            raise RuntimeError("SlotKVCache.update called outside SlotKVCache.forward")
        # (first forward: storage shaped like these keys; later: grown when this forward needs it)
        self._ensure(key_states, st["slots_needed"], st["need"])
        K, V = self.keys[layer_idx], self.values[layer_idx]
        rows, wpos = st["rows"], st["wpos"]  # [R, 1], [R, N]
        K[rows, :, wpos] = key_states.permute(0, 2, 1, 3).to(K.dtype)  # advanced indices first: [R, N, H, D]
        V[rows, :, wpos] = value_states.permute(0, 2, 1, 3).to(V.dtype)
        return K, V  # the whole store: ragged_attention reads each request's own span

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self, rids: Sequence[int], tokens: Sequence[Sequence[int]], taps: Sequence[int] = (), logits: str = "all"
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Feed ``tokens[i]`` after what request ``rids[i]`` holds, all requests in one
        target forward. Each request's length grows by its own token count (roll back
        rejected ones with :meth:`rollback`). Returns logits ``[R, N, V]`` (rows past
        ``len(tokens[i])`` are padding; ``logits="last"``: each row's last real token,
        ``[R, 1, V]``; ``"hidden"`` / ``"last_hidden"``: the final normed hidden states
        instead, ``[R, N, d]`` / ``[R, 1, d]``) and the tapped layer outputs
        ``{layer: [R, N, d]}``."""
        if logits not in ("all", "last", "hidden", "last_hidden"):
            raise ValueError(f"logits must be all, last, hidden or last_hidden, got {logits!r}")
        R = len(rids)
        lens = [len(t) for t in tokens]
        if R == 0 or len(tokens) != R or min(lens) == 0:
            raise ValueError("every request needs at least one token")
        target = self.target
        dev = target.device
        N = max(lens)
        past = torch.tensor([self.length[r] for r in rids], dtype=torch.long)
        slots = torch.tensor([self.slot_of[r] for r in rids], dtype=torch.long)
        ids = torch.empty((R, N), dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
            ids[i, len(t) :] = t[-1]
        q_pos = past[:, None] + torch.arange(N)[None, :]  # [R, N] absolute positions
        hi = int(past.max()) + N
        spans = {ty: _Spans(slots.tolist(), past.tolist(), N, self.window if ty == "sliding_attention" else None, dev)
                 for ty in set(self.types)}
        self._step = {"rows": slots[:, None].to(dev), "wpos": q_pos.to(dev), "need": hi, "slots_needed": int(slots.max()) + 1}
        cfg = target.config
        impl = cfg._attn_implementation
        if impl not in _BASE:
            raise ValueError(f"SlotKVCache needs the eager or sdpa attention, the target uses {impl!r}")
        if self.fast is not None:
            nl = target.num_layers
            bad = [raw for raw in taps if not -nl <= raw < nl]
            if bad:
                self._step = None
                raise ValueError(f"tap layer {bad[0]} out of range for {nl} layers")
            try:
                tap_at = {raw % nl: raw for raw in taps}
                hidden, got = self.fast.forward(self, ids.to(dev), q_pos.to(dev), spans, self._step["rows"], tap_at)
            finally:
                self._step = None
            out = _Out(target.lm_head(hidden) if logits == "all" else None, got, hidden)
        else:
            out = self._hf_forward(ids, q_pos, spans, taps, logits)
        for r, n in zip(rids, lens):
            self.length[r] += n
        if logits in ("last", "last_hidden"):
            last = torch.tensor(lens, dtype=torch.long) - 1
            h = out.final_hidden[torch.arange(R), last][:, None]
            return (target.lm_head(h) if logits == "last" else h), out.taps
        return (out.logits if logits == "all" else out.final_hidden), out.taps

    def _hf_forward(self, ids: torch.Tensor, q_pos: torch.Tensor, spans: dict[str, _Spans], taps: Sequence[int],
                    logits: str) -> Any:
        target, cfg, dev = self.target, self.target.config, self.target.device
        impl = cfg._attn_implementation
        _register()
        try:
            mode = "all" if logits == "all" else "none"
            cfg._attn_implementation = "dspark_slots"
            out = target.forward(ids.to(dev), self, logits=mode, taps=taps, final_hidden=logits != "all",
                                 model_kwargs={"attention_mask": spans, "position_ids": q_pos.to(dev)})
        finally:
            cfg._attn_implementation = impl
            self._step = None
        return out


class _Out(NamedTuple):
    logits: torch.Tensor | None
    taps: dict[int, torch.Tensor]
    final_hidden: torch.Tensor


def _fast_decoder(target: Target, want: bool | None) -> Any:
    """The lean decoder step for ``target`` (:mod:`dspark.fast_decoder`) or None.
    ``want``: None uses it where supported, True requires it, False never."""
    if want is False:
        return None
    from dspark import fast_decoder

    why = fast_decoder.supports(target)
    if why is None:  # one per target: its fused weights (and their packed copies) are built once
        step = getattr(target, "_fast_step", None)
        if step is None:
            step = target._fast_step = fast_decoder.FastGemma3(target)
        return step
    if want:
        raise ValueError(f"fast decoder requested but not available: {why}")
    return None


_BASE = ("eager", "sdpa")


class _Spans:
    """What :func:`ragged_attention` needs for one layer type: per request its slot and the
    key positions ``[lo, hi)`` it attends to, and for multi-token rows the causal (and
    window) mask over that span. Passed through the decoder as the layer's attention mask."""

    def __init__(self, slots: list[int], past: list[int], n: int, window: int | None, device: torch.device) -> None:
        self.rows = []
        for slot, p in zip(slots, past):
            lo = max(0, p - window + 1) if window else 0
            hi = p + n
            mask = None
            if n > 1:  # query j sits at p + j: keys up to it, and (sliding) within the window
                kpos = torch.arange(lo, hi)[None, :]
                qpos = torch.arange(p, hi)[:, None]
                ok = kpos <= qpos
                if window:
                    ok &= kpos > qpos - window
                mask = ok[None, None].to(device)
            self.rows.append((slot, lo, hi, mask))


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: _Spans, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any):
    """Attention of a :class:`SlotKVCache` forward, one request at a time over its own keys.

    ``query`` [R, Hq, N, D]; ``key`` / ``value`` the whole ``[slots, Hkv, capacity, D]``
    store; ``attention_mask`` a :class:`_Spans`. Returns ``[R, N, Hq, D]`` like HF's
    attention functions. A single-token row needs no mask (every key in its span is
    visible), so its query heads are folded onto the key/value heads and the row is one
    small product; longer rows use SDPA with the row's own mask."""
    if kwargs.get("softcap") is not None:
        raise ValueError("the slot cache's attention does not implement attention logit soft-capping")
    R, Hq, N, D = query.shape
    Hkv = key.shape[1]
    grp = Hq // Hkv
    outs = []
    for r, (slot, lo, hi, mask) in enumerate(attention_mask.rows):
        k, v = key[slot : slot + 1, :, lo:hi], value[slot : slot + 1, :, lo:hi]
        q = query[r : r + 1]
        if mask is None:  # N == 1: [1, Hq, 1, D] -> [1, Hkv, grp, D]
            o = torch.nn.functional.scaled_dot_product_attention(q.reshape(1, Hkv, grp, D), k, v, scale=scaling)
            outs.append(o.reshape(1, Hq, 1, D))
        else:
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                                         enable_gqa=grp > 1))
    return torch.cat(outs).transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register("dspark_slots", ragged_attention)
        _registered = True
