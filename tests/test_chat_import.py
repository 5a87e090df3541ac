"""Chat-log import: per-contact exports merged into ChatGLM3 train / dev files, deterministically."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.data import DataError, import_chats, read_examples

T0 = datetime(2024, 3, 1, 9, 0, 0)


def at(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def write(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def conv(*turns):
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# A plain exporter: sender names and ISO times; "me" is named with me="小明".
ZHANG = [
    {"sender": "张三", "text": "早上好", "time": at(0)},
    {"sender": "张三", "text": "今天有空吗？", "time": at(1)},
    {"sender": "小明", "text": "有的", "time": at(5)},
    {"sender": "小明", "text": "怎么了？", "time": at(6)},
    {"sender": "张三", "text": "一起吃午饭吧", "time": at(10)},
    {"sender": "小明", "text": "好啊，几点？", "time": at(12)},
    {"sender": "张三", "text": "十二点", "time": at(13)},  # left unanswered: trimmed
    # 5 hours later: a new conversation, which I opened (my opener is trimmed).
    {"sender": "小明", "text": "我到了", "time": at(300)},
    {"sender": "张三", "text": "马上来", "time": at(302)},
    {"sender": "小明", "text": "不急", "time": at(303)},
    # The next day: a picture and a question I never answered.
    {"sender": "张三", "text": "", "time": at(1440)},
    {"sender": "张三", "text": "在吗", "time": at(1441)},
    # Two days later: only me.
    {"sender": "小明", "text": "生日快乐！", "time": at(2880)},
]

# A WeChat-style exporter: talker is the contact on every message, isSend marks mine, unix seconds.
LI_T0 = 1709290800
LI = [
    {"talker": "wxid_lisi", "content": "周末去爬山吗？", "create_time": LI_T0, "isSend": 0},
    {"talker": "wxid_lisi", "content": "去！", "create_time": LI_T0 + 30, "isSend": 1},
    {"talker": "wxid_lisi", "content": "几点出发？", "create_time": LI_T0 + 40, "isSend": 1},
    {"talker": "wxid_lisi", "content": None, "create_time": LI_T0 + 50, "isSend": 0, "type": 3},
    {"talker": "wxid_lisi", "content": "早上七点", "create_time": LI_T0 + 100, "isSend": 0},
    {"talker": "wxid_lisi", "content": "好的👌", "create_time": LI_T0 + 130, "isSend": 1},
    # Three hours later: I said good night, they answered, I didn't: no contact -> me exchange.
    {"talker": "wxid_lisi", "content": "晚安", "create_time": LI_T0 + 10930, "isSend": 1},
    {"talker": "wxid_lisi", "content": "晚安～", "create_time": LI_T0 + 10940, "isSend": 0},
]

# Another exporter: from / msg / timestamp in milliseconds, an is_me flag, one row out of order.
WANG_T0 = 1709370000000
WANG = [
    {"from": "王五", "msg": "帮我看下这段代码", "timestamp": WANG_T0, "is_me": False},
    {"from": "me", "msg": "发来看看", "timestamp": WANG_T0 + 60_000, "is_me": True},
    {"from": "me", "msg": "少了个冒号", "timestamp": WANG_T0 + 240_000, "is_me": True},
    {"from": "王五", "msg": "def f()\n    return 1", "timestamp": WANG_T0 + 120_000, "is_me": False},
    {"from": "王五", "msg": "谢谢！", "timestamp": WANG_T0 + 300_000, "is_me": False},
    {"from": "me", "msg": "不客气", "timestamp": WANG_T0 + 310_000, "is_me": True},
]

OLD_TRAIN = [
    conv(("user", "你是谁"), ("assistant", "我是小明")),
    conv(("user", "吃了吗"), ("assistant", "吃了")),
]
OLD_DEV = [conv(("user", "在干嘛"), ("assistant", "写代码"))]

EXPECTED_CONVERSATIONS = [
    conv(
        ("user", "早上好\n今天有空吗？"),
        ("assistant", "有的\n怎么了？"),
        ("user", "一起吃午饭吧"),
        ("assistant", "好啊，几点？"),
    ),
    conv(("user", "马上来"), ("assistant", "不急")),
    conv(
        ("user", "周末去爬山吗？"),
        ("assistant", "去！\n几点出发？"),
        ("user", "早上七点"),
        ("assistant", "好的👌"),
    ),
    conv(
        ("user", "帮我看下这段代码"),
        ("assistant", "发来看看"),
        ("user", "def f()\n    return 1"),
        ("assistant", "少了个冒号"),
        ("user", "谢谢！"),
        ("assistant", "不客气"),
    ),
]


@pytest.fixture
def export_dir(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    write(src / "张三.json", ZHANG)
    write(src / "李四.json", LI)
    write(src / "王五.json", WANG)
    (src / "old_train.json").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in OLD_TRAIN), encoding="utf-8"
    )
    (src / "old_dev.json").write_text(json.dumps(OLD_DEV[0], ensure_ascii=False) + "\n", encoding="utf-8")
    (src / "notes.txt").write_text("not a chat log", encoding="utf-8")
    return src


def test_import_exact_output(export_dir, tmp_path):
    out = tmp_path / "out"
    summary = import_chats(export_dir, out, dev_ratio=0.25, seed=42, me="小明")
    assert summary == {
        "files_read": 5,
        "files_skipped": ["notes.txt"],
        "messages": 25,
        "messages_without_text": 2,
        "conversations_kept": 4,
        "conversations_dropped": 3,
        "dropped_reasons": {"only_contact_messages": 1, "only_my_messages": 1, "no_reply_from_me": 1},
        "contacts": {
            "张三": {
                "files": 1,
                "messages": 12,
                "messages_without_text": 1,
                "conversations_kept": 2,
                "conversations_dropped": 2,
                "train": summary["contacts"]["张三"]["train"],
                "dev": summary["contacts"]["张三"]["dev"],
            },
            "李四": {
                "files": 1,
                "messages": 7,
                "messages_without_text": 1,
                "conversations_kept": 1,
                "conversations_dropped": 1,
                "train": summary["contacts"]["李四"]["train"],
                "dev": summary["contacts"]["李四"]["dev"],
            },
            "王五": {
                "files": 1,
                "messages": 6,
                "messages_without_text": 0,
                "conversations_kept": 1,
                "conversations_dropped": 0,
                "train": summary["contacts"]["王五"]["train"],
                "dev": summary["contacts"]["王五"]["dev"],
            },
        },
        "me_map_unused": [],
        "merged_train_rows": 2,
        "merged_dev_rows": 1,
        "train": 5,
        "dev": 2,
        "train_path": str(out / "train.json"),
        "dev_path": str(out / "dev.json"),
    }
    # Conversations in file-name order (张 < 李 < 王), chronological within a file, then a seeded shuffle.
    shuffled = list(EXPECTED_CONVERSATIONS)
    random.Random(42).shuffle(shuffled)
    assert read_rows(out / "dev.json") == OLD_DEV + shuffled[:1]
    assert read_rows(out / "train.json") == OLD_TRAIN + shuffled[1:]
    # Each contact's train / dev rows add up to what it kept, and the dev row is the one that was drawn.
    dev_owner = {
        json.dumps(c, sort_keys=True): n
        for c, n in zip(EXPECTED_CONVERSATIONS, ["张三", "张三", "李四", "王五"])
    }
    owner = dev_owner[json.dumps(shuffled[0], sort_keys=True)]
    assert {n: (c["train"], c["dev"]) for n, c in summary["contacts"].items()} == {
        n: (c["conversations_kept"] - (n == owner), int(n == owner)) for n, c in summary["contacts"].items()
    }
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "train.json"]
    # The output is valid training data for the readers.
    assert len(read_examples(out / "train.json").examples) == 5


def test_import_is_deterministic_for_a_seed(export_dir, tmp_path):
    a = import_chats(export_dir, tmp_path / "a", seed=7, me="小明")
    b = import_chats(export_dir, tmp_path / "b", seed=7, me="小明")
    assert {k: v for k, v in a.items() if not k.endswith("_path")} == {
        k: v for k, v in b.items() if not k.endswith("_path")
    }
    for name in ("train.json", "dev.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Another seed: the same conversations, possibly split differently.
    import_chats(export_dir, tmp_path / "c", seed=8, me="小明")
    rows = {
        json.dumps(r, sort_keys=True)
        for d in ("a", "c")
        for n in ("train.json", "dev.json")
        for r in read_rows(tmp_path / d / n)
    }
    assert len(rows) == 4 + 3


def test_at_least_one_dev_row_and_reimport_into_source(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    write(src / "张三.json", ZHANG)
    summary = import_chats(src, src, dev_ratio=0.1, me="小明")
    assert (summary["train"], summary["dev"]) == (1, 1)
    # Running again into the same folder must not read the outputs back in as *train / *dev files.
    again = import_chats(src, src, dev_ratio=0.1, me="小明")
    assert again["files_read"] == 1 and (again["train"], again["dev"]) == (1, 1)


def test_no_dev_split_when_ratio_is_zero_or_one_conversation(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    write(src / "王五.json", WANG)
    assert (import_chats(src, tmp_path / "o")["dev"]) == 0  # one conversation: all of it trains
    write(src / "李四.json", LI)
    assert import_chats(src, tmp_path / "o", dev_ratio=0)["dev"] == 0
    assert (tmp_path / "o" / "dev.json").read_text(encoding="utf-8") == ""


def test_gap_boundary(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    msgs = [
        {"sender": "A", "text": "q1", "time": at(0)},
        {"sender": "me", "text": "a1", "time": at(1)},
        {"sender": "A", "text": "q2", "time": at(61)},  # exactly 60 minutes later: same conversation
        {"sender": "me", "text": "a2", "time": at(62)},
        {"sender": "A", "text": "q3", "time": at(122.5)},  # more than 60 minutes: a new one
        {"sender": "me", "text": "a3", "time": at(123)},
    ]
    write(src / "a.json", msgs)
    summary = import_chats(src, tmp_path / "o", dev_ratio=0, me="me")
    assert summary["conversations_kept"] == 2
    assert [len(r["conversations"]) for r in read_rows(tmp_path / "o" / "train.json")] in ([4, 2], [2, 4])
    assert import_chats(src, tmp_path / "o", dev_ratio=0, me="me", gap_minutes=30)["conversations_kept"] == 3


def test_utc_z_times_and_numeric_strings(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    write(
        src / "a.json",
        [
            {"name": "A", "text": "hi", "time": "2024-03-01T09:00:00Z"},
            {"name": "B", "text": "hello", "time": "1709283660"},  # 09:01Z as unix seconds in a string
        ],
    )
    assert import_chats(src, tmp_path / "o", me="B")["conversations_kept"] == 1


def test_error_when_me_is_unknown(export_dir, tmp_path):
    with pytest.raises(DataError) as info:
        import_chats(export_dir, tmp_path / "o")
    assert str(info.value).startswith(
        f"{export_dir / '张三.json'}: cannot tell which messages are yours: pass me="
    )
    assert not (tmp_path / "o").exists()


def test_error_names_file_index_and_field(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    bad = [dict(m) for m in ZHANG]
    bad[3]["time"] = "yesterday"
    write(src / "张三.json", bad)
    with pytest.raises(DataError) as info:
        import_chats(src, tmp_path / "o", me="小明")
    assert (
        str(info.value) == f'{src / "张三.json"}[3].time: not an ISO-8601 time or unix seconds: "yesterday"'
    )

    write(src / "张三.json", [{"sender": "张三", "text": "hi"}])
    with pytest.raises(DataError, match=r"\[0\]\.time: missing"):
        import_chats(src, tmp_path / "o", me="小明")

    write(src / "张三.json", [{"sender": "张三", "text": "hi", "time": 1, "is_me": "maybe"}])
    with pytest.raises(DataError, match=r'\[0\]\.is_me: expected true / false or 1 / 0, got "maybe"'):
        import_chats(src, tmp_path / "o")


def test_error_bad_premade_file_names_its_line(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    path = src / "x_train.json"
    path.write_text(
        json.dumps(OLD_TRAIN[0]) + "\n" + json.dumps(conv(("user", "a"), ("user", "b"))) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        import_chats(src, tmp_path / "o")
    assert (
        str(info.value) == f'{path}:2: field "conversations[1].role": expected assistant after user, got user'
    )


def test_error_training_rows_under_a_chat_log_name(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    write(src / "contact.json", OLD_TRAIN)
    with pytest.raises(DataError, match=r"holds training rows, not a chat log; name the file \*train\.json"):
        import_chats(src, tmp_path / "o", me="小明")


def test_error_nothing_to_train_on(tmp_path):
    src = tmp_path / "chats"
    src.mkdir()
    write(src / "a.json", [{"sender": "A", "text": "在吗", "time": at(0)}])
    with pytest.raises(DataError, match="no conversation to train on .* only_contact_messages 1"):
        import_chats(src, tmp_path / "o", me="me")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .json or .jsonl files"):
        import_chats(empty, tmp_path / "o")
    with pytest.raises(ValueError, match="dev_ratio"):
        import_chats(src, tmp_path / "o", dev_ratio=1.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "sender": st.sampled_from(["A", "me", 3, None]),
                "time": st.integers(0, 10_000) | st.text(max_size=4),
            },
            optional={
                "text": st.text(max_size=3) | st.none(),
                "is_me": st.sampled_from([True, 0, "x", None]),
            },
        ),
        max_size=8,
    ),
    me=st.sampled_from([None, "me"]),
)
def test_fuzz_chat_logs_raise_only_data_error(tmp_path, rows, me):
    src = tmp_path / "fuzz"
    src.mkdir(exist_ok=True)
    write(src / "a.json", rows)
    try:
        summary = import_chats(src, tmp_path / "fuzz_out", me=me)
    except DataError:
        return
    assert summary["train"] >= 1
    assert len(read_examples(tmp_path / "fuzz_out" / "train.json").examples) == summary["train"]


def _tree(tmp_path):
    """The chat-export layout: one sub-folder per contact, logs split by month, names differing by account."""
    src = tmp_path / "tree"
    # 张三's timeline is split over two files; the split falls inside the first conversation.
    write((src / "张三" / "2024-03").mkdir(parents=True) or src / "张三" / "2024-03" / "a.json", ZHANG[:3])
    write(src / "张三" / "2024-03" / "b.json", ZHANG[3:])
    (src / "张三" / "2024-03" / "photo.jpg").write_bytes(b"\xff\xd8")
    # On this account I am "Ming", not "小明".
    ming = [{**m, "sender": "Ming" if m["sender"] == "小明" else m["sender"]} for m in ZHANG]
    write((src / "work").mkdir() or src / "work" / "chat.jsonl", [])
    (src / "work" / "chat.jsonl").write_text(
        "\n".join(json.dumps(m, ensure_ascii=False) for m in ming), encoding="utf-8"
    )
    write((src / "李四").mkdir() or src / "李四" / "log.json", LI)  # isSend flags: no name needed
    write(src / "王五.json", WANG)  # a file at the top is a contact of its own
    (src / ".cache").mkdir()
    write(src / ".cache" / "junk.json", [{"sender": "x"}])  # hidden folders are not read
    return src


def test_nested_tree_with_a_me_map(tmp_path):
    src = _tree(tmp_path)
    out = tmp_path / "out"
    summary = import_chats(src, out, dev_ratio=0, me={"work": "Ming", "*": "小明", "nobody": "x"})
    assert summary["files_read"] == 5
    assert summary["files_skipped"] == ["张三/2024-03/photo.jpg"]
    assert summary["me_map_unused"] == ["nobody"]
    per = {
        n: (c["files"], c["messages"], c["conversations_kept"], c["train"])
        for n, c in summary["contacts"].items()
    }
    # The two halves of 张三's log give the same conversations as the whole file does.
    assert per == {"work": (1, 12, 2, 2), "李四": (1, 7, 1, 1), "王五": (1, 6, 1, 1), "张三": (2, 12, 2, 2)}
    rows = read_rows(out / "train.json")
    expected = EXPECTED_CONVERSATIONS[:2] * 2 + EXPECTED_CONVERSATIONS[2:]
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(
        json.dumps(r, sort_keys=True) for r in expected
    )


def test_nested_tree_without_a_name_for_a_contact_names_its_file(tmp_path):
    src = _tree(tmp_path)
    # "小明" is wrong for the work account: no message is mine there, so it yields nothing (not an error)...
    summary = import_chats(src, tmp_path / "o", me="小明")
    assert summary["contacts"]["work"]["conversations_kept"] == 0
    assert summary["contacts"]["work"]["conversations_dropped"] == 4  # every session: only the contact
    # ...while a contact without any name and without flags is an error naming its file.
    with pytest.raises(DataError, match=r"work/chat\.jsonl: cannot tell which messages are yours"):
        import_chats(src, tmp_path / "o", me={"张三": "小明", "王五": "me"})


def test_import_chats_cli_with_a_me_map(tmp_path, capsys):
    from glmtune.cli import main

    src = _tree(tmp_path)
    me_map = tmp_path / "me.yaml"
    me_map.write_text("work: Ming\n", encoding="utf-8")
    assert (
        main(
            [
                "data",
                "import-chats",
                str(src),
                str(tmp_path / "o"),
                "--me",
                "小明",
                "--me-map",
                str(me_map),
                "--dev-ratio",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped 1 other files (张三/2024-03/photo.jpg)" in out
    lines = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.split()[:1] in (["work"], ["张三"])
    }
    assert lines["work"] == ["1", "12", "1", "2", "2", "2", "0"]
    assert lines["张三"] == ["2", "12", "1", "2", "2", "2", "0"]
    assert len(read_rows(tmp_path / "o" / "train.json")) == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    assert main(["data", "import-chats", str(src), str(tmp_path / "o"), "--me-map", str(bad)]) != 0
    assert f"{bad}: expected an object of contact -> your sender name, got list" in capsys.readouterr().err
