"""``glmtune serve MODEL_DIR`` (or a training run folder): :func:`register` adds the command to the ``glmtune`` parser.

Importing this module is cheap (argparse only); fastapi, uvicorn and the model load when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import add_loading_args, loading_kwargs, model_path, positive_float, positive_int

__all__ = ["register"]


def cmd_serve(args) -> int:
    from ..doctor import warn_untested_versions
    from ..errors import ConfigError

    warn_untested_versions()

    try:
        from .app import serve
    except ImportError as e:
        raise ConfigError(
            f"glmtune serve needs fastapi and uvicorn: pip install 'glmtune[serve]' ({e})"
        ) from None
    serve(
        args.model,
        adapter=args.adapter,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        timeout=args.timeout,
        model_name=args.model_name,
        backend=args.backend,
        **loading_kwargs(args),
        max_body_bytes=args.max_body_bytes,
        log_level=args.log_level,
    )
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add ``serve`` to the sub-command parsers ``sub`` (from ``parser.add_subparsers``)."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP API (chat/completions, completions, models, health)",
        description="Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn): POST "
        "/v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Requests are batched "
        "(--max-batch-size) from a bounded queue (--max-queue; full -> HTTP 503). Binds 127.0.0.1 unless "
        "--host says otherwise; set --api-key (or GLMTUNE_API_KEY) before exposing it. For many users on a "
        "GPU: glmtune export RUN --out DIR, then vllm serve DIR or glmtune serve DIR --backend vllm.",
    )
    p.add_argument(
        "model",
        type=model_path,
        help="model folder, .gguf file, or training run folder (its final/ adapter or model) "
        "('default' = embedded SmolLM2)",
    )
    p.add_argument(
        "--adapter", type=Path, help="LoRA (peft) folder or official P-Tuning v2 checkpoint folder"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $GLMTUNE_API_KEY)")
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="most answers generated together in one batch (default 8)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="most requests waiting for the model; more are refused with 503 (default 64)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        help="seconds a request may wait and generate in all (default 120)",
    )
    p.add_argument("--model-name", help="model id clients use (default: the model or adapter folder name)")
    p.add_argument(
        "--backend",
        choices=["native", "vllm"],
        default="native",
        help="native (transformers, CPU or GPU) or vllm (needs vLLM installed; merged models only)",
    )
    add_loading_args(p)
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="largest request body accepted; larger -> 413 (default 1 MiB)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p
