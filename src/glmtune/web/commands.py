"""``glmtune web MODEL``: :func:`register` adds the command to the ``glmtune`` sub-parsers."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from glmtune.cli_args import add_loading_args, loading_kwargs, model_path, port
from glmtune.errors import GlmtuneError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``web`` to the ``glmtune`` sub-parsers."""
    p = sub.add_parser(
        "web",
        help="browser UI: playground, compare, labelling, training runs (start, watch, stop, resume)",
        description="A local browser UI (Gradio) over the inference engine: try the model (streamed, "
        "JSON answers parsed, ✓/✗ feedback to a JSONL), compare base and fine-tuned answers side by "
        "side, label rows into a training file (✗ answers pre-filled for correction), and start, watch, "
        "stop and resume glmtune train runs, training again from the adapter in use. Binds 127.0.0.1 "
        "unless --host says otherwise.",
    )
    p.add_argument(
        "model",
        type=model_path,
        help="model folder, or training run folder (its final/ adapter or model) ('default' = embedded SmolLM2)",
    )
    p.add_argument("--adapter", type=Path, help="LoRA (peft) or P-Tuning v2 adapter folder")
    p.add_argument(
        "--base-model",
        type=Path,
        help="base model for the Compare tab when MODEL is a full fine-tune (with --adapter the base "
        "is MODEL itself)",
    )
    p.add_argument("--data", type=Path, help="JSONL dataset the Label tab appends to (created if absent)")
    p.add_argument(
        "--label-format",
        default="context_target",
        choices=["context_target", "conversations"],
        help="format of new rows when --data is empty (otherwise the file's own format)",
    )
    p.add_argument(
        "--feedback",
        type=Path,
        default=Path("feedback.jsonl"),
        help="JSONL the ✓/✗ buttons append to (default: ./feedback.jsonl)",
    )
    p.add_argument("--run", type=Path, help="training run folder the Train tab shows until a run is started")
    p.add_argument(
        "--workspace",
        type=Path,
        default=Path("glmtune-web"),
        help="folder for the runs the Train tab starts (runs/<name>) and their logs and state "
        "(default: ./glmtune-web)",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=120.0,
        help="seconds a stopped run gets to save its checkpoint before it is killed (default 120)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    add_loading_args(p)
    p.set_defaults(func=cmd_web)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_web(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise GlmtuneError("glmtune web needs Gradio: pip install 'glmtune[web]'") from None

    from .app import build_app, launch
    from .core import Backend
    from .jobs import TrainJobs
    from .store import FeedbackLog, LabelStore

    store = LabelStore(args.data, default_format=args.label_format) if args.data is not None else None
    if store is not None:
        store.rows()  # a broken file is reported now, not at the first save
    print(f"glmtune web: loading {args.model}" + (f" + {args.adapter}" if args.adapter else ""), flush=True)
    backend = Backend.load(
        args.model,
        args.adapter,
        base_model=args.base_model,
        **loading_kwargs(args),
    )
    feedback = FeedbackLog(args.feedback, model=backend.model, adapter=backend.adapter)
    if args.stop_grace <= 0:
        raise GlmtuneError(f"--stop-grace: expected a positive number of seconds, got {args.stop_grace}")
    jobs = TrainJobs(args.workspace, grace=args.stop_grace)
    jobs.jobs()  # a broken state file is reported now
    app = build_app(backend, store=store, feedback=feedback, run_dir=args.run, jobs=jobs)
    if not _is_loopback(args.host):
        print(
            f"glmtune web: WARNING: listening on {args.host}: anyone who can reach this machine can use "
            "the model, write to the data and feedback files and start training runs (there is no login)",
            flush=True,
        )
    print(
        f"glmtune web: feedback -> {feedback.path}"
        + (f"; labels -> {store.path}" if store is not None else "")
        + f"; training runs -> {jobs.runs_dir}"
        + f"; serving on http://{args.host}:{args.port} (Ctrl+C stops)",
        flush=True,
    )
    try:
        launch(app, args.host, args.port, block=True, quiet=True)  # our own line says where
    except OSError as e:
        raise GlmtuneError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    return 0
