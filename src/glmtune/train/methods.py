"""Fine-tuning methods: one registry (lora, ptuning_v2, full; QLoRA = lora on a quantized base).

A quantized base (``model.quantization`` 4bit/8bit, CUDA or CPU) is loaded quantized by ``load_model`` (the
Linear layers of ``glmtune.quantize.replace_linears``, the ones inference uses too); :func:`prepare_quantized`
readies it for training; lora and ptuning_v2 then train over it (the output layer and the prefix encoder
stay float).

Each method knows how to make a loaded model trainable and how to save what it trained:
- lora: peft LoRA; saved in peft's adapter format (``PeftModel.from_pretrained`` loads it).
- ptuning_v2: only the float32 prefix encoder trains; saved in the official ChatGLM layout
  (``pytorch_model.bin`` holding ``transformer.prefix_encoder.*`` + the base config with ``pre_seq_len``),
  so official inference scripts load it and glmtune loads official ones.
- full: every weight (or only the last N layers); saved as a standard transformers folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import PREFIX_KEY, prefix_encoder_of
from ..errors import ConfigError
from ..method_names import METHOD_DESCRIPTIONS
from ..quantize import check_mode
from ..specs import ModelSpec


@dataclass(frozen=True)
class Method:
    name: str
    description: str

    def load_kwargs(self, method_cfg) -> dict:
        """Extra ``load_model`` arguments the method needs (e.g. a fresh prefix encoder)."""
        return {}

    def prepare(self, model, spec: ModelSpec, method_cfg):
        raise NotImplementedError

    def save(self, model, out_dir: Path, base_config: dict | None, state_dict: dict | None = None) -> None:
        """Write what the method trained; ``state_dict``: a gathered full state dict (ZeRO-3 / FSDP)."""
        raise NotImplementedError


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the longest ModuleList whose length is the layer count)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError("cannot find the model's layer stack to freeze layers")


class LoRA(Method):
    def prepare(self, model, spec, method_cfg):
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # continuing from an earlier adapter: its weights train on
            return model
        targets = list(method_cfg.lora_target_modules or spec.lora_targets)
        config = LoraConfig(
            r=method_cfg.lora_r,
            lora_alpha=method_cfg.lora_alpha,
            lora_dropout=method_cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise ConfigError(f"method.lora_target_modules={targets}: {e}") from None

    def save(self, model, out_dir, base_config, state_dict=None):
        model.save_pretrained(str(out_dir), state_dict=state_dict)


class PTuningV2(Method):
    def load_kwargs(self, method_cfg):
        return {"prefix": (int(method_cfg.pre_seq_len), bool(method_cfg.prefix_projection))}

    def prepare(self, model, spec, method_cfg):
        if not spec.supports_ptuning:
            raise ConfigError(f"method.name=ptuning_v2 is not supported for {spec.name} models")
        encoder = prefix_encoder_of(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in encoder.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, out_dir, base_config, state_dict=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            # Native Glm names the encoder "prefix_encoder.*", ChatGLM-6B "transformer.prefix_encoder.*".
            source = {
                k.split("prefix_encoder.", 1)[1]: v for k, v in state_dict.items() if "prefix_encoder." in k
            }
        else:
            source = prefix_encoder_of(model).state_dict()
        state = {f"{PREFIX_KEY}{k}": v.detach().float().cpu().contiguous() for k, v in source.items()}
        torch.save(state, out_dir / "pytorch_model.bin")
        cfg = dict(base_config or {})
        cfg.update(
            pre_seq_len=int(model.config.pre_seq_len),
            prefix_projection=bool(getattr(model.config, "prefix_projection", False)),
        )
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


class Full(Method):
    def prepare(self, model, spec, method_cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        keep = method_cfg.freeze_layers_except_last
        if keep:
            layers = _decoder_layers(model)
            if not 0 < keep <= len(layers):
                raise ConfigError(
                    f"method.freeze_layers_except_last={keep}: the model has {len(layers)} layers"
                )
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in layers[len(layers) - keep :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        return model

    def save(self, model, out_dir, base_config, state_dict=None):
        model.save_pretrained(str(out_dir), state_dict=state_dict)


# The class of each method named in glmtune.method_names (the one list of names and descriptions, which
# the config's method.name takes too); a name without a class here fails at import.
_CLASSES: dict[str, type[Method]] = {"lora": LoRA, "ptuning_v2": PTuningV2, "full": Full}

METHODS: dict[str, Method] = {
    name: _CLASSES[name](name, description) for name, description in METHOD_DESCRIPTIONS.items()
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name={name!r}: unknown (known: {', '.join(METHODS)})") from None


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter: its whole size
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def check_quantization(quantization: str) -> None:
    """Fail before any weight is read when QLoRA can't run here (bitsandbytes missing); CUDA or the CPU."""
    if quantization in (None, "none"):
        return
    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"model.quantization={quantization!r}: expected none, 8bit or 4bit")
    try:
        check_mode(quantization)
    except ConfigError as e:
        raise ConfigError(f"model.quantization={quantization}: {e}") from None


def prepare_quantized(model: nn.Module) -> nn.Module:
    """Make a model loaded quantized (``load_model(..., quantization=4bit|8bit)``, the layers of
    ``glmtune.quantize.replace_linears``) ready to train adapters over: peft's k-bit set-up (every base
    weight frozen, the float ones in float32); parameters that were trainable (a LoRA adapter being
    continued) stay trainable.
    """
    from peft import prepare_model_for_kbit_training

    trainable = [p for p in model.parameters() if p.requires_grad]
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in trainable:
        p.requires_grad_(True)
    for module in model.modules():
        # bitsandbytes' 4-bit layers repack their weight for a fused CPU kernel at their first forward in
        # eval mode without gradients (an evaluation between training steps), and that kernel has no
        # backward: the next training step would fail. Training keeps the layout that has one.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model
