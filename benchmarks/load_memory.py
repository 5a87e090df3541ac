"""Peak memory of loading a ChatGLM3-6B-shaped checkpoint on the CPU, float or quantized (not run in CI).

Writes random weights in the official sharded safetensors format (official names and shapes: 28
layers, hidden 4096, 32 heads, 2 kv groups, ffn 13696, padded vocab 65024; ~12.5 GB in bf16), then
loads it with ``glmtune.load_model(dtype=torch.bfloat16)`` in a fresh process, reads every weight once,
and prints the peak resident memory (VmHWM) and its ratio to the bytes the loaded model holds (goal for
the float model: <= 1.3).

``--quantize 4bit|8bit|int8-cpu|int8-dynamic``: ``load_model(..., quantization=MODE)``, each Linear
weight quantized as it streams in (goal for 4bit: peak <= 5 GiB). ``--float-first`` with it: the
path before streaming -- the float model loaded and every weight read, then ``quantize_for_inference``.
Several modes, comma-separated, each run in its own fresh process against the same checkpoint.

    python benchmarks/load_memory.py [--dir /tmp/glm3-6b-random] [--layers 28] [--keep]
    python benchmarks/load_memory.py --quantize 4bit,8bit,int8-cpu --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

FULL = dict(hidden=4096, heads=32, groups=2, kv=128, ffn=13696, vocab=65024, seq=8192)


def official_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, g, d, f, v = FULL["hidden"], FULL["groups"], FULL["kv"], FULL["ffn"], FULL["vocab"]
    qkv = FULL["heads"] * d + 2 * g * d
    shapes = [("transformer.embedding.word_embeddings.weight", (v, h))]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attention.query_key_value.weight", (qkv, h)),
            (p + "self_attention.query_key_value.bias", (qkv,)),
            (p + "self_attention.dense.weight", (h, FULL["heads"] * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (2 * f, h)),
            (p + "mlp.dense_4h_to_h.weight", (h, f)),
        ]
    shapes += [
        ("transformer.encoder.final_layernorm.weight", (h,)),
        ("transformer.output_layer.weight", (v, h)),
        ("transformer.rotary_pos_emb.inv_freq", (32,)),
    ]
    return shapes


def write_checkpoint(out: Path, layers: int, shard_bytes: int = 2_000_000_000) -> int:
    """Random bf16 weights, written shard by shard (never the whole model in memory); returns bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    for name, shape in official_shapes(layers):
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if name.endswith("inv_freq"):
            t = t.float()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
        total += nbytes
        if len(current) == 1 and size > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        # Flush finished shards right away to keep this writer's memory small.
        while shards and shards[0] is not current:
            idx = len(list(out.glob("model-*.safetensors"))) + 1
            save_file(shards.pop(0), str(out / f"model-{idx:05d}.safetensors"), metadata={"format": "pt"})
    if current:
        idx = len(list(out.glob("model-*.safetensors"))) + 1
        save_file(current, str(out / f"model-{idx:05d}.safetensors"), metadata={"format": "pt"})
    files = sorted(out.glob("model-*.safetensors"))
    n = len(files)
    weight_map = {}
    for i, f in enumerate(files):
        final = out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(final)
        from safetensors import safe_open

        with safe_open(str(final), "pt") as sf:
            for k in sf.keys():
                weight_map[k] = final.name
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg = {
        "_name_or_path": "chatglm3-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False,
        "ffn_hidden_size": FULL["ffn"],
        "hidden_size": FULL["hidden"],
        "kv_channels": FULL["kv"],
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": FULL["groups"],
        "num_attention_heads": FULL["heads"],
        "num_layers": layers,
        "original_rope": True,
        "padded_vocab_size": FULL["vocab"],
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": FULL["seq"],
        "torch_dtype": "bfloat16",
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


# Peak RSS is read from VmHWM: it belongs to the process's address space and starts afresh at exec,
# whereas getrusage's ru_maxrss is inherited from the parent (here the process that wrote the weights).
HWM = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024"
CHILD = f"""
import sys, time, torch, glmtune
from glmtune.quantize import quantize_for_inference
path, mode, float_first = sys.argv[1], sys.argv[2] or None, sys.argv[3] == "1"
t = time.time()
if mode and float_first:
    model = glmtune.load_model(path, dtype=torch.bfloat16)
    with torch.no_grad():  # the float model held and read whole (as the quantization before streaming did)
        for p in model.parameters():
            p.sum()
    model = quantize_for_inference(model, mode)
else:
    model = glmtune.load_model(path, dtype=torch.bfloat16, quantization=mode)
secs = time.time() - t
# Every tensor the model holds, quantized layers' scales included (state_dict has them), counted once.
tensors = {{t.data_ptr(): t for t in model.state_dict().values() if t.numel()}}
held = sum(t.numel() * t.element_size() for t in tensors.values())
# safetensors tensors can stay backed by the mapped file until read; read every one once (as the first
# forward pass would) so the peak counts all of them as resident.
with torch.no_grad():
    for t in tensors.values():
        t.sum()
print(held, {HWM}, secs)
"""

BASELINE = f"""
import torch, glmtune  # the same imports as the measured process
import bitsandbytes, peft  # noqa: imported by the quantized loads (peft by glmtune's adapters)
print({HWM})
"""


def measure(path: Path, mode: str | None, float_first: bool) -> tuple[int, int, float]:
    """(bytes the loaded model holds, peak RSS of the load process, load seconds), in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode or "", "1" if float_first else "0"],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"the load process failed ({mode or 'float'}):\n{out.stderr[-3000:]}")
    held, peak, secs = out.stdout.split()[-3:]
    return int(held), int(peak), float(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/glmtune-bench/chatglm3-6b-random"))
    ap.add_argument("--layers", type=int, default=28, help="28 = the real ChatGLM3-6B depth")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument(
        "--quantize",
        default="",
        help="comma-separated modes (4bit, 8bit, int8-cpu, int8-dynamic), each measured in its own process; "
        "'float' in the list measures the float load too",
    )
    ap.add_argument("--float-first", action="store_true", help="quantize after loading the float model")
    args = ap.parse_args()
    if not (args.dir / "config.json").exists():
        t = time.time()
        total = write_checkpoint(args.dir, args.layers)
        print(f"wrote {total / 2**30:.2f} GiB of bf16 weights to {args.dir} in {time.time() - t:.0f} s")
    base = int(
        subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout
    )
    print(f"imports alone (torch, glmtune, bitsandbytes, peft): {base / 2**30:.2f} GiB")
    modes = [m.strip() for m in args.quantize.split(",") if m.strip()] or ["float"]
    for mode in modes:
        quantized = mode != "float"
        held, peak, secs = measure(args.dir, mode if quantized else None, args.float_first and quantized)
        how = "float first, then quantized" if args.float_first and quantized else "streamed"
        print(f"\n{mode} ({how if quantized else 'bf16'}), {args.layers} layers:")
        print(f"  bytes the loaded model holds : {held / 2**30:.2f} GiB")
        print(f"  peak RSS of the load process : {peak / 2**30:.2f} GiB")
        print(f"  load time                    : {secs:.1f} s")
        print(
            f"  peak RSS / model bytes       : {peak / held:.3f}" + ("" if quantized else "  (goal <= 1.3)")
        )
        print(f"  (peak - imports) / model     : {(peak - base) / held:.3f}")
        if mode == "4bit":
            print(f"  4-bit goal: peak <= 5 GiB    : {'met' if peak <= 5 * 2**30 else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
