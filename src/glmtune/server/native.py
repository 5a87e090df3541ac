"""The native backend: a bounded queue and ONE worker thread running batched ``model.generate``.

The worker takes up to ``max_batch_size`` waiting rows (a job with ``n`` answers is ``n`` rows; a
single job larger than that runs alone), waits a few milliseconds for more when the batch is not full
(the gather window), left-pads the prompts like :meth:`glmtune.inference.Engine.generate`, and runs them
as one ``model.generate`` with three hooks:

- :class:`RowSampler` (a ``LogitsProcessor``): per-row OpenAI presence / frequency penalties and per-row
  sampling (temperature, top_p, a per-request seeded generator). It draws the token itself and leaves
  only that token's logit finite, so ``generate`` runs greedy (``do_sample=False``) for the whole batch
  and greedy rows are untouched: a greedy row gives what ``Engine.generate`` gives for it alone.
- :class:`BatchStreamer` (a ``BaseStreamer``): receives the ``[B]`` new ids of each step and feeds each
  row's :class:`~glmtune.server.jobs.Row`, which sends the request its new text.
- :class:`RowStopper` (a ``StoppingCriteria``): stops rows that reached their own ``max_tokens``, hit a
  stop string, or whose request was cancelled (client gone, timeout); ``generate`` ends when every row
  has stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..inference import Engine, GenerationSettings
from .jobs import Failed, Job, QueueFull, Row, make_rows

log = logging.getLogger(__name__)


class RowSampler(LogitsProcessor):
    """Per-row penalties and sampling; see the module docstring."""

    def __init__(self, jobs: list[Job], width: int, device: torch.device):
        self.width = width
        self.presence = torch.tensor([j.presence_penalty for j in jobs], dtype=torch.float32, device=device)
        self.frequency = torch.tensor([j.frequency_penalty for j in jobs], dtype=torch.float32, device=device)
        self.penalize = any(j.penalized for j in jobs)
        self.sampled = [i for i, j in enumerate(jobs) if not j.greedy]
        self.temperature = torch.tensor([j.temperature for j in jobs], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([j.top_p for j in jobs], dtype=torch.float32, device=device)
        # One generator per seeded job, shared by its n rows (they differ, and repeat across calls).
        gens: dict[int, torch.Generator] = {}
        self.generators = []
        for j in jobs:
            if j.seed is not None and j.id not in gens:
                gens[j.id] = torch.Generator(device=device).manual_seed(j.seed)
            self.generators.append(gens.get(j.id))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.penalize and input_ids.shape[1] > self.width:
            generated = input_ids[:, self.width :]
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones_like(generated, dtype=scores.dtype)
            )
            scores = (
                scores
                - counts * self.frequency[:, None]
                - (counts > 0).to(scores.dtype) * self.presence[:, None]
            )
        if not self.sampled:
            return scores
        rows = torch.tensor(self.sampled, device=scores.device)
        logits = scores[rows] / self.temperature[rows, None]
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass ranked above each token
        sorted_logits = sorted_logits.masked_fill(before >= self.top_p[rows, None], float("-inf"))
        probs = sorted_logits.softmax(-1)
        picks = []
        for k, r in enumerate(self.sampled):
            picks.append(torch.multinomial(probs[k], 1, generator=self.generators[r]))
        tokens = order.gather(1, torch.stack(picks))  # [S, 1]
        chosen = torch.full_like(logits, float("-inf")).scatter_(1, tokens, 0.0)
        scores = scores.clone()
        scores[rows] = chosen
        return scores


class BatchStreamer(BaseStreamer):
    """Feeds each step's ``[B]`` new token ids to the batch's rows (the first ``put`` is the prompt)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.push(int(token))

    def end(self):
        pass


class RowStopper(StoppingCriteria):
    def __init__(self, rows: list[Row], width: int):
        self.rows = rows
        self.width = width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.width
        done = [r.done or r.job.expired() or produced >= r.job.max_tokens for r in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class NativeBackend:
    """Batched generation with :class:`~glmtune.inference.Engine` in one worker thread."""

    name = "native"

    def __init__(
        self, engine: Engine, *, max_batch_size: int = 8, max_queue: int = 64, gather_ms: float = 8.0
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.template = engine.template
        self.context_length = engine.context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.gather_s = gather_ms / 1000
        self._stop_ids = set(engine.stop_ids)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0  # jobs in the batch being generated
        self.batches = 0
        self._thread = threading.Thread(target=self._work, name="glmtune-serve-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ used by the event loop
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.template.encode_prompt(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (``QueueFull``)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The request is gone: drop it from the queue, or stop its rows at the next step."""
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass

    def stats(self) -> dict:
        return {
            "queue_depth": len(self._pending),
            "running": self.running,
            "max_queue": self.max_queue,
            "max_batch_size": self.max_batch_size,
            "batches": self.batches,
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.emit(Failed(503, "the server is shutting down", "server_error"))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread
    def _take(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            end = time.monotonic() + self.gather_s
            while sum(j.n for j in self._pending) < self.max_batch_size and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rows = [], 0
            while self._pending:
                job = self._pending[0]
                if job.expired():
                    self._pending.popleft()
                    job.emit(Failed(504, "the request timed out while waiting in the queue", "timeout_error"))
                    continue
                if batch and rows + job.n > self.max_batch_size:
                    break
                batch.append(self._pending.popleft())
                rows += job.n
            self.running = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                if self._closed:
                    return
                continue
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every request of the batch gets an answer
                log.exception("generation failed")
                for job in batch:
                    job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.running = 0
                self.batches += 1

    def _rows(self, batch: list[Job]) -> list[Row]:
        rows = []
        for job in batch:
            if job.chat and self.template.stop_strings:  # the template's stop strings end chat replies too
                job.stop = list(dict.fromkeys([*job.stop, *self.template.stop_strings]))
            rows += make_rows(self.tokenizer, self.template, job, self._stop_ids)
        return rows

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        engine = self.engine
        rows = self._rows(batch)
        jobs = [r.job for r in rows]
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, j in enumerate(jobs):  # left padding, as Engine.generate does
            ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[i, width - len(j.prompt_ids) :] = 1
        device = engine.device
        ids, mask = ids.to(device), mask.to(device)
        kwargs = GenerationSettings(max_new_tokens=max(j.max_tokens for j in jobs), temperature=0).to_kwargs()
        if any(j.penalized or not j.greedy for j in jobs):
            kwargs["logits_processor"] = LogitsProcessorList([RowSampler(jobs, width, device)])
        with engine.lock:
            engine.model.generate(
                input_ids=ids,
                attention_mask=mask,
                eos_token_id=engine.stop_ids,
                pad_token_id=engine.pad_id,
                streamer=BatchStreamer(rows),
                stopping_criteria=StoppingCriteriaList([RowStopper(rows, width)]),
                **kwargs,
            )
        for r in rows:  # generate ended: whatever is still open reached the batch's length limit
            r.finish("cancelled" if r.job.expired() else "length")
