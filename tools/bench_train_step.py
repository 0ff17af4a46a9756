"""Training-step cost: exact target distributions (the target's LM head in every step)
against truncated ones read from the top-k cache (no LM head), same batches, same run.

    python tools/bench_train_step.py --drafter dspark --topk 64 --steps 4

Uses the main job's own data path (experiment=gemma_dspark: on-policy responses, the
offline feature cache, which it builds if missing, and the top-k cache next to it). Each
step is forward + backward + AdamW on a fresh drafter; the first step of each mode is a
warm-up and not counted. Prints seconds per step for each mode and their ratio.

A step's cost does not depend on how much data is cached: without the main job's caches at
hand, `--override data.max_prompts=48 --override output_dir=/tmp/o48/run` builds small ones
in about 1.5 minutes instead of ~25 on the 2-core box.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="dspark", choices=["dspark", "dflash", "eagle3"])
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", action="append", default=[], help="extra Hydra overrides for the experiment")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dspark.drafters import build_drafter
    from dspark.prompts import PromptFormat
    from dspark.target import Target
    from train.config import repo_path
    from train.features import FeatureCache, TopkCache, build, build_topk
    from train.fit import ExampleDataset, collate
    from train.module import DistillModule
    from train.pipeline import _draft_vocab, _examples, _prompts_and_responses

    with initialize_config_dir(config_dir=str(repo_path("conf")), version_base=None):
        cfg = compose("config", overrides=[f"experiment=gemma_{args.drafter}", *args.override])
    tc, dc = cfg.target, cfg.drafter
    target = Target.load(tc.path, dtype=tc.dtype, prompt_format=PromptFormat(**OmegaConf.to_container(tc.prompt_format, resolve=True)))
    train_rows, _, responses = _prompts_and_responses(cfg, target, repo_path(cfg.output_dir))
    examples = _examples(target, train_rows, responses, cfg.data.max_length)
    feats = FeatureCache(build(target, examples, list(dc.feature_layers), repo_path(cfg.output_dir).parent / "features",
                               storage=cfg.trainer.feature_storage, shard_tokens=cfg.trainer.feature_shard_tokens), dtype=target.dtype)
    vocab = _draft_vocab(cfg, target, examples)
    # the top-k cache the pipeline builds (trainer.target_topk_scope); a step costs the same either way
    vids = vocab.ids if vocab is not None and cfg.trainer.get("target_topk_scope", "full") == "draft_vocab" else None
    topk = TopkCache(build_topk(target, examples, feats, args.topk, vocab_ids=vids), feats, vids)
    extra = {} if dc.name == "eagle3" else {k: dc[k] for k in ("num_layers", "head", "rank", "mask_token_id") if k in dc}
    per_mode = {}
    for mode, cache in (("exact", None), (f"top-{topk.k}", topk)):
        torch.manual_seed(0)
        drafter = build_drafter(dc.name, target, gamma=dc.gamma, feature_layers=list(dc.feature_layers), vocab=vocab, **extra)
        module = DistillModule(drafter, target, dc.name, anchors_per_seq=cfg.trainer.anchors_per_seq)
        ds = ExampleDataset(examples, feats, cache)
        opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], 1e-4)
        times = []
        for s in range(args.steps + 1):
            batch = collate([ds[i] for i in range(s * args.batch_size, (s + 1) * args.batch_size)])
            t0 = time.perf_counter()
            out = module.ttt_loss(batch) if dc.name == "eagle3" else module.block_loss(batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        per_mode[mode] = statistics.mean(times[1:])
    cpu = platform.processor() or platform.machine()
    print(f"# {dt.date.today()} {cpu}, {args.threads} threads, target {target.dtype}, {dc.name}, batch {args.batch_size}, "
          f"{cfg.trainer.anchors_per_seq} anchors/seq, gamma {dc.gamma}")
    print("| targets | s/step | vs exact |\n|---|---|---|")
    base = per_mode["exact"]
    for mode, t in per_mode.items():
        print(f"| {mode} | {t:.2f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
