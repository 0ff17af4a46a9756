"""Exact next tokens from a tall fp32 LM head while reading a half-precision copy of it.

At batch 1 on a CPU the LM head of a small-vocabulary-heavy model is a matrix-vector
product bound by memory bandwidth: Gemma 3 270M's tied 262,144 x 640 head is 671 MB in
fp32, ~60 % of every decode step's weight traffic. An fp16 copy reads half the bytes and
the CPU's fp16 GEMV accumulates in fp32, so it runs ~3x faster for one row (measured
30 vs 87 ms on a 2-core AVX2 EPYC; docs/benchmarks.md). Its logits are not the target's,
but their error is bounded, token by token:

    |z_i - z~_i| <= eps_i = c * ||h||_2 * ||w_i||_2 + 2u |z~_i| + 2^-24 (||h||_1 + ||w_i||_1) + 2^-20

with u = 2^-11 (fp16 unit roundoff: rounding of h, of w_i and of the fp16 output),
c = (2u + u^2 + 3 gamma_d (1 + u)^2) * 1.01, gamma_d = d 2^-24 / (1 - d 2^-24) (fp32
summation of d products, counted for the fp16 product and for the fp32 recomputation of
any single logit), and the 2^-24 terms for fp16 subnormals (absolute rounding error
<= 2^-25). The final-logit softcap, c tanh(z / c), shrinks differences, so the interval
[cap(z~ - eps), cap(z~ + eps)] holds the capped logit too.

With that interval per token the target's own decisions are reproduced exactly:

- argmax: every token whose upper bound reaches the largest lower bound is a candidate;
  the true argmax is among them. Their exact fp32 logits (a few rows of the head) decide,
  ties to the lowest id as ``torch.argmax`` does.
- sampling at temperature T: rejection sampling. The proposal weight is exp(z/T) for the
  ``top`` tokens with the largest upper bounds (their exact logits are computed) and
  exp(upper/T) >= exp(z/T) for every other token. A draw outside the top set is accepted
  with probability exp((z - upper) / T) after computing its exact logit. Accepted draws
  are distributed exactly as softmax(z / T); after ``max_tries`` rejections (rare: the
  measured acceptance is above 0.97 at T = 1) the row is sampled from its full fp32
  logits, which keeps the output exact as well.

"Exact" means: the same distribution as the fp32 logits, which themselves depend on the
kernel's summation order by ~1e-5 (the library GEMM and the blockwise one already
differ that much). top-k / top-p need the full sorted distribution: those requests use
the full head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.sampling import Generators, _rows, inverse_cdf, uniform64

_U16 = 2.0**-11  # fp16 unit roundoff (11 significant bits)
_SUB = 2.0**-24  # covers fp16 subnormal rounding (<= 2^-25) of one factor, with room
_FP16_MAX = 60000.0  # fp16 overflows past 65504: such hidden states use the full head


class ScreenedHead:
    """Greedy and sampled next tokens of ``softmax(h @ weight.T)``, exact, from an fp16
    screen of the head plus fp32 logits for the few tokens that decide.

    weight: [V, d] fp32 LM head (kept by reference, used for the exact logits).
    softcap: the model's final-logit softcap, or None.
    top: how many tokens get exact logits up front when sampling.
    max_candidates: greedy rows with more candidates than this use the full head.
    max_tries: rejections before a sampled row falls back to its full logits.
    slack: extra width added to every bound (wider bounds stay valid: still exact, only
        slower; tests use it to make the rejection step do visible work).
    """

    def __init__(self, weight: torch.Tensor, softcap: float | None = None, top: int = 64,
                 max_candidates: int = 4096, max_tries: int = 32, slack: float = 0.0) -> None:
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"ScreenedHead needs a [V, d] fp32 weight, got {tuple(weight.shape)} {weight.dtype}")
        self.weight = weight
        self.softcap = float(softcap) if softcap else None
        V, d = weight.shape
        if d > 8192:  # keeps d 2^-24 well below the 1e-3 margin of the norms below
            raise ValueError(f"hidden size {d} is too large for the screen's norm bounds")
        self.top = min(top, V)
        self.max_candidates = max_candidates
        self.max_tries = max_tries
        if not slack >= 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        self.slack = float(slack)
        self.half = weight.detach().to(torch.float16)
        if not bool(torch.isfinite(self.half).all()):
            raise ValueError("the LM head has entries beyond fp16's range; the screen cannot bound its error")
        # fp32 norms of d entries: relative error <= d 2^-24 (< 1e-4 for d < 1600), so a
        # factor 1 + 1e-3 makes them upper bounds (fp64 here took ~4 s for Gemma's head)
        w = weight.detach()
        self.wnorm2 = w.norm(dim=1) * (1 + 1e-3)
        self.wnorm1 = w.abs().sum(1) * (1 + 1e-3)
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        self._c = (2 * _U16 + _U16**2 + 3 * gamma * (1 + _U16) ** 2) * 1.01
        # eps_i = a_i ||h||_2 + b_i + 2u |z~_i|, the bound of the module docstring with
        # ||h||_1 <= sqrt(d) ||h||_2 folded in, so one fused pass builds it
        self._a = self._c * self.wnorm2 + _SUB * d**0.5 * (1 + 1e-3)
        self._b = _SUB * self.wnorm1 + 2.0**-20

    def self_check(self, rows: int = 2, seed: int = 0) -> str | None:
        """Probe the bound on this machine's fp16 kernel: ``rows`` random hidden states
        (one with a massive-activation dimension) against the fp32 logits. Returns what failed,
        or None. The bound assumes fp32 accumulation inside the fp16 product (PyTorch's
        CPU kernels do unless reduced-precision reductions are allowed); a kernel that
        accumulates in fp16 breaks it by orders of magnitude, which this catches."""
        flag = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
        if flag is not None and flag():
            return "torch allows reduced-precision fp16 reductions on this CPU"
        g = torch.Generator().manual_seed(seed)
        d = self.weight.shape[1]
        h = torch.randn(rows, d, generator=g) * 4.0
        h[0, int(torch.randint(d, (1,), generator=g))] = 400.0
        b = self.bounds(h)
        if b is None:
            return "the probe's logits do not fit fp16"
        z = self.full(h)  # the fp32 logits the screen's decisions must reproduce
        bad = int(((b[0] > z) | (z > b[1])).sum())
        return f"{bad} probe logits fall outside their bounds" if bad else None

    # ------------------------------------------------------------------ pieces
    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def full(self, h: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, V] fp32 logits from the fp32 head (the fallback)."""
        return self._cap(F.linear(h, self.weight))

    def exact(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[d] hidden, [n] ids -> [n] fp32 logits of those ids."""
        return self._cap(F.linear(h[None], self.weight[ids])[0])

    def exact_pairs(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[n, d] hidden, [n] ids -> [n] fp32 logits, row j's logit of ids[j]."""
        return self._cap((self.weight[ids] * h).sum(-1))

    def bounds(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[N, d] fp32 -> (lower, upper) [N, V] fp32 with lower <= z <= upper for every
        token, or None when the hidden state or a logit does not fit fp16 (then use
        :meth:`full`)."""
        if not bool((h.abs() < _FP16_MAX).all()):
            return None
        z16 = F.linear(h.to(torch.float16), self.half)
        if not bool(torch.isfinite(z16).all()):  # a logit past fp16's range
            return None
        zt = z16.float()
        hn2 = h.float().norm(dim=1)[:, None] * (1 + 1e-3)
        eps = torch.addcmul(self._b + self.slack, self._a, hn2)  # [N, V]
        eps.add_(zt.abs(), alpha=2 * _U16)
        lo = zt - eps
        return self._cap(lo), self._cap(zt.add_(eps))

    # ------------------------------------------------------------------ decisions
    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """[N, d] fp32 final hidden -> [N] ids of the largest fp32 logit."""
        b = self.bounds(h)
        if b is None:
            return self.full(h).argmax(-1)
        lo, hi = b
        best = lo.max(-1, keepdim=True).values
        out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
        for r in range(h.shape[0]):
            cand = torch.nonzero(hi[r] >= best[r]).squeeze(-1)  # ascending ids
            if cand.numel() > self.max_candidates:
                out[r] = self.full(h[r : r + 1]).argmax(-1)[0]
            else:
                out[r] = cand[self.exact(h[r], cand).argmax()]
        return out

    def sample(self, h: torch.Tensor, temperature: float, gens: Generators = None) -> torch.Tensor:
        """[N, d] fp32 final hidden -> [N] ids drawn from softmax(logits / temperature),
        one row per generator (or one generator for all rows). Row r's draws come from its
        own generator only: 1 uniform per proposal, 1 more per acceptance test."""
        if not temperature > 0:
            raise ValueError(f"sample needs temperature > 0, got {temperature} (use argmax)")
        T, N = float(temperature), h.shape[0]
        rows = _rows(gens, N)
        b = self.bounds(h)
        if b is None:
            return self._sample_full(h, T, rows)
        prop = b[1]  # the upper bounds, then the exact logits of the top set written in
        top = torch.topk(prop, self.top, dim=-1).indices  # [N, top]
        prop.scatter_(1, top, self._cap(torch.bmm(self.weight[top], h[:, :, None])[..., 0]))
        w = (prop - prop.max(-1, keepdim=True).values).mul_(1.0 / T).exp_()
        out = torch.full((N,), -1, dtype=torch.long, device=h.device)
        active = torch.arange(N, device=h.device)
        for _ in range(self.max_tries):
            if active.numel() == 0:
                return out
            ids = inverse_cdf(w[active], uniform64([rows[r] for r in active.tolist()], active.numel(), h.device))
            ok = (top[active] == ids[:, None]).any(-1)
            test = torch.nonzero(~ok).squeeze(-1)
            if test.numel():  # outside the exact set: accept with exp((z - upper) / T) <= 1
                r_, i_ = active[test], ids[test]
                z = self.exact_pairs(h[r_], i_)
                accept = torch.exp((z.double() - prop[r_, i_].double()) / T)
                ok[test] = uniform64([rows[r] for r in r_.tolist()], r_.numel(), h.device) < accept
            out[active[ok]] = ids[ok]
            active = active[~ok]
        if active.numel():  # rare: the rows still rejecting draw from their full logits
            out[active] = self._sample_full(h[active], T, [rows[r] for r in active.tolist()])
        return out

    def _sample_full(self, h: torch.Tensor, T: float, rows: list) -> torch.Tensor:
        w = torch.softmax(self.full(h) / T, -1)
        return inverse_cdf(w, uniform64(rows, h.shape[0], h.device))
