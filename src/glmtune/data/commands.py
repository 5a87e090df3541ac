"""``glmtune data ...``: check, show, convert, import-chats and tokenize data files.

:func:`register` adds the ``data`` command to the ``glmtune`` parser. Every sub-command calls library
code and prints; problems are raised as :class:`~glmtune.errors.GlmtuneError` (``DataError`` names
the file, line and field) and printed by ``glmtune.cli.main``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from glmtune.cli_args import add_generation_arg, add_template_arg, model_path, positive_int
from glmtune.errors import ConfigError

__all__ = ["register"]

# How many skipped rows `data check` lists (the count is always exact).
MAX_LISTED = 20


# ------------------------------------------------------------------------------------------ arguments
def _column(value: str) -> tuple[str, str]:
    name, sep, key = value.partition("=")
    if not sep or not name or not key:
        raise argparse.ArgumentTypeError(f"expected ROLE=KEY (e.g. prompt=question), got {value!r}")
    return name, key


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="data file: JSONL or a JSON array")
    p.add_argument(
        "--format",
        default="auto",
        help="auto (default), context_target, alpaca, prompt_response, conversations, sharegpt or messages",
    )
    p.add_argument(
        "--column",
        action="append",
        type=_column,
        default=[],
        metavar="ROLE=KEY",
        help="read ROLE (prompt, response, history, instruction, ...) from KEY; repeatable",
    )
    p.add_argument(
        "--skip-invalid", action="store_true", help="leave invalid rows out (listed) instead of failing"
    )


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=model_path,
        required=True,
        help="model folder or .gguf file ('default' = embedded SmolLM2): its tokenizer and chat template",
    )
    add_generation_arg(p)
    add_template_arg(p)


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("length limits (P-Tuning style source/target, or one max length)")
    g.add_argument(
        "--max-source-length",
        type=positive_int,
        metavar="N",
        help="keep the first N content tokens of the prompt",
    )
    g.add_argument(
        "--max-target-length",
        type=positive_int,
        metavar="N",
        help="keep the first N content tokens of the reply",
    )
    g.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="whole sequence: oldest history first, then the question's start, then the reply's end",
    )
    g.add_argument("--train-on-prompt", action="store_true", help="put the loss on the prompt too")


def _settings(args):
    from glmtune.data.encode import EncodeSettings

    if args.max_length is not None and (
        args.max_source_length is not None or args.max_target_length is not None
    ):
        raise ConfigError("--max-length cannot be combined with --max-source-length / --max-target-length")
    return EncodeSettings(
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        max_length=args.max_length,
        train_on_prompt=args.train_on_prompt,
    )


def _columns(args) -> dict | None:
    return dict(args.column) if args.column else None


def _read(args):
    from glmtune.data.readers import read_examples

    return read_examples(args.file, fmt=args.format, columns=_columns(args), skip_invalid=args.skip_invalid)


def _resolved(args):
    """The --model resolved once, with --generation and --template when given."""
    from glmtune.resolve import resolve_model

    return resolve_model(args.model, generation=args.generation, template=args.template)


def _tokenizer_and_template(args):
    from glmtune.loading import load_tokenizer

    model = _resolved(args)
    return load_tokenizer(model), model.template


def _describe_limits(settings) -> str:
    parts = [
        f"{name} {getattr(settings, name)}"
        for name in ("max_source_length", "max_target_length", "max_length")
        if getattr(settings, name)
    ]
    return ", ".join(parts)


def _print_skipped(skipped) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} invalid row{'s' if len(skipped) != 1 else ''}:")
    for err in skipped[:MAX_LISTED]:
        print(f"  {err}")
    if len(skipped) > MAX_LISTED:
        print(f"  ... and {len(skipped) - MAX_LISTED} more")


def _fmt_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return str(int(value))


def _stats_table(rows: list[tuple[str, dict]]) -> str:
    headers = ["tokens", "count", "mean", "std", "min", "25%", "50%", "75%", "90%", "99%", "max"]
    keys = ["count", "mean", "std", "min", "p25", "p50", "p75", "p90", "p99", "max"]
    cells = [headers] + [[name] + [_fmt_number(stats[k]) for k in keys] for name, stats in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


# ---------------------------------------------------------------------------------------------- check
def cmd_check(args) -> int:
    from glmtune.data.encode import EncodeSettings, encode_all, length_stats

    settings = _settings(args)
    read = _read(args)
    tokenizer, template = _tokenizer_and_template(args)
    print(
        f"{args.file}: format {read.format}, {len(read.examples)} valid examples, {len(read.skipped)} skipped"
    )
    print(f"model {args.model}: template {template.name}, tokenizer {type(tokenizer).__name__}")
    _print_skipped(read.skipped)
    # Lengths before any limit: what the data needs, so the limits can be chosen from it.
    full, full_stats = encode_all(
        tokenizer,
        template,
        read.examples,
        EncodeSettings(train_on_prompt=settings.train_on_prompt),
        skip_invalid=args.skip_invalid,
    )
    _print_skipped(full_stats.invalid)
    rows = [
        ("prompt", length_stats(e.prompt_tokens for e in full)),
        ("reply", length_stats(e.reply_tokens for e in full)),
        ("total", length_stats(e.length for e in full)),
    ]
    if settings.limited:
        cut, stats = encode_all(tokenizer, template, read.examples, settings, skip_invalid=args.skip_invalid)
        rows.append(("total (limited)", length_stats(e.length for e in cut)))
    print()
    print(_stats_table(rows))
    print()
    if not settings.limited:
        print("no length limits given (--max-length, or --max-source-length / --max-target-length)")
        return 0
    n = stats.examples - len(stats.invalid)
    print(
        f"limits {_describe_limits(settings)}: {stats.truncated} of {n} examples exceed them "
        f"({_percent(stats.truncated, n)}) and are truncated, {stats.tokens_removed} tokens removed"
    )
    if stats.dropped:
        listed = ", ".join(stats.dropped_sources)
        more = (
            f" and {stats.dropped - len(stats.dropped_sources)} more"
            if stats.dropped > len(stats.dropped_sources)
            else ""
        )
        print(f"dropped {stats.dropped} examples with no reply token left: {listed}{more}")
    else:
        print("dropped 0 examples (every example keeps part of its reply)")
    return 0


# ----------------------------------------------------------------------------------------------- show
def cmd_show(args) -> int:
    from glmtune.data.encode import encode
    from glmtune.templates import IGNORE_INDEX

    settings = _settings(args)
    read = _read(args)
    _print_skipped(read.skipped)
    tokenizer, template = _tokenizer_and_template(args)
    for k, example in enumerate(read.examples[: args.n]):
        enc = encode(tokenizer, template, example, settings)
        print(
            f"=== example {k + 1}: {enc.source} ({enc.length} tokens: prompt {enc.prompt_tokens}, "
            f"reply {enc.reply_tokens}, {enc.target_tokens} reply tokens trained"
            f"{f', {enc.truncated_tokens} removed by the limits' if enc.truncated else ''})"
        )
        # The token column comes last: wide (CJK) characters would shift any column after it.
        shown = [repr(t) for t in tokenizer.convert_ids_to_tokens(enc.input_ids)]
        labels = ["-" if label == IGNORE_INDEX else str(label) for label in enc.labels]
        w_pos = max(len(str(enc.length - 1)), len("pos"))
        w_id = max(max(len(str(i)) for i in enc.input_ids), len("id"))
        w_label = max(max(len(x) for x in labels), len("label"))
        print(f"{'pos'.rjust(w_pos)}  {'id'.rjust(w_id)}  {'label'.rjust(w_label)}  token")
        for pos, (tid, label, text) in enumerate(zip(enc.input_ids, labels, shown)):
            print(f"{str(pos).rjust(w_pos)}  {str(tid).rjust(w_id)}  {label.rjust(w_label)}  {text}")
        prompt = tokenizer.decode(enc.input_ids[: enc.prompt_tokens], skip_special_tokens=False)
        target = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        print(f"prompt: {prompt!r}")
        print(f"target: {target!r}")
        if enc.target_tokens == 0:
            print("(no reply token left after truncation: training drops this example)")
        print()
    return 0


# -------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from glmtune.data.readers import iter_raw_rows, to_conversations_row, write_jsonl_atomic

    if args.to == "conversations":
        read = _read(args)
        _print_skipped(read.skipped)
        n = write_jsonl_atomic(args.out, (to_conversations_row(e) for e in read.examples))
        print(f"wrote {n} rows ({read.format} -> conversations) to {args.out}")
    else:
        skipped = []
        rows = iter_raw_rows(args.file, on_error=skipped.append if args.skip_invalid else None)
        n = write_jsonl_atomic(args.out, (row for _, row in rows))
        _print_skipped(skipped)
        print(f"wrote {n} rows as JSONL to {args.out}")
    return 0


# --------------------------------------------------------------------------------------- import-chats
def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _me_arg(me: str | None, me_map: Path | None, read_me_map):
    """--me alone, or the --me-map mapping with --me as the name for contacts it does not list."""
    if me_map is None:
        return me
    mapping = read_me_map(me_map)
    if me is not None:
        mapping.setdefault("*", me)
    return mapping


def cmd_import_chats(args) -> int:
    from glmtune.data.chat_import import import_chats, read_me_map

    if not 0 <= args.dev_ratio < 1:
        raise ConfigError(f"--dev-ratio must be in [0, 1), got {args.dev_ratio}")
    if not args.gap_minutes > 0:
        raise ConfigError(f"--gap-minutes must be positive, got {args.gap_minutes}")
    s = import_chats(
        args.dir,
        args.out_dir,
        dev_ratio=args.dev_ratio,
        seed=args.seed,
        gap_minutes=args.gap_minutes,
        me=_me_arg(args.me, args.me_map, read_me_map),
    )
    reasons = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["dropped_reasons"].items() if v) or "none"
    skipped = s["files_skipped"]
    print(
        f"read {s['files_read']} files, {s['messages']} messages ({s['messages_without_text']} without text)"
        + (f"; skipped {len(skipped)} other files ({_listed(skipped)})" if skipped else "")
    )
    if s["contacts"]:
        print("contact                  files  messages  no text  kept  dropped  train  dev")
        for name, c in s["contacts"].items():
            print(
                f"{name[:24]:<24} {c['files']:>5} {c['messages']:>9} {c['messages_without_text']:>8}"
                f" {c['conversations_kept']:>5} {c['conversations_dropped']:>8} {c['train']:>6} {c['dev']:>4}"
            )
    if s["me_map_unused"]:
        print(f"warning: --me-map names contacts not found in {args.dir}: {_listed(s['me_map_unused'])}")
    print(f"conversations: {s['conversations_kept']} kept, {s['conversations_dropped']} dropped ({reasons})")
    if s["merged_train_rows"] or s["merged_dev_rows"]:
        print(f"merged ready-made rows: {s['merged_train_rows']} train, {s['merged_dev_rows']} dev")
    print(f"train: {s['train']} rows -> {s['train_path']}")
    print(f"dev: {s['dev']} rows -> {s['dev_path']}")
    return 0


# ------------------------------------------------------------------------------------------- tokenize
def cmd_tokenize(args) -> int:
    from glmtune.data.cache import tokenize_cached

    settings = _settings(args)
    started = time.perf_counter()
    ds, info = tokenize_cached(
        args.file,
        _resolved(args),
        settings,
        cache_dir=args.out,
        fmt=args.format,
        columns=_columns(args),
        skip_invalid=args.skip_invalid,
    )
    seconds = time.perf_counter() - started
    print(f"cache {'hit' if info.hit else 'miss'}: {info.path}")
    print(f"rows: {info.rows} ({info.format}), tokens: {sum(ds['length'])}, time: {seconds:.2f} s")
    st = info.stats
    if settings.limited:
        print(
            f"limits {_describe_limits(settings)}: {st.truncated} truncated, {st.tokens_removed} tokens removed, "
            f"{st.dropped} dropped"
        )
    _print_skipped(st.invalid)
    return 0


# ------------------------------------------------------------------------------------------- register
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the ``glmtune`` sub-parsers."""
    data = sub.add_parser(
        "data",
        help="check, show, convert, import and tokenize fine-tuning data",
        description="Check, show, convert, import and tokenize fine-tuning data files.",
    )
    cmds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("check", help="validate a data file and print length statistics")
    _add_read_args(p)
    _add_model_arg(p)
    _add_limit_args(p)
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser("show", help="the first examples token by token, with their labels")
    _add_read_args(p)
    _add_model_arg(p)
    p.add_argument("-n", type=positive_int, default=1, help="how many examples (default 1)")
    _add_limit_args(p)
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser("convert", help="rewrite a data file as ChatGLM3 conversations or as JSONL")
    _add_read_args(p)
    p.add_argument("out", type=Path, help="output JSONL file (written atomically)")
    p.add_argument(
        "--to",
        choices=["conversations", "jsonl"],
        required=True,
        help='conversations: {"conversations": [...]} rows; jsonl: the same objects, one per line',
    )
    p.set_defaults(func=cmd_convert)

    p = cmds.add_parser("import-chats", help="exported chat logs -> ChatGLM3 train.json / dev.json")
    p.add_argument(
        "dir", type=Path, help="folder of exported chats (a JSON file or a sub-folder per contact, any depth)"
    )
    p.add_argument("out_dir", type=Path, help="where train.json and dev.json go")
    p.add_argument(
        "--dev-ratio", type=float, default=0.1, help="share of conversations for dev (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")
    p.add_argument("--gap-minutes", type=float, default=60, help="silence that starts a new conversation")
    p.add_argument("--me", help="your sender name in the logs (the assistant side)")
    p.add_argument(
        "--me-map",
        type=Path,
        help="JSON/YAML object: contact (sub-folder or file name) -> your sender name there; '*' for the rest",
    )
    p.set_defaults(func=cmd_import_chats)

    p = cmds.add_parser("tokenize", help="pre-tokenize a data file into a cached Arrow dataset")
    _add_read_args(p)
    _add_model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    _add_limit_args(p)
    p.set_defaults(func=cmd_tokenize)
