"""Few-row fp32 products on a CPU through oneDNN with prepacked weights.

A verify forward multiplies 2-64 rows (drafts + 1 per request, or a small decode batch)
by every weight matrix of the model. For that shape PyTorch's CPU ``F.linear`` calls
MKL's SGEMM, which on a 2-core AMD EPYC (AVX2) runs a few-row product 1.5-3.5x slower
than oneDNN's JIT kernel on a weight reordered once into oneDNN's blocked layout
(measured per matrix shape and on the whole Gemma 3 270M forward: docs/benchmarks.md).
In a model's layers (:func:`install`) one row stays on ``F.linear`` (a matrix-vector
product bound by memory bandwidth, where MKL was as fast or faster) and so do large row
counts (prefill, training); ``Target.lm_head`` calls :func:`packed` directly for any row
count outside autograd.

Same values as ``F.linear`` up to fp32 summation order (~1e-6 relative): exact in the
sense the rest of the project uses (the target's distribution is the fp32 model's; the
library GEMM, the blockwise LM head and this kernel differ only in the last bits).

The reordered copy is built on first use and rebuilt if the weight changes in place
(an optimizer step bumps the tensor's version counter), so a module being trained never
reads a stale copy. It costs one extra copy of each weight it packs.
"""

from __future__ import annotations

import functools
import logging
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)

_ROW_HINT = 8  # oneDNN picks its blocking for this many rows; any row count works


def available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class PackedWeight:
    """The oneDNN-reordered copy of one fp32 CPU weight, rebuilt when the weight changes."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._key: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if key != self._key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROW_HINT)
            self._key = key
        assert self._packed is not None
        return self._packed

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for [..., d] fp32 ``x`` (no autograd)."""
        rows = x.numel() // x.shape[-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), self.get(),
                                               bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row, gradient-free fp32 CPU products go through
    :class:`PackedWeight`. Installed by class swap (:func:`install`), so the module's
    parameters, state dict and hooks are untouched; everything else is ``F.linear``."""

    _dspark_rows: tuple[int, int] = (2, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" \
                and w.device.type == "cpu" and x.shape[-1] == w.shape[1] and x.numel() \
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            rows = x.numel() // x.shape[-1]
            lo, hi = self._dspark_rows
            if lo <= rows <= hi:
                return _packed_for(w).linear(x, self.bias)
        return F.linear(x, w, self.bias)


_PACKED = WeakIdKeyDictionary()  # weight tensor -> PackedWeight, dropped with the weight


def _packed_for(weight: torch.Tensor) -> PackedWeight:
    p = _PACKED.get(weight)
    if p is None:
        p = _PACKED[weight] = PackedWeight(weight)
    return p


def packed(weight: torch.Tensor) -> PackedWeight:
    """The (cached) :class:`PackedWeight` of a CPU fp32 weight."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"packed weights are for [out, in] fp32 CPU tensors, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    return _packed_for(weight)


def self_check(seed: int = 0) -> str | None:
    """Probe the kernel against ``F.linear`` on a random product; returns what failed, or None."""
    if not available():
        return "this torch build has no oneDNN prepacked linear"
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g)
    x = torch.randn(5, 80, generator=g)
    try:
        y = PackedWeight(w).linear(x, b)
    except RuntimeError as e:  # an op that exists but cannot run on this CPU
        return f"oneDNN linear failed: {e}"
    ref = F.linear(x.double(), w.double(), b.double())
    err = float((y.double() - ref).abs().max())
    bound = 80 * 2.0**-23 * float((x.double().abs() @ w.double().abs().T).max() + b.abs().max())
    return None if err <= bound else f"oneDNN linear is off by {err:.3g} (allowed {bound:.3g})"


@functools.lru_cache(maxsize=1)
def usable() -> bool:
    """:func:`self_check` once per process; logs why not."""
    problem = self_check()
    if problem:
        log.warning("few-row linears stay on the library GEMM: %s", problem)
    return problem is None


def install(module: nn.Module, rows: tuple[int, int] = (2, 64), min_weights: int = 1 << 16) -> int:
    """Route the few-row products of every ``nn.Linear`` in ``module`` with at least
    ``min_weights`` weights through oneDNN (rows ``rows[0]..rows[1]``, inclusive).
    Returns how many layers were switched (0 where oneDNN is unavailable or fails its probe)."""
    if not 1 <= rows[0] <= rows[1]:
        raise ValueError(f"rows must be 1 <= lo <= hi, got {rows}")
    if not usable():
        return 0
    n = 0
    for m in module.modules():
        if type(m) in (nn.Linear, PackedLinear) and m.weight.numel() >= min_weights:
            m.__class__ = PackedLinear
            m._dspark_rows = (int(rows[0]), int(rows[1]))
            n += 1
    return n


def uninstall(module: nn.Module) -> int:
    """Undo :func:`install`; returns how many layers went back to ``nn.Linear``."""
    n = 0
    for m in module.modules():
        if type(m) is PackedLinear:
            m.__class__ = nn.Linear
            m.__dict__.pop("_dspark_rows", None)
            _PACKED.pop(m.weight, None)
            n += 1
    return n
