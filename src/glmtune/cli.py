"""The ``glmtune`` command line. A thin shell: every command calls library code and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import add_generation_arg, add_loading_args, add_template_arg, loading_kwargs, model_path
from .errors import GlmtuneError


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens in one reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        type=model_path,
        help="model folder, .gguf file, or training run folder (its final/ adapter or model, with the run's "
        "generation) ('default' = embedded SmolLM2)",
    )
    p.add_argument(
        "--adapter", type=Path, help="LoRA (peft) folder or official P-Tuning v2 checkpoint folder"
    )
    add_loading_args(p)


def _engine(args):
    from .inference import Engine
    from .runs import resolve_model_or_run

    # A run folder (or run config) is what the run produced: its base + final/ adapter, or final/.
    return Engine.load(
        resolve_model_or_run(
            args.model,
            adapter=args.adapter,
            **loading_kwargs(args),
        )
    )


def _settings(args):
    from .inference import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )


def cmd_info(args) -> int:
    from .loading import model_info
    from .resolve import resolve_model

    info = model_info(resolve_model(args.model, generation=args.generation))
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
        history, dropped = engine.fit_history(history, settings.max_new_tokens)
        if dropped:
            print(f"(history trimmed: {dropped} oldest messages dropped to fit the context)")
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in engine.stream(history, settings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})


def cmd_eval(args) -> int:
    from .evaluate import flatten_metrics, run_eval

    report = run_eval(
        args.target,
        args.data,
        adapter=args.adapter,
        compare_base=args.compare_base,
        out_dir=args.out,
        settings=_settings(args),
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        n_examples=args.examples,
        fmt=args.format,
        **loading_kwargs(args),
    )
    tuned = flatten_metrics(report["tuned"])
    base = flatten_metrics(report["base"]) if "base" in report else None
    for key, value in tuned.items():
        line = f"{key:<45}{value:>12.4f}"
        if base is not None and key in base:
            line += f"{base[key]:>12.4f} (base){value - base[key]:>+12.4f}"
        print(line)
    print(f"report: {report['out_dir']}/report.json, report.md, predictions.jsonl")
    return 0


def cmd_predict(args) -> int:
    from .data import read_examples
    from .evaluate import predict_file

    examples = read_examples(args.data, fmt=args.format, require_reply=False).examples
    engine = _engine(args)
    result = predict_file(engine, examples, Path(args.out), _settings(args), args.batch_size)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def cmd_score(args) -> int:
    from .metrics import score_predictions_file

    print(json.dumps(score_predictions_file(args.predictions), indent=2, ensure_ascii=False))
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(
        args.source,
        args.out,
        format=args.format,
        base=args.base,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        generation=args.generation,
        dtype=args.dtype,
        template=args.template,
        printer=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"exported to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import collect_report, render_json, render_text

    report = collect_report()
    print(render_json(report) if args.json else render_text(report))
    return 0 if report.ok else 1


def cmd_train(args) -> int:
    from .config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    if args.config is None:
        raise GlmtuneError("glmtune train needs a CONFIG.yaml (see configs/ and --help-config)")
    from .doctor import warn_untested_versions
    from .train import train

    warn_untested_versions()

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def cmd_plan(args) -> int:
    from .config import load_config
    from .plan import report

    text, fits = report(
        load_config(args.config, args.overrides),
        serve=args.serve,
        device=args.device,
        memory=args.memory,
        as_json=args.json,
    )
    print(text)
    return 1 if fits is False else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what glmtune detects in a model folder")
    p.add_argument("model", type=model_path)
    add_generation_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("chat", help="chat in the terminal (streamed), or answer one --prompt")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "train",
        help="fine-tune from a YAML config: glmtune train CONFIG.yaml [key.sub=value ...]",
        description="Fine-tune from a YAML config with dotted overrides, e.g. "
        "glmtune train configs/chatglm3/lora.yaml train.learning_rate=1e-4 train.resume=latest. "
        "Multi-GPU: accelerate launch --config_file configs/accelerate/ddp.yaml -m glmtune.cli train ...",
    )
    p.add_argument(
        "config", nargs="?", help="YAML config file (or a checkpoint folder holding glmtune_config.yaml)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    p.add_argument(
        "--help-config", action="store_true", help="list every config key with its type, default and help"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "plan",
        help="predicted peak memory of a config (training, or --serve), before any weight is read",
        description="Predict the peak memory of glmtune train CONFIG (or of serving its model with --serve) "
        "from the model's config.json alone: weights, trainable parameters, gradients, optimizer states, "
        "activations, logits, KV cache; whether it fits a device; what to change if not. Exit status 1 "
        "when it does not fit.",
    )
    p.add_argument("config", help="run config YAML (as for glmtune train)")
    p.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    p.add_argument(
        "--serve", action="store_true", help="plan generation with train.batch_size sequences instead"
    )
    p.add_argument("--device", help="cuda, cuda:N or cpu: fit its memory (and assume its kernels)")
    p.add_argument(
        "--memory", help="fit this much memory, e.g. 24GiB or 80GB (a CUDA GPU unless --device cpu)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="eval loss, ROUGE/BLEU and task metrics; --compare-base for before/after")
    p.add_argument("target", help="run folder, run config YAML, or model folder ('default' = embedded model)")
    p.add_argument("--data", required=True, help="evaluation data file (any supported format)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--adapter", type=Path, help="adapter to evaluate (default: the run's final/)")
    p.add_argument("--compare-base", action="store_true", help="also run the base model and report the delta")
    p.add_argument("--out", type=Path, help="report folder (default: <run>/eval)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-samples", type=int, help="only the first N examples")
    p.add_argument("--examples", type=int, default=5, help="example rows in the Markdown report")
    add_loading_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="batch generation over a dataset into JSONL (resumable)")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--data", required=True, help="input data file (replies optional)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", required=True, help="output JSONL; rows already there are skipped")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="merge a LoRA run/adapter into its base and save a standard folder")
    p.add_argument("source", help="run folder, adapter folder, checkpoint, or model folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--format",
        choices=["hf", "official"],
        default="hf",
        help="hf: transformers/vLLM folder (native GLM for ChatGLM2/3/GLM-4); official: ChatGLM layout",
    )
    p.add_argument("--base", help="base model (default: from the run config or adapter_config.json)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights; the LoRA update is merged in it (default: the base checkpoint's)",
    )
    add_generation_arg(p)
    add_template_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("score", help="metrics of an existing predictions JSONL ({predict, label} rows)")
    p.add_argument("predictions", type=Path)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "doctor", help="Python, torch build, package versions vs the tested ranges, usable features"
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_doctor)

    from .data.commands import register as register_data
    from .server.commands import register as register_serve
    from .web.commands import register as register_web

    register_data(sub)
    register_serve(sub)
    register_web(sub)

    p = sub.add_parser("demo", help="the main job: score, LoRA-tune and re-score the embedded default model")
    from .demo import default_demo_config

    p.add_argument(
        "--config",
        help=f"run config (default: the packaged demo config {default_demo_config()}; "
        "its data files lie beside it)",
    )
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
