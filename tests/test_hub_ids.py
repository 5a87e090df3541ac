"""Models named by hub id (org/name[@revision]) resolve through a hub cache the test lays out, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from glmtune import cli
from glmtune.errors import ModelLoadError
from glmtune.resolve import resolve_model, resolve_model_path
from glmtune.testing import make_tiny_model

REPO = "THUDM/chatglm3-6b"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/files}."""
    root = tmp_path_factory.mktemp("hub")
    model = make_tiny_model(root / "build" / "chatglm3-6b", "chatglm3", seed=2)
    repo = root / "cache" / "models--THUDM--chatglm3-6b"
    shutil.copytree(model, repo / "snapshots" / REVISION)
    (repo / "snapshots" / REVISION / "modeling_chatglm.py").write_text("raise SystemExit('never imported')\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root / "cache"


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_hub_id_resolves_to_the_cached_snapshot(offline_hub):
    snapshot = offline_hub / "models--THUDM--chatglm3-6b" / "snapshots" / REVISION
    assert resolve_model_path(REPO) == snapshot
    assert resolve_model_path(f"{REPO}@main") == snapshot
    ref = resolve_model(REPO)
    assert ref.path == snapshot and ref.generation == "chatglm3" and ref.source == REPO


def test_missing_id_names_it_and_the_command_that_fetches_it(offline_hub):
    with pytest.raises(
        ModelLoadError, match=r"THUDM/chatglm2-6b: .*HF_HUB_OFFLINE.*hf download THUDM/chatglm2-6b"
    ):
        resolve_model("THUDM/chatglm2-6b")


def test_local_folder_wins_over_a_hub_id_of_the_same_shape(offline_hub, tmp_path, monkeypatch):
    local = make_tiny_model(tmp_path / "THUDM" / "chatglm3-6b", "chatglm3", seed=3)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO) == Path(REPO) and Path(REPO).resolve() == local.resolve()


def test_chat_train_and_eval_take_the_hub_id(offline_hub, tmp_path, capsys):
    assert cli.main(["chat", REPO, "--prompt", "你好", "--max-new-tokens", "3"]) == 0
    data = tmp_path / "train.jsonl"
    rows = [{"context": "你好", "target": "我是助手"}, {"context": "天气", "target": "不错"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "run"
    overrides = [
        f"model.path={REPO}",
        f"data.train_file={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=32",
        f"train.output_dir={run}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.report_to=[]",
        "method.lora_r=2",
    ]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method:\n  name: lora\n", encoding="utf-8")
    assert cli.main(["train", str(cfg), *overrides]) == 0
    assert (run / "final" / "adapter_config.json").exists()
    argv = ["eval", str(run), "--data", str(data), "--max-new-tokens", "3", "--out", str(tmp_path / "e")]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["generation"] == "chatglm3"
    capsys.readouterr()


def test_serve_builds_from_the_hub_id(offline_hub):
    from glmtune.server.app import build_backend

    backend = build_backend(REPO)
    assert backend.engine.spec.name == "chatglm3"
    assert backend.engine.resolved.source == REPO
