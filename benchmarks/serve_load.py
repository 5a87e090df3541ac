"""Load test of ``glmtune serve``: throughput, latency and time to first token, batched vs one at a time.

Starts ``glmtune serve`` (the real command, in a child process so the load generator does not share its
interpreter) on a loopback port, then keeps ``--concurrency`` streaming requests in flight for
``--duration`` seconds and waits for the last ones to finish. It does this twice, with
``--max-batch-size 8`` and ``--max-batch-size 1``, and prints for each run: completion tokens/s,
requests/s, p50/p99 latency, p50/p99 time to first token (first streamed text), mean batch size, and
lost requests (any request without exactly one complete answer: an error status, an error event, no
finish_reason, or no ``data: [DONE]``; must be 0), then the ratio of the two throughputs.

The default model is a tiny random ChatGLM3-shaped model, larger than the tests' (hidden 256, 4
layers), built in a temporary folder. Its replies are random text without the newline that ends a
ChatGLM3 reply's metadata line, so on the chat endpoint the text would only arrive at the end; the
default endpoint is therefore ``/v1/completions`` (raw text, streamed token by token).

    python benchmarks/serve_load.py [--model DIR] [--concurrency 16] [--duration 30] [--max-tokens 32]
                                    [--endpoint completions|chat] [--batch-sizes 8,1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "你好，请介绍一下你自己。",
    "今天天气不错，我们去公园散步吧。北京的秋天很美，天空很蓝。",
    "机器学习是人工智能的一个分支",
    "Hello world! This is a tiny ChatGLM test with some English words.",
    "The quick brown fox jumps over the lazy dog.",
    "请从下面的句子中抽取三元组，并以 JSON 格式输出。",
    "Instruction: classify the comment. Input: the apples are fresh and sweet. Answer: ",
    "这件衣服的材质是牛仔布，颜色是蓝色，风格简约又时尚。",
    "def add(a, b):\n    return a + b",
    "水果 蔬菜 电脑 手机 衣服 书籍 酒店 旅游 音乐 电影 体育 新闻 教育 汽车",
]

SERVE = (
    "import argparse, sys; from glmtune.server.commands import register; "
    "p = argparse.ArgumentParser(); register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
    "sys.exit(a.func(a))"
)


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    t0 = time.perf_counter()
    ttft, finishes, done, tokens, error = None, 0, False, None, ""
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    error = obj["error"]["message"]
                    continue
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                    if ch.get("finish_reason"):
                        finishes += 1
    except httpx.HTTPError as e:
        return Result(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    ok = done and finishes == 1 and tokens is not None and not error
    return Result(
        ok,
        latency,
        ttft if ttft is not None else latency,
        tokens or 0,
        error or ("" if ok else f"incomplete answer (done={done}, finishes={finishes})"),
    )


async def load(
    base: str, endpoint: str, concurrency: int, duration: float, max_tokens: int
) -> tuple[list, float]:
    url = base + ("/v1/completions" if endpoint == "completions" else "/v1/chat/completions")
    results: list[Result] = []
    start = time.perf_counter()
    end = start + duration

    async def worker(w: int, client: httpx.AsyncClient):
        i = w
        while time.perf_counter() < end:
            prompt = PROMPTS[i % len(PROMPTS)]
            i += concurrency
            body = {
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if endpoint == "completions":
                body["prompt"] = prompt
            else:
                body["messages"] = [{"role": "user", "content": prompt}]
            results.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
    return results, time.perf_counter() - start


def run_once(model: Path, batch_size: int, args) -> dict:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        SERVE,
        "serve",
        str(model),
        "--port",
        str(port),
        "--model-name",
        "bench",
        "--max-batch-size",
        str(batch_size),
        "--max-queue",
        str(4 * args.concurrency),
        "--timeout",
        "600",
        "--log-level",
        "warning",
    ]
    env = {k: v for k, v in os.environ.items() if k != "GLMTUNE_API_KEY"}
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)  # torch's intra-op threads in the server
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"glmtune serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("glmtune serve did not start")
            time.sleep(0.2)
        # Warm-up (first calls allocate), not measured.
        asyncio.run(load(base, args.endpoint, min(args.concurrency, batch_size), 0.5, args.max_tokens))
        batches_before = httpx.get(base + "/health").json()["batches"]
        results, elapsed = asyncio.run(
            load(base, args.endpoint, args.concurrency, args.duration, args.max_tokens)
        )
        batches = httpx.get(base + "/health").json()["batches"] - batches_before
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    good = [r for r in results if r.ok]
    lost = [r for r in results if not r.ok]
    tokens = sum(r.tokens for r in good)
    return {
        "max_batch_size": batch_size,
        "requests": len(results),
        "lost": len(lost),
        "lost_examples": sorted({r.error for r in lost})[:3],
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(good) / elapsed,
        "completion_tokens": tokens,
        "mean_tokens": tokens / max(1, len(good)),
        "latency_p50": percentile([r.latency for r in good], 50),
        "latency_p99": percentile([r.latency for r in good], 99),
        "ttft_p50": percentile([r.ttft for r in good], 50),
        "ttft_p99": percentile([r.ttft for r in good], 99),
        "mean_batch": len(results) / max(1, batches),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, help="model folder (default: a tiny random ChatGLM3, hidden 256, 4 layers)"
    )
    p.add_argument("--concurrency", type=int, default=16, help="requests kept in flight (default 16)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per run (default 30)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the server (default 1: on a small shared machine, OpenMP threads "
        "spinning against the load generator and other processes slow torch down ~10x; 0 = torch's default)",
    )
    p.add_argument(
        "--batch-sizes", default="8,1", help="max batch sizes to compare, first / second (default 8,1)"
    )
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from glmtune.testing import make_tiny_model

            t = time.perf_counter()
            model = make_tiny_model(
                Path(tmp) / "bench-chatglm3",
                "chatglm3",
                seed=0,
                hidden=256,
                layers=4,
                heads=8,
                kv_heads=4,
                head_dim=32,
                ffn=512,
            )
            print(
                f"model: tiny random ChatGLM3 (hidden 256, 4 layers) built in {time.perf_counter() - t:.1f} s"
            )
        print(
            f"load: {args.concurrency} concurrent streaming requests to /v1/{args.endpoint}, {args.duration:g} s "
            f"per run, max_tokens {args.max_tokens}, greedy; {os.cpu_count()} CPU cores, server threads "
            f"{args.server_threads or 'default'}"
        )
        runs = [run_once(model, bs, args) for bs in sizes]

    header = (
        f"{'batch':>5} {'reqs':>5} {'lost':>4} {'tok/s':>8} {'req/s':>7} {'lat p50':>8} {'lat p99':>8} "
        f"{'ttft p50':>8} {'ttft p99':>8} {'tok/req':>7} {'batch~':>6}"
    )
    print(header)
    for r in runs:
        print(
            f"{r['max_batch_size']:>5} {r['requests']:>5} {r['lost']:>4} {r['tokens_per_s']:>8.1f} "
            f"{r['requests_per_s']:>7.2f} {r['latency_p50']:>7.2f}s {r['latency_p99']:>7.2f}s "
            f"{r['ttft_p50']:>7.2f}s {r['ttft_p99']:>7.2f}s {r['mean_tokens']:>7.1f} {r['mean_batch']:>6.2f}"
        )
        for e in r["lost_examples"]:
            print(f"      lost: {e}")
    if len(runs) >= 2 and runs[1]["tokens_per_s"] > 0:
        print(
            f"throughput ratio (max_batch_size {runs[0]['max_batch_size']} / {runs[1]['max_batch_size']}): "
            f"{runs[0]['tokens_per_s'] / runs[1]['tokens_per_s']:.2f}x tokens/s, "
            f"{runs[0]['requests_per_s'] / max(runs[1]['requests_per_s'], 1e-9):.2f}x requests/s"
        )
    lost = sum(r["lost"] for r in runs)
    print(f"lost requests: {lost}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
