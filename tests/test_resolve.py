"""A model is resolved once (glmtune.resolve) and the object travels: nothing downstream re-detects."""

from __future__ import annotations

import json

import pytest
import torch

import glmtune.resolve as resolve_mod
import glmtune.specs as specs
from glmtune.errors import ModelLoadError
from glmtune.resolve import resolve_model
from glmtune.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("resolve") / "chatglm3", "chatglm3", seed=1)


def test_resolved_fields_and_overrides(tiny):
    ref = resolve_model(tiny, dtype="bfloat16", quantization="none")
    assert ref.generation == "chatglm3" and not ref.generation_forced
    assert ref.config["model_type"] == "chatglm" and ref.gguf is None
    assert ref.dtype is torch.bfloat16 and ref.quantization is None
    forced = resolve_model(tiny, generation="chatglm2")
    assert forced.generation == "chatglm2" and forced.generation_forced
    assert forced.spec.template.name == "chatglm2"
    assert resolve_model(forced) is forced  # a resolved model is never resolved again
    with pytest.raises(TypeError):
        forced.config["model_type"] = "x"  # read-only: one reading shared by every user


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"generation": "chatglm5"}, "unknown model generation 'chatglm5' (known: chatglm, chatglm2"),
        ({"quantization": "3bit"}, "unknown quantization '3bit'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"adapter": "/nonexistent/adapter"}, "/nonexistent/adapter: adapter folder not found"),
    ],
)
def test_bad_requests_fail_naming_the_value(tiny, kwargs, message):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        resolve_model(tiny, **kwargs)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        resolve_model(tmp_path / "absent")


def test_a_training_run_detects_the_generation_once(tiny, tmp_path, monkeypatch):
    from glmtune.config import load_config
    from glmtune.inference import Engine
    from glmtune.train import train

    calls = []
    real = resolve_mod.detect_generation
    counting = lambda path: calls.append(path) or real(path)  # noqa: E731
    # Both names: resolve_model's, and the one spec_for() (any re-detection elsewhere) goes through.
    monkeypatch.setattr(resolve_mod, "detect_generation", counting)
    monkeypatch.setattr(specs, "detect_generation", counting)
    data = tmp_path / "train.jsonl"
    rows = [{"context": "你好", "target": "我是助手"}, {"context": "天气", "target": "不错"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(
        {
            "model": {"path": str(tiny)},
            "data": {"train_file": str(data), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
            "method": {"name": "lora", "lora_r": 2, "lora_alpha": 4},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "report_to": []},
        }
    )
    train(cfg, printer=lambda *a, **k: None)
    assert len(calls) == 1  # tokenizer, data cache, loader and writer all used the one resolution
    ref = resolve_model(tiny, adapter=tmp_path / "run" / "final")
    calls.clear()
    engine = Engine.load(ref)
    assert calls == [] and engine.resolved is ref and engine.spec is ref.spec
