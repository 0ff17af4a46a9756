"""Export a trained drafter to a directory vLLM loads as its speculative model.

    python -m train.export outputs/qwen3_dspark/drafter --format vllm --out exported/qwen3_dspark \\
        --target /path/to/Qwen3

Then, with the same target:

    python -m vllm.entrypoints.openai.api_server --model /path/to/Qwen3 \\
        --speculative-config '{"method": "dspark", "model": "exported/qwen3_dspark",
                               "num_speculative_tokens": 7, "draft_sample_method": "probabilistic"}'

(``"method": "eagle3"`` for an Eagle3 export; a DFlash drafter is exported as a DSpark
model with a zero Markov head and served with ``"method": "dspark"``.) The export is checked
by loading it back (``--no-check`` skips that): the re-imported drafter must give exactly
the draft probabilities of the original on a probe context. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import sys

import torch


def check_round_trip(drafter, exported, target, tokens: int = 24, seed: int = 0) -> float:
    """Max |p_original - p_reimported| of the draft distributions on a random probe
    context (0.0 when the export is exact)."""
    from dspark.drafters.base import DraftState
    from dspark.drafters.export import import_drafter
    from dspark.sampling import SamplingParams

    back = import_drafter(exported, target)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (1, tokens), generator=g)
    out = target.forward(ids, logits="none", taps=drafter.feature_layers)
    feats = torch.cat([out.taps[i] for i in drafter.feature_layers], dim=-1)[0, :-1]
    probs = []
    for d in (drafter, back):
        d.release([0])
        state = DraftState(
            request_ids=[0],
            seqs=[ids[0].tolist()],
            features=[feats],
            params=SamplingParams(temperature=1.0),
            generator=torch.Generator().manual_seed(seed),
            max_draft=d.cfg.gamma,
        )
        probs.append(d.propose(state).probs.float())
        d.release([0])
    return float((probs[0] - probs[1]).abs().max())


def main(argv: list[str] | None = None) -> None:
    from dspark.drafters.checkpoint import load_drafter, read_config
    from dspark.drafters.export import FORMATS, ExportError, check_exportable, export_drafter
    from dspark.errors import DSparkError
    from dspark.target import Target

    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("drafter", help="a drafter checkpoint directory (outputs/<experiment>/drafter)")
    ap.add_argument("--format", choices=FORMATS, default="vllm")
    ap.add_argument("--out", required=True, help="directory to create (refused if it exists)")
    ap.add_argument("--target", default=None, help="the target it drafts for (default: the name stored in the checkpoint)")
    ap.add_argument("--verifier", default=None, help="target name or path written into the config (default: --target)")
    ap.add_argument("--no-check", action="store_true", help="skip the re-import check")
    a = ap.parse_args(argv)
    try:
        meta = read_config(a.drafter)
        check_exportable(meta["drafter"], a.format, meta.get("target_config", {}).get("final_logit_softcapping"))
        target_name = a.target or meta["drafter"].get("target_name")
        target = Target.load(target_name, dtype="float32")
        drafter = load_drafter(a.drafter, target)
        out = export_drafter(drafter, a.out, a.format, verifier=a.verifier or target_name)
    except (ExportError, DSparkError, ValueError) as e:
        print(f"[export] {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[export] wrote {out} ({a.format}, {drafter.cfg.kind}, draft vocabulary {drafter.vocab.size})")
    if not a.no_check:
        err = check_round_trip(drafter, out, target)
        print(f"[export] re-import check: max |p - p'| = {err:.3g}")
        if err != 0.0:
            print("[export] the re-imported drafter differs from the original", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
