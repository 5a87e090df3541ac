"""Native implementation of the original ChatGLM-6B (v1) as a transformers `PreTrainedModel`.

Written from the architecture description (not from the official `modeling_chatglm.py`), with the official
parameter names so an official checkpoint loads by name:

- GLM blocks with "post-LN style" residuals: the residual branch is the *normalised* input scaled by
  `alpha = sqrt(2 * 28)` (28 whatever `num_layers` says: the original block never receives the layer count).
- Per-head interleaved fused QKV, 2D rotary embeddings (first half of each head rotated with the positions,
  second half with the block positions), inv_freq rounded through float16 as the original stores it.
- Prefix-LM attention: bidirectional over the prompt (everything before `<sop>`), causal afterwards.
- Optional P-Tuning v2 prefix (`pre_seq_len`), applied as extra attended keys/values in every layer.

Tensor layout is batch-first throughout: hidden states [B, T, H], heads [B, heads, T, head_dim].
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .compat import cache_kwargs, one_cache, output_cache

__all__ = [
    "ChatGLMv1Config",
    "ChatGLMv1PreTrainedModel",
    "ChatGLMv1Model",
    "ChatGLMv1ForCausalLM",
    "chatglm_v1_position_ids_and_mask",
    "save_official_v1",
]

# The original GLMBlock is constructed without `num_layers`, so its residual scale always uses the default 28.
_RESIDUAL_SCALE_LAYERS = 28
_RESIDUAL_ALPHA = math.sqrt(2 * _RESIDUAL_SCALE_LAYERS)

# Official config fields that describe the checkpoint's packaging rather than the model.
_OFFICIAL_PACKAGING_KEYS = (
    "architectures",
    "auto_map",
    "model_type",
    "_name_or_path",
    "transformers_version",
)
_OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}
_OFFICIAL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "inner_hidden_size",
    "layernorm_epsilon",
    "max_sequence_length",
    "position_encoding_2d",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "gmask_token_id",
    "pad_token_id",
    "use_cache",
)


class ChatGLMv1Config(PreTrainedConfig):
    """Configuration of ChatGLM-6B (v1), with the official field names.

    Defaults are those of the released THUDM/chatglm-6b checkpoint. `model_type` is the internal name
    "chatglm6b"; the on-disk official config says "chatglm" and is converted with `from_official`/`to_official`.
    """

    model_type = "chatglm6b"
    # The ModelSpec entry this class belongs to (glmtune's loader also records it on every config).
    glmtune_generation = "chatglm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "layer_norm_eps": "layernorm_epsilon",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    use_cache: bool = True
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        # 2D rotary splits each head in two halves, and rotate_half splits each half again.
        if (self.hidden_size // self.num_attention_heads) % 4 != 0:
            raise ValueError(
                "head_dim = hidden_size // num_attention_heads must be a multiple of 4 for 2D rotary"
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_official(cls, official: Mapping) -> ChatGLMv1Config:
        """Build from the official `config.json` dict (model_type "chatglm", official field names)."""
        values = dict(official)
        model_type = values.get("model_type")
        if model_type not in (None, "chatglm", cls.model_type):
            raise ValueError(f"not a ChatGLM-6B (v1) config: model_type={model_type!r}")
        if values.get("quantization_bit"):
            raise NotImplementedError(
                f"quantized ChatGLM-6B checkpoints (quantization_bit={values['quantization_bit']}) are not supported"
            )
        values.pop("quantization_bit", None)
        for key in _OFFICIAL_PACKAGING_KEYS:
            values.pop(key, None)
        if "torch_dtype" in values:
            values.setdefault("dtype", values.pop("torch_dtype"))
        return cls(**values)

    def to_official(self) -> dict:
        """The official `config.json` dict (model_type "chatglm", architectures ["ChatGLMModel"])."""
        import transformers

        out: dict = {"architectures": ["ChatGLMModel"], "auto_map": dict(_OFFICIAL_AUTO_MAP)}
        for key in _OFFICIAL_FIELDS:
            out[key] = getattr(self, key)
        out["model_type"] = "chatglm"
        if self.pre_seq_len is not None:
            out["pre_seq_len"] = self.pre_seq_len
            out["prefix_projection"] = self.prefix_projection
        # The official config has no such field and relies on transformers' default (tied).
        if not self.tie_word_embeddings:
            out["tie_word_embeddings"] = False
        dtype = self.dtype
        if dtype is not None:
            out["torch_dtype"] = str(dtype).removeprefix("torch.")
        out["transformers_version"] = transformers.__version__
        return out


def chatglm_v1_position_ids_and_mask(
    input_ids: torch.Tensor | None,
    *,
    bos_token_id: int | None,
    mask_token_id: int | None,
    gmask_token_id: int | None,
    attention_mask: torch.Tensor | None = None,
    query_length: int | None = None,
    shape: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM-6B default 2D position ids and prefix-LM mask, computed per sequence on its real tokens.

    Args:
        input_ids: [B, L] (None: no special tokens are visible, e.g. inputs_embeds; pass `shape`).
        attention_mask: optional HF 2D mask [B, L], 1 = real token, 0 = padding.
        query_length: return only the rows of the last `query_length` tokens (incremental decoding).

    Returns:
        position_ids [B, 2, q] (row 0: positions, row 1: block positions; 0 on pads) and the boolean
        "may attend" mask [B, q, L] (True = attend).

    Per sequence, counted on its real tokens: context_length = index of the first bos (<sop>), or the
    number of real tokens; mask_position = first [gMASK] of the context, else first [MASK], else
    context_length - 1 (where [gMASK] sits in the standard layout). Positions are 0..context_length-1
    then mask_position; block positions are 0 over the context then 1, 2, 3, ... . A token attends to
    the whole context and causally to everything before it; pads are never attended (they only see
    themselves, which keeps their meaningless rows finite).
    """
    if input_ids is not None:
        batch, length = input_ids.shape
        device = input_ids.device
    elif shape is not None:
        batch, length = shape
    else:
        raise ValueError("pass input_ids or shape")
    q = length if query_length is None else query_length
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device).bool()
        if valid.shape != (batch, length):
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} != {(batch, length)}")

    def is_token(token_id: int | None) -> torch.Tensor:
        if input_ids is None or token_id is None:
            return torch.zeros(batch, length, dtype=torch.bool, device=device)
        return (input_ids == token_id) & valid

    absolute = torch.arange(length, device=device)
    # rel[b, j]: index of token j among the real tokens of row b (-1 before the first real token).
    rel = valid.long().cumsum(-1) - 1
    n_valid = valid.sum(-1)

    def first_index(flags: torch.Tensor) -> torch.Tensor:
        # Absolute index of the first True of each row, `length` when none.
        return torch.where(flags, absolute, length).min(-1).values

    def relative(abs_idx: torch.Tensor) -> torch.Tensor:
        return rel.gather(1, abs_idx.clamp(max=length - 1)[:, None])[:, 0]

    first_bos = first_index(is_token(bos_token_id))
    context = torch.where(first_bos < length, relative(first_bos), n_valid)  # [B]
    in_context = valid & (rel < context[:, None])  # [B, L]
    first_gmask = first_index(is_token(gmask_token_id) & in_context)
    first_mask = first_index(is_token(mask_token_id) & in_context)
    mask_abs = torch.where(first_gmask < length, first_gmask, first_mask)
    mask_position = torch.where(mask_abs < length, relative(mask_abs), (context - 1).clamp(min=0))

    after_context = valid & (rel >= context[:, None])
    positions = torch.where(after_context, mask_position[:, None], rel.clamp(min=0))
    positions = positions.masked_fill(~valid, 0)
    block_positions = torch.where(after_context, rel - context[:, None] + 1, 0)
    position_ids = torch.stack([positions, block_positions], dim=1)[..., length - q :]

    query = absolute[length - q :]  # absolute indices of the returned rows, [q]
    causal = absolute[None, :] <= query[:, None]  # [q, L]
    allowed = valid[:, None, :] & (causal[None] | in_context[:, None, :])
    allowed = allowed | (absolute[None, :] == query[:, None])[None]
    return position_ids, allowed


def _rotary_cos_sin(position_ids: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for 2D rotary, float32, [B, 1, T, head_dim] from position_ids [B, 2, T].

    Each head is split in two halves of d = head_dim // 2 dims: the first uses position_ids[:, 0], the second
    position_ids[:, 1]; within a half the tables are GPT-NeoX style cat(freqs, freqs).
    """
    d = head_dim // 2
    device = position_ids.device
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    # The original keeps inv_freq in float16.
    inv_freq = inv_freq.half().float()
    freqs = position_ids.float()[..., None] * inv_freq  # [B, 2, T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, 2, T, d]
    cos, sin = emb.cos(), emb.sin()
    cos = torch.cat([cos[:, 0], cos[:, 1]], dim=-1)[:, None]  # [B, 1, T, head_dim]
    sin = torch.cat([sin[:, 0], sin[:, 1]], dim=-1)[:, None]
    return cos, sin


def _rotate_half_2d(x: torch.Tensor) -> torch.Tensor:
    """rotate_half applied separately to the two halves of the last dim: per half, cat(-second, first)."""
    quarters = x.unflatten(-1, (2, 2, x.shape[-1] // 4))  # [..., half, quarter, head_dim/4]
    return torch.stack([-quarters[..., 1, :], quarters[..., 0, :]], dim=-2).flatten(-3)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, head_dim]; computed in float32 so half-precision runs keep exact angles.
    xf = x.float()
    return (xf * cos + _rotate_half_2d(xf) * sin).to(x.dtype)


class ChatGLMv1Attention(nn.Module):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, H]; attention_mask bool [B, 1, T, P + S] (True = attend) over prefix + cached
        + new keys; cos/sin [B, 1, T, head_dim]; prefix_key/value [B, heads, P, head_dim]."""
        batch, length, _ = hidden_states.shape
        # The fused projection is laid out per head: [q_h | k_h | v_h] for each head h.
        qkv = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [B, heads, T, hd]
        query = _apply_rotary(query, cos, sin)
        key = _apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if prefix_key is not None:
            key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
            value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
        if key.shape[2] > attention_mask.shape[-1]:
            # Pre-allocated caches return unused slots beyond the mask: never attend to them.
            attention_mask = F.pad(attention_mask, (0, key.shape[2] - attention_mask.shape[-1]), value=False)

        scale = 1.0 / math.sqrt(self.head_dim)
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1)
            context = torch.matmul(weights.to(value.dtype), value)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.dense(context), (weights if output_attentions else None)


class ChatGLMv1MLP(nn.Module):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class ChatGLMv1Block(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLMv1Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLMv1MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Tensors are positional so that reentrant checkpointing also propagates their gradients
        # (the prefix key/values are trainable under P-Tuning v2).
        normed = self.input_layernorm(hidden_states)
        attn_out, weights = self.attention(
            normed, attention_mask, cos, sin, prefix_key, prefix_value, cache, output_attentions
        )
        # GLM residual: the *normalised* input scaled by alpha.
        hidden_states = normed * _RESIDUAL_ALPHA + attn_out
        normed = self.post_attention_layernorm(hidden_states)
        return normed * _RESIDUAL_ALPHA + self.mlp(normed), weights


class ChatGLMv1PrefixEmbedding(nn.Embedding):
    """The prefix embedding table; its own class only so that it gets the original N(0, 1) init."""


class ChatGLMv1PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: [B, P] prefix token ids -> [B, P, num_layers * 2 * hidden] past key/values."""

    def __init__(self, config: ChatGLMv1Config):
        super().__init__()
        out_dim = config.num_layers * 2 * config.hidden_size
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:
            self.embedding = ChatGLMv1PrefixEmbedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, out_dim),
            )
        else:
            self.embedding = ChatGLMv1PrefixEmbedding(config.pre_seq_len, out_dim)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


class ChatGLMv1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLMv1Config
    config: ChatGLMv1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMv1Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # P-Tuning v2 trains the prefix in float32 even when the base runs in half precision.
    _keep_in_fp32_modules_strict = ["prefix_encoder"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ChatGLMv1PrefixEmbedding):
            # Like the original (torch's default Embedding init).
            init.normal_(module.weight, mean=0.0, std=1.0)
        else:
            super()._init_weights(module)


class ChatGLMv1Model(ChatGLMv1PreTrainedModel):
    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        if not config.position_encoding_2d:
            raise NotImplementedError(
                "only position_encoding_2d=True (every released ChatGLM-6B) is supported"
            )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGLMv1Block(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len is not None:
            self.prefix_encoder = ChatGLMv1PrefixEncoder(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_prefix_key_values(
        self, batch_size: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each [B, heads, pre_seq_len, head_dim], from the prefix encoder."""
        config = self.config
        encoder = self.prefix_encoder
        prefix = torch.arange(config.pre_seq_len, device=encoder.embedding.weight.device)
        prefix = prefix[None].expand(batch_size, -1)
        kv = encoder(prefix).view(
            batch_size, config.pre_seq_len, config.num_layers * 2, config.num_attention_heads, config.head_dim
        )
        # [2 * num_layers, B, heads, P, head_dim]: entry 2l is layer l's key, 2l + 1 its value.
        kv = kv.permute(2, 0, 3, 1, 4).to(dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]

    def _positions_and_mask(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_length: int,
        batch: int,
        length: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolve [B, 2, T] position ids and the bool "may attend" mask [B, T, past + T]."""
        config = self.config
        total = past_length + length
        if position_ids is not None and (position_ids.dim() != 3 or position_ids.shape[1] != 2):
            raise ValueError(
                f"ChatGLM-6B position_ids must be [B, 2, T] (positions, block positions), got "
                f"{tuple(position_ids.shape)}"
            )
        token_ids = dict(
            bos_token_id=config.bos_token_id,
            mask_token_id=config.mask_token_id,
            gmask_token_id=config.gmask_token_id,
        )

        if attention_mask is not None and attention_mask.dim() == 4:
            # Official 4D mask [B, 1, T, past + T]: bool with True = masked, or additive float (0 = attend).
            if attention_mask.shape[-2:] != (length, total):
                raise ValueError(
                    f"4D attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"{length} queries over {total} keys"
                )
            if attention_mask.dtype == torch.bool:
                given = ~attention_mask[:, 0].to(device)
            elif attention_mask.is_floating_point():
                given = attention_mask[:, 0].to(device) >= 0
            else:
                raise ValueError("a 4D attention_mask must be bool (True = masked) or additive float")
            given = given.expand(batch, length, total)
            keys = torch.arange(total, device=device)
            queries = past_length + torch.arange(length, device=device)
            # Every query may see itself so that fully masked (pad) rows stay finite.
            allowed = given | (keys[None, :] == queries[:, None])[None]
            if position_ids is None:
                if past_length:
                    raise ValueError(
                        "with a non-empty cache and a 4D attention_mask, pass position_ids [B, 2, T]"
                    )
                # In the official mask a real token always sees itself and a pad sees nothing.
                valid = torch.diagonal(given, dim1=-2, dim2=-1)
                position_ids, _ = chatglm_v1_position_ids_and_mask(
                    input_ids, attention_mask=valid, shape=(batch, length), device=device, **token_ids
                )
            return position_ids.to(device), allowed

        if attention_mask is not None and attention_mask.shape != (batch, total):
            raise ValueError(
                f"2D attention_mask shape {tuple(attention_mask.shape)} != {(batch, total)} "
                "(it must cover the cached tokens too)"
            )
        if past_length == 0:
            if input_ids is None and position_ids is not None:
                # No token ids to find <sop>: the first token with block position 1 plays its role.
                input_ids = torch.where(position_ids[:, 1] == 1, 1, 0).to(device)
                token_ids = dict(bos_token_id=1, mask_token_id=None, gmask_token_id=None)
            default_positions, allowed = chatglm_v1_position_ids_and_mask(
                input_ids, attention_mask=attention_mask, shape=(batch, length), device=device, **token_ids
            )
            return (default_positions if position_ids is None else position_ids.to(device)), allowed

        # Incremental decoding without the earlier token ids: the new tokens must be generated ones (after
        # the context), which attend causally to every real token so far.
        if position_ids is None:
            raise ValueError(
                "with a non-empty cache, pass position_ids [B, 2, T] (and the full 2D attention_mask or a 4D mask);"
                " generate() computes them from the full sequence"
            )
        valid = (
            torch.ones(batch, total, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.to(device).bool()
        )
        keys = torch.arange(total, device=device)
        queries = past_length + torch.arange(length, device=device)
        allowed = (valid[:, None, :] & (keys[None, :] <= queries[:, None])[None]) | (
            keys[None, :] == queries[:, None]
        )[None]
        return position_ids.to(device), allowed

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids [B, T] or inputs_embeds [B, T, H]; the key/value cache as `cache` (or, as transformers
        before 5.24 names it, `past_key_values`); attention_mask HF 2D [B, past + T] (1 = real) or the
        official 4D bool [B, 1, T, past + T] (True = masked); position_ids [B, 2, T]. Missing positions / mask
        are computed from input_ids as the original does (prefix-LM around <sop>, see
        `chatglm_v1_position_ids_and_mask`)."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        cache = one_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if not use_cache:
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0

        position_ids, allowed = self._positions_and_mask(
            input_ids, attention_mask, position_ids, past_length, batch, length, device
        )
        cos, sin = _rotary_cos_sin(position_ids, config.head_dim)

        prefix_kv = None
        if config.pre_seq_len is not None:
            prefix_kv = self.get_prefix_key_values(batch, inputs_embeds.dtype)
            # Every token, pads included, attends to every prefix position.
            prefix_cols = torch.ones(batch, length, config.pre_seq_len, dtype=torch.bool, device=device)
            allowed = torch.cat([prefix_cols, allowed], dim=-1)
        attention_4d = allowed[:, None]  # [B, 1, T, P + past + T]

        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            prefix_key, prefix_value = prefix_kv[i] if prefix_kv is not None else (None, None)
            hidden_states, weights = layer(
                hidden_states,
                attention_4d,
                cos,
                sin,
                prefix_key,
                prefix_value,
                cache=cache,
                output_attentions=bool(output_attentions),
            )
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **cache_kwargs(cache),
            hidden_states=all_hidden,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


class ChatGLMv1ForCausalLM(ChatGLMv1PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMv1Config):
        super().__init__(config)
        self.transformer = ChatGLMv1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """labels [B, T]: causal-LM loss (labels shifted left by one inside, -100 ignored, mean over targets;
        a `num_items_in_batch` kwarg switches to sum / num_items_in_batch)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items
            )
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> dict:
        """Positions and prefix-LM mask from the FULL sequence so far (input_ids [B, L], 2D mask [B, L]),
        then sliced to the tokens this step feeds: position_ids [B, 2, q] and a 4D bool mask [B, 1, q, L]
        (True = masked). Any position_ids generate() made itself (1D, HF style) are discarded. The cache comes
        as `cache` (transformers >= 5.24) or `past_key_values` (before) and is passed on under the name the
        installed release uses."""
        if inputs_embeds is not None:
            raise NotImplementedError(
                "ChatGLM-6B generation needs input_ids: positions depend on <sop>/[gMASK]"
            )
        length = input_ids.shape[1]
        cache = one_cache(cache, past_key_values)
        past_length = cache.get_seq_length() if cache is not None else 0
        if next_sequence_length is not None:
            query_length = next_sequence_length
        else:
            query_length = length - past_length
        if past_length + query_length != length:
            raise ValueError(
                f"generation needs the full sequence: {length} ids but {past_length} cached + {query_length} new"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("generate() takes a 2D attention_mask [B, L]")
        position_ids, allowed = chatglm_v1_position_ids_and_mask(
            input_ids,
            bos_token_id=self.config.bos_token_id,
            mask_token_id=self.config.mask_token_id,
            gmask_token_id=self.config.gmask_token_id,
            attention_mask=attention_mask,
            query_length=query_length,
        )
        model_inputs = {
            "input_ids": input_ids[:, length - query_length :].contiguous(),
            "position_ids": position_ids.contiguous(),
            "attention_mask": (~allowed)[:, None].contiguous(),
        }
        if cache is not None:
            model_inputs.update(cache_kwargs(cache))
        skipped = {"position_ids", "labels", "token_type_ids", "cache_position"}
        for key, value in kwargs.items():
            if key not in skipped and key not in model_inputs:
                model_inputs[key] = value
        if self.device.type != "meta" and model_inputs["input_ids"].device != self.device:
            model_inputs = {
                k: v.to(self.device) if torch.is_tensor(v) else v for k, v in model_inputs.items()
            }
        return model_inputs


AutoConfig.register(ChatGLMv1Config.model_type, ChatGLMv1Config, exist_ok=True)
AutoModel.register(ChatGLMv1Config, ChatGLMv1Model, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMv1Config, ChatGLMv1ForCausalLM, exist_ok=True)


def save_official_v1(model: ChatGLMv1ForCausalLM, out_dir: str | Path, safe: bool = False) -> Path:
    """Write the official on-disk format: official config.json, and pytorch_model.bin (or model.safetensors
    when `safe`) with official names, lm_head included and the rotary inv_freq buffers the original stores."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    official = config.to_official()
    official["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(official, indent=2) + "\n")

    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state_dict.setdefault("lm_head.weight", state_dict["transformer.word_embeddings.weight"])
    d = config.head_dim // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).half().to(model.dtype)
    for i in range(config.num_layers):
        state_dict[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    if safe:
        from safetensors.torch import save_file

        # safetensors refuses shared storage (tied lm_head): give every tensor its own copy.
        save_file(
            {k: v.cpu().clone() for k, v in state_dict.items()},
            str(out_dir / "model.safetensors"),
            metadata={"format": "pt"},
        )
    else:
        torch.save({k: v.cpu() for k, v in state_dict.items()}, out_dir / "pytorch_model.bin")
    return out_dir
