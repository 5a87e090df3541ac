"""glmtune web without a browser: the label store, the feedback log, JSON display, prompts, the
backend (with fake engines) and the command's arguments."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from glmtune.data.readers import read_examples
from glmtune.web import (
    Backend,
    FeedbackError,
    FeedbackLog,
    InputError,
    LabelError,
    LabelStore,
    build_messages,
    format_prompt,
    json_view,
    make_settings,
    read_run,
    row_fields,
)
from glmtune.web.testing import FixedEngine


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- store
def test_append_context_target_reads_back_as_training_data(tmp_path):
    store = LabelStore(tmp_path / "data.jsonl")
    assert store.rows() == [] and store.count() == 0 and store.current_format() == "context_target"
    assert store.append("Extract the city as JSON", "I live in Paris.", '{"city": "Paris"}') == 1
    assert store.append("Say hi", "", "hi") == 2
    rows = lines(store.path)
    assert rows[0] == {
        "context": "Instruction: Extract the city as JSON\nInput: I live in Paris.\nAnswer: ",
        "target": '{"city": "Paris"}',
    }
    assert rows[1]["context"] == "Instruction: Say hi\nAnswer: "
    examples = read_examples(store.path).examples
    assert [e.messages[-1]["content"] for e in examples] == ['{"city": "Paris"}', "hi"]
    assert store.table() == [
        [1, "Extract the city as JSON", "I live in Paris.", '{"city": "Paris"}'],
        [2, "Say hi", "", "hi"],
    ]


def test_append_conversations_and_round_trip_of_the_form(tmp_path):
    store = LabelStore(tmp_path / "chat.jsonl", default_format="conversations")
    store.append("Translate to French", "good morning", "bonjour")
    (row,) = lines(store.path)
    assert row == {
        "conversations": [
            {"role": "user", "content": "Translate to French\ngood morning"},
            {"role": "assistant", "content": "bonjour"},
        ]
    }
    assert read_examples(store.path, fmt="conversations").format == "conversations"
    f = store.fields(1)
    assert (f.format, f.instruction, f.input, f.output) == (
        "conversations",
        "Translate to French",
        "good morning",
        "bonjour",
    )
    assert row_fields({"context": format_prompt("a\nb", "c"), "target": "d"}).instruction == "a\nb"


@pytest.mark.parametrize(
    ("instruction", "input", "output", "field"),
    [
        ("", "x", "y", "instruction"),
        ("   ", "x", "y", "instruction"),
        ("do it", "x", "", "output"),
        ("do it", "x", " \n", "output"),
        ("do it", "x", "bad \ud800 text", "output"),  # caught by the training reader itself
        ("say \ud800", "", "ok", "instruction/input"),
    ],
)
def test_invalid_rows_are_refused_naming_the_field(tmp_path, instruction, input, output, field):
    store = LabelStore(tmp_path / "data.jsonl")
    store.append("keep", "", "me")
    before = store.path.read_bytes()
    with pytest.raises(LabelError) as err:
        store.append(instruction, input, output)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert store.path.read_bytes() == before


def test_format_mismatch_foreign_files_and_bad_numbers(tmp_path):
    store = LabelStore(tmp_path / "data.jsonl")
    store.append("a", "", "b")
    with pytest.raises(LabelError, match="holds context_target rows.*choose context_target") as err:
        store.append("c", "", "d", fmt="conversations")
    assert err.value.field == "format"
    with pytest.raises(LabelError, match="unknown format"):
        store.append("c", "", "d", fmt="alpaca")
    for bad in (0, 2, -1, "x", 1.5, None):
        with pytest.raises(LabelError) as err:
            store.delete(bad)
        assert err.value.field == "row"
    assert store.count() == 1

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(LabelError, match="another format"):
        LabelStore(alpaca).append("c", "", "d")
    assert LabelStore(alpaca).table()[0][1] == '{"instruction": "a", "output": "b"}'
    with pytest.raises(LabelError, match="text editor"):
        LabelStore(alpaca).fields(1)

    array = tmp_path / "array.json"
    array.write_text("[]")
    with pytest.raises(LabelError, match="JSON array"):
        LabelStore(array)


def test_a_broken_file_is_never_rewritten(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"context": "Instruction: a\\nAnswer: ", "target": "b"}\n{not json\n')
    before = path.read_bytes()
    store = LabelStore(path)
    with pytest.raises(LabelError, match=r"data.jsonl:2.*fix the file") as err:
        store.append("c", "", "d")
    assert err.value.field == "file"
    assert path.read_bytes() == before


def test_edit_and_delete(tmp_path):
    store = LabelStore(tmp_path / "data.jsonl")
    for i in range(3):
        store.append(f"task {i}", f"in {i}", f"out {i}")
    fp = store.fingerprint(store.get(2))
    store.update(2, "task 1", "in 1", "fixed", expected=fp)
    assert store.fields(2).output == "fixed"
    # The row changed since `fp` was taken: a stale edit or delete is refused.
    with pytest.raises(LabelError, match="changed since it was loaded"):
        store.update(2, "task 1", "in 1", "stale", expected=fp)
    with pytest.raises(LabelError, match="changed since it was loaded"):
        store.delete(2, expected=fp)
    with pytest.raises(LabelError) as err:
        store.update(2, "task 1", "in 1", "")
    assert err.value.field == "output"
    deleted = store.delete(1)
    assert deleted["target"] == "out 0"
    assert [r[3] for r in store.table()] == ["fixed", "out 2"]
    with pytest.raises(LabelError, match="no row 3: the file has 2 rows"):
        store.update(3, "a", "", "b")
    assert len(read_examples(store.path).examples) == 2
    # A file of one row may switch format with its only row.
    store.delete(1)
    store.update(1, "t", "", "o", fmt="conversations")
    assert store.current_format() == "conversations"


def test_concurrent_appends_lose_nothing(tmp_path):
    store = LabelStore(tmp_path / "data.jsonl")
    errors = []

    def work(t):
        try:
            for i in range(10):
                # A second store object on the same file: the lock is per file, not per object.
                (store if i % 2 else LabelStore(store.path)).append(f"thread {t}", f"item {i}", f"{t}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    outputs = [e.messages[-1]["content"] for e in read_examples(store.path).examples]
    assert len(outputs) == 80
    assert sorted(outputs) == sorted(f"{t}-{i}" for t in range(8) for i in range(10))
    assert leftovers(tmp_path) == []


def test_concurrent_edits_and_appends(tmp_path):
    store = LabelStore(tmp_path / "data.jsonl")
    for i in range(10):
        store.append(f"task {i}", "", "original")
    errors = []

    def append(t):
        try:
            for i in range(10):
                store.append(f"new {t}", str(i), f"new {t}-{i}")
        except Exception as e:  # pragma: no cover
            errors.append(e)

    def edit(t):
        try:
            for rnd in range(5):
                for n in range(1 + t, 11, 4):  # rows 1-10 are never moved: only appends happen
                    store.update(n, f"task {n - 1}", "", f"edited by {t} round {rnd}")
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=append, args=(t,)) for t in range(4)]
    threads += [threading.Thread(target=edit, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = store.table()
    assert len(table) == 50 and len(read_examples(store.path).examples) == 50
    assert all(row[3].startswith("edited by") and row[3].endswith("round 4") for row in table[:10])
    assert sorted(r[3] for r in table[10:]) == sorted(f"new {t}-{i}" for t in range(4) for i in range(10))


def _append_in_process(path: str, worker: int) -> None:
    store = LabelStore(path)
    for i in range(15):
        store.append(f"process {worker}", str(i), f"p{worker}-{i}")


def test_two_processes_share_the_file_lock(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (POSIX)")
    ctx = multiprocessing.get_context("fork")  # the children reuse the imported modules: fast
    procs = [ctx.Process(target=_append_in_process, args=(str(tmp_path / "data.jsonl"), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(read_examples(tmp_path / "data.jsonl").examples) == 45


@pytest.mark.parametrize("op", ["append", "update", "delete"])
def test_a_crash_mid_write_leaves_the_previous_file(tmp_path, monkeypatch, op):
    store = LabelStore(tmp_path / "data.jsonl")
    store.append("a", "", "b")
    store.append("c", "", "d")
    before = store.path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        {
            "append": lambda: store.append("e", "", "f"),
            "update": lambda: store.update(1, "a", "", "changed"),
            "delete": lambda: store.delete(2),
        }[op]()
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert leftovers(tmp_path) == []
    # The lock was released: the store still works.
    assert store.append("e", "", "f") == 3


# ------------------------------------------------------------------------------------------- feedback
def test_feedback_rows_have_every_field(tmp_path):
    log = FeedbackLog(tmp_path / "fb" / "feedback.jsonl", model="models/tiny", adapter="runs/x/final")
    log.append("Instruction: a\nAnswer: ", '{"x": 1}', "good", " nice ", mode="instruction")
    log.append("hello", "hi", "✗", "")
    rows = lines(log.path)
    assert [r["verdict"] for r in rows] == ["good", "bad"]
    for r in rows:
        assert set(r) >= {"timestamp", "model", "adapter", "input", "output", "verdict", "comment"}
        assert r["model"] == "models/tiny" and r["adapter"] == "runs/x/final"
        assert r["timestamp"].endswith("Z")
    assert (
        rows[0]["comment"] == "nice" and rows[0]["mode"] == "instruction" and rows[0]["output"] == '{"x": 1}'
    )
    with pytest.raises(FeedbackError, match="nothing to rate"):
        log.append("q", "", "good")
    with pytest.raises(FeedbackError, match="verdict"):
        log.append("q", "a", "meh")


def test_feedback_appends_are_serialized_and_repair_a_torn_line(tmp_path):
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"verdict": "good"}\n{"torn": ')  # a crash mid-line
    log = FeedbackLog(path)
    threads = [
        threading.Thread(target=lambda t=t: [log.append(f"q{t}", f"a{i}", "good") for i in range(5)])
        for t in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = path.read_text().splitlines()
    assert text[1] == '{"torn": '  # left as it was, the new rows start on their own line
    assert len(log.rows()) == 1 + 40


# ----------------------------------------------------------------------------------------- JSON view
@pytest.mark.parametrize(
    ("text", "status", "value"),
    [
        ('{"name": "Ana", "city": "Lima"}', "valid", {"name": "Ana", "city": "Lima"}),
        ('Sure:\n```json\n{"a": [1, 2]}\n```\nDone.', "valid", {"a": [1, 2]}),
        ('[{"s": "x"}] and then more text', "valid", [{"s": "x"}]),
        ('"水果"', "valid", "水果"),
        ("just words", "none", None),
        ("", "none", None),
        (None, "none", None),
    ],
)
def test_json_view(text, status, value):
    view = json_view(text)
    assert (view.status, view.value) == (status, value)
    assert view.ok == (status == "valid")
    if status == "valid":
        assert view.message == "✓ valid JSON"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"name": "Ana", "city": }', "Expecting value (line 1, column 25)"),
        (
            '```json\n{"a": 1,, "b": 2}\n```',
            "Expecting property name enclosed in double quotes (line 1, column 9)",
        ),
        ('{"a": 1', "Expecting ',' delimiter"),
        ("```json\n```", "the code block is empty"),
        ("answer: {name: Ana}", "Expecting property name"),
        ('{"date": "3 May\n2025"}', "Invalid control character (line 1, column 16)"),
    ],
)
def test_json_view_flags_invalid_json_with_the_reason(text, reason):
    view = json_view(text)
    assert view.status == "invalid" and view.value is None
    assert view.message.startswith("✗ invalid JSON: ")
    assert reason in view.message


# ----------------------------------------------------------------------------------- prompts, settings
def test_build_messages():
    assert build_messages("instruction", "Extract", "text") == [
        {"role": "user", "content": "Instruction: Extract\nInput: text\nAnswer: "}
    ]
    assert (
        build_messages("instruction", "Extract", "text", fmt="conversations")[0]["content"] == "Extract\ntext"
    )
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "tool", "content": "ignored"},
    ]
    assert build_messages("chat", "", "how are you", system="be brief", history=history) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    with pytest.raises(InputError, match="^instruction: empty"):
        build_messages("instruction", " ", "x")
    with pytest.raises(InputError, match="^message: empty"):
        build_messages("chat", "", "")
    with pytest.raises(InputError, match="^mode"):
        build_messages("poetry", "a", "b")


def test_make_settings():
    s = make_settings(32.0, 0.7, 0.9)
    assert (s.max_new_tokens, s.temperature, s.top_p) == (32, 0.7, 0.9)
    assert make_settings(10**9).max_new_tokens == 4096
    for bad, field in (((0, 0, 1), "max new tokens"), ((5, -1, 1), "temperature"), ((5, 0, 0), "top-p")):
        with pytest.raises(InputError, match=f"^{field}"):
            make_settings(*bad)
    with pytest.raises(InputError, match="^settings"):
        make_settings(None, 0, 1)


# -------------------------------------------------------------------------------------------- backend
class FakeLoraModel:
    """Enough of a peft model: ``disable_adapter()`` switches a flag."""

    peft_config = {"default": object()}

    def __init__(self):
        self.adapter_on = True

    @contextlib.contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True


class FakeLoraEngine:
    def __init__(self):
        self.model = FakeLoraModel()
        self.lock = threading.Lock()
        self.gate = threading.Event()  # holds the second piece back until the test opens it
        self.gate.set()

    def stream(self, messages, settings=None):
        with self.lock:
            yield "tuned" if self.model.adapter_on else "base"
            assert self.gate.wait(10)
            yield " answer"


def test_backend_with_fixed_and_lora_engines():
    backend = Backend(FixedEngine('{"a": 1}'), model="m")
    answers = list(backend.answer([{"role": "user", "content": "q"}], make_settings()))
    assert len(answers) > 1 and answers[-1] == '{"a": 1}'
    assert all(b.startswith(a) for a, b in zip(answers, answers[1:]))  # the whole answer so far
    assert not backend.can_compare and "--adapter" in backend.compare_note
    with pytest.raises(InputError, match="no base model"):
        list(backend.stream([], make_settings(), base=True))

    engine = FakeLoraEngine()
    lora = Backend(engine, model="m", adapter="a")
    assert lora.can_compare and "switched off" in lora.compare_note
    assert list(lora.answer([], make_settings()))[-1] == "tuned answer"
    engine.gate.clear()
    pieces = lora.stream([], make_settings(), base=True)
    assert next(pieces) == "base"
    # While the base answer is generated the engine's own lock is held: no tuned generation can
    # run with the adapter switched off.
    assert engine.lock.locked() and not engine.model.adapter_on
    engine.gate.set()
    assert list(pieces) == [" answer"]
    assert engine.model.adapter_on
    assert list(lora.answer([], make_settings()))[-1] == "tuned answer"

    two = Backend(FixedEngine("tuned"), base=FixedEngine("base"))
    assert two.can_compare and list(two.answer([], make_settings(), base=True))[-1] == "base"


def test_read_run(tmp_path):
    assert "--run" in read_run(None).message
    assert "no such run" in read_run(tmp_path / "nope").message
    (tmp_path / "eval").mkdir()
    (tmp_path / "train_summary.json").write_text('{"steps": 3}')
    (tmp_path / "eval" / "report.md").write_text("# report")
    run = read_run(tmp_path)
    assert run.summary == {"steps": 3} and run.report == "# report" and run.loss_png is None
    assert "loss.png" in run.message


# -------------------------------------------------------------------------------------------- command
def test_the_command_binds_loopback_by_default():
    from glmtune.web.commands import _is_loopback, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["web", "models/tiny", "--data", "d.jsonl"])
    assert (args.host, args.port, args.data, args.feedback) == (
        "127.0.0.1",
        7860,
        Path("d.jsonl"),
        Path("feedback.jsonl"),
    )
    assert args.func.__name__ == "cmd_web"
    assert (args.workspace, args.stop_grace) == (Path("glmtune-web"), 120.0)  # runs the Train tab starts
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and not _is_loopback("0.0.0.0")
