"""Training stages 1-2: prompt files, held-out split, loss masks, resumable regeneration."""

from __future__ import annotations

import json

import pytest

from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams
from dspark.target import Target
from tests.tiny import tiny_gemma3
import torch

from dspark.generate import ar_generate
from train.data import DataError, build_example, check_loss_masks, interleave_domains, read_prompts, split_heldout
from train.regenerate import ResponsesError, load_shipped, read_done, regenerate, sample_batch, target_fingerprint, write_meta


class CharTokenizer:
    """One id per ASCII character; id 1 is EOS."""

    chat_template = None
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 32))


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_prompts_and_errors(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"turns": ["a?"], "reference": "b"}, {"turns": ["c?"]}, {"turns": ["a?"]}, ""])
    ds = read_prompts(p)
    assert len(ds) == 2 and ds[0]["reference"] == "b" and ds[1]["reference"] is None  # duplicate dropped
    bad = write(tmp_path / "bad.jsonl", [{"turns": ["ok"]}, '{"turns": ["x"]', {"turns": ["y"]}])
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        read_prompts(bad)
    with pytest.raises(DataError, match=":1: expected an object with 'turns'"):
        read_prompts(write(tmp_path / "t.jsonl", [{"turns": []}]))
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")


def test_heldout_split_is_deterministic_and_disjoint(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"turns": [f"q{i}"]} for i in range(200)])
    tr, ho = split_heldout(read_prompts(p), 0.1)
    tr2, ho2 = split_heldout(read_prompts(p), 0.1)
    assert set(ho["id"]) == set(ho2["id"]) and not set(tr["id"]) & set(ho["id"])
    assert len(tr) + len(ho) == 200 and 5 <= len(ho) <= 40


def char_target():
    t = tiny_gemma3(vocab=128)
    return Target(t.model, CharTokenizer(), name="tiny-char")


def test_examples_and_loss_mask_checks():
    t = char_target()
    ex = build_example(t, "x", ["hi?"], "yes", max_length=64)
    prompt_len = len("Question: hi?\nAnswer:")
    assert ex.loss_mask == [0] * prompt_len + [1] * 4 and ex.input_ids[-1] == 1  # response + EOS
    assert build_example(t, "x", ["hi?"], "yes", max_length=prompt_len) is None  # truncated away
    assert check_loss_masks([ex]) == (4, prompt_len + 4)
    ex.loss_mask = [1] * len(ex.loss_mask)
    with pytest.raises(DataError, match="all ones"):
        check_loss_masks([ex])
    ex.loss_mask = [0] * len(ex.loss_mask)
    with pytest.raises(DataError, match="all zeros"):
        check_loss_masks([ex])


def test_regeneration_resumes_after_interruption(tmp_path):
    t = char_target()
    rows = [{"id": f"{i:016x}", "turns": [f"q{i}?" * (i + 1)]} for i in range(5)]
    full = regenerate(t, rows, tmp_path / "a.jsonl", 6, temperature=1.0, seed=3, batch_size=2, progress=False)
    assert len(full) == 5 and len(read_done(tmp_path / "a.jsonl")) == 5
    assert all(len(r.response_ids) >= 1 and r.finish in ("stop", "length") for r in full.values())
    # an interrupted run: two results written (out of order), then a torn line
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text(lines[3] + "\n" + lines[0] + "\n" + lines[1][:10])
    resumed = regenerate(t, rows, tmp_path / "b.jsonl", 6, temperature=1.0, seed=3, batch_size=3, progress=False)
    # per-id seeds: same answers whatever the batching and resume point
    assert {k: v.response_ids for k, v in resumed.items()} == {k: v.response_ids for k, v in full.items()}
    assert len(read_done(tmp_path / "b.jsonl")) == 5


def test_batched_sampling_greedy_equals_incremental_decoding():
    """Left padding, positions and the sliding window (8) are right: fp32 greedy samples of
    prompts of very different lengths equal plain one-request decoding, past the window."""
    t = tiny_gemma3(vocab=64, sliding_window=8, init_std=0.5)
    prompts = [[5, 6, 7], list(range(3, 25)), [9] * 11, [4]]
    got = sample_batch(t, prompts, [torch.Generator() for _ in prompts], 20, 0.0, stops=set())
    for p, (ids, finish) in zip(prompts, got):
        ref = ar_generate(t, p, GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=0.0), stop_token_ids=[]))
        assert ids == ref.tokens and finish == "length"


def test_batched_sampling_matches_the_target_distribution():
    """Inverse-CDF draws in a padded batch follow the target's softmax (chi-square), also
    at T != 1; a sampler that ignored the temperature fails."""
    from scipy.stats import chisquare

    t = tiny_gemma3(vocab=16, init_std=0.1)  # a spread distribution: every id has expected count >= 5
    prompts = [[3, 4, 5]] * 400 + [[7] * 9] * 400  # two prompt lengths share each batch
    for temp in (1.0, 0.7):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        firsts: list[int] = []
        for i in range(0, len(prompts), 200):
            firsts += [ids[0] for ids, _ in sample_batch(t, prompts[i : i + 200], gens[i : i + 200], 1, temp, set())]
        for p, chunk in (([3, 4, 5], firsts[:400]), ([7] * 9, firsts[400:])):
            logits = t.forward(torch.tensor([p]), logits="last").logits[0, -1]
            probs = torch.softmax(logits / temp, -1)
            obs = torch.bincount(torch.tensor(chunk), minlength=16).float()
            keep = probs * len(chunk) >= 5  # chi-square needs expected counts >= 5: pool the rest
            exp_c = torch.cat([probs[keep] * len(chunk), (probs[~keep].sum() * len(chunk))[None]])
            obs_c = torch.cat([obs[keep], obs[~keep].sum()[None]])
            if exp_c[-1] < 1e-9:
                exp_c, obs_c = exp_c[:-1], obs_c[:-1]
            assert len(exp_c) >= 10  # enough categories for the test to mean something
            assert chisquare(obs_c.numpy(), exp_c.numpy() * obs_c.sum().item() / exp_c.sum().item()).pvalue > 1e-3


def test_shipped_responses_are_refused_for_another_target(tmp_path):
    t = char_target()
    rows = [{"id": f"{i:016x}", "turns": [f"q{i}?"]} for i in range(3)]
    path = tmp_path / "r.jsonl"
    regenerate(t, rows, path, 4, progress=False)
    with pytest.raises(ResponsesError, match="no provenance file"):
        load_shipped(path, t)
    write_meta(path, {"target": t.name, "target_fingerprint": target_fingerprint(t), "temperature": 1.0})
    recs, meta = load_shipped(path, t, temperature=1.0)
    assert len(recs) == 3 and meta["temperature"] == 1.0
    with pytest.raises(ResponsesError, match="sampled at T=1.0"):
        load_shipped(path, t, temperature=0.0)
    other = Target(tiny_gemma3(vocab=128, seed=1).model, CharTokenizer(), name="other")
    with pytest.raises(ResponsesError, match="not from this target 'other'"):
        load_shipped(path, other)


def test_fingerprint_ignores_dtype_but_not_weights():
    a = tiny_gemma3(vocab=64)
    assert target_fingerprint(a) == target_fingerprint(Target(tiny_gemma3(vocab=64).model.to(torch.bfloat16)))
    assert target_fingerprint(a) != target_fingerprint(tiny_gemma3(vocab=64, seed=1))


def test_domains_are_interleaved_deterministically():
    rows = [{"id": f"{i:04x}", "domain": d} for i, d in enumerate(["math"] * 10 + ["code"] * 4 + ["chat"] * 2)]
    out = interleave_domains(rows, salt="0")
    assert [r["domain"] for r in out[:6]] == ["chat", "code", "math"] * 2
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    assert out == interleave_domains(list(reversed(rows)), salt="0")
    assert [r["id"] for r in out] != [r["id"] for r in interleave_domains(rows, salt="1")]


def test_build_example_keeps_sampled_ids():
    t = char_target()
    ex = build_example(t, "x", ["hi?"], "ignored", max_length=64, response_ids=[70, 71, 1])
    assert ex.input_ids[-3:] == [70, 71, 1] and sum(ex.loss_mask) == 3
