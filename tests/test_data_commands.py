"""``glmtune data ...`` on real rows from ../shared and on broken files (errors name file:line and field)."""

from __future__ import annotations

import argparse
import json
import re
import sys

import pytest

from glmtune import cli
from glmtune.data.commands import register
from glmtune.errors import GlmtuneError

from conftest import shared_path

BROKEN_ROWS = [
    {"context": "你好", "target": "好"},
    {"context": "今天天气", "target": "不错"},
    {"context": "机器学习", "target": 5},
]


def _wired() -> bool:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "data" in sub.choices


def glmtune_main(argv: list[str]) -> int:
    """``glmtune.cli.main`` once the lead wires ``data`` in; until then the same handling around register()."""
    if _wired():
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="glmtune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GlmtuneError as e:
        print(f"glmtune: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def model():
    return str(shared_path("fixtures", "chatglm3_tiny"))


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BROKEN_ROWS), encoding="utf-8")
    return path


def run(capsys, *argv):
    code = glmtune_main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_names_row_and_field(code, err, path):
    assert code == 2
    assert f"{path}:3" in err and '"target"' in err and "expected a string" in err


# --------------------------------------------------------------------------------------------------
# check


@pytest.mark.shared
def test_check_real_rows_with_a_max_length(capsys, model):
    path = shared_path("data", "mixed_extraction_classification", "mixed_dev_dataset.jsonl")
    code, out, _ = run(capsys, "check", path, "--model", model, "--max-length", 256)
    assert code == 0
    assert f"{path}: format context_target, 122 valid examples, 0 skipped" in out
    header = next(line for line in out.splitlines() if line.startswith("tokens"))
    assert header.split() == [
        "tokens",
        "count",
        "mean",
        "std",
        "min",
        "25%",
        "50%",
        "75%",
        "90%",
        "99%",
        "max",
    ]
    for name in ("prompt", "reply", "total", "total (limited)"):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert row.split()[len(name.split())] == "122"
    limited_max = next(line for line in out.splitlines() if line.startswith("total (limited)")).split()[-1]
    assert int(limited_max) <= 256
    exceed = re.search(r"limits max_length 256: (\d+) of 122 examples exceed them", out)
    assert exceed and 0 < int(exceed.group(1)) < 122 and "tokens removed" in out


@pytest.mark.shared
def test_check_lists_skipped_rows_of_alpaca(capsys, model):
    path = shared_path("data", "alpaca_zh", "alpaca_zh_4k.json")
    code, out, _ = run(
        capsys,
        "check",
        path,
        "--model",
        model,
        "--skip-invalid",
        "--max-source-length",
        64,
        "--max-target-length",
        128,
    )
    assert code == 0
    assert "3996 valid examples, 4 skipped" in out and "skipped 4 invalid rows:" in out
    for i in (284, 1223, 1347, 1736):
        assert f"  {path}[{i}].output: empty" in out
    assert "limits max_source_length 64, max_target_length 128:" in out


@pytest.mark.shared
def test_check_without_limits(capsys, model):
    path = shared_path("data", "advertisegen", "dev.json")
    code, out, _ = run(capsys, "check", path, "--model", model)
    assert code == 0 and "1070 valid examples" in out and "no length limits given" in out


def test_check_broken_file_names_line_and_field(capsys, model, broken):
    code, out, err = run(capsys, "check", broken, "--model", model)
    assert_names_row_and_field(code, err, broken)
    code, out, err = run(capsys, "check", broken, "--model", model, "--skip-invalid")
    assert code == 0 and "2 valid examples, 1 skipped" in out and f"{broken}:3" in out


def test_check_refuses_both_limit_styles(capsys, model, broken):
    code, _, err = run(capsys, "check", broken, "--model", model, "--max-length", 8, "--max-source-length", 4)
    assert code == 2 and "--max-length cannot be combined" in err


# --------------------------------------------------------------------------------------------------
# show


@pytest.mark.shared
def test_show_tokens_and_labels(capsys, model):
    path = shared_path("data", "advertisegen", "dev.json")
    code, out, _ = run(capsys, "show", path, "--model", model, "-n", 2, "--max-length", 48)
    assert code == 0
    assert out.count("=== example") == 2 and f"=== example 1: {path}:1 (48 tokens" in out
    table = out.split("\n", 2)[1:]
    assert table[0].split() == ["pos", "id", "label", "token"]
    rows = [line.split(None, 3) for line in out.splitlines() if re.match(r"\s*\d+\s+\d+\s+(-|\d+)\s+'", line)]
    assert rows[0] == ["0", "801", "-", "'[gMASK]'"] and rows[1] == ["1", "803", "-", "'sop'"]
    assert ["2", "806", "-", "'<|user|>'"] == rows[2]
    # The reply is trained: its tokens carry their own id as label, the last one is eos.
    assert rows[47][:3] == ["47", "2", "2"]
    assert out.count("prompt: '[gMASK]sop<|user|>") == 2 and "target: '\\n " in out


def test_show_broken_file(capsys, model, broken):
    code, _, err = run(capsys, "show", broken, "--model", model, "-n", 5)
    assert_names_row_and_field(code, err, broken)


# --------------------------------------------------------------------------------------------------
# convert


@pytest.mark.shared
def test_convert_alpaca_to_conversations_and_jsonl(capsys, tmp_path):
    path = shared_path("data", "alpaca_zh", "alpaca_zh_4k.json")
    out_conv = tmp_path / "conv.jsonl"
    code, out, _ = run(capsys, "convert", path, out_conv, "--to", "conversations", "--skip-invalid")
    assert code == 0 and f"wrote 3996 rows (alpaca -> conversations) to {out_conv}" in out
    rows = [json.loads(line) for line in out_conv.read_text(encoding="utf-8").splitlines()]
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(rows) == 3996
    assert rows[0] == {
        "conversations": [
            {"role": "user", "content": raw[0]["instruction"]},
            {"role": "assistant", "content": raw[0]["output"]},
        ]
    }

    out_jsonl = tmp_path / "alpaca.jsonl"
    code, out, _ = run(capsys, "convert", path, out_jsonl, "--to", "jsonl")
    assert code == 0 and f"wrote 4000 rows as JSONL to {out_jsonl}" in out
    assert [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()] == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.jsonl", "conv.jsonl"]  # no temp files


def test_convert_broken_file(capsys, broken, tmp_path):
    out_path = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "convert", broken, out_path, "--to", "conversations")
    assert_names_row_and_field(code, err, broken)
    assert not out_path.exists()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"context": "a", "target": "b"}\n{"context": \n', encoding="utf-8")
    code, _, err = run(capsys, "convert", bad_json, out_path, "--to", "jsonl")
    assert code == 2 and f"{bad_json}:2: invalid JSON" in err and not out_path.exists()


# --------------------------------------------------------------------------------------------------
# import-chats


def test_import_chats(capsys, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    log = []
    for k in range(4):
        base = k * 300  # 5 hours apart: four conversations
        log += [
            {
                "sender": "张三",
                "text": f"问题{k}",
                "time": f"2024-03-01T{base // 60 + 1:02d}:{base % 60:02d}:00",
            },
            {
                "sender": "小明",
                "text": f"回答{k}",
                "time": f"2024-03-01T{base // 60 + 1:02d}:{base % 60 + 1:02d}:00",
            },
        ]
    (src / "张三.json").write_text(json.dumps(log, ensure_ascii=False), encoding="utf-8")
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "import-chats", src, out_dir, "--dev-ratio", 0.25, "--me", "小明")
    assert code == 0
    assert "read 1 files, 8 messages" in out and "conversations: 4 kept, 0 dropped" in out
    assert (
        f"train: 3 rows -> {out_dir / 'train.json'}" in out
        and f"dev: 1 rows -> {out_dir / 'dev.json'}" in out
    )
    rows = [json.loads(line) for line in (out_dir / "train.json").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["conversations"][1]["role"] == "assistant"


def test_import_chats_errors(capsys, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    log = [
        {"sender": "李四", "text": "你好", "time": "2024-03-01T09:00:00"},
        {"sender": "小明", "text": "好"},
    ]
    (src / "李四.json").write_text(json.dumps(log, ensure_ascii=False), encoding="utf-8")
    code, _, err = run(capsys, "import-chats", src, tmp_path / "out", "--me", "小明")
    assert code == 2 and f"{src / '李四.json'}[1].time: missing" in err
    code, _, err = run(capsys, "import-chats", src, tmp_path / "out", "--dev-ratio", 1.5)
    assert code == 2 and "--dev-ratio must be in [0, 1)" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# tokenize


@pytest.mark.shared
def test_tokenize_miss_then_hit(capsys, model, tmp_path):
    path = shared_path("data", "mixed_extraction_classification", "mixed_dev_dataset.jsonl")
    cache = tmp_path / "cache"
    args = ("tokenize", path, "--model", model, "--out", cache, "--max-length", 128)
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.startswith(f"cache miss: {cache}/mixed_dev_dataset-")
    assert re.search(r"rows: 122 \(context_target\), tokens: \d+, time: [\d.]+ s", out)
    assert "limits max_length 128:" in out
    code, out2, _ = run(capsys, *args)
    assert code == 0 and out2.startswith(f"cache hit: {cache}/mixed_dev_dataset-")
    assert out2.splitlines()[0].split(": ")[1] == out.splitlines()[0].split(": ")[1]


def test_tokenize_broken_file(capsys, model, broken, tmp_path):
    code, _, err = run(capsys, "tokenize", broken, "--model", model, "--out", tmp_path / "cache")
    assert_names_row_and_field(code, err, broken)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
