"""T = 1 rounds of a trained drafter with the screened verification of sampled drafts on and
off (`SpeculativeEngine.screen_verify` 2 / 0), interleaved, then our AR loop on the same
prompts (docs/benchmarks.md, "Decode speed after oneDNN few-row products ...").

    python tools/profile_t1_round.py outputs/exp_rand100/drafter
    python tools/profile_t1_round.py outputs/exp_rand100/drafter --cprofile   # where a round's time goes

Three prompts (first turns of gsm8k, mt-bench, humaneval), 64 new tokens, gamma 7, seed 0,
embedded Gemma in fp32. Prints tokens/s, ms per round and tau per setting. `--cprofile`:
the AR loop's tokens/s on the first two prompts, then a cProfile of the engine (default
settings) generating them, top 45 functions by cumulative time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from dspark.benchmarks import load_first_turns
from dspark.drafters import load_drafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.target import Target


def profiled(t: Target, eng: SpeculativeEngine, prompts: list[list[int]], cfg: GenerationConfig) -> None:
    eng.generate([prompts[0][:40]], GenerationConfig(max_new_tokens=16, sampling=SamplingParams(1.0), seed=0))
    s = time.perf_counter()
    n = 0
    for p in prompts:
        n += len(ar_generate(t, p, cfg).tokens)
    print("AR tok/s", n / (time.perf_counter() - s))
    pr = cProfile.Profile()
    pr.enable()
    s = time.perf_counter()
    n, taus = 0, []
    for p in prompts:
        r = eng.generate([p], cfg)[0]
        n += len(r.tokens)
        taus.append(1 + sum(r.stats.accepted) / max(len(r.stats.accepted), 1))
    el = time.perf_counter() - s
    pr.disable()
    print("spec tok/s", n / el, "tau per prompt", taus)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(45)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cprofile"]
    if len(args) != 1:
        sys.exit(__doc__)
    t = Target.load("gemma3-270m", dtype="float32")
    d = load_drafter(args[0], t)
    eng = SpeculativeEngine(t, d, 7)
    prompts = [t.encode_prompt(p) for b in ("gsm8k", "mt-bench", "humaneval") for p in load_first_turns(b, 1)]
    cfg = GenerationConfig(max_new_tokens=64, sampling=SamplingParams(temperature=1.0), seed=0)
    ar_generate(t, prompts[0][:32], GenerationConfig(max_new_tokens=8, sampling=SamplingParams(1.0), seed=0))
    if "--cprofile" in sys.argv:
        profiled(t, eng, prompts[:2], cfg)
        return
    for sv in (2, 0, 2, 0):
        eng.screen_verify = sv
        eng.generate([prompts[0][:40]], GenerationConfig(max_new_tokens=16, sampling=SamplingParams(1.0), seed=0))
        s = time.perf_counter()
        n, acc = 0, []
        for p in prompts:
            r = eng.generate([p], cfg)[0]
            n += len(r.tokens)
            acc += r.stats.accepted
        el = time.perf_counter() - s
        print(f"screen_verify={sv}: {n / el:.2f} tok/s, {1e3 * el / len(acc):.0f} ms/round, tau {1 + sum(acc) / len(acc):.2f}", flush=True)
    s = time.perf_counter()
    n = 0
    for p in prompts:
        n += len(ar_generate(t, p, cfg).tokens)
    print("AR tok/s", n / (time.perf_counter() - s))


if __name__ == "__main__":
    main()
