"""Draft cost per round for each drafter on the real target, measured inside the engine.

    python tools/bench_drafters.py --context 512 --gamma 7 --rounds 20

Each drafter runs in a real :class:`SpeculativeEngine` decode of one request whose prompt
is ``--context`` tokens long: the engine's own calls are timed, round by round, so the
numbers are what the engine pays (drafter dtype, per-request generators, feature hand-off,
draft vocabulary scatter). Columns: ``propose`` (the drafter), ``target forward`` (the
verify forward over anchor + drafts) and the whole round (draft + forward + rejection
sampling + commit). Untrained weights with a non-zero Markov/RNN head (cost does not
depend on the values); a round's draft length is the full gamma whatever is accepted.
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
from dspark.drafters import DraftVocab, build_drafter, load_drafter
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


def time_engine(t: Target, drafter, ids: list[int], args, params) -> tuple[float, float, float, int]:
    """Median ms per round of (propose, target forward, whole round) over ``args.rounds``
    rounds of a real engine decode after the prompt, and the rounds timed."""
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig

    eng = SpeculativeEngine(t, drafter, num_draft=args.gamma if drafter is not None else 0)
    timed: dict[str, list[float]] = {"propose": [], "score": []}

    def wrap(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def inner(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            timed[key].append(time.perf_counter() - t0)
            return out

        setattr(obj, name, inner)

    if drafter is not None:
        wrap(drafter, "propose", "propose")
    wrap(eng._runner(), "score", "score")
    cfg = GenerationConfig(max_new_tokens=(args.rounds + 3) * (args.gamma + 1), sampling=params, stop_token_ids=[], seed=0)
    eng.add_request(ids[: args.context], cfg)
    eng.step()  # prefill (not timed)
    rounds = []
    while len(rounds) < args.rounds + 2 and eng.has_unfinished():
        t0 = time.perf_counter()
        eng.step()
        rounds.append(time.perf_counter() - t0)
    skip = 2  # warm-up rounds (first context projection, allocator)
    med = lambda xs: statistics.median(xs[skip:]) * 1000 if len(xs) > skip else float("nan")  # noqa: E731
    return med(timed["propose"]) if drafter is not None else 0.0, med(timed["score"]), med(rounds), len(rounds) - skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 where native, else float32 (as training/serving)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--layers", type=int, default=2, help="draft layers for dflash / dspark")
    ap.add_argument("--draft-vocab", type=int, default=16384)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--draft-vocab-only", action="store_true", help="skip the full-vocabulary variants")
    ap.add_argument("--drafters", nargs="*", default=[], metavar="DIR", help="trained drafter directories to time as well")
    ap.add_argument("--trained-only", action="store_true", help="skip the untrained dflash / dspark / eagle3 rows")
    args = ap.parse_args()

    t = Target.load(args.target, dtype=args.dtype)
    ids = context_ids(t, args.context)
    vocab = draft_vocab(t, args.draft_vocab)
    params = SamplingParams(temperature=args.temperature)
    rows = [("none (plain decoding)", "-", *time_engine(t, None, ids, args, params))]
    rows.append(("ngram", "-", *time_engine(t, build_drafter("ngram", num_tokens=args.gamma), ids, args, params)))
    specs = [
        ("dflash", {"num_layers": args.layers, "mask_token_id": 4}),
        ("dspark", {"num_layers": args.layers, "mask_token_id": 4}),
        ("dspark", {"num_layers": args.layers, "mask_token_id": 4, "head": "rnn"}),
        ("eagle3", {}),
    ]
    vocabs = [vocab] if args.draft_vocab_only else [None, vocab]
    for path in args.drafters:
        d = load_drafter(path, t).to(t.dtype)
        own = argparse.Namespace(**{**vars(args), "gamma": d.cfg.gamma})  # a trained drafter drafts its own block
        name = f"{path} ({d.cfg.kind}, {d.cfg.num_layers} layers, trained)"
        vname = "full 262k" if d.vocab.is_full else f"{d.vocab.size // 1024}k"
        rows.append((name, vname, *time_engine(t, d, ids, own, params)))
        print(f"{name} {vname}: {rows[-1][2]:.1f} ms", file=sys.stderr)
        del d
    for kind, kw in ([] if args.trained_only else specs):
        for v in vocabs:
            torch.manual_seed(0)
            d = build_drafter(kind, t, gamma=args.gamma, vocab=v, **kw)
            head = getattr(d, "head", None)
            if head is not None:  # a trained head is non-zero (an all-zero W2 would flatter nothing, but be honest)
                torch.nn.init.normal_(head.w2.weight, std=0.02)
            d = d.to(t.dtype)
            name = kind + ("-rnn" if kw.get("head") == "rnn" else "") + (f" ({args.layers} layers)" if kind != "eagle3" else " (1 layer)")
            vname = "full 262k" if v is None else f"{v.size // 1024}k"
            rows.append((name, vname, *time_engine(t, d, ids, args, params)))
            print(f"{name} {vname}: {rows[-1][2]:.1f} ms", file=sys.stderr)
            del d

    fwd0 = rows[0][3]
    print(f"\n`python tools/bench_drafters.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"{dt.date.today()}, {platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"target {t.name} {t.dtype}, context {args.context}, gamma {args.gamma}, T={args.temperature:g}, "
        f"median of {args.rounds} engine rounds each (batch 1)\n"
    )
    print("| drafter | draft vocab | propose ms / round | target forward ms | round ms | propose / forward | propose / verify step |")
    print("|---|---|---|---|---|---|---|")
    for name, vname, prop, fwd, rnd, _n in rows:
        print(f"| {name} | {vname} | {prop:.1f} | {fwd:.1f} | {rnd:.1f} | {prop / fwd:.2f} | {prop / (rnd - prop):.3f} |")
    print(f"\n(plain decoding's target forward: {fwd0:.1f} ms for 1 token)")


if __name__ == "__main__":
    main()
