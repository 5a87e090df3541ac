"""Reading fine-tuning data: every format users bring, normalised to chat messages."""

from glmtune.data.chat_import import import_chats
from glmtune.data.readers import (
    FORMATS,
    DataError,
    Example,
    ReadResult,
    iter_raw_rows,
    read_examples,
    to_conversations_row,
    write_jsonl_atomic,
)

__all__ = [
    "FORMATS",
    "DataError",
    "Example",
    "ReadResult",
    "import_chats",
    "iter_raw_rows",
    "read_examples",
    "to_conversations_row",
    "write_jsonl_atomic",
]

# Encoding, caching and batching: appended after the reader exports, which they build on.
from glmtune.data.cache import CacheInfo, default_cache_dir, tokenize_cached  # noqa: E402
from glmtune.data.collate import (  # noqa: E402
    DataCollator,
    PackedCollator,
    check_packing,
    length_grouped_sampler,
    pack_examples,
)
from glmtune.data.encode import (  # noqa: E402
    ENCODING_VERSION,
    EncodedExample,
    EncodeSettings,
    EncodeStats,
    encode,
    encode_all,
    length_stats,
)

__all__ += [
    "CacheInfo",
    "DataCollator",
    "ENCODING_VERSION",
    "EncodeSettings",
    "EncodeStats",
    "EncodedExample",
    "PackedCollator",
    "check_packing",
    "default_cache_dir",
    "encode",
    "encode_all",
    "length_grouped_sampler",
    "length_stats",
    "pack_examples",
    "tokenize_cached",
]
