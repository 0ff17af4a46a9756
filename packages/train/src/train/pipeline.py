"""``run(cfg)``: prompts -> responses -> target features (offline cache or online) -> Lightning distillation
-> STS calibration -> evaluation -> drafter checkpoint, tracked in MLflow.

Every stage writes its result under ``cfg.output_dir`` with a stamp holding a hash of the
configuration it depends on; a rerun with the same configuration skips finished stages,
and an interrupted fit resumes from its last Lightning checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dspark.cache_dir import atomic_write_text
from train.config import launched_rank, repo_path, validate

KNOWN_DRAFTERS = ("dspark", "dflash", "eagle3")


def _hash(*parts: Any) -> str:
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Stage:
    """A finished-stage stamp: ``<out>/<name>.done.json`` with the config hash."""

    def __init__(self, out: Path, name: str, key: str) -> None:
        self.path, self.key, self.name = out / f"{name}.done.json", key, name

    def done(self) -> bool:
        if not self.path.exists():
            return False
        try:
            return json.loads(self.path.read_text()).get("key") == self.key
        except json.JSONDecodeError:
            return False

    def finish(self, **info: Any) -> None:
        atomic_write_text(self.path, json.dumps({"key": self.key, **info}, indent=1, default=str))

    def info(self) -> dict:
        return json.loads(self.path.read_text())


def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_path("."), timeout=5).stdout.strip()
    except Exception:
        return "unknown"


def run(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; returns the evaluation results (and writes everything to disk)."""
    import mlflow
    import torch

    from dspark.drafters import load_drafter
    from dspark.prompts import PromptFormat
    from dspark.target import Target
    from train.calibrate import calibrate, reliability_diagram
    from train.data import check_loss_masks
    from train.fit import claim_run_dir, fit

    validate(cfg)
    rank, world = launched_rank()
    if rank != 0:
        _follow(cfg, rank)
        return {}
    out = repo_path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        _prepared_path(out).unlink(missing_ok=True)
        _log(f"launched run: rank 0 of {world} prepares data and caches, then all {world} processes fit")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tc, dc = cfg.target, cfg.drafter
    fmt = PromptFormat(**OmegaConf.to_container(tc.prompt_format, resolve=True))
    target = Target.load(tc.path, dtype=tc.dtype, prompt_format=fmt)
    _log(f"target {target.name}: {target.num_layers} layers, vocab {target.vocab_size}, {target.dtype}")

    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    mlflow.set_experiment(cfg.logger.experiment)
    flat = {k: str(v) for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
    with mlflow.start_run(run_name=cfg.experiment_name):
        mlflow.set_tags({"target": target.name, "drafter": dc.name, "git_commit": _git_commit(), "experiment": cfg.experiment_name})
        mlflow.log_params({k: v[:500] for k, v in list(flat.items())[:400]})

        if dc.name == "ngram":  # nothing to train: evaluate the baseline only
            from dspark.drafters import NgramDrafter

            return _evaluate_and_log(cfg, out, target, NgramDrafter(max_ngram=dc.max_ngram, num_tokens=dc.gamma), _hash(dc), t0)

        # 1-2. prompts and responses ----------------------------------------------------
        train_rows, held_rows, responses = _prompts_and_responses(cfg, target, out)
        _log(f"prompts: {len(train_rows)} train, {len(held_rows)} held out; responses: {cfg.data.responses}")
        examples = _examples(target, train_rows, responses, cfg.data.max_length)
        if not examples:
            raise ValueError(f"no example keeps a response token within data.max_length={cfg.data.max_length}")
        sup, tot = check_loss_masks(examples)
        _log(f"examples: {len(examples)}, {sup} supervised of {tot} tokens")
        mlflow.log_metrics({"data_examples": len(examples), "data_supervised_tokens": sup})

        # 3. target features (offline cache, shared across experiments) ---------------
        fit_key = _fit_key(cfg, examples)
        fit_stage = Stage(out, "fit", fit_key)
        ckpt_dir = out / "drafter"
        features = topk = None
        if cfg.trainer.features == "online" and int(cfg.trainer.get("target_topk", 0)):
            _log("trainer.features=online: the step runs the target, so it uses exact target distributions (trainer.target_topk applies to the offline cache only)")
        if cfg.trainer.features == "offline" and not (fit_stage.done() and ckpt_dir.exists()):
            from train.features import FeatureCache, build

            t_f = time.perf_counter()
            fdir = build(target, examples, list(dc.feature_layers), out.parent / "features", storage=cfg.trainer.feature_storage,
                         shard_tokens=cfg.trainer.feature_shard_tokens, progress=cfg.progress)
            features = FeatureCache(fdir, dtype=target.dtype)
            fm = features.m
            _log(f"features: {fdir} ({fm['num_tokens']} tokens, {fm['bytes_per_token']} B/token {fm['storage']}; "
                 f"published layout 6 + 2(m+1)d = {fm['published_bytes_per_token']} B/token; {time.perf_counter() - t_f:.0f} s)")
            mlflow.log_metrics({"features_bytes_per_token": fm["bytes_per_token"], "features_total_gib": fm["bytes_total"] / 2**30})
            mlflow.set_tag("features_dir", str(fdir))
            k = int(cfg.trainer.get("target_topk", 0))
            if k:
                from train.features import TopkCache, build_topk

                t_k = time.perf_counter()
                vocab = _draft_vocab(cfg, target, examples)
                vids = vocab.ids if vocab is not None and cfg.trainer.get("target_topk_scope", "full") == "draft_vocab" else None
                topk = TopkCache(build_topk(target, examples, features, k, progress=cfg.progress, vocab_ids=vids), features, vids)
                over = "the full vocabulary" if vids is None else f"the {len(vids)}-token draft vocabulary"
                _log(f"target top-{topk.k} log-probs over {over}: {topk.path} ({topk.m['rows_filled']} rows; {time.perf_counter() - t_k:.0f} s)")

        if world > 1:  # the other ranks of a launched run wait for this, then join the fit
            done = fit_stage.done() and ckpt_dir.exists()
            claim_run_dir(out / "lightning", fit_key)  # stale checkpoints go before anyone reads last.ckpt
            atomic_write_text(_prepared_path(out), json.dumps({
                "launch": _launch_id(), "fit_key": fit_key, "fit": "done" if done else "pending",
                "features": str(features.path) if features is not None else None,
                "topk": str(topk.path) if topk is not None else None}, indent=1))

        # 4. distillation --------------------------------------------------------------
        if fit_stage.done() and ckpt_dir.exists():
            _log("fit: done for this config, skipped")
            drafter = load_drafter(str(ckpt_dir), target)
        else:
            module = _new_module(cfg, target, examples)
            from lightning.pytorch.loggers import MLFlowLogger

            logger = MLFlowLogger(tracking_uri=cfg.logger.tracking_uri, run_id=mlflow.active_run().info.run_id)
            t_s = time.perf_counter()
            fit(module, examples, out / "lightning", cfg.trainer.max_steps, cfg.trainer.batch_size, logger=logger,
                features=features, topk=topk, run_key=fit_key, **_fit_kwargs(cfg))
            drafter = module.drafter.float().eval()
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
            drafter.save_pretrained(str(ckpt_dir))
            fit_stage.finish(steps=cfg.trainer.max_steps)
            _log(f"fit: {cfg.trainer.max_steps} steps in {time.perf_counter() - t_s:.0f} s")
        drafter = drafter.to(target.dtype) if target.dtype != torch.float32 else drafter

        # 4b. teacher-forced tau_est on held-out text: the target's own vs curated answers
        ho_stage = Stage(out, "heldout_tau", _hash(fit_key, "heldout_tau", cfg.eval.get("heldout_examples", 24)))
        t_s = time.perf_counter()
        if ho_stage.done():
            ho = ho_stage.info()["tau_est"]
        else:
            ho = _heldout_tau(cfg, target, drafter, held_rows, responses)
            ho_stage.finish(tau_est=ho)
        for name, v in ho.items():
            if v is not None:
                mlflow.log_metric(f"heldout_tau_est_{name}", v)
        _log(f"held-out teacher-forced tau_est (gamma {dc.gamma}): " + ", ".join(f"{k} {v:.3f}" for k, v in ho.items() if v is not None)
             + f" ({time.perf_counter() - t_s:.0f} s)")

        # 4c. teacher-forced tau_est on the benchmarks' prompts: every drafter scored on the
        # same target continuations (sampled once per target, shared), so runs pair prompt by prompt
        n_bt = int(cfg.eval.get("tau_est_prompts", 0) or 0)
        if n_bt:
            from train.bench_tau import bench_tau_est, target_continuations

            benches = list(cfg.eval.benchmarks)
            bt_stage = Stage(out, "bench_tau_est", _hash(fit_key, "bench_tau_est", benches, n_bt, cfg.eval.max_new_tokens, cfg.seed))
            t_s = time.perf_counter()
            if bt_stage.done():
                bt = bt_stage.info()["results"]
            else:
                conts = target_continuations(target, benches, n_bt, int(cfg.eval.max_new_tokens), out.parent / "bench_continuations",
                                             seed=cfg.seed, batch_size=int(cfg.eval.get("batch_size", 1)), progress=cfg.progress)
                bt = bench_tau_est(target, drafter, dc.name, conts, seed=cfg.seed, progress=cfg.progress)
                bt_stage.finish(results=bt)
            for bench, v in bt.items():
                mlflow.log_metric(f"bench_tau_est_{bench}", v["tau_est"])
            if bt["macro"]["se"] is not None:
                mlflow.log_metric("bench_tau_est_macro_se", bt["macro"]["se"])
            mlflow.log_text(json.dumps(bt, indent=1), "bench_tau_est.json")
            se = bt["macro"]["se"]
            _log(f"benchmark teacher-forced tau_est ({n_bt} prompts each, target's own T = 1 continuations): macro "
                 f"{bt['macro']['tau_est']:.3f}" + (f" +- {se:.3f}" if se is not None else "") + ", "
                 + ", ".join(f"{b} {bt[b]['tau_est']:.2f}" for b in benches) + f" ({time.perf_counter() - t_s:.0f} s)")

        # 5. calibration (drafters with a confidence head) ---------------------------
        held = [target.encode_prompt(r["turns"][0]) for r in list(held_rows)[: cfg.eval.calibration_prompts]]
        if getattr(drafter, "conf", None) is not None and held:
            cal_stage = Stage(out, "calibrate", _hash(fit_key, cfg.eval.calibration_prompts, cfg.eval.calibration_max_new_tokens))
            if cal_stage.done() and cal_stage.info().get("temperatures"):
                drafter.calibrator.temperatures = cal_stage.info()["temperatures"]
                _log("calibrate: done for this config, skipped")
            else:
                t_s = time.perf_counter()
                cal = calibrate(target, drafter, held, dc.gamma, cfg.eval.calibration_max_new_tokens, seed=cfg.seed)
                png = reliability_diagram(cal, out / "reliability.png")
                mlflow.log_artifact(str(png))
                rep = cal.report
                for k in ("ece_before", "ece_after", "auc_before", "auc_after"):
                    vals = [v for v in rep[k] if v == v]
                    if vals:
                        mlflow.log_metric(f"sts_{k}_mean", sum(vals) / len(vals))
                _log(f"STS: ECE {[round(v, 4) for v in rep['ece_before']]} -> {[round(v, 4) for v in rep['ece_after']]} "
                     f"({time.perf_counter() - t_s:.0f} s)")
                shutil.rmtree(ckpt_dir)
                drafter.float().save_pretrained(str(ckpt_dir))
                drafter = drafter.to(target.dtype)
                cal_stage.finish(temperatures=cal.temperatures, report=rep)

        mlflow.log_artifacts(str(ckpt_dir), artifact_path="drafter")
        results = _evaluate_and_log(cfg, out, target, drafter, fit_key, t0)
    return results



def _new_module(cfg: DictConfig, target: Any, examples: list) -> Any:
    """A fresh drafter wrapped in its Lightning module; deterministic in (cfg, examples), so
    every process of a launched run builds the same one."""
    from dspark.drafters import build_drafter
    from train.module import DistillModule

    dc = cfg.drafter
    vocab = _draft_vocab(cfg, target, examples)
    # eagle3 is one layer by definition; the others take their sizes from the config
    extra = {} if dc.name == "eagle3" else {k: dc[k] for k in ("num_layers", "head", "rank", "mask_token_id") if k in dc}
    drafter = build_drafter(dc.name, target, gamma=dc.gamma, feature_layers=list(dc.feature_layers), vocab=vocab, **extra)
    if dc.get("init", "random") == "target":  # validated in train.config: dspark / dflash only
        src = drafter.backbone.init_from_target(target.layers, target.decoder.norm, list(dc.feature_layers))
        _log(f"drafter layers warm-started from target layers {src} (drafter.init=target)")
    return DistillModule(
        drafter, target, dc.name, lr=cfg.trainer.lr, warmup_frac=cfg.trainer.warmup_frac,
        total_steps=cfg.trainer.max_steps, anchors_per_seq=cfg.trainer.anchors_per_seq,
        loss_weights=tuple(dc.get("loss_weights", (0.1, 0.9, 1.0))), ttt_steps=dc.get("ttt_steps", 7), seed=cfg.seed,
    )


def _draft_vocab(cfg: DictConfig, target: Any, examples: list) -> Any:
    """The drafter's vocabulary: the ``drafter.draft_vocab_size`` most frequent ids of the
    examples (EOS always in), or None for the full vocabulary. Deterministic in its inputs."""
    from dspark.drafters import DraftVocab
    from dspark.drafters.vocab import count_tokens

    size = cfg.drafter.get("draft_vocab_size")
    if not size:
        return None
    counts = count_tokens((e.input_ids for e in examples), target.vocab_size)
    return DraftVocab.from_counts(counts, size, always=target.eos_token_ids)


def _fit_kwargs(cfg: DictConfig) -> dict[str, Any]:
    tr = cfg.trainer
    return dict(
        precision=tr.precision, grad_clip=tr.grad_clip, ckpt_every=tr.ckpt_every, seed=cfg.seed, progress=cfg.progress,
        log_every=int(tr.get("log_every", 10)), accelerator=str(tr.get("accelerator", "auto")),
        devices=tr.get("devices", 1), num_nodes=int(tr.get("num_nodes", 1)), strategy=str(tr.get("strategy", "auto")),
    )


def _fit_key(cfg: DictConfig, examples: list) -> str:
    # the examples themselves are part of the key: a grown response file retrains
    ex_key = hashlib.sha256(json.dumps([(e.id, e.input_ids) for e in examples]).encode()).hexdigest()[:16]
    return _hash(cfg.target, cfg.drafter, cfg.data, _trainer_key(cfg.trainer), cfg.seed, ex_key)


# ---------------------------------------------------------------------------- launched runs
# torchrun / SLURM start the whole command once per process. Rank 0 runs the pipeline as a
# single process would (data, caches, MLflow, evaluation); every other rank waits for its
# "prepared" marker, rebuilds the same examples and module from the shared output directory
# and joins the fit only. The output directory must be on a filesystem all nodes share.


def _launch_id() -> str:
    """Names one launch, the same in all its processes: rank 0's marker must come from this
    launch, not an earlier one."""
    for k in ("DSPARK_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        v = os.environ.get(k)
        if v and v != "none":
            return f"{k}={v}"
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _prepared_path(out: Path) -> Path:
    return out / "prepared.json"


def _wait_prepared(out: Path, timeout_s: float, poll_s: float = 2.0) -> dict:
    path, launch, t0, said = _prepared_path(out), _launch_id(), time.monotonic(), 0.0
    while True:
        if path.exists():
            try:
                info = json.loads(path.read_text())
            except json.JSONDecodeError:
                info = {}
            if info.get("launch") == launch:
                return info
        waited = time.monotonic() - t0
        if waited > timeout_s:
            raise TimeoutError(f"rank 0 did not prepare {out} within trainer.prepare_timeout_s={timeout_s:.0f} s "
                               f"(no {path.name} for launch {launch}); is output_dir on a filesystem every node shares?")
        if waited - said >= 60:
            said = waited
            _log(f"waiting for rank 0 to prepare data and caches ({waited:.0f} s)")
        time.sleep(poll_s)


def _follow(cfg: DictConfig, rank: int) -> None:
    """A non-zero rank of a launched run: wait for rank 0's caches, then train alongside it."""
    import torch

    from dspark.prompts import PromptFormat
    from dspark.target import Target
    from train.fit import fit

    out = repo_path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    tc = cfg.target
    target = Target.load(tc.path, dtype=tc.dtype, prompt_format=PromptFormat(**OmegaConf.to_container(tc.prompt_format, resolve=True)))
    if cfg.data.responses == "regenerate":  # this rank's share of the responses; rank 0 merges them
        _prompts_and_responses(cfg, target, out)
    _log(f"rank {rank}: rank 0 prepares the data and caches in {out}; waiting for it")
    info = _wait_prepared(out, float(cfg.trainer.get("prepare_timeout_s", 14400)))
    if info.get("fit") == "done":
        _log(f"rank {rank}: the fit is already done for this config; nothing to do")
        return
    train_rows, _held, responses = _prompts_and_responses(cfg, target, out)  # rank 0 merged any regeneration
    examples = _examples(target, train_rows, responses, cfg.data.max_length)
    key = _fit_key(cfg, examples)
    if key != info.get("fit_key"):
        raise RuntimeError(f"rank {rank} built other training examples than rank 0 (fit key {key} vs {info.get('fit_key')}): "
                           "do all nodes see the same repository, data files and configuration?")
    features = topk = None
    if info.get("features"):
        from train.features import FeatureCache, TopkCache

        features = FeatureCache(Path(info["features"]), dtype=target.dtype)
    module = _new_module(cfg, target, examples)
    if features is not None and info.get("topk"):
        vocab = module.drafter.vocab
        topk = TopkCache(Path(info["topk"]), features, None if vocab is None or vocab.is_full else vocab.ids)
    fit(module, examples, out / "lightning", cfg.trainer.max_steps, cfg.trainer.batch_size, logger=False,
        features=features, topk=topk, run_key=key, **_fit_kwargs(cfg))
    _log(f"rank {rank}: fit done")


def _prompts_and_responses(cfg: DictConfig, target: Any, out: Path) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Stages 1-2: prompt rows (domain-interleaved, split into train / held out) and a
    response per row: id -> Record (on-policy, with the target's token ids) or str."""
    from train.data import DataError, interleave_domains, read_prompts, split_heldout
    from train.regenerate import load_shipped, regenerate

    dcfg = cfg.data
    rows = interleave_domains(list(read_prompts(repo_path(dcfg.train_file))), salt=str(cfg.seed))
    responses: dict[str, Any]
    if dcfg.responses == "onpolicy":
        shipped, meta = load_shipped(repo_path(dcfg.onpolicy_file), target, temperature=float(dcfg.regenerate.temperature))
        rows = [r for r in rows if r["id"] in shipped]
        if not rows:
            raise DataError(f"data.onpolicy_file {dcfg.onpolicy_file} has no response for any prompt of {dcfg.train_file}")
        _log(f"on-policy responses: {dcfg.onpolicy_file} ({meta.get('rows')} rows, T={meta.get('temperature')}, "
             f"made {meta.get('date')} by `{meta.get('command')}`)")
        responses = shipped
    if dcfg.max_prompts:
        rows = rows[: int(dcfg.max_prompts)]
    import datasets

    train_ds, held_ds = split_heldout(datasets.Dataset.from_list(rows), float(dcfg.heldout_fraction), salt=str(cfg.seed))
    train_rows, held_rows = list(train_ds), list(held_ds)
    if dcfg.responses == "regenerate":
        rc = dcfg.regenerate
        resp_file = out.parent / f"responses_{_hash(target.name, cfg.target.dtype, rc, dcfg.train_file, cfg.seed)}.jsonl"
        rank, world = launched_rank()
        if world > 1 and not _regenerate_shared(cfg, target, train_rows + held_rows, resp_file, rank, world):
            return train_rows, held_rows, {}  # rank > 0: its share is written; rank 0 merges
        responses = regenerate(target, train_rows + held_rows, resp_file, int(rc.max_new_tokens), float(rc.temperature),
                               cfg.seed, int(rc.batch_size), progress=cfg.progress)
    elif dcfg.responses == "reference":
        missing = [r["id"] for r in train_rows if not r["reference"]]
        if missing:
            raise DataError(f"data.responses=reference but {len(missing)} prompts have no 'reference' answer")
        responses = {r["id"]: r["reference"] for r in train_rows + held_rows if r["reference"]}
    return train_rows, held_rows, responses


def _regenerate_shared(cfg: DictConfig, target: Any, rows: list[dict], resp_file: Path, rank: int, world: int) -> bool:
    """Regeneration split over the ranks of a launched run: rank r samples rows r, r + world,
    ... into its own part file (resumable; every row has its own seed, so who samples it does
    not matter); rank 0 waits for every part and merges them into ``resp_file`` by prompt id.
    Returns True on rank 0 (``resp_file`` now holds every row), False on the other ranks."""
    from train.regenerate import read_done, regenerate

    done = read_done(resp_file)
    if all(r["id"] in done for r in rows):
        return True  # an earlier run made them all
    rc, launch = cfg.data.regenerate, _launch_id()
    part = resp_file.with_name(f"{resp_file.stem}.part{rank}of{world}.jsonl")
    mine = [r for i, r in enumerate(rows) if i % world == rank]
    _log(f"rank {rank}: regenerating {len(mine)} of {len(rows)} responses into {part.name}")
    regenerate(target, mine, part, int(rc.max_new_tokens), float(rc.temperature), cfg.seed, int(rc.batch_size), progress=cfg.progress)
    atomic_write_text(Path(f"{part}.done"), launch)
    if rank != 0:
        return False
    parts = [resp_file.with_name(f"{resp_file.stem}.part{r}of{world}.jsonl") for r in range(world)]
    timeout, t0 = float(cfg.trainer.get("prepare_timeout_s", 14400)), time.monotonic()
    for p in parts:
        flag = Path(f"{p}.done")
        while not (flag.exists() and flag.read_text() == launch):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{p.name} was not finished within trainer.prepare_timeout_s={timeout:.0f} s")
            time.sleep(2.0)
    for p in parts:
        done.update(read_done(p))
    missing = [r["id"] for r in rows if r["id"] not in done]
    if missing:
        raise RuntimeError(f"regeneration parts lack {len(missing)} responses (e.g. {missing[:3]})")
    # every record: the file may also hold rows of runs with other data.max_prompts
    atomic_write_text(resp_file, "".join(json.dumps(rec.__dict__, ensure_ascii=False) + "\n" for rec in done.values()))
    for p in parts:
        p.unlink(missing_ok=True)
        Path(f"{p}.done").unlink(missing_ok=True)
    _log(f"regeneration: {world} parts merged into {resp_file.name} ({len(rows)} responses)")
    return True


def _heldout_tau(cfg: DictConfig, target: Any, drafter: Any, held_rows: list[dict], responses: dict[str, Any]) -> dict[str, float | None]:
    """Teacher-forced acceptance estimate (the training loss's tau_est) on held-out prompts,
    once on the target's own responses (the shipped/regenerated on-policy ones, if this run
    has them) and once on the datasets' reference answers: a gap is a data shift."""
    import torch

    from train.fit import collate
    from train.module import DistillModule

    n = int(cfg.eval.get("heldout_examples", 24))
    rows = held_rows[:n]
    sets: dict[str, list] = {
        "reference": _examples(target, rows, {r["id"]: r["reference"] for r in rows if r.get("reference")}, cfg.data.max_length),
    }
    onp = {r["id"]: responses[r["id"]] for r in rows if r["id"] in responses and getattr(responses[r["id"]], "response_ids", None) is not None}
    sets["onpolicy"] = _examples(target, rows, onp, cfg.data.max_length)
    was = next(drafter.parameters()).dtype
    drafter = drafter.float()
    module = DistillModule(drafter, target, cfg.drafter.name, anchors_per_seq=64, seed=cfg.seed + 1)
    result: dict[str, float | None] = {}
    with torch.no_grad():
        for name, exs in sets.items():
            taus = []
            for i in range(0, len(exs), 4):
                batch = collate(exs[i : i + 4])  # ids and masks: features come from the target (online)
                out = module.ttt_loss(batch) if cfg.drafter.name == "eagle3" else module.block_loss(batch)
                taus.append(float(out["tau_est"]))
            result[name] = sum(taus) / len(taus) if taus else None
    drafter.to(was)
    return result


def _examples(target: Any, rows: list[dict], responses: dict[str, Any], max_length: int) -> list:
    """Tokenised examples; on-policy records keep the exact ids the target sampled."""
    from train.data import build_example

    out = []
    for r in rows:
        resp = responses.get(r["id"])
        if resp is None:
            continue
        ids = getattr(resp, "response_ids", None)
        text = getattr(resp, "response", resp)
        e = build_example(target, r["id"], r["turns"], text, max_length, response_ids=ids)
        if e is not None:
            out.append(e)
    return out


def _evaluate_and_log(cfg: DictConfig, out: Path, target: Any, drafter: Any, fit_key: str, t0: float) -> dict:
    """Stage 6 (evaluation) and the final MLflow logging; inside the active run."""
    import mlflow

    from train.evaluate import evaluate, tau_markdown

    dc = cfg.drafter
    ev_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    fallback = int(ev_cfg.get("ngram_fallback", 0) or 0)
    greedy_n = ev_cfg.get("greedy_prompts_per_benchmark")
    if greedy_n is None or greedy_n >= ev_cfg["prompts_per_benchmark"]:
        ev_cfg.pop("greedy_prompts_per_benchmark", None)  # the same prompts at every temperature: the key before the option
    ev_cfg.pop("tau_est_prompts", None)  # its own stage (4c): not part of the decoded evaluation's key
    if not fallback:
        ev_cfg.pop("ngram_fallback", None)  # off: the same key as before the option existed
    elif getattr(drafter, "feature_layers", None) is None:
        raise ValueError(f"eval.ngram_fallback needs a trained drafter; {dc.name!r} is not one")
    else:
        from dspark.drafters.fallback import NgramFallbackDrafter

        drafter = NgramFallbackDrafter(drafter, min_match=fallback, num_tokens=dc.gamma)
        _log(f"evaluate: prompt lookup (n-gram >= {fallback} tokens) in front of the {dc.name} drafter")
    name = drafter.name
    ev_stage = Stage(out, "evaluate", _hash(fit_key, ev_cfg))
    if ev_stage.done():
        results = ev_stage.info()["results"]
        _log("evaluate: done for this config, skipped")
    else:
        t_s = time.perf_counter()
        results = evaluate(
            target, drafter, list(cfg.eval.benchmarks), cfg.eval.prompts_per_benchmark, cfg.eval.max_new_tokens,
            list(cfg.eval.temperatures), dc.gamma, seed=cfg.seed, progress=cfg.progress,
            batch_size=int(cfg.eval.get("batch_size", 1)), greedy_prompts_per_benchmark=cfg.eval.get("greedy_prompts_per_benchmark"),
        )
        ev_stage.finish(results=results)
        _log(f"evaluate: {time.perf_counter() - t_s:.0f} s")
    table = tau_markdown(results, name)
    atomic_write_text(out / "tau.md", table + "\n")
    for t, rows in results.items():
        for bench, vals in rows.items():
            mlflow.log_metric(f"tau_{bench}_T{t[2:]}", vals["tau"])
    mlflow.log_text(json.dumps(results, indent=1), "tau.json")
    mlflow.log_artifact(str(out / "tau.md"))
    _per_position_plot(results, out / "per_position.png")
    mlflow.log_artifact(str(out / "per_position.png"))
    mlflow.log_metric("wall_seconds", time.perf_counter() - t0)
    _log("tau:\n" + table)
    _log(f"total {time.perf_counter() - t0:.0f} s")
    return results


def wilson_interval(accepted: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (sensible at 0, 1 and small n)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = accepted / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return c - h, c + h


def _per_position_plot(results: dict, path: Path) -> None:
    """Conditional acceptance per draft position, one line per temperature: the rate pooled
    over all benchmarks' rounds with its 95 % Wilson interval, and how many rounds reached
    each position (late positions are reached rarely, so their rates are uncertain). Results
    without per-position counts (older runs) get the mean over benchmarks with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for t, rows in results.items():
        benches = {b: v for b, v in rows.items() if b != "macro"}
        counts = [v.get("per_position_counts") for v in benches.values()]
        if counts and all(counts):
            n = np.sum([[c[0] for c in cs] for cs in counts], axis=0)
            acc = np.sum([[c[1] for c in cs] for cs in counts], axis=0)
            k = np.arange(1, len(n) + 1)
            ok = n > 0
            rate = np.where(ok, acc / np.maximum(n, 1), np.nan)
            lo, hi = np.array([wilson_interval(int(a), int(m)) for a, m in zip(acc, n)]).T
            line = ax.plot(k[ok], rate[ok], marker="o", label=f"{t}: pooled over {len(benches)} benchmarks")[0]
            ax.fill_between(k[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, label=f"{t}: 95 % interval")
            for kk, r, m in zip(k[ok], rate[ok], n[ok]):
                ax.annotate(f"n={m}", (kk, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6, color=line.get_color())
            continue
        curves = [[v if v is not None else np.nan for v in vals["per_position"]] for vals in benches.values() if vals.get("per_position")]
        if not curves:
            continue
        a = np.array(curves, dtype=float)
        k = np.arange(1, a.shape[1] + 1)
        with warnings.catch_warnings():  # a position no benchmark reached is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, hi = np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
        line = ax.plot(k, mean, marker="o", label=f"{t}: mean of {len(curves)} benchmarks")[0]
        ax.fill_between(k, lo, hi, color=line.get_color(), alpha=0.2, label=f"{t}: min-max over benchmarks")
    ax.set_xlabel("draft position k (n: rounds that reached it)")
    ax.set_ylabel("P(draft k accepted | drafts < k accepted)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trainer_key(tr: DictConfig) -> dict:
    """The trainer settings a trained drafter depends on: sharding never changes the
    features, and the storage type only matters when features come from the cache."""
    d = OmegaConf.to_container(tr, resolve=True)
    d.pop("feature_shard_tokens", None)
    d.pop("log_every", None)  # how often metrics are logged never changes the drafter
    for k in ("accelerator", "devices", "num_nodes", "strategy", "prepare_timeout_s"):
        d.pop(k, None)  # nor how many processes share the global batch (same drafter; a run may resume on another count)
    if d.get("target_topk_scope", "full") == "full":  # the setting's value before it existed: old keys stay valid
        d.pop("target_topk_scope", None)
    if d.get("features") != "offline":  # online steps read exact targets: no cache, no top-k
        d.pop("feature_storage", None)
        d.pop("target_topk", None)
        d.pop("target_topk_scope", None)
    return d


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}
