"""The tokenized-dataset cache: hits, every reason for a miss, atomic writes, damaged entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import glmtune
from glmtune.data import EncodeSettings, default_cache_dir, encode_all, read_examples, tokenize_cached
from glmtune.data import cache as cache_mod
from glmtune.testing import make_tiny_model

ROWS = [
    {"context": "你好，请介绍一下你自己。", "target": "我是一个人工智能助手。"},
    {"context": "今天天气不错", "target": "我们去公园散步吧。"},
    {"context": "机器学习是什么？", "target": "机器学习是人工智能的一个分支，深度学习是机器学习的一种方法。"},
]
TOKENIZER_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cache_models") / "chatglm3", "chatglm3")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tokenizer_copy(model_dir, dest, **config_changes):
    """The tokenizer files of a model folder (no weights: the cache never loads them)."""
    dest.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(model_dir / name, dest / name)
    if config_changes:
        cfg = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        cfg.update(config_changes)
        (dest / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dest


def entries(cache):
    return sorted(p.name for p in cache.iterdir())


def test_hit_on_the_second_call_with_the_same_rows(tmp_path, model_dir):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    cache = tmp_path / "cache"
    settings = EncodeSettings(max_length=24)
    ds, info = tokenize_cached(data, model_dir, settings, cache_dir=cache)
    assert not info.hit and info.rows == 3 and info.format == "context_target"
    assert info.path.parent == cache and info.path.name.startswith("train-")
    again, info2 = tokenize_cached(data, model_dir, settings, cache_dir=cache)
    assert info2.hit and info2.key == info.key and info2.path == info.path
    assert info2.stats == info.stats and info.stats.truncated > 0

    # The cached rows are exactly what encode_all gives.
    tok = glmtune.load_tokenizer(model_dir)
    expected, stats = encode_all(tok, glmtune.get_template(model_dir), read_examples(data).examples, settings)
    assert again["input_ids"] == [e.input_ids for e in expected]
    assert again["labels"] == [e.labels for e in expected]
    assert again["length"] == [e.length for e in expected] and max(again["length"]) <= 24
    assert stats.tokens_removed == info2.stats.tokens_removed
    assert {k: str(v) for k, v in again.features.items()} == {
        "input_ids": "List(Value('int32'))",
        "labels": "List(Value('int32'))",
        "length": "Value('int32')",
    }
    assert -100 in again[0]["labels"]
    assert entries(cache) == [info.path.name]


def test_miss_when_the_file_tokenizer_template_or_limits_change(tmp_path, model_dir):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    cache = tmp_path / "cache"
    base = tokenizer_copy(model_dir, tmp_path / "base")
    first = tokenize_cached(data, base, EncodeSettings(), cache_dir=cache)[1]
    assert tokenize_cached(data, base, EncodeSettings(), cache_dir=cache)[1].hit

    keys = {first.key}

    def assert_miss(path, model, settings, **kw):
        _, info = tokenize_cached(path, model, settings, cache_dir=cache, **kw)
        assert not info.hit and info.key not in keys
        keys.add(info.key)
        return info

    # The data file: one character of one row.
    edited = write_rows(tmp_path / "edited.jsonl", [dict(ROWS[0], target="我是助手。"), *ROWS[1:]])
    assert_miss(edited, base, EncodeSettings())
    write_rows(data, [*ROWS, ROWS[0]])
    assert assert_miss(data, base, EncodeSettings()).rows == 4
    # The tokenizer: another sentencepiece model (a different tiny vocabulary) under the same config.
    other = make_tiny_model(tmp_path / "other", "chatglm3", seed=1, spm_vocab=480)
    swapped = tokenizer_copy(model_dir, tmp_path / "swapped")
    shutil.copy(other / "tokenizer.model", swapped / "tokenizer.model")
    assert assert_miss(data, swapped, EncodeSettings()).stats.examples == 4
    # ... or only a setting in tokenizer_config.json.
    cfg_changed = tokenizer_copy(model_dir, tmp_path / "cfg_changed")
    tok_cfg = json.loads((cfg_changed / "tokenizer_config.json").read_text(encoding="utf-8"))
    (cfg_changed / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "remove_space": True}))
    assert_miss(data, cfg_changed, EncodeSettings())
    # The template: the same tokenizer files in a folder detected as ChatGLM2.
    chatglm2 = tokenizer_copy(model_dir, tmp_path / "v2", _name_or_path="chatglm2-6b")
    assert glmtune.get_template(chatglm2).name == "chatglm2"
    assert_miss(data, chatglm2, EncodeSettings())
    # The limits, and the loss placement.
    assert_miss(data, base, EncodeSettings(max_length=16))
    assert_miss(data, base, EncodeSettings(max_source_length=8, max_target_length=8))
    assert_miss(data, base, EncodeSettings(train_on_prompt=True))
    # Every entry is complete and no temporary folder is left behind.
    names = entries(cache)
    assert len(names) == len(keys) and not [n for n in names if n.startswith(".")]


def test_encoding_version_is_part_of_the_key(tmp_path, model_dir, monkeypatch):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    info = tokenize_cached(data, model_dir, cache_dir=tmp_path / "cache")[1]
    monkeypatch.setattr(cache_mod, "ENCODING_VERSION", cache_mod.ENCODING_VERSION + 1)
    bumped = tokenize_cached(data, model_dir, cache_dir=tmp_path / "cache")[1]
    assert not bumped.hit and bumped.key != info.key


def test_a_failed_write_leaves_nothing_behind(tmp_path, model_dir, monkeypatch):
    from datasets import Dataset

    data = write_rows(tmp_path / "train.jsonl", ROWS)
    cache = tmp_path / "cache"

    def broken_save(self, path, **kwargs):
        (Path(path) / "partial.arrow").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tokenize_cached(data, model_dir, cache_dir=cache)
    assert entries(cache) == []
    monkeypatch.undo()
    _, info = tokenize_cached(data, model_dir, cache_dir=cache)
    assert not info.hit and entries(cache) == [info.path.name]


def test_a_damaged_entry_is_rebuilt(tmp_path, model_dir):
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    cache = tmp_path / "cache"
    ds, info = tokenize_cached(data, model_dir, cache_dir=cache)
    for arrow in info.path.glob("*.arrow"):
        arrow.unlink()
    rebuilt, again = tokenize_cached(data, model_dir, cache_dir=cache)
    assert not again.hit and again.path == info.path and rebuilt["input_ids"] == ds["input_ids"]
    assert tokenize_cached(data, model_dir, cache_dir=cache)[1].hit


def test_default_cache_dir_and_skip_invalid(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "glmtune-cache"))
    assert default_cache_dir() == tmp_path / "glmtune-cache" / "datasets"
    data = write_rows(tmp_path / "train.jsonl", [*ROWS, {"context": "没有回答", "target": ""}])
    ds, info = tokenize_cached(data, model_dir, skip_invalid=True)
    assert info.path.parent == default_cache_dir() and len(ds) == 3
    assert [str(e) for e in info.stats.invalid] == [f'{data}:4: field "target": empty']
    hit = tokenize_cached(data, model_dir, skip_invalid=True)[1]
    assert hit.hit and [str(e) for e in hit.stats.invalid] == [f'{data}:4: field "target": empty']
