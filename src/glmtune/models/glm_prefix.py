"""P-Tuning v2 for the native Glm model, in the official ChatGLM2/3 layout.

A prefix encoder turns ``pre_seq_len`` virtual tokens into per-layer keys and values that every real
token can attend to. The official checkpoint holds one tensor,
``transformer.prefix_encoder.embedding.weight`` of shape [pre_seq_len, num_layers * 2 * G * d]
(G kv groups, d head dim), plus ``trans.{0,2}`` when ``prefix_projection`` is on. Its values are laid out
as [pre_seq_len, num_layers * 2, G, d]: layer i's keys at index 2i and values at 2i+1. The prefix keys are
not rotated, and real tokens keep positions 0, 1, 2, ... (not shifted by the prefix).

peft's PrefixTuning has the same tensor layout, but under transformers 5 it shifts the real tokens'
positions by the prefix length during generation; the official model does not, and the shift changes
the logits because the prefix keys carry no rotation. So this small subclass does it by hand.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GlmConfig, GlmForCausalLM
from transformers.cache_utils import Cache, DynamicCache

from .compat import cache_kwargs, one_cache


class PrefixEncoder(nn.Module):
    """[pre_seq_len] virtual tokens -> [num_layers * 2, B, G, pre_seq_len, d] keys/values (float32)."""

    def __init__(
        self,
        pre_seq_len: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        hidden_size: int,
        projection: bool = False,
    ):
        super().__init__()
        self.pre_seq_len, self.num_layers, self.kv_heads, self.head_dim = (
            pre_seq_len,
            num_layers,
            kv_heads,
            head_dim,
        )
        kv_size = num_layers * 2 * kv_heads * head_dim
        self.embedding = nn.Embedding(pre_seq_len, kv_size)
        # The official ChatGLM2/3 projection is kv_size -> hidden -> kv_size with a tanh between.
        self.trans = (
            nn.Sequential(nn.Linear(kv_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))
            if projection
            else None
        )

    def forward(self, batch_size: int) -> torch.Tensor:
        idx = torch.arange(self.pre_seq_len, device=self.embedding.weight.device)
        kv = self.embedding(idx)  # [P, L*2*G*d]
        if self.trans is not None:
            kv = self.trans(kv)
        kv = kv.view(1, self.pre_seq_len, self.num_layers * 2, self.kv_heads, self.head_dim)
        return kv.expand(batch_size, -1, -1, -1, -1).permute(2, 0, 3, 1, 4)  # [L*2, B, G, P, d]


class PrefixOnlyCache(DynamicCache):
    """The prefix keys/values, read by every layer and never extended (training: nothing to cache).

    ``update`` returns prefix + the step's keys/values without storing them, so a layer replayed by
    gradient checkpointing sees the same prefix again. That makes the cache safe to keep under
    checkpointing (transformers drops a cache there, as a writer would be extended twice), which a
    P-Tuning prefix needs: without it the prefix would silently vanish from checkpointed layers.
    """

    def fill(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> None:
        DynamicCache.update(self, key, value, layer)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class GlmPrefixForCausalLM(GlmForCausalLM):
    """``GlmForCausalLM`` plus a float32 P-Tuning v2 prefix encoder (``config.pre_seq_len``)."""

    def __init__(self, config: GlmConfig):
        super().__init__(config)
        self.prefix_encoder = PrefixEncoder(
            config.pre_seq_len,
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            config.hidden_size,
            bool(getattr(config, "prefix_projection", False)),
        )
        # The official get_prompt applies dropout 0.1 to the prefix keys/values (off in eval mode).
        self.prefix_dropout = nn.Dropout(float(getattr(config, "prefix_dropout", 0.1)))
        # Training passes a PrefixOnlyCache (read-only), which gradient checkpointing may keep.
        for layer in self.model.layers:
            layer._can_checkpoint_with_cache = True

    def _fill_prefix(self, cache: Cache, batch: int, dtype: torch.dtype) -> None:
        """Write the prefix keys/values, [B, G, P, d] per layer, into an empty ``cache`` in place."""
        kv = self.prefix_dropout(self.prefix_encoder(batch).float()).to(dtype)
        write = cache.fill if isinstance(cache, PrefixOnlyCache) else cache.update
        for layer in range(self.config.num_hidden_layers):
            write(kv[2 * layer], kv[2 * layer + 1], layer)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        """Same contract as ``GlmForCausalLM.forward``; ``attention_mask`` never includes the prefix.

        The prefix enters as the first ``pre_seq_len`` entries of the key/value cache: ``generate()`` hands
        an empty cache on its first step (filled here in place) and the filled one afterwards. Positions
        come from ``position_ids`` when given (``generate()`` computes them from the 2D mask, which never
        counts the prefix), else from the 2D mask, else from the real tokens already cached.
        """
        cache = one_cache(cache, past_key_values)
        prefix_len = self.config.pre_seq_len
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[0], ref.shape[1]
        if cache is None:
            # Training reads the prefix and caches nothing; inference keeps the real tokens too.
            cache = PrefixOnlyCache(config=self.config) if self.training else DynamicCache(config=self.config)
        if cache.get_seq_length() == 0:
            self._fill_prefix(cache, batch, self.lm_head.weight.dtype)
        seen = cache.get_seq_length() - prefix_len  # real tokens already in the cache
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                # Left padding: real tokens count from 0 at their first position, pads get 0.
                pos = attention_mask.long().cumsum(-1) - 1
                position_ids = pos.clamp(min=0)[:, -length:]
            else:
                position_ids = (
                    torch.arange(seen, seen + length, device=ref.device).unsqueeze(0).expand(batch, -1)
                )
        if attention_mask is not None and attention_mask.ndim == 2:
            ones = attention_mask.new_ones(batch, prefix_len)
            attention_mask = torch.cat([ones, attention_mask], dim=-1)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
