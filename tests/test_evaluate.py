"""glmtune eval / predict / score on a tiny model after a short training run."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune import cli
from glmtune.config import load_config
from glmtune.data import read_examples
from glmtune.evaluate import PredictionWriter, eval_loss, predict_file
from glmtune.inference import Engine, GenerationSettings
from glmtune.specs import get_spec
from glmtune.testing import make_tiny_model
from glmtune.train import train

from conftest import CLASSIFY_ROWS as ROWS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    model = make_tiny_model(root / "model", "chatglm3", seed=3)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS * 3), encoding="utf-8")
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    cfg = load_config(
        {
            "model": {"path": str(model)},
            "data": {"train_file": str(data), "max_length": 128, "cache_dir": str(root / "cache")},
            "method": {"name": "lora", "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
            "train": {
                "output_dir": str(root / "run"),
                "max_steps": 4,
                "batch_size": 4,
                "learning_rate": 5e-2,
                "save_steps": 4,
                "logging_steps": 1,
                "report_to": [],
            },
        }
    )
    train(cfg, printer=lambda *a, **k: None)
    return {"model": model, "run": root / "run", "dev": dev, "root": root}


def test_eval_compare_base_writes_reports(run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(
        [
            "eval",
            str(run["run"]),
            "--data",
            str(run["dev"]),
            "--compare-base",
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["examples"] == len(ROWS)
    assert report["adapter"].endswith("final")
    for side in ("tuned", "base"):
        assert set(report[side]) >= {"rouge_bleu_chatglm3", "rouge_bleu_chatglm6b", "task", "loss"}
    assert report["delta"]["loss.eval_loss"] == pytest.approx(
        report["tuned"]["loss"]["eval_loss"] - report["base"]["loss"]["eval_loss"]
    )
    # Training on these very rows must lower their loss.
    assert report["tuned"]["loss"]["eval_loss"] < report["base"]["loss"]["eval_loss"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(ROWS)))
    assert all({"prompt", "label", "predict", "base"} <= set(r) for r in rows)
    md = (out / "report.md").read_text()
    assert "| metric | base | tuned | Δ |" in md and "ChatGLM3 definition" in md
    assert "loss.eval_loss" in capsys.readouterr().out


def test_eval_loss_equals_model_loss(run):
    engine = Engine.from_path(run["model"])
    examples = read_examples(run["dev"]).examples[:1]
    result = eval_loss(engine, examples)
    ids, labels = engine.template.encode_example(engine.tokenizer, examples[0].messages)
    with torch.no_grad():
        expected = engine.model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["target_tokens"] == sum(1 for x in labels[1:] if x != -100)


class CountingEngine(Engine):
    calls = 0

    def generate(self, conversations, settings=None, seed=None):
        CountingEngine.calls += len(conversations)
        return super().generate(conversations, settings, seed)


def test_predict_resumes_and_keeps_input_order(run, tmp_path):
    base = Engine.from_path(run["model"])
    engine = CountingEngine(base.model, base.tokenizer, get_spec("chatglm3"))
    examples = read_examples(run["dev"]).examples
    out = tmp_path / "pred.jsonl"
    settings = GenerationSettings(max_new_tokens=4)
    first = predict_file(engine, examples, out, settings, batch_size=3, progress=False)
    assert first == {"rows": 4, "generated": 4, "skipped_existing": 0, "path": str(out)}
    full = out.read_text().splitlines()
    # Simulate a crash: two rows lost, the last one torn in the middle of a line.
    out.write_text("\n".join(full[:2]) + "\n" + full[2][:10], encoding="utf-8")
    CountingEngine.calls = 0
    second = predict_file(engine, examples, out, settings, batch_size=3, progress=False)
    assert second["skipped_existing"] == 2 and second["generated"] == 2 and CountingEngine.calls == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows == [json.loads(line) for line in full]  # greedy: regenerated rows are identical


def test_prediction_writer_ignores_torn_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind', encoding="utf-8")
    writer = PredictionWriter(path)
    writer.close()
    assert writer.done == {0, 1}
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'


def test_predict_cli_on_prompt_only_rows(run, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "你好"}]}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert (
        cli.main(
            ["predict", str(run["model"]), "--data", str(data), "--out", str(out), "--max-new-tokens", "3"]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert row["label"] == "" and row["index"] == 0 and isinstance(row["predict"], str)


def test_score_cli(tmp_path, capsys):
    path = tmp_path / "generated_predictions.txt"
    path.write_text(
        '{"predict": "[\\"水果\\"]", "label": "[\\"水果\\"]"}\n'
        '{"predict": "不是JSON", "label": "[\\"电脑\\"]"}\n',
        encoding="utf-8",
    )
    assert cli.main(["score", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2
    assert result["task"]["valid_json_rate"] == pytest.approx(0.5)
    assert result["task"]["exact_match"] == pytest.approx(0.5)


def test_chat_history_is_trimmed_to_the_context(run):
    engine = Engine.from_path(run["model"])
    engine.model.config.max_position_embeddings = 120
    history = [{"role": "system", "content": "你是助手。"}]
    for i in range(12):
        history += [
            {"role": "user", "content": f"第{i}个问题：今天天气怎么样？"},
            {"role": "assistant", "content": "今天天气不错，我们去公园散步吧。"},
        ]
    history.append({"role": "user", "content": "最后一个问题"})
    fitted, dropped = engine.fit_history(history, max_new_tokens=20)
    assert dropped > 0 and dropped % 2 == 0
    assert (
        fitted[0]["role"] == "system"
        and fitted[-1]["content"] == "最后一个问题"
        and fitted[1]["role"] == "user"
    )
    assert len(engine.template.encode_prompt(engine.tokenizer, fitted)) <= 100
    assert fitted[1:] == history[1 + dropped :]


def test_chat_cli_streams_the_same_answer_as_generate(run, capsys):
    engine = Engine.from_path(run["model"])
    expected = engine.generate([[{"role": "user", "content": "你好"}]], GenerationSettings(max_new_tokens=6))[
        0
    ]
    assert cli.main(["chat", str(run["model"]), "--prompt", "你好", "--max-new-tokens", "6"]) == 0
    streamed = "".join(
        engine.stream([{"role": "user", "content": "你好"}], GenerationSettings(max_new_tokens=6))
    )
    assert streamed.strip() == expected.text
    assert capsys.readouterr().out.strip() == expected.text


def test_export_cli_then_chat_on_the_merged_folder(run, tmp_path):
    """export merges the run's LoRA; the merged folder answers exactly like base + adapter."""
    out = tmp_path / "merged"
    assert cli.main(["export", str(run["run"]), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm"
    merged = Engine.from_path(out)
    adapted = Engine.from_path(run["model"], adapter=run["run"] / "final")
    assert type(merged.tokenizer).__name__ == "ChatGLMTokenizer"  # template helpers kept
    prompt = [[{"role": "user", "content": "苹果很甜"}]]
    settings = GenerationSettings(max_new_tokens=8)
    assert merged.generate(prompt, settings)[0].token_ids == adapted.generate(prompt, settings)[0].token_ids


def test_int8_quantized_chat_engine(run):
    engine = Engine.from_path(run["model"], quantize="int8-cpu")
    reply = engine.generate([[{"role": "user", "content": "你好"}]], GenerationSettings(max_new_tokens=4))[0]
    assert reply.finish_reason in ("stop", "length") and len(reply.token_ids) <= 4
    from glmtune.quantize import quantized_modules

    assert quantized_modules(engine.model)
