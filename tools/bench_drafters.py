"""Draft cost per round for each drafter on the real target, next to one verify step.

    python tools/bench_drafters.py --context 512 --gamma 7 --rounds 20

Steady state of a decode: the drafter already holds a 512-token context; each timed
round commits 1-3 new tokens (their real target features) and proposes gamma tokens.
The verify step is one target forward of gamma + 1 tokens at the same context, with
KV rollback. Untrained weights: cost does not depend on what the weights are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time

import torch

from dspark.benchmarks import load_first_turns
from dspark.drafters import DraftVocab, build_drafter
from dspark.drafters.base import DraftState
from dspark.drafters.vocab import count_tokens
from dspark.sampling import SamplingParams
from dspark.target import Target


def context_ids(t: Target, n: int) -> list[int]:
    ids: list[int] = []
    for text in load_first_turns("livecodebench", 20):
        ids += t.encode_prompt(text)
        if len(ids) >= n + 64:
            break
    return ids[: n + 64]


def draft_vocab(t: Target, size: int) -> DraftVocab:
    import json

    from dspark.benchmarks import data_dir

    with open(data_dir() / "train" / "prompts.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(2000), f)]
    seqs = [t.tokenizer(r["turns"][0] + " " + r["reference"])["input_ids"] for r in rows]
    return DraftVocab.from_counts(count_tokens(seqs, t.vocab_size), size, always=t.eos_token_ids)


def time_drafter(drafter, t: Target, ids: list[int], feats: torch.Tensor, args, params) -> float:
    n0 = args.context
    gen = torch.Generator().manual_seed(0)
    needs = getattr(drafter, "feature_layers", None)
    state = DraftState([ids[: n0 + 1]], [0], args.gamma, params, gen, [feats[:n0]] if needs else None)
    drafter.propose(state)  # builds the context cache (not timed)
    pos, times = n0, []
    steps = [1, 2, 3]
    for r in range(args.rounds):
        step = steps[r % 3]
        new = feats[pos : pos + step] if needs else None
        pos += step
        state = DraftState([ids[: pos + 1]], [0], args.gamma, params, gen, [new] if needs else None)
        t0 = time.perf_counter()
        drafter.propose(state)
        times.append(time.perf_counter() - t0)
    drafter.release([0])
    return statistics.median(times) * 1000


def time_verify(t: Target, ids: list[int], args) -> float:
    cache = t.new_cache()
    t.forward(torch.tensor([ids[: args.context]]), cache, logits="last")
    t.rollback(cache, 0)
    block = torch.tensor([ids[args.context : args.context + args.gamma + 1]])
    times = []
    for _ in range(args.rounds + 2):
        t0 = time.perf_counter()
        t.forward(block, cache)
        t.rollback(cache, block.shape[1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2, help="draft layers for dflash / dspark")
    ap.add_argument("--draft-vocab", type=int, default=32768)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()

    t = Target.load(args.target, dtype=args.dtype)
    ids = context_ids(t, args.context)
    vocab = draft_vocab(t, args.draft_vocab)
    params = SamplingParams(temperature=args.temperature)
    verify_ms = time_verify(t, ids, args)
    rows = [("ngram", "-", time_drafter(build_drafter("ngram", num_tokens=args.gamma), t, ids, None, args, params))]
    layer_feats: dict[tuple[int, ...], torch.Tensor] = {}
    specs = [
        ("dflash", {"num_layers": args.layers, "mask_token_id": 4}),
        ("dspark", {"num_layers": args.layers, "mask_token_id": 4}),
        ("dspark", {"num_layers": args.layers, "mask_token_id": 4, "head": "rnn"}),
        ("eagle3", {}),
    ]
    for kind, kw in specs:
        for v in (None, vocab):
            torch.manual_seed(0)
            d = build_drafter(kind, t, gamma=args.gamma, vocab=v, **kw).to(t.dtype)
            key = tuple(d.feature_layers)
            if key not in layer_feats:
                out = t.forward(torch.tensor([ids]), taps=d.feature_layers, logits="none")
                layer_feats[key] = torch.cat([out.taps[i] for i in d.feature_layers], -1)[0]
            name = kind + ("-rnn" if kw.get("head") == "rnn" else "") + (f" ({args.layers} layers)" if kind != "eagle3" else " (1 layer)")
            vname = "full 262k" if v is None else f"{v.size // 1024}k"
            rows.append((name, vname, time_drafter(d, t, ids, layer_feats[key], args, params)))
            print(f"{name} {vname}: {rows[-1][2]:.1f} ms", file=sys.stderr)
            del d

    print(f"\n`python tools/bench_drafters.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"{dt.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"target {t.name} {args.dtype}, context {args.context}, gamma {args.gamma}, T={args.temperature:g}, "
        f"median of {args.rounds} rounds\n"
    )
    print("| drafter | draft vocab | draft ms / round | vs one verify step |")
    print("|---|---|---|---|")
    print(f"| target verify step ({args.gamma + 1} tokens) | - | {verify_ms:.1f} | 1.00x |")
    for name, vname, ms in rows:
        print(f"| {name} | {vname} | {ms:.2f} | {ms / verify_ms:.2f}x |")


if __name__ == "__main__":
    main()
