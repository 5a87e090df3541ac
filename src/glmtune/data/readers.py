"""Read fine-tuning data in the formats users bring, normalised to one chat-message form.

Every reader turns a row into an :class:`Example`: ``messages`` (``{"role", "content"}`` dicts, roles
system / user / assistant / observation; a system message may carry ``tools``, an assistant message
``metadata``, the tool name of a tool call) and ``source``, where the row came from (``path:line`` for
JSONL, ``path[index]`` for a JSON array), so that later layers can point at the row too.

Formats (auto-detected from the first row's keys, or named with ``fmt=``):

- ``context_target``: ``{"context", "target"}`` -> user: context, assistant: target.
- ``alpaca``: ``{"instruction", "input", "output"}`` (+ ``system``, + ``history`` of [q, a] pairs).
- ``prompt_response``: user-chosen prompt / response / history columns (AdvertiseGen's
  ``content`` / ``summary`` by default).
- ``conversations``: ChatGLM3 ``{"conversations": [{"role", "content", "tools"?, "metadata"?}]}``.
- ``sharegpt``: ``{"conversations": [{"from": "human|gpt|...", "value"}]}``.
- ``messages``: OpenAI ``{"messages": [{"role": "system|user|assistant|tool", "content"}]}``.

Anything wrong with the input is reported as :class:`DataError` naming the file, the line (or array
index) and the field, never as a KeyError / TypeError / UnicodeDecodeError from deep inside.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Re-exported under the name the data API has always had (glmtune.data.write_jsonl_atomic).
from glmtune.atomic import write_jsonl as write_jsonl_atomic
from glmtune.errors import GlmtuneError

__all__ = [
    "FORMATS",
    "MISSING",
    "DataError",
    "Example",
    "ReadResult",
    "iter_raw_rows",
    "json_type",
    "read_examples",
    "require_text",
    "show_value",
    "to_conversations_row",
    "write_jsonl_atomic",
]

FORMATS = ("context_target", "alpaca", "prompt_response", "conversations", "sharegpt", "messages")

# Other spellings users write for a format (data.format, --format); the one list, also used by the config.
FORMAT_ALIASES = {
    "context/target": "context_target",
    "context-target": "context_target",
    "instruction": "alpaca",
    "content/summary": "prompt_response",
    "prompt-response": "prompt_response",
    "chatglm3": "conversations",
    "openai": "messages",
}

# Per format: logical column -> key in the row. None switches an optional column off.
_DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "context_target": {"context": "context", "target": "target"},
    "alpaca": {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "system": "system",
        "history": "history",
    },
    "prompt_response": {"prompt": "content", "response": "summary", "history": None},
    "conversations": {"conversations": "conversations"},
    "sharegpt": {"conversations": "conversations", "system": "system", "tools": "tools"},
    "messages": {"messages": "messages", "tools": "tools"},
}
_REQUIRED_COLUMNS = frozenset(
    {"context", "target", "instruction", "output", "prompt", "response", "conversations", "messages"}
)
KNOWN_COLUMNS = tuple(dict.fromkeys(k for cols in _DEFAULT_COLUMNS.values() for k in cols))


@dataclass(frozen=True)
class _Roles:
    """How a format spells its messages: role and content keys, role names, the documented names."""

    role_key: str
    content_key: str
    what: str
    expected: str
    names: Mapping[str, str]


_CHATGLM3 = _Roles(
    "role",
    "content",
    "role",
    "system, user, assistant, observation",
    {
        "system": "system",
        "user": "user",
        "assistant": "assistant",
        "observation": "observation",
        "tool": "observation",
    },
)
_OPENAI = _Roles(
    "role",
    "content",
    "role",
    "system, user, assistant, tool",
    {
        "system": "system",
        "user": "user",
        "assistant": "assistant",
        "tool": "observation",
        "function": "observation",
        "observation": "observation",
    },
)
_SHAREGPT = _Roles(
    "from",
    "value",
    "sender",
    "human, gpt, system, function_call, observation",
    {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
        "function_call": "assistant",
        "observation": "observation",
        "tool": "observation",
        "function": "observation",
    },
)

# What may follow each role; None stands for "start of the conversation".
_NEXT_ROLES = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "observation", "assistant"),
    "observation": ("assistant",),
}

_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = " \t\r\n"


class _Missing:
    """Marks a key that is absent from a row (as opposed to present with a null value)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class DataError(GlmtuneError, ValueError):
    """Invalid input data. The message names the file, the line or index and the field.

    ``location`` is ``path:line`` or ``path[index]`` (None for a whole-file problem), ``field`` the
    field path inside the row (``conversations[2].role``), ``reason`` what is wrong with it.
    """

    def __init__(
        self, reason: str, location: str | None = None, field: str | None = None, message: str | None = None
    ):
        self.reason = reason
        self.location = location
        self.field = field
        super().__init__(message if message is not None else _format_error(reason, location, field))

    def __reduce__(self):
        return (type(self), (self.reason, self.location, self.field, str(self)))


def _format_error(reason: str, location: str | None, field: str | None) -> str:
    if location is None:
        return reason
    if field is None:
        return f"{location}: {reason}"
    if location.endswith("]"):
        # An array element reads best as one JSON path: train.json[5].conversations[2].role
        sep = "" if field.startswith("[") else "."
        return f"{location}{sep}{field}: {reason}"
    return f'{location}: field "{field}": {reason}'


@dataclass
class Example:
    """One normalised example: chat messages and where they came from."""

    messages: list[dict]
    source: str


@dataclass
class ReadResult:
    """What :func:`read_examples` found: the examples, the rows it skipped (with why) and the format."""

    examples: list[Example]
    skipped: list[DataError] = field(default_factory=list)
    format: str = ""


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages ("null", "number", "list", "object", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def show_value(value: Any, limit: int = 40) -> str:
    """A value quoted for an error message, short, and printable on any UTF-8 terminal."""
    text = json.dumps(value, ensure_ascii=False)
    if _SURROGATE.search(text):
        text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _emit(err: DataError, on_error: Callable[[DataError], None] | None) -> None:
    if on_error is None:
        raise err
    on_error(err)


# ---------------------------------------------------------------------------------------------------
# Raw rows


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode_error(loc: str, byte: int, offset: int) -> DataError:
    return DataError(f"not valid UTF-8 (byte 0x{byte:02x} at offset {offset})", loc)


def _parse_json(text: str) -> tuple[Any, str | None, int]:
    """(value, None, 0) or (None, reason, line) -- json raises several types and never says which."""
    try:
        return json.loads(text), None, 0
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno
    except RecursionError:
        return None, "invalid JSON: nested too deeply", 1
    except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
        return None, f"invalid JSON: {e}", 1


def _not_object(loc: str, value: Any) -> DataError:
    return DataError(f"expected a JSON object, got {json_type(value)}", loc)


def iter_raw_rows(
    path: str | os.PathLike, on_error: Callable[[DataError], None] | None = None
) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)`` for each JSON object in a JSONL file or a JSON array file.

    The kind is told by the first non-whitespace character (``[``: array), not by the file name: a
    ``.json`` file holding JSONL is common. UTF-8 with or without a byte-order mark. Locations are
    ``path:line`` (JSONL) or ``path[index]`` (array).

    A bad row (invalid JSON or UTF-8, not an object) raises :class:`DataError`, or, given ``on_error``,
    is passed to it and skipped. Problems with the whole file (unreadable, a JSON array that does
    not parse) always raise: there is no row to skip to.
    """
    name = str(path)
    raw = _read_bytes(path)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8", f"{name}:1"
        )
    body = raw[len(_BOM) :] if raw.startswith(_BOM) else raw
    if body.lstrip(_JSON_SPACE.encode())[:1] == b"[":
        yield from _array_rows(name, body, on_error)
    else:
        yield from _line_rows(name, raw, on_error)


def _array_rows(name: str, body: bytes, on_error: Callable[[DataError], None] | None):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        # Report the line and the offset in that line, where an editor can find it.
        line_no = body.count(b"\n", 0, e.start) + 1
        offset = e.start - (body.rfind(b"\n", 0, e.start) + 1)
        raise _decode_error(f"{name}:{line_no}", body[e.start], offset) from None
    value, reason, line_no = _parse_json(text)
    if reason is not None:
        raise DataError(reason, f"{name}:{line_no}")
    for i, row in enumerate(value):
        loc = f"{name}[{i}]"
        if isinstance(row, dict):
            yield loc, row
        else:
            _emit(_not_object(loc, row), on_error)


def _line_rows(name: str, raw: bytes, on_error: Callable[[DataError], None] | None):
    seen_row = False
    for line_no, line in enumerate(raw.split(b"\n"), 1):
        loc = f"{name}:{line_no}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            _emit(_decode_error(loc, line[e.start], e.start), on_error)
            continue
        # A byte-order mark may start the file, or any line of files joined with cat.
        text = text.lstrip("\ufeff")
        if not text.strip(_JSON_SPACE):
            continue
        value, reason, _ = _parse_json(text)
        if reason is not None:
            if not seen_row:
                _raise_if_one_object(name, raw)
            _emit(DataError(reason, loc), on_error)
            continue
        seen_row = True
        if isinstance(value, dict):
            yield loc, value
        else:
            _emit(_not_object(loc, value), on_error)


def _raise_if_one_object(name: str, raw: bytes) -> None:
    """A pretty-printed single object fails on its first line; say what the file is instead."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return
    value, reason, _ = _parse_json(text)
    if reason is None and isinstance(value, dict):
        raise DataError(
            "the file is one JSON object over several lines; expected a JSON array of rows "
            "or one JSON object per line (JSONL)",
            name,
        )


# ---------------------------------------------------------------------------------------------------
# Field checks


def require_text(value: Any, loc: str, fld: str, *, allow_empty: bool = False) -> str:
    """``value`` if it is a usable string; otherwise a :class:`DataError` naming ``loc`` and ``fld``."""
    if value is MISSING:
        raise DataError("missing", loc, fld)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {json_type(value)}", loc, fld)
    if not allow_empty and not value.strip():
        raise DataError("empty" if not value else "empty (whitespace only)", loc, fld)
    bad = _SURROGATE.search(value)
    if bad:
        raise DataError(f"contains an unpaired surrogate U+{ord(bad.group()):04X} at {bad.start()}", loc, fld)
    return value


def _absent(value: Any) -> bool:
    return value is MISSING or value is None or (isinstance(value, str) and not value.strip())


def _get(row: dict, key: str | None) -> Any:
    return MISSING if key is None else row.get(key, MISSING)


def _tools(value: Any, loc: str, fld: str, *, unwrap: bool = False) -> list:
    if isinstance(value, str):
        # sharegpt exports (LLaMA-Factory) keep tools as a JSON string.
        parsed, reason, _ = _parse_json(value)
        if reason is not None:
            raise DataError(f"tools given as a string must be JSON: {reason}", loc, fld)
        value = parsed
    if not isinstance(value, list):
        raise DataError(f"expected a list of tool definitions, got {json_type(value)}", loc, fld)
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise DataError(f"expected a tool definition (object), got {json_type(tool)}", loc, f"{fld}[{i}]")
        if unwrap and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            # OpenAI wraps each definition as {"type": "function", "function": {...}}; ChatGLM3 doesn't.
            tool = tool["function"]
        out.append(tool)
    return out


def _history(row: dict, key: str | None, loc: str) -> list[tuple[str, dict]]:
    value = _get(row, key)
    if value is MISSING or value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"expected a list of [question, answer] pairs, got {json_type(value)}", loc, key)
    out = []
    for i, pair in enumerate(value):
        fld = f"{key}[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            got = f"a list of {len(pair)}" if isinstance(pair, list) else json_type(pair)
            raise DataError(f"expected a [question, answer] pair, got {got}", loc, fld)
        out.append((fld, {"role": "user", "content": require_text(pair[0], loc, f"{fld}[0]")}))
        out.append((fld, {"role": "assistant", "content": require_text(pair[1], loc, f"{fld}[1]")}))
    return out


def _message(m: Any, loc: str, fld: str, spec: _Roles) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"expected a message object, got {json_type(m)}", loc, fld)
    role_key, content_key = spec.role_key, spec.content_key
    raw_role = m.get(role_key, MISSING)
    if raw_role is MISSING:
        raise DataError("missing", loc, f"{fld}.{role_key}")
    if not isinstance(raw_role, str):
        raise DataError(f"expected a string, got {json_type(raw_role)}", loc, f"{fld}.{role_key}")
    role = spec.names.get(raw_role.strip().lower())
    if role is None:
        raise DataError(
            f"unknown {spec.what} {show_value(raw_role)} (expected {spec.expected})", loc, f"{fld}.{role_key}"
        )

    tools = m.get("tools")
    has_tools = isinstance(tools, list) and len(tools) > 0
    content = m.get(content_key, MISSING)
    if content is None and isinstance(m.get("tool_calls"), list):
        raise DataError(
            "expected a string, got null (OpenAI tool_calls are not supported: give the call as the content)",
            loc,
            f"{fld}.{content_key}",
        )
    # A system message that only carries tool definitions needs no text of its own.
    allow_empty = role == "system" and has_tools
    if allow_empty and (content is MISSING or content is None):
        content = ""
    msg = {
        "role": role,
        "content": require_text(content, loc, f"{fld}.{content_key}", allow_empty=allow_empty),
    }

    if tools is not None and tools != []:
        if role != "system":
            raise DataError(
                f"only a system message may carry tools (this one is {role})", loc, f"{fld}.tools"
            )
        msg["tools"] = _tools(tools, loc, f"{fld}.tools")
    metadata = m.get("metadata")
    # ChatGLM3's own chat history writes metadata "" on every message: that means "none".
    if metadata is not None and metadata != "":
        if not isinstance(metadata, str):
            raise DataError(
                f"expected a string (a tool name), got {json_type(metadata)}", loc, f"{fld}.metadata"
            )
        if role != "assistant":
            raise DataError(
                f"only an assistant message may carry metadata (this one is {role})", loc, f"{fld}.metadata"
            )
        if metadata.strip():
            msg["metadata"] = require_text(metadata, loc, f"{fld}.metadata")
    return msg


def _check_order(items: list[tuple[str, dict]], loc: str, container: str, require_reply: bool) -> list[dict]:
    """Validate the chat order; ``items`` are (field of the message's role, message)."""
    if not items:
        raise DataError("no messages", loc, container)
    prev = None
    for i, (fld, msg) in enumerate(items):
        role = msg["role"]
        if role == "system" and i > 0:
            raise DataError("a system message may only come first (at most one per conversation)", loc, fld)
        allowed = _NEXT_ROLES[prev]
        if role == "assistant" and prev == "assistant" and "metadata" not in msg:
            # Two replies in a row only make sense as a reply followed by a tool call.
            allowed = ("user", "observation")
        if role not in allowed:
            where = (
                "first"
                if prev is None
                else ("after the system message" if prev == "system" else f"after {prev}")
            )
            raise DataError(f"expected {' or '.join(allowed)} {where}, got {role}", loc, fld)
        prev = role
    if prev == "system":
        raise DataError("no user message", loc, container)
    if require_reply and prev != "assistant":
        raise DataError(
            f"the last message must be an assistant reply (the training target), got {prev}; "
            "use require_reply=False for prompt-only data",
            loc,
            items[-1][0],
        )
    return [msg for _, msg in items]


# ---------------------------------------------------------------------------------------------------
# Per-format normalisers: (location, row, columns, require_reply) -> messages


def _reply(row: dict, key: str, loc: str, require_reply: bool) -> list[tuple[str, dict]]:
    value = _get(row, key)
    if not require_reply and _absent(value):
        return []
    return [(key, {"role": "assistant", "content": require_text(value, loc, key)})]


def _norm_context_target(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    items = [
        (
            cols["context"],
            {"role": "user", "content": require_text(_get(row, cols["context"]), loc, cols["context"])},
        )
    ]
    items += _reply(row, cols["target"], loc, require_reply)
    return _check_order(items, loc, cols["context"], require_reply)


def _norm_alpaca(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    items: list[tuple[str, dict]] = []
    system = _get(row, cols["system"])
    if not _absent(system):
        items.append(
            (cols["system"], {"role": "system", "content": require_text(system, loc, cols["system"])})
        )
    items += _history(row, cols["history"], loc)
    user = require_text(_get(row, cols["instruction"]), loc, cols["instruction"])
    extra = _get(row, cols["input"])
    if extra is not MISSING and extra is not None:
        extra = require_text(extra, loc, cols["input"], allow_empty=True)
        if extra.strip():
            user = f"{user}\n{extra}"
    items.append((cols["instruction"], {"role": "user", "content": user}))
    items += _reply(row, cols["output"], loc, require_reply)
    return _check_order(items, loc, cols["instruction"], require_reply)


def _norm_prompt_response(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    items = _history(row, cols["history"], loc)
    items.append(
        (
            cols["prompt"],
            {"role": "user", "content": require_text(_get(row, cols["prompt"]), loc, cols["prompt"])},
        )
    )
    items += _reply(row, cols["response"], loc, require_reply)
    return _check_order(items, loc, cols["prompt"], require_reply)


def _message_list(row: dict, key: str, loc: str) -> list:
    value = _get(row, key)
    if value is MISSING:
        raise DataError("missing", loc, key)
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {json_type(value)}", loc, key)
    if not value:
        raise DataError("no messages", loc, key)
    return value


def _norm_conversations(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    key = cols["conversations"]
    items = []
    for i, m in enumerate(_message_list(row, key, loc)):
        fld = f"{key}[{i}]"
        items.append((f"{fld}.role", _message(m, loc, fld, _CHATGLM3)))
    return _check_order(items, loc, key, require_reply)


def _attach_tools(items: list[tuple[str, dict]], tools: list, fld: str) -> None:
    if tools and items and items[0][1]["role"] == "system":
        items[0][1]["tools"] = tools
    elif tools:
        items.insert(0, (fld, {"role": "system", "content": "", "tools": tools}))


def _norm_messages(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    key = cols["messages"]
    items = []
    for i, m in enumerate(_message_list(row, key, loc)):
        fld = f"{key}[{i}]"
        items.append((f"{fld}.role", _message(m, loc, fld, _OPENAI)))
    tools = _get(row, cols["tools"])
    if not _absent(tools):
        # OpenAI puts tool definitions beside the messages; ChatGLM3 wants them on the system message.
        if items[0][1]["role"] == "system" and "tools" in items[0][1]:
            raise DataError("tools given both here and on the system message", loc, cols["tools"])
        _attach_tools(items, _tools(tools, loc, cols["tools"], unwrap=True), cols["tools"])
    return _check_order(items, loc, key, require_reply)


def _norm_sharegpt(loc: str, row: dict, cols: dict, require_reply: bool) -> list[dict]:
    key = cols["conversations"]
    items = []
    for i, m in enumerate(_message_list(row, key, loc)):
        fld = f"{key}[{i}]"
        msg = _message(m, loc, fld, _SHAREGPT)
        if m["from"].strip().lower() == "function_call":
            call, reason, _ = _parse_json(msg["content"])
            if (
                reason is None
                and isinstance(call, dict)
                and isinstance(call.get("name"), str)
                and call["name"]
            ):
                msg.setdefault("metadata", call["name"])
        items.append((f"{fld}.from", msg))
    system = _get(row, cols["system"])
    if not _absent(system):
        if items[0][1]["role"] == "system":
            raise DataError("a system prompt given both here and in the conversation", loc, cols["system"])
        items.insert(
            0, (cols["system"], {"role": "system", "content": require_text(system, loc, cols["system"])})
        )
    tools = _get(row, cols["tools"])
    if not _absent(tools):
        _attach_tools(items, _tools(tools, loc, cols["tools"], unwrap=True), cols["tools"])
    return _check_order(items, loc, key, require_reply)


_NORMALISERS = {
    "context_target": _norm_context_target,
    "alpaca": _norm_alpaca,
    "prompt_response": _norm_prompt_response,
    "conversations": _norm_conversations,
    "sharegpt": _norm_sharegpt,
    "messages": _norm_messages,
}


# ---------------------------------------------------------------------------------------------------
# Format and columns


def _resolve_format(fmt: str) -> str | None:
    if fmt == "auto":
        return None
    if isinstance(fmt, str):
        name = fmt.strip().lower().replace("-", "_")
        name = FORMAT_ALIASES.get(name, name)
        if name in FORMATS:
            return name
    raise DataError(f"unknown format {show_value(fmt)}; expected auto or one of {', '.join(FORMATS)}")


def _parse_columns(columns: Mapping[str, str | None] | None) -> dict[str, str | None]:
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise DataError(
            f"columns must be a mapping of column roles to key names, got {type(columns).__name__}"
        )
    out: dict[str, str | None] = {}
    for key, value in columns.items():
        # ChatGLM2's P-Tuning scripts call them prompt_column / response_column / history_column.
        name = key[: -len("_column")] if isinstance(key, str) and key.endswith("_column") else key
        if name not in KNOWN_COLUMNS:
            raise DataError(f"unknown column {show_value(key)}; known: {', '.join(KNOWN_COLUMNS)}")
        if value is None and name in _REQUIRED_COLUMNS:
            raise DataError(f"column {show_value(key)} is required and cannot be switched off")
        if value is not None and (not isinstance(value, str) or not value):
            raise DataError(
                f"column {show_value(key)} must name a key (a non-empty string), got {show_value(value)}"
            )
        out[name] = value
    return out


def _columns(fmt: str, overrides: Mapping[str, str | None]) -> dict[str, str | None]:
    cols = dict(_DEFAULT_COLUMNS[fmt])
    cols.update((k, v) for k, v in overrides.items() if k in cols)
    return cols


def _detect(row: dict, overrides: Mapping[str, str | None], require_reply: bool) -> str | None:
    def matches(fmt: str) -> bool:
        cols = _columns(fmt, overrides)
        if fmt in ("conversations", "sharegpt"):
            value = row.get(cols["conversations"], MISSING)
            if value is MISSING:
                return False
            first = next((m for m in value if isinstance(m, dict)), None) if isinstance(value, list) else None
            is_sharegpt = first is not None and ("from" in first or "value" in first) and "role" not in first
            return is_sharegpt == (fmt == "sharegpt")
        if fmt == "messages":
            return cols["messages"] in row
        if fmt == "alpaca":
            return cols["instruction"] in row
        if fmt == "context_target":
            return cols["context"] in row
        return cols["prompt"] in row and (cols["response"] in row or not require_reply)

    order = ["conversations", "sharegpt", "messages", "alpaca", "context_target", "prompt_response"]
    # Columns the user named point at the format they mean, ahead of the built-in order.
    order.sort(key=lambda fmt: not any(k in _DEFAULT_COLUMNS[fmt] for k in overrides))
    return next((fmt for fmt in order if matches(fmt)), None)


# ---------------------------------------------------------------------------------------------------
# Public API


def read_examples(
    path: str | os.PathLike,
    fmt: str = "auto",
    columns: Mapping[str, str | None] | None = None,
    skip_invalid: bool = False,
    require_reply: bool = True,
) -> ReadResult:
    """Read a data file into normalised :class:`Example` s.

    ``fmt``: ``"auto"`` (from the first row's keys) or one of :data:`FORMATS`. ``columns`` renames
    keys, e.g. ``{"prompt": "question", "response": "answer", "history": "turns"}`` (the
    ``prompt_column`` spelling works too). ``require_reply=False`` accepts prompt-only rows (no reply,
    or a conversation ending with a user / observation message) for inference.

    The first invalid row raises :class:`DataError`; with ``skip_invalid=True`` invalid rows are left
    out and listed in ``ReadResult.skipped`` instead. A file with no rows at all, or with no valid
    row, raises either way.
    """
    name = str(path)
    overrides = _parse_columns(columns)
    fmt_name = _resolve_format(fmt)
    skipped: list[DataError] = []
    examples: list[Example] = []
    undetected: DataError | None = None
    n_rows = 0
    for loc, row in iter_raw_rows(path, on_error=skipped.append if skip_invalid else None):
        n_rows += 1
        if fmt_name is None:
            fmt_name = _detect(row, overrides, require_reply)
            if fmt_name is None:
                keys = [str(k) for k in row][:12]
                err = DataError(
                    "cannot detect the format",
                    loc,
                    message=f"cannot detect the format of {loc}: keys {show_value(keys, 200)}; name it with fmt= "
                    f"(one of {', '.join(FORMATS)}) or map its keys with columns=",
                )
                if not skip_invalid:
                    raise err
                undetected = undetected or err
                skipped.append(err)
                continue
        try:
            messages = _NORMALISERS[fmt_name](loc, row, _columns(fmt_name, overrides), require_reply)
        except DataError as err:
            if not skip_invalid:
                raise
            skipped.append(err)
            continue
        examples.append(Example(messages=messages, source=loc))
    if not examples:
        if n_rows == 0 and not skipped:
            raise DataError(f"no examples in {name}")
        if fmt_name is None and undetected is not None:
            raise undetected
        raise DataError(
            f"no valid examples in {name}: all {len(skipped)} rows are invalid; the first: {skipped[0]}"
        )
    return ReadResult(examples=examples, skipped=skipped, format=fmt_name or "")


def to_conversations_row(example: Example) -> dict:
    """The ChatGLM3 ``{"conversations": [...]}`` row for an example (messages copied, keys ordered)."""
    out = []
    for m in example.messages:
        msg = {"role": m["role"], "content": m["content"]}
        msg.update((k, v) for k, v in m.items() if k not in msg)
        out.append(msg)
    return {"conversations": out}
