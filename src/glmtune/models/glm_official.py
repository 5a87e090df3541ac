"""ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B official on-disk format <-> transformers' native ``GlmForCausalLM``.

The official checkpoints (``model_type: chatglm``) ship their own modeling code. The architecture is
exactly transformers' ``Glm``: RMSNorm, SwiGLU MLP, grouped-query attention with a bias on q/k/v only,
RoPE on the first half of each head's dims with interleaved pairs, base ``10000 * rope_ratio``. So
instead of running the folder's code we rename the weights:

    transformer.embedding.word_embeddings.weight          -> model.embed_tokens.weight
    transformer.encoder.layers.N.self_attention.query_key_value.{weight,bias}
                                                          -> model.layers.N.self_attn.{q,k,v}_proj.*
        (rows [0, H*d) are q, then G*d rows of k, then G*d rows of v; H heads, G kv groups, d kv_channels)
    transformer.encoder.layers.N.self_attention.dense      -> model.layers.N.self_attn.o_proj
    transformer.encoder.layers.N.mlp.dense_h_to_4h         -> model.layers.N.mlp.gate_up_proj
        (first half of the rows is the SiLU gate in both)
    transformer.encoder.layers.N.mlp.dense_4h_to_h         -> model.layers.N.mlp.down_proj
    transformer.encoder.layers.N.{input,post_attention}_layernorm -> same names under model.layers.N
    transformer.encoder.final_layernorm.weight            -> model.norm.weight
    transformer.output_layer.weight                        -> lm_head.weight
    transformer.rotary_pos_emb.inv_freq                    -> dropped (recomputed from the config)
    transformer.prefix_encoder.*                           -> prefix_encoder.* (P-Tuning v2)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from transformers import GlmConfig

from ..errors import ModelLoadError

# Official config values the native Glm architecture reproduces; anything else is refused by name
# rather than silently computing something different.
_REQUIRED = {
    "rmsnorm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
}


def glm_config_from_official(cfg: dict, source: str = "config.json") -> GlmConfig:
    """Build a native ``GlmConfig`` from an official ChatGLM2/3/GLM-4 ``config.json`` dict."""
    for key, want in _REQUIRED.items():
        if key in cfg and bool(cfg[key]) != want:
            raise ModelLoadError(
                f"{source}: {key}={cfg[key]!r} is not supported (only {want!r}, as in every released "
                "ChatGLM2/3/GLM-4 checkpoint)"
            )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("kv_channels") or hidden // heads)
        kv_heads = int(cfg["multi_query_group_num"]) if cfg.get("multi_query_attention") else heads
        eos = cfg.get("eos_token_id", 2)
        return GlmConfig(
            vocab_size=int(cfg.get("padded_vocab_size") or cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["ffn_hidden_size"]),
            num_hidden_layers=int(cfg["num_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act="silu",
            attention_dropout=float(cfg.get("attention_dropout", 0.0)),
            max_position_embeddings=int(cfg.get("seq_length", 8192)),
            rms_norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1.0)),
                "partial_rotary_factor": 0.5,
            },
            pad_token_id=cfg.get("pad_token_id", 0),
            eos_token_id=eos,
            bos_token_id=cfg.get("bos_token_id"),
            attention_bias=bool(cfg.get("add_qkv_bias", True)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{source}: missing field {e.args[0]!r} needed to build the model") from None


def official_config_from_glm(cfg: GlmConfig, generation: str) -> dict:
    """The official ``config.json`` fields for a native config (export with ``--format official``)."""
    theta = float(cfg.rope_parameters["rope_theta"])
    out = {
        "_name_or_path": generation,
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": bool(cfg.attention_bias),
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": float(cfg.attention_dropout),
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": cfg.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": cfg.hidden_size,
        "kv_channels": cfg.head_dim,
        "layernorm_epsilon": cfg.rms_norm_eps,
        "multi_query_attention": cfg.num_key_value_heads != cfg.num_attention_heads,
        "multi_query_group_num": cfg.num_key_value_heads,
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": cfg.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": cfg.max_position_embeddings,
        "use_cache": True,
        "tie_word_embeddings": False,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    if theta != 10000.0:
        out["rope_ratio"] = theta / 10000.0
    return out


_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_RENAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAME = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
# Present in official checkpoints, recomputed from the config on our side.
IGNORED_OFFICIAL_KEYS = re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$")


def official_to_native(name: str, tensor: torch.Tensor, cfg: GlmConfig) -> list[tuple[str, torch.Tensor]]:
    """Map one official tensor to zero or more native ``GlmForCausalLM`` tensors (see module doc)."""
    if IGNORED_OFFICIAL_KEYS.search(name):
        return []
    if name in _TOP_RENAME:
        return [(_TOP_RENAME[name], tensor)]
    if name.startswith("transformer.prefix_encoder."):
        return [(name[len("transformer.") :], tensor)]
    m = _LAYER.match(name)
    if m:
        idx, rest = m.groups()
        prefix = f"model.layers.{idx}."
        if rest in _LAYER_RENAME:
            return [(prefix + _LAYER_RENAME[rest], tensor)]
        if rest.startswith("self_attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]  # weight [(H+2G)*d, hidden] or bias [(H+2G)*d]
            q_rows = cfg.num_attention_heads * cfg.head_dim
            kv_rows = cfg.num_key_value_heads * cfg.head_dim
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise ModelLoadError(
                    f"{name}: shape {tuple(tensor.shape)} does not match the config "
                    f"({cfg.num_attention_heads} heads + 2 x {cfg.num_key_value_heads} kv groups of {cfg.head_dim})"
                )
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            return [(f"{prefix}self_attn.{p}_proj.{kind}", t.contiguous()) for p, t in zip("qkv", (q, k, v))]
    raise ModelLoadError(f"unexpected weight {name!r}: not part of the ChatGLM2/3/GLM-4 architecture")


def native_to_official(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`official_to_native` over a whole native state dict (q/k/v fused again)."""
    inv_top = {v: k for k, v in _TOP_RENAME.items()}
    inv_layer = {v: k for k, v in _LAYER_RENAME.items()}
    for name, tensor in state.items():
        if name in inv_top:
            yield inv_top[name], tensor
        elif name.startswith("prefix_encoder."):
            yield "transformer." + name, tensor
        elif name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            prefix = f"transformer.encoder.layers.{idx}."
            if rest in inv_layer:
                yield prefix + inv_layer[rest], tensor
            elif rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                base = f"model.layers.{idx}.self_attn."
                fused = torch.cat([state[f"{base}{p}_proj.{kind}"] for p in "qkv"], dim=0)
                yield f"{prefix}self_attention.query_key_value.{kind}", fused
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue  # fused into query_key_value together with q_proj
            else:
                raise ModelLoadError(f"{name}: no official ChatGLM name for this weight")
        else:
            raise ModelLoadError(f"{name}: no official ChatGLM name for this weight")
