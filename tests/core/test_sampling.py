from __future__ import annotations

import pytest
import torch

from dspark.sampling import SamplingParams, probs_from_logits, sample


def test_greedy_is_one_hot_argmax():
    p = probs_from_logits(torch.tensor([[0.1, 3.0, -1.0]]), SamplingParams(temperature=0))
    assert p.tolist() == [[0.0, 1.0, 0.0]]


def test_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = probs_from_logits(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = probs_from_logits(logits, SamplingParams(top_p=0.8))  # 0.5 + 0.3 reaches 0.8
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = probs_from_logits(logits, SamplingParams(top_p=0.81))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    hot = probs_from_logits(logits, SamplingParams(temperature=2.0))
    assert hot[0] < 0.5 and hot[3] > 0.05 and hot.dtype == torch.float32


def test_exponential_race_sampling_frequencies():
    w = torch.tensor([[1.0, 3.0, 0.0, 6.0]]).repeat(40_000, 1)  # unnormalised on purpose
    ids = sample(w, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.01, rtol=0)


def test_per_row_generators_are_reproducible():
    w = torch.ones(3, 50)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    a, b = sample(w, gens()), sample(w, gens())
    assert a.tolist() == b.tolist()
    solo = sample(w[:1], [torch.Generator().manual_seed(2)])
    assert int(solo[0]) == int(a[1])  # row 1's draw depends only on its own generator


def test_inverse_cdf_frequencies_and_zero_weights():
    from dspark.sampling import inverse_cdf

    w = torch.tensor([[1.0, 3.0, 0.0, 6.0, 0.0]]).repeat(40_000, 1)  # unnormalised, zeros inside and at the end
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    ids = inverse_cdf(w, u)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.3, 0.0, 0.6, 0.0]), atol=0.01, rtol=0)
    # boundary draws never land on a zero-weight id (u = 0 and u just below 1)
    edge = inverse_cdf(torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]] * 3), torch.tensor([0.0, 2 / 3, 1 - 1e-7]))
    assert edge.tolist() == [1, 3, 3]


@pytest.mark.parametrize("flat_max", [0, 65536], ids=["two-level", "one-running-sum"])
def test_inverse_cdf_across_blocks_and_a_ragged_last_block(flat_max, monkeypatch):
    """A vocabulary that is not a multiple of the 512-id search block, mass on both sides
    of block boundaries and on the very last id; fp64 draws at 0 and just below 1. Both
    searches: the two-level one (the target's vocabulary) and the single running sum
    (draft vocabularies up to 65,536 ids)."""
    from dspark import sampling
    from dspark.sampling import inverse_cdf

    monkeypatch.setattr(sampling, "_CDF_FLAT_MAX", flat_max)

    V = 1301  # blocks of 512: the last one is padded
    w = torch.zeros(V)
    w[[5, 511, 512, 1023, 1300]] = torch.tensor([1.0, 2.0, 3.0, 0.5, 3.5])
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = inverse_cdf(w.repeat(len(u), 1), u)
    assert set(ids.unique().tolist()) <= {5, 511, 512, 1023, 1300}
    freq = torch.bincount(ids, minlength=V)[[5, 511, 512, 1023, 1300]].double() / len(ids)
    torch.testing.assert_close(freq, (w[[5, 511, 512, 1023, 1300]] / 10).double(), atol=0.006, rtol=0)
    edge = inverse_cdf(w.repeat(3, 1), torch.tensor([0.0, 0.3, 1 - 2**-53], dtype=torch.float64))
    assert edge.tolist() == [5, 512, 1300]
    tail = w.clone()
    tail[1300] = 0.0  # zero weights after the last positive one: a draw just below 1 stays on it
    assert inverse_cdf(tail.repeat(2, 1), torch.tensor([1 - 2**-53, 0.999999], dtype=torch.float64)).tolist() == [1023, 1023]
    with pytest.raises(ValueError, match="inverse_cdf"):
        inverse_cdf(w.repeat(3, 1), torch.zeros(2))
