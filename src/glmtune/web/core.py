"""The web UI's logic as plain functions: prompts, JSON display, generation, the base-vs-tuned
comparison and a training run's summary. :mod:`glmtune.web.app` only lays these out in Gradio."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.inference import GenerationSettings
from glmtune.metrics import extract_json

from .store import format_prompt

__all__ = [
    "Backend",
    "InputError",
    "JsonView",
    "RunView",
    "build_messages",
    "json_view",
    "make_settings",
    "read_run",
]

MODES = ("instruction", "chat")
MAX_NEW_TOKENS_LIMIT = 4096


class InputError(GlmtuneError, ValueError):
    """The request from the form can't be answered (names the field)."""


# ------------------------------------------------------------------------------------------ JSON view
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|Json)?[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_FIRST_BRACKET = re.compile(r"[{\[]")


@dataclass
class JsonView:
    """How an answer shows as JSON: ``status`` is ``valid``, ``invalid`` (the answer holds something
    JSON-like that does not parse) or ``none`` (plain text); ``message`` is the line the UI shows."""

    status: str
    value: Any = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "valid"


def _decode_reason(e: json.JSONDecodeError) -> str:
    # json says "Invalid control character at": the position follows in our own words.
    msg = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
    return f"{msg} (line {e.lineno}, column {e.colno})"


def json_view(text: str | None) -> JsonView:
    """Parse an answer as :func:`glmtune.metrics.extract_json` does (fenced block, whole text, or an
    object/array from the first bracket) and say why it fails when it looks like JSON but isn't."""
    if not isinstance(text, str) or not text.strip():
        return JsonView("none", None, "no answer yet")
    ok, value = extract_json(text)
    if ok:
        return JsonView("valid", value, "✓ valid JSON")
    fence = _FENCE.search(text)
    bracket = _FIRST_BRACKET.search(text)
    if fence is None and bracket is None:
        return JsonView("none", None, "no JSON in the answer")
    try:
        if fence is not None:
            body = fence.group(1).strip()
            if not body:
                return JsonView("invalid", None, "✗ invalid JSON: the code block is empty")
            json.loads(body)
        else:
            stripped = text.strip()
            json.JSONDecoder().raw_decode(stripped, _FIRST_BRACKET.search(stripped).start())
        reason = "not parseable"  # pragma: no cover - extract_json would have accepted it
    except json.JSONDecodeError as e:
        reason = _decode_reason(e)
    except (ValueError, RecursionError) as e:  # e.g. an integer literal over Python's digit limit
        reason = str(e) or type(e).__name__
    return JsonView("invalid", None, f"✗ invalid JSON: {reason}")


# ---------------------------------------------------------------------------------------- requests
def make_settings(max_new_tokens: Any = 256, temperature: Any = 0.0, top_p: Any = 1.0) -> GenerationSettings:
    """Generation settings from the form's sliders, checked and clamped to sane ranges."""
    try:
        n = int(max_new_tokens)
        t = float(temperature)
        p = float(top_p)
    except (TypeError, ValueError):
        raise InputError(
            f"settings: expected numbers, got {max_new_tokens!r}, {temperature!r}, {top_p!r}"
        ) from None
    if n < 1:
        raise InputError(f"max new tokens: expected at least 1, got {n}")
    if t < 0:
        raise InputError(f"temperature: expected 0 (greedy) or more, got {t}")
    if not 0 < p <= 1:
        raise InputError(f"top-p: expected a value in (0, 1], got {p}")
    return GenerationSettings(max_new_tokens=min(n, MAX_NEW_TOKENS_LIMIT), temperature=t, top_p=p)


def _clean_history(history: Any) -> list[dict]:
    """Chat history as the Chatbot holds it -> plain ``{"role", "content"}`` text messages."""
    out = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        content = m.get("content")
        if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}]
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
    return out


def build_messages(
    mode: str,
    instruction: str = "",
    text: str = "",
    *,
    fmt: str = "context_target",
    system: str = "",
    history: Any = None,
) -> list[dict]:
    """The conversation to send. ``instruction`` mode: one user turn in the training prompt format
    (:func:`glmtune.web.store.format_prompt`), history ignored. ``chat`` mode: the system prompt,
    the history and ``text`` as the next user turn."""
    instruction = instruction or ""
    text = text or ""
    if mode == "instruction":
        if not instruction.strip():
            raise InputError("instruction: empty; write the task (or switch to free chat)")
        return [{"role": "user", "content": format_prompt(instruction, text, fmt)}]
    if mode != "chat":
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if not text.strip():
        raise InputError("message: empty; type something to send")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + _clean_history(history) + [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------- backend
_END = object()


class Backend:
    """The engine(s) behind the UI.

    ``engine`` answers as the model being tried (with its adapter, if any); the base model for the
    Compare tab is either ``base`` (a second engine: a P-Tuning adapter, or the base model of a full
    fine-tune) or, for a LoRA adapter, the same engine with the adapter switched off
    (``engine.model.disable_adapter()``, under ``engine.lock`` so that no other generation runs
    with the adapter off). Any object with ``stream(messages, settings)`` works as an engine (tests
    inject fakes).
    """

    def __init__(self, engine, *, model: str = "", adapter: str | None = None, base=None):
        self.engine = engine
        self.model = model
        self.adapter = adapter
        self.base = base
        # Other adapters loaded for the Compare tab (a run trained from the Train tab), by key (their path).
        self.variants: dict[str, _Variant] = {}
        # The LoRA engine's active peft adapter (its name in the peft model), when adapters are swapped.
        self._peft_name = "default"
        self._guard = threading.Lock()  # adding and switching adapters

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        *,
        base_model: str | os.PathLike | None = None,
        dtype=None,
        device: str | None = None,
        trust_remote_code: bool = False,
        generation: str | None = None,
        quantization: str | None = None,
        template=None,
    ) -> Backend:
        from glmtune.inference import Engine
        from glmtune.runs import resolve_model_or_run

        # None: a run's own settings, else the machine's (see glmtune.resolve.resolve_model).
        kw = dict(
            dtype=dtype,
            device=device,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
            generation=generation,
            template=template,  # a prompt template (name or YAML file); None: a run's own, else the model's
        )
        # A run folder (or run config) is what the run produced: its base + final/ adapter, or final/.
        resolved = resolve_model_or_run(model, adapter=adapter, **kw)
        engine = Engine.load(resolved)
        base = None
        if base_model is not None:
            base = Engine.load(resolve_model_or_run(base_model, **kw))
        elif resolved.adapter is not None and not _is_lora(engine):
            # P-Tuning: the prefix can't be switched off
            base = Engine.load(resolved.replace(adapter=None))
        adapter = resolved.adapter if adapter is None else adapter
        return cls(engine, model=str(model), adapter=None if adapter is None else str(adapter), base=base)

    @property
    def can_compare(self) -> bool:
        return self.base is not None or _is_lora(self.engine)

    @property
    def compare_note(self) -> str:
        if self.base is not None:
            return "**Base**: a separately loaded base model. **Fine-tuned**: " + self.describe()
        if _is_lora(self.engine):
            return f"**Base**: the model with the LoRA adapter switched off. **Fine-tuned**: with `{self.adapter}`."
        return (
            "No adapter is loaded, so there is nothing to compare with: start "
            "`glmtune web MODEL --adapter DIR` (or `--base-model DIR` for a full fine-tune)."
        )

    def describe(self) -> str:
        return f"{self.model} + {self.adapter}" if self.adapter else self.model

    def model_overrides(self) -> list[str]:
        """Config overrides naming the base model this backend runs (``model.path``, and
        ``model.generation`` / ``model.trust_remote_code`` when they were set), for a run that continues
        from its adapter; [] for an engine that doesn't say what it was loaded from."""
        resolved = getattr(self.engine, "resolved", None)
        if resolved is None:
            return []
        out = [f"model.path={json.dumps(str(resolved.path))}"]
        if resolved.generation_forced:
            out.append(f"model.generation={resolved.generation}")
        if resolved.trust_remote_code:
            out.append("model.trust_remote_code=true")
        return out

    def prepare(self, messages: list[dict], settings: GenerationSettings) -> list[dict]:
        """Drop the oldest exchanges that don't fit the context (engines that can tell)."""
        fit = getattr(self.engine, "fit_history", None)
        return fit(messages, settings.max_new_tokens)[0] if fit is not None else messages

    def stream(
        self,
        messages: list[dict],
        settings: GenerationSettings,
        *,
        base: bool = False,
        variant: str | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the answer of the model in use (or of the base model, ``base=True`` or
        ``variant="base"``, or of another loaded adapter, ``variant=KEY`` from :meth:`choices`)."""
        variant = "base" if base else (variant or CURRENT)
        if variant == CURRENT:
            yield from self.engine.stream(messages, settings)
        elif variant == BASE:
            if self.base is not None:
                yield from self.base.stream(messages, settings)
            elif _is_lora(self.engine):
                yield from _stream_switched(
                    self.engine, self.engine.model.disable_adapter, messages, settings
                )
            else:
                raise InputError("compare: no base model (start with --adapter or --base-model)")
        else:
            v = self.variants.get(variant)
            if v is None:
                raise InputError(f"compare: no adapter {variant!r} is loaded")
            if v.engine is not None:
                yield from v.engine.stream(messages, settings)
            else:
                model = self.engine.model
                yield from _stream_switched(
                    self.engine, lambda: _peft_active(model, v.peft_name), messages, settings
                )

    def answer(
        self,
        messages: list[dict],
        settings: GenerationSettings,
        *,
        base: bool = False,
        variant: str | None = None,
    ) -> Iterator[str]:
        """Like :meth:`stream`, but yields the whole answer so far each time."""
        text = ""
        for piece in self.stream(messages, settings, base=base, variant=variant):
            text += piece
            yield text

    # ---------------------------------------------------------------- more adapters (Train -> Compare)
    def choices(self) -> list[tuple[str, str]]:
        """``(label, key)`` of every model the Compare tab can run: the base model (when there is
        one), the model in use, and each adapter loaded with :meth:`add_adapter`."""
        out = [("base model", BASE)] if self.can_compare else []
        out.append((f"in use: {self.describe()}", CURRENT))
        out += [(f"adapter: {key}", key) for key in self.variants]
        return out

    def add_adapter(self, path: str | os.PathLike) -> str:
        """Load another adapter of the same base model for the Compare tab; returns its key (the folder).

        Beside a LoRA engine a LoRA adapter is loaded into the same peft model (no second copy of the
        base weights) and switched on only while it answers; anything else (P-Tuning, an engine with
        no LoRA) gets an engine of its own."""
        folder = Path(path).absolute()
        key = str(folder)
        with self._guard:
            if key in self.variants or key == self.adapter:
                return key
            if not folder.is_dir():
                raise InputError(f"adapter: {folder} is not a folder")
            if _is_lora(self.engine) and _is_peft_lora(folder):
                name = f"web{len(self.variants) + 1}"
                with self.engine.lock:
                    self.engine.model.load_adapter(str(folder), adapter_name=name)
                    _set_peft_adapter(self.engine.model, self._peft_name)  # keep the one in use active
                self.variants[key] = _Variant(key, peft_name=name)
            else:
                resolved = getattr(self.engine, "resolved", None)
                if resolved is None:
                    raise InputError("adapter: this engine can't load another adapter")
                from glmtune.inference import Engine

                self.variants[key] = _Variant(key, engine=Engine.load(resolved.replace(adapter=folder)))
        return key

    def use(self, key: str) -> None:
        """Make a loaded adapter the one in use (the Playground, feedback, "train again"); the one
        used so far stays loaded as a variant."""
        with self._guard:
            v = self.variants.get(key)
            if v is None:
                raise InputError(f"adapter: no adapter {key!r} is loaded")
            old = str(self.adapter) if self.adapter else None
            if v.peft_name is not None:
                with self.engine.lock:
                    _set_peft_adapter(self.engine.model, v.peft_name)
                previous = _Variant(old, peft_name=self._peft_name) if old else None
                self._peft_name = v.peft_name
            else:
                previous = _Variant(old, engine=self.engine) if old else None
                if old is None and self.base is None:
                    self.base = self.engine  # the plain model in use so far is the base to compare with
                self.engine = v.engine
            del self.variants[key]
            if previous is not None:
                self.variants[old] = previous
            self.adapter = key


def _is_lora(engine) -> bool:
    model = getattr(engine, "model", None)
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


BASE = "base"
CURRENT = "current"


@dataclass
class _Variant:
    """An adapter loaded beside the one in use: into the LoRA engine's peft model (``peft_name``) or
    with an engine of its own."""

    path: str
    peft_name: str | None = None
    engine: Any = None


def _is_peft_lora(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and str(cfg.get("peft_type", "")).upper() == "LORA"


def _set_peft_adapter(model, name: str) -> None:
    model.set_adapter(name, inference_mode=True)  # frozen: inference only


@contextlib.contextmanager
def _peft_active(model, name: str):
    """The peft model with adapter ``name`` active for the block, the previous one active after it."""
    previous = model.active_adapter
    _set_peft_adapter(model, name)
    try:
        yield
    finally:
        _set_peft_adapter(model, previous)


def _stream_switched(engine, switch, messages: list[dict], settings: GenerationSettings) -> Iterator[str]:
    """Stream an answer from a LoRA engine with its adapters switched by ``switch()`` (a context
    manager: the adapter off, another adapter on): a worker thread holds ``engine.lock`` (no other
    generation can run meanwhile) inside ``switch()`` and generates through a view of the engine that
    has its own lock. The worker always ends (max_new_tokens bounds it), so the lock is released even
    if the reader goes away mid-answer."""
    view = copy.copy(engine)
    view.lock = threading.Lock()
    pieces: queue.Queue = queue.Queue()

    def work():
        try:
            with engine.lock, switch():
                for piece in view.stream(messages, settings):
                    pieces.put(piece)
        except BaseException as e:  # handed to the reader below
            pieces.put(e)
        finally:
            pieces.put(_END)

    threading.Thread(target=work, daemon=True, name="glmtune-web-base").start()
    while True:
        item = pieces.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# -------------------------------------------------------------------------------------------- run view
@dataclass
class RunView:
    """What the Train tab shows of a run folder (each part None when the run doesn't have it)."""

    loss_png: Path | None
    summary: dict | None
    report: str | None
    message: str


def read_run(run_dir: str | os.PathLike | None) -> RunView:
    """``loss.png``, ``train_summary.json`` and ``eval/report.md`` of a ``glmtune train`` run."""
    if run_dir is None:
        return RunView(None, None, None, "No run: start `glmtune web MODEL --run RUN_DIR` to see one here.")
    run = Path(run_dir)
    if not run.is_dir():
        return RunView(None, None, None, f"{run}: no such run folder")
    loss = run / "loss.png"
    summary = None
    missing = []
    try:
        summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        missing.append("train_summary.json")
    except (OSError, ValueError) as e:
        summary = {"error": f"train_summary.json: {e}"}
    report = None
    try:
        report = (run / "eval" / "report.md").read_text(encoding="utf-8")
    except FileNotFoundError:
        missing.append("eval/report.md")
    except (OSError, UnicodeDecodeError) as e:
        report = f"eval/report.md: {e}"
    if not loss.is_file():
        missing.append("loss.png")
    message = f"Run `{run}`" + (f" (not there yet: {', '.join(missing)})" if missing else "")
    return RunView(loss if loss.is_file() else None, summary, report, message)
