"""Unit tests of the rejection sampler on hand-built distributions."""

from __future__ import annotations

import pytest
import torch

from dspark.sampling import SamplingParams
from dspark.verify import verify

V = 6
GREEDY, SAMPLED = SamplingParams(temperature=0), SamplingParams(temperature=1.0)


def onehot_logits(ids: list[list[int]]) -> torch.Tensor:
    """[B, K+1, V] logits whose argmax (and, at T=1, almost all mass) is ids[b][j]."""
    t = torch.full((len(ids), len(ids[0]), V), -30.0)
    for b, row in enumerate(ids):
        for j, x in enumerate(row):
            t[b, j, x] = 30.0
    return t


def drafts(rows: list[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = torch.zeros((len(rows), k), dtype=torch.long)
    for i, r in enumerate(rows):
        tok[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return tok, torch.tensor([len(r) for r in rows])


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_all_accepted_then_bonus(params):
    tok, lens = drafts([[3, 4, 5]], 3)
    out = verify(onehot_logits([[3, 4, 5, 1]]), tok, lens, None, params, torch.Generator().manual_seed(0))
    assert out.num_accepted.tolist() == [3]
    assert out.emitted(0) == [3, 4, 5, 1]  # three drafts + bonus from slot 4
    assert out.num_emitted.tolist() == [4] and not out.stopped.any()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_first_rejected(params):
    tok, lens = drafts([[2, 4, 5]], 3)
    out = verify(onehot_logits([[3, 4, 5, 1]]), tok, lens, None, params, torch.Generator().manual_seed(0))
    assert out.num_accepted.tolist() == [0]
    assert out.emitted(0) == [3]  # the correction, nothing after it
    assert out.tokens[0, 1:].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_mixed_ragged_batch(params):
    # row 0: 2 of 3 accepted; row 1: 1-token draft accepted + bonus; row 2: no draft;
    # row 3: 2 drafts, second rejected
    tok, lens = drafts([[1, 2, 0], [4], [], [5, 5]], 3)
    target = [[1, 2, 3, 0], [4, 2, 0, 0], [3, 0, 0, 0], [5, 1, 0, 0]]
    out = verify(onehot_logits(target), tok, lens, None, params, torch.Generator().manual_seed(0))
    assert out.num_accepted.tolist() == [2, 1, 0, 1]
    assert [out.emitted(i) for i in range(4)] == [[1, 2, 3], [4, 2], [3], [5, 1]]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_zero_length_drafts_is_one_ar_step(params):
    tok, lens = drafts([[], []], 0)
    out = verify(onehot_logits([[4], [2]]), tok, lens, None, params, torch.Generator().manual_seed(0))
    assert out.num_accepted.tolist() == [0, 0]
    assert [out.emitted(0), out.emitted(1)] == [[4], [2]]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stop_token_inside_accepted_prefix(params):
    tok, lens = drafts([[3, 2, 5], [1, 4, 4]], 3)  # 2 is the stop token
    out = verify(
        onehot_logits([[3, 2, 5, 1], [1, 4, 2, 0]]), tok, lens, None, params, torch.Generator().manual_seed(0), stop_token_ids=[2]
    )
    assert out.num_accepted.tolist() == [3, 2]  # acceptance itself is not truncated
    assert out.emitted(0) == [3, 2]  # generation ends at the accepted stop token, no bonus
    assert out.emitted(1) == [1, 4, 2]  # stop token as the correction
    assert out.stopped.tolist() == [True, True]
    assert out.tokens[0, 2:].tolist() == [-1, -1]


def test_draft_probs_used_in_acceptance_ratio():
    """p_t(x)=0.5, p_d(x)=1.0 -> accept half the time; with p_d(x)=0.5 always accept."""
    logits = torch.log(torch.tensor([[[0.5, 0.5, 1e-9, 1e-9, 1e-9, 1e-9], [1 / 6] * 6]])).float()
    tok, lens = drafts([[0]], 1)
    sure = torch.zeros(1, 1, V)
    sure[0, 0, 0] = 1.0
    half = torch.zeros(1, 1, V)
    half[0, 0, :2] = 0.5
    g = torch.Generator().manual_seed(0)
    acc_sure = sum(int(verify(logits, tok, lens, sure, SAMPLED, g).num_accepted) for _ in range(4000)) / 4000
    acc_half = sum(int(verify(logits, tok, lens, half, SAMPLED, g).num_accepted) for _ in range(500)) / 500
    assert abs(acc_sure - 0.5) < 0.04
    assert acc_half == 1.0
    # with probs None the drafter is deterministic: same as p_d one-hot
    acc_none = sum(int(verify(logits, tok, lens, None, SAMPLED, g).num_accepted) for _ in range(4000)) / 4000
    assert abs(acc_none - 0.5) < 0.04


def test_rejection_resamples_from_residual():
    """p_t = (.5,.5), p_d = (1, 0): on rejection the correction must be token 1 always."""
    logits = torch.log(torch.tensor([[[0.5, 0.5] + [1e-12] * 4, [1 / 6] * 6]])).float()
    tok, lens = drafts([[0]], 1)
    q = torch.zeros(1, 1, V)
    q[0, 0, 0] = 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        out = verify(logits, tok, lens, q, SAMPLED, g)
        if int(out.num_accepted) == 0:
            assert out.emitted(0) == [1]


def test_bad_shapes_are_reported():
    tok, lens = drafts([[1, 2]], 2)
    with pytest.raises(ValueError, match="K\\+1"):
        verify(torch.zeros(1, 2, V), tok, lens, None, GREEDY)
    with pytest.raises(ValueError, match="draft_lens"):
        verify(torch.zeros(1, 3, V), tok, torch.tensor([3]), None, GREEDY)
    with pytest.raises(ValueError, match="draft_probs"):
        verify(torch.zeros(1, 3, V), tok, lens, torch.zeros(1, 2, V + 1), SAMPLED)
