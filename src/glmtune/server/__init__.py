"""An OpenAI-compatible HTTP server over the glmtune inference engine: ``glmtune serve MODEL_DIR``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (raw prompts, no
chat template) and ``GET /health``; streaming is server-sent events in OpenAI's chunk format and errors
use OpenAI's ``{"error": {"message", "type", "code"}}`` shape. Any OpenAI client works::

    glmtune serve runs/my-run/merged --api-key secret            # binds 127.0.0.1:8000
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="merged", messages=[{"role": "user", "content": "你好"}])

Tool calls (ChatGLM3 / GLM-4): request ``tools`` are rendered into the system message by the model's
template, a reply naming an offered function comes back as ``message.tool_calls`` (``finish_reason:
"tool_calls"``; streamed as ``delta.tool_calls``), ``role: "tool"`` messages go back as observations; the
template does the rendering and parsing (:mod:`glmtune.templates`), :mod:`.jobs` the streaming.

How requests run (``--backend native``, the default): each request is tokenized and checked on the
event loop, then put into a bounded queue (``--max-queue``; full -> 503). One worker thread takes up to
``--max-batch-size`` waiting rows (``n`` rows per request) after a short gather window and answers them
with ONE batched ``model.generate`` (static batching, left padding, KV cache). Sampling settings are
per row (temperature, top_p, seed, presence/frequency penalties are applied by a logits processor), so
any requests can share a batch; greedy rows give exactly what ``Engine.generate`` gives. A streamer
sends each row's new text to its request as it is produced; a request that times out or whose client
disconnects is cancelled and its row stops at the next step. Generation never runs on the event loop,
so ``/health`` answers while the model is busy.

Scale-out path (GPU, many users): the native backend is static batching on one process, meant for a
workstation, a demo or a small team. For throughput, serve the fine-tuned model with vLLM
(continuous batching, paged attention):

1. merge the adapter into the base weights: ``glmtune export RUN --out DIR``;
2. either ``vllm serve DIR`` (vLLM's own OpenAI server; add ``--trust-remote-code`` for official
   ChatGLM folders), or ``glmtune serve DIR --backend vllm``: the same API, errors, auth and chat
   templates as the native backend, with vLLM's engine doing the generation
   (:mod:`glmtune.server.vllm_backend`; needs ``pip install vllm`` on a CUDA machine).
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str):  # fastapi / uvicorn are imported only when the server is used
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
