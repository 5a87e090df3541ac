"""The ``glmtune`` command line. A thin shell: every command calls library code and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import GlmtuneError
from .loading import embedded_model_path


def _model_arg(value: str) -> Path:
    return embedded_model_path() if value == "default" else Path(value)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens in one reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=_model_arg, help="model folder or .gguf file ('default' = embedded SmolLM2)")
    p.add_argument("--adapter", type=Path, help="LoRA (peft) folder or official P-Tuning v2 checkpoint folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running Python code shipped in the model folder (off by default)")


def _engine(args):
    import torch

    from .inference import Engine

    return Engine.from_path(args.model, adapter=args.adapter, dtype=getattr(torch, args.dtype),
                            device=args.device, trust_remote_code=args.trust_remote_code)


def _settings(args):
    from .inference import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def cmd_info(args) -> int:
    from .loading import model_info

    info = model_info(args.model)
    info.pop("config", None)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def cmd_chat(args) -> int:
    engine = _engine(args)
    settings = _settings(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        for piece in engine.stream(history + [{"role": "user", "content": args.prompt}], settings):
            print(piece, end="", flush=True)
        print()
        return 0
    print("glmtune chat: type a message; /clear resets the history, /exit quits.")
    while True:
        try:
            text = input("\nuser> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history = history[:1] if args.system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in engine.stream(history, settings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def cmd_train(args) -> int:
    from .config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise GlmtuneError("glmtune train needs a CONFIG.yaml (see configs/ and --help-config)")
    from .train import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what glmtune detects in a model folder")
    p.add_argument("model", type=_model_arg)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("chat", help="chat in the terminal (streamed), or answer one --prompt")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="fine-tune from a YAML config: glmtune train CONFIG.yaml [key.sub=value ...]",
                       description="Fine-tune from a YAML config with dotted overrides, e.g. "
                       "glmtune train configs/chatglm3/lora.yaml train.learning_rate=1e-4 train.resume=latest. "
                       "Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m glmtune.cli train ...")
    p.add_argument("config", nargs="?", help="YAML config file (or a checkpoint folder holding glmtune_config.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    p.set_defaults(func=cmd_train)

    from .data.commands import register as register_data

    register_data(sub)

    p = sub.add_parser("demo", help="the main job: score, LoRA-tune and re-score the embedded default model")
    p.add_argument("--config", help="run config (default: configs/demo.yaml of the checkout)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GlmtuneError as e:
        print(f"glmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
