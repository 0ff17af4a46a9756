"""Hot-path kernels with one dispatch: Triton on CUDA tensors, the torch reference
elsewhere, except the Markov / RNN head samplers, whose one-program-per-row loop measured
10-40x slower than the torch loop on an H100 and so runs only when forced. One switch forces either: ``DSPARK_KERNELS=auto|triton|torch`` in the
environment, or :func:`set_backend` / :func:`backend_override` in code.

Every function checks shapes and dtypes and raises a ValueError that names the argument.
The verifier, the DSpark drafter and the training losses call these functions, so the
kernels and the references cannot drift apart unnoticed: the tests run both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from dspark.kernels import reference

Backend = Literal["auto", "triton", "torch"]
_backend: Backend = "auto"


def set_backend(name: Backend) -> None:
    global _backend
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel backend must be auto, triton or torch, got {name!r}")
    _backend = name


def get_backend() -> Backend:
    env = os.environ.get("DSPARK_KERNELS", "auto")
    if env not in ("auto", "triton", "torch"):
        raise ValueError(f"DSPARK_KERNELS must be auto, triton or torch, got {env!r}")
    return _backend if _backend != "auto" else env  # type: ignore[return-value]


@contextmanager
def backend_override(name: Backend) -> Iterator[None]:
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(t: torch.Tensor, auto: bool = True) -> bool:
    """``auto``: whether the automatic choice takes Triton on CUDA for this kernel (it does
    not where the kernel measured slower than torch on an H100; docs/benchmarks.md)."""
    b = get_backend()
    if b == "torch":
        return False
    if b == "triton":
        if not (t.is_cuda or _interpreting()):
            raise RuntimeError("DSPARK_KERNELS=triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        return True
    return auto and t.is_cuda


def _triton():
    from dspark.kernels import triton_kernels

    return triton_kernels


def _check(name: str, t: torch.Tensor | None, shape: tuple, dtypes: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


F32 = (torch.float32,)
LONG = (torch.int64,)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def rejection_greedy(target_argmax: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept while draft == target argmax. Shapes as in reference."""
    B, K = draft_tokens.shape
    _check("target_argmax", target_argmax, (B, K + 1), LONG)
    _check("draft_tokens", draft_tokens, (B, K), LONG)
    _check("draft_lens", draft_lens, (B,), LONG)
    impl = _triton() if _use_triton(target_argmax) else reference
    return impl.rejection_greedy(target_argmax, draft_tokens, draft_lens)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of a ragged batch (see reference.rejection_sample)."""
    B, K = draft_tokens.shape
    V = target_probs.shape[-1]
    _check("target_probs", target_probs, (B, K + 1, V), F32)
    _check("draft_tokens", draft_tokens, (B, K), LONG)
    _check("draft_lens", draft_lens, (B,), LONG)
    _check("draft_probs", draft_probs, (B, K, V), F32)
    _check("uniforms", uniforms, (B, K), F32)
    race = noise.dim() == 2  # [B, V] Exp(1); else [B] fp64 uniforms for the inverse CDF
    _check("noise", noise, (B, V) if race else (B,), F32 if race else (torch.float64,))
    impl = _triton() if race and _use_triton(target_probs) else reference
    return impl.rejection_sample(target_probs, draft_tokens, draft_lens, draft_probs, uniforms, noise)


def _check_head(base, w1, w2, prev0, temperature: float, noise) -> None:
    """Arguments every sequential-head sampler shares."""
    B, G, Kv = base.shape
    R = w1.shape[-1]
    _check("base", base, (B, G, Kv), F32)
    _check("w1", w1, (Kv + 1, R), FLOATS)
    _check("w2", w2, (Kv, R), FLOATS)
    _check("prev0", prev0, (B,), LONG)
    _check("noise", noise, (B, G, Kv), F32)
    if (temperature == 0) != (noise is None):
        raise ValueError("noise must be given exactly when temperature > 0")


def markov_sample(
    base: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, prev0: torch.Tensor, temperature: float, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSpark Markov-head sampling loop (see reference.markov_sample)."""
    _check_head(base, w1, w2, prev0, temperature, noise)
    impl = _triton() if _use_triton(base, auto=False) else reference
    return impl.markov_sample(base, w1, w2, prev0, temperature, noise)


def rnn_sample(
    base: torch.Tensor,
    hidden: torch.Tensor,
    w1: torch.Tensor,
    cell_w: torch.Tensor,
    cell_b: torch.Tensor,
    w2: torch.Tensor,
    prev0: torch.Tensor,
    temperature: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSpark RNN-head sampling loop (see reference.rnn_sample)."""
    _check_head(base, w1, w2, prev0, temperature, noise)
    B, G, _ = base.shape
    R, D = w1.shape[-1], hidden.shape[-1]
    _check("hidden", hidden, (B, G, D), FLOATS)
    _check("cell_w", cell_w, (3 * R, 2 * R + D), FLOATS)
    _check("cell_b", cell_b, (3 * R,), FLOATS)
    impl = _triton() if _use_triton(base, auto=False) else reference
    return impl.rnn_sample(base, hidden, w1, cell_w, cell_b, w2, prev0, temperature, noise)


def distill_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CE, ||p_d - p_t||_1 and the acceptance label (see reference.distill_loss)."""
    N, V = draft_logits.shape
    _check("draft_logits", draft_logits, (N, V), FLOATS)
    _check("target_logits", target_logits, (N, V), FLOATS)
    _check("labels", labels, (N,), LONG)
    impl = _triton() if _use_triton(draft_logits) else reference
    return impl.distill_loss(draft_logits, target_logits, labels)


__all__ = [
    "set_backend",
    "get_backend",
    "backend_override",
    "rejection_greedy",
    "rejection_sample",
    "markov_sample",
    "rnn_sample",
    "distill_loss",
]
