"""glmtune.metrics: official ChatGLM ROUGE/BLEU, JSON answers, SPO/label P/R/F1, the demo dataset.

Expected values are worked out by hand in the comments; one case per ROUGE/BLEU definition is also
checked against calling rouge_chinese / nltk directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.metrics import (
    PredictionsFileError,
    detect_task,
    extract_json,
    json_exact_match,
    json_field_accuracy,
    label_prf,
    parse_labels,
    parse_triples,
    rouge_bleu_chatglm3,
    rouge_bleu_chatglm6b,
    score_predictions_file,
    spo_prf,
    task_metrics,
    valid_json_rate,
)

from conftest import REPO, shared_path

jieba = pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")
pytest.importorskip("nltk")

approx = pytest.approx


def _spo(*triples: tuple[str, str, str], fenced: bool = True) -> str:
    """An SPO answer in the seed dataset's layout (a ```json list with the type keys too)."""
    items = [
        {"predicate": p, "object_type": "人物", "subject_type": "影视作品", "object": o, "subject": s}
        for s, p, o in triples
    ]
    body = json.dumps(items, ensure_ascii=False)
    return f"```json\n{body}\n```" if fenced else body


# ----------------------------------------------------------------------------------------------------
# ROUGE / BLEU


def test_jieba_cuts_ascii_words_and_keeps_spaces():
    # The hand computations below rely on this segmentation (spaces are tokens of their own).
    assert list(jieba.cut("aa bb cc dd")) == ["aa", " ", "bb", " ", "cc", " ", "dd"]


def test_partial_overlap_hand_computed():
    # pred "aa bb cc dd" vs ref "aa bb cc ee"; ROUGE sees the words aa bb cc dd / aa bb cc ee.
    # rouge-1: unigram sets share {aa, bb, cc}: p = r = 3/4 -> f = 0.75 -> 75.0
    # rouge-2: bigrams {aa bb, bb cc, cc dd} vs {aa bb, bb cc, cc ee} share 2: p = r = 2/3 -> 66.6667
    # rouge-l: LCS = aa bb cc = 3 words: p = r = 3/4 -> 75.0
    # (rouge_chinese's f = 2pr / (p + r + 1e-8); the 4-decimal rounding removes the 1e-8.)
    # ChatGLM3 BLEU-4 on jieba tokens (7 each, spaces included, last token dd vs ee):
    #   p1 = 6/7, p2 = 5/6, p3 = 4/5, p4 = 3/4 (every n-gram matches except those ending in dd),
    #   equal lengths -> BP = 1, BLEU = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** 0.25 = 0.809107
    # ChatGLM-6B BLEU-4 on characters (11 each, the last two differ):
    #   p1 = 9/11, p2 = 8/10, p3 = 7/9, p4 = 6/8 -> (9*8*7*6 / (11*10*9*8)) ** 0.25 = (21/55) ** 0.25
    preds, refs = ["aa bb cc dd"], ["aa bb cc ee"]
    r3 = rouge_bleu_chatglm3(preds, refs)
    r6 = rouge_bleu_chatglm6b(preds, refs)
    for r in (r3, r6):
        assert r["rouge-1"] == approx(75.0, abs=1e-4)
        assert r["rouge-2"] == approx(66.6667, abs=1e-4)
        assert r["rouge-l"] == approx(75.0, abs=1e-4)
        assert r["n"] == 1 and r["n_empty"] == 0
    assert r3["bleu-4"] == approx(100 * (3 / 7) ** 0.25, abs=1e-6)  # 80.9107
    assert r6["bleu-4"] == approx(100 * (21 / 55) ** 0.25, abs=1e-4)  # 78.6075
    assert (r3["definition"], r3["bleu_unit"]) == ("chatglm3", "words")
    assert (r6["definition"], r6["bleu_unit"]) == ("chatglm6b", "characters")


def test_perfect_match_is_100():
    # Identical texts of >= 4 tokens: every n-gram precision is 1 -> BLEU 1; ROUGE f rounds to 100.
    preds = refs = ["aa bb cc dd", "今天天气很好，我们去公园散步吧。"]
    for fn in (rouge_bleu_chatglm3, rouge_bleu_chatglm6b):
        r = fn(preds, refs)
        for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
            assert r[k] == approx(100.0, abs=1e-4), (fn.__name__, k)


def test_one_word_perfect_match_is_not_100():
    # pred = ref = "ab" (one jieba word, two characters).
    # rouge-1 = rouge-l = 100; rouge-2: no bigrams on either side -> p = r = 0 -> 0.
    # ChatGLM3 BLEU (1 token): p1 = 1, then p2, p3, p4 have 0 matches over a denominator of 1 and
    #   method3 replaces them by 1/2, 1/4, 1/8 -> (1/64) ** 0.25 = 2 ** -1.5 = 0.353553
    # ChatGLM-6B BLEU (2 chars): p1 = p2 = 1, p3 -> 1/2, p4 -> 1/4 -> (1/8) ** 0.25 = 2 ** -0.75 = 0.594604
    r3 = rouge_bleu_chatglm3(["ab"], ["ab"])
    r6 = rouge_bleu_chatglm6b(["ab"], ["ab"])
    for r in (r3, r6):
        assert (r["rouge-1"], r["rouge-2"], r["rouge-l"]) == approx((100.0, 0.0, 100.0), abs=1e-4)
    assert r3["bleu-4"] == approx(100 * 2**-1.5, abs=1e-6)  # 35.3553
    assert r6["bleu-4"] == approx(59.4604, abs=1e-4)


def test_empty_prediction_or_reference_scores_zero():
    # Example 1: empty prediction -> 0 everywhere (rouge_chinese would raise "Hypothesis is empty.").
    # Example 2: whitespace-only reference -> 0. Example 3: perfect -> 100. Mean = 100 / 3.
    preds = ["", "aa bb cc dd", "aa bb cc dd"]
    refs = ["aa bb cc dd", "  \n", "aa bb cc dd"]
    for fn in (rouge_bleu_chatglm3, rouge_bleu_chatglm6b):
        r = fn(preds, refs)
        assert r["n"] == 3 and r["n_empty"] == 2
        for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
            assert r[k] == approx(100 / 3, abs=1e-4)
    assert rouge_bleu_chatglm3([], [])["rouge-1"] == 0.0


def test_matches_rouge_chinese_and_nltk_directly():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred, ref = "这款连衣裙采用柔软的棉质面料，穿着舒适。", "这款连衣裙选用柔软面料，上身舒适透气。"
    pw, rw = list(jieba.cut(pred)), list(jieba.cut(ref))
    scores = Rouge().get_scores(" ".join(pw), " ".join(rw))[0]
    m3 = SmoothingFunction().method3
    r3 = rouge_bleu_chatglm3([pred], [ref])
    r6 = rouge_bleu_chatglm6b([pred], [ref])
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        assert r3[k] == r6[k] == round(scores[k]["f"] * 100, 4)
    assert r3["bleu-4"] == approx(sentence_bleu([rw], pw, smoothing_function=m3) * 100)
    assert r6["bleu-4"] == round(sentence_bleu([list(ref)], list(pred), smoothing_function=m3) * 100, 4)
    assert 0 < r6["rouge-1"] < 100 and r3["bleu-4"] != r6["bleu-4"]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_bleu_chatglm3(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        spo_prf(["[]"], [])


# ----------------------------------------------------------------------------------------------------
# JSON answers


@pytest.mark.parametrize(
    "text, value",
    [
        ('```json\n[{"a": 1}]\n```', [{"a": 1}]),
        ('Sure! Here it is:\n```json\n{"a": 1}\n```\nAnything else?', {"a": 1}),
        ('```\n["水果"]\n```', ["水果"]),
        ("  ```JSON\n[1, 2]```  ", [1, 2]),
        ('```json\n{"a": 1}', {"a": 1}),  # unterminated fence (generation stopped early)
        ('  ["水果"]\n', ["水果"]),
        ('{"name": "Alice Chen"}', {"name": "Alice Chen"}),
        ('"水果"', "水果"),
        ('Answer: {"a": [1, 2]} and then the model kept talking', {"a": [1, 2]}),
        ('{"a": 1}\nInstruction: next question', {"a": 1}),
    ],
)
def test_extract_json_accepts(text, value):
    assert extract_json(text) == (True, value)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "水果", "The answer is Paris.", '```json\n[{"a": 1},\n```', '{"a": 1', None, 42],
)
def test_extract_json_rejects(text):
    assert extract_json(text) == (False, None)


def test_valid_json_rate():
    # fenced ok, bare ok, prose no, empty no -> 2/4
    preds = ['```json\n[{"a": 1}]\n```', '["x"]', "I think it is 水果", ""]
    assert valid_json_rate(preds) == 0.5
    assert valid_json_rate([]) == 0.0


REF = json.dumps({"name": "Alice Chen", "city": "Paris", "date": "2024-03-15"})
REF2 = json.dumps({"name": "Bob Li", "city": "Oslo", "date": "2023-01-02"})


def test_json_exact_match_and_field_accuracy():
    preds = [
        # keys reordered, fenced, different spacing: same parsed dict -> exact, 3/3 fields
        '```json\n{"date": "2024-03-15", "city": "Paris",  "name": "Alice Chen"}\n```',
        # date not normalised -> not exact, 2/3 fields
        '{"name": "Bob Li", "city": "Oslo", "date": "02/01/2023"}',
        # not JSON -> wrong, 0/3 fields
        "name: Alice Chen, city: Paris",
        # an extra key -> not exact, but all 3 reference fields right
        '{"name": "Alice Chen", "city": "Paris", "date": "2024-03-15", "age": 30}',
    ]
    refs = [REF, REF2, REF, REF]
    assert json_exact_match(preds, refs) == 0.25  # 1 of 4
    assert json_field_accuracy(preds, refs) == approx((3 + 2 + 0 + 3) / 12)  # 8/12
    assert json_exact_match(refs, refs) == json_field_accuracy(refs, refs) == 1.0


def test_json_equality_is_strict_about_types():
    # true is not 1, "1" is not 1; a non-object reference is one field compared whole
    assert json_exact_match(["[true]", '["1"]', "[1]"], ["[1]", "[1]", "[1]"]) == approx(1 / 3)
    assert json_field_accuracy(['{"a": true}', "[1, 2]"], ['{"a": 1}', "[1, 2]"]) == 0.5


# ----------------------------------------------------------------------------------------------------
# SPO triples

A = ("花样男子", "编剧", "神尾叶子")
B = ("花样男子", "出版社", "集英社")
C = ("古刹钟声", "导演", "朱文顺")
D = ("古刹钟声", "主演", "庞学勤")
E = ("红楼梦", "作者", "曹雪芹")


def test_parse_triples_strips_dedups_and_skips_bad_items():
    text = (
        '```json\n[{"subject": " 花样男子 ", "predicate": "编剧", "object": "神尾叶子"},'
        ' {"subject": "花样男子", "predicate": "编剧", "object": "神尾叶子", "object_type": "人物"},'
        ' {"subject": "花样男子", "predicate": "编剧"}, "junk"]\n```'
    )
    assert parse_triples(text) == {A}
    assert parse_triples("no json here") == set()
    assert parse_triples('{"subject": "红楼梦", "predicate": "作者", "object": "曹雪芹"}') == {E}


def test_spo_prf_partial_match_with_duplicates_and_garbage():
    # Row 1: ref {A, B, C}; pred A, A again (duplicate, with a different object_type), D -> {A, D}
    #        tp 1, n_pred 2, n_ref 3.
    # Row 2: ref {E}; pred is not JSON -> no triples: tp 0, n_pred 0, n_ref 1.
    # Micro: tp 1, n_pred 2, n_ref 4 -> P = 1/2, R = 1/4, F1 = 2 * (1/8) / (3/4) = 1/3.
    dup = json.dumps(
        [
            {"predicate": "编剧", "object_type": "人物", "subject_type": "影视作品", "object": "神尾叶子",
             "subject": "花样男子"},
            {"predicate": "编剧", "object_type": "作家", "subject_type": "书籍", "object": "神尾叶子 ",
             "subject": "花样男子"},
            {"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", "object": "庞学勤",
             "subject": "古刹钟声"},
        ],
        ensure_ascii=False,
    )  # fmt: skip
    preds = [f"```json\n{dup}\n```", "抱歉，我无法回答。"]
    refs = [_spo(A, B, C), _spo(E)]
    r = spo_prf(preds, refs)
    assert (r["tp"], r["n_pred"], r["n_ref"]) == (1, 2, 4)
    assert (r["precision"], r["recall"], r["f1"]) == approx((0.5, 0.25, 1 / 3))


def test_spo_prf_order_free_perfect_and_empty_cases():
    # Same triples in another order, bare instead of fenced -> perfect.
    r = spo_prf([_spo(B, A, fenced=False)], [_spo(A, B)])
    assert (r["precision"], r["recall"], r["f1"], r["tp"]) == (1.0, 1.0, 1.0, 2)
    # Predicting nothing when there is something: 0 / 0 / 0.
    r = spo_prf(["```json\n[]\n```"], [_spo(A)])
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    # Nothing to find and nothing predicted: perfect by convention.
    assert spo_prf(["[]"], ["[]"])["f1"] == 1.0
    # Over-prediction only: tp 1, n_pred 3, n_ref 1 -> P 1/3, R 1, F1 = 2 * (1/3) / (4/3) = 1/2.
    r = spo_prf([_spo(A, C, D)], [_spo(A)])
    assert (r["precision"], r["recall"], r["f1"]) == approx((1 / 3, 1.0, 0.5))


# ----------------------------------------------------------------------------------------------------
# Label sets


def test_parse_labels_forms():
    assert parse_labels('["水果"]') == {"水果"}
    assert parse_labels('```json\n["水果", " 书籍", "水果"]\n```') == {"水果", "书籍"}
    assert parse_labels("水果") == {"水果"}  # bare label
    assert parse_labels('"水果"') == {"水果"}  # JSON string
    assert parse_labels("  ") == set()


def test_label_prf_hand_computed():
    # Row 1: ["水果"] vs ["水果"]: tp 1, pred 1, ref 1, exact.
    # Row 2: bare 水果 vs ["水果", "书籍"]: tp 1, pred 1, ref 2, not exact.
    # Row 3: fenced ["衣服", "衣服"] -> {衣服} vs ["平板"]: tp 0, pred 1, ref 1, not exact.
    # Micro: tp 2, pred 3, ref 4 -> P 2/3, R 1/2, F1 = 2 * (1/3) / (7/6) = 4/7; exact 1/3.
    preds = ['["水果"]', "水果", '```json\n["衣服", "衣服"]\n```']
    refs = ['["水果"]', '["水果", "书籍"]', '["平板"]']
    r = label_prf(preds, refs)
    assert (r["tp"], r["n_pred"], r["n_ref"]) == (2, 3, 4)
    assert (r["precision"], r["recall"], r["f1"], r["exact_match"]) == approx((2 / 3, 0.5, 4 / 7, 1 / 3))
    r = label_prf(refs, refs)
    assert (r["precision"], r["recall"], r["f1"], r["exact_match"]) == (1.0, 1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Task detection and task_metrics


def test_detect_task():
    assert detect_task([_spo(A), _spo(B, C), "[]"]) == "spo"
    assert detect_task(['["水果"]', '["衣服", "平板"]']) == "labels"
    assert detect_task(['["水果"]', "衣服"]) == "labels"  # a bare label among JSON label lists
    assert detect_task(["水果", "衣服"]) == "text"  # only bare words: can't tell from text
    assert detect_task([_spo(A), '["水果"]']) == "json"  # the mixed seed dataset
    assert detect_task([REF, REF2]) == "json"
    assert detect_task(["今天天气很好。", "[1]"]) == "text"
    assert detect_task([]) == "text"


def test_task_metrics_per_task():
    r = task_metrics([_spo(A), "garbage"], [_spo(A), _spo(B)])
    # valid 1/2; triples tp 1, n_pred 1, n_ref 2 -> P 1, R 1/2, F1 2/3; parsed-equal rows 1/2
    assert r["task"] == "spo" and r["n"] == 2
    assert (r["valid_json_rate"], r["json_exact_match"]) == (0.5, 0.5)
    assert (r["precision"], r["recall"], r["f1"]) == approx((1.0, 0.5, 2 / 3))

    r = task_metrics(['["水果"]', "书籍"], ['["水果"]', '["平板"]'])
    assert r["task"] == "labels" and r["valid_json_rate"] == 0.5
    assert (r["f1"], r["exact_match"]) == (0.5, 0.5)

    r = task_metrics(["hello ", "bye"], ["hello", "ciao"])
    assert r == {"task": "text", "n": 2, "exact_match": 0.5}

    r = task_metrics([REF, "oops"], [REF, REF2])
    assert r["task"] == "json" and "spo" not in r and "labels" not in r
    assert (r["valid_json_rate"], r["json_exact_match"], r["json_field_accuracy"]) == (0.5, 0.5, 0.5)

    # Forcing a task overrides detection; unknown tasks are refused.
    assert task_metrics(["水果"], ["水果"], task="labels")["f1"] == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        task_metrics([], [], task="ner")


def test_task_metrics_mixed_rows_scored_per_kind():
    # SPO rows: [A] vs {A, B} (tp 1, pred 1, ref 2) and [] vs [] -> P 1, R 1/2
    # label rows: ["水果"] vs ["衣服"] -> 0
    preds = [_spo(A), "[]", '["水果"]']
    refs = [_spo(A, B), "[]", '["衣服"]']
    r = task_metrics(preds, refs)
    assert r["task"] == "json" and r["valid_json_rate"] == 1.0
    assert r["spo"]["n"] == 2 and (r["spo"]["precision"], r["spo"]["recall"]) == (1.0, 0.5)
    assert r["labels"]["n"] == 1 and r["labels"]["f1"] == 0.0


@pytest.mark.shared
def test_seed_dev_targets_against_themselves():
    path = shared_path("data", "mixed_extraction_classification", "mixed_dev_dataset.jsonl")
    refs = [json.loads(line)["target"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    assert len(refs) > 100
    r = task_metrics(refs, refs)
    assert r["valid_json_rate"] == 1.0 and r["json_exact_match"] == 1.0
    assert r["spo"]["f1"] == 1.0 and r["spo"]["n_ref"] > 0
    assert r["labels"]["f1"] == 1.0 and r["labels"]["exact_match"] == 1.0
    assert r["spo"]["n"] + r["labels"]["n"] == len(refs)
    spo_rows = [t for t in refs if t.startswith("```json")]
    assert task_metrics(spo_rows, spo_rows)["task"] == "spo"
    assert spo_prf(spo_rows, spo_rows)["f1"] == 1.0
    # A model that only outputs the fence opening: no valid JSON, no triples.
    opening_only = ["```json\n"] * len(spo_rows)
    assert valid_json_rate(opening_only) == 0.0 and spo_prf(opening_only, spo_rows)["recall"] == 0.0


# ----------------------------------------------------------------------------------------------------
# Prediction files


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_score_predictions_file(tmp_path):
    rows = [
        {"predict": "aa bb cc dd", "label": "aa bb cc ee"},
        {"predict": "aa bb cc dd", "label": "aa bb cc dd"},
    ]
    r = score_predictions_file(_write_jsonl(tmp_path / "generated_predictions.txt", rows))
    assert r["n"] == 2
    # means of the hand-computed partial example and a perfect one
    assert r["chatglm3"]["rouge-1"] == approx(87.5, abs=1e-4)
    assert r["chatglm3"]["bleu-4"] == approx((100 * (3 / 7) ** 0.25 + 100) / 2, abs=1e-6)
    assert r["chatglm6b"]["bleu-4"] == approx((100 * (21 / 55) ** 0.25 + 100) / 2, abs=1e-4)
    assert r["task"] == {"task": "text", "n": 2, "exact_match": 0.5}

    # ChatGLM-6B's own spelling "labels", a blank line, extra keys
    path = tmp_path / "p6b.txt"
    path.write_text(
        json.dumps({"labels": '["水果"]', "predict": '["水果"]', "prompt": "x"}, ensure_ascii=False) + "\n\n",
        encoding="utf-8",
    )
    r = score_predictions_file(path)
    assert r["n"] == 1 and r["task"]["task"] == "labels" and r["task"]["f1"] == 1.0


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("not json", "not a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ('{"predict": "a"}', "needs 'predict' and 'label'"),
        ('{"predict": 3, "label": "a"}', "'predict' must be a string"),
    ],
)
def test_score_predictions_file_names_the_bad_line(tmp_path, bad_line, message):
    path = tmp_path / "preds.jsonl"
    good = json.dumps({"predict": "a", "label": "a"})
    path.write_text(f"{good}\n{good}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(PredictionsFileError, match=message) as e:
        score_predictions_file(path)
    assert f"{path}:3" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_score_predictions_file_empty(tmp_path):
    with pytest.raises(PredictionsFileError, match="no prediction rows"):
        score_predictions_file(_write_jsonl(tmp_path / "empty.jsonl", []))


# ----------------------------------------------------------------------------------------------------
# The demo dataset (package data beside the demo config, written by examples/make_demo_data.py)

DEMO = REPO / "src" / "glmtune" / "assets" / "demo"


def _demo(split: str) -> list[dict]:
    path = DEMO / f"demo_{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _sentence(row: dict) -> str:
    return row["context"].split("\nInput: ", 1)[1].rsplit("\nAnswer: ", 1)[0]


def test_demo_data_layout_and_held_out_dev():
    import datetime

    train, dev = _demo("train"), _demo("dev")
    assert len(train) == 400 and len(dev) == 60
    for row in train + dev:
        assert set(row) == {"context", "target"}
        assert row["context"].startswith("Instruction: Extract the person, city and date")
        assert row["context"].endswith("\nAnswer: ")
        value = json.loads(row["target"])
        assert list(value) == ["name", "city", "date"]
        datetime.date.fromisoformat(value["date"])
        sentence = _sentence(row)
        assert value["name"] in sentence and value["city"] in sentence
        assert len(row["context"]) + len(row["target"]) < 330  # ~90 SmolLM2 tokens
    train_inputs = {_sentence(r) for r in train}
    assert len(train_inputs) == len(train)
    assert not train_inputs & {_sentence(r) for r in dev}

    def pairs(rows):
        return {(json.loads(r["target"])["name"], json.loads(r["target"])["city"]) for r in rows}

    assert not pairs(train) & pairs(dev)
    # Dates are written in several surface forms, most of them not ISO.
    iso = sum(json.loads(r["target"])["date"] in _sentence(r) for r in train)
    assert iso < len(train) / 4
    # The targets score perfectly against themselves; the demo is a "json" task.
    targets = [r["target"] for r in dev]
    r = task_metrics(targets, targets)
    assert r["task"] == "json" and r["json_exact_match"] == r["json_field_accuracy"] == 1.0


def test_demo_data_is_reproducible(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "examples" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out-dir", str(tmp_path)])
    for split in ("train", "dev"):
        committed = DEMO / f"demo_{split}.jsonl"
        if committed.exists():
            assert (tmp_path / f"demo_{split}.jsonl").read_bytes() == committed.read_bytes()
    assert mod.ordinal(1) == "1st" and mod.ordinal(12) == "12th" and mod.ordinal(23) == "23rd"
