"""Data readers: every input format normalised to chat messages, and errors that point at the row."""

from __future__ import annotations

import json
import pickle
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.data import (
    DataError,
    Example,
    iter_raw_rows,
    read_examples,
    to_conversations_row,
    write_jsonl_atomic,
)

from conftest import shared_path


def write_jsonl(path, rows, *, bom=False, newline="\n"):
    text = newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def write_array(path, rows, *, bom=False):
    text = json.dumps(rows, ensure_ascii=False, indent=1)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def first_jsonl_row(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


def error_of(path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_examples(path, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "count"), [("mixed_train_dataset.jsonl", 902), ("mixed_dev_dataset.jsonl", 122)]
)
def test_context_target_real(name, count):
    path = shared_path("data", "mixed_extraction_classification", name)
    result = read_examples(path)
    assert result.format == "context_target"
    assert len(result.examples) == count and result.skipped == []
    raw = first_jsonl_row(path)
    first = result.examples[0]
    assert first.source == f"{path}:1"
    assert first.messages == [
        {"role": "user", "content": raw["context"]},
        {"role": "assistant", "content": raw["target"]},
    ]
    assert first.messages[0]["content"].endswith("Answer: ")


@pytest.mark.shared
def test_alpaca_real():
    path = shared_path("data", "alpaca_zh", "alpaca_zh_4k.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(raw) == 4000
    # Four rows of this sample have an empty output: no training target, so they are invalid.
    empty = [i for i, r in enumerate(raw) if not r["output"].strip()]
    assert empty == [284, 1223, 1347, 1736]
    assert error_of(path) == f"{path}[284].output: empty"

    result = read_examples(path, skip_invalid=True)
    assert result.format == "alpaca"
    assert len(result.examples) + len(result.skipped) == 4000
    assert len(result.examples) == 3996
    assert [e.location for e in result.skipped] == [f"{path}[{i}]" for i in empty]
    assert all(e.field == "output" for e in result.skipped)
    assert result.examples[0].source == f"{path}[0]"
    assert result.examples[0].messages == [
        {"role": "user", "content": raw[0]["instruction"]},
        {"role": "assistant", "content": raw[0]["output"]},
    ]
    with_input = next(i for i, r in enumerate(raw) if r["input"].strip())
    by_source = {e.source: e for e in result.examples}
    assert by_source[f"{path}[{with_input}]"].messages[0]["content"] == (
        raw[with_input]["instruction"] + "\n" + raw[with_input]["input"]
    )

    prompts = read_examples(path, require_reply=False)
    assert len(prompts.examples) == 4000
    assert prompts.examples[284].messages == [
        {"role": "user", "content": raw[284]["instruction"] + "\n" + raw[284]["input"]}
    ]


@pytest.mark.shared
def test_advertisegen_real_jsonl_named_json():
    path = shared_path("data", "advertisegen", "dev.json")
    result = read_examples(path)
    assert result.format == "prompt_response"
    assert len(result.examples) == 1070
    raw = first_jsonl_row(path)
    assert result.examples[0].source == f"{path}:1"
    assert result.examples[0].messages == [
        {"role": "user", "content": raw["content"]},
        {"role": "assistant", "content": raw["summary"]},
    ]
    rows = list(iter_raw_rows(path))
    assert len(rows) == 1070 and rows[-1][0] == f"{path}:1070"
    # The same file read with the ChatGLM2 P-Tuning column spelling.
    named = read_examples(
        path, fmt="prompt_response", columns={"prompt_column": "content", "response_column": "summary"}
    )
    assert named.examples[5].messages == result.examples[5].messages


# --------------------------------------------------------------------------------------------------
# Synthetic formats

TOOLS = [
    {
        "name": "get_weather",
        "description": "查询城市天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def test_chatglm3_conversations_with_tools(tmp_path):
    row = {
        "conversations": [
            {
                "role": "system",
                "content": "Answer the following questions as best as you can.",
                "tools": TOOLS,
            },
            {"role": "user", "content": "北京今天天气怎么样？"},
            {
                "role": "assistant",
                "metadata": "get_weather",
                "content": "```python\ntool_call(city='北京')\n```",
            },
            {"role": "observation", "content": '{"temperature": 21, "weather": "晴"}'},
            {"role": "assistant", "metadata": "", "content": "北京今天晴，21 度。"},
            {"role": "user", "content": "谢谢"},
            {"role": "assistant", "content": "不客气！"},
        ]
    }
    result = read_examples(write_jsonl(tmp_path / "train.json", [row, row]))
    assert result.format == "conversations"
    msgs = result.examples[1].messages
    assert result.examples[1].source == f"{tmp_path / 'train.json'}:2"
    assert msgs[0] == {"role": "system", "content": row["conversations"][0]["content"], "tools": TOOLS}
    assert msgs[2] == {
        "role": "assistant",
        "content": "```python\ntool_call(city='北京')\n```",
        "metadata": "get_weather",
    }
    assert msgs[4] == {"role": "assistant", "content": "北京今天晴，21 度。"}  # empty metadata means none
    assert [m["role"] for m in msgs] == [
        "system",
        "user",
        "assistant",
        "observation",
        "assistant",
        "user",
        "assistant",
    ]
    assert to_conversations_row(result.examples[0]) == {"conversations": [dict(m) for m in msgs]}


def test_chatglm3_tool_role_alias_and_tools_only_system(tmp_path):
    row = {
        "conversations": [
            {"role": "system", "tools": TOOLS},
            {"role": "user", "content": "上海呢？"},
            {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='上海')"},
            {"role": "tool", "content": "多云"},
            {"role": "assistant", "content": "上海多云。"},
        ]
    }
    msgs = read_examples(write_jsonl(tmp_path / "a.jsonl", [row])).examples[0].messages
    assert msgs[0] == {"role": "system", "content": "", "tools": TOOLS}
    assert msgs[3] == {"role": "observation", "content": "多云"}


def test_reply_then_tool_call_is_a_valid_order(tmp_path):
    roles = [
        ("user", None),
        ("assistant", None),
        ("assistant", "get_weather"),
        ("observation", None),
        ("assistant", None),
    ]
    row = {
        "conversations": [{"role": r, "content": f"m{i}", "metadata": md} for i, (r, md) in enumerate(roles)]
    }
    msgs = read_examples(write_jsonl(tmp_path / "c.jsonl", [row])).examples[0].messages
    assert [m.get("metadata") for m in msgs] == [None, None, "get_weather", None, None]


def test_sharegpt(tmp_path):
    row = {
        "system": "你是一个乐于助人的助手。",
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么可以帮你？"},
            {"from": "human", "value": "查一下杭州天气"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "杭州"}}'},
            {"from": "observation", "value": "小雨"},
            {"from": "gpt", "value": "杭州在下小雨。"},
        ],
        "tools": json.dumps(TOOLS, ensure_ascii=False),
    }
    result = read_examples(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert result.format == "sharegpt"
    assert result.examples[0].messages == [
        {"role": "system", "content": "你是一个乐于助人的助手。", "tools": TOOLS},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "查一下杭州天气"},
        {"role": "assistant", "content": row["conversations"][3]["value"], "metadata": "get_weather"},
        {"role": "observation", "content": "小雨"},
        {"role": "assistant", "content": "杭州在下小雨。"},
    ]


def test_openai_messages_array(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "get_weather(city='Paris')"},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ],
            "tools": [{"type": "function", "function": TOOLS[0]}],
        },
    ]
    path = write_array(tmp_path / "openai.json", rows)
    result = read_examples(path)
    assert result.format == "messages"
    assert [e.source for e in result.examples] == [f"{path}[0]", f"{path}[1]"]
    assert result.examples[0].messages == rows[0]["messages"]
    assert result.examples[1].messages == [
        {"role": "system", "content": "", "tools": TOOLS},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "get_weather(city='Paris')"},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]


def test_alpaca_with_system_and_history(tmp_path):
    row = {
        "system": "你是翻译。",
        "history": [["hello", "你好"], ["thanks", "谢谢"]],
        "instruction": "翻译成中文",
        "input": "good morning",
        "output": "早上好",
    }
    msgs = read_examples(write_jsonl(tmp_path / "al.jsonl", [row])).examples[0].messages
    assert msgs == [
        {"role": "system", "content": "你是翻译。"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "你好"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "谢谢"},
        {"role": "user", "content": "翻译成中文\ngood morning"},
        {"role": "assistant", "content": "早上好"},
    ]


def test_prompt_response_custom_columns_with_history(tmp_path):
    rows = [
        {"q": "再说一遍", "a": "好的", "turns": [["你好", "你好呀"]]},
        {"q": "只有问题", "a": "答", "turns": None},
    ]
    result = read_examples(
        write_jsonl(tmp_path / "qa.jsonl", rows), columns={"prompt": "q", "response": "a", "history": "turns"}
    )
    assert result.format == "prompt_response"
    assert [m["content"] for m in result.examples[0].messages] == ["你好", "你好呀", "再说一遍", "好的"]
    assert [m["role"] for m in result.examples[1].messages] == ["user", "assistant"]


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("layout", ["jsonl", "jsonl-crlf", "array"])
def test_bom_and_layouts_give_the_same_examples(tmp_path, bom, layout):
    rows = [{"context": f"问题{i}\nAnswer: ", "target": f"答案{i}"} for i in range(3)]
    path = tmp_path / "d.json"
    if layout == "array":
        write_array(path, rows, bom=bom)
        sources = [f"{path}[{i}]" for i in range(3)]
    else:
        write_jsonl(path, rows, bom=bom, newline="\r\n" if layout == "jsonl-crlf" else "\n")
        sources = [f"{path}:{i}" for i in (1, 2, 3)]
    result = read_examples(path)
    assert [e.source for e in result.examples] == sources
    assert [e.messages[1]["content"] for e in result.examples] == ["答案0", "答案1", "答案2"]


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '\n{"context": "a", "target": "b"}\n   \n{"context": "c", "target": "d"}\n\n', encoding="utf-8"
    )
    assert [e.source for e in read_examples(path).examples] == [f"{path}:2", f"{path}:4"]


def test_explicit_format_and_aliases(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    assert read_examples(path, fmt="openai").format == "messages"
    assert 'unknown format "csv"' in error_of(path, fmt="csv")
    assert 'unknown column "prompt_col"' in error_of(path, columns={"prompt_col": "x"})


def test_prompt_only_mode(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"conversations": [{"role": "user", "content": "你好"}]},
            {
                "conversations": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
        ],
    )
    assert "the last message must be an assistant reply" in error_of(path)
    result = read_examples(path, require_reply=False)
    assert [len(e.messages) for e in result.examples] == [1, 3]
    ctx = write_jsonl(tmp_path / "c.jsonl", [{"context": "问题"}])
    assert read_examples(ctx, require_reply=False).examples[0].messages == [
        {"role": "user", "content": "问题"}
    ]


def test_write_jsonl_atomic_round_trip(tmp_path):
    examples = [
        Example([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "在"}], "x:1"),
        Example(
            [
                {"role": "system", "content": "s", "tools": TOOLS},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a", "metadata": "get_weather"},
            ],
            "x:2",
        ),
    ]
    out = tmp_path / "sub" / "train.json"
    assert write_jsonl_atomic(out, (to_conversations_row(e) for e in examples)) == 2
    assert "你好" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    back = read_examples(out)
    assert [e.messages for e in back.examples] == [e.messages for e in examples]
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]

    def failing():
        yield {"conversations": []}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(out, failing())
    assert len(read_examples(out).examples) == 2  # the old file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]  # and no temp file is left


# --------------------------------------------------------------------------------------------------
# Errors: each names the row (line or index) and the field

GOOD_CT = {"context": "c", "target": "t"}


def test_error_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_CT, GOOD_CT, {"context": "c"}])
    assert error_of(path) == f'{path}:3: field "target": missing'


def test_error_invalid_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD_CT) + '\n{"context": "c" "target": "t"}\n', encoding="utf-8")
    assert error_of(path) == f"{path}:2: invalid JSON: Expecting ',' delimiter (column 17)"


def test_error_invalid_json_in_array_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(
        '[\n {"context": "c", "target": "t"},\n {"context": "c",, "target": "t"}\n]\n', encoding="utf-8"
    )
    assert (
        error_of(path)
        == f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 18)"
    )


def test_error_unknown_role_in_array(tmp_path):
    rows = [{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 5
    rows.append(
        {
            "conversations": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "bot", "content": "c"},
            ]
        }
    )
    path = write_array(tmp_path / "train.json", rows)
    assert error_of(path) == (
        f'{path}[5].conversations[2].role: unknown role "bot" (expected system, user, assistant, observation)'
    )


def test_error_unknown_sharegpt_sender(tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}],
    )
    assert error_of(path) == (
        f'{path}:1: field "conversations[1].from": unknown sender "robot" '
        "(expected human, gpt, system, function_call, observation)"
    )


def test_error_invalid_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "file.jsonl"
    good = json.dumps(GOOD_CT).encode()
    path.write_bytes(b"\n".join([good] * 8 + [b'{"context": "\xb2", "target": "t"}', good]) + b"\n")
    assert error_of(path) == f"{path}:9: not valid UTF-8 (byte 0xb2 at offset 13)"
    result = read_examples(path, skip_invalid=True)
    assert len(result.examples) == 9 and [e.location for e in result.skipped] == [f"{path}:9"]


def test_error_invalid_utf8_in_array_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n {"context": "c", "target": "t"},\n {"context": "\xe4\xbd", "target": "t"}\n]')
    assert error_of(path) == f"{path}:3: not valid UTF-8 (byte 0xe4 at offset 14)"


def test_error_utf16(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes(json.dumps(GOOD_CT).encode("utf-16"))
    assert "UTF-16" in error_of(path)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("  \n\t", "empty (whitespace only)"),
        (42, "expected a string, got number"),
        (None, "expected a string, got null"),
        (["a"], "expected a string, got list"),
    ],
)
def test_error_bad_content(tmp_path, value, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_CT, {"context": "c", "target": value}])
    assert error_of(path) == f'{path}:2: field "target": {reason}'


@pytest.mark.parametrize(
    ("roles", "field", "reason"),
    [
        (["user", "user"], "conversations[1].role", "expected assistant after user, got user"),
        (
            ["user", "assistant", "system", "user", "assistant"],
            "conversations[2].role",
            "a system message may only come first (at most one per conversation)",
        ),
        (["assistant", "user"], "conversations[0].role", "expected system or user first, got assistant"),
        (
            ["system", "assistant"],
            "conversations[1].role",
            "expected user after the system message, got assistant",
        ),
        (
            ["user", "observation", "assistant"],
            "conversations[1].role",
            "expected assistant after user, got observation",
        ),
        (
            ["user", "assistant", "observation", "user"],
            "conversations[3].role",
            "expected assistant after observation, got user",
        ),
        (
            ["user", "assistant", "assistant"],
            "conversations[2].role",
            "expected user or observation after assistant, got assistant",
        ),
        (
            ["user", "assistant", "user"],
            "conversations[2].role",
            "the last message must be an assistant reply (the training target), got user; "
            "use require_reply=False for prompt-only data",
        ),
    ],
)
def test_error_role_order(tmp_path, roles, field, reason):
    row = {"conversations": [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    assert error_of(path) == f'{path}:1: field "{field}": {reason}'


def test_error_fields_of_messages(tmp_path):
    def err(msgs, **kw):
        return error_of(write_jsonl(tmp_path / "c.jsonl", [{"conversations": msgs}]), **kw)

    u, a = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    path = tmp_path / "c.jsonl"
    assert err([{"role": "user", "content": "u", "metadata": "f"}, a]) == (
        f'{path}:1: field "conversations[0].metadata": only an assistant message may carry metadata (this one is user)'
    )
    assert err([{"role": "user", "content": "u", "tools": TOOLS}, a]) == (
        f'{path}:1: field "conversations[0].tools": only a system message may carry tools (this one is user)'
    )
    assert err([{"role": "system", "content": "s", "tools": {"name": "x"}}, u, a]) == (
        f'{path}:1: field "conversations[0].tools": expected a list of tool definitions, got object'
    )
    assert err([u, {"role": "assistant"}]) == f'{path}:1: field "conversations[1].content": missing'
    assert err([u, "hello"]) == f'{path}:1: field "conversations[1]": expected a message object, got string'
    assert err([]) == f'{path}:1: field "conversations": no messages'
    assert err([{"content": "x"}, a]) == f'{path}:1: field "conversations[0].role": missing'


def test_error_history_pair(tmp_path):
    path = write_array(
        tmp_path / "h.json", [{"instruction": "i", "output": "o", "history": [["q", "a"], ["q only"]]}]
    )
    assert error_of(path) == f"{path}[0].history[1]: expected a [question, answer] pair, got a list of 1"
    path = write_array(tmp_path / "h.json", [{"instruction": "i", "output": "o", "history": [["q", " "]]}])
    assert error_of(path) == f"{path}[0].history[0][1]: empty (whitespace only)"


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "\xef\xbb\xbf"])
def test_error_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content.encode("latin-1"))
    assert error_of(path) == f"no examples in {path}"


def test_error_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "file.jsonl", [{"question": "q", "answer": "a"}])
    assert error_of(path) == (
        f'cannot detect the format of {path}:1: keys ["question", "answer"]; name it with fmt= '
        "(one of context_target, alpaca, prompt_response, conversations, sharegpt, messages) "
        "or map its keys with columns="
    )
    result = read_examples(path, columns={"prompt": "question", "response": "answer"})
    assert result.format == "prompt_response"


def test_error_row_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD_CT) + '\n["context", "target"]\n', encoding="utf-8")
    assert error_of(path) == f"{path}:2: expected a JSON object, got list"


def test_error_pretty_printed_single_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD_CT, indent=2), encoding="utf-8")
    assert "one JSON object over several lines" in error_of(path)


def test_error_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_skip_invalid_reports_count_and_locations(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(GOOD_CT),
        '{"context": "c", "target": ""}',
        "{not json",
        json.dumps(GOOD_CT),
        '{"context": 5, "target": "t"}',
        "7",
        json.dumps(GOOD_CT),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_examples(path, skip_invalid=True)
    assert [e.source for e in result.examples] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    assert [str(e) for e in result.skipped] == [
        f'{path}:2: field "target": empty',
        f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f'{path}:5: field "context": expected a string, got number',
        f"{path}:6: expected a JSON object, got number",
    ]
    with pytest.raises(DataError, match=r"^.*:2: field \"target\": empty$"):
        read_examples(path)


def test_skip_invalid_with_nothing_valid_raises(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_CT | {"target": ""}] * 3)
    assert error_of(path, skip_invalid=True).startswith(
        f"no valid examples in {path}: all 3 rows are invalid"
    )


def test_data_error_survives_pickling(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"context": "c"}])
    with pytest.raises(DataError) as info:
        read_examples(path)
    back = pickle.loads(pickle.dumps(info.value))
    assert str(back) == str(info.value) and back.field == "target" and back.location == f"{path}:1"
    assert isinstance(back, ValueError)


# --------------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, only DataError or a valid result

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=5,
)
text = st.text(min_size=1, max_size=5)
loose = st.one_of(text, text, json_values)
good_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "user", "assistant", "system", "observation", "tool"]),
        "content": text,
    },
    optional={"metadata": st.sampled_from(["", "get_weather"]), "tools": st.just(TOOLS)},
)
any_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["bot", "", "USER"]) | json_values},
    optional={"content": loose, "metadata": loose, "tools": json_values},
)
messages = st.lists(st.one_of(good_message, good_message, good_message, any_message), max_size=5)
sharegpt_message = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system", "function_call", "observation", "x"]), "value": loose}
)
history = st.lists(st.lists(loose, min_size=2, max_size=2) | json_values, max_size=2) | json_values
row = st.one_of(
    st.fixed_dictionaries({"conversations": messages}),
    st.fixed_dictionaries({"messages": messages}, optional={"tools": st.just(TOOLS) | json_values}),
    st.fixed_dictionaries(
        {"conversations": st.lists(sharegpt_message, max_size=5)}, optional={"system": loose}
    ),
    st.fixed_dictionaries({"context": loose, "target": loose}),
    st.fixed_dictionaries(
        {"instruction": loose, "output": loose},
        optional={"input": loose, "system": loose, "history": history},
    ),
    st.fixed_dictionaries({"content": loose, "summary": loose}),
    st.dictionaries(
        st.sampled_from(["context", "target", "instruction", "output", "conversations", "messages"]),
        json_values,
        max_size=3,
    ),
)


def assert_valid(result):
    for ex in result.examples:
        assert ex.messages and ex.messages[-1]["role"] == "assistant"
        for m in ex.messages:
            assert m["role"] in ("system", "user", "assistant", "observation")
            assert isinstance(m["content"], str)
        assert all(m["role"] != "system" for m in ex.messages[1:])
    assert all(isinstance(e, DataError) for e in result.skipped)


def read_any(path, **kwargs):
    try:
        result = read_examples(path, **kwargs)
    except DataError:
        return
    if kwargs.get("require_reply", True):
        assert_valid(result)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    data=st.binary(max_size=200) | st.sampled_from([b"\xef\xbb\xbf", b"[", b"[[[[[[", b"\xff\xfe{}"]),
    skip=st.booleans(),
)
def test_fuzz_random_bytes(tmp_path, data, skip):
    path = tmp_path / "fuzz.json"
    path.write_bytes(data)
    read_any(path, skip_invalid=skip)
    try:
        list(iter_raw_rows(path, on_error=lambda e: None))
    except DataError:
        pass


@FUZZ
@given(
    rows=st.lists(st.one_of(row, row, row, json_values), max_size=3),
    layout=st.sampled_from(["jsonl", "array"]),
    skip=st.booleans(),
    reply=st.booleans(),
    fmt=st.sampled_from(["auto", "conversations", "alpaca", "sharegpt"]),
    garbage=st.sampled_from(["", "\n{\n", "\n\x00", "\n" + "[" * 3000]),
)
def test_fuzz_random_json_rows(tmp_path, rows, layout, skip, reply, fmt, garbage):
    path = tmp_path / "fuzz.json"
    if layout == "array":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + garbage, encoding="utf-8")
    read_any(path, skip_invalid=skip, require_reply=reply, fmt=fmt)


@FUZZ
@given(text=st.text(alphabet=string.printable + "中文\ufeff\u2028", max_size=60))
def test_fuzz_random_text(tmp_path, text):
    path = tmp_path / "fuzz.jsonl"
    path.write_text(text, encoding="utf-8")
    read_any(path, skip_invalid=True)
