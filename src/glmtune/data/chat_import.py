"""Turn exported chat history (one JSON file per contact) into ChatGLM3 ``train.json`` / ``dev.json``.

The exporting user ("me") becomes the assistant, so the fine-tuned model learns to reply the way
they do; each contact becomes the user. Two kinds of input file sit side by side in the folder:

- ``*train.json`` / ``*dev.json`` (or ``.jsonl``): rows in any format :func:`read_examples` knows,
  usually ChatGLM3 ``{"conversations": [...]}``, merged as they are into train / dev.
- anything else ``*.json`` / ``*.jsonl``: a raw message list, ``[{"sender", "text", "time"}, ...]``,
  with common aliases for the keys (see ``_SENDER_KEYS`` and friends; camelCase works too).

Raw messages are cut into conversations at silences longer than ``gap_minutes``; consecutive
messages from one side become one turn (joined with a newline); a conversation starts with the
contact and ends with a reply from me, and one with no contact -> me exchange is dropped. The
conversations are shuffled with ``seed`` and split by ``dev_ratio``, so the same folder and seed
always give the same files.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glmtune.data.readers import (
    _MISSING,
    DataError,
    _json_type,
    _show,
    _text,
    iter_raw_rows,
    read_examples,
    to_conversations_row,
    write_jsonl_atomic,
)

__all__ = ["import_chats"]

# Key aliases seen in chat exporters (WeChat, QQ, Telegram-style dumps); matched ignoring case and "_".
_SENDER_KEYS = ("sender", "from", "talker", "name")
_TEXT_KEYS = ("text", "content", "msg")
_TIME_KEYS = ("time", "timestamp", "create_time")
_ME_FLAG_KEYS = ("is_me", "is_send", "is_self", "is_sender")

_PREMADE = re.compile(r"(train|dev)\.jsonl?$", re.IGNORECASE)
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}

# Unix times above this are milliseconds: as seconds they would be past the year 5000.
_MS_THRESHOLD = 1e11

DROP_REASONS = ("only_contact_messages", "only_my_messages", "no_reply_from_me")


@dataclass
class _Message:
    time: float
    mine: bool
    text: str


def _norm_key(key: str) -> str:
    return key.replace("_", "").lower()


def _lookup(row: dict, aliases: Sequence[str]) -> tuple[str, Any]:
    """(key as written, value) for the first alias the row has, or (aliases[0], _MISSING)."""
    keys = {_norm_key(k): k for k in row if isinstance(k, str)}
    for alias in aliases:
        key = keys.get(_norm_key(alias))
        if key is not None:
            return key, row[key]
    return aliases[0], _MISSING


def _parse_time(value: Any, loc: str, fld: str) -> float:
    if value is _MISSING:
        raise DataError(
            f"missing (a time is needed to split conversations; keys tried: {', '.join(_TIME_KEYS)})",
            loc,
            fld,
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"expected an ISO-8601 time or unix seconds, got {_json_type(value)}", loc, fld)
    if isinstance(value, str) and not re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        text = value.strip()
        # datetime.fromisoformat only reads a trailing "Z" from Python 3.11 on.
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                # Exports write local time without an offset; only differences matter, so any zone works.
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
        except (ValueError, OverflowError):
            raise DataError(f"not an ISO-8601 time or unix seconds: {_show(value)}", loc, fld) from None
    seconds = float(value)
    if not math.isfinite(seconds):
        raise DataError(f"not a finite time: {_show(value)}", loc, fld)
    return seconds / 1000 if seconds > _MS_THRESHOLD else seconds


def _flag(value: Any, loc: str, fld: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"expected true / false or 1 / 0, got {_show(value)}", loc, fld)


def _is_mine(row: dict, loc: str, me: str | None) -> bool:
    # A per-message flag is the exporter's own record; it beats matching names (WeChat's "talker" is
    # the contact on every message, both directions).
    flag_key, flag = _lookup(row, _ME_FLAG_KEYS)
    if flag is not _MISSING:
        return _flag(flag, loc, flag_key)
    sender_key, sender = _lookup(row, _SENDER_KEYS)
    if me is not None and isinstance(sender, (str, int)) and not isinstance(sender, bool):
        return str(sender).strip() == me.strip()
    if sender is _MISSING:
        raise DataError(f"missing (keys tried: {', '.join(_SENDER_KEYS)})", loc, sender_key)
    raise DataError(f"expected a sender name, got {_json_type(sender)}", loc, sender_key)


def _looks_like_rows(row: dict) -> bool:
    return any(isinstance(row.get(k), list) for k in ("conversations", "messages")) or "instruction" in row


def _read_chat_log(path: Path, me: str | None, stats: dict) -> list[_Message]:
    rows = list(iter_raw_rows(path))
    if rows and _looks_like_rows(rows[0][1]):
        raise DataError(
            f"{rows[0][0]}: this holds training rows, not a chat log; name the file *train.json or "
            "*dev.json to merge it as it is"
        )
    if rows and me is None and not any(_lookup(row, _ME_FLAG_KEYS)[1] is not _MISSING for _, row in rows):
        raise DataError(
            f"{path}: cannot tell which messages are yours: pass me=<your sender name> or give each "
            f"message a flag ({', '.join(_ME_FLAG_KEYS)}, or isSend)"
        )
    messages = []
    for loc, row in rows:
        text_key, text = _lookup(row, _TEXT_KEYS)
        if not isinstance(text, str) or not text.strip():
            # Pictures, stickers, calls, recalled messages: nothing a language model can learn from.
            stats["messages_without_text"] += 1
            continue
        time_key, when = _lookup(row, _TIME_KEYS)
        messages.append(
            _Message(
                time=_parse_time(when, loc, time_key),
                mine=_is_mine(row, loc, me),
                text=_text(text, loc, text_key),
            )
        )
    stats["messages"] += len(messages)
    # Exports are chronological as a rule; a stable sort repairs the odd one without reordering ties.
    messages.sort(key=lambda m: m.time)
    return messages


def _sessions(messages: list[_Message], gap_seconds: float) -> list[list[_Message]]:
    sessions: list[list[_Message]] = []
    for m in messages:
        if sessions and m.time - sessions[-1][-1].time <= gap_seconds:
            sessions[-1].append(m)
        else:
            sessions.append([m])
    return sessions


def _conversation(session: list[_Message]) -> tuple[dict | None, str | None]:
    """(``{"conversations": [...]}`` row, None) or (None, why the session is dropped)."""
    turns: list[list] = []
    for m in session:
        if turns and turns[-1][0] == m.mine:
            turns[-1][1].append(m.text)
        else:
            turns.append([m.mine, [m.text]])
    if not any(mine for mine, _ in turns):
        return None, "only_contact_messages"
    if all(mine for mine, _ in turns):
        return None, "only_my_messages"
    # The model is trained to answer the contact: it must not open, and must have the last word.
    while turns and turns[0][0]:
        turns.pop(0)
    while turns and not turns[-1][0]:
        turns.pop()
    if not turns:
        return None, "no_reply_from_me"
    return {
        "conversations": [
            {"role": "assistant" if mine else "user", "content": "\n".join(texts)} for mine, texts in turns
        ]
    }, None


def _dev_count(n: int, dev_ratio: float) -> int:
    if n < 2 or dev_ratio <= 0:
        return 0
    return min(n - 1, max(1, math.floor(n * dev_ratio + 0.5)))


def import_chats(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dev_ratio: float = 0.1,
    seed: int = 42,
    gap_minutes: float = 60,
    me: str | None = None,
) -> dict:
    """Merge a folder of exported chats into ``out_dir/train.json`` and ``out_dir/dev.json`` (JSONL).

    ``me``: your sender name in the raw logs; a per-message ``is_me`` / ``isSend`` flag, where a
    message has one, decides instead, and a log with neither is an error naming the file. Both files are written atomically. Returns a summary: files read, messages, conversations
    kept and dropped (by reason), train / dev rows and the paths written.
    """
    if not 0 <= dev_ratio < 1:
        raise ValueError(f"dev_ratio must be in [0, 1), got {dev_ratio}")
    if not gap_minutes > 0:
        raise ValueError(f"gap_minutes must be positive, got {gap_minutes}")
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    train_path, dev_path = out / "train.json", out / "dev.json"
    # Importing into the source folder again must not read the last run's output as input.
    outputs = {train_path.resolve(), dev_path.resolve()}
    files = sorted(
        p
        for p in src.iterdir()
        if p.is_file() and p.suffix.lower() in (".json", ".jsonl") and p.resolve() not in outputs
    )
    if not files:
        raise DataError(f"{src}: no .json or .jsonl files to import")

    stats = {"messages": 0, "messages_without_text": 0}
    merged: dict[str, list[dict]] = {"train": [], "dev": []}
    conversations: list[dict] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for path in files:
        premade = _PREMADE.search(path.name)
        if premade:
            rows = read_examples(path).examples
            merged[premade.group(1).lower()] += [to_conversations_row(e) for e in rows]
            continue
        for session in _sessions(_read_chat_log(path, me, stats), gap_minutes * 60):
            row, reason = _conversation(session)
            if row is None:
                dropped[reason] += 1
            else:
                conversations.append(row)

    random.Random(seed).shuffle(conversations)
    n_dev = _dev_count(len(conversations), dev_ratio)
    train = merged["train"] + conversations[n_dev:]
    dev = merged["dev"] + conversations[:n_dev]
    if not train:
        raise DataError(
            f"{src}: no conversation to train on ({len(files)} files, {stats['messages']} messages; "
            f"dropped: {', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'none'})"
        )
    write_jsonl_atomic(train_path, train)
    write_jsonl_atomic(dev_path, dev)
    return {
        "files_read": len(files),
        "messages": stats["messages"],
        "messages_without_text": stats["messages_without_text"],
        "conversations_kept": len(conversations),
        "conversations_dropped": sum(dropped.values()),
        "dropped_reasons": dropped,
        "merged_train_rows": len(merged["train"]),
        "merged_dev_rows": len(merged["dev"]),
        "train": len(train),
        "dev": len(dev),
        "train_path": str(train_path),
        "dev_path": str(dev_path),
    }
