"""Training stages 1-2: prompt files, held-out split, loss masks, resumable regeneration."""

from __future__ import annotations

import json

import pytest

from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams
from dspark.target import Target
from tests.tiny import tiny_gemma3
from train.data import DataError, build_example, check_loss_masks, read_prompts, split_heldout
from train.regenerate import read_done, regenerate


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
    rows = [{"id": f"{i:016x}", "turns": [f"q{i}?"]} for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingParams(temperature=1.0), stop_token_ids=[1], seed=3)
    full = regenerate(t, rows, tmp_path / "a.jsonl", cfg, batch_size=2, progress=False)
    assert len(full) == 5 and len(read_done(tmp_path / "a.jsonl")) == 5
    # an interrupted run: two results written (out of order), then a torn line
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text(lines[3] + "\n" + lines[0] + "\n" + lines[1][:10])
    resumed = regenerate(t, rows, tmp_path / "b.jsonl", cfg, batch_size=3, progress=False)
    assert resumed == full  # per-id seeds: same answers whatever the batching and resume point
    assert len(read_done(tmp_path / "b.jsonl")) == 5
