"""Generation throughput: ``glmtune predict`` at batch 8 against a plain ``model.generate`` loop at batch 1.

The model is the training benchmark's ChatGLM3-shaped random model (hidden 512, 6 layers, 8 heads, 2 kv
groups, ffn 1368, padded vocab 65024, float32; see train_throughput.py), except that the output-layer
rows past the tokenizer's 809 ids are zeroed so that greedy decoding only picks ids the tokenizer can
decode. Prompts: the first 64 rows of ``../shared/data/advertisegen/dev.json`` in the ChatGLM3 chat
template. Both sides decode greedily up to ``--max-new-tokens`` and stop at the template's stop tokens.

- ``plain``: for each prompt, ``model.generate(input_ids=[prompt])`` (batch 1, what a loop over a
  dataset with the official ``model.chat`` amounts to);
- ``glmtune``: ``glmtune.evaluate.predict_file`` (what ``glmtune predict --batch-size 8`` runs): prompts
  grouped by length, 8 at a time, left padding, KV cache.

The outputs must be identical (checked: the run fails otherwise). Tokens/s counts the generated tokens
up to the stop token, the same count on both sides; model loading is not timed. Runs alternate
plain, glmtune, plain, glmtune ... for ``--rounds`` rounds; medians.

    .venv/bin/python benchmarks/generate_throughput.py [--prompts 64] [--max-new-tokens 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_throughput import SHARED, TOKENIZER  # noqa: E402

DEV = SHARED / "data" / "advertisegen" / "dev.json"


def build_model(work: Path) -> Path:
    """The training benchmark's model with output rows past the tokenizer's vocabulary zeroed."""
    import torch
    import train_throughput
    from safetensors.torch import load_file, save_file

    import glmtune

    src = train_throughput.prepare(work, examples=8, dev_examples=8)["official"]
    out = work / "chatglm3-bench-gen"
    marker = out / ".glmtune-bench"
    if marker.exists():
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    vocab = len(glmtune.load_tokenizer(out))
    for f in out.glob("*.safetensors"):
        state = load_file(str(f))
        if "transformer.output_layer.weight" in state:
            state["transformer.output_layer.weight"][vocab:] = 0
            save_file(state, str(f), metadata={"format": "pt"})
    with torch.no_grad():  # logits of never-produced ids are 0, below the best real token's
        model = glmtune.load_model(out)
        assert (model.lm_head.weight[vocab:] == 0).all()
    marker.write_text("ok")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/glmtune-bench-train")
    p.add_argument("--markdown", help="write the result table (Markdown) here")
    args = p.parse_args()
    for needed in (DEV, TOKENIZER):
        if not needed.exists():
            print(f"{needed}: missing (../shared holds the datasets and fixtures)", file=sys.stderr)
            return 2

    import torch

    torch.set_num_threads(args.threads)
    from glmtune.data import read_examples
    from glmtune.evaluate import predict_file, split_examples
    from glmtune.inference import Engine, GenerationSettings

    t_start = time.time()
    load_before = os.getloadavg()
    path = build_model(Path(args.workdir))
    examples = read_examples(DEV, require_reply=False).examples[: args.prompts]
    engine = Engine.from_path(path)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompts, _ = split_examples(examples)
    encoded = [engine.template.encode_prompt(engine.tokenizer, m) for m in prompts]
    model = engine.model

    def plain() -> tuple[float, list[list[int]]]:
        outs = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in encoded:
                x = torch.tensor([ids])
                y = model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=engine.stop_ids,
                    pad_token_id=engine.pad_id,
                )
                new = y[0, x.shape[1] :].tolist()
                outs.append(engine._finish(new, args.max_new_tokens)[0])
        return time.perf_counter() - t0, outs

    def glmtune_predict() -> tuple[float, list[str]]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "predictions.jsonl"
            t0 = time.perf_counter()
            predict_file(engine, examples, out, settings, batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - t0
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return seconds, [r["predict"] for r in sorted(rows, key=lambda r: r["index"])]

    times: dict[str, list[float]] = {"plain": [], "glmtune": []}
    tokens = None
    for rnd in range(args.rounds):
        secs, ids = plain()
        times["plain"].append(secs)
        tokens = sum(map(len, ids))
        expected = [engine.decode(x) for x in ids]
        secs, texts = glmtune_predict()
        times["glmtune"].append(secs)
        same = sum(a == b for a, b in zip(texts, expected))
        print(
            f"round {rnd + 1}: plain {times['plain'][-1]:.1f} s, glmtune predict {secs:.1f} s, "
            f"{tokens} tokens, identical outputs {same}/{len(expected)}",
            flush=True,
        )
        if same != len(expected):
            for i, (a, b) in enumerate(zip(texts, expected)):
                if a != b:
                    print(f"prompt {i}: glmtune {a!r}\n          plain   {b!r}", file=sys.stderr)
                    break
            raise SystemExit("greedy outputs differ between batch 8 and batch 1")
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tokens / v for k, v in med.items()}
    text = "\n".join(
        [
            f"{time.strftime('%Y-%m-%d')}, {args.threads} threads; {len(examples)} AdvertiseGen dev prompts, "
            f"greedy, max {args.max_new_tokens} new tokens, {tokens} tokens generated; {args.rounds} round(s), "
            f"medians; whole benchmark {(time.time() - t_start) / 60:.1f} min; load average at the start "
            f"{load_before[0]:.2f}, at the end {os.getloadavg()[0]:.2f}.",
            "",
            "| line | seconds | tokens/s | ÷ plain | identical outputs |",
            "|---|---|---|---|---|",
            f"| plain `model.generate`, batch 1 | {med['plain']:.1f} | {rate['plain']:.1f} | 1.00× | – |",
            f"| `glmtune predict`, batch {args.batch_size} | {med['glmtune']:.1f} | {rate['glmtune']:.1f} | "
            f"{rate['glmtune'] / rate['plain']:.2f}× | {len(examples)}/{len(examples)} |",
        ]
    )
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
