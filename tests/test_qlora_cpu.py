"""QLoRA and P-Tuning v2 over a bitsandbytes-quantized base, for real, on the CPU: the training recipe end to
end on tiny models (bitsandbytes' 4-bit and 8-bit layers run on the CPU), what trains and what stays float,
and the saved adapter reloading over the quantized base to the same logits as the model the Trainer held."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import glmtune
from glmtune.config import load_config
from glmtune.errors import ConfigError
from glmtune.testing import make_tiny_model
from glmtune.train import train
from glmtune.train.trainer import GlmtuneTrainer

from conftest import make_tiny_hf

bnb = pytest.importorskip("bitsandbytes")

ROW = {"context": "你好，请介绍一下你自己。", "target": "我是一个人工智能助手，可以回答问题、写作和翻译。"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_models")
    built: dict[str, Path] = {}

    def get(generation: str) -> Path:
        if generation not in built:
            built[generation] = make_tiny_model(root / generation, generation)
        return built[generation]

    return get


@pytest.fixture
def held(monkeypatch):
    """The GlmtuneTrainer(s) the recipe builds (their model is the in-memory trained one)."""
    made = []
    original = GlmtuneTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)
    return made


def _run(base: Path, tmp_path: Path, method: str, quantization: str, lr: float) -> tuple[dict, Path]:
    """6 steps of batch 2 on one repeated example, evaluating at step 3 (an evaluation between training
    steps: bitsandbytes' 4-bit layers must not switch to their inference-only CPU kernel there)."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    raw = {
        "model": {"path": str(base), "quantization": quantization},
        "data": {
            "train_file": str(data),
            "eval_file": str(data),
            "max_length": 64,
            "cache_dir": str(tmp_path / "c"),
        },
        "method": {"name": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "pre_seq_len": 4},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "batch_size": 2,
            "learning_rate": lr,
            "logging_steps": 1,
            "save_steps": 6,
            "eval_steps": 3,
            "report_to": [],
            "seed": 0,
        },
    }
    summary = train(load_config(raw), printer=lambda *a, **k: None)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and any("eval_loss" in h for h in state["log_history"])
    return {"summary": summary, "losses": losses}, out / "final"


def _logits(model, ids, train_mode: bool = False) -> torch.Tensor:
    """``train_mode`` (a model without dropout): bitsandbytes' 4-bit layers dequantize in the compute dtype
    there, as during training, instead of repacking for their bfloat16 inference kernel."""
    model.train(train_mode)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _ids(base: Path) -> list[int]:
    messages = [{"role": "user", "content": ROW["context"]}, {"role": "assistant", "content": ROW["target"]}]
    return glmtune.get_template(base).encode_example(glmtune.load_tokenizer(base), messages).input_ids


def test_qlora_4bit_trains_and_the_adapter_reloads(tiny, tmp_path, held):
    base = tiny("chatglm3")
    result, final = _run(base, tmp_path, "lora", "4bit", 5e-2)
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.5, losses

    (trainer,) = held
    model = trainer.model
    lora = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)]
    assert len(lora) == 2 * 3  # q k v of the 2 layers (chatglm3's LoRA targets), over 4-bit weights
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32 and not head.weight.requires_grad

    ids = _ids(base)
    expected = _logits(model, ids, train_mode=True)
    reloaded = glmtune.load_model(base, adapter=final, quantization="4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules()) == 12
    assert (_logits(reloaded, ids, train_mode=True) - expected).abs().max().item() < 1e-4
    untrained = _logits(glmtune.load_model(base, quantization="4bit"), ids, train_mode=True)
    assert (untrained - expected).abs().max().item() > 1e-2  # the comparison could fail


def test_qlora_8bit_on_a_transformers_model(tmp_path, held):
    """A transformers folder: transformers' BitsAndBytesConfig loading on the CPU, LoRA over LLM.int8."""
    hf = make_tiny_hf(
        tmp_path / "hf",
        make_tiny_model(tmp_path / "glm4", "glm4"),
        chat_template="{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    )
    result, final = _run(hf, tmp_path, "lora", "8bit", 2e-2)
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    (trainer,) = held
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in trainer.model.modules()) == 2 * 7
    assert (final / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("generation", ["chatglm", "chatglm3"])
def test_ptuning_v2_on_an_8bit_base(generation, tiny, tmp_path, held):
    """The official ChatGLM 8-bit P-Tuning: the base in LLM.int8, only the float32 prefix encoder trains,
    is saved float32, and reloads over the 8-bit base to the logits the Trainer's model gives."""
    base = tiny(generation)
    result, final = _run(base, tmp_path, "ptuning_v2", "8bit", 1e-1)
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.1, losses

    (trainer,) = held
    model = trainer.model
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 2 * (
        4 if generation == "chatglm" else 6
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = {n for n, _ in model.named_parameters() if "prefix_encoder." in n}
    assert trainable == encoder
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in encoder)
    state = torch.load(final / "pytorch_model.bin", weights_only=True)
    assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
    assert state["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32

    ids = _ids(base)
    expected = _logits(model, ids)
    reloaded = glmtune.load_model(base, adapter=final, quantization="8bit")
    assert (_logits(reloaded, ids) - expected).abs().max().item() < 1e-4
    untrained = _logits(glmtune.load_model(base, quantization="8bit", prefix=(4, False)), ids)
    assert (untrained - expected).abs().max().item() > 1e-3


def test_refused_before_any_weight_without_bitsandbytes(tiny, tmp_path, monkeypatch):
    import glmtune.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the configuration was refused")

    base = tiny("chatglm3")
    monkeypatch.setattr(glmtune.loading, "iter_tensors", refuse)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ConfigError, match=r"(?s)model\.quantization=4bit.*bitsandbytes"):
        _run(base, tmp_path, "lora", "4bit", 1e-2)
    assert not (tmp_path / "out" / "checkpoint-6").exists()
