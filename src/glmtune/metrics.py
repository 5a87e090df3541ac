"""Evaluation metrics over lists of strings (predictions vs references), with no model involved.

Two families:

* ROUGE / BLEU exactly as the official ChatGLM fine-tuning scripts compute them (jieba words,
  ``rouge_chinese``, ``nltk``'s ``sentence_bleu`` with smoothing method 3). There are two official
  definitions that differ only in the BLEU unit, so every report carries a ``definition`` field:

  - :func:`rouge_bleu_chatglm3` (ChatGLM3 ``finetune_demo/finetune_hf.py``): BLEU-4 on jieba **words**;
  - :func:`rouge_bleu_chatglm6b` (ChatGLM-6B / ChatGLM2-6B ``ptuning/main.py``): BLEU-4 on
    **characters**.

* Structured-answer metrics for JSON answers: :func:`extract_json`, :func:`valid_json_rate`, SPO
  triple P/R/F1 (:func:`spo_prf`), label-set P/R/F1 (:func:`label_prf`), parsed-JSON exact match and
  per-field accuracy (:func:`json_exact_match`, :func:`json_field_accuracy`), with
  :func:`detect_task` / :func:`task_metrics` picking the right ones from the references.

:func:`score_predictions_file` scores a ``generated_predictions.txt`` (JSONL rows with ``predict`` and
``label``/``labels``) with all of the above.

jieba, rouge_chinese and nltk (the ``eval`` extra) are imported only by the ROUGE/BLEU functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import GlmtuneError

__all__ = [
    "PredictionsFileError",
    "detect_task",
    "extract_json",
    "flat_task_metrics",
    "json_exact_match",
    "json_field_accuracy",
    "label_prf",
    "parse_labels",
    "parse_triples",
    "rouge_bleu_chatglm3",
    "rouge_bleu_chatglm6b",
    "score_predictions_file",
    "spo_prf",
    "task_metric_names",
    "task_metrics",
    "valid_json_rate",
]

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
SPO_KEYS = ("subject", "predicate", "object")


class PredictionsFileError(GlmtuneError, ValueError):
    """A predictions file has a row that cannot be scored (the message names file:line)."""


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up one to one")


# ----------------------------------------------------------------------------------------------------
# ROUGE / BLEU (official ChatGLM definitions)


def _eval_libs():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ROUGE/BLEU need the 'eval' extra (jieba, rouge-chinese, nltk): pip install 'glmtune[eval]' ({e})"
        ) from e
    return jieba, Rouge, sentence_bleu, SmoothingFunction().method3


def _rouge_bleu(preds: Sequence[str], refs: Sequence[str], definition: str) -> dict[str, Any]:
    _check_pairs(preds, refs)
    jieba, Rouge, sentence_bleu, method3 = _eval_libs()
    rouge = Rouge()
    sums = dict.fromkeys((*ROUGE_KEYS, "bleu-4"), 0.0)
    n_empty = 0
    for pred, ref in zip(preds, refs):
        pred, ref = str(pred), str(ref)
        if definition == "chatglm3":
            # finetune_hf.py strips the decoded texts before cutting them.
            pred, ref = pred.strip(), ref.strip()
        pred_words, ref_words = list(jieba.cut(pred)), list(jieba.cut(ref))
        hyp_text, ref_text = " ".join(pred_words), " ".join(ref_words)
        if not hyp_text.split() or not ref_text.split():
            # rouge_chinese raises "Hypothesis is empty." here and the official scripts crash; we score
            # the example 0 on every metric (as LLaMA-Factory's port of the same code does).
            n_empty += 1
            continue
        scores = rouge.get_scores(hyp_text, ref_text)[0]
        for k in ROUGE_KEYS:
            sums[k] += round(scores[k]["f"] * 100, 4)
        if definition == "chatglm3":
            bleu = sentence_bleu([ref_words], pred_words, smoothing_function=method3) * 100
        else:
            bleu = round(sentence_bleu([list(ref)], list(pred), smoothing_function=method3) * 100, 4)
        sums["bleu-4"] += bleu
    n = len(preds)
    report: dict[str, Any] = {k: (v / n if n else 0.0) for k, v in sums.items()}
    report.update(
        definition=definition,
        bleu_unit="words" if definition == "chatglm3" else "characters",
        n=n,
        n_empty=n_empty,
    )
    return report


def rouge_bleu_chatglm3(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """ROUGE-1/2/L and BLEU-4 as ChatGLM3's ``finetune_demo`` computes them, averaged over examples.

    Per example: both texts are stripped and cut into words with ``jieba.cut``; ROUGE is
    ``rouge_chinese.Rouge().get_scores(' '.join(pred_words), ' '.join(ref_words))`` taking each ``f``
    x100 (rounded to 4 decimals, as upstream); BLEU-4 is
    ``sentence_bleu([ref_words], pred_words, smoothing_function=SmoothingFunction().method3)``.

    Difference from upstream, on purpose: upstream reports this BLEU-4 as a 0-1 fraction; here it is
    x100 like the ROUGE values and like the ChatGLM-6B definition, so all numbers share one scale.
    An example whose prediction or reference is empty (or whitespace only) scores 0 on every metric
    (upstream crashes on it); ``n_empty`` counts them.

    Returns ``{"rouge-1", "rouge-2", "rouge-l", "bleu-4", "definition": "chatglm3",
    "bleu_unit": "words", "n", "n_empty"}``; all metrics are 0.0 for empty input lists.
    """
    return _rouge_bleu(preds, refs, "chatglm3")


def rouge_bleu_chatglm6b(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """ROUGE-1/2/L and BLEU-4 as ChatGLM-6B / ChatGLM2-6B ``ptuning/main.py`` compute them.

    ROUGE as in :func:`rouge_bleu_chatglm3` (jieba words, ``f`` x100 rounded to 4 decimals); BLEU-4 on
    **characters**: ``sentence_bleu([list(ref)], list(pred), smoothing_function=method3)`` x100 rounded
    to 4 decimals. Texts are not stripped (upstream scores the decoded text as is). Empty examples
    score 0, as in :func:`rouge_bleu_chatglm3`.

    Returns the same keys with ``"definition": "chatglm6b"`` and ``"bleu_unit": "characters"``.
    """
    return _rouge_bleu(preds, refs, "chatglm6b")


# ----------------------------------------------------------------------------------------------------
# JSON answers

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|Json)?[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_FIRST_BRACKET = re.compile(r"[{\[]")


def extract_json(text: Any) -> tuple[bool, Any]:
    """Parse an answer as JSON: ``(True, value)`` or ``(False, None)``.

    Tried in order:

    1. the first fenced block, `````json ... ````` or a plain ````` ... ````` fence, with any text before
       or after it (an unterminated fence runs to the end of the text);
    2. the whole text, stripped (so bare JSON, including a bare JSON string such as ``"水果"``);
    3. a JSON object or array starting at the first ``{`` or ``[`` of the text, ignoring text before
       and after it (e.g. a model that keeps generating after its answer). Only the first bracket is
       tried, so a broken list never yields one of its inner objects.
    """
    if not isinstance(text, str):
        return False, None
    m = _FENCE.search(text)
    if m:
        body = m.group(1).strip()
        try:
            return True, json.loads(body)
        except ValueError:
            pass
    stripped = text.strip()
    if not stripped:
        return False, None
    try:
        return True, json.loads(stripped)
    except ValueError:
        pass
    m = _FIRST_BRACKET.search(stripped)
    if m:
        try:
            return True, json.JSONDecoder().raw_decode(stripped, m.start())[0]
        except ValueError:
            pass
    return False, None


def valid_json_rate(preds: Sequence[str]) -> float:
    """Fraction of predictions that :func:`extract_json` can parse (0.0 for an empty list)."""
    if not preds:
        return 0.0
    return sum(extract_json(p)[0] for p in preds) / len(preds)


def _json_equal(a: Any, b: Any) -> bool:
    """JSON value equality where true != 1 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    return a == b


def json_exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of examples whose parsed prediction equals the parsed reference (invalid JSON = wrong).

    Equality is on parsed values (key order and whitespace don't matter; ``true`` is not ``1``).
    A reference that is not JSON itself counts as wrong for every prediction.
    """
    _check_pairs(preds, refs)
    if not refs:
        return 0.0
    hits = 0
    for p, r in zip(preds, refs):
        ok_p, vp = extract_json(p)
        ok_r, vr = extract_json(r)
        hits += ok_p and ok_r and _json_equal(vp, vr)
    return hits / len(refs)


def json_field_accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of reference fields the predictions get right, over the whole dataset.

    For a reference object, every key is one field, right when the parsed prediction is an object
    with that key and an equal value (extra predicted keys cost nothing here: see
    :func:`json_exact_match`). A reference that is not an object counts as one field, right when the
    whole parsed value is equal. Invalid prediction JSON gets no field right.
    """
    _check_pairs(preds, refs)
    total = right = 0
    for p, r in zip(preds, refs):
        ok_r, vr = extract_json(r)
        ok_p, vp = extract_json(p)
        if ok_r and isinstance(vr, dict):
            total += len(vr)
            if ok_p and isinstance(vp, dict):
                right += sum(k in vp and _json_equal(vp[k], v) for k, v in vr.items())
        else:
            total += 1
            right += ok_r and ok_p and _json_equal(vp, vr)
    return right / total if total else 0.0


# ----------------------------------------------------------------------------------------------------
# SPO triples and label sets


def _prf(tp: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    """Micro precision/recall/F1; nothing predicted and nothing to find is a perfect 1.0."""
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _as_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
        return None
    return str(v)


def parse_triples(text: Any) -> set[tuple[str, str, str]]:
    """The set of ``(subject, predicate, object)`` triples in an SPO answer (stripped strings).

    The answer is a JSON list (fenced or bare) of objects with ``subject``, ``predicate`` and
    ``object`` keys (``subject_type``/``object_type`` are ignored); a single object is accepted too.
    Items lacking one of the three keys are skipped; unparseable text gives the empty set.
    """
    ok, value = extract_json(text)
    if not ok:
        return set()
    items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    triples = set()
    for item in items:
        if not isinstance(item, dict):
            continue
        parts = tuple(_as_text(item.get(k)) for k in SPO_KEYS)
        if all(parts):
            triples.add(parts)
    return triples


def spo_prf(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Micro-averaged triple precision/recall/F1 over the dataset.

    A triple is (subject, predicate, object), each stripped; order-free; a duplicate within one
    answer counts once; an unparseable prediction predicts no triples. Returns
    ``{"precision", "recall", "f1", "tp", "n_pred", "n_ref"}``.
    """
    _check_pairs(preds, refs)
    tp = n_pred = n_ref = 0
    for p, r in zip(preds, refs):
        pred_set, ref_set = parse_triples(p), parse_triples(r)
        tp += len(pred_set & ref_set)
        n_pred += len(pred_set)
        n_ref += len(ref_set)
    precision, recall, f1 = _prf(tp, n_pred, n_ref)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_pred": n_pred, "n_ref": n_ref}


def parse_labels(text: Any) -> set[str]:
    """The label set of a classification answer.

    A JSON list of labels (fenced or bare; strings and numbers kept, stripped), a JSON string, or
    a bare label (the whole stripped text, when it is not JSON). Empty text gives the empty set.
    """
    if not isinstance(text, str):
        return set()
    ok, value = extract_json(text)
    if ok:
        values = value if isinstance(value, list) else [value]
        return {t for t in (_as_text(v) for v in values) if t}
    bare = text.strip()
    return {bare} if bare else set()


def label_prf(preds: Sequence[str], refs: Sequence[str]) -> dict[str, Any]:
    """Micro precision/recall/F1 over label sets, plus the exact set-match rate.

    Returns ``{"precision", "recall", "f1", "exact_match", "tp", "n_pred", "n_ref"}``.
    """
    _check_pairs(preds, refs)
    tp = n_pred = n_ref = exact = 0
    for p, r in zip(preds, refs):
        ps, rs = parse_labels(p), parse_labels(r)
        tp += len(ps & rs)
        n_pred += len(ps)
        n_ref += len(rs)
        exact += ps == rs
    precision, recall, f1 = _prf(tp, n_pred, n_ref)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "exact_match": exact / len(refs) if refs else 0.0,
        "tp": tp,
        "n_pred": n_pred,
        "n_ref": n_ref,
    }


# ----------------------------------------------------------------------------------------------------
# Task detection and dispatch

TASKS = ("spo", "labels", "json", "text")
_BARE_LABEL_MAX = 32


def _row_kind(ref: str) -> str:
    """'spo', 'labels', 'json', 'empty' (an empty JSON list: either task) or 'text' (not JSON)."""
    ok, value = extract_json(ref)
    if not ok:
        return "text"
    if isinstance(value, str):
        return "labels"
    if isinstance(value, list):
        if not value:
            return "empty"
        if all(isinstance(v, dict) and all(k in v for k in SPO_KEYS) for v in value):
            return "spo"
        if all(isinstance(v, str) for v in value):
            return "labels"
    return "json"


def _is_bare_label(ref: str) -> bool:
    s = str(ref).strip()
    return bool(s) and "\n" not in s and len(s) <= _BARE_LABEL_MAX


def detect_task(refs: Sequence[str]) -> str:
    """Which task the references are: ``"spo"``, ``"labels"``, ``"json"`` or ``"text"``.

    * ``"spo"``: every reference is a JSON list of ``{subject, predicate, object, ...}`` objects (empty
      lists allowed);
    * ``"labels"``: every reference is a JSON list of strings or a JSON string, or a short one-line
      bare label, with at least one JSON one (a set of only bare words is ``"text"``);
    * ``"json"``: every reference is JSON, but not all of one kind above: other JSON, or a mix of SPO
      and label rows such as the seed dataset (:func:`task_metrics` then scores each kind on its rows);
    * ``"text"``: anything else.
    """
    kinds = [_row_kind(r) for r in refs]
    present = set(kinds) - {"empty"}
    if not kinds or present == {"text"}:
        return "text"
    if present == {"spo"}:
        return "spo"
    if present <= {"labels", "text"} and "labels" in present:
        if all(_is_bare_label(r) for r, k in zip(refs, kinds) if k == "text"):
            return "labels"
        return "text"
    if "text" in present:
        return "text"
    return "json"


def task_metrics(preds: Sequence[str], refs: Sequence[str], task: str = "auto") -> dict[str, Any]:
    """The structured-answer metrics of a task (``"auto"``: :func:`detect_task` on ``refs``).

    Always ``{"task", "n"}``; plus, for every task but ``"text"``, ``valid_json_rate`` and
    ``json_exact_match`` (parsed equality), and:

    * ``"spo"``: the :func:`spo_prf` keys (precision, recall, f1, tp, n_pred, n_ref);
    * ``"labels"``: the :func:`label_prf` keys (precision, recall, f1, exact_match, ...);
    * ``"json"``: ``json_field_accuracy``; and where some references are SPO lists or label lists (a
      mixed dataset), ``"spo"`` and/or ``"labels"`` sub-dicts scored on those rows only (an empty-list
      reference goes with the SPO rows when there are any);
    * ``"text"``: ``exact_match`` of the stripped strings.
    """
    _check_pairs(preds, refs)
    if task == "auto":
        task = detect_task(refs)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected 'auto' or one of {', '.join(TASKS)}")
    out: dict[str, Any] = {"task": task, "n": len(refs)}
    if task == "text":
        hits = sum(str(p).strip() == str(r).strip() for p, r in zip(preds, refs))
        out["exact_match"] = hits / len(refs) if refs else 0.0
        return out
    out["valid_json_rate"] = valid_json_rate(preds)
    out["json_exact_match"] = json_exact_match(preds, refs)
    if task == "spo":
        out.update(spo_prf(preds, refs))
    elif task == "labels":
        out.update(label_prf(preds, refs))
    else:
        out["json_field_accuracy"] = json_field_accuracy(preds, refs)
        kinds = [_row_kind(r) for r in refs]
        empty_to = "spo" if "spo" in kinds else "labels"
        for kind, fn in (("spo", spo_prf), ("labels", label_prf)):
            rows = [i for i, k in enumerate(kinds) if k == kind or (k == "empty" and kind == empty_to)]
            if any(kinds[i] == kind for i in rows):
                sub = fn([preds[i] for i in rows], [refs[i] for i in rows])
                out[kind] = {"n": len(rows), **sub}
    return out


#: The ROUGE/BLEU values of one official definition as ``glmtune train`` logs them (``eval_rouge-l``, ...).
ROUGE_BLEU_KEYS = (*ROUGE_KEYS, "bleu-4")
#: Counts in the :func:`task_metrics` reports: not scores, so :func:`flat_task_metrics` leaves them out.
_COUNT_KEYS = frozenset({"n", "tp", "n_pred", "n_ref"})
#: Every name :func:`flat_task_metrics` can give, over all tasks (which of them a data set gets depends
#: on its references: :func:`task_metric_names`).
TASK_METRIC_NAMES = (
    "exact_match",
    "valid_json_rate",
    "json_exact_match",
    "json_field_accuracy",
    "precision",
    "recall",
    "f1",
    *(f"{kind}.{k}" for kind in ("spo", "labels") for k in ("precision", "recall", "f1")),
    "labels.exact_match",
)


def flat_task_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The scores of a :func:`task_metrics` report as one flat mapping: a nested report's keys are
    dotted (``spo.f1``); the task name and the counts (``n``, ``tp``, ``n_pred``, ``n_ref``) are left out."""
    out: dict[str, float] = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(flat_task_metrics(v, f"{prefix}{k}."))
        elif k not in _COUNT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def task_metric_names(refs: Sequence[str], task: str = "auto") -> list[str]:
    """The names :func:`flat_task_metrics` gives for these references (they depend on the references
    only, not on the predictions)."""
    return list(flat_task_metrics(task_metrics(list(refs), list(refs), task=task)))


# ----------------------------------------------------------------------------------------------------
# Prediction files


def _read_predictions(path: Path) -> tuple[list[str], list[str]]:
    preds: list[str] = []
    refs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PredictionsFileError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise PredictionsFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
            label_key = "label" if "label" in row else "labels" if "labels" in row else None
            if "predict" not in row or label_key is None:
                raise PredictionsFileError(
                    f"{where}: a row needs 'predict' and 'label' (or 'labels'), found keys {sorted(row)}"
                )
            for key in ("predict", label_key):
                if not isinstance(row[key], str):
                    raise PredictionsFileError(
                        f"{where}: '{key}' must be a string, got {type(row[key]).__name__}"
                    )
            preds.append(row["predict"])
            refs.append(row[label_key])
    if not preds:
        raise PredictionsFileError(f"{path}: no prediction rows")
    return preds, refs


def score_predictions_file(path: str | os.PathLike, task: str = "auto") -> dict[str, Any]:
    """Score a JSONL predictions file (one ``{"predict": ..., "label": ...}`` per line).

    This is the ``generated_predictions.txt`` layout of the official ChatGLM scripts (ChatGLM-6B
    writes ``labels``; both spellings are accepted; extra keys such as ``prompt`` are ignored; blank
    lines are skipped). Returns ``{"path", "n", "chatglm3": {...}, "chatglm6b": {...},
    "task": {...}}``: both ROUGE/BLEU definitions and :func:`task_metrics`. A bad row raises
    :class:`PredictionsFileError` (a ``ValueError``) naming ``file:line``.
    """
    path = Path(path)
    preds, refs = _read_predictions(path)
    return {
        "path": str(path),
        "n": len(preds),
        "chatglm3": rouge_bleu_chatglm3(preds, refs),
        "chatglm6b": rouge_bleu_chatglm6b(preds, refs),
        "task": task_metrics(preds, refs, task),
    }
