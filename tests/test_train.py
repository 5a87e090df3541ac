"""The training recipe end to end on tiny models: every generation and method, reload equivalence,
resume equivalence, atomic checkpoints, the NaN guard, guards before loading, continuing from adapters,
best/ + loss.png + train_summary.json.

Every run is a few steps of a tiny random model on CPU, so the whole file stays well under a few minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import glmtune
from glmtune.cli import main as cli_main
from glmtune.config import load_config
from glmtune.errors import ConfigError
from glmtune.testing import make_tiny_model
from glmtune.train import train
from glmtune.train.methods import LoRA
from glmtune.train.trainer import STAGING, GlmtuneTrainer, TrainingDiverged

from conftest import make_tiny_hf, shared_path

# One example (a "repeated batch" when every row is this one) and a few distinct ones.
ROW = {"context": "你好，请介绍一下你自己。", "target": "我是一个人工智能助手，可以回答问题、写作和翻译。"}
ROWS = [
    ROW,
    {"context": "Hello world!", "target": "The quick brown fox jumps over the lazy dog."},
    {"context": "今天天气不错。", "target": "我们去公园散步吧。北京的秋天很美。"},
    {"context": "Instruction: classify the comment.", "target": "the apples are fresh and sweet."},
    {"context": "机器学习是什么？", "target": "机器学习是人工智能的一个分支。"},
    {"context": "def add(a, b):", "target": "return a + b"},
    {"context": "水果 蔬菜 电脑", "target": "手机 衣服 书籍 酒店 旅游"},
    {"context": "请抽取三元组。", "target": '{"subject": "北京", "predicate": "位于", "object": "中国"}'},
]


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(generation) -> a tiny model folder, built once per session on first use."""
    root = tmp_path_factory.mktemp("train_models")
    built: dict[str, Path] = {}

    def get(generation: str) -> Path:
        if generation not in built:
            if generation == "hf":
                built[generation] = make_tiny_hf(root / "hf", get("glm4"))
            else:
                built[generation] = make_tiny_model(root / generation, generation)
        return built[generation]

    return get


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(
    model: Path, out: Path, train_file: Path, cache: Path, method: str = "lora", eval_file: Path | None = None
) -> dict:
    """A small run: 6 steps of batch 2, a high learning rate, a checkpoint every 3 steps, all kept."""
    return {
        "model": {"path": str(model)},
        "data": {
            "train_file": str(train_file),
            "eval_file": str(eval_file) if eval_file else None,
            "max_length": 64,
            "cache_dir": str(cache),
        },
        "method": {"name": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "pre_seq_len": 4},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": None,
            "report_to": [],
            "seed": 0,
        },
    }


def run(raw: dict, *overrides: str) -> dict:
    return train(load_config(raw, overrides), printer=lambda *a, **k: None)


@pytest.fixture
def trainers(monkeypatch):
    """Records every GlmtuneTrainer the recipe builds; ``hooks`` run on each right after __init__."""
    seen = SimpleNamespace(made=[], hooks=[])
    original = GlmtuneTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.made.append(self)
        for hook in seen.hooks:
            hook(self)

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)
    return seen


def logged_losses(out: Path, step: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def sample_ids(base: Path) -> list[int]:
    """The training example, encoded by the model's own template (valid input for every generation)."""
    tok = glmtune.load_tokenizer(base)
    messages = [{"role": "user", "content": ROW["context"]}, {"role": "assistant", "content": ROW["target"]}]
    return glmtune.get_template(base).encode_example(tok, messages).input_ids


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class Interrupted(Exception):
    pass


class StopAt(TrainerCallback):
    """Simulates a crash: raises at the end of optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"killed at step {self.step}")


# ------------------------------------------------------------------ 1. end to end, every generation
# Every generation with every method it supports (P-Tuning v2 is ChatGLM-only); QLoRA: tests/test_qlora_cpu.py.
E2E = (
    [(g, "lora") for g in ("chatglm", "chatglm2", "chatglm3", "glm4", "hf")]
    + [(g, "ptuning_v2") for g in ("chatglm", "chatglm2", "chatglm3", "glm4")]
    + [(g, "full") for g in ("chatglm", "chatglm2", "chatglm3", "glm4", "hf")]
)


@pytest.mark.parametrize(("generation", "method"), E2E, ids=[f"{g}-{m}" for g, m in E2E])
def test_end_to_end_loss_falls_and_saved_weights_reload(
    generation, method, models, data_cache, tmp_path, trainers
):
    """A repeated batch + a high LR: the loss falls. What final/ (and the last checkpoint) holds, reloaded
    through the public loader, gives the same logits as the in-memory model the Trainer trained.

    The in-memory model is the one the recipe's GlmtuneTrainer holds (captured by patching its __init__):
    comparing against it, not against another reload, is what proves the save/load round trip loses
    nothing. The base model's logits must differ from it, so the comparison can fail if the adapter or
    prefix were silently not applied.
    """
    base = models(generation)
    data = write_jsonl(tmp_path / "train.jsonl", [ROW] * 4)  # every batch is the same example
    out = tmp_path / "out"
    # High enough to move a tiny model in 6 steps, low enough not to bounce (the Llama model starts from
    # std-0.02 weights and oscillates at the ChatGLM rates).
    lr = {("hf", "lora"): "2e-2", ("hf", "full"): "2e-3"}.get(
        (generation, method), {"lora": "5e-2", "ptuning_v2": "1e-1", "full": "5e-3"}[method]
    )
    summary = run(run_config(base, out, data, data_cache, method), f"train.learning_rate={lr}")

    assert summary["steps"] == 6 and summary["method"] == method and summary["generation"] == generation
    losses = logged_losses(out, 6)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.1, losses

    (trainer,) = trainers.made
    in_memory = trainer.model
    ids = sample_ids(base)
    expected = logits(in_memory, ids)
    assert torch.isfinite(expected).all()
    final = out / "final"
    if method == "full":
        reloaded = {
            "final": glmtune.load_model(final),
            "checkpoint-6": glmtune.load_model(out / "checkpoint-6"),
        }
    else:
        reloaded = {name: glmtune.load_model(base, adapter=out / name) for name in ("final", "checkpoint-6")}
    for name, model in reloaded.items():
        got = logits(model, ids)
        assert got.shape == expected.shape
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: logits differ by {diff}"
    untrained = logits(glmtune.load_model(base), ids)
    assert (untrained - expected).abs().max().item() > 1e-3, "training changed nothing the reload could miss"

    if method == "lora":
        assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    elif method == "ptuning_v2":
        state = torch.load(final / "pytorch_model.bin", weights_only=True)
        assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
        assert json.loads((final / "config.json").read_text())["pre_seq_len"] == 4
    else:  # a full fine-tune is a self-contained model folder: its tokenizer encodes as the base one does
        assert sample_ids(final) == ids
    assert (final / "glmtune_config.yaml").exists()
    assert load_config(final).method.name == method


# ------------------------------------------------------------------------------- 2. resume equivalence
def test_resume_equivalence(models, data_cache, tmp_path, trainers):
    """8 steps uninterrupted == killed after step 5 then resumed from the latest checkpoint (4) == the same
    kill resumed from checkpoint 2 (via the CLI, train.resume=2), to 1e-6 on every LoRA weight. LoRA
    dropout is on and the data has 8 distinct rows, so the RNG state and the data order must be restored
    (resuming at step 2 also skips half an epoch of batches)."""
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    over = ("method.lora_dropout=0.3", "train.max_steps=8", "train.save_steps=2", "train.learning_rate=5e-3")

    def cfg(name):
        return run_config(base, tmp_path / name, data, data_cache)

    run(cfg("straight"), *over)
    straight = adapter_weights(tmp_path / "straight" / "final")

    trainers.hooks.append(lambda t: t.add_callback(StopAt(5)))
    with pytest.raises(Interrupted):
        run(cfg("latest"), *over)
    trainers.hooks.clear()
    latest = tmp_path / "latest"
    assert sorted(p.name for p in latest.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (latest / "final").exists()
    shutil.copytree(latest, tmp_path / "by_step")

    # The run trained on after checkpoint 4, so matching the straight run is not trivially true.
    assert max_diff(adapter_weights(latest / "checkpoint-4"), straight) > 1e-4

    run(cfg("latest"), *over, "train.resume=latest")
    assert max_diff(adapter_weights(latest / "final"), straight) <= 1e-6

    # The same through the CLI, resuming from an earlier checkpoint by its step number.
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg("by_step")), encoding="utf-8")
    assert cli_main(["train", str(cfg_file), *over, "train.resume=2"]) == 0
    assert max_diff(adapter_weights(tmp_path / "by_step" / "final"), straight) <= 1e-6
    # The loss history carries on: one loss per step, the same as the uninterrupted run's.
    assert logged_losses(tmp_path / "by_step", 8) == pytest.approx(
        logged_losses(tmp_path / "straight", 8), abs=1e-5
    )


def test_resume_equivalence_ptuning(models, data_cache, tmp_path, trainers):
    """The same for P-Tuning v2, whose checkpoints hold the prefix in the official layout (the trainer
    reads it back itself): killed after step 3, resumed from checkpoint 2, equal to the straight run."""
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    over = ("train.max_steps=6", "train.save_steps=2", "train.learning_rate=5e-2")

    def prefix(folder):
        return torch.load(folder / "pytorch_model.bin", weights_only=True)

    run(run_config(base, tmp_path / "straight", data, data_cache, "ptuning_v2"), *over)
    trainers.hooks.append(lambda t: t.add_callback(StopAt(3)))
    raw = run_config(base, tmp_path / "resumed", data, data_cache, "ptuning_v2")
    with pytest.raises(Interrupted):
        run(raw, *over)
    trainers.hooks.clear()
    straight = prefix(tmp_path / "straight" / "final")
    assert max_diff(prefix(tmp_path / "resumed" / "checkpoint-2"), straight) > 1e-4
    run(raw, *over, "train.resume=latest")
    assert max_diff(prefix(tmp_path / "resumed" / "final"), straight) <= 1e-6


# ------------------------------------------------------------------------------ 3. atomic checkpoints
def test_failed_save_leaves_no_checkpoint(models, data_cache, tmp_path, monkeypatch):
    """A save that dies half-way (a partial file written, then an error) leaves no checkpoint-<step>:
    the previous checkpoint stays the latest, .staging is never taken for a checkpoint, and
    train.resume=latest continues from the good one."""
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    out = tmp_path / "out"
    raw = run_config(base, out, data, data_cache)
    original = LoRA.save

    def flaky(self, model, out_dir, base_config, state_dict=None):
        if Path(out_dir).name == "checkpoint-4":
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "adapter_model.safetensors").write_bytes(b"\x00partial")
            raise OSError(28, "No space left on device")
        return original(self, model, out_dir, base_config, state_dict)

    with monkeypatch.context() as m:
        m.setattr(LoRA, "save", flaky)
        with pytest.raises(OSError, match="No space left"):
            run(raw, "train.save_steps=2")
    assert (out / "checkpoint-2").is_dir()
    assert not (out / "checkpoint-4").exists()
    assert (out / STAGING / "checkpoint-4" / "adapter_model.safetensors").exists()  # the partial write
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert glmtune.load_model(base, adapter=out / "checkpoint-2") is not None

    run(raw, "train.save_steps=2", "train.resume=latest")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not (out / STAGING).exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-6")
    glmtune.load_model(base, adapter=out / "checkpoint-4")


# ------------------------------------------------------------------------------------- 4. NaN guard
class PoisonAt(TrainerCallback):
    """Sets a trainable weight to inf at the end of step ``step``: the next step's loss is not finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float("inf"))


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(models, data_cache, tmp_path, trainers):
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    out = tmp_path / "out"
    trainers.hooks.append(lambda t: t.add_callback(PoisonAt(3)))
    with pytest.raises(TrainingDiverged) as info:
        run(run_config(base, out, data, data_cache), "train.save_steps=2")
    message = str(info.value)
    assert "at step 4;" in message, message
    assert str(out / "checkpoint-2") in message, message
    assert not (out / "checkpoint-4").exists() and not (out / "final").exists()
    model = glmtune.load_model(base, adapter=out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(logits(model, sample_ids(base))).all()


# ------------------------------------------------------------------------ 5. guards before any weight
@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load a model or read a weights file fails the test."""
    import transformers

    import glmtune.loading
    import glmtune.weights

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the configuration was refused")

    monkeypatch.setattr(glmtune.loading, "load_model", refuse)
    monkeypatch.setattr(glmtune.loading, "iter_tensors", refuse)
    monkeypatch.setattr(glmtune.weights, "iter_tensors", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("generation", "overrides", "expected"),
    [
        ("hf", ["method.name=ptuning_v2"], r"P-Tuning v2 is not supported for hf"),
        ("chatglm3", ["train.precision=fp16"], r"fp16.*CUDA"),
        ("chatglm3", ["model.dtype=float16"], r"float16"),
    ],
    ids=["ptuning-on-hf", "fp16-on-cpu", "float16-weights-on-cpu"],
)
def test_refused_before_loading_weights(
    generation, overrides, expected, models, data_cache, tmp_path, no_weights
):
    if torch.cuda.is_available() and generation != "hf":
        pytest.skip("a CUDA machine can do this")
    base = models(generation)
    data = write_jsonl(tmp_path / "train.jsonl", [ROW])
    with pytest.raises(ConfigError, match=expected):
        run(run_config(base, tmp_path / "out", data, data_cache), *overrides)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# ------------------------------------------------------- 6. continue the official P-Tuning fixture
def test_continue_official_ptuning_checkpoint(data_cache, tmp_path, trainers):
    base = shared_path("fixtures", "chatglm3_tiny")
    adapter = shared_path("fixtures", "chatglm3_ptuning")
    start = torch.load(adapter / "pytorch_model.bin", weights_only=True)[
        "transformer.prefix_encoder.embedding.weight"
    ]
    data = write_jsonl(tmp_path / "train.jsonl", [ROW] * 4)
    out = tmp_path / "out"
    # pre_seq_len 128 in the config: the adapter's own pre_seq_len (4) must win.
    run(
        run_config(base, out, data, data_cache, "ptuning_v2"),
        f"model.adapter={adapter}",
        "method.pre_seq_len=128",
        "train.max_steps=3",
        "train.learning_rate=1e-2",
    )

    final = out / "final"
    state = torch.load(final / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    trained = state["transformer.prefix_encoder.embedding.weight"]
    assert trained.shape == (4, 128) and trained.dtype == torch.float32
    config = json.loads((final / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is False
    # Trained further from the fixture's values (3 Adam steps of 1e-2), not from a fresh N(0, 1) prefix.
    change = (trained - start).abs().max().item()
    assert 0 < change < 0.1, change
    # The saved folder is an official P-Tuning checkpoint glmtune reads back to the in-memory model.
    (trainer,) = trainers.made
    ids = sample_ids(base)
    got = logits(glmtune.load_model(base, adapter=final), ids)
    assert (got - logits(trainer.model, ids)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- 7. continue from a LoRA adapter
def test_continue_from_lora_adapter_keeps_its_config(models, data_cache, tmp_path):
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", [ROW] * 4)
    first = tmp_path / "first"
    run(run_config(base, first, data, data_cache), "train.max_steps=3", "method.lora_r=4")
    before = adapter_weights(first / "final")

    second = tmp_path / "second"
    # A different lora_r in the config: the adapter being continued keeps its own rank.
    run(
        run_config(base, second, data, data_cache),
        f"model.adapter={first / 'final'}",
        "method.lora_r=16",
        "train.max_steps=3",
    )
    config = json.loads((second / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4
    after = adapter_weights(second / "final")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert max_diff(after, before) > 1e-5  # it trained on
    # ... from the first run's final weights: a fresh adapter (B = 0) would start exactly at the base
    # model's loss, first_losses[0]; the continued one starts below the first run's last logged loss
    # (taken before that step's update).
    first_losses, second_losses = logged_losses(first, 3), logged_losses(second, 3)
    assert second_losses[0] < first_losses[-1] < first_losses[0]


# ---------------------------------------------------------- 8. best/, loss.png, train_summary.json
def test_best_plot_and_summary(models, data_cache, tmp_path):
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    out = tmp_path / "out"
    summary = run(
        run_config(base, out, data, data_cache, eval_file=evals),
        "train.max_steps=4",
        "train.save_steps=1",
        "train.eval_steps=1",
    )

    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    eval_losses = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(eval_losses) == [1, 2, 3, 4]
    best_step = min(eval_losses, key=eval_losses.get)

    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {
        "step": best_step,
        "metric": "eval_loss",
        "eval_loss": pytest.approx(eval_losses[best_step]),
    }
    assert (out / "best" / "adapter_config.json").exists()
    # best/ holds the weights of that step: the same as the checkpoint saved at it.
    assert max_diff(adapter_weights(out / "best"), adapter_weights(out / f"checkpoint-{best_step}")) == 0
    glmtune.load_model(base, adapter=out / "best")

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "train_summary.json").read_text())
    assert on_disk.keys() == summary.keys()
    assert on_disk["steps"] == 4
    assert on_disk["tokens_per_second"] > 0 and on_disk["tokens_seen"] > 0
    assert on_disk["peak_memory_bytes"] > 0
    assert on_disk["best_eval_loss"] == pytest.approx(min(eval_losses.values()))
    assert on_disk["last_eval_loss"] == pytest.approx(eval_losses[4])
    assert (out / "glmtune_config.yaml").exists() and load_config(out).train.max_steps == 4


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_trains_on_a_quantized_base(bits, models, data_cache, tmp_path):
    """QLoRA on a GPU: LoRA over a bitsandbytes k-bit base; the loss falls and the adapter reloads (the CPU:
    tests/test_qlora_cpu.py)."""
    base = models("chatglm3")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    raw = run_config(base, tmp_path / "out", data, data_cache)
    raw["model"].update(quantization=bits, dtype="bfloat16")
    raw["train"]["precision"] = "bf16"
    summary = train(load_config(raw), printer=lambda *a, **k: None)
    history = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())[
        "log_history"
    ]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    assert (Path(summary["output"]) / "adapter_model.safetensors").exists()
