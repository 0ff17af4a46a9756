"""DFlash / DSpark drafters on tiny Gemma-3- and Qwen3-shaped targets."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import DraftVocab, Eagle3Drafter, build_drafter, load_drafter
from dspark.drafters.base import DraftState, Proposal
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.drafters.vocab import count_tokens
from dspark.heads import RNNHead, STSCalibrator
from dspark.sampling import SamplingParams, temperature_probs
from tests.tiny import tiny_gemma3, tiny_qwen3

V, G = 64, 4
TARGETS = {"gemma3": lambda: tiny_gemma3(vocab=V, layers=4), "qwen3": lambda: tiny_qwen3(vocab=V, layers=4)}
KINDS = {"dflash": {}, "dspark": {}, "dspark-rnn": {"head": "rnn"}}  # the parallel drafters
ALL_KINDS = {**KINDS, "eagle3": {}}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request):
    return TARGETS[request.param]()


def make(target, kind, vocab=None, seed=0):
    torch.manual_seed(seed)
    if kind == "eagle3":
        return build_drafter("eagle3", target, gamma=G, vocab=vocab)
    d = build_drafter(kind.split("-")[0], target, gamma=G, rank=8, num_layers=2, mask_token_id=3, vocab=vocab, **KINDS[kind])
    # an untrained drafter has zero-init heads; randomise them so the tests see real biases
    with torch.no_grad():
        for name, p in d.named_parameters():
            if "head" in name or "conf" in name:
                p.normal_(0, 0.3)
    return d


def features(target, ids: torch.Tensor, layers) -> torch.Tensor:
    out = target.forward(ids, taps=layers)
    return torch.cat([out.taps[i] for i in layers], -1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes(target, kind):
    d = make(target, kind)
    ids = torch.randint(4, V, (2, 20))
    out = d.forward_blocks(features(target, ids, d.feature_layers), ids, torch.tensor([[3, 9, 15], [5, 6, 7]]))
    assert out.logits.shape == (2, 3, G, V) and out.hidden.shape == (2, 3, G, target.hidden_size)
    assert (out.conf_logits is None) == (kind == "dflash")
    if out.conf_logits is not None:
        assert out.conf_logits.shape == (2, 3, G)
    st = DraftState([ids[0, :11].tolist()], [0], G, SamplingParams(), torch.Generator().manual_seed(0), [features(target, ids[:1, :10], d.feature_layers)[0]])
    prop = d.propose(st)
    assert prop.tokens.shape == (1, G) and prop.probs.shape == (1, G, V) and prop.lens.tolist() == [G]
    torch.testing.assert_close(prop.probs.sum(-1), torch.ones(1, G))


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_attention_mask(target, kind):
    d = make(target, kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (1, 24), generator=g)
    feats = features(target, ids, d.feature_layers)
    anchors = torch.tensor([[8, 16]])
    base = d.forward_blocks(feats, ids, anchors).logits

    def block0(f, i):
        return d.forward_blocks(f, i, anchors).logits[0, 0]

    at_or_after = feats.clone()
    at_or_after[:, 8:] += torch.randn(at_or_after[:, 8:].shape, generator=g)
    torch.testing.assert_close(block0(at_or_after, ids), base[0, 0])  # context >= anchor: invisible
    other = ids.clone()
    other[0, 16] = (other[0, 16] + 1) % V  # the other block's anchor token
    torch.testing.assert_close(block0(feats, other), base[0, 0])
    assert not torch.allclose(d.forward_blocks(feats, other, anchors).logits[0, 1], base[0, 1])
    before = feats.clone()
    before[:, 7] += 5 * torch.randn(before[:, 7].shape, generator=g)  # strictly before the anchor
    assert not torch.allclose(block0(before, ids), base[0, 0])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_teacher_forced_logits_equal_sampling_loop(target, kind, draft_vocab):
    """Forcing the teacher-forced path onto the tokens the sampling loop drew reproduces
    the loop's distributions exactly: training and inference compute the same thing."""
    vocab = DraftVocab(torch.arange(40, 4, -1), V) if draft_vocab else None
    d = make(target, kind, vocab)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(4, V, (1, 13), generator=g)
    params = SamplingParams(temperature=1.0)
    st = DraftState([seq[0].tolist()], [7], G, params, g, [features(target, seq[:, :12], d.feature_layers)[0]])
    prop = d.propose(st)
    drafted = prop.tokens[0].tolist()
    full = torch.tensor([seq[0].tolist() + drafted[:-1]])
    feats = torch.cat([features(target, seq[:, :12], d.feature_layers), torch.randn(1, G, len(d.feature_layers) * target.hidden_size)], 1)
    tf = d.forward_blocks(feats, full, torch.tensor([[12]]))
    probs = d.vocab.scatter_probs(temperature_probs(tf.logits[0, 0], params.temperature))
    torch.testing.assert_close(probs, prop.probs[0], rtol=1e-4, atol=1e-6)
    if draft_vocab:
        outside = torch.ones(V, dtype=torch.bool)
        outside[d.vocab.ids] = False
        assert float(prop.probs[0][:, outside].abs().sum()) == 0.0
        assert set(drafted) <= set(d.vocab.ids.tolist())
    if kind != "dflash":
        conf = torch.sigmoid(tf.conf_logits[0, 0])
        torch.testing.assert_close(conf, prop.confidence[0], rtol=1e-4, atol=1e-6)


def test_context_appended_over_rounds_equals_the_whole_context_at_once(target):
    """The drafter's per-request context K/V, appended a few committed positions per round
    (past its buffer's first capacity, so it regrows), drafts exactly what a drafter handed
    the same context in one call drafts."""
    seq = torch.randint(4, V, (1, 150), generator=torch.Generator().manual_seed(3))[0].tolist()
    feats = features(target, torch.tensor([seq]), make(target, "dspark").feature_layers)[0]
    params = SamplingParams(temperature=1.0)

    def propose(d, end, start):
        st = DraftState([seq[: end + 1]], [0], G, params, torch.Generator().manual_seed(end), [feats[start:end]])
        return d.propose(st)

    inc, one = make(target, "dspark"), make(target, "dspark")
    start = 0
    for end in (5, 40, 63, 64, 65, 97, 129, 149):  # rounds committing 5, 35, 23, 1, 1, 32, 32, 20 positions
        got = propose(inc, end, start)
        start = end
    assert inc._cache[0].length == 149
    want = propose(one, 149, 0)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.probs, want.probs, rtol=1e-5, atol=1e-7)


def test_rnn_head_step_by_step_equals_block():
    head = RNNHead(30, rank=6, hidden_size=8)
    with torch.no_grad():
        head.w2.weight.normal_()
    prev, hid = torch.randint(0, 31, (3, 5)), torch.randn(3, 5, 8)
    block = head.block_bias(prev, hid)
    state, steps = head.init_state(3, prev.device), []
    for k in range(5):
        b, state = head.step(state, prev[:, k], hid[:, k])
        steps.append(b)
    torch.testing.assert_close(torch.stack(steps, 1), block)
    assert not torch.allclose(block[:, 1], head.block_bias(prev[:, 1:2], hid[:, 1:2])[:, 0])  # state matters


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_greedy_identity_through_engine(target, kind):
    cfg = GenerationConfig(max_new_tokens=30, sampling=SamplingParams(temperature=0), stop_token_ids=[])
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11]]
    want = [ar_generate(target, p, cfg).tokens for p in prompts]
    for mode in ("kv", "recompute"):
        res = SpeculativeEngine(target, make(target, kind), num_draft=G, cache_mode=mode).generate(prompts, cfg)
        assert [r.tokens for r in res] == want


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_shorter_proposal_is_the_prefix_of_the_full_one(target, kind, temperature):
    """propose(max_draft=k < gamma) computes the head and the draft logits for k slots
    only; its tokens, probabilities and confidences are the first k of the full proposal's,
    and it takes as many random numbers from the generator (later rounds are unchanged)."""
    d = make(target, kind)
    seq = torch.randint(4, V, (1, 13), generator=torch.Generator().manual_seed(2))
    f = features(target, seq[:, :12], d.feature_layers)[0]
    params = SamplingParams(temperature=temperature)
    props, gens = {}, {}
    for rid, k in enumerate((G, 2)):  # one request id each: the drafter keeps per-request context
        gens[k] = torch.Generator().manual_seed(5)
        props[k] = d.propose(DraftState([seq[0].tolist()], [rid], k, params, gens[k], [f]))
    full, short = props[G], props[2]
    assert short.lens.tolist() == [2] and short.tokens.shape == (1, 2) and short.probs.shape == (1, 2, V)
    assert torch.equal(short.tokens, full.tokens[:, :2])
    # the same values up to the products' summation order over 2 rows instead of G
    torch.testing.assert_close(short.probs, full.probs[:, :2])
    if kind == "dflash":
        assert short.confidence is None and full.confidence is None
    else:
        torch.testing.assert_close(short.confidence, full.confidence[:, :2])
    assert torch.equal(torch.rand(3, generator=gens[G]), torch.rand(3, generator=gens[2]))


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_save_load_round_trip(target, kind, tmp_path):
    vocab = DraftVocab(torch.arange(V - 1, 9, -1), V)
    d = make(target, kind, vocab)
    d.calibrator.temperatures = [1.5, 1.2, 1.0, 0.9]
    with torch.no_grad():  # make every weight matter for the comparison
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d.save_pretrained(str(tmp_path / "ckpt"))
    e = load_drafter(str(tmp_path / "ckpt"), target)
    assert type(e) is type(d) and e.cfg == d.cfg and e.calibrator.temperatures == [1.5, 1.2, 1.0, 0.9]
    seq = torch.randint(4, V, (1, 11))
    f = features(target, seq[:, :10], d.feature_layers)[0]
    mk = lambda: DraftState([seq[0].tolist()], [0], G, SamplingParams(), torch.Generator().manual_seed(3), [f])  # noqa: E731
    a, b = d.propose(mk()), e.propose(mk())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    with pytest.raises(Exception, match="already exists"):
        d.save_pretrained(str(tmp_path / "ckpt"))


def test_loading_against_the_wrong_target_fails(tmp_path):
    t = tiny_gemma3(vocab=V, layers=4)
    make(t, "dspark").save_pretrained(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="trained for target 'tiny-gemma3'.*vocab_size: drafter 64 vs target 80"):
        load_drafter(str(tmp_path / "c"), tiny_gemma3(vocab=80, layers=4))
    with pytest.raises(ValueError, match="model_type"):
        load_drafter(str(tmp_path / "c"), tiny_qwen3(vocab=V, layers=4))
    with pytest.raises(Exception, match="not a drafter checkpoint"):
        load_drafter(str(tmp_path), t)


def test_config_validation(target):
    with pytest.raises(ValueError, match="feature_layers"):
        build_drafter("dspark", target, feature_layers=[9])
    with pytest.raises(ValueError, match="needs head"):
        build_drafter("dspark", target, head="none")
    with pytest.raises(ValueError, match="pass target"):
        build_drafter("dflash")


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_eagle3_training_time_test_equals_chain_drafting(target, draft_vocab):
    """Step s of the TTT unroll, forced onto the tokens the chain drew, reproduces the
    chain's s-th draft distribution: the unroll trains exactly what inference runs."""
    vocab = DraftVocab(torch.arange(40, 4, -1), V) if draft_vocab else None
    torch.manual_seed(0)
    d = build_drafter("eagle3", target, gamma=3, vocab=vocab)
    assert isinstance(d, Eagle3Drafter)
    g = torch.Generator().manual_seed(4)
    n = 10
    seq = torch.randint(4, V, (1, n), generator=g)  # anchor at n-1
    params = SamplingParams(temperature=1.0)
    f = features(target, seq[:, : n - 1], d.feature_layers)
    prop = d.propose(DraftState([seq[0].tolist()], [0], 3, params, g, [f[0]]))
    d1, d2, _ = prop.tokens[0].tolist()
    ids = torch.tensor([seq[0].tolist() + [d1, d2]])
    feats = torch.cat([f, torch.randn(1, 3, f.shape[-1])], 1)  # features past n-2 must not matter
    steps = d.forward_ttt(feats, ids, steps=3)
    for s, j in enumerate((n - 2, n - 1, n)):
        probs = d.vocab.scatter_probs(temperature_probs(steps[s][0, j], params.temperature))
        torch.testing.assert_close(probs, prop.probs[0, s], rtol=1e-4, atol=1e-6)


def test_eagle3_sparse_unroll_equals_the_dense_one(target):
    """forward_ttt(need=...) runs steps >= 2 only along the needed positions' chains; at
    every needed position each step's hidden state, and the gradients of a loss on them,
    equal the dense unroll's."""
    torch.manual_seed(0)
    d = build_drafter("eagle3", target, gamma=4)
    with torch.no_grad():
        for p in d.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    B, T, steps = 3, 24, 5
    ids = torch.randint(4, V, (B, T), generator=gen)
    feats = torch.cat([features(target, ids[b : b + 1], d.feature_layers) for b in range(B)])
    need = torch.zeros(B, T, dtype=torch.bool)
    need[0, [2, 9, 10, 21]] = True
    need[1, [0, 5, 22]] = True
    need[2, 13] = True  # rows with different counts: padding in the gathered steps
    weights = [torch.randn(B, T, target.hidden_size, generator=gen) for _ in range(steps)]
    results = []
    for sparse in (False, True):
        d.zero_grad()
        hs = d.forward_ttt(feats, ids, steps, return_hidden=True, need=need if sparse else None)
        loss = sum((h * w)[need].sum() for h, w in zip(hs, weights))
        loss.backward()
        results.append(([h[need].detach() for h in hs], {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}))
    (dense_h, dense_g), (sparse_h, sparse_g) = results
    for s, (a, b) in enumerate(zip(dense_h, sparse_h), start=1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"step {s}")
    assert dense_g.keys() == sparse_g.keys() and dense_g
    for n in dense_g:  # absolute slack scaled to the gradient (fc.weight reaches ~400: fp32 summation order)
        scale = float(dense_g[n].abs().max())
        torch.testing.assert_close(sparse_g[n], dense_g[n], rtol=1e-4, atol=1e-5 + 1e-6 * scale, msg=n)
    with pytest.raises(ValueError, match="return_hidden"):
        d.forward_ttt(feats, ids, steps, need=need)
    with pytest.raises(ValueError, match="must match"):
        d.forward_ttt(feats, ids, steps, return_hidden=True, need=need[:, :5])


def test_engine_records_confidences_for_sts(target):
    d = make(target, "dspark")
    cfg = GenerationConfig(max_new_tokens=25, sampling=SamplingParams(temperature=1.0), stop_token_ids=[], seed=0)
    res = SpeculativeEngine(target, d, num_draft=G).generate([[1, 5, 6, 7], [1, 9]], cfg)
    stats = res[0].stats.merge(res[1].stats)
    conf, survived, valid = stats.calibration_data(G)
    with_drafts = [a for a, n in zip(stats.accepted, stats.draft_lens) if n > 0]
    assert conf.shape == survived.shape == valid.shape == (len(with_drafts), G)
    assert bool(((conf > 0) & (conf < 1)).all())
    assert torch.equal(survived.sum(1), torch.tensor(with_drafts))
    cal = STSCalibrator().fit(conf, survived, valid)
    assert len(cal.temperatures) == G and set(cal.report) == {"ece_before", "ece_after", "auc_before", "auc_after"}
    with pytest.raises(ValueError, match="no confidences were recorded"):
        SpeculativeEngine(target, make(target, "dflash"), G).generate([[1, 5]], cfg)[0].stats.calibration_data(G)


def test_draft_vocab_from_counts():
    counts = count_tokens([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9]], 12)
    vocab = DraftVocab.from_counts(counts, 3, always=[1])
    assert vocab.ids.tolist() == [1, 9, 5]
    assert vocab.encode(torch.tensor([9, 5, 7])).tolist() == [1, 2, 3]  # 7 is out of vocabulary -> K
    probs = vocab.scatter_probs(torch.tensor([[0.2, 0.5, 0.3]]))
    assert probs.shape == (1, 12) and float(probs[0, 9]) == 0.5 and float(probs.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unique"):
        DraftVocab(torch.tensor([1, 1]), 12)


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_draft_vocabulary_proposals_build_only_the_rows_asked_for(target, kind):
    """A drafter with a draft vocabulary hands its probs over that vocabulary
    (Proposal.support); ``probs`` reads as the full [B, K, V] tensor, ``rows_probs`` gives
    the same rows without building the others."""
    vocab = DraftVocab(torch.arange(40, 4, -1), V)
    d = make(target, kind, vocab)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, V, (n,), generator=g).tolist() for n in (9, 12, 7)]
    feats = [features(target, torch.tensor([s[:-1]]), d.feature_layers)[0] for s in seqs]
    prop = d.propose(DraftState(seqs, [1, 2, 3], G, SamplingParams(temperature=1.0), g, feats))
    assert prop.support is not None and torch.equal(prop.support, vocab.ids) and prop.vocab_size == V
    built = []
    real = Proposal._scatter
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Proposal, "_scatter", lambda self, c: built.append(c.shape[:-1].numel()) or real(self, c))
        one = prop.rows_probs([2, 0], 1)
        rest = prop.rows_probs([1], 2, rest=True)
        assert built == [2, G - 2]  # two rows, then one row's last G - 2 slots: never all B x G
        dense = prop.probs
    assert dense.shape == (3, G, V) and one.shape == (2, V) and rest.shape == (1, G - 2, V)
    torch.testing.assert_close(one, dense[[2, 0], 1])
    torch.testing.assert_close(rest, dense[[1], 2:])
    torch.testing.assert_close(dense.sum(-1), torch.ones(3, G))
    outside = torch.ones(V, dtype=torch.bool)
    outside[vocab.ids] = False
    assert float(dense[..., outside].abs().sum()) == 0.0
    # each drafted token carries its own probability in the full tensor
    q_x = dense.gather(-1, prop.tokens[..., None].to(dense.device))[..., 0]
    assert bool((q_x > 0).all())
    full = make(target, kind)  # the full vocabulary: dense probs as before
    prop_full = full.propose(DraftState(seqs, [1, 2, 3], G, SamplingParams(temperature=1.0), g, feats))
    assert prop_full.support is None and prop_full.probs.shape == (3, G, V)
    torch.testing.assert_close(prop_full.rows_probs([1], 0), prop_full.probs[[1], 0])


def test_proposal_rejects_inconsistent_support():
    q = torch.full((1, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match="vocab_size"):
        Proposal(torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), q, support=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="must match support"):
        Proposal(torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), q, support=torch.tensor([1, 2]), vocab_size=8)
    with pytest.raises(ValueError, match="without probs"):
        Proposal(torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), None, support=torch.tensor([1, 2]), vocab_size=8)
    assert Proposal(torch.zeros(1, 0, dtype=torch.long), torch.tensor([0])).rows_probs([0], 0) is None


def test_markov_transition_rows_equal_the_product_and_follow_weight_updates():
    from dspark.heads.markov import MarkovHead, TransitionRows

    torch.manual_seed(0)
    head = MarkovHead(50, rank=8)
    torch.nn.init.normal_(head.w2.weight)
    rows = TransitionRows(budget_bytes=3 * 50 * 4)  # room for 3 rows of 50 fp32
    prev = torch.tensor([4, 7, 4])
    torch.testing.assert_close(rows(head, prev), head.w2(head.w1(prev)), rtol=1e-6, atol=1e-6)
    assert (rows.misses, rows.hits) == (2, 1)
    rows(head, torch.tensor([1, 2]))  # evicts the least recently used row (7)
    assert len(rows._rows) == 3 and 7 not in rows._rows
    with torch.no_grad():
        head.w2.weight.mul_(2.0)  # an optimiser step: every cached row is stale
    torch.testing.assert_close(rows(head, prev), head.w2(head.w1(prev)), rtol=1e-6, atol=1e-6)
    # a batch whose hit is the least recently used row while its misses overflow the budget
    # (a 32-request evaluation crashed here with a KeyError): the hit must survive the call
    rows = TransitionRows(budget_bytes=3 * 50 * 4)
    rows(head, torch.tensor([5, 6, 8]))  # 5 is now the least recently used
    batch = torch.tensor([5, 9, 10, 11])
    torch.testing.assert_close(rows(head, batch), head.w2(head.w1(batch)), rtol=1e-6, atol=1e-6)
    assert len(rows._rows) == 4  # never fewer than one call's distinct rows
    torch.testing.assert_close(rows(head, torch.tensor([12])), head.w2(head.w1(torch.tensor([12]))), rtol=1e-6, atol=1e-6)
    assert len(rows._rows) == 3 and 12 in rows._rows


def test_markov_rows_from_the_fp16_copy():
    """Large fp32 CPU heads compute missed rows from an fp16 copy of W2 (half the bytes):
    within fp16 rounding of the product, refreshed after a weight update, and an fp32
    product where fp16 would overflow."""
    from dspark.heads.markov import MarkovHead, TransitionRows

    torch.manual_seed(0)
    head = MarkovHead(300, rank=16)
    torch.nn.init.normal_(head.w2.weight)
    prev = torch.tensor([4, 7, 4, 299])
    want = head.w2(head.w1(prev))
    rows = TransitionRows(half_min_weights=0)
    got = rows(head, prev)
    assert rows._w2_half is not None and rows._w2_half.dtype == torch.float16 and got.dtype == torch.float32
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 2e-3  # the fp16 copy is really used, and close
    assert TransitionRows()._half(head.w2.weight) is None  # small heads: fp32 (default threshold 2^20)
    with torch.no_grad():
        head.w2.weight.mul_(3.0)
    torch.testing.assert_close(rows(head, prev), head.w2(head.w1(prev)), rtol=0, atol=float(6e-3 * want.abs().max()))
    with torch.no_grad():
        head.w2.weight[5, 0] = 1e6  # past fp16's range
    torch.testing.assert_close(rows(head, prev), head.w2(head.w1(prev)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["dflash", "dspark", "dspark-rnn", "dspark-fp16-rows"])
def test_drafts_follow_the_probabilities_they_report(target, kind):
    """The verifier divides by the reported draft probability of the drawn token: the draws
    must follow exactly those probabilities (chi-square on slot 1, per-row generators);
    also with the Markov rows computed from the fp16 copy of W2."""
    from scipy.stats import chisquare

    from dspark.heads.markov import TransitionRows

    d = make(target, "dspark" if kind == "dspark-fp16-rows" else kind)
    if kind == "dspark-fp16-rows":
        d._transitions = TransitionRows(half_min_weights=0)
    seq = torch.randint(4, V, (1, 10), generator=torch.Generator().manual_seed(3))
    feats = features(target, seq[:, :9], d.feature_layers)[0]
    n = 3000
    params = SamplingParams(temperature=0.8)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    st = DraftState([seq[0].tolist()] * n, list(range(n)), G, params, gens, [feats] * n)
    prop = d.propose(st)
    p = prop.probs[0, 0].double()
    torch.testing.assert_close(prop.probs[:, 0], prop.probs[:1, 0].expand(n, -1))  # same context, same distribution
    obs = torch.bincount(prop.tokens[:, 0], minlength=V).double()
    keep = p * n >= 5
    exp_c = torch.cat([p[keep] * n, (p[~keep].sum() * n)[None]])
    obs_c = torch.cat([obs[keep], obs[~keep].sum()[None]])
    if exp_c[-1] < 1e-9:  # nothing to pool
        exp_c, obs_c = exp_c[:-1], obs_c[:-1]
    assert int(keep.sum()) >= 5
    assert chisquare(obs_c.numpy(), exp_c.numpy() * obs_c.sum().item() / exp_c.sum().item()).pvalue > 1e-3


def test_warm_start_from_target_layers_reproduces_the_last_layers_keys_and_values():
    """drafter.init=target: the draft layers are the target's last layers, and the one that
    reads the deepest tapped layer gets exactly the keys/values it computes in the target."""
    from transformers import DynamicCache

    tgt = tiny_gemma3(layers=4)  # layers 0-2 sliding, layer 3 full attention
    with torch.no_grad():  # non-trivial norms (Gemma initialises them to the identity)
        for name, p in tgt.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    d = build_drafter("dspark", tgt, gamma=G, feature_layers=[1, 2], num_layers=2)
    assert d.backbone.init_from_target(tgt.layers, tgt.decoder.norm, [1, 2]) == [2, 3]
    for lay, i in zip(d.backbone.layers, [2, 3]):
        for (n, a), b in zip(lay.layer.state_dict().items(), tgt.layers[i].state_dict().values()):
            assert torch.equal(a, b), n
    assert torch.equal(d.backbone.norm.weight, tgt.decoder.norm.weight)
    ids = torch.randint(4, V, (1, 12))
    cache = DynamicCache(config=tgt.model.config)
    with torch.no_grad():
        tgt.model(ids, use_cache=True, **{tgt._cache_kw: cache})
        kv = d.backbone.context_kv(features(tgt, ids, [1, 2]), torch.arange(12)[None])
    torch.testing.assert_close(kv[1].k, cache.layers[3].keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv[1].v, cache.layers[3].values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot warm-start"):
        build_drafter("dspark", tgt, gamma=G, feature_layers=[1], num_layers=5).backbone.init_from_target(tgt.layers, tgt.decoder.norm, [1])
