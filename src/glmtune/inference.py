"""The inference engine every front end uses (chat, predict, eval, API server, web UI).

``Engine.generate`` answers a batch of conversations with left padding and a KV cache;
``Engine.stream`` yields the text of one answer as it is produced. Stop tokens come from the
model's template (e.g. ChatGLM3 stops at eos, ``<|user|>`` and ``<|observation|>``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .loading import load_model, load_tokenizer
from .resolve import ResolvedModel, resolve_model
from .specs import ModelSpec


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


class Engine:
    def __init__(self, model, tokenizer, spec: ModelSpec):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.template = spec.template
        self.stop_ids = spec.stop_token_ids(tokenizer)
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
            )
        )

    @classmethod
    def load(cls, model: ResolvedModel) -> Engine:
        """Model + tokenizer of a resolved model; its ``quantization``: int8-cpu | int8-dynamic | 8bit |
        4bit (glmtune.quantize)."""
        loaded = load_model(model)
        if model.quantization:
            from .quantize import quantize_for_inference

            loaded = quantize_for_inference(loaded, model.quantization)
        engine = cls(loaded, load_tokenizer(model), model.spec)
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

    def _finish(self, new_ids: list[int], limit: int) -> tuple[list[int], str]:
        for j, t in enumerate(new_ids):
            if t in self.stop_ids:
                return new_ids[:j], "stop"
        return new_ids, "length" if len(new_ids) >= limit else "stop"

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
                **settings.to_kwargs(),
            )
        results = []
        for prompt, row in zip(prompts, out[:, ids.shape[1] :].tolist()):
            new, reason = self._finish(row, settings.max_new_tokens)
            results.append(Completion(self.decode(new), new, len(prompt), reason))
        return results

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield pieces of text as they are generated for one conversation."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        prompt = self.template.encode_prompt(self.tokenizer, messages)
        ids, mask = self._batch([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error: list[BaseException] = []

        def run():
            try:
                with self.lock, torch.no_grad():
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.pad_id,
                        streamer=streamer,
                        **settings.to_kwargs(),
                    )
            except BaseException as e:  # re-raised in the consumer's thread below
                error.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started = False
        for piece in streamer:
            if not started:
                piece = self.template.clean_reply(piece, partial=True)
                started = bool(piece)
            if piece:
                yield piece
        thread.join()
        if error:
            raise error[0]
