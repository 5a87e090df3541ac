"""The inference engine every front end uses (chat, predict, eval, API server, web UI).

``Engine.generate`` answers a batch of conversations with left padding and a KV cache;
``Engine.stream`` yields the text of one answer as it is produced. Stop tokens come from the
model's spec and template (e.g. ChatGLM3 stops at eos, ``<|user|>`` and ``<|observation|>``); a prompt
template from YAML (:mod:`glmtune.user_templates`) adds stop strings: generation ends once one is
written (transformers' ``stop_strings``) and the reply is cut before it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria

from .loading import load_model, load_tokenizer
from .resolve import ResolvedModel, resolve_model
from .specs import ModelSpec
from .templates import Template


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def to_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {
                "do_sample": False,
                "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty,
            }
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


def _first_stop(text: str, stops) -> int | None:
    """Where the first of ``stops`` starts in ``text`` (None: nowhere)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops) -> int:
    """Length of the longest end of ``text`` that may begin a stop string (held back while streaming)."""
    for k in range(min(max(map(len, stops), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class _StopFlag(StoppingCriteria):
    """A stopping criterion that ends generation once the streaming consumer has seen a stop string."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class Engine:
    def __init__(self, model, tokenizer, spec: ModelSpec, template: Template | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        # The resolved model's template (ResolvedModel.template: a user template, else the spec's).
        self.template = template if template is not None else spec.template
        self.stop_ids = list(
            dict.fromkeys(spec.stop_token_ids(tokenizer) + self.template.stop_token_ids(tokenizer))
        )
        self.stop_strings = tuple(self.template.stop_strings)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # One generation at a time per engine: the model's KV cache and RNG are not shared safely.
        self.lock = threading.Lock()
        # What the model was resolved as (set by Engine.load; None for an engine built from objects).
        self.resolved: ResolvedModel | None = None

    @classmethod
    def from_path(
        cls,
        path: str | Path | ResolvedModel,
        *,
        adapter=None,
        dtype=None,
        device=None,
        trust_remote_code: bool = False,
        quantize: str | None = None,
        generation: str | None = None,
        template=None,
    ) -> Engine:
        """Resolve ``path`` with these settings (a ``ResolvedModel`` is used as it is), then load it.
        ``dtype``/``device`` None follow the machine (CUDA and bf16/fp16 when present, else CPU float32)."""
        return cls.load(
            resolve_model(
                path,
                generation=generation,
                adapter=adapter,
                dtype=dtype,
                device=device,
                quantization=quantize,
                trust_remote_code=trust_remote_code,
                template=template,
            )
        )

    @classmethod
    def load(cls, model: ResolvedModel) -> Engine:
        """Model + tokenizer of a resolved model; its ``quantization``: int8-cpu | int8-dynamic | 8bit |
        4bit (glmtune.quantize), applied by load_model as the weights stream in."""
        loaded = load_model(model)
        engine = cls(loaded, load_tokenizer(model), model.spec, model.template)
        engine.resolved = model
        return engine

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "seq_length", "max_sequence_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2048

    def fit_history(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """Drop the oldest exchanges (never the system message or the last user turn) until the prompt
        plus ``max_new_tokens`` fits the context; returns (messages, number of messages dropped)."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system) :]
        dropped = 0
        budget = self.context_length - max_new_tokens
        while len(rest) > 1 and len(self.template.encode_prompt(self.tokenizer, system + rest)) > budget:
            # Remove one whole exchange: the first user message and everything up to the next one.
            cut = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), len(rest) - 1)
            rest = rest[cut:]
            dropped += cut
        return system + rest, dropped

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: the replies all start at column `width`
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _finish(self, new_ids: list[int], limit: int) -> tuple[list[int], str, str]:
        """(ids, text, finish reason) of one generated row: cut at the first stop token, then before the
        first stop string (the ids keep the tokens whose text comes before it)."""
        reason = "length" if len(new_ids) >= limit else "stop"
        for j, t in enumerate(new_ids):
            if t in self.stop_ids:
                new_ids, reason = new_ids[:j], "stop"
                break
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = _first_stop(raw, self.stop_strings)
        if cut is not None:
            raw, reason = raw[:cut], "stop"
            # The most leading tokens whose text fits before the stop string (decoded length grows with
            # the number of tokens, so a bisection finds it).
            lo, hi = 0, len(new_ids)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(self.tokenizer.decode(new_ids[:mid], skip_special_tokens=True)) <= cut:
                    lo = mid
                else:
                    hi = mid - 1
            new_ids = new_ids[:lo]
        return new_ids, self.template.clean_reply(raw), reason

    def _stop_kwargs(self) -> dict:
        """generate()'s stop-string arguments (transformers' StopStringCriteria) when there are any."""
        return (
            {"stop_strings": list(self.stop_strings), "tokenizer": self.tokenizer}
            if self.stop_strings
            else {}
        )

    def decode(self, ids: list[int]) -> str:
        return self.template.clean_reply(self.tokenizer.decode(ids, skip_special_tokens=True))

    @torch.no_grad()
    def generate(
        self,
        conversations: list[list[dict]],
        settings: GenerationSettings | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        settings = settings or GenerationSettings()
        prompts = [self.template.encode_prompt(self.tokenizer, msgs) for msgs in conversations]
        ids, mask = self._batch(prompts)
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **self._stop_kwargs(),
                **settings.to_kwargs(),
            )
        results = []
        for prompt, row in zip(prompts, out[:, ids.shape[1] :].tolist()):
            new, text, reason = self._finish(row, settings.max_new_tokens)
            results.append(Completion(text, new, len(prompt), reason))
        return results

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield pieces of text as they are generated for one conversation."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        prompt = self.template.encode_prompt(self.tokenizer, messages)
        ids, mask = self._batch([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []
        flag = _StopFlag()
        extra = self._stop_kwargs()
        if extra:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([flag])

        def run():
            try:
                with self.lock, torch.no_grad():
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.pad_id,
                        streamer=streamer,
                        **extra,
                        **settings.to_kwargs(),
                    )
            except BaseException as e:  # re-raised in the consumer's thread below
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started = False
        # With stop strings the text is held back while it may be the start of one, and cut before it.
        text, sent, stopped = "", 0, False
        for piece in streamer:
            if stopped:
                continue  # drain what the generation thread still puts out before it sees the flag
            if not started:
                piece = self.template.clean_reply(piece, partial=True)
                started = bool(piece)
            if not self.stop_strings:
                if piece:
                    yield piece
                continue
            text += piece
            cut = _first_stop(text, self.stop_strings)
            if cut is not None:
                text, stopped = text[:cut], True
                flag.event.set()
            safe = len(text) if stopped else len(text) - _holdback(text, self.stop_strings)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        if self.stop_strings and not stopped and len(text) > sent:
            yield text[sent:]
        thread.join()
        if error:
            raise error[0]
