"""ChatGLM-6B (v1) native model: reproduces the official fixture, generation, loading/saving, training paths."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import glmtune
from glmtune.errors import ModelLoadError
from glmtune.models.chatglm_v1 import (
    ChatGLMv1Config,
    ChatGLMv1ForCausalLM,
    chatglm_v1_position_ids_and_mask,
    save_official_v1,
)
from glmtune.models.compat import output_cache

from conftest import shared_path

PAD = 3


@pytest.fixture(scope="module")
def fixture_dir():
    return shared_path("fixtures", "chatglm6b_v1_tiny")


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return json.loads((fixture_dir / "expected" / "cases.json").read_text())


@pytest.fixture(scope="module")
def tensors(fixture_dir):
    return load_file(str(fixture_dir / "expected" / "logits.safetensors"))


@pytest.fixture(scope="module")
def model(fixture_dir):
    return glmtune.load_model(fixture_dir, dtype=torch.float32)


def assert_logits_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    tolerance = max(1e-4, 5e-5 * reference.abs().max().item())
    diff = (actual - reference).abs().max().item()
    assert diff <= tolerance, f"max |diff| {diff} > {tolerance}"


def tiny_config(**overrides) -> ChatGLMv1Config:
    values = dict(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        inner_hidden_size=48,
        max_sequence_length=64,
        bos_token_id=8,
        eos_token_id=9,
        mask_token_id=4,
        gmask_token_id=5,
        pad_token_id=PAD,
    )
    values.update(overrides)
    return ChatGLMv1Config(**values)


def random_model(**overrides) -> ChatGLMv1ForCausalLM:
    model = ChatGLMv1ForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        # Larger than the 0.02 init so that attention patterns and positions actually matter.
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.5)
    return model.eval()


def prompt_ids(n_prompt: int, n_target: int, vocab: int = 96) -> torch.Tensor:
    prompt = torch.randint(12, vocab, (n_prompt,))
    target = torch.randint(12, vocab, (n_target,))
    return torch.cat([prompt, torch.tensor([5, 8]), target])[None]


def greedy_full_recompute(model, input_ids: torch.Tensor, steps: int = 8) -> list[int]:
    ids = input_ids
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, input_ids.shape[1] :].tolist()


def greedy_generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    # min_new_tokens only masks <eop>, which is never the argmax in these cases: no early stop, same ids.
    out = model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kwargs)
    return out[:, input_ids.shape[1] :]


# ---------------------------------------------------------------- official fixture


def test_checkpoint_keys_match_fixture_listing(fixture_dir, model):
    listed = json.loads((fixture_dir / "expected" / "state_dict_keys.json").read_text())["keys"]
    ours = set(model.state_dict())
    assert ours == {k for k in listed if not k.endswith("rotary_emb.inv_freq")}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_default_positions_and_mask_match_official(model, cases, tensors):
    config = model.config
    for case in cases["logits"]:
        ids = torch.tensor([case["input_ids"]])
        position_ids, allowed = chatglm_v1_position_ids_and_mask(
            ids,
            bos_token_id=config.bos_token_id,
            mask_token_id=config.mask_token_id,
            gmask_token_id=config.gmask_token_id,
        )
        assert position_ids[0].tolist() == case["position_ids"]
        assert torch.equal(position_ids[0], tensors[f"{case['tensor']}_position_ids"])
        assert torch.equal(~allowed[0], tensors[f"{case['tensor']}_attention_mask"])


def test_pair_logits_match_official(model, cases, tensors):
    for case in cases["logits"]:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0]
            explicit = model(
                ids,
                position_ids=tensors[f"{case['tensor']}_position_ids"][None],
                attention_mask=tensors[f"{case['tensor']}_attention_mask"][None, None],
            ).logits[0]
        assert_logits_close(logits, tensors[case["tensor"]])
        assert_logits_close(explicit, tensors[case["tensor"]])
        assert logits.argmax(-1).tolist() == case["argmax"]


def test_eager_attention_matches_sdpa(model, cases):
    ids = torch.tensor([cases["logits"][0]["input_ids"]])
    with torch.no_grad():
        sdpa = model(ids).logits
        out = model(ids, output_attentions=True)
    assert torch.allclose(out.logits, sdpa, atol=1e-4)
    assert len(out.attentions) == model.config.num_layers
    assert out.attentions[0].shape == (1, model.config.num_attention_heads, ids.shape[1], ids.shape[1])


def test_greedy_full_recompute_and_generate_match_official(model, cases):
    for case in cases["greedy"]:
        ids = torch.tensor([case["input_ids"]])
        assert greedy_full_recompute(model, ids) == case["new_ids"]
        assert greedy_generate(model, ids)[0].tolist() == case["new_ids"]
        assert greedy_generate(model, ids, attention_mask=torch.ones_like(ids))[0].tolist() == case["new_ids"]
        assert greedy_generate(model, ids, use_cache=False)[0].tolist() == case["new_ids"]


def test_left_padded_batch_matches_official(model, tensors):
    ids = tensors["batch_input_ids"]
    real = ids != PAD
    config = model.config
    position_ids, allowed = chatglm_v1_position_ids_and_mask(
        ids,
        bos_token_id=config.bos_token_id,
        mask_token_id=config.mask_token_id,
        gmask_token_id=config.gmask_token_id,
        attention_mask=real.long(),
    )
    assert torch.equal(position_ids, tensors["batch_position_ids"])
    rows = real[:, :, None].expand_as(allowed)  # pad rows of the official mask are fully masked: skip them
    assert torch.equal((~allowed)[rows], tensors["batch_attention_mask"][:, 0][rows])
    with torch.no_grad():
        standard = model(ids, attention_mask=real.long()).logits
        official = model(
            ids, attention_mask=tensors["batch_attention_mask"], position_ids=tensors["batch_position_ids"]
        ).logits
        # Official 4D mask alone: positions are recomputed on the tokens the mask marks as real.
        mask_only = model(ids, attention_mask=tensors["batch_attention_mask"]).logits
    for logits in (standard, official, mask_only):
        assert torch.isfinite(logits).all()
        assert_logits_close(logits[real], tensors["batch_logits"][real])


def test_batched_generate_on_left_padding_matches_single(model, cases, tensors):
    ids = tensors["batch_input_ids"]
    real = ids != PAD
    batched = greedy_generate(model, ids, attention_mask=real.long())
    # Rows 0 and 1 are the fixture's greedy prompts.
    assert batched[0].tolist() == cases["greedy"][0]["new_ids"]
    assert batched[1].tolist() == cases["greedy"][1]["new_ids"]
    for row in range(ids.shape[0]):
        single = greedy_generate(model, ids[row][real[row]][None])
        assert batched[row].tolist() == single[0].tolist()


def test_manual_incremental_decoding_with_cache(model, cases):
    case = cases["greedy"][1]
    ids = torch.tensor([case["input_ids"] + case["new_ids"]])
    config = model.config
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=config)
        head = model(ids[:, :-3], cache=cache, use_cache=True)
        position_ids, allowed = chatglm_v1_position_ids_and_mask(
            ids,
            bos_token_id=config.bos_token_id,
            mask_token_id=config.mask_token_id,
            gmask_token_id=config.gmask_token_id,
            query_length=3,
        )
        tail = model(ids[:, -3:], position_ids=position_ids, cache=output_cache(head), use_cache=True).logits
    # The last three tokens come after <sop>, so a causal continuation of the cache is exact.
    assert_logits_close(tail, full[:, -3:])


def test_inputs_embeds_equal_input_ids(model, cases):
    ids = torch.tensor([cases["logits"][1]["input_ids"]])
    with torch.no_grad():
        by_ids = model(ids).logits
        position_ids, _ = chatglm_v1_position_ids_and_mask(
            ids,
            bos_token_id=model.config.bos_token_id,
            mask_token_id=model.config.mask_token_id,
            gmask_token_id=model.config.gmask_token_id,
        )
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), position_ids=position_ids).logits
    assert torch.allclose(by_embeds, by_ids, atol=1e-5)


# ---------------------------------------------------------------- config, loading, saving


def test_official_config_round_trip(fixture_dir):
    official = json.loads((fixture_dir / "config.json").read_text())
    config = ChatGLMv1Config.from_official(official)
    assert config.model_type == "chatglm6b"
    assert (config.num_layers, config.num_hidden_layers, config.head_dim) == (2, 2, 16)
    assert config.tie_word_embeddings is True
    back = config.to_official()
    assert back["model_type"] == "chatglm" and back["architectures"] == ["ChatGLMModel"]
    for key in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "inner_hidden_size",
        "bos_token_id",
        "eos_token_id",
        "mask_token_id",
        "gmask_token_id",
        "pad_token_id",
        "position_encoding_2d",
        "torch_dtype",
    ):
        assert back[key] == official[key], key
    assert isinstance(AutoConfig.for_model("chatglm6b"), ChatGLMv1Config)


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("safe", [False, True])
def test_random_model_official_round_trip(tmp_path, safe):
    model = random_model()
    save_official_v1(model, tmp_path, safe=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    stored = stored_tensors(tmp_path)
    assert "lm_head.weight" in stored and "transformer.layers.1.attention.rotary_emb.inv_freq" in stored
    loaded = glmtune.load_model(tmp_path, dtype=torch.float32)
    assert isinstance(loaded, ChatGLMv1ForCausalLM)
    ids = prompt_ids(7, 5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_pretrained_reloads_through_auto(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, ChatGLMv1ForCausalLM)
    assert reloaded.lm_head.weight is reloaded.transformer.word_embeddings.weight
    ids = prompt_ids(6, 4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def official_folder(folder, edit=None, config_edit=None):
    """A random model saved in the official format, its weights (and config.json) edited."""
    model = random_model()
    save_official_v1(model, folder, safe=True)
    if edit is not None:
        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"))
    if config_edit is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config_edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return model


def _drop(key):
    return lambda state: state.pop(key)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _drop("transformer.layers.1.mlp.dense_4h_to_h.bias"),
            r"missing.*layers\.1\.mlp\.dense_4h_to_h\.bias",
        ),
        (
            lambda state: state.update({"transformer.extra": torch.zeros(1)}),
            r"model\.safetensors: unexpected weight 'transformer\.extra'",
        ),
        (
            lambda state: state.update({"transformer.final_layernorm.bias": torch.zeros(5)}),
            r"model\.safetensors: weight 'transformer\.final_layernorm\.bias' has shape \(5,\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_loader_names_the_offending_key(tmp_path, edit, message):
    official_folder(tmp_path, edit)
    with pytest.raises(ModelLoadError, match=message):
        glmtune.load_model(tmp_path)


def test_tied_lm_head_equal_absent_or_ignored_keys_load(tmp_path):
    # Stored equal to the embeddings (as official releases and save_official_v1 do): skipped, tied.
    model = official_folder(tmp_path / "equal")
    assert "lm_head.weight" in load_file(str(tmp_path / "equal" / "model.safetensors"))
    # Absent, with a stray rotary inv_freq (the original recomputes it): loads too.
    ignorable = official_folder(tmp_path / "absent", _drop("lm_head.weight"))
    ids = prompt_ids(6, 4)
    for folder, reference in ((tmp_path / "equal", model), (tmp_path / "absent", ignorable)):
        loaded = glmtune.load_model(folder)
        assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_tied_lm_head_that_differs_is_refused_naming_file_and_key(tmp_path):
    def untie(state):
        state["lm_head.weight"] = state["lm_head.weight"] + 1

    official_folder(tmp_path, untie)
    with pytest.raises(
        ModelLoadError,
        match=r"model\.safetensors: weight 'lm_head\.weight' differs from 'transformer\.word_embeddings",
    ):
        glmtune.load_model(tmp_path)
    # A checkpoint that really has its own lm_head loads untied when config.json says so.
    config_edit = lambda cfg: cfg.update(tie_word_embeddings=False)  # noqa: E731
    official_folder(tmp_path, untie, config_edit)
    loaded = glmtune.load_model(tmp_path)
    assert loaded.lm_head.weight is not loaded.transformer.word_embeddings.weight
    assert torch.equal(loaded.lm_head.weight, loaded.transformer.word_embeddings.weight + 1)


@pytest.mark.parametrize("head_first", [True, False])
def test_tied_lm_head_is_checked_across_shards_in_either_order(tmp_path, head_first):
    save_official_v1(random_model(), tmp_path, safe=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    equal = state.pop("lm_head.weight")
    head = {"lm_head.weight": equal.clone()}
    head["lm_head.weight"][0, 0] += 1
    head_file, rest_file = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(state, str(tmp_path / rest_file))
    # The index lists the shards in the order they are read.
    weight_map = {k: rest_file for k in state}
    weight_map = (
        {"lm_head.weight": head_file, **weight_map}
        if head_first
        else {**weight_map, "lm_head.weight": head_file}
    )
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(head, str(tmp_path / head_file))
    with pytest.raises(
        ModelLoadError,
        match=r"model-00001-of-00002\.safetensors: weight 'lm_head\.weight' differs from "
        r"'transformer\.word_embeddings\.weight' \(in model-00002-of-00002\.safetensors\)",
    ):
        glmtune.load_model(tmp_path)
    save_file({"lm_head.weight": equal}, str(tmp_path / head_file))
    loaded = glmtune.load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight


# ---------------------------------------------------------------- training paths


def test_loss_equals_manual_cross_entropy():
    model = random_model()
    ids = torch.cat([prompt_ids(6, 5), prompt_ids(6, 5)])
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, -2] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size).float()
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    model = random_model().train()
    ids = torch.cat([prompt_ids(5, 4), prompt_ids(5, 4)])

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    hook = model.transformer.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    model.activation_checkpointing_enable()
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2, "the layer should be recomputed during backward"
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_prefix_trains_only_the_prefix(projection):
    model = ChatGLMv1ForCausalLM(tiny_config(pre_seq_len=3, prefix_projection=projection)).train()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("transformer.prefix_encoder."))
    prefix_keys = {k for k in model.state_dict() if k.startswith("transformer.prefix_encoder.")}
    expected = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        expected |= {f"transformer.prefix_encoder.trans.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert prefix_keys == expected
    kv = model.transformer.get_prefix_key_values(2, torch.float32)
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, 3, 16)

    ids = torch.cat([prompt_ids(5, 4), prompt_ids(5, 4)])

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert set(plain) == expected and all(g.abs().sum() > 0 for g in plain.values())
    # Reentrant checkpointing only propagates gradients to tensors passed positionally (the prefix here).
    model.activation_checkpointing_enable({"use_reentrant": True})
    checkpointed = grads()
    assert set(checkpointed) == expected
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5, rtol=1e-4), name


def test_ptuning_prefix_is_extra_keys_values_without_moving_positions():
    tuned = random_model(pre_seq_len=4).float()
    base = ChatGLMv1ForCausalLM(tiny_config()).eval()
    base.load_state_dict({k: v for k, v in tuned.state_dict().items() if "prefix_encoder" not in k})
    ids = prompt_ids(5, 3)
    length = ids.shape[1]
    config = base.config
    with torch.no_grad():
        expected = tuned(ids).logits
        # The same prefix fed as 4 cached key/values in front of the real tokens, with the real tokens'
        # default positions and every token attending to all of the prefix.
        cache = DynamicCache(config=config)
        for i, (key, value) in enumerate(tuned.transformer.get_prefix_key_values(1, torch.float32)):
            cache.update(key, value, i)
        position_ids, allowed = chatglm_v1_position_ids_and_mask(
            ids, bos_token_id=8, mask_token_id=4, gmask_token_id=5
        )
        mask = torch.cat([torch.ones(1, length, 4, dtype=torch.bool), allowed], dim=-1)
        actual = base(ids, position_ids=position_ids, attention_mask=~mask[:, None], cache=cache).logits
        # Generation with the prefix: cached steps equal full recompute.
        generated = greedy_generate(tuned, ids[:, :-3])[0].tolist()
    assert torch.allclose(actual, expected, atol=1e-4)
    assert generated == greedy_full_recompute(tuned, ids[:, :-3])


def test_ptuning_official_round_trip(tmp_path):
    model = random_model(pre_seq_len=2, prefix_projection=True)
    save_official_v1(model, tmp_path)
    official = json.loads((tmp_path / "config.json").read_text())
    assert official["pre_seq_len"] == 2 and official["prefix_projection"] is True
    loaded = glmtune.load_model(tmp_path, dtype=torch.float32)
    ids = prompt_ids(4, 2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
