"""Files the web UI writes: the labelled dataset (:class:`LabelStore`) and the feedback log (:class:`FeedbackLog`).

Both are safe to use from many threads and from several processes at once:

* every write holds a process-wide lock for the file *and* an OS lock (``fcntl.flock``) on a sidecar
  lock file beside it, so two browser tabs, or two ``glmtune web`` processes, never lose an update;
* the dataset is rewritten atomically (temporary file in the same folder, fsync, ``os.replace``): a
  crash or a full disk mid-write leaves the previous version, never half a file;
* the feedback log is appended to, one fsync'd line per rating.

Rows are validated with the same reader training uses (:func:`glmtune.data.readers.read_examples`),
so a row the store accepts is a row ``glmtune train`` accepts. Errors name the form field at fault.

Nothing here imports Gradio: the UI in :mod:`glmtune.web.app` is a thin layer over these classes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glmtune.atomic import write_jsonl
from glmtune.data.readers import DataError, iter_raw_rows, read_examples
from glmtune.errors import GlmtuneError

try:  # POSIX; elsewhere only the in-process lock applies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LABEL_FORMATS",
    "BadAnswer",
    "FeedbackError",
    "FeedbackLog",
    "LabelError",
    "LabelFields",
    "LabelStore",
    "file_lock",
    "format_prompt",
    "row_fields",
]

# The two training formats the Label tab writes.
LABEL_FORMATS = ("context_target", "conversations")

# Cells of the saved-rows table are cut to this many characters.
TABLE_CELL_CHARS = 200


class LabelError(GlmtuneError, ValueError):
    """A labelled row is refused. ``field`` is the form field at fault (instruction, input, output,
    format, row) or ``file`` for a problem with the dataset file itself."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class FeedbackError(GlmtuneError, ValueError):
    """A feedback row is refused (nothing to rate yet, an unknown verdict)."""


# ---------------------------------------------------------------------------------------------- locks
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def lock_path_for(path: str | os.PathLike) -> Path:
    """The sidecar lock file of ``path``: ``.NAME.lock`` in the same folder (it is left in place)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive write lock of ``path``: a process-wide lock, then ``flock`` on the sidecar."""
    path = Path(path)
    with _process_lock(path):
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path_for(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ row shapes
_CONTEXT = re.compile(r"Instruction: (?P<instruction>.*?)(?:\nInput: (?P<input>.*?))?\nAnswer: ", re.DOTALL)


def format_prompt(instruction: str, input: str = "", fmt: str = "context_target") -> str:
    """The user text of a row: ``Instruction: …\\nInput: …\\nAnswer: `` (context_target) or the
    instruction and the input on the next line (conversations). An empty input is left out."""
    if fmt == "context_target":
        middle = f"\nInput: {input}" if input.strip() else ""
        return f"Instruction: {instruction}{middle}\nAnswer: "
    return f"{instruction}\n{input}" if input.strip() else instruction


@dataclass
class LabelFields:
    """A row as the Label form shows it."""

    format: str
    instruction: str
    input: str
    output: str


def row_fields(row: dict) -> LabelFields | None:
    """The form fields of a row written in one of :data:`LABEL_FORMATS`, or None when the row has
    more than the form can show (a system prompt, several turns, tools, another format)."""
    if set(row) == {"context", "target"} and isinstance(row["target"], str):
        m = _CONTEXT.fullmatch(row["context"]) if isinstance(row["context"], str) else None
        if m is None:
            return None
        return LabelFields("context_target", m["instruction"], m["input"] or "", row["target"])
    conv = row.get("conversations")
    if set(row) == {"conversations"} and isinstance(conv, list) and len(conv) == 2:
        user, reply = conv
        if (
            isinstance(user, dict)
            and isinstance(reply, dict)
            and set(user) == set(reply) == {"role", "content"}
            and (user["role"], reply["role"]) == ("user", "assistant")
            and isinstance(user["content"], str)
            and isinstance(reply["content"], str)
        ):
            instruction, _, input = user["content"].partition("\n")
            return LabelFields("conversations", instruction, input, reply["content"])
    return None


def row_format(row: dict) -> str | None:
    """Which of :data:`LABEL_FORMATS` a raw row is written in (None: another one)."""
    conv = row.get("conversations")
    if isinstance(conv, list):
        first = next((m for m in conv if isinstance(m, dict)), None)
        return "conversations" if first is None or "role" in first else None
    if "context" in row:
        return "context_target"
    return None


def _fingerprint(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def _cut(text: str, limit: int = TABLE_CELL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Reader field -> the form field it was built from.
def _form_field(fmt: str, field: str | None) -> str:
    if field is None:
        return "row"
    if fmt == "context_target":
        return {"context": "instruction/input", "target": "output"}.get(field, "row")
    m = re.match(r"conversations\[(\d+)\]", field)
    if m:
        return "instruction/input" if m.group(1) == "0" else "output"
    return "row"


def validate_row(row: dict, fmt: str) -> None:
    """Raise :class:`LabelError` unless ``row`` reads back with ``read_examples(..., fmt=fmt)``, the
    reader training uses. The row goes through a temporary file, exactly as training would read it."""
    fd, tmp = tempfile.mkstemp(prefix="glmtune-label-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")  # \u escapes carry any surrogate
        read_examples(tmp, fmt=fmt)
    except DataError as e:
        raise LabelError(_form_field(fmt, e.field), e.reason) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- store
class LabelStore:
    """A JSONL training file the Label tab appends to, edits and deletes from.

    The path is fixed when the store is made; rows are numbered from 1 as the table shows them.
    Every change reads the file afresh under :func:`file_lock`, applies itself and rewrites the file
    with :func:`glmtune.atomic.write_jsonl`, so concurrent writers never lose a row and
    a failed write leaves the previous file. ``update`` and ``delete`` take an optional ``expected``
    fingerprint (from :meth:`fingerprint`): when given, the row must not have changed since it was
    read, or the change is refused (another tab edited or deleted rows in between).
    """

    def __init__(self, path: str | os.PathLike, default_format: str = "context_target"):
        self.path = Path(path).absolute()
        if default_format not in LABEL_FORMATS:
            raise LabelError(
                "format", f"unknown format {default_format!r}; expected {' or '.join(LABEL_FORMATS)}"
            )
        self.default_format = default_format
        if self.path.is_dir():
            raise LabelError("file", f"{self.path} is a folder, not a data file")
        if self.path.exists():
            head = self.path.read_bytes()[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
            if head[:1] == b"[":
                raise LabelError(
                    "file",
                    f"{self.path} is a JSON array; the Label tab writes JSONL "
                    "(convert it with: glmtune data convert FILE OUT.jsonl --to jsonl)",
                )

    @property
    def lock_path(self) -> Path:
        return lock_path_for(self.path)

    # ---------------------------------------------------------------- reading
    def rows(self) -> list[dict]:
        """All rows of the file (an absent or empty file has none). A line that is not a JSON object
        raises :class:`LabelError` naming it: the store never rewrites a file it can't read whole."""
        if not self.path.exists():
            return []
        try:
            return [row for _, row in iter_raw_rows(self.path)]
        except DataError as e:
            raise LabelError("file", f"{e}; fix the file before labelling into it") from None

    def count(self) -> int:
        return len(self.rows())

    def file_format(self, rows: list[dict] | None = None) -> str | None:
        """The format of the file's first row (None for an empty file or a foreign format)."""
        rows = self.rows() if rows is None else rows
        return row_format(rows[0]) if rows else None

    def current_format(self) -> str:
        """The format new rows get: the file's, or the default for an empty file."""
        return self.file_format() or self.default_format

    def get(self, number: int) -> dict:
        rows = self.rows()
        return rows[self._index(number, rows)]

    def fields(self, number: int) -> LabelFields:
        """The form fields of row ``number``, for editing; refused for rows the form can't show."""
        fields = row_fields(self.get(number))
        if fields is None:
            raise LabelError(
                "row",
                f"row {number} has more than an instruction, an input and an output; edit it in a text editor",
            )
        return fields

    @staticmethod
    def fingerprint(row: dict) -> str:
        return _fingerprint(row)

    def table(self, rows: list[dict] | None = None) -> list[list]:
        """``[number, instruction, input, output]`` per row, cells cut to :data:`TABLE_CELL_CHARS`."""
        out = []
        for i, row in enumerate(self.rows() if rows is None else rows, 1):
            f = row_fields(row)
            if f is None:
                out.append([i, _cut(json.dumps(row, ensure_ascii=False)), "", ""])
            else:
                out.append([i, _cut(f.instruction), _cut(f.input), _cut(f.output)])
        return out

    # ---------------------------------------------------------------- building rows
    def make_row(self, instruction: str, input: str, output: str, fmt: str | None = None) -> dict:
        """The training row for the form's fields, validated (:class:`LabelError` names the field)."""
        fmt = fmt or self.default_format
        if fmt not in LABEL_FORMATS:
            raise LabelError("format", f"unknown format {fmt!r}; expected {' or '.join(LABEL_FORMATS)}")
        for name, value in (("instruction", instruction), ("input", input), ("output", output)):
            if value is None and name == "input":
                continue
            if not isinstance(value, str):
                raise LabelError(name, f"expected text, got {type(value).__name__}")
        input = input or ""
        if not instruction.strip():
            raise LabelError("instruction", "empty: write the task for the model")
        if not output.strip():
            raise LabelError("output", "empty: write the answer the model should give")
        if fmt == "context_target":
            if "\nAnswer: " in instruction or "\nInput: " in instruction:
                raise LabelError(
                    "instruction", 'contains "\\nInput: " or "\\nAnswer: ", which the prompt format uses'
                )
            if "\nAnswer: " in input:
                raise LabelError("input", 'contains "\\nAnswer: ", which the prompt format uses')
            row: dict[str, Any] = {"context": format_prompt(instruction, input, fmt), "target": output}
        else:
            row = {
                "conversations": [
                    {"role": "user", "content": format_prompt(instruction, input, fmt)},
                    {"role": "assistant", "content": output},
                ]
            }
        validate_row(row, fmt)
        return row

    def _check_format(self, fmt: str, rows: list[dict]) -> None:
        have = self.file_format(rows)
        if rows and have is None:
            raise LabelError(
                "file",
                f"{self.path.name} holds rows in another format; the Label tab writes {' or '.join(LABEL_FORMATS)}",
            )
        if have is not None and have != fmt:
            raise LabelError(
                "format",
                f"{self.path.name} holds {have} rows; a {fmt} row would not read back with them (choose {have})",
            )

    def _index(self, number: Any, rows: list[dict]) -> int:
        n: int | None = None
        if isinstance(number, float) and number.is_integer():
            n = int(number)
        elif isinstance(number, (int, str)) and not isinstance(number, bool):
            try:
                n = int(str(number).strip())
            except ValueError:
                pass
        if n is None:
            raise LabelError("row", f"expected a whole row number, got {number!r}")
        if not 1 <= n <= len(rows):
            raise LabelError("row", f"no row {n}: the file has {len(rows)} row{'s' * (len(rows) != 1)}")
        return n - 1

    def _check_expected(self, number: int, row: dict, expected: str | None) -> None:
        if expected is not None and _fingerprint(row) != expected:
            raise LabelError(
                "row",
                f"row {number} changed since it was loaded (edited or deleted elsewhere); load it again",
            )

    # ---------------------------------------------------------------- writing
    def _write(self, rows: list[dict]) -> None:
        """Rewrite the file atomically; called under :func:`file_lock`.

        Every store writer holds the lock while its temporary file exists, so a ``.NAME.*.tmp`` found
        here belongs to a writer that died mid-write (SIGKILL, power loss): it is swept."""
        for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        write_jsonl(self.path, rows)

    def append(self, instruction: str, input: str, output: str, fmt: str | None = None) -> int:
        """Validate and append one row; returns its row number."""
        fmt = fmt or self.current_format()
        row = self.make_row(instruction, input, output, fmt)
        with file_lock(self.path):
            rows = self.rows()
            self._check_format(fmt, rows)
            rows.append(row)
            self._write(rows)
            return len(rows)

    def update(
        self,
        number: int,
        instruction: str,
        input: str,
        output: str,
        fmt: str | None = None,
        expected: str | None = None,
    ) -> dict:
        """Replace row ``number`` with the form's fields; returns the new row."""
        fmt = fmt or self.current_format()
        row = self.make_row(instruction, input, output, fmt)
        with file_lock(self.path):
            rows = self.rows()
            i = self._index(number, rows)
            self._check_expected(i + 1, rows[i], expected)
            # A file of one row may switch format with it; otherwise the other rows decide.
            self._check_format(fmt, rows[:i] + rows[i + 1 :])
            rows[i] = row
            self._write(rows)
            return row

    def delete(self, number: int, expected: str | None = None) -> dict:
        """Delete row ``number``; returns the deleted row."""
        with file_lock(self.path):
            rows = self.rows()
            i = self._index(number, rows)
            self._check_expected(i + 1, rows[i], expected)
            row = rows.pop(i)
            self._write(rows)
            return row


# -------------------------------------------------------------------------------------------- feedback
VERDICTS = {"good": "good", "bad": "bad", "✓": "good", "✗": "bad", "up": "good", "down": "bad"}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class FeedbackLog:
    """Ratings of answers, one JSON object per line: timestamp, model, adapter, input, output,
    verdict (good / bad), comment, plus any extra fields (mode, settings, messages)."""

    def __init__(self, path: str | os.PathLike, model: str = "", adapter: str | None = None):
        self.path = Path(path).absolute()
        self.model = model
        self.adapter = adapter

    def append(self, input: Any, output: str, verdict: str, comment: str = "", **extra: Any) -> dict:
        verdict_name = VERDICTS.get(str(verdict).strip().lower()) if verdict is not None else None
        if verdict_name is None:
            raise FeedbackError(f"verdict: expected good or bad, got {verdict!r}")
        if not isinstance(output, str) or not output.strip():
            raise FeedbackError("nothing to rate yet: generate an answer first")
        row = {
            "timestamp": _utc_now(),
            "model": self.model,
            "adapter": self.adapter,
            "input": input,
            "output": output,
            "verdict": verdict_name,
            "comment": (comment or "").strip(),
            **extra,
        }
        line = json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace")
        with file_lock(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                # A crash may have left a last line without its newline: never glue a row onto it.
                if f.tell() > 0:
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            line = b"\n" + line
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return row

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [row for _, row in iter_raw_rows(self.path, on_error=lambda e: None)]

    # ---------------------------------------------------------------- ✗ answers -> training rows
    @property
    def corrections_path(self) -> Path:
        """``NAME.corrections.jsonl`` beside the log: which ✗ answers were corrected into the data (the
        feedback log itself is only ever appended to)."""
        return self.path.with_name(f"{self.path.stem}.corrections.jsonl")

    def corrections(self) -> dict[str, dict]:
        """Feedback fingerprint -> its correction record (data file, row number, timestamp)."""
        if not self.corrections_path.exists():
            return {}
        out = {}
        for _, row in iter_raw_rows(self.corrections_path, on_error=lambda e: None):
            if isinstance(row.get("feedback"), str):
                out[row["feedback"]] = row
        return out

    def bad(self) -> list[BadAnswer]:
        """The ✗ answers, oldest first, numbered as rows of the log (1 = its first row)."""
        done = self.corrections()
        out = []
        for number, row in enumerate(self.rows(), 1):
            if row.get("verdict") != "bad" or not isinstance(row.get("output"), str):
                continue
            fp = _fingerprint(row)
            out.append(BadAnswer(number, fp, row, done.get(fp)))
        return out

    def bad_answer(self, number: Any) -> BadAnswer:
        """The ✗ answer at feedback row ``number`` (:class:`FeedbackError` naming it otherwise)."""
        found = {b.number: b for b in self.bad()}
        try:
            n = int(number)
        except (TypeError, ValueError):
            raise FeedbackError(f"✗ answer: expected a row number, got {number!r}") from None
        if n not in found:
            shown = ", ".join(str(k) for k in found) or "none"
            raise FeedbackError(f"✗ answer: feedback row {n} is not a ✗ answer (✗ rows: {shown})")
        return found[n]

    def mark_corrected(self, answer: BadAnswer, data: str | os.PathLike, data_row: int) -> dict:
        """Record that ``answer`` was corrected into row ``data_row`` of the dataset ``data``."""
        record = {
            "timestamp": _utc_now(),
            "feedback": answer.fingerprint,
            "feedback_row": answer.number,
            "data": str(data),
            "data_row": data_row,
        }
        line = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
        with file_lock(self.corrections_path):
            with open(self.corrections_path, "ab") as f:
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return record


@dataclass
class BadAnswer:
    """A ✗ answer of the feedback log: its row ``number`` in the log, a ``fingerprint`` that names it
    in the corrections file, the ``row`` as logged and its ``correction`` (None until corrected)."""

    number: int
    fingerprint: str
    row: dict
    correction: dict | None = None

    def fields(self, fmt: str = "context_target") -> LabelFields:
        """The Label form pre-filled from the answer: the instruction and input of the prompt (free chat:
        the last user message as the instruction), and the wrong answer as the output to correct."""
        prompt = self.row.get("input")
        if self.row.get("mode") == "chat" or not isinstance(prompt, str):
            users = [
                m.get("content")
                for m in self.row.get("messages") or []
                if isinstance(m, dict) and m.get("role") == "user"
            ]
            last = users[-1] if users and isinstance(users[-1], str) else prompt
            instruction, input = (last if isinstance(last, str) else ""), ""
        else:
            m = _CONTEXT.fullmatch(prompt)
            if m is not None:
                instruction, input = m["instruction"], m["input"] or ""
            else:  # the conversations prompt: the instruction, then the input on the next line
                instruction, _, input = prompt.partition("\n")
        return LabelFields(fmt, instruction, input, self.row["output"])
