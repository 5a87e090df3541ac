"""Encoding: token-for-token layouts per generation, loss masks, and the truncation policies, counted.

Expected ids are assembled by hand from the tokenizer's pieces (raw sentencepiece ids, the command
token ids) or taken from the official tokenizer's recorded outputs, never from the template under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import glmtune
from glmtune.data import (
    DataError,
    EncodeSettings,
    Example,
    encode,
    encode_all,
    length_stats,
    read_examples,
)
from glmtune.errors import ConfigError
from glmtune.specs import REGISTRY
from glmtune.testing import make_tiny_model

from conftest import shared_path

IGNORE = -100


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny official-format model folders, one per generation, built once."""
    root = tmp_path_factory.mktemp("encode_models")
    return {g: make_tiny_model(root / g, g) for g in ("chatglm", "chatglm2", "glm4")}


@pytest.fixture(scope="session")
def fixture_dir():
    return shared_path("fixtures", "chatglm3_tiny")


@pytest.fixture(scope="session")
def tok3(fixture_dir):
    return glmtune.load_tokenizer(fixture_dir)


@pytest.fixture(scope="session")
def official(fixture_dir):
    """Outputs of the official ChatGLM3 tokenizer code, recorded in the fixture."""
    return json.loads((fixture_dir / "expected" / "tokenizer.json").read_text(encoding="utf-8"))


def chat(*turns, source="t.jsonl:1"):
    return Example([{"role": r, "content": c} for r, c in turns], source)


def sp(tok, text):
    """Raw sentencepiece ids of ``text`` (ChatGLM2/3: sentencepiece ids are token ids)."""
    return tok.sp_model.encode(text)


# --------------------------------------------------------------------------------------------------
# Layouts per generation


def test_chatglm_v1_layout(tiny):
    tok = glmtune.load_tokenizer(tiny["chatglm"])
    tpl = glmtune.get_template(tiny["chatglm"])
    gmask, sop, eop = (tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<eop>"))
    assert len({gmask, sop, eop}) == 3
    text = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    enc = encode(tok, tpl, chat(("user", "你好"), ("assistant", "我是助手")))
    ctx, tgt = text("你好"), text("我是助手")
    assert enc.input_ids == ctx + [gmask, sop] + tgt + [eop]
    # Official: labels = [-100] * index(<sop>) + ids[index(<sop>):]: -100 through [gMASK].
    assert enc.labels == [IGNORE] * (len(ctx) + 1) + [sop] + tgt + [eop]
    assert (enc.prompt_tokens, enc.reply_tokens, enc.target_tokens) == (len(ctx) + 1, len(tgt) + 2, len(tgt))

    # History goes into the [Round i] prompt (counted from 0); only the last reply is trained.
    enc = encode(
        tok,
        tpl,
        chat(("user", "今天天气"), ("assistant", "不错"), ("user", "去公园吧"), ("assistant", "好的")),
    )
    ctx = text("[Round 0]\n问：今天天气\n答：不错\n[Round 1]\n问：去公园吧\n答：")
    assert enc.input_ids == ctx + [gmask, sop] + text("好的") + [eop]
    assert enc.labels == [IGNORE] * (len(ctx) + 1) + [sop] + text("好的") + [eop]


def test_chatglm2_layout(fixture_dir):
    tok = glmtune.load_tokenizer(fixture_dir, generation="chatglm2")
    tpl = REGISTRY["chatglm2"].template
    gmask, sop, eos = 801, 803, 2  # the fixture's official special ids
    assert [tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop")] == [
        gmask,
        sop,
    ] and tok.eos_token_id == eos

    enc = encode(tok, tpl, chat(("user", "你好"), ("assistant", "我是助手")))
    prompt = [gmask, sop] + sp(tok, "[Round 1]\n\n问：你好\n\n答：")
    assert enc.input_ids == prompt + sp(tok, "我是助手") + [eos]
    assert enc.labels == [IGNORE] * len(prompt) + sp(tok, "我是助手") + [eos]

    # A system prompt has no role in ChatGLM2: it goes in front of the first question.
    enc = encode(tok, tpl, chat(("system", "你是助手"), ("user", "你好"), ("assistant", "好")))
    assert enc.input_ids[: enc.prompt_tokens] == [gmask, sop] + sp(
        tok, "[Round 1]\n\n问：你是助手\n你好\n\n答："
    )


def test_chatglm3_multi_turn_matches_official_tokenizer_and_finetune_masks(tok3, official):
    """Prompt ids recorded from the official build_chat_input; labels by the official finetune rule."""
    case = next(c for c in official["build_chat_input"] if c["name"] == "chat_with_history")
    reply = next(
        c for c in official["build_single_message"] if c["role"] == "assistant" and not c["metadata"]
    )
    messages = case["history"] + [
        {"role": "user", "content": case["query"]},
        {"role": "assistant", "content": reply["message"]},
    ]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    enc = encode(tok3, REGISTRY["chatglm3"].template, Example(messages, "t.jsonl:1"))
    eos = 2
    assert enc.input_ids == case["input_ids"] + reply["ids"][1:] + [eos]

    # finetune_demo/finetune_hf.py process_batch: loss mask True on every token of an assistant message
    # (role token included), then shifted right by one, so the role token is not trained and the token
    # after each assistant message (the next role token, or eos) is.
    masks = [False, False]
    for m in messages:
        single = tok3.build_single_message(m["role"], "", m["content"])
        masks += [m["role"] == "assistant"] * len(single)
    masks = [False] + masks
    ids = enc.input_ids
    assert enc.labels == [i if k else IGNORE for i, k in zip(ids, masks)]
    trained = [p for p, x in enumerate(enc.labels) if x != IGNORE]
    assert ids[trained[0] - 1] == 807  # <|assistant|> itself carries no loss ...
    assert 806 in [ids[p] for p in trained] and ids[-1] == eos and enc.labels[-1] == eos  # ... its end does
    assert enc.prompt_tokens == len(case["input_ids"]) and enc.target_tokens == len(reply["ids"]) - 1


def test_glm4_layout(tiny):
    tok = glmtune.load_tokenizer(tiny["glm4"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")}
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    enc = encode(
        tok, glmtune.get_template(tiny["glm4"]), chat(("user", "你好"), ("assistant", "Hello world"))
    )
    prompt = [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"]] + text("\n你好") + [ids["<|assistant|>"]]
    assert enc.input_ids == prompt + text("\nHello world") + [eos]
    assert enc.labels == [IGNORE] * len(prompt) + text("\nHello world") + [eos]


def test_train_on_prompt_labels_everything(tok3):
    ex = chat(("user", "你好"), ("assistant", "好"))
    enc = encode(tok3, REGISTRY["chatglm3"].template, ex, EncodeSettings(train_on_prompt=True))
    assert enc.labels == enc.input_ids
    assert enc.target_tokens == encode(tok3, REGISTRY["chatglm3"].template, ex).target_tokens


def test_template_refusal_is_a_data_error_naming_the_row(fixture_dir):
    tok = glmtune.load_tokenizer(fixture_dir, generation="chatglm2")
    tool_use = chat(
        ("user", "北京天气？"),
        ("assistant", "tool_call(city='北京')"),
        ("observation", '{"ok": true}'),
        ("assistant", "晴"),
        source="chats.jsonl:7",
    )
    with pytest.raises(DataError) as info:
        encode(tok, REGISTRY["chatglm2"].template, tool_use)
    assert str(info.value).startswith("chats.jsonl:7: cannot encode with the chatglm2 template")
    good = chat(("user", "你好"), ("assistant", "好"))
    out, stats = encode_all(tok, REGISTRY["chatglm2"].template, [good, tool_use], skip_invalid=True)
    assert len(out) == 1 and stats.kept == 1 and [e.location for e in stats.invalid] == ["chats.jsonl:7"]


# --------------------------------------------------------------------------------------------------
# Truncation: P-Tuning style max_source_length / max_target_length


def test_source_target_chatglm2_keeps_specials(fixture_dir):
    tok = glmtune.load_tokenizer(fixture_dir, generation="chatglm2")
    query, answer = (
        "今天天气不错，我们去公园散步吧。",
        "北京的秋天很美，天空很蓝。机器学习是人工智能的一个分支。",
    )
    prompt_ids, answer_ids = sp(tok, f"[Round 1]\n\n问：{query}\n\n答："), sp(tok, answer)
    settings = EncodeSettings(max_source_length=10, max_target_length=7)
    enc = encode(tok, REGISTRY["chatglm2"].template, chat(("user", query), ("assistant", answer)), settings)
    # The source keeps its first 10 content tokens ([gMASK] sop stay), the target its first 7 (+ eos).
    assert enc.input_ids == [801, 803] + prompt_ids[:10] + answer_ids[:7] + [2]
    assert enc.labels == [IGNORE] * 12 + answer_ids[:7] + [2]
    assert enc.truncated_tokens == len(prompt_ids) - 10 + len(answer_ids) - 7
    assert (enc.prompt_tokens, enc.reply_tokens, enc.target_tokens) == (12, 8, 7)


def test_source_target_chatglm_v1_keeps_gmask_sop_eop(tiny):
    tok = glmtune.load_tokenizer(tiny["chatglm"])
    gmask, sop, eop = (tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "<sop>", "<eop>"))
    text = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    q, a = "机器学习是人工智能的一个分支", "深度学习是机器学习的一种方法"
    enc = encode(
        tok,
        glmtune.get_template(tiny["chatglm"]),
        chat(("user", q), ("assistant", a)),
        EncodeSettings(max_source_length=4, max_target_length=3),
    )
    assert enc.input_ids == text(q)[:4] + [gmask, sop] + text(a)[:3] + [eop]
    assert enc.labels == [IGNORE] * 5 + [sop] + text(a)[:3] + [eop]
    assert enc.truncated_tokens == len(text(q)) - 4 + len(text(a)) - 3


def test_source_target_chatglm3_keeps_role_tokens(tok3):
    q, a = "请从下面的句子中抽取三元组", "北京位于中国"
    enc = encode(
        tok3,
        REGISTRY["chatglm3"].template,
        chat(("user", q), ("assistant", a)),
        EncodeSettings(max_source_length=5, max_target_length=4),
    )
    user = sp(tok3, "\n") + sp(tok3, q)
    reply = sp(tok3, "\n") + sp(tok3, a)
    assert enc.input_ids == [801, 803, 806] + user[:5] + [807] + reply[:4] + [2]
    assert enc.labels == [IGNORE] * 9 + reply[:4] + [2]


@pytest.mark.shared
def test_source_target_matches_official_chatglm2_ptuning_on_advertisegen(fixture_dir):
    """ChatGLM2-6B ptuning/main.py preprocess_function_train, re-implemented from the official code.

    The official limits count [gMASK] sop into max_source_length; glmtune counts text only, so glmtune's
    max_source_length N is the official N + 2.
    """
    tok = glmtune.load_tokenizer(fixture_dir, generation="chatglm2")
    read = read_examples(shared_path("data", "advertisegen", "dev.json"))
    src_len, tgt_len = 64, 48
    encoded, stats = encode_all(
        tok, REGISTRY["chatglm2"].template, read.examples, EncodeSettings(src_len, tgt_len)
    )
    assert stats.examples == stats.kept == len(encoded) == 1070 and stats.dropped == 0
    removed = 0
    for ex, enc in zip(read.examples, encoded):
        query, answer = ex.messages[0]["content"], ex.messages[1]["content"]
        full_a = [801, 803] + sp(tok, f"[Round 1]\n\n问：{query}\n\n答：")
        a_ids = full_a[: src_len + 2]  # encode(..., add_special_tokens=True, truncation=True, max_length)
        b_ids = sp(tok, answer)[:tgt_len]
        assert enc.input_ids == a_ids + b_ids + [2]
        assert enc.labels == [IGNORE] * len(a_ids) + b_ids + [2]
        removed += len(full_a) - len(a_ids) + len(sp(tok, answer)) - len(b_ids)
    assert stats.tokens_removed == removed == sum(e.truncated_tokens for e in encoded)
    assert stats.truncated == sum(1 for e in encoded if e.truncated) > 0


# --------------------------------------------------------------------------------------------------
# Truncation: one max_length, history first

ROUNDS = [
    ("第一个问题是什么", "第一个回答"),
    ("今天天气不错", "我们去公园散步吧"),
    ("机器学习是什么", "人工智能的一个分支"),
    ("请介绍一下你自己", "我是一个人工智能助手，可以回答问题、写作和翻译。"),
]
SYSTEM = ("system", "你是助手")


def conversation(rounds, system=True):
    turns = [SYSTEM] if system else []
    for q, a in rounds:
        turns += [("user", q), ("assistant", a)]
    return chat(*turns)


def test_max_length_drops_oldest_rounds_first_and_keeps_system(tok3):
    tpl = REGISTRY["chatglm3"].template
    length = lambda rounds: len(encode(tok3, tpl, conversation(rounds)).input_ids)  # noqa: E731
    full = length(ROUNDS)
    for keep in (3, 2, 1):
        limit = length(ROUNDS[-keep:])
        enc = encode(tok3, tpl, conversation(ROUNDS), EncodeSettings(max_length=limit))
        # The most history that fits: exactly the last `keep` rounds, system message first.
        assert enc.input_ids == encode(tok3, tpl, conversation(ROUNDS[-keep:])).input_ids
        assert enc.truncated_tokens == full - limit
        assert enc.input_ids[2] == 805  # <|system|>
    # One token less than two rounds need: only the last round is left, untouched.
    enc = encode(tok3, tpl, conversation(ROUNDS), EncodeSettings(max_length=length(ROUNDS[-2:]) - 1))
    assert enc.input_ids == encode(tok3, tpl, conversation(ROUNDS[-1:])).input_ids
    # A limit that fits everything changes nothing.
    enc = encode(tok3, tpl, conversation(ROUNDS), EncodeSettings(max_length=full))
    assert enc.truncated_tokens == 0 and len(enc.input_ids) == full


def test_max_length_history_first_for_round_templates(fixture_dir):
    tok = glmtune.load_tokenizer(fixture_dir, generation="chatglm2")
    tpl = REGISTRY["chatglm2"].template
    last_two = encode(tok, tpl, conversation(ROUNDS[-2:], system=False))
    enc = encode(
        tok, tpl, conversation(ROUNDS, system=False), EncodeSettings(max_length=len(last_two.input_ids))
    )
    assert enc.input_ids == last_two.input_ids
    # The kept history is renumbered from [Round 1], as the model would see it in a fresh chat.
    assert tok.decode(enc.input_ids).startswith("[gMASK]sop[Round 1]\n\n问：机器学习是什么")


def test_max_length_cuts_the_question_from_the_left_then_the_reply_end(tok3):
    tpl = REGISTRY["chatglm3"].template
    question = (
        "请从下面的句子中抽取三元组，并以 JSON 格式输出。今天天气不错，我们去公园散步吧。北京的秋天很美。"
    )
    answer = "北京位于中国"
    ex = chat(SYSTEM, ("user", question), ("assistant", answer))
    full = encode(tok3, tpl, ex)
    reply_len = full.reply_tokens
    limit = full.length - 10
    enc = encode(tok3, tpl, ex, EncodeSettings(max_length=limit))
    # The reply is short: only the question's beginning goes, the end of the question stays.
    assert enc.length <= limit and enc.reply_tokens == reply_len
    assert enc.input_ids[enc.prompt_tokens :] == full.input_ids[full.prompt_tokens :]
    prompt = tok3.decode(enc.input_ids[: enc.prompt_tokens])
    assert prompt.startswith("[gMASK]sop<|system|>\n 你是助手<|user|>")
    kept = prompt.split("<|user|>\n ", 1)[1].removesuffix("<|assistant|>")
    assert question.endswith(kept) and 0 < len(kept) < len(question)
    assert enc.truncated_tokens == full.length - enc.length

    # A long reply: the prompt keeps half the budget, the reply's end goes, its eos stays.
    long_answer = "我是一个人工智能助手，可以回答问题、写作和翻译。" * 4
    ex = chat(SYSTEM, ("user", question), ("assistant", long_answer))
    full = encode(tok3, tpl, ex)
    limit = 40
    enc = encode(tok3, tpl, ex, EncodeSettings(max_length=limit))
    assert enc.length == limit and enc.prompt_tokens <= limit // 2
    assert enc.input_ids[-1] == 2 and enc.labels[-1] == 2
    reply = enc.input_ids[enc.prompt_tokens : -1]
    full_reply = full.input_ids[full.prompt_tokens : -1]
    assert reply == full_reply[: len(reply)] and enc.target_tokens == len(reply)
    assert enc.truncated_tokens == full.length - limit


def test_max_length_drops_examples_with_no_reply_left_and_counts(tok3):
    tpl = REGISTRY["chatglm3"].template
    short = chat(("user", "你好"), ("assistant", "好"), source="d.jsonl:1")
    long_ = chat(("user", "你好"), ("assistant", "北京位于中国" * 20), source="d.jsonl:2")
    # Even an empty question leaves a prompt of 5+ tokens with the system message: nothing of the reply fits.
    hopeless = chat(
        ("system", "你是一个人工智能助手" * 5), ("user", "你好"), ("assistant", "好"), source="d.jsonl:3"
    )
    limit = 16
    out, stats = encode_all(tok3, tpl, [short, long_, hopeless], EncodeSettings(max_length=limit))
    full = {e.source: encode(tok3, tpl, e).length for e in (short, long_, hopeless)}
    assert [e.source for e in out] == ["d.jsonl:1", "d.jsonl:2"]
    assert all(e.length <= limit for e in out)
    assert stats.examples == 3 and stats.kept == 2 and stats.dropped == 1
    assert stats.dropped_sources == ["d.jsonl:3"]
    assert stats.truncated == 2  # the long one and the dropped one
    dropped = encode(tok3, tpl, hopeless, EncodeSettings(max_length=limit))
    assert dropped.target_tokens == 0
    assert stats.tokens_removed == (full["d.jsonl:2"] - out[1].length) + dropped.truncated_tokens


@pytest.mark.shared
def test_max_length_on_real_alpaca_counts_add_up(tok3):
    read = read_examples(shared_path("data", "alpaca_zh", "alpaca_zh_4k.json"), skip_invalid=True)
    examples = read.examples[:800]
    tpl = REGISTRY["chatglm3"].template
    full, _ = encode_all(tok3, tpl, examples)
    cut, stats = encode_all(tok3, tpl, examples, EncodeSettings(max_length=128))
    over = [e for e in full if e.length > 128]
    assert stats.truncated == len(over) > 0 and stats.dropped == 0
    assert stats.tokens_removed == sum(b.length - a.length for b, a in zip(full, cut))
    # A question is cut by whole characters (up to 3 byte tokens each here), a reply by tokens.
    assert all(125 <= a.length <= 128 for a in cut if a.truncated)
    for before, after in zip(full, cut):
        assert after.labels[-1] == after.input_ids[-1] == 2  # the closing eos survives every cut
        if before.length <= 128:
            assert after.input_ids == before.input_ids


# --------------------------------------------------------------------------------------------------
# Settings and statistics


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_length": 0},
        {"max_source_length": -1},
        {"max_target_length": 1.5},
        {"max_length": 8, "max_source_length": 4},
    ],
)
def test_settings_are_validated(kwargs):
    with pytest.raises(ConfigError):
        EncodeSettings(**kwargs)


def test_length_stats():
    values = list(range(1, 101))
    stats = length_stats(values)
    assert stats["count"] == 100 and stats["min"] == 1 and stats["max"] == 100
    assert stats["mean"] == pytest.approx(50.5) and stats["std"] == pytest.approx(np.std(values))
    assert [stats[k] for k in ("p25", "p50", "p75", "p90", "p99")] == pytest.approx(
        list(np.percentile(values, [25, 50, 75, 90, 99]))
    )
    assert length_stats(iter([7])) == {
        "count": 1,
        "mean": 7.0,
        "std": 0.0,
        "min": 7,
        "p25": 7.0,
        "p50": 7.0,
        "p75": 7.0,
        "p90": 7.0,
        "p99": 7.0,
        "max": 7,
    }
    assert length_stats([])["count"] == 0 and length_stats([])["max"] is None
