"""Turn exported chat history into ChatGLM3 ``train.json`` / ``dev.json``.

The exporting user ("me") becomes the assistant, so the fine-tuned model learns to reply the way
they do; each contact becomes the user. The export is a folder tree: one file per contact at the top,
or one sub-folder per contact (any depth below it, any number of files). Two kinds of input file:

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glmtune.data.readers import (
    MISSING,
    DataError,
    iter_raw_rows,
    json_type,
    read_examples,
    require_text,
    show_value,
    to_conversations_row,
    write_jsonl_atomic,
)

__all__ = ["import_chats", "read_me_map"]

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
    """(key as written, value) for the first alias the row has, or (aliases[0], MISSING)."""
    keys = {_norm_key(k): k for k in row if isinstance(k, str)}
    for alias in aliases:
        key = keys.get(_norm_key(alias))
        if key is not None:
            return key, row[key]
    return aliases[0], MISSING


def _parse_time(value: Any, loc: str, fld: str) -> float:
    if value is MISSING:
        raise DataError(
            f"missing (a time is needed to split conversations; keys tried: {', '.join(_TIME_KEYS)})",
            loc,
            fld,
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"expected an ISO-8601 time or unix seconds, got {json_type(value)}", loc, fld)
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
            raise DataError(f"not an ISO-8601 time or unix seconds: {show_value(value)}", loc, fld) from None
    seconds = float(value)
    if not math.isfinite(seconds):
        raise DataError(f"not a finite time: {show_value(value)}", loc, fld)
    return seconds / 1000 if seconds > _MS_THRESHOLD else seconds


def _flag(value: Any, loc: str, fld: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"expected true / false or 1 / 0, got {show_value(value)}", loc, fld)


def _is_mine(row: dict, loc: str, me: str | None) -> bool:
    # A per-message flag is the exporter's own record; it beats matching names (WeChat's "talker" is
    # the contact on every message, both directions).
    flag_key, flag = _lookup(row, _ME_FLAG_KEYS)
    if flag is not MISSING:
        return _flag(flag, loc, flag_key)
    sender_key, sender = _lookup(row, _SENDER_KEYS)
    if me is not None and isinstance(sender, (str, int)) and not isinstance(sender, bool):
        return str(sender).strip() == me.strip()
    if sender is MISSING:
        raise DataError(f"missing (keys tried: {', '.join(_SENDER_KEYS)})", loc, sender_key)
    raise DataError(f"expected a sender name, got {json_type(sender)}", loc, sender_key)


def _looks_like_rows(row: dict) -> bool:
    return any(isinstance(row.get(k), list) for k in ("conversations", "messages")) or "instruction" in row


def _read_chat_log(path: Path, me: str | None, stats: dict) -> list[_Message]:
    rows = list(iter_raw_rows(path))
    if rows and _looks_like_rows(rows[0][1]):
        raise DataError(
            f"{rows[0][0]}: this holds training rows, not a chat log; name the file *train.json or "
            "*dev.json to merge it as it is"
        )
    if rows and me is None and not any(_lookup(row, _ME_FLAG_KEYS)[1] is not MISSING for _, row in rows):
        raise DataError(
            f"{path}: cannot tell which messages are yours: pass me=<your sender name> (or a me-map "
            f"entry for this contact) or give each message a flag ({', '.join(_ME_FLAG_KEYS)}, or isSend)"
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
                text=require_text(text, loc, text_key),
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


def _contact(path: Path, src: Path) -> str:
    """Who a raw log belongs to: its top-level sub-folder under ``src``, or its file name at the top."""
    rel = path.relative_to(src)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


def _me_for(contact: str, me: str | Mapping[str, str] | None) -> str | None:
    if me is None or isinstance(me, str):
        return me
    return me.get(contact, me.get("*"))


def read_me_map(path: str | os.PathLike) -> dict[str, str]:
    """A ``--me-map`` file: a JSON or YAML object of contact -> your sender name there (``"*"``: the rest)."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{p}: cannot read the me-map: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: expected an object of contact -> your sender name, got {json_type(raw)}")
    for key, value in raw.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
            raise DataError(f"expected your sender name, got {show_value(value)}", str(p), str(key))
    return {str(k): str(v) for k, v in raw.items()}


def import_chats(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dev_ratio: float = 0.1,
    seed: int = 42,
    gap_minutes: float = 60,
    me: str | Mapping[str, str] | None = None,
) -> dict:
    """Merge a tree of exported chats into ``out_dir/train.json`` and ``out_dir/dev.json`` (JSONL).

    The folder is walked recursively (hidden folders skipped). A contact is a top-level sub-folder
    (every log under it, at any depth, is merged into one timeline before it is cut into
    conversations) or, for a log at the top, its file name. ``me``: your sender name in the raw logs,
    or a mapping of contact -> name with ``"*"`` for the rest (:func:`read_me_map`); a per-message
    ``is_me`` / ``isSend`` flag, where a message has one, decides instead, and a log with neither is
    an error naming the file. Both files are written atomically. Returns a summary: files read and
    skipped, messages, conversations kept and dropped (by reason), rows per contact, train / dev rows
    and the paths written.
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
    files, skipped_files = [], []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.resolve() in outputs:
            continue
        (files if p.suffix.lower() in (".json", ".jsonl") else skipped_files).append(p)
    if not files:
        raise DataError(f"{src}: no .json or .jsonl files to import")

    stats = {"messages": 0, "messages_without_text": 0}
    merged: dict[str, list[dict]] = {"train": [], "dev": []}
    logs: dict[str, list[Path]] = {}
    for path in files:
        premade = _PREMADE.search(path.name)
        if premade:
            rows = read_examples(path).examples
            merged[premade.group(1).lower()] += [to_conversations_row(e) for e in rows]
        else:
            logs.setdefault(_contact(path, src), []).append(path)

    conversations: list[tuple[str, dict]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)
    contacts: dict[str, dict] = {}
    for contact in sorted(logs):
        counts = {"files": len(logs[contact]), "messages": 0, "messages_without_text": 0}
        messages = [m for path in logs[contact] for m in _read_chat_log(path, _me_for(contact, me), counts)]
        # One timeline per contact, even when the exporter split it over several files.
        messages.sort(key=lambda m: m.time)
        kept = 0
        contact_dropped = dict.fromkeys(DROP_REASONS, 0)
        for session in _sessions(messages, gap_minutes * 60):
            row, reason = _conversation(session)
            if row is None:
                contact_dropped[reason] += 1
            else:
                conversations.append((contact, row))
                kept += 1
        for reason, n in contact_dropped.items():
            dropped[reason] += n
        stats["messages"] += counts["messages"]
        stats["messages_without_text"] += counts["messages_without_text"]
        contacts[contact] = {
            **counts,
            "conversations_kept": kept,
            "conversations_dropped": sum(contact_dropped.values()),
            "train": 0,
            "dev": 0,
        }

    random.Random(seed).shuffle(conversations)
    n_dev = _dev_count(len(conversations), dev_ratio)
    for i, (contact, _) in enumerate(conversations):
        contacts[contact]["dev" if i < n_dev else "train"] += 1
    train = merged["train"] + [row for _, row in conversations[n_dev:]]
    dev = merged["dev"] + [row for _, row in conversations[:n_dev]]
    if not train:
        raise DataError(
            f"{src}: no conversation to train on ({len(files)} files, {stats['messages']} messages; "
            f"dropped: {', '.join(f'{k} {v}' for k, v in dropped.items() if v) or 'none'})"
        )
    write_jsonl_atomic(train_path, train)
    write_jsonl_atomic(dev_path, dev)
    unused = sorted(k for k in me if k != "*" and k not in logs) if isinstance(me, Mapping) else []
    return {
        "files_read": len(files),
        "files_skipped": [str(p.relative_to(src)) for p in skipped_files],
        "messages": stats["messages"],
        "messages_without_text": stats["messages_without_text"],
        "conversations_kept": len(conversations),
        "conversations_dropped": sum(dropped.values()),
        "dropped_reasons": dropped,
        "contacts": contacts,
        "me_map_unused": unused,
        "merged_train_rows": len(merged["train"]),
        "merged_dev_rows": len(merged["dev"]),
        "train": len(train),
        "dev": len(dev),
        "train_path": str(train_path),
        "dev_path": str(dev_path),
    }
