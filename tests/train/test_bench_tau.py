"""Teacher-forced tau_est on the benchmarks' prompts (train.bench_tau)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark.drafters import build_drafter
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from tests.train.test_data import char_target
from train.bench_tau import bench_tau_est, paired_difference, target_continuations

BENCHES = ["gsm8k", "mt-bench"]


@pytest.fixture(scope="module")
def target():
    return char_target()


def drafter(target, seed):
    torch.manual_seed(seed)
    d = build_drafter("dspark", target, gamma=3, feature_layers=[0, 1], num_layers=1, mask_token_id=3, rank=8)
    with torch.no_grad():  # zero-init heads would make every drafter alike
        for p in d.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return d


def test_continuations_are_the_targets_own_samples_kept_on_disk(target, tmp_path, monkeypatch):
    conts = target_continuations(target, BENCHES, 3, 10, tmp_path, seed=5, batch_size=2, progress=False, fingerprint="fp")
    assert set(conts) == set(BENCHES) and all(len(v) == 3 for v in conts.values())
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["meta"]["seed"] == 5
    # prompt i is seeded seed + i: the same tokens plain AR sampling gives
    for i, c in enumerate(conts["gsm8k"]):
        cfg = GenerationConfig(max_new_tokens=10, sampling=SamplingParams(temperature=1.0), seed=5 + i)
        assert c["response_ids"] == ar_generate(target, c["prompt_ids"], cfg).tokens
    import dspark.engine

    monkeypatch.setattr(dspark.engine, "SpeculativeEngine", None)  # a second call must not sample again
    assert target_continuations(target, BENCHES, 3, 10, tmp_path, seed=5, batch_size=2, progress=False, fingerprint="fp") == conts
    monkeypatch.undo()
    other = target_continuations(target, BENCHES, 3, 10, tmp_path, seed=6, batch_size=3, progress=False, fingerprint="fp")
    assert other != conts and len(list(tmp_path.glob("*.json"))) == 2  # another seed: another file
    target_continuations(target, BENCHES, 3, 10, tmp_path, seed=5, progress=False, fingerprint="other-target")
    assert len(list(tmp_path.glob("*.json"))) == 3  # another target: never the first target's text
    with pytest.raises(ValueError, match="prompts_per_benchmark"):
        target_continuations(target, BENCHES, 0, 10, tmp_path, progress=False, fingerprint="fp")


def test_drafters_scored_on_the_same_text_pair_prompt_by_prompt(target, tmp_path):
    conts = target_continuations(target, BENCHES, 4, 16, tmp_path, seed=0, batch_size=4, progress=False, fingerprint="fp")
    a, b = drafter(target, 0), drafter(target, 1)
    ra = bench_tau_est(target, a, "dspark", conts, progress=False)
    assert bench_tau_est(target, a, "dspark", conts, progress=False) == ra  # deterministic
    rb = bench_tau_est(target, b, "dspark", conts, progress=False)
    for r in (ra, rb):
        for bench in BENCHES:
            assert len(r[bench]["per_prompt"]) == 4 and all(1.0 <= v <= 4.0 for v in r[bench]["per_prompt"])
            assert math.isclose(r[bench]["tau_est"], sum(r[bench]["per_prompt"]) / 4)
        assert math.isclose(r["macro"]["tau_est"], sum(r[x]["tau_est"] for x in BENCHES) / 2) and r["macro"]["se"] > 0
    assert ra != rb
    assert paired_difference(ra, ra, BENCHES) == (0.0, 0.0)
    diff, se = paired_difference(ra, rb, BENCHES)
    assert math.isclose(diff, ra["macro"]["tau_est"] - rb["macro"]["tau_est"]) and se > 0
    assert next(a.parameters()).dtype == torch.float32


def test_paired_difference_is_the_standard_error_of_the_mean_difference():
    a = {"x": {"per_prompt": [1.5, 1.7, 1.2]}, "y": {"per_prompt": [2.0, 2.2]}, "macro": {"tau_est": 1.9}}
    b = {"x": {"per_prompt": [1.4, 1.5, 1.2]}, "y": {"per_prompt": [1.9, 2.0]}, "macro": {"tau_est": 1.8}}
    dx, dy = [0.1, 0.2, 0.0], [0.1, 0.2]
    var = lambda d: sum((v - sum(d) / len(d)) ** 2 for v in d) / (len(d) * (len(d) - 1))  # noqa: E731
    diff, se = paired_difference(a, b, ["x", "y"])
    assert math.isclose(diff, 0.1) and math.isclose(se, math.sqrt(var(dx) + var(dy)) / 2)
    b["y"]["per_prompt"] = [1.9]  # prompt counts differ: not paired
    assert paired_difference(a, b, ["x", "y"])[1] is None
