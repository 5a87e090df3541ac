"""glmtune.runs.Run: a trained run folder opens, its parts are found, train.resume resolves, and every
command that takes a model (chat, predict, eval, export, serve, web) takes a run folder too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmtune import cli
from glmtune.config import CONFIG_FILENAME, load_config, save_config
from glmtune.errors import ConfigError
from glmtune.evaluate import resolve_target
from glmtune.export import resolve_source
from glmtune.runs import Run, resolve_model_or_run
from glmtune.testing import make_tiny_model
from glmtune.train import train

from conftest import CLASSIFY_ROWS as ROWS


def _quiet(*args, **kwargs):
    pass


def _config(model: Path, out: Path, data: Path, cache: Path, method: str, **train_cfg) -> dict:
    return {
        # Forced: detection would say chatglm3 too, but not "forced" -- the run's setting must travel.
        "model": {"path": str(model), "generation": "chatglm3"},
        "data": {"train_file": str(data), "eval_file": str(data), "max_length": 64, "cache_dir": str(cache)},
        "method": {"name": method, "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "batch_size": 2,
            "learning_rate": 1e-2,
            "save_total_limit": None,
            "report_to": [],
            **train_cfg,
        },
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A LoRA run (2 steps, a checkpoint and an eval every step: best/ too) and a 1-step full fine-tune."""
    root = tmp_path_factory.mktemp("runs")
    model = make_tiny_model(root / "model", "chatglm3", seed=7)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    lora_cfg = _config(model, root / "lora", data, root / "cache", "lora", max_steps=2, save_steps=1)
    train(load_config(lora_cfg), printer=_quiet)
    full_cfg = _config(model, root / "full", data, root / "cache", "full", max_steps=1, save_steps=1)
    train(load_config(full_cfg), printer=_quiet)
    return {"root": root, "model": model, "data": data, "lora": root / "lora", "full": root / "full"}


# ------------------------------------------------------------------------------------------ opening
def test_a_trained_run_opens_with_final_best_and_checkpoints(runs):
    run = Run.open(runs["lora"])
    assert run.dir == runs["lora"] and run.config_file == runs["lora"] / CONFIG_FILENAME
    assert run.method == "lora" and run.generation == "chatglm3"
    assert run.config.model.path == str(runs["model"])
    assert run.final == runs["lora"] / "final" and (run.final / "adapter_config.json").is_file()
    assert run.best == runs["lora"] / "best" and (run.best / "best.json").is_file()
    assert run.weights == run.final
    assert run.checkpoints() == [runs["lora"] / "checkpoint-1", runs["lora"] / "checkpoint-2"]
    assert run.checkpoint(2) == runs["lora"] / "checkpoint-2"
    assert run.checkpoint(3) is None
    assert run.latest_checkpoint() == runs["lora"] / "checkpoint-2"


def test_find_and_open_of_what_is_no_run(runs, tmp_path):
    assert Run.find(runs["model"]) is None  # a model folder
    assert Run.find(tmp_path) is None
    assert Run.find(tmp_path / "missing") is None
    with pytest.raises(ConfigError, match="no such run folder"):
        Run.open(tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"no {CONFIG_FILENAME} in it"):
        Run.open(runs["model"])


def test_a_run_config_yaml_opens_the_run_in_its_output_dir(runs, tmp_path):
    cfg_file = save_config(load_config(runs["lora"]), tmp_path / "my_run.yaml")
    run = Run.open(cfg_file)
    assert run.dir == runs["lora"] and run.config_file == cfg_file
    assert run.final == runs["lora"] / "final"
    assert resolve_target(cfg_file).adapter == runs["lora"] / "final"
    src = resolve_source(cfg_file)  # export takes the run config too
    assert (src.kind, src.weights, src.base) == ("lora", runs["lora"] / "final", runs["model"])
    assert src.generation == "chatglm3" and src.run_config == cfg_file


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    cfg = load_config(
        {
            "model": {"path": "m"},
            "data": {"train_file": "t.jsonl", "max_length": 64},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-x", "checkpoint-9-old"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-30").write_text("a file, not a checkpoint")
    run = Run.of(cfg)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-2", "checkpoint-10"]
    assert run.latest_checkpoint() == tmp_path / "checkpoint-10"
    assert run.final is None and run.best is None and run.weights is None


# ------------------------------------------------------------------------------------------- resume
def test_resume_resolution(runs, tmp_path):
    run = Run.open(runs["lora"])
    assert run.resume_path(None) is None and run.resume_path("") is None
    assert run.resume_path("latest") == runs["lora"] / "checkpoint-2"
    assert run.resume_path(1) == runs["lora"] / "checkpoint-1"
    assert run.resume_path("1") == runs["lora"] / "checkpoint-1"
    elsewhere = shutil.copytree(runs["lora"] / "checkpoint-1", tmp_path / "saved")
    assert run.resume_path(str(elsewhere)) == elsewhere
    with pytest.raises(ConfigError, match=r"train\.resume=7: .*checkpoint-7 does not exist"):
        run.resume_path(7)
    with pytest.raises(ConfigError, match=r"train\.resume=nowhere/ckpt: nowhere/ckpt does not exist"):
        run.resume_path("nowhere/ckpt")
    fresh = Run.of(load_config(runs["lora"], [f"train.output_dir={tmp_path / 'fresh'}"]))
    with pytest.raises(ConfigError, match=r"train\.resume=latest: no checkpoint-<step> folder in .*fresh"):
        fresh.resume_path("latest")


def test_the_recipe_resolves_resume_through_the_run(runs, tmp_path):
    from glmtune.train.recipe import _resume_path

    cfg = load_config(runs["lora"], ["train.resume=latest"])
    assert _resume_path(cfg) == str(runs["lora"] / "checkpoint-2")
    cfg = load_config(runs["lora"], [f"train.output_dir={tmp_path}", "train.resume=latest"])
    with pytest.raises(ConfigError, match="no checkpoint-<step> folder"):
        _resume_path(cfg)


# ------------------------------------------------------------------------------------------- models
def test_model_of_an_adapter_run_is_the_base_with_final_and_the_runs_generation(runs):
    run = Run.open(runs["lora"])
    model = run.model()
    assert model.path == runs["model"] and model.adapter == runs["lora"] / "final"
    assert model.generation == "chatglm3" and model.generation_forced
    base = run.base()
    assert base.path == runs["model"] and base.adapter is None and base.generation_forced
    # An explicit adapter replaces final/; an explicit generation overrides the run's.
    assert run.model(adapter=runs["lora"] / "checkpoint-1").adapter == runs["lora"] / "checkpoint-1"
    assert run.model(generation="glm4").generation == "glm4"
    # resolve_model_or_run: a run is what it produced; a model folder is itself.
    assert resolve_model_or_run(runs["lora"]).adapter == runs["lora"] / "final"
    assert resolve_model_or_run(runs["model"]).adapter is None


def test_model_of_a_full_run_is_final(runs):
    run = Run.open(runs["full"])
    assert run.method == "full"
    model = run.model()
    assert model.path == runs["full"] / "final" and model.adapter is None and model.generation_forced
    assert run.base().path == runs["model"]
    # final/ of a full run holds the config too: opened by itself it is the same model.
    assert Run.open(runs["full"] / "final").model().path == runs["full"] / "final"


def test_a_checkpoint_folder_is_a_run_whose_weights_are_the_folder(runs):
    ckpt = runs["lora"] / "checkpoint-1"
    run = Run.open(ckpt)
    assert run.weights == ckpt and run.final is None
    assert run.model().adapter == ckpt
    assert resolve_target(ckpt).adapter == ckpt  # eval of a checkpoint evaluates the checkpoint
    assert resolve_source(ckpt).weights == ckpt


def test_an_unfinished_run_names_its_checkpoints(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["lora"] / CONFIG_FILENAME, unfinished / CONFIG_FILENAME)
    shutil.copytree(runs["lora"] / "checkpoint-1", unfinished / "checkpoint-1")
    with pytest.raises(ConfigError, match=r"no final/ folder with the adapter.*checkpoint-1"):
        Run.open(unfinished).model()
    # With an adapter named, the base + that adapter.
    assert (
        Run.open(unfinished).model(adapter=unfinished / "checkpoint-1").adapter == unfinished / "checkpoint-1"
    )


# ----------------------------------------------------------------------------------------- commands
def test_chat_and_predict_take_a_run_folder(runs, tmp_path, capsys):
    for run in (runs["lora"], runs["full"]):
        assert cli.main(["chat", str(run), "--prompt", "你好", "--max-new-tokens", "3"]) == 0
    out = tmp_path / "preds.jsonl"
    argv = ["predict", str(runs["lora"]), "--data", str(runs["data"]), "--out", str(out)]
    assert cli.main([*argv, "--max-new-tokens", "3"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(ROWS)
    capsys.readouterr()


def test_serve_and_web_take_a_run_folder(runs):
    from glmtune.server.app import build_backend
    from glmtune.web.core import Backend

    engine = build_backend(runs["lora"]).engine
    assert engine.resolved.adapter == runs["lora"] / "final" and engine.resolved.generation_forced
    assert build_backend(runs["full"]).engine.resolved.path == runs["full"] / "final"
    with pytest.raises(ConfigError, match="serves merged models"):
        build_backend(runs["lora"], backend="vllm")  # refused before vLLM is needed
    web = Backend.load(runs["lora"])
    assert web.adapter == str(runs["lora"] / "final") and web.can_compare
    assert web.engine.spec.name == "chatglm3"


def test_eval_compare_base_of_a_full_run_loads_the_runs_base(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(runs["full"]), "--data", str(runs["data"]), "--compare-base", "--out", str(out)]
    assert cli.main([*argv, "--max-new-tokens", "2", "--num-samples", "2"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["model"] == str(runs["full"] / "final") and report["generation"] == "chatglm3"
    # The base is model.path, not final/ again: one training step at lr 1e-2 moved the loss.
    assert report["delta"]["loss.eval_loss"] != 0
    capsys.readouterr()
