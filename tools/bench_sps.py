"""Steps per second of one target verify forward, vs the tokens it verifies.

    python tools/bench_sps.py                                   # embedded Gemma, this machine
    python tools/bench_sps.py --random-init CONFIG.json --device cuda   # any card, no weights

Two shapes at a fixed context: one request verifying B tokens ([1, B]), and R requests
verifying 8 tokens each in one batched forward ([R, 8]). SPS(B) is what the prefix
scheduler trades acceptance against (DSPARK.md, section 3). Cost does not depend on the
weights, so ``--random-init`` times the real architecture from its config.json alone.
Also checks, on the chosen device, that greedy speculative decoding equals greedy AR
decoding in fp32 (``--identity``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics

import torch

from bench_kernels import timed  # noqa: E402  (tools/ is the script directory)
from dspark.target import Target, resolve_dtype


def load_target(args) -> Target:
    dtype = resolve_dtype(args.dtype, args.device)
    if not args.random_init:
        return Target.load(args.target, dtype=args.dtype, device=args.device)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**json.loads(open(args.random_init).read()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return Target(model.to(args.device), name=f"random-init:{cfg.model_type}")


def sps_table(t: Target, args) -> None:
    cuda = t.device.type == "cuda"
    V = t.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prefilled(rows: int):
        cache = t.new_cache()
        t.forward(torch.randint(0, V, (rows, args.context), generator=gen), cache, logits="none")
        t.rollback(cache, 0)
        return cache

    print(f"\n{t.name}, {t.dtype}, context {args.context}, {torch.cuda.get_device_name() if cuda else 'CPU'}\n")
    print("| shape | verify tokens | ms / forward | SPS | tokens/s if all accepted |")
    print("|---|---|---|---|---|")
    cache = prefilled(1)
    for b in args.tokens:
        block = torch.randint(0, V, (1, b), generator=gen)

        def step(block=block):
            t.forward(block, cache, logits="all")
            t.rollback(cache, block.shape[1])

        ms = timed(step, args.reps, cuda)
        print(f"| [1, {b}] | {b} | {ms:.2f} | {1000 / ms:.1f} | {b * 1000 / ms:.0f} |")
    for r in args.rows:
        cache_r = prefilled(r)
        block = torch.randint(0, V, (r, 8), generator=gen)

        def step_r(block=block, cache_r=cache_r):
            t.forward(block, cache_r, logits="all")
            t.rollback(cache_r, block.shape[1])

        ms = timed(step_r, args.reps, cuda)
        print(f"| [{r}, 8] | {8 * r} | {ms:.2f} | {1000 / ms:.1f} | {8 * r * 1000 / ms:.0f} |")
        del cache_r
        if cuda:
            torch.cuda.empty_cache()


def identity(t: Target, args) -> None:
    from dspark.drafters import build_drafter
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig, ar_generate
    from dspark.sampling import SamplingParams

    t.model.float()
    V = t.vocab_size
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, V, (40,), generator=gen).tolist()
    prompts = [base * 3, (base[:10] * 8)[:60], torch.randint(0, V, (300,), generator=gen).tolist()]
    cfg = GenerationConfig(max_new_tokens=48, sampling=SamplingParams(temperature=0.0), stop_token_ids=[])
    ref = [ar_generate(t, p, cfg).tokens for p in prompts]
    for name, kw in (("ngram", {}), ("dspark", {}), ("dflash", {})):
        try:
            drafter = build_drafter(name, t, **kw) if name != "ngram" else build_drafter(name)
            if hasattr(drafter, "to"):
                drafter.to(t.device)
            eng = SpeculativeEngine(t, drafter, num_draft=7)
            out = eng.generate(prompts, cfg)
            same = sum(o.tokens == r for o, r in zip(out, ref))
            tau = statistics.mean(o.stats.tau for o in out)
            print(f"fp32 greedy identity on {t.device}: {name}: {same}/{len(prompts)} identical to AR (tau {tau:.2f})")
        except Exception as e:  # report and go on: this is a device smoke check
            print(f"fp32 greedy identity on {t.device}: {name}: FAILED with {type(e).__name__}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--random-init", default=None, metavar="CONFIG_JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (as the server): bfloat16 where native, else float32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--identity", action="store_true", help="also run the fp32 greedy identity check")
    args = ap.parse_args()
    print(f"`python tools/bench_sps.py {' '.join(__import__('sys').argv[1:])}` ({dt.date.today()}, torch {torch.__version__})")
    t = load_target(args)
    with torch.inference_mode():
        sps_table(t, args)
    if args.identity:
        identity(t, args)


if __name__ == "__main__":
    main()
