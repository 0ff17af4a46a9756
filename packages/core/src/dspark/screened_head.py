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

import math

import torch
import torch.nn.functional as F

from dspark.sampling import Generators, _rows, inverse_cdf, uniform64

_U16 = 2.0**-11  # fp16 unit roundoff (11 significant bits)
_SUB = 2.0**-24  # covers fp16 subnormal rounding (<= 2^-25) of one factor, with room
_FP16_MAX = 60000.0  # fp16 overflows past 65504: such hidden states use the full head
# relative slack on the normaliser bounds of verify_step: covers fp32 exp (~1 ulp) of
# arguments down to about -50 (smaller terms are < V e^-50 of a sum that is >= e^-width)
_Z_MARGIN = 1e-4


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
        prop, top = self._proposal(h, b[1])
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

    def _proposal(self, h: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The upper bounds (modified in place) with the exact logits of the ``top`` tokens
        of largest upper bound written in, and those tokens' ids [N, top]."""
        top = torch.topk(upper, self.top, dim=-1).indices
        upper.scatter_(1, top, self._cap(torch.bmm(self.weight[top], h[:, :, None])[..., 0]))
        return upper, top

    def verify_step(self, h: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, temperature: float,
                    gens: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot of speculative sampling per row, exact, from the screen.

        h: [N, d] fp32 final hidden at the slots verifying ``draft`` [N]; q: [N, V] the
        draft distributions the tokens were drawn from (None: deterministic drafts, q the
        one-hot of the draft). Accepts draft x with probability min(1, p(x) / q(x)) and
        otherwise draws the correction from normalize(max(p - q, 0)), p = softmax(z / T)
        of the fp32 logits. Returns (accepted [N] bool, token [N]: the correction where
        rejected, -1 where accepted).

        p(x) = exp(z_x / T) / Z needs the normaliser Z over the whole vocabulary. The
        bounds give Z_lo <= Z <= Z_hi (exact terms for the ``top`` tokens and the draft,
        bound terms elsewhere), so u < p(x) / q(x) is decided from them unless u falls
        between the two ratios; then, and only then, the row's full fp32 logits decide.
        The correction is drawn by rejection: y ~ p through the screen's own sampler
        (:meth:`sample`'s scheme), kept with probability max(0, 1 - q(y) / p(y)) (always
        when q(y) = 0), the same interval test deciding that ratio; a row still undecided
        after ``max_tries`` proposals, or whose test is ambiguous, draws from its full
        logits. Each test consumes one U[0, 1) draw of the row's generator."""
        if not temperature > 0:
            raise ValueError(f"verify_step needs temperature > 0, got {temperature} (greedy: argmax)")
        T, N = float(temperature), h.shape[0]
        rows = _rows(gens, N)
        acc = torch.zeros(N, dtype=torch.bool)
        tok = torch.full((N,), -1, dtype=torch.long)
        draft = draft.to(torch.long)
        b = self.bounds(h)
        if b is None:
            for r in range(N):
                acc[r], tok[r] = self._verify_full(h[r], int(draft[r]), None if q is None else q[r], T, rows[r])
            return acc, tok
        lo, prop = b
        prop, top = self._proposal(h, prop)  # upper bounds, exact on the top set
        ar = torch.arange(N, device=h.device)
        zx = self.exact_pairs(h, draft)
        prop[ar, draft] = zx
        lo.scatter_(1, top, prop.gather(1, top))
        lo[ar, draft] = zx
        m = prop.max(-1, keepdim=True).values  # >= every logit
        w = (prop - m).mul_(1.0 / T).exp_()  # the proposal weights: exp(z / T) or exp(upper / T)
        z_hi = w.double().sum(-1) * (1 + _Z_MARGIN)
        z_lo = (lo - m).mul_(1.0 / T).exp_().double().sum(-1) * (1 - _Z_MARGIN)
        del lo
        m64 = m[:, 0].double()
        num = torch.exp((zx.double() - m64) / T)
        qx = torch.ones(N, dtype=torch.float64) if q is None else q[ar, draft].double()
        r_lo = (num / (z_hi * qx)).tolist()  # p(x) / q(x) lies in [r_lo, r_hi] (inf when q(x) = 0)
        r_hi = (num / (z_lo * qx)).tolist()
        u = uniform64(rows, N, h.device).tolist()
        for r in range(N):
            if u[r] < r_lo[r]:
                acc[r] = True
            elif u[r] < r_hi[r]:  # between the bounds: the full logits decide
                acc[r], tok[r] = self._verify_full(h[r], int(draft[r]), None if q is None else q[r], T, rows[r], u[r])
            else:
                tok[r] = self._correction(h[r], int(draft[r]), None if q is None else q[r], T, rows[r], w[r], prop[r],
                                          top[r], float(m64[r]), float(z_lo[r]), float(z_hi[r]))
        return acc, tok

    def _correction(self, h: torch.Tensor, x: int, q: torch.Tensor | None, T: float, gen, w: torch.Tensor,
                    prop: torch.Tensor, top: torch.Tensor, m: float, z_lo: float, z_hi: float) -> int:
        """A draw from normalize(max(p - q, 0)) for one row by rejection (see verify_step)."""
        exact = set(top.tolist()) | {x}
        for _ in range(self.max_tries):
            y = int(inverse_cdf(w[None], uniform64(gen, 1, h.device))[0])
            if y not in exact:  # y ~ p: keep an upper-bound draw with exp((z - upper) / T)
                zy = float(self.exact_pairs(h[None], torch.tensor([y], device=h.device))[0])
                if not float(uniform64(gen, 1, h.device)[0]) < math.exp((zy - float(prop[y])) / T):
                    continue
            else:
                zy = float(prop[y])
            qy = (1.0 if y == x else 0.0) if q is None else float(q[y])
            if qy == 0.0:
                return y
            numy = math.exp((zy - m) / T)
            v = float(uniform64(gen, 1, h.device)[0])
            if v < 1.0 - qy * z_hi / numy:
                return y
            if v >= 1.0 - qy * z_lo / numy:
                continue
            return self._residual_full(h, x, q, T, gen)  # undecided: the full logits from here on
        return self._residual_full(h, x, q, T, gen)

    def _probs_full(self, h: torch.Tensor, T: float) -> torch.Tensor:
        """[d] -> [V] fp64 softmax(z / T) of the row's full fp32 logits."""
        z = self.full(h[None])[0].double()
        return torch.softmax((z - z.max()) / T, -1)

    def _residual_full(self, h: torch.Tensor, x: int, q: torch.Tensor | None, T: float, gen,
                       p: torch.Tensor | None = None) -> int:
        p = self._probs_full(h, T) if p is None else p
        res = p.clone()
        if q is None:
            res[x] = 0.0
        else:
            res = (res - q.double()).clamp_min_(0.0)
        if not float(res.sum()) > 0:  # p == q to the last bit: rejection had probability 0
            res = p
        return int(inverse_cdf(res[None], uniform64(gen, 1, h.device))[0])

    def _verify_full(self, h: torch.Tensor, x: int, q: torch.Tensor | None, T: float, gen,
                     u: float | None = None) -> tuple[bool, int]:
        """One row's accept test and correction from its full fp32 logits."""
        p = self._probs_full(h, T)
        u = float(uniform64(gen, 1, h.device)[0]) if u is None else float(u)
        qx = 1.0 if q is None else float(q[x])
        if qx <= 0 or u < float(p[x]) / qx:  # q(x) = 0: min(1, p / q) is 1
            return True, -1
        return False, self._residual_full(h, x, q, T, gen, p)

    def _sample_full(self, h: torch.Tensor, T: float, rows: list) -> torch.Tensor:
        w = torch.softmax(self.full(h) / T, -1)
        return inverse_cdf(w, uniform64(rows, h.shape[0], h.device))
