"""Fine-tuning methods: one registry (lora, ptuning_v2, full; QLoRA = lora on a quantized base).

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


METHODS: dict[str, Method] = {
    "lora": LoRA("lora", "LoRA adapters through peft (QLoRA with model.quantization 4bit/8bit)"),
    "ptuning_v2": PTuningV2("ptuning_v2", "P-Tuning v2 prefix encoder, official ChatGLM checkpoint layout"),
    "full": Full("full", "full fine-tuning, optionally only the last N layers"),
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
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def check_quantization(quantization: str) -> None:
    """Fail before any weight is read when QLoRA can't run here."""
    if quantization in (None, "none"):
        return
    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"model.quantization={quantization!r}: expected none, 8bit or 4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model.quantization={quantization} needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU"
        ) from None
    if not torch.cuda.is_available():
        raise ConfigError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes k-bit layers)")


def quantize_linears(model: nn.Module, bits: int, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear except the output layer by a bitsandbytes k-bit layer, on the GPU.

    The official-format loader builds plain modules; this turns them into the layers QLoRA trains over
    (nf4 with double quantization for 4 bits, LLM.int8 for 8 bits). Quantization happens when the
    layer moves to CUDA.
    """
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child is output:
                continue
            if bits == 4:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.to(compute_dtype),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                )
            else:
                q = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
                )
                q.weight = bnb.nn.Int8Params(
                    child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(module, child_name, q)
    model.to("cuda")
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
