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


def model_path(value: str) -> Path | str:
    """A model folder, a .gguf file, "default" (the embedded SmolLM2), or a hub id kept as written: it is
    fetched when the command resolves its model, not while the arguments are parsed."""
    from .resolve import is_hub_id, resolve_model_path

    if value != "default" and not Path(value).exists() and is_hub_id(value):
        return value
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


def template_ref(value: str) -> str:
    """A prompt template: a YAML file, or the name of a shipped one (alpaca, chatml, vicuna, ...); the file's
    contents are checked when the command resolves its model (errors name the file and key)."""
    from .user_templates import shipped_templates

    if Path(value).is_file() or value in shipped_templates():
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: no such template file, and not a shipped template ({', '.join(shipped_templates())})"
    )


def add_template_arg(p: argparse.ArgumentParser) -> None:
    """--template NAME|FILE: a prompt template instead of the model generation's own."""
    p.add_argument(
        "--template",
        type=template_ref,
        metavar="NAME|FILE",
        help="prompt template: a YAML file or a shipped name (alpaca, chatml, vicuna) instead of the model's "
        "own chat format (default: a run's template, else the model's)",
    )


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """--generation, --template, --dtype, --device, --quantize and --trust-remote-code: how a command loads
    its model.

    Unset, they follow the machine (CUDA when present; bf16/fp16 on a GPU, float32 on the CPU), or for a
    run folder the run's own settings."""
    add_generation_arg(p)
    add_template_arg(p)
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: a run's model.dtype, else auto: bf16/fp16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default auto: CUDA when present)")
    p.add_argument(
        "--quantize",
        choices=["none", "int8-cpu", "int8-dynamic", "8bit", "4bit"],
        help="quantized inference, each weight quantized as it loads: int8, or bitsandbytes 8/4-bit on a "
        "CUDA GPU or the CPU (default: a run's model.quantization, else none)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running Python code shipped in the model folder (off by default)",
    )


def loading_kwargs(args: argparse.Namespace) -> dict:
    """What :func:`add_loading_args` parsed, as the keyword arguments of ``resolve_model`` and the loaders."""
    return {
        "generation": args.generation,
        "dtype": args.dtype,
        "device": args.device,
        "quantization": args.quantize,
        "trust_remote_code": args.trust_remote_code,
        "template": args.template,
    }
