"""Argument types and argument groups shared by the ``glmtune`` sub-commands (argparse only: cheap to
import; the model loader is imported when a model argument is parsed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value!r}")
    return n


def model_path(value: str) -> Path:
    """A model folder, a .gguf file, or "default" (the embedded SmolLM2)."""
    from .resolve import resolve_model_path

    return resolve_model_path(value)


def generation_name(value: str) -> str:
    """A ModelSpec registry name (chatglm, chatglm2, chatglm3, glm4, hf)."""
    from .specs import REGISTRY

    if value not in REGISTRY:
        raise argparse.ArgumentTypeError(f"unknown model generation {value!r} (known: {', '.join(REGISTRY)})")
    return value


def add_generation_arg(p: argparse.ArgumentParser) -> None:
    """--generation: the ModelSpec entry (template, tokenizer, loader) instead of detecting it."""
    p.add_argument(
        "--generation",
        type=generation_name,
        metavar="NAME",
        help="model generation: chatglm, chatglm2, chatglm3, glm4 or hf (default: detected from the folder)",
    )


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """--generation, --dtype, --device and --trust-remote-code: how a command loads its model."""
    add_generation_arg(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running Python code shipped in the model folder (off by default)",
    )
