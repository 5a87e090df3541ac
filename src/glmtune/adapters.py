"""Adapters: LoRA through peft, and official P-Tuning v2 prefix checkpoints.

Every adapter question goes through here: which kind a folder holds (:func:`adapter_kind`), applying a
LoRA (:func:`apply_lora`), merging it (:func:`merge_lora`), converting the official fused LoRA, and
creating or loading a P-Tuning v2 prefix encoder (:func:`init_prefix`, :func:`load_prefix`).

LoRA adapters trained on the official remote-code ChatGLM2/3 wrap the fused ``query_key_value`` projection. On glmtune's native model q, k and v are
separate; a fused LoRA ``ΔW = B·A`` (B: [(H+2G)·d, r]) splits exactly into three LoRAs sharing A, with
B cut by rows into the q, k and v parts. Same rank, same alpha, identical outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .specs import ModelSpec, read_json
from .weights import iter_tensors, quantized_modules, weight_files

_OFFICIAL_LAYER = re.compile(
    r"^(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\.(.+?)\.(lora_[AB])\.weight$"
)
_OFFICIAL_MODULE = {
    "self_attention.query_key_value": "self_attn.qkv",
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def adapter_kind(adapter: Path) -> str:
    """ "lora" for a peft folder, "ptuning" for an official P-Tuning v2 checkpoint folder."""
    if (adapter / "adapter_config.json").exists():
        return "lora"
    if (adapter / "config.json").exists() and read_json(adapter / "config.json").get("pre_seq_len"):
        return "ptuning"
    raise ModelLoadError(
        f"{adapter}: not an adapter folder (expected adapter_config.json for LoRA, or config.json with "
        "pre_seq_len for an official P-Tuning v2 checkpoint)"
    )


# ------------------------------------------------------------------------------------ P-Tuning v2
PREFIX_KEY = "transformer.prefix_encoder."  # the official checkpoints' names of the prefix weights


def ptuning_settings(adapter: Path) -> tuple[int, bool]:
    """(pre_seq_len, prefix_projection) of an official P-Tuning v2 checkpoint folder."""
    cfg = read_json(adapter / "config.json")
    return int(cfg["pre_seq_len"]), bool(cfg.get("prefix_projection", False))


def prefix_encoder_of(model: nn.Module) -> nn.Module:
    """The P-Tuning v2 prefix encoder of a glmtune model (ChatGLM-6B keeps it under ``transformer``)."""
    inner = getattr(model, "transformer", model)
    encoder = getattr(inner, "prefix_encoder", None)
    if encoder is None:
        raise ModelLoadError("this model has no P-Tuning v2 prefix encoder")
    return encoder


def init_prefix(model: nn.Module) -> None:
    """A fresh prefix encoder: float32, embedding N(0, 1) and default Linear init, as the original."""
    target = prefix_encoder_of(model)
    target.to_empty(device="cpu")
    for module in target.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    target.float()


def load_prefix(model: nn.Module, adapter: Path) -> None:
    """Load ``transformer.prefix_encoder.*`` from an official P-Tuning v2 folder into the model."""
    target = prefix_encoder_of(model)
    state = {}
    for file in weight_files(adapter):
        for key, tensor in iter_tensors(file):
            if not key.startswith(PREFIX_KEY):
                raise ModelLoadError(f"{file}: {key!r} is not a prefix-encoder weight ({PREFIX_KEY}*)")
            state[key[len(PREFIX_KEY) :]] = tensor.float()
    expected = dict(target.named_parameters())
    for k, v in state.items():
        if k not in expected:
            raise ModelLoadError(f"{adapter}: unexpected prefix weight {PREFIX_KEY}{k}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{adapter}: {PREFIX_KEY}{k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(expected[k].shape)} (trained for another base model?)"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{adapter}: missing prefix weights: {', '.join(missing)}")
    # The prefix encoder stays float32 whatever the base dtype (as the official training does).
    if any(p.is_meta for p in target.parameters()):
        target.to_empty(device="cpu")
    target.load_state_dict(state, strict=True)
    target.float()


# ------------------------------------------------------------------------------------------- LoRA
def read_adapter_state(adapter: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).exists():
            return dict(iter_tensors(adapter / name))
    raise ModelLoadError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin")


def _is_official_fused(state: dict[str, torch.Tensor]) -> bool:
    return any(_OFFICIAL_LAYER.match(k) for k in state)


def convert_official_lora(
    state: dict[str, torch.Tensor], config
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official ChatGLM2/3 LoRA keys -> native Glm keys; returns (state, native target module names)."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, tensor in state.items():
        m = _OFFICIAL_LAYER.match(key)
        if not m or m.group(2) not in _OFFICIAL_MODULE:
            raise ModelLoadError(f"adapter weight {key!r}: not a LoRA weight of a known ChatGLM module")
        layer, module, ab = m.group(1), _OFFICIAL_MODULE[m.group(2)], m.group(3)
        base = f"base_model.model.model.layers.{layer}."
        if module != "self_attn.qkv":
            out[f"{base}{module}.{ab}.weight"] = tensor
            targets.add(module.rsplit(".", 1)[1])
            continue
        if ab == "lora_A":
            parts = (tensor, tensor, tensor)  # the three LoRAs share the down-projection A [r, hidden]
        else:
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise ModelLoadError(
                    f"adapter weight {key!r}: {tensor.shape[0]} rows, expected {q_rows + 2 * kv_rows}"
                )
            parts = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), parts):
            out[f"{base}self_attn.{proj}.{ab}.weight"] = t.contiguous().clone()
            targets.add(proj)
    return out, sorted(targets)


def apply_lora(model, adapter: Path, spec: ModelSpec, is_trainable: bool = False):
    """Wrap ``model`` with the LoRA adapter in ``adapter`` (a peft folder)."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    state = read_adapter_state(adapter)
    if not (
        _is_official_fused(state)
        and spec.official_lora_targets
        and hasattr(model.config, "head_dim")
        and hasattr(model, "model")
    ):
        try:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"{adapter}: cannot apply the LoRA adapter: {e}") from None
    cfg = read_json(adapter / "adapter_config.json")
    native, targets = convert_official_lora(state, model.config)
    lora_cfg = LoraConfig(
        r=int(cfg.get("r", 8)),
        lora_alpha=cfg.get("lora_alpha", 8),
        lora_dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=targets,
        bias=cfg.get("bias", "none"),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        task_type="CAUSAL_LM",
        inference_mode=not is_trainable,
    )
    peft_model = get_peft_model(model, lora_cfg)
    result = set_peft_model_state_dict(peft_model, native)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelLoadError(f"{adapter}: adapter weights that match no module: {', '.join(unexpected[:5])}")
    return peft_model


def merge_lora(model):
    """``merge_and_unload`` a peft LoRA model into its base weights; refuses a quantized base."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    found = quantized_modules(model)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"cannot merge LoRA into a quantized base model (quantized layers: {shown}). Load the base in "
            "float (no 4bit/8bit/int8 quantization) and merge into that copy: "
            "glmtune.load_model(BASE, adapter=ADAPTER) then glmtune.export.merge_lora(model), or "
            "export(ADAPTER, OUT, base=FLOAT_BASE)."
        )
    return model.merge_and_unload(progressbar=False, safe_merge=True)
