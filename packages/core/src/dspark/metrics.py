"""Speculative-decoding metrics, shared by the engine, training, evaluation and serving.

No model code here, so offline (eval) and online (serving) numbers are computed by the
same functions and compare directly.

- tau (accepted length): (accepted drafts + 1) per verification round, pooled over
  rounds: sum(accepted + 1) / rounds. 1 <= tau <= gamma + 1.
- acceptance rate: accepted drafts / proposed drafts.
- per-position conditional acceptance at k: of the rounds in which drafts 1..k-1 were
  accepted and a k-th draft was proposed, the share in which draft k was accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class SpecStats:
    """Per-round records; cheap to merge across requests and benchmarks."""

    draft_lens: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0
    # per round, the drafter's per-step confidences c_1..c_n, or None (drafters without a
    # confidence head, rounds without drafts): the data STS calibration is fitted on
    confidences: list[list[float] | None] = field(default_factory=list)

    def record(self, draft_len: int, accepted: int, confidence: list[float] | None = None) -> None:
        if not 0 <= accepted <= draft_len:
            raise ValueError(f"accepted={accepted} must be in 0..draft_len={draft_len}")
        self.draft_lens.append(int(draft_len))
        self.accepted.append(int(accepted))
        self.confidences.append(None if confidence is None else [float(c) for c in confidence[:draft_len]])

    def merge(self, other: SpecStats) -> SpecStats:
        return SpecStats(
            draft_lens=self.draft_lens + other.draft_lens,
            accepted=self.accepted + other.accepted,
            new_tokens=self.new_tokens + other.new_tokens,
            seconds=self.seconds + other.seconds,
            confidences=self.confidences + other.confidences,
        )

    def calibration_data(self, gamma: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rounds that recorded confidences, as STS input: conf [N, gamma], survived
        [N, gamma] (drafts 1..k all accepted), valid [N, gamma] (a k-th draft was verified)."""
        rows = [i for i, c in enumerate(self.confidences) if c]
        if not rows:
            raise ValueError("no confidences were recorded (drafter without a confidence head?)")
        conf = torch.full((len(rows), gamma), 0.5, dtype=torch.float64)
        for j, i in enumerate(rows):
            c = self.confidences[i][:gamma]
            conf[j, : len(c)] = torch.tensor(c, dtype=torch.float64)
        k = torch.arange(1, gamma + 1)[None, :]
        acc = torch.tensor([self.accepted[i] for i in rows])[:, None]
        lens = torch.tensor([self.draft_lens[i] for i in rows])[:, None]
        return conf, acc >= k, lens >= k

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        return tau(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.draft_lens, self.accepted)

    def per_position(self, max_k: int | None = None) -> list[float | None]:
        return per_position_acceptance(self.draft_lens, self.accepted, max_k)

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.seconds)

    def summary(self) -> dict[str, float]:
        return {
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
            "rounds": float(self.rounds),
            "new_tokens": float(self.new_tokens),
            "tokens_per_second": self.tokens_per_second,
        }


def merge_all(stats: Iterable[SpecStats]) -> SpecStats:
    out = SpecStats()
    for s in stats:
        out = out.merge(s)
    return out


def tau(accepted: list[int]) -> float:
    """Pooled accepted length: sum(accepted + 1) / rounds (nan with no rounds)."""
    if not accepted:
        return float("nan")
    return (sum(accepted) + len(accepted)) / len(accepted)


def acceptance_rate(draft_lens: list[int], accepted: list[int]) -> float:
    proposed = sum(draft_lens)
    return sum(accepted) / proposed if proposed else float("nan")


def per_position_counts(draft_lens: list[int], accepted: list[int], max_k: int) -> list[list[int]]:
    """[reached, accepted] per draft position k = 1..max_k: rounds that verified a k-th
    draft after accepting the first k - 1, and those that accepted it too (the counts behind
    the conditional rates, so they can be pooled and given an interval)."""
    out = []
    for k in range(1, max_k + 1):
        reached = [a for n, a in zip(draft_lens, accepted) if n >= k and a >= k - 1]
        out.append([len(reached), sum(a >= k for a in reached)])
    return out


def per_position_acceptance(
    draft_lens: list[int], accepted: list[int], max_k: int | None = None
) -> list[float | None]:
    """Element k-1 is the conditional acceptance of draft k (None if never reached)."""
    kmax = max_k if max_k is not None else max(draft_lens, default=0)
    return [a / n if n else None for n, a in per_position_counts(draft_lens, accepted, kmax)]


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")
