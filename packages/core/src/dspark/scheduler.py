"""Hardware-aware prefix scheduler: how many draft tokens of each request to verify.

Inputs per step: for each active request r, its prefix-survival probabilities
a_{r,1..n_r} (a_{r,j} = prod_{i<=j} c_{r,i}, calibrated, non-increasing in j), and a
profiled SPS(B) curve (target steps per second at B tokens in the verify batch).
Verify lengths l_r choose B = sum(1 + l_r) and the expected accepted tokens
tau* = sum(1 + sum_{j<=l_r} a_{r,j}); DSpark maximises Theta = tau* x SPS(B).

Policies:
- ``none``: l_r = 0 (plain autoregressive decoding).
- ``static``: l_r = min(gamma, n_r).
- ``threshold``: the longest prefix with a_{r,j} >= threshold.
- ``sync`` (Algorithm 1): admit candidates in descending a, stop at the first one that
  does not raise Theta. The early stop keeps admission causal: whether draft j is
  verified never depends on draft j itself, so the output stays exactly the target's.
- ``async`` (zero-overhead variant): the number of candidates K comes from the
  confidences of two steps earlier (global search, no early stop), and this step admits
  its top-K candidates. K cannot depend on the current tokens, so this is lossless too.

Draft gating (``draft_gate=True``, sync / async only): on hardware where drafting costs a
sizeable part of a step (CPUs), a step that drafts can be slower than a plain AR step
even when verification is nearly free. Before each step the scheduler compares the
throughput it expects with drafting, (expected accepted tokens + R) / (draft time +
1/SPS(B)), against plain decoding, R x SPS(R), using the last drafted step's admitted
survival mass and the measured draft time; it skips drafting when AR is faster, and
drafts again every ``probe_every`` skipped steps to refresh the estimate. The decision
uses only earlier steps, so the output distribution is unchanged.

A retrospective global search on the *current* confidences is not offered: it lets
a_{r,j+1}, which depends on draft j, decide whether draft j is verified, which biases
the output (DSpark paper, Appendix A; ``tests/core/test_scheduler.py`` shows the bias).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Policy = Literal["none", "static", "threshold", "sync", "async"]


@dataclass
class SPSProfile:
    """Target steps per second as a function of verify-batch tokens, by linear
    interpolation between profiled points (held flat in steps/s per token beyond them)."""

    batch_tokens: list[int]
    steps_per_second: list[float]

    def __post_init__(self) -> None:
        if len(self.batch_tokens) != len(self.steps_per_second) or not self.batch_tokens:
            raise ValueError("SPSProfile needs matching, non-empty batch_tokens and steps_per_second")
        if any(b2 <= b1 for b1, b2 in zip(self.batch_tokens, self.batch_tokens[1:])):
            raise ValueError("SPSProfile.batch_tokens must be strictly increasing")
        if any(s <= 0 for s in self.steps_per_second):
            raise ValueError("SPSProfile.steps_per_second must be positive")

    def __call__(self, b: int) -> float:
        xs, ys = self.batch_tokens, self.steps_per_second
        if b <= xs[0]:
            return ys[0]
        if b >= xs[-1]:
            return ys[-1] * xs[-1] / b  # beyond the table: time grows linearly with tokens
        i = bisect.bisect_right(xs, b)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (b - x0) / (x1 - x0)

    def to_dict(self) -> dict[str, list]:
        return {"batch_tokens": self.batch_tokens, "steps_per_second": self.steps_per_second}

    def monotone(self) -> SPSProfile:
        """A copy whose steps/s never rise with more tokens (running minimum): timing noise
        must not make a bigger verify batch look faster."""
        out, low = [], float("inf")
        for s in self.steps_per_second:
            low = min(low, s)
            out.append(low)
        return SPSProfile(list(self.batch_tokens), out)


def machine_key() -> str:
    """What an SPS profile depends on besides the model: CPU / GPU, thread count, torch."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return f"{dev}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cached_sps(
    key: dict[str, str],
    measure: Callable[[], SPSProfile],
    cache_dir: Path | None = None,
    refresh: bool = False,
) -> SPSProfile:
    """Load the SPS profile stored for ``key`` (e.g. model, dtype, machine_key()), or
    measure it, force it monotone and store it atomically. ``refresh`` re-profiles."""
    from dspark.cache_dir import atomic_write_text, cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache_dir or cache_root() / "sps") / f"{digest}.json"
    if path.exists() and not refresh:
        try:
            d = json.loads(path.read_text())
            if d.get("key") == key:
                return SPSProfile(d["batch_tokens"], d["steps_per_second"])
        except (json.JSONDecodeError, KeyError, ValueError):
            pass  # unreadable or stale: measure again
    prof = measure().monotone()
    atomic_write_text(path, json.dumps({"key": key, **prof.to_dict()}, indent=1))
    return prof


def profile_sps(step: Callable[[int], object], batch_tokens: Sequence[int], repeats: int = 5, warmup: int = 1) -> SPSProfile:
    """Measure SPS(B) = 1 / median seconds of ``step(B)`` (one verify forward of B tokens)."""
    sps = []
    for b in batch_tokens:
        for _ in range(warmup):
            step(b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
        sps.append(1.0 / max(statistics.median(times), 1e-9))
    return SPSProfile(list(batch_tokens), sps)


def _candidates(survival: Sequence[torch.Tensor]) -> list[tuple[float, int, int]]:
    """(a, j, r) for every draft with a > 0, sorted by a descending, then j, then r: a
    request's own candidates come in prefix order even when survival values tie.

    Survival is clamped to its running minimum first: whatever its source (rounding lets a
    cumulative product rise by an ulp), draft j+1 never sorts before draft j, so no draft
    is admitted because of a later draft's confidence (DSPARK.md section 3)."""
    out = [
        (float(a), j + 1, r)
        for r, s in enumerate(survival)
        for j, a in enumerate(torch.cummin(s.float(), 0).values.tolist() if s.numel() else [])
        if a > 0
    ]
    out.sort(key=lambda c: (-c[0], c[1], c[2]))
    return out


def global_budget(survival: Sequence[torch.Tensor], sps: SPSProfile) -> int:
    """argmax_K Theta when the K best candidates are admitted (no early stop)."""
    R = len(survival)
    tau, best, best_k = float(R), R * sps(R), 0
    for k, (a, _, _) in enumerate(_candidates(survival), start=1):
        tau += a
        theta = tau * sps(R + k)
        if theta > best:
            best, best_k = theta, k
    return best_k


def _admit(survival: Sequence[torch.Tensor], k: int) -> list[int]:
    lens = [0] * len(survival)
    for _, j, r in _candidates(survival)[:k]:
        lens[r] = max(lens[r], j)
    return lens


@dataclass
class PrefixScheduler:
    """Chooses per-request verify lengths each step. See the module docstring.

    gamma: the static length; threshold: for ``threshold``; sps: the SPS profile
    (``sync`` / ``async``); initial_budget: ``async`` budget before two steps of history.
    """

    policy: Policy = "sync"
    sps: SPSProfile | None = None
    gamma: int = 7
    threshold: float = 0.5
    initial_budget: int = 0
    draft_gate: bool = False
    probe_every: int = 8
    _budgets: dict = field(default_factory=dict, repr=False)  # (engine step, group) -> budget computed then
    _step: int = field(default=0, repr=False)
    _driven: bool = field(default=False, repr=False)  # an engine calls begin_step
    _draft_s: float | None = field(default=None, repr=False)  # EMA of seconds per draft call
    _per_req: tuple[float, float] | None = field(default=None, repr=False)  # (expected accepted, verified) per request
    _skipped: int = field(default=0, repr=False)
    history: deque = field(default_factory=lambda: deque(maxlen=4096), repr=False)  # bounded: servers run for days

    def __post_init__(self) -> None:
        if self.policy not in ("none", "static", "threshold", "sync", "async"):
            raise ValueError(f"scheduler policy must be none, static, threshold, sync or async, got {self.policy!r}")
        if self.policy in ("sync", "async") and self.sps is None:
            raise ValueError(f"scheduler policy {self.policy!r} needs an SPS profile (sps=)")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    # ------------------------------------------------------------------ draft gating
    def should_draft(self, num_requests: int) -> bool:
        """Whether the next step should draft at all (see the module docstring)."""
        if not self.draft_gate or self.policy not in ("sync", "async") or self._draft_s is None or self._per_req is None:
            return True
        if self._skipped >= self.probe_every:
            self._skipped = 0
            return True
        R = num_requests
        acc, ver = self._per_req
        spec = R * (1 + acc) / (self._draft_s + 1 / self.sps(max(1, round(R * (1 + ver)))))
        ar = R * self.sps(R)
        if spec > ar:
            return True
        self._skipped += 1
        return False

    def observe(self, draft_seconds: float, survival: Sequence[torch.Tensor], lens: Sequence[int]) -> None:
        """After a drafted step: its draft time and the survival mass it admitted."""
        self._draft_s = draft_seconds if self._draft_s is None else 0.7 * self._draft_s + 0.3 * draft_seconds
        R = max(1, len(lens))
        acc = sum(float(s[: int(n)].sum()) for s, n in zip(survival, lens)) / R
        self._per_req = (acc, sum(int(n) for n in lens) / R)

    @property
    def needs_confidence(self) -> bool:
        return self.policy in ("threshold", "sync", "async")

    def begin_step(self) -> None:
        """The engine calls this once at the start of every engine step: ``async`` budgets
        are "from two engine steps earlier", however many groups each step schedules."""
        self._driven = True
        self._next_step()

    def _next_step(self) -> None:
        self._step += 1
        for key in [k for k in self._budgets if k[0] < self._step - 2]:
            del self._budgets[key]

    def verify_lengths(
        self, survival: Sequence[torch.Tensor], request_ids: Sequence[int] | None = None, group: object = None
    ) -> list[int]:
        """survival: per request, [n_r] prefix-survival probabilities of its drafts
        (non-increasing). Returns l_r in 0..n_r. ``request_ids`` is for schedulers that
        keep per-request state (this one schedules the batch as a whole); ``group`` names
        the batch scheduled (the engine schedules each sampling-parameter group apart)."""
        for r, s in enumerate(survival):
            if s.numel() > 1 and bool((s[1:] > s[:-1] + 1e-6).any()):
                raise ValueError(f"survival of request {r} must be non-increasing (a cumulative product)")
        n = [int(s.numel()) for s in survival]
        if self.policy == "none":
            lens = [0] * len(n)
        elif self.policy == "static":
            lens = [min(self.gamma, k) for k in n]
        elif self.policy == "threshold":
            lens = [int((s >= self.threshold).sum()) for s in survival]
        elif self.policy == "sync":
            lens = self._sync(survival)
        else:
            lens = self._async(survival, group)
        self.history.append(lens)
        return lens

    def _sync(self, survival: Sequence[torch.Tensor]) -> list[int]:
        R, sps = len(survival), self.sps
        lens = [0] * R
        b, tau = R, float(R)
        best = tau * sps(b)
        for a, j, r in _candidates(survival):
            theta = (tau + a) * sps(b + 1)
            if theta <= best:
                break  # early stop: later candidates never decide earlier ones
            b, tau, best = b + 1, tau + a, theta
            lens[r] = j
        return lens

    def _async(self, survival: Sequence[torch.Tensor], group: object = None) -> list[int]:
        # the budget used now was computed two engine steps ago for the same group; this
        # step's goes to step t+2 (without begin_step calls, every call counts as a step)
        if not self._driven:
            self._next_step()
        k = self._budgets.get((self._step - 2, group), self.initial_budget)
        self._budgets[(self._step, group)] = global_budget(survival, self.sps)
        return _admit(survival, k)

    def reset(self) -> None:
        self._budgets.clear()
        self._step, self._driven = 0, False
        self.history.clear()
        self._draft_s, self._per_req, self._skipped = None, None, 0
