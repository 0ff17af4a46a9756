"""Does the draft vocabulary cap acceptance? Coverage of the target's own tokens.

    python tools/vocab_coverage.py [--experiment gemma_dspark] [--sizes 8192 16384 32768]
                                   [--prompts-per-benchmark 4] [--max-new-tokens 96]

A drafter with a K-token draft vocabulary gives probability 0 to every other token, so the
mass the target puts outside it is acceptance no training can recover: at every draft
position, P(accept) <= sum over the vocabulary of min(p_target, p_draft) <= p_target(vocabulary).
The fraction of tokens the target *samples* that fall inside the vocabulary is an unbiased
estimate of that mass. This tool builds the vocabulary the pipeline would build (the K most
frequent ids over the training examples, EOS always in; `train.pipeline._new_module`) for
several K and reports that fraction on (a) the held-out prompts' on-policy responses (the
training distribution) and (b) fresh T = 1 samples of the target on the first prompts of
each benchmark (the evaluation distribution; measured, never used to choose anything).
With --all-text it also shows a vocabulary counted over every training prompt, reference
answer and shipped response (held-out rows excluded) instead of the examples only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="gemma_dspark")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (e.g. data.max_prompts=900)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--prompts-per-benchmark", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--all-text", action="store_true", help="also count every training prompt, reference and response")
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dspark.benchmarks import BENCHMARKS, load_first_turns
    from dspark.drafters.vocab import DraftVocab, count_tokens
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig
    from dspark.prompts import PromptFormat
    from dspark.sampling import SamplingParams
    from dspark.target import Target
    from train.config import repo_path
    from train.data import read_prompts
    from train.pipeline import _examples, _prompts_and_responses

    torch.set_grad_enabled(False)
    with initialize_config_dir(config_dir=str(repo_path("conf")), version_base=None):
        cfg = compose("config", overrides=[f"experiment={args.experiment}", *args.overrides])
    tc = cfg.target
    target = Target.load(tc.path, dtype=tc.dtype, prompt_format=PromptFormat(**OmegaConf.to_container(tc.prompt_format, resolve=True)))
    V = target.vocab_size
    train_rows, held_rows, responses = _prompts_and_responses(cfg, target, repo_path(cfg.output_dir))
    examples = _examples(target, train_rows, responses, cfg.data.max_length)
    counts = {"examples": count_tokens((e.input_ids for e in examples), V)}
    held_ids = {r["id"] for r in held_rows}
    if args.all_text:
        texts = [" ".join(r["turns"]) + " " + (r.get("reference") or "") for r in read_prompts(repo_path(cfg.data.train_file)) if r["id"] not in held_ids]
        extra = count_tokens(target.tokenizer(texts, add_special_tokens=False)["input_ids"], V)
        resp = [r.response_ids for k, r in responses.items() if k not in held_ids and getattr(r, "response_ids", None) is not None]
        counts["all training text"] = counts["examples"] + extra + count_tokens(resp, V)

    held = [responses[r["id"]].response_ids for r in held_rows if getattr(responses.get(r["id"]), "response_ids", None) is not None]
    t0 = time.perf_counter()
    engine = SpeculativeEngine(target, None, num_draft=1)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(temperature=1.0))
    bench: dict[str, list[list[int]]] = {}
    for b in BENCHMARKS:
        rids = [engine.add_request(target.encode_prompt(p), gen, seed=i) for i, p in enumerate(load_first_turns(b, args.prompts_per_benchmark))]
        while any(engine.finish_reason(r) is None for r in rids):
            engine.step()
        bench[b] = [engine.pop_result(r).tokens for r in rids]
    gen_s = time.perf_counter() - t0

    def inside(seqs: list[list[int]], mask: torch.Tensor) -> tuple[float, int]:
        c = count_tokens(seqs, V)
        return float(c[mask].sum()) / max(int(c.sum()), 1), int(c.sum())

    all_bench = [s for v in bench.values() for s in v]
    n_held, n_bench = inside(held, torch.ones(V, dtype=torch.bool))[1], inside(all_bench, torch.ones(V, dtype=torch.bool))[1]
    print(f"# {dt.date.today()} {platform.processor() or platform.machine()}, target {target.name} {target.dtype}; "
          f"{len(examples)} training examples; held-out on-policy text: {len(held)} responses, {n_held} tokens; "
          f"benchmark samples: {args.prompts_per_benchmark} prompts x {len(BENCHMARKS)}, T=1, {n_bench} tokens ({gen_s:.0f} s)")
    print("| counted over | distinct ids | K | held-out on-policy | benchmarks (all) | " + " | ".join(BENCHMARKS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(BENCHMARKS))
    for name, c in counts.items():
        for k in args.sizes:
            vocab = DraftVocab.from_counts(c, k, always=target.eos_token_ids)
            mask = torch.zeros(V, dtype=torch.bool)
            mask[vocab.ids] = True
            per = [inside(bench[b], mask)[0] for b in BENCHMARKS]
            print(f"| {name} | {int((c > 0).sum())} | {k} | {inside(held, mask)[0]:.3f} | {inside(all_bench, mask)[0]:.3f} | "
                  + " | ".join(f"{x:.3f}" for x in per) + " |")


if __name__ == "__main__":
    main()
