"""The server on the real Gemma 3 270M (fp32): the openai client gets exactly the greedy
autoregressive output, alone and with concurrent requests, one of them past the 512-token
sliding window."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from dspark.benchmarks import load_first_turns
from tests.serve.server_util import ServerProcess

pytestmark = pytest.mark.slow


def test_server_greedy_identity_on_gemma(gemma_fp32, ar_greedy, tmp_path):
    t = gemma_fp32
    texts = [load_first_turns("gsm8k", 1)[0], load_first_turns("mt-bench", 1)[0], load_first_turns("livecodebench", 1, start=2)[0]]
    ids = [t.encode_prompt(x) for x in texts]
    assert len(ids[2]) + 32 > 512
    want = [t.decode(ar_greedy(p, 32)) for p in ids]
    s = ServerProcess(["--dtype", "float32", "--drafter", "ngram", "--policy", "static", "--model-name", "gemma"], tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="none")

        def ask(text):
            r = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": text}], max_tokens=32, temperature=0)
            return r.choices[0].message.content

        alone = ask(texts[0])
        with cf.ThreadPoolExecutor(3) as ex:
            together = list(ex.map(ask, texts))
    finally:
        s.stop()
    assert alone == want[0]
    assert together == want
