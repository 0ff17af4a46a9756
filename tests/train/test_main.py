"""`python -m train`: every experiment composes; the whole pipeline runs end to end on a
tiny target for each drafter, skips finished stages on a rerun, logs to MLflow, and bad
input fails with a message that names the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.train.tiny_model import make_tiny_model_dir
from train.paths import conf_dir

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={exp}", "+recipe=paper"] if exp.startswith("gemma") else [f"experiment={exp}"])
    target, drafter = exp.split("_", 1)
    assert cfg.drafter.name == drafter and cfg.experiment_name == f"{target}_{drafter}"
    if target == "gemma":
        assert cfg.target.path == "gemma3-270m" and cfg.trainer.batch_size == 512  # the recipe override
        assert drafter in ("eagle3", "ngram") or cfg.drafter.num_layers == 5
    else:
        assert OmegaConf.is_missing(cfg.target, "path")  # must be given on the command line
    if drafter != "ngram":  # the n-gram baseline reads no target features
        assert list(cfg.drafter.feature_layers) == list(cfg.target.feature_layers)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def train(tmp: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m train ...` in a fresh interpreter: the command line itself (Hydra's errors,
    exit codes). Each launch pays the imports (~20 s on the 2-core box)."""
    args = [sys.executable, "-m", "train", f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/hydra", *overrides]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def composed(*overrides: str):
    """The config `python -m train <overrides>` would run."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def train_here(tmp: Path, capfd, *overrides: str) -> subprocess.CompletedProcess:
    """The same job in this process: the command line's config composition and error
    handling (``train.__main__.execute``) without a new interpreter."""
    from train.__main__ import execute

    cfg = composed(f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", *overrides)
    capfd.readouterr()
    code = execute(cfg)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(list(overrides), code, out, err)


@pytest.mark.parametrize("drafter", ["dspark", "dflash", "eagle3"])
def test_tiny_end_to_end(tmp_path, tiny_dir, drafter, capfd):
    out = tmp_path / "out"
    mode = "online" if drafter == "eagle3" else "offline"  # both feature modes run end to end
    common = (f"experiment=tiny_{drafter}", f"target.path={tiny_dir}", f"output_dir={out}", f"trainer.features={mode}")
    if drafter == "dflash":  # the fit in two spawned CPU processes (gloo), everything else once
        common += ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn")
    proc = train_here(tmp_path, capfd, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if drafter == "dflash":
        assert "[train] fit: 2 processes" in proc.stdout and "per-process [2, 2]" in proc.stdout
    assert ("[train] features: " in proc.stdout) == (mode == "offline")
    assert (tmp_path / "features").exists() == (mode == "offline")
    assert (out / "drafter" / "config.json").exists() and (out / "tau.md").exists()
    results = json.loads((out / "evaluate.done.json").read_text())["results"]
    assert set(results) == {"T=1", "T=0"} and results["T=1"]["gsm8k"]["tau"] >= 1.0
    assert (out / "reliability.png").exists() == (drafter == "dspark")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.search_runs(experiment_names=["dspark"], output_format="list")[0]
    assert run.data.tags["drafter"] == drafter and "tau_gsm8k_T1" in run.data.metrics and "loss" in run.data.metrics
    # teacher-forced tau_est on the benchmarks' prompts (eval.tau_est_prompts: 2 in the tiny experiments)
    bt = json.loads((out / "bench_tau_est.done.json").read_text())["results"]
    assert set(bt) == {"gsm8k", "mt-bench", "macro"} and all(len(bt[b]["per_prompt"]) == 2 for b in ("gsm8k", "mt-bench"))
    assert 1.0 <= bt["macro"]["tau_est"] <= 5.0 and "bench_tau_est_macro" in run.data.metrics
    assert len(list((tmp_path / "bench_continuations").glob("*.json"))) == 1
    if drafter == "dspark":  # a second run with the same config skips every stage
        again = train_here(tmp_path, capfd, *common)
        assert again.returncode == 0, again.stderr[-2000:]
        for stage in ("fit", "calibrate", "evaluate"):
            assert f"{stage}: done for this config, skipped" in again.stdout



def test_torchrun_launch_trains_what_one_process_trains(tmp_path, tiny_dir, capfd):
    """`torchrun --nproc_per_node 2 -m train ... trainer.strategy=ddp` (how a multi-node job
    starts): both ranks regenerate half of the responses, rank 0 merges them, builds the
    caches and logs; rank 1 waits for its marker and joins the fit only. The drafter equals the one-process run's (same global batch), there
    is one MLflow run, and a relaunch skips every stage on both ranks."""
    from safetensors.torch import load_file

    common = ("experiment=tiny_dspark", f"target.path={tiny_dir}")
    launched = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
                *common, f"output_dir={tmp_path}/a", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                f"logger.tracking_uri=sqlite:///{tmp_path}/a.db", f"hydra.run.dir={tmp_path}/hydra_a"]
    proc = subprocess.run(launched, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = proc.stdout
    assert "rank 1: rank 0 prepares the data and caches" in log and "rank 1: fit done" in log
    # the tiny experiment regenerates its responses: split over both ranks, merged by rank 0
    assert "rank 0: regenerating 20 of 40 responses" in log and "rank 1: regenerating 20 of 40 responses" in log
    assert "regeneration: 2 parts merged" in log
    assert "[train] fit: 2 processes (1 node(s) x 2 device(s), strategy ddp); global batch 4 -> per-process [2, 2]" in log
    assert log.count("[train] examples:") == 1 and log.count("[train] features:") == 1  # caches built once
    one = train_here(tmp_path, capfd, *common, f"output_dir={tmp_path}/solo/b")  # its own response file and caches
    assert one.returncode == 0, one.stderr[-3000:]
    from train.regenerate import read_done

    (merged,), (single,) = (list(d.glob("responses_*.jsonl")) for d in (tmp_path, tmp_path / "solo"))
    m, o = read_done(merged), read_done(single)
    assert len(m) == 40 and {k: r.response_ids for k, r in m.items()} == {k: r.response_ids for k, r in o.items()}
    a, b = (load_file(tmp_path / d / "drafter" / "model.safetensors") for d in ("a", "solo/b"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/a.db")
    assert len(mlflow.search_runs(experiment_names=["dspark"], output_format="list")) == 1
    again = subprocess.run(launched, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "fit: done for this config, skipped" in again.stdout
    assert "rank 1: the fit is already done for this config; nothing to do" in again.stdout

def test_bad_input_fails_clearly(tmp_path, tiny_dir, capfd):
    from train.config import ConfigError, validate

    proc = train(tmp_path, "experiment=tiny_dspark")  # a config error: exit code 2 and the message
    assert proc.returncode == 2 and "target.path is required" in proc.stderr
    for overrides, msg in [(("target.dtype=int8",), "target.dtype='int8' is invalid"),  # the same check, in process
                           (("trainer.num_nodes=2",), "trainer.num_nodes=2 is invalid"),
                           (("trainer.devices=2", "trainer.strategy=ddp"), "trainer.strategy='ddp' is invalid.*ddp_spawn")]:
        with pytest.raises(ConfigError, match=msg):
            validate(composed("experiment=tiny_dspark", f"target.path={tiny_dir}", *overrides))
    proc = train(tmp_path, "experiment=tiny_dspark", "trainer.nonsense=1")
    assert proc.returncode != 0 and "nonsense" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok?"], "reference": "yes"}\n{"turns": ["broken"\n')
    proc = train_here(tmp_path, capfd, "experiment=tiny_dspark", f"target.path={tiny_dir}", f"data.train_file={bad}", f"output_dir={tmp_path}/o")
    assert proc.returncode == 2 and "[train] data error: " in proc.stderr and "bad.jsonl:2: malformed JSON" in proc.stderr
    proc = train(tmp_path, "experiment=nope")
    assert proc.returncode != 0 and "nope" in proc.stderr


def test_ratio_with_se_is_the_delta_method():
    from train.compare import ratio_with_se

    r, se = ratio_with_se(1.8, 0.09, 1.5, 0.06)
    assert r == pytest.approx(1.2) and se == pytest.approx(1.2 * (0.05**2 + 0.04**2) ** 0.5)
    assert ratio_with_se(1.8, None, 1.5, 0.06) == (pytest.approx(1.2), None)
    with pytest.raises(ValueError, match="non-positive"):
        ratio_with_se(1.0, 0.1, 0.0, 0.1)


def _synthetic_run(rng, prompt_effect, drafter_tau, n_bench=4, n_prompts=12, rounds=40):
    """Per-prompt [emitted, rounds] records: a prompt's mean tokens per round is the
    drafter's level times the prompt's shared difficulty, plus noise of its own."""
    res = {}
    for b in range(n_bench):
        pp = []
        for i in range(n_prompts):
            per_round = max(1.0, drafter_tau * prompt_effect[b][i] + rng.gauss(0, 0.08))
            pp.append([round(per_round * rounds), rounds])
        e, r = sum(x for x, _ in pp), sum(y for _, y in pp)
        res[f"b{b}"] = {"tau": e / r, "per_prompt": pp}
    res["macro"] = {"tau": sum(res[f"b{b}"]["tau"] for b in range(n_bench)) / n_bench}
    return res


def test_paired_ratio_se_matches_the_spread_of_the_ratio():
    """Two drafters on the same prompts: the paired standard error of macro(a) / macro(b)
    agrees with the ratio's actual spread over repeated draws of prompts, where the
    independent-errors formula overstates it several-fold; identical runs give 0; runs
    without matching per-prompt records give None."""
    import random
    import statistics

    from train.compare import paired_ratio_se, ratio_with_se
    from train.evaluate import tau_standard_error

    rng = random.Random(0)
    benches = [f"b{b}" for b in range(4)]
    ratios, paired, unpaired = [], [], []
    for _ in range(300):
        effect = [[rng.lognormvariate(0, 0.25) for _ in range(12)] for _ in benches]
        a, b = _synthetic_run(rng, effect, 1.6), _synthetic_run(rng, effect, 1.4)
        q = a["macro"]["tau"] / b["macro"]["tau"]
        ratios.append(q)
        paired.append(paired_ratio_se(a, b, benches))

        def macro_se(run):
            ses = [tau_standard_error([type("S", (), {"accepted": [e / r - 1] * r})() for e, r in run[k]["per_prompt"]]) for k in benches]
            return sum(x * x for x in ses) ** 0.5 / len(benches)

        unpaired.append(ratio_with_se(a["macro"]["tau"], macro_se(a), b["macro"]["tau"], macro_se(b))[1])
    spread = statistics.pstdev(ratios)
    assert statistics.mean(paired) == pytest.approx(spread, rel=0.2)
    assert statistics.mean(unpaired) > 3 * spread
    same = _synthetic_run(rng, effect, 1.5)
    assert paired_ratio_se(same, same, benches) == pytest.approx(0.0, abs=1e-12)
    short = {k: (dict(v, per_prompt=v["per_prompt"][:-1]) if k != "macro" else v) for k, v in same.items()}
    assert paired_ratio_se(short, same, benches) is None
    assert paired_ratio_se({k: {"tau": v["tau"]} for k, v in same.items()}, same, benches) is None


def test_compare_runs_writes_a_results_table(tmp_path, tiny_dir, capfd):
    from train.compare import main as compare

    for exp in ("tiny_dflash", "tiny_ngram"):  # two prompts per benchmark: a standard error to pair
        proc = train_here(tmp_path, capfd, f"experiment={exp}", f"target.path={tiny_dir}", f"output_dir={tmp_path}/{exp}", "eval.prompts_per_benchmark=2")
        assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "results.md"
    compare(["--runs", "tiny_dflash", "tiny_ngram", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(out)])
    text = out.read_text()
    assert "| tiny_dflash |" in text and "| tiny_ngram |" in text and "**T=1**" in text and "**T=0**" in text
    assert "macro / tiny_dflash's |" in text  # the ratio column against the first run
    rows = {name: next(line for line in text.splitlines() if line.startswith(f"| {name} |")) for name in ("tiny_dflash", "tiny_ngram")}
    assert rows["tiny_dflash"].rstrip(" |").split("|")[-1].strip() == "1.000"
    assert float(rows["tiny_ngram"].rstrip(" |").split("|")[-1].split("±")[0]) > 0
    assert "±" in rows["tiny_ngram"] and "(unpaired)" not in rows["tiny_ngram"]  # both runs carry per-prompt records: paired
    # the trained drafter's teacher-forced benchmark tau_est, a table of its own (prompt lookup has none)
    tail = text.split("teacher-forced tau_est on the benchmarks' prompts")[1]
    assert "| tiny_dflash |" in tail and "| tiny_ngram |" not in tail
    missing = subprocess.run([sys.executable, "-m", "train.compare", "--runs", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no finished MLflow run named 'nope'" in missing.stderr


def test_onpolicy_file_end_to_end_and_refused_for_another_target(tmp_path, tiny_dir, capfd):
    """`python -m train.regenerate` makes a response file with provenance; the pipeline
    trains on it (data.responses=onpolicy) and logs the held-out tau_est on both kinds of
    text; the shipped Gemma file is refused for the tiny target with a message saying why."""
    resp = tmp_path / "resp.jsonl"
    gen = subprocess.run(
        [sys.executable, "-m", "train.regenerate", "--target", str(tiny_dir), "--out", str(resp), "--limit", "24",
         "--max-new-tokens", "16", "--batch-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    meta = json.loads((tmp_path / "resp.jsonl.meta.json").read_text())
    assert meta["rows"] == 24 and meta["temperature"] == 1.0 and meta["command"].startswith("python -m train.regenerate")
    out = tmp_path / "out"
    common = ("experiment=tiny_dspark", f"target.path={tiny_dir}", f"output_dir={out}")
    proc = train_here(tmp_path, capfd, *common, "data.responses=onpolicy", f"data.onpolicy_file={resp}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on-policy responses: " in proc.stdout and "held-out teacher-forced tau_est" in proc.stdout
    ho = json.loads((out / "heldout_tau.done.json").read_text())["tau_est"]
    assert ho["onpolicy"] is not None and ho["reference"] is not None and ho["onpolicy"] >= 1.0
    refused = train_here(tmp_path, capfd, *common, "data.responses=onpolicy", f"output_dir={tmp_path}/o2")  # the shipped Gemma file
    assert refused.returncode == 2 and "[train] data error: " in refused.stderr and "not from this target" in refused.stderr


def test_launcher_settings_are_validated(monkeypatch):
    """Under a launcher (torchrun sets WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE) the
    gpu_multinode entry takes devices and nodes from it; mismatches and in-fit launchers fail
    with a message naming the key."""
    from train.config import ConfigError, validate

    for k, v in {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    cfg = composed("experiment=gemma_dspark", "trainer=gpu_multinode")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (4, 2, "ddp")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"trainer.devices=2 is invalid: expected devices x num_nodes = 8"):
        validate(composed("experiment=gemma_dspark", "trainer=gpu_multinode", "trainer.devices=2"))
    with pytest.raises(ConfigError, match=r"trainer.strategy='ddp_spawn' is invalid.*started 8 times by a launcher"):
        validate(composed("experiment=gemma_dspark", "trainer=gpu_ddp", "trainer.devices=4", "trainer.num_nodes=2"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2 is invalid: expected 1 for a single command"):
        validate(composed("experiment=gemma_dspark", "trainer=gpu_multinode"))


def test_drafter_init_is_validated():
    """drafter.init: random or target, and target only where there is a backbone to warm-start."""
    from train.config import ConfigError, validate

    validate(composed("experiment=gemma_dspark", "drafter.init=target"))
    validate(composed("experiment=gemma_dflash", "drafter.init=target"))
    with pytest.raises(ConfigError, match=r"drafter.init='layers' is invalid: expected random or target"):
        validate(composed("experiment=gemma_dspark", "drafter.init=layers"))
    with pytest.raises(ConfigError, match=r"drafter.init='target' is invalid.*dspark and dflash drafters only"):
        validate(composed("experiment=gemma_eagle3", "+drafter.init=target"))
