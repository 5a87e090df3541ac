"""What the HTTP layer hands a backend (:class:`Job`) and how each answer's text is tracked (:class:`Row`).

A :class:`Job` is one prompt with ``n`` answers (rows). Backends run in other threads (native) or tasks
(vLLM); they report through the job's asyncio queue with :class:`Delta`, :class:`Done` and :class:`Failed`
events, always via ``loop.call_soon_threadsafe``. Every row ends with exactly one ``Done`` (or the job
with one ``Failed``), so no request is ever left without an answer.

:class:`Row` turns the token ids of one answer into text: it decodes the whole answer each time (so
multi-byte characters split over several tokens come out whole), applies the template's reply cleaning
(ChatGLM3's metadata line, surrounding whitespace), cuts at the first ``stop`` string, and hands out only
text that can no longer change (a trailing partial character, a possible start of a stop string and
trailing whitespace are held back). The streamed pieces therefore add up to exactly the final text.

A chat job with ``tools`` (function names) streams its text while the reply is plain text; from the first
turn that opens with a non-empty metadata line (a function name: a call) nothing more is streamed, and
at the end the template's ``parse_reply`` splits the answer into text and calls. The calls go out as
one ``Delta.tool_calls`` (streaming) and in ``Done.tool_calls`` with finish reason ``tool_calls``; a
call that does not parse (bad arguments, unknown function) stays in the text.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

_ids = itertools.count()


class QueueFull(Exception):
    """The bounded queue has no room for the request (HTTP 503)."""


@dataclass
class Delta:
    index: int
    text: str
    tool_calls: list[dict] | None = None  # OpenAI tool call objects (id, type, function)


@dataclass
class Done:
    index: int
    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    completion_tokens: int
    tool_calls: list[dict] | None = None


@dataclass
class Failed:
    status: int
    message: str
    type: str = "server_error"


@dataclass
class Job:
    """One prompt, ``n`` answers. ``index_base`` numbers its choices within the HTTP response."""

    prompt_ids: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    chat: bool = True  # chat replies get the template's cleaning; raw completions don't
    tools: tuple[str, ...] = ()  # names of the functions a chat reply may call (empty: no call parsing)
    deadline: float = float("inf")  # time.monotonic() after which the job is abandoned
    index_base: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def expired(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def emit(self, event) -> None:
        """Thread-safe: queue an event for the request handler (a closed loop means nobody listens)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Row:
    """The text of one answer, built token by token (see the module docstring)."""

    def __init__(
        self,
        job: Job,
        index: int,
        decode: Callable[[list[int]], str],
        clean: Callable[[str, bool], str],
        stop_ids: set[int],
        parse: Callable[[list[int]], object] | None = None,
    ):
        self.job = job
        self.index = index  # choice index in the response
        self._decode = decode  # token ids -> raw text
        self._clean = clean  # (raw text, final?) -> reply text
        self._stop_ids = stop_ids
        self._parse = parse  # token ids -> templates.Reply (text + tool calls), for jobs with tools
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False
        self._needs_text = job.stream or bool(job.stop)

    def push(self, token: int) -> None:
        """One more generated token (ignored once the row is done)."""
        if self.done:
            return
        if self.job.expired():  # client gone or timed out: the handler has answered already
            self.finish("cancelled")
            return
        if token in self._stop_ids:
            self.finish("stop")
            return
        self.ids.append(token)
        if self._needs_text:
            text = self._clean(self._decode(self.ids).rstrip("\ufffd"), False)
            cut = self._find_stop(text)
            if cut is not None:
                self.finish("stop", text[:cut])
                return
            if self.job.stream:
                safe = text[: len(text) - _holdback(text, self.job.stop)]
                if safe.startswith(self.emitted) and len(safe) > len(self.emitted):
                    self.job.emit(Delta(self.index, safe[len(self.emitted) :]))
                    self.emitted = safe
        if len(self.ids) >= self.job.max_tokens:
            self.finish("length")

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.job.stop) if i >= 0]
        return min(hits) if hits else None

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the row: send the rest of its text (streaming) and its ``Done``."""
        if self.done:
            return
        self.done = True
        if reason == "cancelled" or self.job.expired():
            return  # nobody is listening (the handler answered the timeout itself)
        calls = None
        if text is None:
            if self._parse is not None:
                reply = self._parse(self.ids)
                text = reply.content
                calls = [_call_object(c) for c in reply.tool_calls] or None
            else:
                text = self._clean(self._decode(self.ids), True)
            cut = self._find_stop(text)
            if cut is not None:
                # A stop string in the text ends the answer before any call that follows it.
                text, reason, calls = text[:cut], "stop", None
        if calls:
            reason = "tool_calls"
        if self.job.stream and len(text) > len(self.emitted):
            # `text` extends what was sent (the pieces were prefixes of it); never resend sent text.
            self.job.emit(Delta(self.index, text[len(self.emitted) :]))
        if self.job.stream and calls:
            self.job.emit(Delta(self.index, "", calls))
        self.job.emit(Done(self.index, text, reason, len(self.ids), calls))


def _call_object(call) -> dict:
    """OpenAI's tool call object for a ``templates.ToolCall``."""
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def make_rows(tokenizer, template, job: Job, stop_ids: set[int]) -> list[Row]:
    """The ``n`` rows of a job (choice indexes from ``job.index_base``)."""
    decode, clean = text_functions(tokenizer, template, job, chat=job.chat)
    parse = None
    if job.chat and job.tools:
        names = set(job.tools)

        def parse(ids):
            return template.parse_reply(tokenizer, ids, names)

    return [Row(job, job.index_base + i, decode, clean, stop_ids, parse) for i in range(job.n)]


def text_functions(tokenizer, template, job: Job, *, chat: bool):
    """(decode, clean) for a job: chat replies are decoded like ``Engine.decode``; raw completions are
    decoded after the last prompt tokens so a leading space is kept."""
    if chat:
        tools = bool(job.tools)

        def decode(ids):
            if tools:  # only the first turn streams: a later one is a call (or text after it)
                ids = template.reply_turns(tokenizer, ids)[0]
            return tokenizer.decode(ids, skip_special_tokens=True)

        role_tokens = template.reply_has_metadata_line

        def clean(raw: str, final: bool) -> str:
            if not final and role_tokens and "\n" not in raw:
                return ""  # still in the metadata line, which the final text drops
            if not final and tools and role_tokens and raw.split("\n", 1)[0].strip():
                return ""  # a function name: a call, held until the reply is complete
            if not final:
                # Trailing whitespace may be stripped at the end: hold it back.
                return template.clean_reply(raw).rstrip()
            return template.clean_reply(raw)

        return decode, clean

    context = job.prompt_ids[-4:]
    head = tokenizer.decode(context, skip_special_tokens=True)

    def decode_raw(ids):
        full = tokenizer.decode(context + ids, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)

    return decode_raw, lambda raw, final: raw
