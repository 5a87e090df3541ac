"""``glmtune serve DIR --backend vllm``: vLLM's engine behind glmtune's OpenAI-compatible API.

This adapter only generates: the HTTP layer (auth, errors, limits, chat templates incl. ChatGLM3
tools, stop strings, streaming format) is the same as with the native backend. vLLM does continuous
batching and paged attention, so it is the way to serve many users on a GPU. It serves a merged model
folder (``glmtune export RUN --out DIR``), not a base model plus adapter. vLLM needs Linux + CUDA:
``pip install vllm``. (Untested in glmtune's CI, which has no GPU; the test is skipped there.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from ..errors import ConfigError
from .jobs import Failed, Job, QueueFull, make_rows


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
    except ImportError as e:
        raise ConfigError(
            f"--backend vllm needs vLLM, which is not installed here ({e}). Install it on a Linux CUDA machine "
            "(`pip install vllm`), or serve with the native backend (--backend native)."
        ) from None
    return AsyncEngineArgs, AsyncLLMEngine, SamplingParams


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model_dir,
        *,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_batch_size: int = 64,
        max_queue: int = 256,
        generation: str | None = None,
        template=None,
    ):
        from ..loading import load_tokenizer
        from ..resolve import resolve_model

        AsyncEngineArgs, AsyncLLMEngine, SamplingParams = _import_vllm()
        self._SamplingParams = SamplingParams
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(
                f"{model_dir}: --backend vllm needs a model folder (export one with glmtune export)"
            )
        resolved = resolve_model(
            model_dir, generation=generation, trust_remote_code=trust_remote_code, template=template
        )
        self.tokenizer = load_tokenizer(resolved)
        # A prompt template (--template, the run's, the export's), else the spec's.
        self.template = resolved.template
        self.stop_ids = list(
            dict.fromkeys(
                resolved.spec.stop_token_ids(self.tokenizer) + self.template.stop_token_ids(self.tokenizer)
            )
        )
        self.context_length = _context_length(model_dir)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(
                model=str(model_dir),
                dtype="auto" if dtype == "float32" else dtype,
                trust_remote_code=trust_remote_code,
                max_num_seqs=max_batch_size,
                max_model_len=self.context_length,
            )
        )
        self._ids = itertools.count()
        self._tasks: dict[int, asyncio.Task] = {}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.template.encode_prompt(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def submit(self, jobs: list[Job]) -> None:
        if len(self._tasks) + len(jobs) > self.max_queue + self.max_batch_size:
            raise QueueFull(f"too many requests in flight ({len(self._tasks)}); retry later")
        loop = asyncio.get_running_loop()
        for job in jobs:
            self._tasks[job.id] = loop.create_task(self._run(job))

    def cancel(self, job: Job) -> None:
        job.cancelled.set()  # _run notices at its next output and aborts the vLLM request

    def stats(self) -> dict:
        n = len(self._tasks)  # vLLM schedules them itself: running / waiting are estimates
        return {
            "queue_depth": max(0, n - self.max_batch_size),
            "running": min(n, self.max_batch_size),
            "max_queue": self.max_queue,
            "max_batch_size": self.max_batch_size,
        }

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()

    async def _run(self, job: Job) -> None:
        request_id = f"glmtune-{next(self._ids)}"
        params = self._SamplingParams(
            n=job.n,
            temperature=job.temperature,
            top_p=job.top_p,
            max_tokens=job.max_tokens,
            seed=job.seed,
            presence_penalty=job.presence_penalty,
            frequency_penalty=job.frequency_penalty,
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=True,
        )
        if job.chat and self.template.stop_strings:  # the template's stop strings end chat replies too
            job.stop = list(dict.fromkeys([*job.stop, *self.template.stop_strings]))
        rows = make_rows(self.tokenizer, self.template, job, set(self.stop_ids))
        seen = [0] * job.n
        complete = False  # vLLM finished the request itself (else it is aborted)
        try:
            async for out in self.engine.generate({"prompt_token_ids": job.prompt_ids}, params, request_id):
                for comp in out.outputs:
                    row, ids = rows[comp.index], list(comp.token_ids)  # cumulative ids of that answer
                    for t in ids[seen[comp.index] :]:
                        row.push(int(t))
                    seen[comp.index] = len(ids)
                    if comp.finish_reason is not None:
                        row.finish("length" if comp.finish_reason == "length" else "stop")
                complete = bool(out.finished)
                if job.expired() or all(r.done for r in rows):
                    break
            for r in rows:
                r.finish("cancelled" if job.expired() else "length")
        except Exception as e:  # noqa: BLE001 - the request gets an answer
            job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self._tasks.pop(job.id, None)
            if not complete:
                try:
                    await self.engine.abort(request_id)
                except Exception:  # noqa: BLE001
                    pass


def _context_length(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "seq_length", "max_sequence_length"):
        if cfg.get(key):
            return int(cfg[key])
    return 2048
