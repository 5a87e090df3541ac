"""glmtune.export: LoRA merged into tiny ChatGLM models, reloaded by plain transformers (in a process that
never imports glmtune), by glmtune, and in the official layouts; the refusals."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import glmtune
from glmtune.config import load_config, save_config
from glmtune.errors import ConfigError
from glmtune.export import SELF_CHECK_CHATS, SELF_CHECK_TEXTS, export, merge_lora
from glmtune.testing import CORPUS, make_tiny_model

TOL = 1e-4
GLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
MESSAGES = [{"role": "user", "content": "你好，请介绍一下机器学习。"}]
# Texts the exported tokenizer.json must encode like glmtune's tokenizer (besides the built-in self-check).
EXTRA_TEXTS = list(CORPUS) + [
    "请从下面的句子中抽取三元组，并以 JSON 格式输出。\n\n\n",
    "    indented code\n\tand a tab",
    "🙂🙃 emoji-only 🚀",
    "全角，标点！以及　全角空格",
    "x" * 50 + " " * 7 + "y",
]


def _lora(base: Path, out: Path, targets: list[str], seed: int) -> Path:
    """A random LoRA adapter whose B matrices are non-zero (so the adapter changes the outputs)."""
    model = get_peft_model(glmtune.load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(out))
    return out


def _prompt_ids(path) -> list[int]:
    return glmtune.get_template(path).encode_prompt(glmtune.load_tokenizer(path), MESSAGES) + [5, 6, 7, 8]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _run(base: Path, root: Path, **model_cfg) -> Path:
    """A training run folder: glmtune_config.yaml (+ final/ filled by the caller)."""
    run = root / "run"
    cfg = load_config(
        {
            "model": {"path": str(base), **model_cfg},
            "data": {"train_file": "train.json", "max_length": 64},
            "train": {"output_dir": str(run)},
        }
    )
    run.mkdir(parents=True)
    save_config(cfg, run / "glmtune_config.yaml")
    return run


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """chatglm3 (exported from a run folder) and chatglm2 (from an adapter folder + base=): base, adapter,
    reference logits of glmtune's adapter model, and the hf export."""
    root = tmp_path_factory.mktemp("export")
    cases = {}
    for i, generation in enumerate(("chatglm3", "chatglm2")):
        d = root / generation
        base = make_tiny_model(d / "base", generation, seed=i)
        adapter = _lora(base, d / "adapter", GLM_TARGETS, seed=10 + i)
        ids = _prompt_ids(base)
        ref = _logits(glmtune.load_model(base, adapter=adapter), ids)
        plain = _logits(glmtune.load_model(base), ids)
        if generation == "chatglm3":
            run = _run(base, d)
            shutil.copytree(adapter, run / "final")
            out = export(run, d / "hf", max_shard_size="100KB")
        else:
            out = export(adapter, d / "hf", base=base)
        cases[generation] = dict(base=base, adapter=adapter, ids=ids, ref=ref, plain=plain, out=out)
    return cases


PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    sys.modules["glmtune"] = None  # importing glmtune now fails: the folder must stand on its own
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.load(open(sys.argv[1], encoding="utf-8"))
    tensors, report = {}, {}
    for name, case in job["cases"].items():
        model = AutoModelForCausalLM.from_pretrained(case["path"], dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(case["path"])
        with torch.no_grad():
            tensors[name] = model(torch.tensor([case["ids"]])).logits[0].contiguous()
        report[name] = {
            "class": type(model).__name__,
            "eos": model.generation_config.eos_token_id,
            "ids": [tok.encode(t) for t in job["texts"]],
            "ids_plain": [tok.encode(t, add_special_tokens=False) for t in job["texts"]],
            "decoded": [tok.decode(tok.encode(t, add_special_tokens=False)) for t in job["texts"]],
            "chats": [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=False)
                      for c in job["chats"]],
        }
    report["glmtune_imported"] = any(m.startswith("glmtune") and sys.modules[m] is not None for m in sys.modules)
    save_file(tensors, sys.argv[2])
    json.dump(report, open(sys.argv[3], "w", encoding="utf-8"))
""")


@pytest.fixture(scope="module")
def plain(glm, tmp_path_factory):
    """One fresh Python process with plain transformers (glmtune made unimportable) over every export."""
    d = tmp_path_factory.mktemp("plain")
    texts = list(SELF_CHECK_TEXTS) + EXTRA_TEXTS
    job = {
        "cases": {g: {"path": str(c["out"]), "ids": c["ids"]} for g, c in glm.items()},
        "texts": texts,
        "chats": [list(c) for c in SELF_CHECK_CHATS],
    }
    (d / "job.json").write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    (d / "script.py").write_text(PLAIN_TRANSFORMERS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": "", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(d / "script.py"),
            str(d / "job.json"),
            str(d / "logits.safetensors"),
            str(d / "report.json"),
        ],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (
        load_file(d / "logits.safetensors"),
        json.loads((d / "report.json").read_text(encoding="utf-8")),
        texts,
    )


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm2"])
def test_hf_folder_is_native_glm(glm, generation):
    out = glm[generation]["out"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"]
    assert cfg["glmtune_generation"] == generation
    assert "auto_map" not in cfg and not list(out.glob("*.py"))
    assert (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()
    tokenizer = glmtune.load_tokenizer(glm[generation]["base"])
    stops = glmtune.spec_for(generation).stop_token_ids(tokenizer)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos]) == stops
    if generation == "chatglm3":  # max_shard_size="100KB": several shards and an index
        assert (
            len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
        )
        assert len(stops) == 3


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm2"])
def test_plain_transformers_reproduces_the_adapter_model(glm, plain, generation):
    logits, report, _ = plain
    case = glm[generation]
    assert report["glmtune_imported"] is False
    assert report[generation]["class"] == "GlmForCausalLM"
    got = logits[generation]
    assert got.shape == case["ref"].shape
    diff = (got - case["ref"]).abs().max().item()
    print(f"{generation}: plain transformers vs glmtune base+adapter max |dlogit| = {diff:.2e}")
    assert diff <= TOL
    # The adapter really changed the model (a merge that did nothing would also "reload").
    assert (case["ref"] - case["plain"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm2"])
def test_glmtune_reloads_the_export(glm, generation):
    case = glm[generation]
    assert glmtune.detect_generation(case["out"]) == generation
    model = glmtune.load_model(case["out"])
    assert model.config.glmtune_generation == generation
    assert (_logits(model, case["ids"]) - case["ref"]).abs().max().item() <= TOL


@pytest.mark.parametrize("generation", ["chatglm3", "chatglm2"])
def test_tokenizer_json_matches_glmtune_tokenizer(glm, plain, generation):
    _, report, texts = plain
    slow = glmtune.load_tokenizer(glm[generation]["base"])
    got = report[generation]
    for i, text in enumerate(texts):
        assert got["ids"][i] == slow.encode(text), text
        assert got["ids_plain"][i] == slow.encode(text, add_special_tokens=False), text
        assert got["decoded"][i] == slow.decode(slow.encode(text, add_special_tokens=False)), text
    template = glmtune.get_template(generation)
    for chat, ids in zip(SELF_CHECK_CHATS, got["chats"]):
        assert ids == template.encode_prompt(slow, list(chat))
    assert (got["eos"] if isinstance(got["eos"], list) else [got["eos"]]) == glmtune.spec_for(
        generation
    ).stop_token_ids(slow)
    # glmtune's own sentencepiece class still reads the exported files.
    from glmtune.tokenization import load_chatglm_tokenizer

    again = load_chatglm_tokenizer(glm[generation]["out"], generation)
    assert [again.encode(t) for t in texts] == [slow.encode(t) for t in texts]


def test_official_format_round_trip(glm, tmp_path):
    case = glm["chatglm3"]
    out = export(case["adapter"], tmp_path / "official", format="official", base=case["base"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["glmtune_generation"] == "chatglm3"
    assert not (out / "tokenizer.json").exists()
    assert glmtune.detect_generation(out) == "chatglm3"
    assert (_logits(glmtune.load_model(out), case["ids"]) - case["ref"]).abs().max().item() <= TOL
    assert glmtune.load_tokenizer(out).encode("你好") == glmtune.load_tokenizer(case["base"]).encode("你好")


def test_model_folder_export_and_dtype(glm, tmp_path):
    """A plain model folder (official layout, no adapter) re-saved natively, cast to bfloat16."""
    case = glm["chatglm2"]
    out = export(case["base"], tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    got = _logits(glmtune.load_model(out, dtype=torch.float32), case["ids"])
    assert (got - case["plain"]).abs().max().item() < 0.5  # bf16 weights: close, not equal


def test_export_cli_dtype_and_stage_lines(glm, tmp_path, capsys):
    """`glmtune export --dtype` casts the written weights; each stage is announced on stderr with its time."""
    from glmtune.cli import main

    case = glm["chatglm2"]
    assert (
        main(
            [
                "export",
                str(case["adapter"]),
                "--base",
                str(case["base"]),
                "--out",
                str(tmp_path / "o"),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "o" / "model.safetensors").values())
    err = capsys.readouterr().err
    stages = re.findall(r"^\[\s*[\d.]+s\] (\w+)", err, flags=re.M)
    assert stages == ["loading", "merging", "writing", "exported"]
    assert "(bfloat16) with the adapter" in err


def test_chatglm_v1_exports_official_layout(tmp_path, caplog):
    base = make_tiny_model(tmp_path / "v1", "chatglm", seed=3)
    adapter = _lora(base, tmp_path / "v1-lora", ["query_key_value"], seed=4)
    ids = _prompt_ids(base)
    ref = _logits(glmtune.load_model(base, adapter=adapter), ids)
    with caplog.at_level(logging.WARNING, logger="glmtune.export"):
        out = export(adapter, tmp_path / "v1-out", base=base)  # format="hf": no transformers class for v1
    assert "official" in caplog.text and "ChatGLM-6B" in caplog.text
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatglm"
    assert glmtune.detect_generation(out) == "chatglm"
    assert (_logits(glmtune.load_model(out), ids) - ref).abs().max().item() <= TOL
    assert (ref - _logits(glmtune.load_model(base), ids)).abs().max().item() > 1e-2


def test_ptuning_official_export_and_hf_refusal(glm, tmp_path):
    from glmtune.adapters import prefix_encoder_of
    from glmtune.train.methods import PTuningV2

    case = glm["chatglm3"]
    model = glmtune.load_model(case["base"], prefix=(4, False))
    with torch.no_grad():
        prefix_encoder_of(model).embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    ckpt = tmp_path / "ptuning-ckpt"
    PTuningV2("ptuning_v2", "").save(model, ckpt, json.loads((case["base"] / "config.json").read_text()))
    ref = _logits(glmtune.load_model(case["base"], adapter=ckpt), case["ids"])

    with pytest.raises(ConfigError, match=r"(?s)cannot be merged.*format='official'"):
        export(ckpt, tmp_path / "hf", base=case["base"])
    assert not (tmp_path / "hf").exists()
    out = export(ckpt, tmp_path / "official", base=case["base"], format="official")
    assert (out / "ptuning" / "pytorch_model.bin").exists()
    got = _logits(glmtune.load_model(out, adapter=out / "ptuning"), case["ids"])
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.filterwarnings("ignore:.*quantize_per:UserWarning")
def test_refuses_to_merge_into_a_quantized_base(glm, tmp_path):
    case = glm["chatglm3"]
    # A QLoRA run: the adapter was trained over a 4-bit base.
    run = _run(case["base"], tmp_path / "qlora", quantization="4bit")
    shutil.copytree(case["adapter"], run / "final")
    with pytest.raises(ConfigError, match=r"(?s)model\.quantization=4bit.*float copy.*base="):
        export(run, tmp_path / "q-out")
    # Naming the float base explicitly is the way to merge anyway (export loads it unquantized).
    out = export(run, tmp_path / "float-merge", base=case["base"])
    assert (_logits(glmtune.load_model(out), case["ids"]) - case["ref"]).abs().max().item() <= TOL
    # A base folder stored quantized.
    qbase = tmp_path / "qbase"
    shutil.copytree(case["base"], qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"(?s)stored quantized.*bitsandbytes.*FLOAT_BASE"):
        export(case["adapter"], tmp_path / "q-out", base=qbase)
    # A loaded model whose base layers are quantized.
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = glmtune.load_model(case["base"], adapter=case["adapter"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    layer.base_layer = DynamicLinear.from_float(layer.base_layer)
    with pytest.raises(ConfigError, match="quantized base"):
        merge_lora(model)
    assert not (tmp_path / "q-out").exists()


def test_input_errors_and_atomic_write(glm, tmp_path, monkeypatch):
    case = glm["chatglm3"]
    with pytest.raises(ConfigError, match="base="):
        export(case["adapter"], tmp_path / "x")  # the adapter config names no local base
    with pytest.raises(ConfigError, match="format="):
        export(case["adapter"], tmp_path / "x", base=case["base"], format="gguf")
    with pytest.raises(ConfigError, match="must not be"):
        export(case["adapter"], case["adapter"] / "inside", base=case["base"])
    with pytest.raises(ConfigError, match="only for adapters"):
        export(case["base"], tmp_path / "x", base=case["base"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="overwrite"):
        export(case["adapter"], taken, base=case["base"])
    assert (taken / "keep.txt").read_text() == "mine"

    import glmtune.export as ex

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_write_hf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(case["adapter"], tmp_path / "atomic", base=case["base"])
    assert not (tmp_path / "atomic").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".atomic")]
