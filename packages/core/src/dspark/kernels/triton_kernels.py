"""Triton kernels for the hot paths. Same signatures and semantics as kernels/reference.py.

Import this module only through the dispatch in ``dspark.kernels``: it needs CUDA tensors,
or ``TRITON_INTERPRET=1`` set before the import (CPU tests; fp32 only there).
One program handles one row (request or token); the vocabulary is walked in blocks, so
no [rows x V] fp32 temporaries are created beyond the outputs themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.kernels.reference import RESIDUAL_EPS

BLOCK_V = 1024


def _pow2(n: int, least: int = 2) -> int:
    return max(triton.next_power_of_2(max(n, 1)), least)


# ---------------------------------------------------------------------------- rejection


@triton.jit
def _rejection_greedy_kernel(AMAX, D, L, OUT, NACC, K, KP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    km = ks < K
    n = tl.load(L + b)
    x = tl.load(D + b * K + ks, mask=km, other=-1)
    best = tl.load(AMAX + b * (K + 1) + ks, mask=km, other=-2)
    ok = (x == best) & (ks < n)
    a = tl.sum(tl.cumprod(ok.to(tl.int32), axis=0), axis=0)
    last = tl.load(AMAX + b * (K + 1) + a)
    tl.store(OUT + b * (K + 1) + ks, tl.where(ks < a, x, -1), mask=km)
    tl.store(OUT + b * (K + 1) + K, -1)
    tl.store(OUT + b * (K + 1) + a, last)
    tl.store(NACC + b, a)


@triton.jit
def _slot_pq(prow, Q, rows, a, vs, vm, rej, xa, K, V, HAS_Q: tl.constexpr):
    """Target and draft probabilities of a vocabulary block at each row's slot a
    (q = 0 where the slot is the bonus; one-hot of the draft token without Q)."""
    p = tl.load(prow[:, None] + a[:, None] * V + vs[None, :], mask=vm, other=0.0)
    if HAS_Q:
        q = tl.load(Q + rows[:, None] * K * V + a[:, None] * V + vs[None, :], mask=vm & rej[:, None], other=0.0)
    else:
        q = tl.where((vs[None, :] == xa[:, None]) & rej[:, None], 1.0, 0.0)
    return p, q


@triton.jit
def _rejection_sample_kernel(
    P, D, L, Q, U, NOISE, OUT, NACC, B, K, V,
    HAS_Q: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, ROWS: tl.constexpr, EPS: tl.constexpr,
):
    # ROWS requests per program: 1 for a large vocabulary, many for a small one
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rm = rows < B
    ks = tl.arange(0, KP)
    km = rm[:, None] & (ks[None, :] < K)
    n = tl.load(L + rows, mask=rm, other=0)
    # padded slots (past a row's length) may hold -1: clamp like the reference, so no
    # pointer below a row's probabilities is ever formed (their values are never used)
    x = tl.maximum(tl.load(D + rows[:, None] * K + ks[None, :], mask=km, other=0), 0)  # [ROWS, KP]
    prow = P + rows * (K + 1) * V  # [ROWS] row base pointers
    px = tl.load(prow[:, None] + ks[None, :] * V + x, mask=km, other=0.0)
    if HAS_Q:
        qx = tl.load(Q + rows[:, None] * K * V + ks[None, :] * V + x, mask=km, other=1.0)
    else:
        qx = tl.full([ROWS, KP], 1.0, tl.float32)
    u = tl.load(U + rows[:, None] * K + ks[None, :], mask=km, other=1.0)
    ok = (u * qx < px) & (ks[None, :] < n[:, None]) & km
    a = tl.sum(tl.cumprod(ok.to(tl.int32), axis=1), axis=1)  # [ROWS] accepted drafts
    rej = a < n
    xa = tl.sum(tl.where(ks[None, :] == a[:, None], x, 0), axis=1)
    # pass 1: mass of the residual max(p - q, 0) at slot a (q = 0 at the bonus slot)
    mass = tl.zeros([ROWS], tl.float32)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        vm = rm[:, None] & (vs[None, :] < V)
        p, q = _slot_pq(prow, Q, rows, a, vs, vm, rej, xa, K, V, HAS_Q)
        mass += tl.sum(tl.maximum(p - q, 0.0), axis=1)
    use_p = mass <= EPS
    # pass 2: exponential race over the residual (or p when the residual is ~0)
    best = tl.full([ROWS], -1.0, tl.float32)
    best_i = tl.zeros([ROWS], tl.int32)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        vm = rm[:, None] & (vs[None, :] < V)
        p, q = _slot_pq(prow, Q, rows, a, vs, vm, rej, xa, K, V, HAS_Q)
        w = tl.where(use_p[:, None], p, tl.maximum(p - q, 0.0))
        e = tl.load(NOISE + rows[:, None] * V + vs[None, :], mask=vm, other=1.0)
        score = tl.where(vm, w / e, -1.0)
        m = tl.max(score, axis=1)
        i = tl.argmax(score, axis=1).to(tl.int32) + v0
        best_i = tl.where(m > best, i, best_i)
        best = tl.maximum(m, best)
    out = OUT + rows * (K + 1)
    tl.store(out[:, None] + ks[None, :], tl.where(ks[None, :] < a[:, None], x, -1), mask=km)
    tl.store(out + K, tl.full([ROWS], -1, tl.int64), mask=rm)
    tl.store(out + a, best_i.to(tl.int64), mask=rm)
    tl.store(NACC + rows, a.to(tl.int64), mask=rm)


def rejection_greedy(target_argmax, draft_tokens, draft_lens):
    B, K = draft_tokens.shape
    out = torch.empty((B, K + 1), dtype=torch.long, device=draft_tokens.device)
    n_acc = torch.empty(B, dtype=torch.long, device=draft_tokens.device)
    _rejection_greedy_kernel[(B,)](target_argmax.contiguous(), draft_tokens.contiguous(), draft_lens.contiguous(), out, n_acc, K, KP=_pow2(K))
    return out, n_acc


def rejection_sample(target_probs, draft_tokens, draft_lens, draft_probs, uniforms, noise):
    B, K = draft_tokens.shape
    V = target_probs.shape[-1]
    out = torch.empty((B, K + 1), dtype=torch.long, device=draft_tokens.device)
    n_acc = torch.empty(B, dtype=torch.long, device=draft_tokens.device)
    q = draft_probs.contiguous() if draft_probs is not None else target_probs  # dummy pointer when absent
    bv = min(BLOCK_V, _pow2(V, 16))
    rows = max(1, min(128, 2048 // bv))  # small vocabularies: many requests per program
    _rejection_sample_kernel[(triton.cdiv(B, rows),)](
        target_probs.contiguous(), draft_tokens.contiguous(), draft_lens.contiguous(), q, uniforms.contiguous(),
        noise.contiguous(), out, n_acc, B, K, V,
        HAS_Q=draft_probs is not None, KP=_pow2(K), BV=bv, ROWS=rows, EPS=RESIDUAL_EPS,
    )
    return out, n_acc


# ---------------------------------------------------------------------------- sequential heads


@triton.jit
def _vocab_step(BASE_ROW, PROB_ROW, NOISE_ROW, W2, bias_in, rs, rm, Kv, R, t, GREEDY: tl.constexpr, BV: tl.constexpr):
    """One slot: logits = base + W2 @ bias_in over the vocabulary, softmax at temperature t,
    exponential-race sample (or argmax). Writes the fp32 probabilities, returns the token."""
    m = float("-inf")
    s = 0.0
    best = float("-inf")
    best_i = 0
    for v0 in range(0, Kv, BV):
        vs = v0 + tl.arange(0, BV)
        vm = vs < Kv
        w2 = tl.load(W2 + vs[:, None] * R + rs[None, :], mask=vm[:, None] & rm[None, :], other=0.0)
        lg = tl.load(BASE_ROW + vs, mask=vm, other=float("-inf")) + tl.sum(w2 * bias_in[None, :], axis=1)
        lg = tl.where(vm, lg, float("-inf"))
        if GREEDY:
            cm = tl.max(lg, axis=0)
            ci = tl.argmax(lg, axis=0) + v0
            best_i = tl.where(cm > best, ci, best_i)
            best = tl.maximum(cm, best)
        else:
            lg = lg / t
            tl.store(PROB_ROW + vs, lg, mask=vm)  # logits parked in the output row
            m_new = tl.maximum(m, tl.max(lg, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(lg - m_new), axis=0)
            m = m_new
    tl.debug_barrier()
    if GREEDY:
        for v0 in range(0, Kv, BV):
            vs = v0 + tl.arange(0, BV)
            tl.store(PROB_ROW + vs, tl.where(vs == best_i, 1.0, 0.0), mask=vs < Kv)
    else:
        best = -1.0
        for v0 in range(0, Kv, BV):
            vs = v0 + tl.arange(0, BV)
            vm = vs < Kv
            p = tl.exp(tl.load(PROB_ROW + vs, mask=vm, other=float("-inf")) - m) / s
            tl.store(PROB_ROW + vs, p, mask=vm)
            e = tl.load(NOISE_ROW + vs, mask=vm, other=1.0)
            score = tl.where(vm, p / e, -1.0)
            cm = tl.max(score, axis=0)
            ci = tl.argmax(score, axis=0) + v0
            best_i = tl.where(cm > best, ci, best_i)
            best = tl.maximum(cm, best)
    return best_i


@triton.jit
def _markov_kernel(BASE, W1, W2, PREV0, NOISE, TOK, PROBS, G, Kv, R, t, GREEDY: tl.constexpr, RP: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, RP)
    rm = rs < R
    prev = tl.load(PREV0 + b)
    for k in range(0, G):
        e = tl.load(W1 + prev * R + rs, mask=rm, other=0.0)
        row = (b * G + k) * Kv
        prev = _vocab_step(BASE + row, PROBS + row, NOISE + row, W2, e, rs, rm, Kv, R, t, GREEDY, BV).to(tl.int64)
        tl.store(TOK + b * G + k, prev)


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _cell_rows(CW, CB, ZROW, gate, rs, rm, R, width, BC: tl.constexpr):
    """Rows [gate*R, (gate+1)*R) of the RNN cell, W z + b, with z = [s; e; h] read back
    from the per-row scratch in column blocks of BC (bounded register tiles)."""
    rows = gate * R + rs
    acc = tl.zeros_like(rs.to(tl.float32))
    for c0 in range(0, width, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < width
        z = tl.load(ZROW + cols, mask=cm, other=0.0)
        w = tl.load(CW + rows[:, None] * width + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(w * z[None, :], axis=1)
    return acc + tl.load(CB + rows, mask=rm, other=0.0)


@triton.jit
def _rnn_kernel(
    BASE, HID, W1, CW, CB, W2, PREV0, NOISE, TOK, PROBS, Z, G, Kv, R, D, t,
    GREEDY: tl.constexpr, RP: tl.constexpr, DP: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, RP)
    rm = rs < R
    ds = tl.arange(0, DP)
    dm = ds < D
    width = 2 * R + D
    zrow = Z + b * width
    state = tl.zeros([RP], tl.float32)
    prev = tl.load(PREV0 + b)
    for k in range(0, G):
        # z = [s; W1[prev]; h_k] into the scratch row, then the three gate blocks
        tl.store(zrow + rs, state, mask=rm)
        tl.store(zrow + R + rs, tl.load(W1 + prev * R + rs, mask=rm, other=0.0), mask=rm)
        tl.store(zrow + 2 * R + ds, tl.load(HID + (b * G + k) * D + ds, mask=dm, other=0.0), mask=dm)
        tl.debug_barrier()
        gate_v = tl.sigmoid(_cell_rows(CW, CB, zrow, 0, rs, rm, R, width, BC))
        cand = _tanh(_cell_rows(CW, CB, zrow, 1, rs, rm, R, width, BC))
        o = tl.where(rm, _tanh(_cell_rows(CW, CB, zrow, 2, rs, rm, R, width, BC)), 0.0)
        tl.debug_barrier()
        state = tl.where(rm, gate_v * state + (1 - gate_v) * cand, 0.0)
        row = (b * G + k) * Kv
        prev = _vocab_step(BASE + row, PROBS + row, NOISE + row, W2, o, rs, rm, Kv, R, t, GREEDY, BV).to(tl.int64)
        tl.store(TOK + b * G + k, prev)


def _head_bv(rp: int, kv: int) -> int:
    """Vocabulary block for the head samplers: BV x RP register tiles of <= 8192 floats."""
    return max(16, min(256, 8192 // rp, _pow2(kv, 16)))


def markov_sample(base, w1, w2, prev0, temperature, noise):
    B, G, Kv = base.shape
    R = w1.shape[1]
    tok = torch.empty((B, G), dtype=torch.long, device=base.device)
    probs = torch.empty((B, G, Kv), dtype=torch.float32, device=base.device)
    greedy = temperature == 0
    nz = noise.contiguous() if noise is not None else base
    _markov_kernel[(B,)](
        base.contiguous(), w1.float().contiguous(), w2.float().contiguous(), prev0.contiguous(), nz, tok, probs,
        G, Kv, R, float(temperature) if not greedy else 1.0, GREEDY=greedy, RP=_pow2(R), BV=_head_bv(_pow2(R), Kv),
    )
    return tok, probs


def rnn_sample(base, hidden, w1, cell_w, cell_b, w2, prev0, temperature, noise):
    B, G, Kv = base.shape
    R, D = w1.shape[1], hidden.shape[-1]
    tok = torch.empty((B, G), dtype=torch.long, device=base.device)
    probs = torch.empty((B, G, Kv), dtype=torch.float32, device=base.device)
    greedy = temperature == 0
    nz = noise.contiguous() if noise is not None else base
    scratch = torch.empty((B, 2 * R + D), dtype=torch.float32, device=base.device)
    rp = _pow2(R)
    _rnn_kernel[(B,)](
        base.contiguous(), hidden.float().contiguous(), w1.float().contiguous(), cell_w.float().contiguous(),
        cell_b.float().contiguous(), w2.float().contiguous(), prev0.contiguous(), nz, tok, probs, scratch,
        G, Kv, R, D, float(temperature) if not greedy else 1.0,
        GREEDY=greedy, RP=rp, DP=_pow2(D), BV=_head_bv(rp, Kv), BC=max(16, 8192 // rp),
    )
    return tok, probs


# ---------------------------------------------------------------------------- distillation loss


@triton.jit
def _lse_pass(ROW, V, BV: tl.constexpr):
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        x = tl.load(ROW + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _distill_fwd_kernel(DL, TL, Y, CE, L1, LSE_D, LSE_T, SP, V, BV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    drow, trow = DL + n * V, TL + n * V
    lse_d = _lse_pass(drow, V, BV)
    lse_t = _lse_pass(trow, V, BV)
    l1 = 0.0
    sp = 0.0  # sum_i sign(p_i - q_i) p_i, needed by the backward pass
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        vm = vs < V
        p = tl.exp(tl.load(drow + vs, mask=vm, other=float("-inf")).to(tl.float32) - lse_d)
        q = tl.exp(tl.load(trow + vs, mask=vm, other=float("-inf")).to(tl.float32) - lse_t)
        diff = p - q
        l1 += tl.sum(tl.abs(diff), axis=0)
        sp += tl.sum(tl.where(diff > 0, p, tl.where(diff < 0, -p, 0.0)), axis=0)
    y = tl.load(Y + n)
    dy = tl.load(drow + tl.maximum(y, 0)).to(tl.float32)
    tl.store(CE + n, tl.where(y >= 0, lse_d - dy, 0.0))
    tl.store(L1 + n, l1)
    tl.store(LSE_D + n, lse_d)
    tl.store(LSE_T + n, lse_t)
    tl.store(SP + n, sp)


@triton.jit
def _distill_bwd_kernel(DL, TL, Y, LSE_D, LSE_T, SP, G_CE, G_L1, GRAD, V, BV: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    drow, trow = DL + n * V, TL + n * V
    lse_d, lse_t, sp = tl.load(LSE_D + n), tl.load(LSE_T + n), tl.load(SP + n)
    y = tl.load(Y + n)
    g_ce = tl.where(y >= 0, tl.load(G_CE + n), 0.0)
    g_l1 = tl.load(G_L1 + n)
    for v0 in range(0, V, BV):
        vs = v0 + tl.arange(0, BV)
        vm = vs < V
        p = tl.exp(tl.load(drow + vs, mask=vm, other=float("-inf")).to(tl.float32) - lse_d)
        q = tl.exp(tl.load(trow + vs, mask=vm, other=float("-inf")).to(tl.float32) - lse_t)
        sign = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        g = g_ce * (p - tl.where(vs == y, 1.0, 0.0)) + g_l1 * p * (sign - sp)
        tl.store(GRAD + n * V + vs, g.to(GRAD.dtype.element_ty), mask=vm)


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, draft_logits, target_logits, labels):
        N, V = draft_logits.shape
        d, t, y = draft_logits.contiguous(), target_logits.contiguous(), labels.contiguous()
        ce, l1, lse_d, lse_t, sp = (torch.empty(N, dtype=torch.float32, device=d.device) for _ in range(5))
        bv = min(BLOCK_V, _pow2(V, 16))
        _distill_fwd_kernel[(N,)](d, t, y, ce, l1, lse_d, lse_t, sp, V, BV=bv)
        ctx.save_for_backward(d, t, y, lse_d, lse_t, sp)
        ctx.bv = bv
        return ce, l1

    @staticmethod
    def backward(ctx, g_ce, g_l1):
        d, t, y, lse_d, lse_t, sp = ctx.saved_tensors
        N, V = d.shape
        grad = torch.empty_like(d)
        g_ce = torch.zeros(N, device=d.device) if g_ce is None else g_ce.float().contiguous()
        g_l1 = torch.zeros(N, device=d.device) if g_l1 is None else g_l1.float().contiguous()
        _distill_bwd_kernel[(N,)](d, t, y, lse_d, lse_t, sp, g_ce, g_l1, grad, V, BV=ctx.bv)
        return grad, None, None


def distill_loss(draft_logits, target_logits, labels, chunk_rows: int = 1024):
    ce, l1 = _DistillLoss.apply(draft_logits, target_logits.detach(), labels)
    return ce, l1, (1 - 0.5 * l1).detach()
