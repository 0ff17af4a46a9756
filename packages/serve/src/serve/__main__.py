"""``python -m serve``: an OpenAI-compatible speculative-decoding server (LitServe).

    python -m serve                                            # Gemma 270M + n-gram drafter, static gamma
    python -m serve --drafter outputs/gemma_dspark/drafter --policy sync
    python -m serve --drafter none                             # plain autoregressive decoding

Then any OpenAI client works against http://127.0.0.1:8000/v1 (see README: Serving).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str] | None = None):
    from serve.api import ServeSettings

    d = ServeSettings.__dataclass_fields__
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=d["target"].default, help="gemma3-270m (embedded) or a local HF model directory")
    ap.add_argument("--dtype", default=d["dtype"].default, choices=["auto", "bfloat16", "float32"],
                    help="auto (default): bfloat16 where the CPU/GPU computes it natively, else float32 (emulated bf16 makes prefill and multi-token verify forwards several times slower)")
    ap.add_argument("--drafter", default=d["drafter"].default, help="ngram, none, or a drafter directory saved by training")
    ap.add_argument("--policy", default=d["policy"].default, choices=["auto", "none", "static", "threshold", "sync", "async"],
                    help="how many draft tokens of each request to verify per step (DSPARK.md section 3); "
                    "auto: sync for drafters with a confidence head, else static")
    ap.add_argument("--gamma", type=int, default=d["gamma"].default, help="most draft tokens per request per step")
    ap.add_argument("--threshold", type=float, default=d["threshold"].default, help="survival threshold for --policy threshold")
    ap.add_argument("--max-batch", type=int, default=d["max_batch"].default, help="requests decoding at once")
    ap.add_argument("--max-queue", type=int, default=d["max_queue"].default, help="waiting requests before 503")
    ap.add_argument("--max-context", type=int, default=d["max_context"].default, help="prompt + max_tokens limit")
    ap.add_argument("--max-tokens-limit", type=int, default=d["max_tokens_limit"].default)
    ap.add_argument("--model-name", default="", help="the id clients send as `model` (default: <target>+<drafter>)")
    ap.add_argument("--api-key", default=os.environ.get("DSPARK_API_KEY"), help="require this bearer token (env DSPARK_API_KEY)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-draft-gate", action="store_true",
                    help="sync/async: always draft (by default a step skips drafting when plain decoding is expected to be faster)")
    ap.add_argument("--ngram-fallback", type=int, default=0, metavar="N",
                    help="with a trained drafter: prompt lookup for requests whose context ends in a repeated n-gram of >= N tokens (0: off)")
    ap.add_argument("--sps-refresh", action="store_true", help="re-profile SPS(B) instead of loading the cached profile")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the engine (0: one per core; on a 2-core box, 1 thread to spare a core for HTTP measured slower)")
    ap.add_argument("--lm-head", default=d["lm_head"].default, choices=["auto", "screen", "full"],
                    help="how tokens are picked from the LM head when no draft needs the full distribution: auto "
                         "(an exact fp16 screen where it measures faster: CPU, fp32, 1-4 rows), screen, or full (docs/architecture.md)")
    ap.add_argument("--cpu-gemm", default=d["cpu_gemm"].default, choices=["auto", "library"],
                    help="few-row fp32 products on a CPU (verify forwards, small batches): auto (oneDNN on prepacked "
                         "weights where this torch has it; one extra copy of the weights) or library (docs/architecture.md)")
    ap.add_argument("--decoder", default=d["decoder"].default, choices=["auto", "hf"],
                    help="the target's decoding steps: auto (a lean Gemma 3 step where it applies, dspark.fast_decoder) "
                         "or hf (transformers' forward)")
    ap.add_argument("--log-level", default="info")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[serve] %(message)s")
    from serve.api import ServeSettings, build_server

    try:
        settings = ServeSettings(
            target=args.target, dtype=args.dtype, drafter=args.drafter, policy=args.policy, gamma=args.gamma,
            threshold=args.threshold, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
            max_tokens_limit=args.max_tokens_limit, model_name=args.model_name, api_key=args.api_key,
            sps_refresh=args.sps_refresh, draft_gate=not args.no_draft_gate, ngram_fallback=args.ngram_fallback,
            threads=args.threads, lm_head=args.lm_head, cpu_gemm=args.cpu_gemm, decoder=args.decoder,
        )
    except ValueError as e:
        print(f"[serve] {e}", file=sys.stderr)
        return 2
    if args.drafter not in ("ngram", "none") and not os.path.isdir(args.drafter):
        print(f"[serve] --drafter {args.drafter!r} is neither ngram, none nor a drafter directory", file=sys.stderr)
        return 2
    server = build_server(settings)
    print(f"[serve] model {settings.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False, num_api_servers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
