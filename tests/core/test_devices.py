"""The decoding loops on every device present (issue #11 defect 4: seeded sampling drew
from a CPU generator, which fails against a CUDA target). On a CPU-only machine these run
on CPU; on a CUDA host (`tools/gpu_checks.sh`) the same tests run on the GPU too."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import NgramDrafter, build_drafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate, speculative_generate_reference
from dspark.sampling import SamplingParams
from tests.drafters_for_tests import RandomDrafter
from tests.tiny import tiny_gemma3

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10, 11]]


def _target(device: str):
    t = tiny_gemma3(vocab=64, sliding_window=8, init_std=0.15, seed=1)
    t.model.to(device)
    assert t.device.type == device
    return t


def _dspark(t):
    torch.manual_seed(0)
    d = build_drafter("dspark", t, gamma=3, feature_layers=[0, 1], num_layers=1, mask_token_id=3, rank=16)
    return d.to(t.device).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_runs_and_repeats_on_the_targets_device(device):
    t = _target(device)
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, top_k=20), stop_token_ids=[], seed=4)
    a = ar_generate(t, PROMPTS[0], cfg).tokens
    assert a == ar_generate(t, PROMPTS[0], cfg).tokens and len(a) == 20
    r = speculative_generate_reference(t, RandomDrafter(64, k=3, seed=0), PROMPTS[0], cfg, num_draft=3).tokens
    assert r == speculative_generate_reference(t, RandomDrafter(64, k=3, seed=0), PROMPTS[0], cfg, num_draft=3).tokens
    for make in (lambda: RandomDrafter(64, k=3, seed=0), lambda: NgramDrafter(num_tokens=3), lambda: _dspark(t)):
        runs = [[x.tokens for x in SpeculativeEngine(t, make(), num_draft=3).generate(PROMPTS, cfg)] for _ in range(2)]
        assert runs[0] == runs[1] and all(len(x) == 20 for x in runs[0])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_identity_on_the_targets_device(device):
    t = _target(device)
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0), stop_token_ids=[])
    ar = [ar_generate(t, p, cfg).tokens for p in PROMPTS]
    for make in (lambda: NgramDrafter(num_tokens=3), lambda: _dspark(t)):
        assert [x.tokens for x in SpeculativeEngine(t, make(), num_draft=3).generate(PROMPTS, cfg)] == ar
