"""Export trained drafters to the checkpoint layout vLLM (0.32) loads, and import such
checkpoints back.

Formats
- ``vllm``: vLLM's native draft configs. DSpark -> ``Qwen3DSparkModel`` (method ``dspark``);
  DFlash -> the same class with an all-zero Markov head and no confidence head (vLLM's
  own DFlash speculator uses a 1+N fill-in block, ours the anchor-predicts-next block that
  its DSpark path runs); Eagle3 -> ``Eagle3Qwen3ForCausalLM`` (method ``eagle3``).
- ``speculators``: the speculators-library wrapper vLLM also reads, for Eagle3 only (its
  DSpark converter rewrites the block layout, see docs/vllm_export.md).

Names and conventions follow vLLM 0.32's loaders (``qwen3_dspark.py``, ``qwen3_dflash.py``,
``qwen3_eagle3.py``, ``eagle3_utils.get_eagle3_aux_layers_from_config``):
- capture ids are ours + 1 (vLLM records the residual stream *entering* layer k, we tap the
  output of layer k-1), concatenated in ascending layer order;
- the Markov W1 table is indexed by target id (ours by draft id, with one out-of-vocabulary
  row): exported as an exact gather;
- a reduced draft vocabulary ships ``d2t`` offsets (target id = draft id + d2t[draft id])
  and the rows of the target's LM head it uses; the embedding is always the target's.

Only drafters whose layers vLLM has can be exported: Qwen3-family draft layers, the Markov
head (no RNN head in vLLM), no logit softcap. Anything else is refused with the reason.

Extras vLLM ignores travel in the config's ``dspark`` block (drafter config, STS
temperatures, the draft kind), so an import gives back the exact drafter; without that
block an import infers the drafter from vLLM's fields alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dspark.cache_dir import atomic_dir
from dspark.errors import DSparkError, ModelLoadError

FORMATS = ("vllm", "speculators")
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ExportError(DSparkError):
    """The drafter cannot be expressed in the requested format (the message says why)."""


GEMMA_GAP = (
    "vLLM 0.32 cannot serve a drafter for a Gemma 3 target: (1) its Gemma3ForCausalLM does not "
    "implement SupportsEagle3, so it hands no target hidden states to any drafter; (2) its "
    "DFlash/DSpark/Eagle3 draft layers are Qwen3 layers (pre-norm RMSNorm(w), SiLU MLP), while "
    "this drafter uses Gemma 3 layers (sandwich norms, GELU-tanh MLP, (1+w) norms, scaled "
    "embeddings), which no weight transform turns into Qwen3 layers. What it would take is in "
    "docs/vllm_export.md section 4"
)


def check_exportable(drafter_config: dict[str, Any], fmt: str, softcap: float | None = None) -> None:
    """Refuse, with the reason, what ``fmt`` cannot express. ``drafter_config`` is a
    DraftConfig as a dict (a checkpoint's config.json ``drafter`` block): the check runs
    before any model is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    mt = drafter_config.get("target_model_type", "")
    if mt.startswith("gemma"):
        raise ExportError(GEMMA_GAP)
    if mt != "qwen3":
        raise ExportError(
            f"export needs a Qwen3-family target (vLLM's draft layers are Qwen3 layers with q/k "
            f"norms); this drafter was trained for model_type {mt!r}"
        )
    if drafter_config.get("head") == "rnn":
        raise ExportError("vLLM's DSpark has only the first-order Markov head; an RNN-head drafter cannot be exported")
    if softcap:
        raise ExportError("the target softcaps its logits and vLLM's draft logits processor does not")
    if fmt == "speculators" and drafter_config.get("kind") != "eagle3":
        raise ExportError(
            "the speculators format is written for eagle3 only: vLLM's speculators converter for "
            "dspark forces the 1+N bonus-anchor block, which is not the layout this drafter was "
            "trained with; use --format vllm"
        )


def _check_exportable(drafter: Any, fmt: str) -> None:
    check_exportable(drafter.cfg.to_dict(), fmt, getattr(drafter.target_config, "final_logit_softcapping", None))


def _qwen3_fields(tc: Any, num_layers: int) -> dict[str, Any]:
    """The target's Qwen3 dimensions, cut to ``num_layers`` full-attention draft layers."""
    from dspark.drafters.backbone import rope_theta

    return {
        "model_type": "qwen3",
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        "hidden_act": getattr(tc, "hidden_act", "silu"),
        "rms_norm_eps": tc.rms_norm_eps,
        "attention_bias": bool(getattr(tc, "attention_bias", False)),
        "max_position_embeddings": tc.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta(tc)},
        "vocab_size": tc.vocab_size,
        "tie_word_embeddings": False,
        "num_hidden_layers": num_layers,
        "layer_types": ["full_attention"] * num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": "float32",
    }


def _feature_order(feature_layers: list[int]) -> list[int]:
    """Positions of our feature blocks in vLLM's ascending capture order."""
    return sorted(range(len(feature_layers)), key=lambda i: feature_layers[i])


def _permute_fc(w: torch.Tensor, order: list[int], d: int) -> torch.Tensor:
    blocks = w.split(d, dim=1)
    return torch.cat([blocks[i] for i in order], dim=1)


def _vocab_tensors(drafter: Any) -> dict[str, torch.Tensor]:
    v = drafter.vocab
    if v.is_full:
        return {}
    k = v.size
    return {
        "d2t": (v.ids.cpu() - torch.arange(k)).to(torch.int64),
        "lm_head.weight": drafter._lm_w.detach().float().cpu().contiguous(),
    }


def _parallel_weights(drafter: Any) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu() for k, v in drafter.state_dict().items()}
    cfg = drafter.cfg
    d = cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("backbone.layers."):
            i, rest = k[len("backbone.layers."):].split(".layer.", 1)
            out[f"layers.{i}.{rest}"] = v
    out["fc.weight"] = _permute_fc(sd["backbone.fc.weight"], _feature_order(cfg.feature_layers), d)
    out["hidden_norm.weight"] = sd["backbone.ctx_norm.weight"]
    out["norm.weight"] = sd["backbone.norm.weight"]
    V, K = cfg.target_vocab_size, drafter.vocab.size
    if cfg.kind == "dspark":
        w1 = sd["head.w1.weight"]  # [K+1, r] by draft id, row K = out of vocabulary
        out["markov_head.markov_w1.weight"] = w1[drafter.vocab.to_draft.cpu()]  # [V, r] by target id
        out["markov_head.markov_w2.weight"] = sd["head.w2.weight"]
        if cfg.confidence:
            out["confidence_head.proj.weight"] = sd["conf.proj.weight"]
            out["confidence_head.proj.bias"] = sd["conf.proj.bias"]
    else:  # dflash through vLLM's DSpark path: a zero Markov bias samples each slot independently
        out["markov_head.markov_w1.weight"] = torch.zeros(V, 1)
        out["markov_head.markov_w2.weight"] = torch.zeros(K, 1)
    out.update(_vocab_tensors(drafter))
    return {k: v.contiguous() for k, v in out.items()}


def _eagle3_weights(drafter: Any) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu() for k, v in drafter.state_dict().items()}
    cfg = drafter.cfg
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("layer.layer."):
            out["layers.0." + k[len("layer.layer."):]] = v
    out["fc.weight"] = _permute_fc(sd["fc.weight"], _feature_order(cfg.feature_layers), cfg.hidden_size)
    out["layers.0.hidden_norm.weight"] = sd["hidden_norm.weight"]
    out["norm.weight"] = sd["norm.weight"]
    out.update(_vocab_tensors(drafter))
    return {k: v.contiguous() for k, v in out.items()}


def export_config(drafter: Any, fmt: str = "vllm", verifier: str | None = None) -> dict[str, Any]:
    """The config.json of an export (see the module docstring)."""
    _check_exportable(drafter, fmt)
    cfg, tc = drafter.cfg, drafter.target_config
    capture = sorted(i + 1 for i in cfg.feature_layers)
    K = drafter.vocab.size
    extra = {
        "dspark": {
            "format": fmt,
            "drafter": cfg.to_dict(),
            "calibration": drafter.calibrator.to_dict(),
            "note": "read by dspark's import only; vLLM ignores this block",
        }
    }
    verifier = verifier or cfg.target_name
    if cfg.kind == "eagle3":
        layer = _qwen3_fields(tc, 1)
        eagle = {
            "draft_vocab_size": K,
            "target_hidden_size": cfg.hidden_size,
            "eagle_aux_hidden_state_layer_ids": capture,
            "norm_before_residual": False,
            "norm_before_fc": False,
            "fc_norm": False,
            "norm_output": False,
        }
        if fmt == "speculators":
            return {
                "speculators_model_type": "eagle3",
                "architectures": ["Eagle3Speculator"],
                "transformer_layer_config": layer,
                **eagle,
                "speculators_config": {
                    "algorithm": "eagle3",
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.gamma}],
                    "default_proposal_method": "greedy",
                    "verifier": {"name_or_path": verifier, "architectures": ["Qwen3ForCausalLM"]},
                },
                **extra,
            }
        return {"architectures": ["Eagle3Qwen3ForCausalLM"], **layer, **eagle, **extra}
    dspark = cfg.kind == "dspark"
    return {
        "architectures": ["Qwen3DSparkModel"],
        **_qwen3_fields(tc, cfg.num_layers),
        "block_size": cfg.gamma,
        "mask_token_id": cfg.mask_token_id,
        "target_layer_ids": sorted(cfg.feature_layers),
        "eagle_aux_hidden_state_layer_ids": capture,
        "num_target_layers": cfg.target_num_layers,
        "target_hidden_size": cfg.hidden_size,
        "draft_vocab_size": K,
        "markov_rank": cfg.rank if dspark else 1,
        "markov_head_type": "vanilla",
        "enable_confidence_head": bool(dspark and cfg.confidence),
        "confidence_head_with_markov": True,
        "dspark_bonus_anchor": False,
        "verifier": verifier,
        **extra,
    }


def export_drafter(drafter: Any, out: str | Path, fmt: str = "vllm", verifier: str | None = None) -> Path:
    """Write ``drafter`` (attached to its target) as a vLLM-loadable directory ``out``.

    Atomic: ``out`` appears complete or not at all; an existing ``out`` is refused."""
    out = Path(out)
    if out.exists():
        raise DSparkError(f"{out} already exists; refusing to overwrite an export")
    config = export_config(drafter, fmt, verifier)
    drafter._need_target()
    weights = _eagle3_weights(drafter) if drafter.cfg.kind == "eagle3" else _parallel_weights(drafter)
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------- import
def _infer_draft_config(conf: dict[str, Any], state: dict[str, torch.Tensor], target: Any) -> dict[str, Any]:
    """Our DraftConfig fields from a vLLM config (no ``dspark`` block)."""
    arch = (conf.get("architectures") or [""])[0]
    if "transformer_layer_config" in conf:
        conf = {**conf["transformer_layer_config"], **conf}
    capture = conf.get("eagle_aux_hidden_state_layer_ids")
    if capture is not None:
        layers = [int(i) - 1 for i in capture]
    elif conf.get("target_layer_ids") is not None:
        layers = [int(i) for i in conf["target_layer_ids"]]
    else:
        raise ModelLoadError("the checkpoint names no target layers (eagle_aux_hidden_state_layer_ids / target_layer_ids)")
    base = dict(
        target_name=target.name,
        target_model_type=target.config.model_type,
        target_vocab_size=target.vocab_size,
        target_num_layers=target.num_layers,
        hidden_size=target.hidden_size,
        feature_layers=layers,
        num_layers=int(conf["num_hidden_layers"]),
    )
    if arch.startswith("Eagle3") or conf.get("speculators_model_type") == "eagle3":
        gamma = conf.get("speculators_config", {}).get("proposal_methods", [{}])[0].get("speculative_tokens", 7)
        return dict(base, kind="eagle3", head="none", confidence=False, gamma=int(gamma))
    if arch != "Qwen3DSparkModel":
        raise ModelLoadError(f"cannot import a draft model of architecture {arch!r} (Qwen3DSparkModel or Eagle3 only)")
    if conf.get("dspark_bonus_anchor"):
        raise ModelLoadError("this DSpark checkpoint uses the 1+N bonus-anchor block, which this project does not implement")
    w2 = state["markov_head.markov_w2.weight"]
    zero_head = not bool(w2.any()) and not bool(state["markov_head.markov_w1.weight"].any())
    has_conf = "confidence_head.proj.weight" in state
    mask = conf.get("mask_token_id", conf.get("dflash_config", {}).get("mask_token_id"))
    if mask is None:
        raise ModelLoadError("the checkpoint names no mask_token_id")
    common = dict(base, gamma=int(conf["block_size"]), mask_token_id=int(mask))
    if zero_head and not has_conf:
        return dict(common, kind="dflash", head="none", confidence=False)
    return dict(common, kind="dspark", head="markov", rank=int(conf["markov_rank"]), confidence=has_conf)


def import_drafter(path: str | Path, target: Any) -> Any:
    """Rebuild one of our drafters from an exported (or third-party Qwen3 DSpark / Eagle3)
    vLLM checkpoint directory and attach it to ``target``."""
    from dspark.drafters.eagle3 import Eagle3Drafter
    from dspark.drafters.linked import DraftConfig
    from dspark.drafters.parallel import ParallelDrafter
    from dspark.drafters.vocab import DraftVocab
    from dspark.heads.calibration import STSCalibrator

    path = Path(path)
    if not (path / CONFIG).exists():
        raise ModelLoadError(f"{path} has no {CONFIG}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    conf = json.loads((path / CONFIG).read_text())
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    ours = conf.get("dspark", {})
    fields = dict(ours["drafter"]) if "drafter" in ours else _infer_draft_config(conf, state, target)
    if fields.get("target_model_type") != target.config.model_type:
        raise ModelLoadError(f"{path} drafts for model_type {fields.get('target_model_type')!r}, not {target.config.model_type!r}")
    cfg = DraftConfig(**fields)
    V = target.vocab_size
    if "d2t" in state:
        d2t = state["d2t"].long()
        vocab = DraftVocab(torch.arange(len(d2t)) + d2t, V)
    else:
        vocab = DraftVocab.full(V)
    kind = cfg.kind
    drafter = (Eagle3Drafter if kind == "eagle3" else ParallelDrafter)(cfg, target.config, vocab)
    order = _feature_order(cfg.feature_layers)
    inverse = [order.index(i) for i in range(len(order))]
    d = cfg.hidden_size
    sd: dict[str, torch.Tensor] = {"vocab.ids": vocab.ids.clone()}
    if kind == "eagle3":
        for k, v in state.items():
            if k.startswith("layers.0.") and not k.startswith("layers.0.hidden_norm."):
                sd["layer.layer." + k[len("layers.0."):]] = v
        sd["fc.weight"] = _permute_fc(state["fc.weight"], inverse, d)
        sd["hidden_norm.weight"] = state["layers.0.hidden_norm.weight"]
        sd["norm.weight"] = state["norm.weight"]
    else:
        for k, v in state.items():
            if k.startswith("layers."):
                i, rest = k[len("layers."):].split(".", 1)
                sd[f"backbone.layers.{i}.layer.{rest}"] = v
        sd["backbone.fc.weight"] = _permute_fc(state["fc.weight"], inverse, d)
        sd["backbone.ctx_norm.weight"] = state["hidden_norm.weight"]
        sd["backbone.norm.weight"] = state["norm.weight"]
        if kind == "dspark":
            w1 = state["markov_head.markov_w1.weight"]  # [V, r] by target id
            oov = torch.ones(V, dtype=torch.bool)
            oov[vocab.ids] = False
            # our out-of-vocabulary row: every OOV target id carries the same row in our exports
            oov_row = w1[oov.nonzero()[0, 0]] if bool(oov.any()) else torch.zeros(w1.shape[1])
            sd["head.w1.weight"] = torch.cat([w1[vocab.ids], oov_row[None]], 0)
            sd["head.w2.weight"] = state["markov_head.markov_w2.weight"]
            if cfg.confidence:
                sd["conf.proj.weight"] = state["confidence_head.proj.weight"]
                sd["conf.proj.bias"] = state["confidence_head.proj.bias"]
    try:
        missing, unexpected = drafter.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelLoadError(f"{path}: weights do not match the config: {e}") from e
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    drafter.calibrator = STSCalibrator.from_dict(ours.get("calibration", {}))
    drafter.attach(target)
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"].to(drafter._lm_w.dtype), drafter._lm_w.cpu()):
        raise ModelLoadError(f"{path}: its lm_head rows differ from the target's: exported for another target?")
    return drafter.to(dtype=torch.float32).eval()
