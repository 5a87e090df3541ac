"""Reading fine-tuning data: every format users bring, normalised to chat messages."""

from glmtune.data.chat_import import import_chats
from glmtune.data.readers import (
    FORMATS,
    ROLES,
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
    "ROLES",
    "DataError",
    "Example",
    "ReadResult",
    "import_chats",
    "iter_raw_rows",
    "read_examples",
    "to_conversations_row",
    "write_jsonl_atomic",
]
