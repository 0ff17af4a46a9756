"""Every trained-model drafter, untrained, through the real engine on the real Gemma
3 270M in fp32: greedy output identical to autoregressive greedy, also past the
512-token sliding window, with the full and a 32k draft vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.benchmarks import data_dir, load_first_turns
from dspark.drafters import DraftVocab, build_drafter
from dspark.drafters.vocab import count_tokens
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams

pytestmark = pytest.mark.slow
NEW = 24
CFG = GenerationConfig(max_new_tokens=NEW, sampling=SamplingParams(temperature=0))


@pytest.fixture(scope="module")
def cases(gemma_fp32, ar_greedy):
    t = gemma_fp32
    texts = load_first_turns("gsm8k", 1) + load_first_turns("humaneval", 1) + load_first_turns("livecodebench", 1, start=2)
    ids = [t.encode_prompt(x) for x in texts]
    assert len(ids[-1]) + NEW > 512
    return [(p, ar_greedy(p, NEW)) for p in ids]


@pytest.fixture(scope="module")
def vocab32k(gemma_fp32):
    t = gemma_fp32
    with open(data_dir() / "train" / "prompts.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(400), f)]
    seqs = [t.tokenizer(r["turns"][0] + " " + r["reference"])["input_ids"] for r in rows]
    return DraftVocab.from_counts(count_tokens(seqs, t.vocab_size), 32768, always=t.eos_token_ids)


@pytest.mark.parametrize(
    "kind,kw,small_vocab",
    [("dflash", {}, False), ("dspark", {}, True), ("dspark", {"head": "rnn"}, True), ("eagle3", {}, True)],
    ids=["dflash", "dspark-32k", "dspark-rnn-32k", "eagle3-32k"],
)
def test_untrained_drafter_keeps_greedy_identity(gemma_fp32, cases, vocab32k, kind, kw, small_vocab):
    t = gemma_fp32
    torch.manual_seed(0)
    extra = {} if kind == "eagle3" else {"num_layers": 1, "mask_token_id": 4}
    drafter = build_drafter(kind, t, gamma=7, vocab=vocab32k if small_vocab else None, **extra, **kw)
    engine = SpeculativeEngine(t, drafter, num_draft=7)
    for prompt, want in cases:
        assert engine.generate([prompt], CFG)[0].tokens == want
