"""Tiny random checkpoints in every official format: written, loaded back, and attacked."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmtune
from glmtune.errors import ModelLoadError
from glmtune.official_format import save_official
from glmtune.testing import make_tiny_model

GENERATIONS = ["chatglm", "chatglm2", "chatglm3", "glm4"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(generation: str, safe: bool = True):
        key = (generation, safe)
        if key not in built:
            # Small shards so the index + several shards path is exercised.
            built[key] = make_tiny_model(
                root / f"{generation}-{int(safe)}",
                generation,
                safe=safe,
                max_shard_bytes=60_000,
                seed=GENERATIONS.index(generation),
            )
        return built[key]

    return get


def _ids(tokenizer, generation):
    template = glmtune.get_template(generation)
    return template.encode_prompt(tokenizer, [{"role": "user", "content": "你好，今天天气不错。"}])


@pytest.mark.parametrize("generation", GENERATIONS)
def test_detected_and_loaded_with_the_right_classes(tiny, generation):
    path = tiny(generation)
    assert glmtune.detect_generation(path) == generation
    model = glmtune.load_model(path)
    expected = "ChatGLMv1ForCausalLM" if generation == "chatglm" else "GlmForCausalLM"
    assert type(model).__name__ == expected
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("safe", [True, False])
def test_round_trip_same_logits(tiny, tmp_path, generation, safe):
    path = tiny(generation)
    model = glmtune.load_model(path)
    tok = glmtune.load_tokenizer(path)
    ids = torch.tensor([_ids(tok, generation)])
    with torch.no_grad():
        before = model(ids).logits
    out = save_official(
        model, tmp_path / "copy", generation, safe=safe, max_shard_bytes=50_000, tokenizer=tok
    )
    assert any(f.suffix == (".safetensors" if safe else ".bin") for f in out.iterdir())
    again = glmtune.load_model(out)
    with torch.no_grad():
        after = again(ids).logits
    assert torch.equal(before, after)
    tok2 = glmtune.load_tokenizer(out)
    assert _ids(tok2, generation) == ids[0].tolist()


@pytest.mark.parametrize(("generation", "prefix"), [("chatglm3", (4, False)), ("glm4", (3, True))])
def test_full_folder_with_a_prefix_loads_its_own_prefix(tmp_path, generation, prefix):
    """save_official of a prefixed model writes pre_seq_len and transformer.prefix_encoder.*; loading that
    folder without an adapter must use those weights (kept float32), not drop or re-initialise them."""
    from glmtune.adapters import prefix_encoder_of

    base = make_tiny_model(tmp_path / "base", generation)
    model = glmtune.load_model(base, prefix=prefix)
    with torch.no_grad():
        for p in prefix_encoder_of(model).parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    saved = save_official(model, tmp_path / "saved", generation)
    assert json.loads((saved / "config.json").read_text())["pre_seq_len"] == prefix[0]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    again = glmtune.load_model(saved)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
        # Without its prefix the model answers differently: the comparison above is not trivially true.
        assert not torch.equal(glmtune.load_model(base)(ids).logits, model(ids).logits)
    half = glmtune.load_model(saved, dtype=torch.bfloat16)
    for loaded in (again, half):
        assert {p.dtype for p in prefix_encoder_of(loaded).parameters()} == {torch.float32}
    assert next(half.model.parameters()).dtype == torch.bfloat16

    # A config.json with pre_seq_len whose weights lack the prefix is refused, naming the weight.
    for shard in saved.glob("*.safetensors"):
        state = load_file(shard)
        save_file({k: v for k, v in state.items() if "prefix_encoder" not in k}, str(shard))
    with pytest.raises(ModelLoadError, match=r"missing.*prefix_encoder\.embedding\.weight"):
        glmtune.load_model(saved)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_kv_cache_generation_equals_full_recompute_and_padded_batch(tiny, generation):
    path = tiny(generation)
    model, tok = glmtune.load_model(path), glmtune.load_tokenizer(path)
    template = glmtune.get_template(generation)
    prompts = [
        template.encode_prompt(tok, [{"role": "user", "content": q}])
        for q in ("你好", "请介绍一下机器学习和深度学习的关系。")
    ]
    singles = []
    for p in prompts:
        seq = torch.tensor([p])
        for _ in range(6):
            with torch.no_grad():
                seq = torch.cat([seq, model(seq).logits[0, -1].argmax().view(1, 1)], dim=1)
        cached = model.generate(
            torch.tensor([p]),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
        assert cached.tolist() == seq.tolist()
        singles.append(seq[0, len(p) :].tolist())
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    assert [row[width:].tolist() for row in batch] == singles


@pytest.mark.parametrize("generation", GENERATIONS)
def test_labels_loss_matches_manual_cross_entropy(tiny, generation):
    path = tiny(generation)
    model, tok = glmtune.load_model(path), glmtune.load_tokenizer(path)
    ids, labels = glmtune.get_template(generation).encode_example(
        tok, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！我是助手。"}]
    )
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_python_files_in_the_folder_are_never_imported(tiny, tmp_path, generation):
    src = tiny(generation)
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    marker = tmp_path / "IMPORTED"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write({name!r})\nraise SystemExit(1)\n")
    model = glmtune.load_model(folder)
    tok = glmtune.load_tokenizer(folder)
    assert model is not None and len(tok) > 0
    assert not marker.exists()


def test_unknown_architecture_needs_trust_remote_code(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "my_secret_arch", "auto_map": {"AutoModelForCausalLM": "modeling_x.MyModel"}}
        )
    )
    (folder / "modeling_x.py").write_text("raise SystemExit('must not run')\n")
    with pytest.raises(ModelLoadError, match="trust-remote-code"):
        glmtune.load_model(folder)


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_names_the_key(tiny, tmp_path):
    folder = _copy(tiny("chatglm3"), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    state = load_file(shard)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(shard))
    with pytest.raises(ModelLoadError, match="missing"):
        glmtune.load_model(folder)


def test_shape_mismatch_names_file_and_key(tiny, tmp_path):
    folder = _copy(tiny("chatglm3"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["ffn_hidden_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError, match=r"model-0000\d-of-\d+\.safetensors: weight 'model\.layers\.0\.mlp"
    ):
        glmtune.load_model(folder)


def test_unexpected_weight_is_an_error(tiny, tmp_path):
    folder = _copy(tiny("chatglm2"), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    state = load_file(shard)
    state["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    with pytest.raises(ModelLoadError, match="extra.weight"):
        glmtune.load_model(folder)


def test_corrupt_safetensors_names_the_file(tiny, tmp_path):
    folder = _copy(tiny("chatglm3"), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=shard.name):
        glmtune.load_model(folder)


def test_truncated_bin_names_the_file(tiny, tmp_path):
    folder = _copy(tiny("chatglm", safe=False), tmp_path)
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        glmtune.load_model(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_payload_is_refused_without_running(tiny, tmp_path, monkeypatch):
    folder = _copy(tiny("chatglm", safe=False), tmp_path)
    monkeypatch.chdir(tmp_path)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.word_embeddings.weight": _Payload()}, f)
    with pytest.raises(ModelLoadError, match="refused"):
        glmtune.load_model(folder)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_symlink_outside_the_folder_is_refused(tiny, tmp_path):
    folder = _copy(tiny("chatglm3"), tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        glmtune.load_model(folder)


def test_unsupported_official_option_is_named(tiny, tmp_path):
    folder = _copy(tiny("chatglm3"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["add_bias_linear"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="add_bias_linear"):
        glmtune.load_model(folder)


def test_rope_ratio_32k_variant(tiny, tmp_path):
    """ChatGLM3-6B-32k: rope_ratio scales the RoPE base; it must change the logits, and round-trip."""
    folder = _copy(tiny("chatglm3"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_ratio"] = 50
    (folder / "config.json").write_text(json.dumps(cfg))
    base, long = glmtune.load_model(tiny("chatglm3")), glmtune.load_model(folder)
    assert long.config.rope_parameters["rope_theta"] == pytest.approx(500000.0)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, long(ids).logits)
    out = save_official(long, tmp_path / "rt", "chatglm3")
    assert json.loads((out / "config.json").read_text())["rope_ratio"] == pytest.approx(50)


def test_official_fused_lora_adapter_gives_identical_outputs(tiny, tmp_path):
    """An adapter trained with peft on the remote-code ChatGLM3 (fused query_key_value) loads exactly."""
    base = tiny("chatglm3")
    cfg = json.loads((base / "config.json").read_text())
    hidden, rows = (
        cfg["hidden_size"],
        (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * cfg["kv_channels"],
    )
    r, alpha = 4, 16
    gen = torch.Generator().manual_seed(7)
    adapter_state, merged_dir = {}, _copy(base, tmp_path)
    for shard in sorted(merged_dir.glob("model-*.safetensors")):
        state = load_file(shard)
        for key in list(state):
            if key.endswith("self_attention.query_key_value.weight"):
                a = torch.randn(r, hidden, generator=gen) * 0.3
                b = torch.randn(rows, r, generator=gen) * 0.3
                prefix = "base_model.model." + key[: -len(".weight")]
                adapter_state[f"{prefix}.lora_A.weight"] = a
                adapter_state[f"{prefix}.lora_B.weight"] = b
                state[key] = state[key] + (alpha / r) * (b @ a)  # the reference: LoRA merged officially
        save_file(state, str(shard))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(adapter_state, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": 0.1,
                "target_modules": ["query_key_value"],
                "bias": "none",
                "fan_in_fan_out": False,
            }
        )
    )
    ids = torch.tensor([_ids(glmtune.load_tokenizer(base), "chatglm3")])
    with torch.no_grad():
        with_adapter = glmtune.load_model(base, adapter=adapter)(ids).logits
        reference = glmtune.load_model(merged_dir)(ids).logits
        plain = glmtune.load_model(base)(ids).logits
    assert not torch.allclose(plain, reference, atol=1e-3)
    assert (with_adapter - reference).abs().max().item() < 1e-4
