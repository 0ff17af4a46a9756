"""Few-row fp32 products through oneDNN on prepacked weights (dspark.packed_linear): same
values as F.linear up to summation order, only where it applies, never stale after a
weight update, and the engine's greedy output unchanged when the target and drafter use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dspark import packed_linear
from dspark.drafters import NgramDrafter, build_drafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from tests.tiny import tiny_gemma3

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="no oneDNN prepacked linear in this torch")


def _fp64_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 product and a summation-error allowance of d * 2^-23 * sum |x_j w_ij| per output."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
    return ref, mag * x.shape[-1] * 2.0**-23 + 1e-30


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 64, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_matches_fp64_within_fp32_summation_error(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 96, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(2, rows, 96, generator=g)
    y = packed_linear.packed(w).linear(x, b)
    assert y.shape == (2, rows, 300) and y.dtype == torch.float32
    ref, tol = _fp64_bound(x, w, b)
    assert bool(((y.double() - ref).abs() <= tol).all())


def test_install_routes_only_few_row_gradient_free_fp32_products(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False), nn.Linear(4, 4))
    ref = [m.weight.clone() for m in (net[0], net[2])]
    assert packed_linear.install(net, rows=(2, 16), min_weights=1000) == 2
    assert type(net[0]) is packed_linear.PackedLinear and type(net[3]) is nn.Linear  # 16 weights: too small
    calls = []
    real = packed_linear.PackedWeight.linear
    monkeypatch.setattr(packed_linear.PackedWeight, "linear", lambda self, x, b=None: calls.append(x.shape) or real(self, x, b))
    with torch.no_grad():
        for rows, used in ((1, False), (2, True), (16, True), (17, False)):
            calls.clear()
            x = torch.randn(rows, 64)
            y = net[:3](x)
            want = F.linear(F.relu(F.linear(x, ref[0], net[0].bias)), ref[1])
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
            assert bool(calls) == used, rows
            if not used:  # the library path is F.linear itself: bit-identical
                assert torch.equal(y, want)
    # with autograd the layers are plain nn.Linear: gradients flow
    calls.clear()
    x = torch.randn(4, 64, requires_grad=True)
    net[:3](x).sum().backward()
    assert not calls and x.grad is not None and net[0].weight.grad is not None
    # bf16 inputs are not this kernel's business
    with torch.no_grad():
        calls.clear()
        net16 = nn.Linear(64, 128).bfloat16()
        packed_linear.install(net16, min_weights=0)
        net16(torch.randn(4, 64, dtype=torch.bfloat16))
        assert not calls
    # state dict unchanged; uninstall restores the class
    keys = set(net.state_dict())
    assert packed_linear.uninstall(net) == 2 and type(net[0]) is nn.Linear and set(net.state_dict()) == keys


def test_packed_copy_is_rebuilt_after_an_in_place_update():
    torch.manual_seed(1)
    lin = nn.Linear(64, 64)
    packed_linear.install(lin, min_weights=0)
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = lin(x)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.randn(3, 64, requires_grad=True)).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        after = lin(x)
        torch.testing.assert_close(after, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    with torch.no_grad():  # a whole new tensor as well
        lin.weight = nn.Parameter(torch.randn(64, 64))
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_self_check_passes_here_and_bad_arguments_are_clear_errors():
    assert packed_linear.self_check() is None and packed_linear.usable()
    with pytest.raises(ValueError, match="fp32 CPU"):
        packed_linear.packed(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        packed_linear.install(nn.Linear(4, 4), rows=(3, 2))


def _packed_tiny_target():
    t = tiny_gemma3(vocab=512, sliding_window=8)
    t.packing = True
    assert packed_linear.install(t.layers, min_weights=0) > 0  # tiny layers: force it
    return t


def test_target_head_kernels_agree_and_bad_choice_is_an_error():
    t = _packed_tiny_target()
    h = torch.randn(2, 4, t.hidden_size)
    with torch.inference_mode():
        outs = {}
        for k in ("library", "blockwise", "packed"):
            with t.head_kernel_forced(k):
                outs[k] = t.lm_head(h)
        auto = t.lm_head(h)  # the timed choice, one of the three
    for k in ("blockwise", "packed"):
        torch.testing.assert_close(outs[k], outs["library"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto, outs["library"], rtol=1e-5, atol=1e-5)
    big = torch.randn(3, 50, t.hidden_size)  # 150 rows: past the blockwise window, still packed
    with torch.inference_mode():
        assert t._head_kernel(big, t.model.get_output_embeddings()) == "packed"
        with t.head_kernel_forced("library"):
            want = t.lm_head(big)
        torch.testing.assert_close(t.lm_head(big), want, rtol=1e-5, atol=1e-5)
    hg = big.clone().requires_grad_(True)  # under autograd: the library product
    assert t._head_kernel(hg, t.model.get_output_embeddings()) == "library"
    with pytest.raises(ValueError, match="head kernel"):
        with t.head_kernel_forced("int8"):
            pass
    t.use_packed_linears(False)
    assert t.packed_linears == 0 and not t.packing
    with t.head_kernel_forced("packed"), pytest.raises(ValueError, match="not available"):
        t.lm_head(h)


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_engine_greedy_identity_with_packed_target_and_drafter(kind):
    """fp32 greedy: the engine verifying 2..k+1 rows per step through oneDNN (target layers,
    LM head, the drafter's block forward and draft logits) emits the AR loop's tokens."""
    t = _packed_tiny_target()
    if kind == "ngram":
        drafter = NgramDrafter(num_tokens=5)
    else:
        torch.manual_seed(0)
        drafter = build_drafter("dspark", t, gamma=5, rank=8, num_layers=1, mask_token_id=3, feature_layers=[0, 1])
        with torch.no_grad():
            for p in drafter.parameters():
                p.normal_(0, 0.3)
        assert drafter._packing  # its draft logits take the oneDNN path (rows >= 2)
        assert packed_linear.install(drafter, min_weights=0) > 0  # tiny layers: force it
    cfg = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=0), stop_token_ids=[])
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 20, 21, 22, 23, 24, 25, 26]]
    with t.head_kernel_forced("packed"):
        eng = SpeculativeEngine(t, drafter, 5)
        res = eng.generate(prompts, cfg)
        got = [r.tokens for r in res]
    assert sum(sum(r.stats.draft_lens) for r in res) > 0  # multi-row verify steps did run
    with t.head_kernel_forced("library"):
        t.use_packed_linears(False)
        want = [ar_generate(t, p, cfg).tokens for p in prompts]
    assert got == want
