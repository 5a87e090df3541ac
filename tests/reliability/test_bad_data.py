"""Bad data: every reader format and the chat-log import fed hostile files.

Random bytes, truncated JSON, wrong types, huge fields (1 MB strings), deep nesting, mixed encodings
(UTF-8, UTF-8 with BOM, GBK, UTF-16 with and without BOM, one encoding per line) and empty files.
Only the documented :class:`DataError` may come out, or a valid result. Figure: cases tried and
crashes (anything else raised); the goal is 0 crashes.

The fast tests run ~300 cases in all; the ``slow`` ones many more (``pytest -m slow``).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from glmtune.data import FORMATS, DataError, import_chats, read_examples

from .conftest import CaseTimeout, time_limit

READER_FORMATS = ("auto", *FORMATS)
MB = 1 << 20

# ------------------------------------------------------------------------------------- strategies
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=6,
)
# Huge fields: built by repetition (hypothesis would take ages drawing a megabyte of text).
huge_text = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "中", "\U0001f600", "a\n", " ", "\\"]),
    st.sampled_from([MB, MB // 3 + 1, 100_000]),
)


def _nested(depth: int, leaf) -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# Nesting up to and past the interpreter's recursion limit (the JSON parser's and encoder's).
deep = st.builds(_nested, st.sampled_from([50, 500, 900, 990, 1200, 5000]), st.just("x"))
short = st.text(min_size=1, max_size=6)
loose = st.one_of(short, short, short, st.text(max_size=6), json_values, json_values)
role = st.sampled_from(["user", "assistant", "system", "observation", "tool", "function", "bot", ""])
sender = st.sampled_from(["human", "gpt", "system", "function_call", "observation", "x"])
message = st.one_of(
    st.fixed_dictionaries(
        {"role": role, "content": loose},
        optional={"metadata": loose, "tools": st.lists(json_values | deep, max_size=2) | loose},
    ),
    st.fixed_dictionaries({"from": sender | loose, "value": loose}),
    json_values,
)
messages = st.lists(message, max_size=4) | loose
row = st.one_of(
    st.fixed_dictionaries({"context": loose, "target": loose}),
    st.fixed_dictionaries(
        {"instruction": loose, "output": loose},
        optional={"input": loose, "system": loose, "history": st.lists(st.lists(loose, max_size=3)) | loose},
    ),
    st.fixed_dictionaries({"content": loose, "summary": loose}, optional={"history": loose}),
    st.fixed_dictionaries({"conversations": messages}, optional={"system": loose, "tools": loose}),
    st.fixed_dictionaries({"messages": messages}, optional={"tools": loose}),
    st.dictionaries(st.text(max_size=12), json_values, max_size=4),
    json_values,
)
# A chat-log message with the keys exporters use, given right (mostly) or wrong types.
good_chat_message = st.fixed_dictionaries(
    {
        "sender": st.sampled_from(["A", "me"]),
        "text": short,
        "time": st.integers(1_700_000_000, 1_700_000_000 + 20_000),
    },
    optional={"is_me": st.booleans()},
)
bad_chat_message = st.fixed_dictionaries(
    {},
    optional={
        "sender": st.sampled_from(["A", "me", "张三"]) | loose,
        "talker": st.sampled_from(["wxid_a"]) | loose,
        "text": st.text(max_size=6) | loose,
        "content": st.text(max_size=6) | loose,
        "time": st.sampled_from(["2024-03-01T09:00:00", "2024-03-01T09:05:00Z", "9999-99-99"])
        | st.integers()
        | st.floats()
        | loose,
        "create_time": st.integers(0, 10**13) | loose,
        "is_me": st.sampled_from([True, False, 0, 1, "yes", "x"]) | loose,
        "isSend": st.sampled_from([0, 1]) | loose,
    },
)
chat_message = st.one_of(*[good_chat_message] * 6, bad_chat_message)
BIG_KEYS = ["context", "target", "output", "conversations", "messages", "tools", "text", "is_me", "time"]
ENCODINGS = ["utf-8", "utf-8", "utf-8-sig", "gbk", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"]
EMPTY = [
    b"",
    b" ",
    b"\n\n\n",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xfe\xff",
    b"[]",
    b"{}",
    b"[{}]",
    b"null",
    b"\x00",
]


def _dumps(value, ensure_ascii: bool) -> str:
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii)
    except (RecursionError, ValueError):
        return "[" * 5000


def _encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


@st.composite
def file_bytes(draw, row_strategy=row) -> bytes:
    """The bytes of one data file: JSONL or a JSON array, then damaged one way or another."""
    kind = draw(
        st.sampled_from(["rows", "rows", "rows", "truncated", "random", "empty", "mixed", "huge", "deep"])
    )
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return draw(st.sampled_from(EMPTY))
    rows = draw(st.lists(row_strategy, min_size=1, max_size=4))
    if kind in ("huge", "deep"):  # one field of one row becomes a 1 MB string or a deep nest
        big = draw(huge_text if kind == "huge" else deep)
        target = draw(st.sampled_from(rows))
        if isinstance(target, dict) and target:
            target[draw(st.sampled_from(sorted(target)))] = big
        else:
            rows.append({draw(st.sampled_from(BIG_KEYS)): big})
    ascii_ = draw(st.booleans())
    if kind == "mixed":  # one encoding per line (files joined with cat)
        return b"\n".join(_encode(_dumps(r, False), draw(st.sampled_from(ENCODINGS))) for r in rows)
    if draw(st.booleans()):
        text = "\n".join(_dumps(r, ascii_) for r in rows) + draw(st.sampled_from(["", "\n", "\r\n", "\n\n"]))
    else:
        text = _dumps(rows, ascii_)
    data = _encode(text, draw(st.sampled_from(ENCODINGS)))
    if kind == "truncated" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


# ------------------------------------------------------------------------------------------- tally
class Tally:
    """Counts the cases tried and the crashes (any exception other than DataError), keeping the first."""

    def __init__(self, name: str):
        self.name, self.tried, self.data_errors, self.valid, self.crashes = name, 0, 0, 0, []
        self.seed = None

    def run(self, fn, describe):
        self.tried += 1
        try:
            with time_limit(30):  # a hang (say, a regex gone quadratic on 1 MB) is a crash too
                result = fn()
        except CaseTimeout as e:
            self.crashes.append(f"{describe()}: {e}")
            raise AssertionError(self.crashes[-1]) from None
        except DataError:
            self.data_errors += 1
            return None
        except Exception as e:  # a crash: recorded, then re-raised so hypothesis shrinks it
            self.crashes.append(f"{describe()}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
            raise
        self.valid += 1
        return result

    def report(self) -> str:
        return (
            f"[figure] {self.name}: {self.tried} cases tried, {len(self.crashes)} crashes "
            f"({self.data_errors} DataError, {self.valid} valid results)"
            + (f", seed {self.seed}" if self.seed is not None else ", derandomized")
        )


def check_valid(result, require_reply: bool) -> None:
    assert result.examples, "a result without examples must be a DataError"
    for ex in result.examples:
        assert ex.messages
        if require_reply:
            assert ex.messages[-1]["role"] == "assistant"
        for m in ex.messages:
            assert m["role"] in ("system", "user", "assistant", "observation")
            assert isinstance(m["content"], str)
        assert all(m["role"] != "system" for m in ex.messages[1:])
    assert all(isinstance(e, DataError) for e in result.skipped)


def _settings(n: int, tally: Tally):
    """The default run is reproducible (derandomized); the long one explores from a fresh seed, which
    the figure names (RELIABILITY_SEED=<seed> replays it)."""
    explore = n >= 1000
    config = settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=not explore,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    if not explore:
        return config
    tally.seed = int(os.environ.get("RELIABILITY_SEED") or int.from_bytes(os.urandom(4), "big"))
    return lambda fn: seed(tally.seed)(config(fn))


# ------------------------------------------------------------------------------------------- cases
columns = st.none() | st.sampled_from(
    [
        {"prompt": "q", "response": "a"},
        {"prompt_column": "content"},
        {"context": None},
        {"bogus": "x"},
        {"target": 3},
    ]
)


def fuzz_readers(tmp_path: Path, n: int) -> Tally:
    tally = Tally(f"readers ({', '.join(READER_FORMATS)})")
    path = tmp_path / "data.json"

    @_settings(n, tally)
    @given(
        data=file_bytes(),
        fmt=st.sampled_from(READER_FORMATS),
        skip=st.booleans(),
        reply=st.booleans(),
        cols=columns,
    )
    def case(data, fmt, skip, reply, cols):
        path.write_bytes(data)
        result = tally.run(
            lambda: read_examples(path, fmt=fmt, columns=cols, skip_invalid=skip, require_reply=reply),
            lambda: (
                f"read_examples(fmt={fmt}, skip_invalid={skip}, require_reply={reply}, columns={cols}) "
                f"on {data[:120]!r}{'...' if len(data) > 120 else ''} ({len(data)} bytes)"
            ),
        )
        if result is not None:
            check_valid(result, reply)

    case()
    return tally


chat_file = st.tuples(
    st.sampled_from(
        ["a.json", "b.jsonl", "张三.json", "a.json", "c_train.json", "x_dev.jsonl", "train.json"]
    ),
    st.one_of(
        # A clean log, and a plausible one (UTF-8, the right keys) with the odd bad message.
        st.builds(
            lambda rows: _dumps(rows, False).encode(), st.lists(good_chat_message, min_size=2, max_size=8)
        ),
        st.builds(lambda rows: _dumps(rows, False).encode(), st.lists(chat_message, min_size=2, max_size=8)),
        file_bytes(row_strategy=chat_message),
        st.builds(lambda rows: _dumps(rows, False).encode(), st.lists(chat_message, max_size=6)),
    ),
)


def fuzz_chat_import(tmp_path: Path, n: int) -> Tally:
    tally = Tally("import_chats")
    counter = iter(range(10**9))

    @_settings(n, tally)
    @given(files=st.lists(chat_file, min_size=0, max_size=3), me=st.sampled_from(["me", "me", None, "A", ""]))
    def case(files, me):
        i = next(counter)
        src, out = tmp_path / f"src{i}", tmp_path / f"out{i}"
        src.mkdir()
        for name, data in files:
            (src / name).write_bytes(data)
        summary = tally.run(
            lambda: import_chats(src, out, me=me),
            lambda: f"import_chats(me={me!r}) on {[(n, d[:80]) for n, d in files]}",
        )
        if summary is not None:
            assert summary["train"] >= 1
            assert len(read_examples(out / "train.json").examples) == summary["train"]
        for p in (*src.iterdir(), *(out.iterdir() if out.exists() else ())):
            os.unlink(p)

    case()
    return tally


def _check(tally: Tally) -> None:
    print(tally.report())
    assert not tally.crashes, tally.crashes[0]


@pytest.mark.parametrize(
    ("target", "n"), [(fuzz_readers, 220), (fuzz_chat_import, 80)], ids=["readers", "chat_import"]
)
def test_bad_data_only_data_error(tmp_path, target, n):
    _check(target(tmp_path, n))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "n"), [(fuzz_readers, 5000), (fuzz_chat_import, 2000)], ids=["readers", "chat_import"]
)
def test_bad_data_only_data_error_long(tmp_path, target, n):
    _check(target(tmp_path, n))


@pytest.mark.parametrize("fmt", READER_FORMATS)
@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "gbk", "utf-16", "utf-16-le", "utf-32"], ids=lambda e: e
)
def test_every_format_and_encoding(tmp_path, fmt, encoding):
    """The same Chinese row in every format and encoding: UTF-8 (with or without BOM) reads, GBK / UTF-16
    / UTF-32 are a DataError naming the file (never a UnicodeDecodeError)."""
    rows = {
        "context_target": {"context": "你好", "target": "北京的秋天很美"},
        "alpaca": {"instruction": "你好", "output": "北京的秋天很美"},
        "prompt_response": {"content": "你好", "summary": "北京的秋天很美"},
        "conversations": {
            "conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]
        },
        "sharegpt": {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "好"}]},
        "messages": {
            "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]
        },
    }
    row = rows["context_target" if fmt == "auto" else fmt]
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(row, ensure_ascii=False).encode(encoding))
    if encoding.startswith("utf-8"):
        assert len(read_examples(path, fmt=fmt).examples) == 1
    else:
        with pytest.raises(DataError, match="data.jsonl"):
            read_examples(path, fmt=fmt)
