"""How much of the target's next-token distribution its own layers hold: a reference point
for what a small drafter can reach (issue #10).

    python tools/acceptance_ceiling.py                      # 24 shipped responses, layers 12 14 15 16
    python tools/acceptance_ceiling.py --responses 48 --layers 9 13 15 16

On the target's own T = 1 responses (data/train/responses, with their prompts, as the
training pipeline builds them) it runs the target once and, for every response token,
compares the final distribution p with:

- **early exit at layer l**: q_l = softmax(LM head(final norm(output of layer l))), i.e.
  the target's own prediction with its last layers skipped. Columns: the speculative
  acceptance of a draft sampled from q_l at T = 1, sum_x min(p(x), q_l(x)), and at T = 0
  whether the argmaxes agree;
- **one token stale**: the final distribution of the previous position used for this one,
  sum_x min(p_t(x), p_{t-1}(x)), which is what a drafter gets that reads the context
  perfectly and ignores the token it drafts after.

A DFlash / DSpark block drafter predicts the token after the round's anchor from the
anchor's embedding plus the target's features of the earlier positions, through a few
layers of its own: the first draft is a whole target step done by a small network. These
numbers show how far the target's own last layers move its prediction. The table also
gives tau(a) = (1 - a^(g+1)) / (1 - a), the expected tokens per round for a drafter whose
every slot is accepted with probability a given its prefix (g = 7 drafts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

from dspark.target import Target

REPO = Path(__file__).resolve().parents[1]


def tau_of(a: float, gamma: int = 7) -> float:
    """Expected tokens per round when each of gamma drafts survives with probability a."""
    return float(gamma + 1) if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)


def examples(target: Target, n: int) -> list[tuple[str, list[int], list[int]]]:
    """The first ``n`` prompts, in the pipeline's domain-interleaved order, that have a shipped
    response: (domain, prompt ids, response ids)."""
    from train.data import build_example, interleave_domains, read_prompts
    from train.regenerate import load_shipped

    done, _ = load_shipped(REPO / "data/train/responses/gemma3-270m.jsonl", target)
    rows = interleave_domains(list(read_prompts(REPO / "data/train/prompts.jsonl")))
    out = []
    for r in rows:
        rec = done.get(r["id"])
        if rec is None or not rec.response_ids:
            continue
        # the pipeline's own example (prompt template + the sampled ids), never truncated
        ex = build_example(target, r["id"], r["turns"], rec.response, 1 << 30, rec.response_ids)
        start = ex.loss_mask.index(1)
        out.append((r["domain"], ex.input_ids[:start], ex.input_ids[start:]))
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def measure(target: Target, data, layers: list[int]) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Per-token acceptances, keyed by comparison name then domain."""
    stats: dict[str, dict[str, list[torch.Tensor]]] = {}
    norm = target.decoder.norm

    def add(name: str, domain: str, v: torch.Tensor) -> None:
        stats.setdefault(name, {}).setdefault(domain, []).append(v.float().cpu())

    for domain, prompt, response in data:
        ids = torch.tensor([prompt + response])
        out = target.forward(ids, logits="none", taps=layers, final_hidden=True)
        s = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions whose next token is a response token
        p = torch.softmax(target.lm_head(out.final_hidden[0, s]), -1)
        pa = p.argmax(-1)
        for layer in layers:
            q = torch.softmax(target.lm_head(norm(out.taps[layer][0, s])), -1)
            add(f"early exit, layer {layer} T=1", domain, torch.minimum(p, q).sum(-1))
            add(f"early exit, layer {layer} T=0", domain, (q.argmax(-1) == pa).float())
            del q
        add("one token stale T=1", domain, torch.minimum(p[1:], p[:-1]).sum(-1))
        add("one token stale T=0", domain, (pa[1:] == pa[:-1]).float())
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m", help="the shipped responses belong to the embedded Gemma only")
    ap.add_argument("--responses", type=int, default=24)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 14, 15, 16], help="0-based decoder layers to exit after")
    ap.add_argument("--gamma", type=int, default=7)
    args = ap.parse_args()

    t0 = time.perf_counter()
    target = Target.load(args.target, dtype="auto")
    last = target.num_layers - 1
    bad = [l for l in args.layers if not 0 <= l < last]
    if bad:
        sys.exit(f"--layers {bad}: exit layers must lie in 0..{last - 1} (layer {last} is the final one)")
    data = examples(target, args.responses)
    stats = measure(target, data, sorted(set(args.layers)))
    domains = sorted({d for d, _, _ in data})
    tokens = sum(len(r) for _, _, r in data)
    print(f"\n`python tools/acceptance_ceiling.py {' '.join(sys.argv[1:])}`  ")
    print(f"{dt.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, target {target.name} "
          f"{target.dtype}; {len(data)} shipped T = 1 responses ({', '.join(f'{sum(d == x for d, _, _ in data)} {x}' for x in domains)}), "
          f"{tokens} tokens; {time.perf_counter() - t0:.0f} s\n")
    print("| compared with the final distribution | " + " | ".join(domains) + " | all | tau at this acceptance (gamma " + f"{args.gamma}) |")
    print("|---" * (len(domains) + 3) + "|")
    for name, by in stats.items():
        cells = [torch.cat(by[d]).mean().item() if d in by else float("nan") for d in domains]
        a = torch.cat([v for vs in by.values() for v in vs]).mean().item()
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | **{a:.3f}** | {tau_of(a, args.gamma):.2f} |")


if __name__ == "__main__":
    main()
