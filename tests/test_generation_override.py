"""``--generation`` / ``model.generation`` reaches every place a tokenizer or template is chosen.

The folder: a native ``model_type: glm`` export of a ChatGLM3 model that still carries the ChatGLM3
sentencepiece ``tokenizer.model`` and no ``tokenizer.json`` (as users assemble them by hand). Detection
calls it GLM-4, whose tokenizer loader reads ``tokenizer.model`` as a tiktoken vocabulary and fails;
forced to chatglm3, every command must use the ChatGLM3 tokenizer and template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune import cli
from glmtune.export import export
from glmtune.resolve import resolve_model
from glmtune.testing import make_tiny_model

from conftest import CLASSIFY_ROWS as ROWS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("override")
    official = make_tiny_model(root / "official", "chatglm3", seed=5)
    native = export(official, root / "native", format="hf")
    cfg = json.loads((native / "config.json").read_text(encoding="utf-8"))
    cfg.pop("glmtune_generation", None)  # no hint left: detection goes by model_type alone
    (native / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    (native / "tokenizer.json").unlink(missing_ok=True)
    assert cfg["model_type"] == "glm" and (native / "tokenizer.model").exists()
    return native


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("override_data") / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS * 2), encoding="utf-8")
    return path


def test_detection_alone_picks_glm4_and_fails_on_the_sentencepiece_vocabulary(folder, data, capsys):
    assert resolve_model(folder).generation == "glm4"
    assert cli.main(["data", "check", str(data), "--model", str(folder)]) == 2
    assert "GLM-4 tiktoken" in capsys.readouterr().err


def test_data_commands_use_the_forced_generation(folder, data, tmp_path, capsys):
    force = ["--model", str(folder), "--generation", "chatglm3"]
    assert cli.main(["data", "check", str(data), *force]) == 0
    out = capsys.readouterr().out
    assert "template chatglm3" in out and "ChatGLMTokenizer" in out
    assert cli.main(["data", "show", str(data), *force]) == 0
    assert "<|user|>" in capsys.readouterr().out  # the ChatGLM3 role tokens, not GLM-4's
    cache = tmp_path / "cache"
    assert cli.main(["data", "tokenize", str(data), *force, "--out", str(cache)]) == 0
    (meta,) = [json.loads(p.read_text()) for p in cache.glob("*/glmtune_cache.json")]
    assert meta["generation"] == "chatglm3" and meta["described"]["template"] == "chatglm3"


def test_train_eval_chat_export_serve_and_web_use_the_forced_generation(folder, data, tmp_path, capsys):
    from glmtune.config import load_config
    from glmtune.server.app import build_backend
    from glmtune.train import train
    from glmtune.web.core import Backend

    run = tmp_path / "run"
    cfg = load_config(
        {
            "model": {"path": str(folder), "generation": "chatglm3"},
            "data": {"train_file": str(data), "max_length": 64, "cache_dir": str(tmp_path / "cache")},
            "method": {"name": "lora", "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0},
            "train": {"output_dir": str(run), "max_steps": 1, "batch_size": 2, "report_to": []},
        }
    )
    summary = train(cfg, printer=lambda *a, **k: None)
    assert Path(summary["output"]).is_dir()

    # eval of the run: the run config's model.generation applies.
    assert (
        cli.main(
            ["eval", str(run), "--data", str(data), "--max-new-tokens", "3", "--out", str(tmp_path / "e1")]
        )
        == 0
    )
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert report["generation"] == "chatglm3"
    # eval of the bare folder: --generation applies.
    argv = ["eval", str(folder), "--data", str(data), "--generation", "chatglm3", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "report.json").read_text())["generation"] == "chatglm3"

    assert (
        cli.main(
            ["chat", str(folder), "--generation", "chatglm3", "--prompt", "你好", "--max-new-tokens", "3"]
        )
        == 0
    )
    preds = tmp_path / "preds.jsonl"
    argv = ["predict", str(folder), "--generation", "chatglm3", "--data", str(data), "--out", str(preds)]
    assert cli.main([*argv, "--max-new-tokens", "3"]) == 0
    assert len(preds.read_text().splitlines()) == len(ROWS) * 2

    out = tmp_path / "exported"
    assert cli.main(["export", str(folder), "--generation", "chatglm3", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["glmtune_generation"] == "chatglm3"

    backend = build_backend(folder, generation="chatglm3")
    assert backend.engine.spec.name == "chatglm3" and backend.engine.template.name == "chatglm3"
    web = Backend.load(folder, generation="chatglm3")
    assert web.engine.spec.name == "chatglm3"
    capsys.readouterr()
