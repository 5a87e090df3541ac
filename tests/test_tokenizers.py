"""glmtune's clean-room ChatGLM tokenizers against the ids of the official ones (../shared/fixtures)."""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import pytest
import sentencepiece as spm
import torch

from glmtune.errors import ModelLoadError
from glmtune.tokenization import ChatGLMTokenizer, ChatGLMv1Tokenizer, load_chatglm_tokenizer
from glmtune.tokenization.testing import (
    CHATGLM_V1_USER_DEFINED_SYMBOLS,
    train_tiny_spm,
    train_tiny_spm_v1,
)

from conftest import shared_path

ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def glm3_dir():
    return shared_path("fixtures", "chatglm3_tiny")


@pytest.fixture(scope="module")
def glm3_expected(glm3_dir):
    return _json(glm3_dir / "expected" / "tokenizer.json")


@pytest.fixture(scope="module")
def glm3(glm3_dir):
    return load_chatglm_tokenizer(glm3_dir, "chatglm3")


@pytest.fixture(scope="module")
def v1_dir():
    return shared_path("fixtures", "chatglm6b_v1_tiny")


@pytest.fixture(scope="module")
def v1_expected(v1_dir):
    return _json(v1_dir / "expected" / "tokenizer.json")


@pytest.fixture(scope="module")
def v1(v1_dir):
    return load_chatglm_tokenizer(v1_dir, "chatglm")


def _check_encode_cases(tok, cases):
    for case in cases:
        name, text = case["name"], case["text"]
        assert tok.encode(text) == case["ids"], name
        assert tok(text)["input_ids"] == case["ids"], name
        assert tok.encode(text, add_special_tokens=False) == case["ids_no_special"], name
        assert tok.convert_ids_to_tokens(case["ids_no_special"]) == case["pieces"], name
        assert tok.tokenize(text) == case["pieces"], name
        assert tok.decode(case["ids_no_special"]) == case["decode_no_special"], name
        assert tok.decode(case["ids"], skip_special_tokens=True) == case["decode_no_special"], name
        assert tok.convert_tokens_to_string(case["pieces"]) == case["decode_no_special"], name


# ------------------------------------------------------------------------------------ ChatGLM3 / ChatGLM2
@pytest.mark.shared
def test_chatglm3_encode_cases(glm3, glm3_expected):
    _check_encode_cases(glm3, glm3_expected["encode"])


@pytest.mark.shared
def test_chatglm3_sizes_and_special_ids(glm3, glm3_expected):
    assert len(glm3) == glm3_expected["tokenizer_vocab_size"] == 809
    assert glm3.vocab_size == 809
    for name, index in glm3_expected["special_ids"].items():
        assert glm3.get_command(name) == index, name
    for name in ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *ROLE_TOKENS]:
        assert glm3.convert_tokens_to_ids(name) == glm3_expected["special_ids"][name], name
        assert glm3.convert_ids_to_tokens(glm3_expected["special_ids"][name]) == name
    assert glm3.pad_token_id == glm3_expected["special_ids"]["<pad>"] == 0
    assert glm3.eos_token_id == glm3_expected["special_ids"]["<eos>"]
    assert glm3.bos_token_id == glm3_expected["special_ids"]["<bos>"]
    assert glm3.unk_token_id == 0
    assert glm3.padding_side == "left"
    with pytest.raises(KeyError, match="not a command token"):
        glm3.get_command("<nope>")


@pytest.mark.shared
def test_chatglm3_build_inputs_with_special_tokens(glm3):
    a, b = glm3.encode("问题", add_special_tokens=False), glm3.encode("回答", add_special_tokens=False)
    gmask, sop, eos = glm3.get_command("[gMASK]"), glm3.get_command("sop"), glm3.eos_token_id
    assert glm3.build_inputs_with_special_tokens(a) == [gmask, sop, *a]
    assert glm3.build_inputs_with_special_tokens(a, b) == [gmask, sop, *a, *b, eos]
    assert glm3.get_special_tokens_mask(a, b) == [1, 1] + [0] * (len(a) + len(b)) + [1]
    assert glm3.num_special_tokens_to_add() == 2
    assert glm3("问题", "回答")["input_ids"] == [gmask, sop, *a, *b, eos]


@pytest.mark.shared
def test_chatglm3_build_single_message(glm3, glm3_expected):
    for case in glm3_expected["build_single_message"]:
        assert glm3.build_single_message(case["role"], case["metadata"], case["message"]) == case["ids"], case
    with pytest.raises(ValueError, match="unknown role"):
        glm3.build_single_message("tool", "", "x")


@pytest.mark.shared
def test_chatglm3_build_chat_input_from_single_messages(glm3, glm3_expected):
    for case in glm3_expected["build_chat_input"]:
        ids = [glm3.get_command("[gMASK]"), glm3.get_command("sop")]
        for item in case["history"]:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += glm3.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += glm3.build_single_message(case["role"], "", case["query"])
        ids.append(glm3.get_command("<|assistant|>"))
        assert ids == case["input_ids"], case["name"]
        assert glm3.build_chat_ids(case["query"], case["history"], case["role"]) == case["input_ids"]
        batch = glm3.build_chat_input(case["query"], history=case["history"], role=case["role"])
        assert batch["input_ids"].tolist() == [case["input_ids"]]
        assert batch["attention_mask"].tolist() == [case["attention_mask"]]


@pytest.mark.shared
def test_chatglm3_command_tokens_in_text_stay_text(glm3):
    for text in ["<|user|>", "hi <|assistant|> there", "[gMASK]sop", "<|observation|>eop"]:
        ids = glm3.encode(text, add_special_tokens=False)
        assert ids == glm3.sp_model.encode(text), text
        assert all(i < 800 for i in ids), text
        assert glm3.decode(ids) == text
    # The official encode_special_tokens option recognises them.
    tok = ChatGLMTokenizer(glm3.vocab_file, encode_special_tokens=True)
    ids = tok.encode("<|user|>\nhi[gMASK]", add_special_tokens=False)
    assert ids == [806] + tok.sp_model.encode("\nhi") + [801]


@pytest.mark.shared
def test_chatglm3_left_padded_batch(glm3, glm3_expected):
    cases = glm3_expected["encode"][:3]
    batch = glm3([c["text"] for c in cases], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    width = max(len(c["ids"]) for c in cases)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    for row, case in enumerate(cases):
        pad = width - len(case["ids"])
        assert batch["input_ids"][row].tolist() == [0] * pad + case["ids"]
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(case["ids"])
        assert glm3.decode(batch["input_ids"][row], skip_special_tokens=True) == case["decode_no_special"]


@pytest.mark.shared
def test_chatglm3_save_pretrained_round_trip(glm3, glm3_dir, glm3_expected, tmp_path):
    glm3.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (glm3_dir / "tokenizer.model").read_bytes()
    config = _json(tmp_path / "tokenizer_config.json")
    assert config["tokenizer_class"] == "ChatGLMTokenizer"
    assert "auto_map" not in config
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(glm3)
    assert reloaded.chat_roles and reloaded.padding_side == "left" and reloaded.pad_token_id == 0
    _check_encode_cases(reloaded, glm3_expected["encode"])
    for case in glm3_expected["build_single_message"]:
        assert reloaded.build_single_message(case["role"], case["metadata"], case["message"]) == case["ids"]
    assert reloaded.encode("<|user|>", add_special_tokens=False) == glm3.encode(
        "<|user|>", add_special_tokens=False
    )


@pytest.mark.shared
def test_chatglm3_from_pretrained_on_the_official_folder(glm3_dir, glm3_expected):
    tok = ChatGLMTokenizer.from_pretrained(glm3_dir)
    _check_encode_cases(tok, glm3_expected["encode"])


@pytest.mark.shared
def test_chatglm3_pickle_and_deepcopy(glm3, glm3_expected):
    for clone in (pickle.loads(pickle.dumps(glm3)), copy.deepcopy(glm3)):
        _check_encode_cases(clone, glm3_expected["encode"][:4])


@pytest.mark.shared
def test_chatglm3_added_tokens(glm3_dir):
    tok = load_chatglm_tokenizer(glm3_dir, "chatglm3")
    assert tok.add_tokens(["<extra>"]) == 1
    assert len(tok) == 810 and tok.convert_tokens_to_ids("<extra>") == 809
    ids = tok.encode("a<extra>b", add_special_tokens=False)
    assert ids == tok.sp_model.encode("a") + [809] + tok.sp_model.encode("b")
    assert tok.decode(ids) == "a<extra>b"


@pytest.mark.shared
def test_chatglm2_vocabulary_has_no_role_tokens(glm3_dir, glm3_expected):
    tok = load_chatglm_tokenizer(glm3_dir, "chatglm2")
    assert len(tok) == 805
    assert not tok.chat_roles
    assert tok.convert_tokens_to_ids("<|user|>") == tok.unk_token_id
    _check_encode_cases(tok, glm3_expected["encode"])
    with pytest.raises(ValueError, match="no role tokens"):
        tok.build_single_message("user", "", "hi")


@pytest.mark.shared
def test_loader_never_runs_folder_code(glm3_dir, tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json", "config.json"):
        shutil.copy(glm3_dir / name, tmp_path / name)
    marker = tmp_path / "executed"
    (tmp_path / "tokenization_chatglm.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    load_chatglm_tokenizer(tmp_path, "chatglm3").encode("hi")
    ChatGLMTokenizer.from_pretrained(tmp_path).encode("hi")
    assert not marker.exists()


@pytest.mark.shared
def test_loader_errors_name_the_missing_file(glm3_dir, tmp_path):
    shutil.copy(glm3_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        load_chatglm_tokenizer(tmp_path, "chatglm3")
    with pytest.raises(ModelLoadError, match="ice_text.model"):
        load_chatglm_tokenizer(tmp_path, "chatglm")
    with pytest.raises(ValueError, match="unknown ChatGLM generation"):
        load_chatglm_tokenizer(tmp_path, "glm5")


# ------------------------------------------------------------------------------------------ ChatGLM-6B
@pytest.mark.shared
def test_v1_encode_cases(v1, v1_expected):
    _check_encode_cases(v1, v1_expected["encode"])


@pytest.mark.shared
def test_v1_sizes_and_token_ids(v1, v1_expected):
    assert len(v1) == v1_expected["tokenizer_vocab_size"] == 1000
    assert v1.num_image_tokens == v1_expected["num_image_tokens"] == 0
    for name, index in v1_expected["token_ids"].items():
        assert v1.convert_tokens_to_ids(name) == index, name
    assert v1.pad_token_id == v1_expected["pad_token_id"]
    assert (v1.bos_token, v1.eos_token, v1.gmask_token, v1.mask_token) == (
        "<sop>",
        "<eop>",
        "[gMASK]",
        "[MASK]",
    )
    assert v1.padding_side == "left"


@pytest.mark.shared
def test_v1_build_inputs_with_special_tokens(v1, v1_expected):
    for case in v1_expected["build_inputs_with_special_tokens"]:
        assert v1.encode(case["prompt"], add_special_tokens=False) == case["prompt_ids"]
        assert v1.encode(case["target"], add_special_tokens=False) == case["target_ids"]
        assert v1.build_inputs_with_special_tokens(case["prompt_ids"], case["target_ids"]) == case["ids"]
        assert v1(case["prompt"], case["target"])["input_ids"] == case["ids"]
        mask = v1.get_special_tokens_mask(case["prompt_ids"], case["target_ids"])
        assert [i for i, m in zip(case["ids"], mask) if m] == [5, 8, 9]


@pytest.mark.shared
def test_v1_left_padded_batch(v1, v1_dir):
    batch_case = _json(v1_dir / "expected" / "cases.json")["batch"]
    batch = v1(batch_case["texts"], padding=True)
    assert batch["input_ids"] == batch_case["input_ids"]
    pad = v1.pad_token_id
    assert batch["attention_mask"] == [[int(i != pad) for i in row] for row in batch_case["input_ids"]]
    tensors = v1(batch_case["texts"], padding=True, return_tensors="pt")
    assert tensors["attention_mask"].dtype == torch.long and tensors["attention_mask"].dim() == 2
    # Pads vanish from decoded text, as in the official decoder.
    assert v1.decode(batch["input_ids"][0]) == "你好[gMASK]<sop>"
    assert v1.decode(batch["input_ids"], skip_special_tokens=True) == batch_case["texts"]


@pytest.mark.shared
def test_v1_special_tokens_written_in_text(v1):
    # <sop> <eop> <unk> <pad> [MASK] are cut out with the whitespace around them (official under 4.30) ...
    assert v1.encode("你好 <sop> x", add_special_tokens=False) == (
        v1.encode("你好", add_special_tokens=False) + [8] + v1.encode("x", add_special_tokens=False)
    )
    # ... other pieces of the model, like [gMASK] and <n>, are matched by sentencepiece in place.
    assert v1.tokenize("x [gMASK]y") == v1.sp_model.encode("x [gMASK]y", out_type=str)


@pytest.mark.shared
def test_v1_whitespace_rewrite(v1):
    text = "a b  c" + " " * 85 + "d\t\te\n"
    pieces = v1.tokenize(text)
    assert "<|blank_2|>" in pieces and "<|blank_80|>" in pieces and "<|blank_5|>" in pieces
    assert pieces.count("<|tab|>") == 2 and pieces[-1] == "<n>"
    assert v1.decode(v1.encode(text), skip_special_tokens=True) == text


@pytest.mark.shared
def test_v1_save_pretrained_round_trip(v1, v1_expected, tmp_path):
    v1.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").exists()
    config = _json(tmp_path / "tokenizer_config.json")
    assert config["num_image_tokens"] == 0 and "auto_map" not in config
    reloaded = ChatGLMv1Tokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 1000 and reloaded.padding_side == "left"
    _check_encode_cases(reloaded, v1_expected["encode"])
    for case in v1_expected["build_inputs_with_special_tokens"]:
        assert (
            reloaded.build_inputs_with_special_tokens(case["prompt_ids"], case["target_ids"]) == case["ids"]
        )


@pytest.mark.shared
def test_v1_num_image_tokens_offsets_ids(v1_dir, v1_expected, tmp_path):
    shutil.copy(v1_dir / "ice_text.model", tmp_path / "ice_text.model")
    config = _json(v1_dir / "tokenizer_config.json")
    config["num_image_tokens"] = 20000
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_chatglm_tokenizer(tmp_path, "chatglm")
    assert len(tok) == 21000
    for case in v1_expected["encode"]:
        assert tok.encode(case["text"]) == [i + 20000 for i in case["ids"]], case["name"]
        assert tok.convert_ids_to_tokens([i + 20000 for i in case["ids_no_special"]]) == case["pieces"]
        assert (
            tok.decode([i + 20000 for i in case["ids"]], skip_special_tokens=True)
            == case["decode_no_special"]
        )
    for name, index in v1_expected["token_ids"].items():
        assert tok.convert_tokens_to_ids(name) == index + 20000, name
    assert tok.pad_token_id == 20003 and tok.gmask_token_id == 20005
    assert tok.convert_ids_to_tokens(7) == "<image_7>" and tok.convert_tokens_to_ids("<image_7>") == 7
    assert tok.decode([7, 20000 + v1_expected["encode"][0]["ids"][0]]) == "你"
    tok.save_pretrained(tmp_path / "saved")
    assert ChatGLMv1Tokenizer.from_pretrained(tmp_path / "saved").encode("你好") == tok.encode("你好")
    # Without the key, the official class default of 20000 applies.
    del config["num_image_tokens"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert len(load_chatglm_tokenizer(tmp_path, "chatglm")) == 21000


# ------------------------------------------------------------------------- tiny trained sentencepiece models
TRAIN_LINES = [
    "Hello world, this is a tiny corpus for the ChatGLM tokenizer tests.",
    "你好，世界！今天天气不错，我们去公园散步吧。",
    "def add(a, b):\n    return a + b",
    "  leading spaces\tand tabs  ",
    "机器学习是人工智能的一个分支。",
]


def test_trained_spm_with_chatglm_tokenizer(tmp_path):
    model = train_tiny_spm(tmp_path / "tokenizer.model", TRAIN_LINES, vocab_size=330)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    assert n == 330
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    tok = ChatGLMTokenizer(model)
    assert len(tok) == n + 9
    assert [tok.get_command(t) for t in ["[gMASK]", "sop", "<|user|>", "<|observation|>"]] == [
        n + 1,
        n + 3,
        n + 6,
        n + 8,
    ]
    for text in ["你好 world", "unseen 😀 龘\n  x\ty", "", "<|user|>"]:
        assert tok.encode(text) == [n + 1, n + 3] + sp.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.build_single_message("user", "", "你好") == [n + 6] + sp.encode("\n") + sp.encode("你好")
    tok.save_pretrained(tmp_path / "saved")
    assert ChatGLMTokenizer.from_pretrained(tmp_path / "saved").encode("unseen 😀") == tok.encode("unseen 😀")


def test_trained_spm_v1_layout(tmp_path):
    model = train_tiny_spm_v1(tmp_path / "ice_text.model", TRAIN_LINES, vocab_size=450)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces = [sp.id_to_piece(i) for i in range(4 + len(CHATGLM_V1_USER_DEFINED_SYMBOLS))]
    assert pieces == ["<unk>", "<s>", "</s>", "<pad>", *CHATGLM_V1_USER_DEFINED_SYMBOLS]
    assert (sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("<eop>")) == (5, 8, 9)
    assert (sp.piece_to_id("<n>"), sp.piece_to_id("<|tab|>"), sp.piece_to_id("<|blank_2|>")) == (12, 13, 14)
    assert sp.piece_to_id("<|blank_80|>") == 92 and sp.id_to_piece(93) == "<0x00>"
    tok = ChatGLMv1Tokenizer(model, num_image_tokens=0)
    assert len(tok) == 450 and tok.pad_token_id == 3
    text = "def f(x):\n    return x\t# 😀   end"
    ids = tok.encode(text)
    assert ids[-2:] == [5, 8]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert {"<n>", "<|blank_4|>", "<|tab|>", "<|blank_3|>"} <= set(tok.convert_ids_to_tokens(ids))
