"""Realized tau on held-out *training-distribution* prompts next to the teacher-forced tau_est.

    python tools/heldout_decode.py outputs/gemma_dspark/drafter [--prompts 25] [--experiment gemma_dspark]

The pipeline logs a teacher-forced acceptance estimate (tau_est) on held-out prompts; the
benchmarks measure tau with the real decoding loop on other prompts. When the two disagree,
this tool tells which side the gap is on: it decodes the same held-out prompts the pipeline
holds out (same split, same on-policy responses) with the engine (batched, gamma from the
drafter, seeded per prompt), and computes tau_est on their on-policy responses. Equal values
mean training and inference see the same drafter; a benchmark tau below both is then a
difference between the training prompts and the benchmarks' prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafter", help="a trained drafter directory (outputs/<run>/drafter)")
    ap.add_argument("--experiment", default="gemma_dspark", help="the experiment whose data split to use")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (e.g. data.max_prompts=900)")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-tau-est", action="store_true", help="decode only (tau_est costs a target pass per held-out row)")
    args = ap.parse_args()
    if not (Path(args.drafter) / "config.json").exists():
        ap.error(f"{args.drafter} is not a drafter directory (no config.json)")

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from dspark.drafters import load_drafter
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig
    from dspark.metrics import merge_all
    from dspark.prompts import PromptFormat
    from dspark.sampling import SamplingParams
    from dspark.target import Target
    from train import pipeline
    from train.config import repo_path

    with initialize_config_dir(config_dir=str(repo_path("conf")), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={args.experiment}", *args.overrides])
    fmt = PromptFormat(**OmegaConf.to_container(cfg.target.prompt_format, resolve=True))
    target = Target.load(cfg.target.path, dtype=cfg.target.dtype, prompt_format=fmt)
    _, held, responses = pipeline._prompts_and_responses(cfg, target, repo_path(cfg.output_dir))
    if not held:
        raise SystemExit("this configuration holds out no prompt (data.heldout_fraction=0)")
    drafter = load_drafter(args.drafter, target)
    drafter = drafter.to(target.dtype).eval()
    rows = held[: args.prompts]
    gamma = drafter.cfg.gamma
    engine = SpeculativeEngine(target, drafter, num_draft=gamma)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(temperature=args.temperature))
    t0 = time.perf_counter()
    with torch.no_grad():
        rids = [engine.add_request(target.encode_prompt(r["turns"][0]), gen, seed=cfg.seed + i) for i, r in enumerate(rows)]
        while any(engine.finish_reason(r) is None for r in rids):
            engine.step()
    s = merge_all([engine.pop_result(r).stats for r in rids])
    pos = ", ".join("-" if p is None else f"{p:.3f}" for p in s.per_position(gamma))
    print(f"decoded {len(rows)} held-out prompts, T={args.temperature:g}, {args.max_new_tokens} new tokens "
          f"({time.perf_counter() - t0:.0f} s): tau {s.tau:.3f}; conditional acceptance by position: {pos}")
    if not args.no_tau_est:
        with open_dict(cfg):
            cfg.eval.heldout_examples = len(rows)
        ho = pipeline._heldout_tau(cfg, target, drafter, rows, responses)
        print("teacher-forced tau_est on the same prompts: " + ", ".join(f"{k} {v:.3f}" for k, v in ho.items() if v is not None))


if __name__ == "__main__":
    main()
