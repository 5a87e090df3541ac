"""Mixed data sources: deterministic weighted / counted mixing, per-source caching, hub datasets offline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glmtune.data import DataError
from glmtune.data.sources import DataSource, as_sources, mix_indices, source_file, tokenize_sources
from glmtune.resolve import resolve_model
from glmtune.testing import make_tiny_model

REV = "fedcba9876543210fedcba9876543210fedcba98"


def _rows(prefix: str, n: int) -> list[dict]:
    return [
        {"instruction": f"{prefix} question {i}", "input": "", "output": f"{prefix} answer {i}"}
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """huggingface_hub's dataset layout: datasets--org--name/{refs/main, snapshots/<rev>/...}, offline."""
    cache = tmp_path / "hub"
    snap = cache / "datasets--acme--tiny-alpaca" / "snapshots" / REV
    _jsonl(snap / "train.jsonl", _rows("hub", 6))
    _jsonl(snap / "test.jsonl", _rows("hubtest", 2))
    (cache / "datasets--acme--tiny-alpaca" / "refs").mkdir(parents=True)
    (cache / "datasets--acme--tiny-alpaca" / "refs" / "main").write_text(REV)
    # A Parquet-only dataset, as the hub's converted datasets are: data/<split>-00000-of-00001.parquet.
    psnap = cache / "datasets--acme--pq" / "snapshots" / REV / "data"
    psnap.mkdir(parents=True)
    table = pa.Table.from_pylist(
        [{"content": f"类型#裙*颜色#{c}", "summary": f"一条{c}色的裙子"} for c in "红黄蓝"]
    )
    pq.write_table(table, psnap / "train-00000-of-00001.parquet")
    (cache / "datasets--acme--pq" / "refs").mkdir(parents=True)
    (cache / "datasets--acme--pq" / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_rows_and_weights_draw_the_promised_counts_deterministically():
    sources = [
        DataSource("a.jsonl", weight=1),
        DataSource("b.jsonl", weight=1),
        DataSource("c.jsonl", rows=7),
        DataSource("d.jsonl", rows=2),
        DataSource("e.jsonl"),
    ]
    available = [90, 10, 3, 5, 4]
    picked = mix_indices(sources, available, seed=1)
    # Equal weights share the weighted sources' 100 rows: 50 each, b upsampled 5x; c upsampled to 7.
    assert [len(p) for p in picked] == [50, 50, 7, 2, 4]
    assert Counter(picked[1]) == {i: 5 for i in range(10)}
    assert len(set(picked[0])) == 50 and all(0 <= i < 90 for i in picked[0])
    assert sorted(Counter(picked[2]).values()) == [2, 2, 3]
    assert picked[4] == [0, 1, 2, 3]
    assert mix_indices(sources, available, seed=1) == picked
    assert mix_indices(sources, available, seed=2)[0] != picked[0]


def test_source_entries_and_their_errors():
    got = as_sources(["a.jsonl", {"path": "b.json", "format": "alpaca", "weight": 2}], fmt="context_target")
    assert got == [
        DataSource("a.jsonl", format="context_target"),
        DataSource("b.json", format="alpaca", weight=2),
    ]
    with pytest.raises(DataError, match="either weight or rows"):
        as_sources([{"path": "a", "weight": 1, "rows": 3}])
    with pytest.raises(DataError, match=r"data source \[0\]: unknown keys wieght"):
        as_sources([{"path": "a", "wieght": 1}])
    with pytest.raises(DataError, match="weight must be positive"):
        as_sources([{"path": "a", "weight": 0}])


def test_hub_dataset_split_files_offline(hub_cache, tmp_path):
    snap = hub_cache / "datasets--acme--tiny-alpaca" / "snapshots" / REV
    assert source_file(DataSource("acme/tiny-alpaca")) == snap / "train.jsonl"
    assert source_file(DataSource("acme/tiny-alpaca", split="test")) == snap / "test.jsonl"
    assert source_file(DataSource("hub:acme/tiny-alpaca@main")) == snap / "train.jsonl"
    converted = source_file(DataSource("acme/pq"), cache_dir=tmp_path / "c")
    assert [json.loads(line)["summary"] for line in converted.read_text(encoding="utf-8").splitlines()] == [
        "一条红色的裙子",
        "一条黄色的裙子",
        "一条蓝色的裙子",
    ]
    with pytest.raises(DataError, match=r"no file for split 'validation'.*train\.jsonl"):
        source_file(DataSource("acme/tiny-alpaca", split="validation"))
    with pytest.raises(
        DataError, match=r"acme/missing: .*HF_HUB_OFFLINE.*hf download acme/missing --repo-type dataset"
    ):
        source_file(DataSource("acme/missing"))


def test_two_files_and_a_hub_dataset_mix_with_per_source_cache(hub_cache, tmp_path):
    model = resolve_model(make_tiny_model(tmp_path / "glm3", "chatglm3"))
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 12))
    b = _jsonl(tmp_path / "b.jsonl", _rows("b", 3))
    sources = as_sources([str(a), {"path": str(b), "weight": 1}, {"path": "acme/tiny-alpaca", "weight": 1}])
    cache = tmp_path / "cache"
    ds, infos, report, picked = tokenize_sources(sources, model, seed=3, cache_dir=cache)
    assert [s.used for s in report.sources] == [12, 5, 4]  # b+hub have 9 rows: 4.5 each, rounded
    assert len(ds) == report.total == 21
    assert [round(s.share, 3) for s in report.sources] == [
        round(12 / 21, 3),
        round(5 / 21, 3),
        round(4 / 21, 3),
    ]
    assert not any(i.hit for i in infos)
    # The mixed rows are the sources' tokenized rows, source after source, as picked.
    from glmtune.data import tokenize_cached

    own = [tokenize_cached(source_file(s), model, cache_dir=cache)[0]["input_ids"] for s in sources]
    assert ds["input_ids"] == [own[k][i] for k in range(3) for i in picked[k]]
    # Again: every source a cache hit, the same mix. One file changed: only that source re-tokenized.
    again = tokenize_sources(sources, model, seed=3, cache_dir=cache)
    assert all(i.hit for i in again[1]) and again[3] == picked and again[0]["input_ids"] == ds["input_ids"]
    _jsonl(a, _rows("a", 13))
    third = tokenize_sources(sources, model, seed=3, cache_dir=cache)
    assert [i.hit for i in third[1]] == [False, True, True]
    assert report.as_dict()["sources"][1] == {
        "source": str(b),
        "format": "alpaca",
        "available": 3,
        "used": 5,
        "share": round(5 / 21, 6),
        "repeats": round(5 / 3, 4),
    }


def _mixed_run(tmp_path, model, out, train_file, **data) -> dict:
    from glmtune.config import load_config
    from glmtune.train import train

    raw = {
        "model": {"path": str(model)},
        "data": {"train_file": train_file, "max_length": 48, "cache_dir": str(tmp_path / "cache"), **data},
        "method": {"name": "lora", "lora_r": 2, "lora_alpha": 4, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 100,
            "report_to": [],
            "seed": 0,
        },
    }
    lines: list[str] = []
    summary = train(load_config(raw), printer=lambda line="", **_: lines.append(line))
    return summary, lines


def test_training_on_two_files_and_a_hub_dataset_reports_deterministic_shares(hub_cache, tmp_path):
    model = make_tiny_model(tmp_path / "glm3", "chatglm3")
    a = _jsonl(tmp_path / "a.jsonl", _rows("a", 10))
    # A second file in another format, with its own columns: AdvertiseGen-style content/summary.
    b = _jsonl(
        tmp_path / "b.jsonl", [{"q": f"类型#裙*颜色#{c}", "a": f"一条{c}色的裙子"} for c in "红黄蓝绿"]
    )
    sources = [
        {"path": str(a), "rows": 6},
        {
            "path": str(b),
            "format": "prompt_response",
            "columns": {"prompt": "q", "response": "a"},
            "weight": 1,
        },
        {"path": "acme/tiny-alpaca", "weight": 1},
    ]
    first, lines = _mixed_run(tmp_path, model, tmp_path / "r1", sources)
    mix = first["data_mix"]["train"]
    assert [(s["available"], s["used"]) for s in mix["sources"]] == [(10, 6), (4, 5), (6, 5)]
    assert mix["total"] == first["train_examples"] == 16
    assert "train mix (seed 0): 16 rows" in lines
    assert f"  {b}: 5 of 4 rows (31.2%, upsampled 1.25x)" in lines
    # The summary on disk says the same; a second run draws the same rows.
    on_disk = json.loads((tmp_path / "r1" / "train_summary.json").read_text(encoding="utf-8"))
    assert on_disk["data_mix"] == first["data_mix"]
    again, _ = _mixed_run(tmp_path, model, tmp_path / "r2", sources)
    assert again["data_mix"] == first["data_mix"] and again["train_loss"] == first["train_loss"]
