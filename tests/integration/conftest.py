from __future__ import annotations

import pytest

from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.target import Target

AR_NEW_TOKENS = 40  # the longest greedy continuation any integration test compares against


@pytest.fixture(scope="session")
def gemma_fp32() -> Target:
    """The real embedded Gemma 3 270M in fp32 (converted on first use, then ~5 s)."""
    return Target.load("gemma3-270m", dtype="float32")


@pytest.fixture(scope="session")
def ar_greedy(gemma_fp32):
    """ar_greedy(prompt_ids, n) -> the first n tokens of the target's fp32 greedy AR output.

    Each prompt is decoded once per session (40 tokens) and shared by the tests that compare
    against it: greedy decoding with a shorter limit yields a prefix of the longer output."""
    cache: dict[tuple[int, ...], list[int]] = {}
    cfg = GenerationConfig(max_new_tokens=AR_NEW_TOKENS, sampling=SamplingParams(temperature=0))

    def get(prompt_ids, n: int) -> list[int]:
        if n > AR_NEW_TOKENS:
            raise ValueError(f"ar_greedy keeps {AR_NEW_TOKENS} tokens per prompt; {n} were asked")
        key = tuple(int(i) for i in prompt_ids)
        if key not in cache:  # the reference: every step through the full fp32 LM head
            with gemma_fp32.screen_mode(False):
                cache[key] = ar_generate(gemma_fp32, list(key), cfg).tokens
        return cache[key][:n]

    return get
