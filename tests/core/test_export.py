"""Export to vLLM's draft-model layout (#13 item 2): names and shapes vLLM 0.32's loaders
read, the exact Markov re-index, and a round trip export -> import that gives back the
same draft distributions, tokens and confidences."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.drafters import DraftVocab, build_drafter
from dspark.drafters.base import DraftState
from dspark.drafters.export import ExportError, export_drafter, import_drafter
from dspark.errors import ModelLoadError
from dspark.heads import STSCalibrator
from dspark.sampling import SamplingParams
from tests.tiny import tiny_gemma3, tiny_qwen3

V, G = 64, 4
LAYERS = 4


@pytest.fixture(scope="module")
def target():
    return tiny_qwen3(vocab=V, layers=LAYERS)


def make(target, kind, reduced=False, feature_layers=None, seed=0):
    torch.manual_seed(seed)
    vocab = None
    if reduced:  # 24 of 64 ids, in a frequency-like (not ascending) order: d2t offsets of both signs
        vocab = DraftVocab(torch.randperm(V, generator=torch.Generator().manual_seed(5))[:24], V)
    extra = {} if feature_layers is None else {"feature_layers": feature_layers}
    if kind == "eagle3":
        d = build_drafter("eagle3", target, gamma=G, vocab=vocab, **extra)
    else:
        d = build_drafter(kind, target, gamma=G, rank=8, num_layers=2, mask_token_id=3, vocab=vocab, **extra)
    with torch.no_grad():  # fresh drafters have zero heads and identity norms: make every weight matter
        for _, p in d.named_parameters():
            p.normal_(0, 0.3)
    if kind == "dspark":
        d.calibrator = STSCalibrator(temperatures=[0.7, 1.3, 1.1, 0.9])
    return d


def propose(d, target, temperature=1.0, seed=3):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, V, (1, 19), generator=g)
    out = target.forward(ids, logits="none", taps=d.feature_layers)
    feats = torch.cat([out.taps[i] for i in d.feature_layers], -1)[0, :-1]
    d.release([0])
    st = DraftState([ids[0].tolist()], [0], G, SamplingParams(temperature=temperature), torch.Generator().manual_seed(seed), [feats])
    p = d.propose(st)
    d.release([0])
    return p


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_round_trip_is_exact(target, kind, reduced, tmp_path):
    d = make(target, kind, reduced)
    export_drafter(d, tmp_path / "x")
    back = import_drafter(tmp_path / "x", target)
    assert back.cfg.kind == kind and back.vocab.size == d.vocab.size
    for temp in (1.0, 0.6, 0.0):
        a, b = propose(d, target, temp), propose(back, target, temp)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.probs, b.probs)
        if kind == "dspark":
            assert torch.equal(a.confidence, b.confidence)  # STS temperatures travel too
        else:
            assert a.confidence is None and b.confidence is None


def test_dspark_layout_matches_vllm_loader(target, tmp_path):
    """The tensors and config fields Qwen3DSparkForCausalLM.load_weights / __init__ read."""
    d = make(target, "dspark", reduced=True)
    export_drafter(d, tmp_path / "x", verifier="/models/qwen3")
    w = load_file(str(tmp_path / "x" / "model.safetensors"))
    conf = json.loads((tmp_path / "x" / "config.json").read_text())
    K, r, hidden = 24, 8, target.hidden_size
    assert conf["architectures"] == ["Qwen3DSparkModel"] and conf["model_type"] == "qwen3"
    assert conf["block_size"] == G and conf["mask_token_id"] == 3 and conf["markov_rank"] == r
    assert conf["draft_vocab_size"] == K and conf["vocab_size"] == V
    assert conf["enable_confidence_head"] and conf["confidence_head_with_markov"] and not conf["dspark_bonus_anchor"]
    # vLLM captures the stream entering layer k; we tap the output of layer k-1
    assert conf["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in sorted(d.feature_layers)]
    assert conf["target_layer_ids"] == sorted(d.feature_layers)
    assert conf["num_hidden_layers"] == 2 and conf["layer_types"] == ["full_attention"] * 2
    assert not any(k.startswith("model.") or "embed_tokens" in k or k.startswith("backbone") for k in w)
    assert w["markov_head.markov_w1.weight"].shape == (V, r)  # by target id
    assert w["markov_head.markov_w2.weight"].shape == (K, r)
    assert w["confidence_head.proj.weight"].shape == (1, hidden + r) and w["confidence_head.proj.bias"].shape == (1,)
    assert w["fc.weight"].shape == (hidden, hidden * len(d.feature_layers))
    assert {"hidden_norm.weight", "norm.weight", "layers.1.self_attn.q_norm.weight", "layers.0.mlp.gate_proj.weight"} <= set(w)
    # d2t offsets: target id = draft id + d2t[draft id]; lm_head = the target's rows in draft order
    assert torch.equal(torch.arange(K) + w["d2t"], d.vocab.ids)
    assert torch.equal(w["lm_head.weight"], target.get_lm_head_weight()[d.vocab.ids].float())
    # W1 re-index: a target id in the draft vocabulary carries its draft row, any other the OOV row
    ours = d.head.w1.weight.detach()
    oov = [t for t in range(V) if t not in set(d.vocab.ids.tolist())]
    for draft_id, t in enumerate(d.vocab.ids.tolist()):
        assert torch.equal(w["markov_head.markov_w1.weight"][t], ours[draft_id])
    for t in oov:
        assert torch.equal(w["markov_head.markov_w1.weight"][t], ours[K])


def test_dflash_exports_as_a_zero_markov_dspark(target, tmp_path):
    export_drafter(make(target, "dflash"), tmp_path / "x")
    w = load_file(str(tmp_path / "x" / "model.safetensors"))
    conf = json.loads((tmp_path / "x" / "config.json").read_text())
    assert conf["architectures"] == ["Qwen3DSparkModel"] and not conf["enable_confidence_head"]
    assert not w["markov_head.markov_w1.weight"].any() and not w["markov_head.markov_w2.weight"].any()
    assert "d2t" not in w and "lm_head.weight" not in w  # full vocabulary: vLLM shares the target's


def test_eagle3_layout_matches_vllm_loader(target, tmp_path):
    d = make(target, "eagle3", reduced=True)
    export_drafter(d, tmp_path / "x")
    w = load_file(str(tmp_path / "x" / "model.safetensors"))
    conf = json.loads((tmp_path / "x" / "config.json").read_text())
    assert conf["architectures"] == ["Eagle3Qwen3ForCausalLM"] and conf["num_hidden_layers"] == 1
    assert conf["norm_before_residual"] is False  # our residual carries the raw fused feature
    h = target.hidden_size
    assert w["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * h  # [embedding ; feature]
    assert "layers.0.hidden_norm.weight" in w and "fc.weight" in w and "norm.weight" in w
    export_drafter(d, tmp_path / "s", fmt="speculators")
    s = json.loads((tmp_path / "s" / "config.json").read_text())
    assert s["speculators_model_type"] == "eagle3"
    assert s["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == G
    assert s["transformer_layer_config"]["model_type"] == "qwen3"
    back = import_drafter(tmp_path / "s", target)
    assert torch.equal(propose(d, target).probs, propose(back, target).probs)


def test_unsorted_feature_layers_are_exported_in_capture_order(target, tmp_path):
    d = make(target, "dspark", feature_layers=[2, 0, 3])
    export_drafter(d, tmp_path / "x")
    w = load_file(str(tmp_path / "x" / "model.safetensors"))
    h = target.hidden_size
    ours = d.backbone.fc.weight.detach().split(h, dim=1)
    exported = w["fc.weight"].split(h, dim=1)
    for j, layer in enumerate(sorted([2, 0, 3])):  # block j of the export = the feature of the j-th lowest layer
        assert torch.equal(exported[j], ours[[2, 0, 3].index(layer)])
    back = import_drafter(tmp_path / "x", target)
    assert torch.equal(propose(d, target).probs, propose(back, target).probs)


def test_import_without_our_block_infers_the_drafter(target, tmp_path):
    """A checkpoint that only has vLLM's fields (e.g. one made elsewhere) still imports."""
    for kind in ("dspark", "dflash", "eagle3"):
        d = make(target, kind, reduced=True)
        out = tmp_path / kind
        export_drafter(d, out)
        conf = json.loads((out / "config.json").read_text())
        conf.pop("dspark")
        (out / "config.json").write_text(json.dumps(conf))
        back = import_drafter(out, target)
        assert back.cfg.kind == kind
        assert back.feature_layers == sorted(d.feature_layers)
        assert torch.equal(propose(d, target).probs, propose(back, target).probs)


def test_refusals_name_the_problem(target, tmp_path):
    with pytest.raises(ExportError, match="SupportsEagle3"):
        export_drafter(make(tiny_gemma3(vocab=V, layers=4), "dspark"), tmp_path / "g")
    rnn = build_drafter("dspark", target, gamma=G, rank=8, head="rnn")
    with pytest.raises(ExportError, match="RNN"):
        export_drafter(rnn, tmp_path / "r")
    with pytest.raises(ExportError, match="bonus-anchor"):
        export_drafter(make(target, "dspark"), tmp_path / "s", fmt="speculators")
    with pytest.raises(ExportError, match="unknown export format"):
        export_drafter(make(target, "dspark"), tmp_path / "u", fmt="onnx")
    assert not any(tmp_path.iterdir())  # nothing half-written
    export_drafter(make(target, "dspark"), tmp_path / "x")
    with pytest.raises(Exception, match="already exists"):
        export_drafter(make(target, "dspark"), tmp_path / "x")
    # an export whose LM head rows are not the target's (made for another target) is refused
    export_drafter(make(target, "dspark", reduced=True), tmp_path / "y")
    w = load_file(str(tmp_path / "y" / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] + 1.0
    save_file(w, str(tmp_path / "y" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="lm_head rows differ"):
        import_drafter(tmp_path / "y", target)
    # weights that do not fit the config name the checkpoint
    w["markov_head.markov_w2.weight"] = torch.zeros(5, 8)
    save_file(w, str(tmp_path / "y" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="do not match the config"):
        import_drafter(tmp_path / "y", target)


def test_cli_exports_and_checks_a_saved_checkpoint(tmp_path, capsys):
    from dspark.drafters import load_drafter
    from dspark.target import Target
    from train.export import main

    t = tiny_qwen3(vocab=V, layers=LAYERS)
    t.model.save_pretrained(tmp_path / "target")
    target = Target.load(str(tmp_path / "target"), dtype="float32")
    make(target, "dspark", reduced=True).save_pretrained(str(tmp_path / "ckpt"))
    main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "re-import check: max |p - p'| = 0" in out
    back = import_drafter(tmp_path / "out", target)
    orig = load_drafter(str(tmp_path / "ckpt"), target)
    assert torch.equal(propose(orig, target).probs, propose(back, target).probs)
    with pytest.raises(SystemExit) as e:  # refuses to overwrite: exit 2 with the reason
        main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
