"""Generation metrics during training (``eval.predict_with_generate``) and ``best/`` by ``eval.best_metric``.

Tiny random ChatGLM3 models on CPU, 1-4 steps, an evaluation every step, 4 new tokens: the metrics reach
the trainer log, the console, TensorBoard, ``train_summary.json`` and ``loss.png``; the replies scored are
the ones the checkpoint of that step gives; ``best/`` holds the weights of the best step of the chosen
metric; a wrong metric name fails before any weight is read; without the option nothing is generated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

import glmtune
import glmtune.loading
import glmtune.train.generation_eval as generation_eval
import glmtune.train.trainer as trainer_mod
from glmtune.config import load_config
from glmtune.data import read_examples
from glmtune.data.encode import encode_all
from glmtune.data.readers import Example
from glmtune.errors import ConfigError
from glmtune.evaluate import predict, split_examples
from glmtune.inference import Engine, GenerationSettings
from glmtune.resolve import resolve_model
from glmtune.testing import make_tiny_model
from glmtune.train import train
from glmtune.train.generation_eval import GenerationEval, greater_is_better, metric_key
from glmtune.train.recipe import _encode_settings
from glmtune.train.trainer import BestAndPlotCallback, GlmtuneTrainer

PROMPTS = ["你好，请介绍一下你自己。", "Hello world!", "今天天气不错。", "Instruction: classify the comment."]
TRAIN = [
    {"context": PROMPTS[0], "target": "我是一个人工智能助手，可以回答问题、写作和翻译。"},
    {"context": PROMPTS[1], "target": "The quick brown fox jumps over the lazy dog."},
    {"context": PROMPTS[2], "target": "我们去公园散步吧。北京的秋天很美。"},
    {"context": PROMPTS[3], "target": "the apples are fresh and sweet."},
]
NEW_TOKENS = 4
GENERATED = ["eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4", "eval_exact_match"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gen_metrics") / "chatglm3", "chatglm3")


@pytest.fixture(scope="module")
def eval_file(base, tmp_path_factory) -> Path:
    """Eval rows whose references are the base model's own greedy replies: the scores are not all 0
    (a random tiny model's replies share nothing with real text), so a wrong pairing shows."""
    folder = tmp_path_factory.mktemp("gen_metrics_data")
    rows = [{"context": p, "target": "x"} for p in PROMPTS[:3]]
    prompts, _ = split_examples(read_examples(write_jsonl(folder / "tmp.jsonl", rows)).examples)
    replies = predict(Engine.from_path(base), prompts, GenerationSettings(max_new_tokens=NEW_TOKENS))
    assert all(r.strip() for r in replies)
    return write_jsonl(folder / "eval.jsonl", [dict(r, target=t) for r, t in zip(rows, replies)])


def config(base: Path, out: Path, eval_file: Path | None, **evals) -> dict:
    return {
        "model": {"path": str(base)},
        "data": {
            "train_file": str(write_jsonl(out.parent / f"{out.name}-train.jsonl", TRAIN)),
            "eval_file": str(eval_file) if eval_file else None,
            "max_length": 64,
            "cache_dir": str(out.parent / "cache"),
        },
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": 3,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 1,
            "eval_steps": 1,
            "save_total_limit": None,
            "report_to": [],
            "seed": 0,
        },
        "eval": {"predict_with_generate": True, "max_new_tokens": NEW_TOKENS, **evals},
    }


def run(raw: dict, *overrides: str, lines: list | None = None) -> dict:
    printer = (lambda *a, **k: lines.append(" ".join(map(str, a)))) if lines is not None else None
    return train(load_config(raw, overrides), printer=printer or (lambda *a, **k: None))


def log_history(out: Path) -> list[dict]:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]


def evaluations(out: Path) -> dict[int, dict]:
    return {h["step"]: h for h in log_history(out) if "eval_loss" in h}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture
def scored(monkeypatch):
    """Every call of the scoring function during training: (replies, references, metrics)."""
    calls = []
    original = generation_eval.score_generations

    def score(outputs, references, definition, task):
        metrics = original(outputs, references, definition, task)
        calls.append(SimpleNamespace(outputs=list(outputs), references=list(references), metrics=metrics))
        return metrics

    monkeypatch.setattr(generation_eval, "score_generations", score)
    return calls


@pytest.fixture
def plotted(monkeypatch):
    """What loss.png draws each time it is written: the series, and whether the metrics panel was drawn."""
    seen = SimpleNamespace(series=[], panels=0)
    series, draw = trainer_mod.loss_plot_series, trainer_mod._draw_metrics

    def record_series(history, metrics=()):
        out = series(history, metrics)
        seen.series.append(out)
        return out

    def record_draw(ax, data):
        seen.panels += 1
        return draw(ax, data)

    monkeypatch.setattr(trainer_mod, "loss_plot_series", record_series)
    monkeypatch.setattr(trainer_mod, "_draw_metrics", record_draw)
    return seen


# ------------------------------------------------------------------------------ logged everywhere
def test_generation_metrics_are_logged(base, eval_file, tmp_path, scored, plotted):
    out = tmp_path / "out"
    lines: list[str] = []
    raw = config(base, out, eval_file, num_samples=2)
    raw["train"]["report_to"] = ["tensorboard"]
    summary = run(raw, lines=lines)

    # Every evaluation generated for the first num_samples eval examples and logged their scores
    # (as the scoring function returned them) in the same entry as the eval loss.
    evals = evaluations(out)
    assert sorted(evals) == [1, 2, 3] and len(scored) == 3
    references = [json.loads(line)["target"] for line in eval_file.read_text().splitlines()][:2]
    for step, call in zip(sorted(evals), scored):
        assert call.references == references and len(call.outputs) == 2
        assert {k: evals[step][k] for k in GENERATED} == {metric_key(k): v for k, v in call.metrics.items()}
    # The references are the base model's replies: the first evaluation, one step from it, scores above 0.
    assert evals[1]["eval_rouge-l"] > 0

    # The replies scored at step k are those of checkpoint-k (the model being trained, in eval mode, its
    # LoRA on): an Engine loaded from the checkpoint gives the same greedy replies.
    prompts, _ = split_examples(read_examples(eval_file).examples[:2])
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    for step, call in zip(sorted(evals), scored):
        engine = Engine.load(resolve_model(base, adapter=out / f"checkpoint-{step}"))
        assert predict(engine, prompts, settings) == call.outputs

    # Console: the eval line carries the metrics.
    eval_lines = [line for line in lines if ": eval loss" in line]
    assert len(eval_lines) == 3 and all("rouge-l" in line and "bleu-4" in line for line in eval_lines)

    # train_summary.json: best and last of each metric, and what was generated.
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    metrics = on_disk["generation_metrics"]
    assert list(metrics) == ["rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
    for name, values in metrics.items():
        series = [evals[s][metric_key(name)] for s in sorted(evals)]
        assert values["last"] == pytest.approx(series[-1]) and values["best"] == pytest.approx(max(series))
        assert evals[values["best_step"]][metric_key(name)] == pytest.approx(max(series))
    assert on_disk["generation_eval"] == {
        "examples": 2,
        "task": "text",
        "rouge_bleu_definition": "chatglm3",
        "max_new_tokens": NEW_TOKENS,
    }
    assert on_disk["best_metric"] == "eval_loss"

    # TensorBoard: eval/<metric> scalars at every evaluation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    for key in GENERATED:
        tag = "eval/" + key.removeprefix("eval_")
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)] == [
            (s, evals[s][key]) for s in sorted(evals)
        ]

    # loss.png: the last drawing has the metric series (every evaluation) and the metrics panel.
    last = plotted.series[-1]
    assert last["rouge-l"] == [(s, evals[s]["eval_rouge-l"]) for s in sorted(evals)]
    assert set(last) == {"train loss", "eval loss", *(k.removeprefix("eval_") for k in GENERATED)}
    assert plotted.panels == len(plotted.series) > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------- best/ by metric
def test_best_follows_the_chosen_metric(base, eval_file, tmp_path, monkeypatch):
    """rouge-l peaks at step 2 (a series chosen here); the eval loss keeps falling to step 4."""
    chosen = iter([1.0, 9.0, 3.0, 2.0])

    def score(outputs, references, definition, task):
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": next(chosen), "bleu-4": 0.0, "exact_match": 0.0}

    monkeypatch.setattr(generation_eval, "score_generations", score)
    out = tmp_path / "out"
    summary = run(config(base, out, eval_file, num_samples=1, best_metric="rouge-l"), "train.max_steps=4")

    evals = evaluations(out)
    assert [evals[s]["eval_rouge-l"] for s in sorted(evals)] == [1.0, 9.0, 3.0, 2.0]
    losses = {s: h["eval_loss"] for s, h in evals.items()}
    assert min(losses, key=losses.get) != 2  # the eval loss alone would pick another step

    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["metric"] == "eval_rouge-l" and best["eval_rouge-l"] == 9.0
    assert best["eval_loss"] == pytest.approx(losses[2])
    weights, at_step = adapter(out / "best"), adapter(out / "checkpoint-2")
    assert weights.keys() == at_step.keys() and all(torch.equal(weights[k], at_step[k]) for k in weights)
    assert not all(torch.equal(weights[k], adapter(out / "checkpoint-4")[k]) for k in weights)
    assert (summary["best_metric"], summary["best_step"], summary["best_value"]) == ("rouge-l", 2, 9.0)


def test_best_defaults_to_the_lowest_eval_loss(base, eval_file, tmp_path, monkeypatch):
    """A metric where lower is better: best/ is the step of the lowest eval loss even when the
    generation metrics are logged (and are higher elsewhere)."""
    chosen = iter([5.0, 4.0, 3.0])
    monkeypatch.setattr(
        generation_eval, "score_generations", lambda *a: {"rouge-l": next(chosen), "exact_match": 0.0}
    )
    out = tmp_path / "out"
    summary = run(config(base, out, eval_file, num_samples=1))
    losses = {s: h["eval_loss"] for s, h in evaluations(out).items()}
    step = min(losses, key=losses.get)
    assert step != 1  # rouge-l (higher is better) would pick step 1
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == step and best["metric"] == "eval_loss"
    assert summary["best_step"] == step and summary["best_value"] == pytest.approx(losses[step])


def test_metric_direction():
    assert not greater_is_better("eval_loss")
    assert all(greater_is_better(metric_key(m)) for m in ("rouge-l", "bleu-4", "json_exact_match", "spo.f1"))
    assert BestAndPlotCallback("eval_loss").best == float("inf")
    assert BestAndPlotCallback("eval_rouge-l").best == float("-inf")


def test_resumed_best_value(tmp_path):
    """A resumed run keeps the best value of best/ when best/ was chosen by the same metric."""
    (tmp_path / "best").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path))

    def resumed(record: dict, metric: str) -> float:
        (tmp_path / "best" / "best.json").write_text(json.dumps(record))
        callback = BestAndPlotCallback(metric)
        callback.on_train_begin(args, None, None)
        return callback.best

    new = {"step": 2, "metric": "eval_rouge-l", "eval_loss": 3.0, "eval_rouge-l": 9.0}
    assert resumed(new, "eval_rouge-l") == 9.0
    assert resumed(new, "eval_loss") == float("inf")  # another metric chose it: replaced at the next eval
    assert resumed({"step": 1, "eval_loss": 0.5}, "eval_loss") == 0.5  # best.json before best_metric
    assert resumed({"step": 1, "eval_loss": 0.5}, "eval_bleu-4") == float("-inf")


# ---------------------------------------------------------------------------- refused before training
@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the recipe reads any weight."""

    def load_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(glmtune.loading, "load_model", load_model)


def test_unknown_metric_name_lists_the_choices(base, eval_file, tmp_path, no_weights):
    raw = config(base, tmp_path / "out", eval_file)
    with pytest.raises(ConfigError, match="did you mean 'rouge-l'") as err:
        load_config(raw, ["eval.best_metric=rouge_l"])
    assert "choices: eval_loss, rouge-1, rouge-2, rouge-l, bleu-4, exact_match" in str(err.value)

    # A metric of another task (F1 of SPO triples) is not logged for this plain-text eval data.
    with pytest.raises(ConfigError) as err:
        run(raw, "eval.best_metric=f1")
    assert "choices: eval_loss, rouge-1, rouge-2, rouge-l, bleu-4, exact_match" in str(err.value)
    assert "task 'text'" in str(err.value)
    assert not (tmp_path / "out" / "checkpoint-1").exists()

    # A generation metric without generation, or without eval data to generate for.
    with pytest.raises(ConfigError, match="eval.predict_with_generate"):
        load_config(raw, ["eval.best_metric=rouge-l", "eval.predict_with_generate=false"])
    with pytest.raises(ConfigError, match="choices: eval_loss"):
        run(raw, "eval.best_metric=bleu-4", "data.eval_file=null")


def test_best_metric_spellings(tmp_path):
    raw = config(tmp_path / "m", tmp_path / "out", tmp_path / "eval.jsonl")
    for spelling, name in [("ROUGE-L", "rouge-l"), ("eval_bleu-4", "bleu-4"), ("loss", "eval_loss")]:
        assert load_config(raw, [f"eval.best_metric={spelling}"]).eval.best_metric == name
    assert load_config(raw).eval.best_metric == "eval_loss"


# ---------------------------------------------------------------------------------- off: no generation
def test_no_generation_without_predict_with_generate(base, eval_file, tmp_path, monkeypatch, plotted):
    calls = []
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(a) or [])
    out = tmp_path / "out"
    summary = run(config(base, out, eval_file, predict_with_generate=False))
    assert calls == []
    evals = evaluations(out)
    assert sorted(evals) == [1, 2, 3]
    assert not any(k in h for h in evals.values() for k in GENERATED)
    assert summary["generation_metrics"] is None and summary["generation_eval"] is None
    assert summary["best_metric"] == "eval_loss" and summary["best_step"] in evals
    assert set(plotted.series[-1]) == {"train loss", "eval loss"} and plotted.panels == 0


# ------------------------------------------------------------------- eval_ratio: the split's own rows
def test_eval_ratio_generates_for_the_split_rows(base, tmp_path, monkeypatch):
    """With data.eval_ratio the examples generated for are the raw rows of the eval split, also when
    rows were left out of the tokenized data (an invalid row, a row whose reply a long system message
    pushes out of max_length)."""
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": t["target"]}]}
        for p, t in zip(PROMPTS * 3, TRAIN * 3)
    ]
    rows.insert(2, {"messages": [{"role": "user", "content": "no reply"}]})  # invalid: skipped
    rows.insert(5, {"messages": [{"role": "system", "content": "长" * 200}, *rows[0]["messages"]]})
    out = tmp_path / "out"
    raw = config(base, out, None)
    raw["data"].update(train_file=str(write_jsonl(tmp_path / "rows.jsonl", rows)), skip_invalid=True)
    raw["data"]["eval_ratio"] = 0.5
    raw["train"].update(max_steps=1, eval_steps=None, save_steps=5)  # no evaluation: just the set-up
    seen = []
    original = GlmtuneTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)
    cfg = load_config(raw)
    lines: list[str] = []
    train(cfg, printer=lambda *a, **k: lines.append(str(a[0])))
    assert any("1 dropped, 1 invalid" in line for line in lines), lines

    (trainer,) = seen
    gen = trainer.generation_eval
    assert len(gen) == len(trainer.eval_dataset) == 6
    # Each example generated for is the one behind the eval row at its position: encoded, it is that row.
    tok = glmtune.load_tokenizer(base)
    template = glmtune.get_template(base)
    for prompt, reference, row in zip(gen.prompts, gen.references, trainer.eval_dataset):
        messages = [*prompt, {"role": "assistant", "content": reference}]
        (encoded,), _ = encode_all(tok, template, [Example(messages, "")], _encode_settings(cfg))
        assert encoded.input_ids == row["input_ids"]


# ------------------------------------------------------------------ the model is left as it was
def test_generation_restores_the_training_state(base, eval_file):
    """Mode, use_cache (off under gradient checkpointing) and the global RNG are as before; sampling is
    seeded, so two evaluations of the same weights give the same replies."""
    model = glmtune.load_model(base)
    model.train()
    model.config.use_cache = False
    during = []
    generate = model.generate

    def record(*a, **k):
        during.append((model.training, model.config.use_cache))
        return generate(*a, **k)

    model.generate = record
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(process_index=0, world_size=1),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    examples = read_examples(eval_file).examples
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=1.0)
    gen = GenerationEval(
        examples, glmtune.load_tokenizer(base), glmtune.resolve_model(base).spec, settings, 2, 7
    )
    rng = torch.get_rng_state()
    first = gen.generate(trainer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.config.use_cache is False
    assert during and all(d == (False, True) for d in during)
    assert gen.generate(trainer) == first and len(first) == len(examples)


# ------------------------------------------------------------------------------------ DDP (gloo, CPU)
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_process_generation_metrics(base, eval_file, tmp_path):
    """Two processes each generate for their share of the examples; the replies are gathered, so the
    logged scores are those of all of them (the references are the base model's replies and the LoRA
    barely moves in one step: every reply matches)."""
    out = tmp_path / "out"
    raw = config(base, out, eval_file)
    raw["train"].update(max_steps=1, learning_rate=1e-8)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "glmtune.cli", "train", str(cfg_file)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    (entry,) = evaluations(out).values()
    references = [json.loads(line)["target"] for line in eval_file.read_text().splitlines()]
    expected = generation_eval.score_generations(references, references, "chatglm3", "text")
    assert {k: entry[metric_key(k)] for k in expected} == pytest.approx(expected)
    assert entry["eval_exact_match"] == 1.0


# ------------------------------------------------------------------------- the names best_metric takes
@pytest.mark.parametrize(
    "refs",
    [
        ["a reply", "another reply"],
        ['[{"subject": "北京", "predicate": "位于", "object": "中国"}]', "[]"],
        ['["体育"]', '["财经", "科技"]'],
        ['{"name": "x", "city": "y"}', '[{"subject": "a", "predicate": "b", "object": "c"}]', '["体育"]'],
    ],
    ids=["text", "spo", "labels", "json-mixed"],
)
def test_task_metric_names_are_config_choices(refs):
    """The names logged for any data are among what eval.best_metric accepts before the data is known,
    and they depend on the references only."""
    from glmtune.config import BEST_METRICS
    from glmtune.metrics import flat_task_metrics, task_metric_names, task_metrics

    names = task_metric_names(refs)
    assert names and set(names) <= set(BEST_METRICS)
    assert list(flat_task_metrics(task_metrics(["not it"] * len(refs), refs))) == names
