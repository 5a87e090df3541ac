"""The one place that knows how the installed transformers names the key/value cache.

transformers 5.24 renamed ``past_key_values`` to ``cache``: in ``forward`` arguments, in the model kwargs
that ``generate()`` passes, and in the output classes (the old name is deprecated until 5.40). glmtune's
own models accept either name on input and write the field the installed release declares, so no
deprecated name is ever handed to transformers and releases on both sides of the rename work.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

# "cache" on transformers >= 5.24, "past_key_values" before.
CACHE_KEY: str = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
)


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache given under either name (None when neither); both names for two caches is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the key/value cache once, as `cache` (or `past_key_values`), not both")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` under the name the installed transformers expects (forward args, outputs)."""
    return {CACHE_KEY: cache}


def output_cache(outputs: Any) -> Cache | None:
    """The cache a model output carries, read under the installed release's field name."""
    return getattr(outputs, CACHE_KEY, None)
