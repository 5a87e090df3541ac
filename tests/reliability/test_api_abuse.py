"""The API server under load and abuse: ``glmtune serve`` (the real command, a process of its own).

N concurrent clients keep requests in flight for a bounded time. Each request is drawn at random:

- ``stream`` / ``complete``: a greedy chat completion (streamed) or raw completion (not streamed); the
  body must be well formed (one ``finish_reason`` per choice, ``data: [DONE]`` last when streamed) and
  its text equal to the same request's answer measured on the idle server before the load;
- ``disconnect``: a streamed request dropped after its first event, or before it;
- ``malformed``: bodies that are not JSON, truncated JSON, wrong types, out-of-range values;
- ``huge``: 1.5 MiB bodies (limit 1 MiB), with a Content-Length and chunked without one;
- ``key``: a wrong or missing API key;
- ``unicode``: prompts with NUL, a lone surrogate, BOM, ZWJ emoji, RTL overrides, U+10FFFF, line
  separators, chat-template markers.

Every answer is classified: the expected outcome (a correct 200 body, or an OpenAI-shaped error with the
expected 4xx status) or an unexpected one (5xx, a wrong status, a broken body, a wrong text, a transport
error) which is a failure; ``lost`` = requests that should have completed and did not (goal 0). The
server must answer ``/health`` afterwards with nothing queued or running, and its resident memory after
the load must be back near where it was after a warm-up round of the same mix.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from glmtune.web.testing import free_port  # noqa: E402

KEY = "reliability-key"
MAX_BODY = 1 << 20
MAX_TOKENS = 12
PROMPTS = [
    "你好，请介绍一下你自己。",
    "Hello world! Tell me about the weather.",
    "机器学习是人工智能的一个分支",
    "请从下面的句子中抽取三元组，并以 JSON 格式输出。",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):",
]
UNICODE = [
    "NUL \u0000 inside",
    "lone surrogate \ud800 and \udfff",
    "\ufeffBOM first",
    "family 👩\u200d👩\u200d👧\u200d👦 emoji",
    "مرحبا \u202eRTL override\u202c done",
    "e\u0301" * 40,
    "max code point \U0010ffff",
    "line\u2028separator\u2029paragraph",
    "<|user|>\n<|assistant|> [gMASK]sop <|endoftext|>",
    "",
]
MALFORMED = [
    b"not json at all",
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}',  # truncated
    b'{"messages": "hello"}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": 42}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 100000}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
    b"[]",
    b"null",
    b'{"prompt": {"nested": [1, 2, {"deep": null}]}}',
    b"\xff\xfe\x00garbage",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Server:
    """``python -m glmtune.cli serve MODEL`` on a free loopback port, with an API key."""

    def __init__(self, model: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "glmtune.cli", "serve", str(model), "--port", str(self.port)]
        cmd += ["--api-key", KEY, "--model-name", "tiny", "--max-batch-size", "8", "--max-queue", "256"]
        cmd += ["--timeout", "300", "--max-body-bytes", str(MAX_BODY), "--log-level", "critical"]
        env = {k: v for k, v in os.environ.items() if k != "GLMTUNE_API_KEY"}
        env["OMP_NUM_THREADS"] = "1"  # leave a core to the clients on a 2-core machine
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"glmtune serve exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "glmtune serve did not start in 180 s"
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def idle(self, timeout: float = 60) -> dict:
        """/health once nothing is queued or running (a dropped stream's job finishes its step first)."""
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["queue_depth"] == 0 and h["running"] == 0:
                return h
            assert time.monotonic() < end, f"the server did not go idle: {h}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def chat_body(prompt: str, stream: bool) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {
        "model": "tiny",
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


def completion_body(prompt: str) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def is_openai_error(resp: httpx.Response) -> bool:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err["message"])


class Tally:
    def __init__(self):
        self.outcomes: Counter = Counter()  # "kind: outcome" -> count
        self.unexpected: list[str] = []
        self.lost = 0

    def ok(self, kind: str, outcome: str) -> None:
        self.outcomes[f"{kind}: {outcome}"] += 1

    def bad(self, kind: str, what: str, lost: bool = False) -> None:
        self.outcomes[f"{kind}: UNEXPECTED"] += 1
        self.unexpected.append(f"{kind}: {what}")
        self.lost += lost

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


async def read_stream(resp: httpx.Response) -> tuple[str, list[str], bool]:
    """(content, finish reasons, saw [DONE]) of a chat SSE stream; raises on a malformed event."""
    text, finishes, done = [], [], False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        assert not done, "an event after data: [DONE]"
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        obj = json.loads(data)
        assert "error" not in obj, f"error event: {obj['error']}"
        for choice in obj["choices"]:
            text.append(choice["delta"].get("content") or "")
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    return "".join(text), finishes, done


async def one(client: httpx.AsyncClient, rng: random.Random, refs: dict, tally: Tally) -> None:
    kind = rng.choices(
        ["stream", "complete", "disconnect", "malformed", "huge", "key", "unicode"],
        weights=[5, 3, 3, 2, 1, 2, 2],
    )[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        if kind == "stream":
            prompt = rng.choice(PROMPTS)
            body = chat_body(prompt, stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                if r.status_code != 200:
                    await r.aread()
                    return tally.bad(kind, f"HTTP {r.status_code}: {r.text[:200]}", lost=True)
                try:
                    text, finishes, done = await read_stream(r)
                except (AssertionError, ValueError, KeyError) as e:
                    return tally.bad(kind, f"broken stream: {e}", lost=True)
            if not done or len(finishes) != 1:
                return tally.bad(kind, f"[DONE] {done}, finish reasons {finishes}", lost=True)
            if text != refs[("chat", prompt)]:
                return tally.bad(kind, f"{prompt!r}: {text!r} != {refs[('chat', prompt)]!r}", lost=True)
            return tally.ok(kind, "200 correct")
        if kind == "complete":
            prompt = rng.choice(PROMPTS)
            r = await client.post("/v1/completions", json=completion_body(prompt), headers=auth)
            if r.status_code != 200:
                return tally.bad(kind, f"HTTP {r.status_code}: {r.text[:200]}", lost=True)
            choice = r.json()["choices"][0]
            if choice["text"] != refs[("raw", prompt)] or not choice["finish_reason"]:
                return tally.bad(kind, f"{prompt!r}: {choice} != {refs[('raw', prompt)]!r}", lost=True)
            return tally.ok(kind, "200 correct")
        if kind == "disconnect":
            body = chat_body(rng.choice(PROMPTS), stream=True)
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
                if rng.random() < 0.5:
                    async for _ in r.aiter_lines():
                        break
                # leaving the block closes the connection mid-stream
            return tally.ok(kind, "dropped")
        if kind == "malformed":
            r = await client.post(
                "/v1/chat/completions",
                content=rng.choice(MALFORMED),
                headers={**auth, "Content-Type": "application/json"},
            )
            if r.status_code in (400, 422) and is_openai_error(r):
                return tally.ok(kind, f"{r.status_code}")
            return tally.bad(kind, f"HTTP {r.status_code}: {r.text[:200]}")
        if kind == "huge":
            payload = json.dumps(chat_body("x" * (MAX_BODY + MAX_BODY // 2), stream=False)).encode()
            if rng.random() < 0.5:
                r = await client.post("/v1/chat/completions", content=payload, headers=auth)
                how = "content-length"
            else:

                async def chunks():
                    for i in range(0, len(payload), 64 << 10):
                        yield payload[i : i + (64 << 10)]

                r = await client.post("/v1/chat/completions", content=chunks(), headers=auth)
                how = "chunked"
            if r.status_code == 413 and is_openai_error(r):
                return tally.ok(kind, f"413 {how}")
            return tally.bad(kind, f"{how}: HTTP {r.status_code}: {r.text[:200]}")
        if kind == "key":
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
            r = await client.post("/v1/chat/completions", json=chat_body("hi", False), headers=headers)
            if r.status_code == 401 and is_openai_error(r):
                return tally.ok(kind, "401")
            return tally.bad(kind, f"{headers}: HTTP {r.status_code}: {r.text[:200]}")
        # unicode: json.dumps escapes a lone surrogate as \ud800, which is what a client would send
        text = rng.choice(UNICODE)
        r = await client.post(
            "/v1/chat/completions",
            content=json.dumps(chat_body(text, False)).encode(),
            headers={**auth, "Content-Type": "application/json"},
        )
        if r.status_code == 200:
            choice = r.json()["choices"][0]
            if isinstance(choice["message"]["content"], str) and choice["finish_reason"]:
                return tally.ok(kind, "200")
            return tally.bad(kind, f"{text!r}: broken body {r.text[:200]}", lost=True)
        if r.status_code in (400, 422) and is_openai_error(r):
            return tally.ok(kind, f"{r.status_code}")
        return tally.bad(kind, f"{text!r}: HTTP {r.status_code}: {r.text[:200]}")
    except httpx.HTTPError as e:
        tally.bad(kind, f"transport: {type(e).__name__}: {e}", lost=kind in ("stream", "complete"))


async def hammer(url: str, clients: int, seconds: float, seed: int, refs: dict) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(i: int):
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            while time.monotonic() < end:
                await one(client, rng, refs, tally)

    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return tally


def references(url: str) -> dict:
    """Each prompt's greedy answers, one request at a time on the idle server."""
    auth = {"Authorization": f"Bearer {KEY}"}
    refs = {}
    with httpx.Client(base_url=url, timeout=120, headers=auth) as c:
        for p in PROMPTS:
            refs[("chat", p)] = c.post("/v1/chat/completions", json=chat_body(p, False)).json()["choices"][0][
                "message"
            ]["content"]
            refs[("raw", p)] = c.post("/v1/completions", json=completion_body(p)).json()["choices"][0]["text"]
    return refs


def load_and_abuse(model: Path, clients: int, seconds: float, seed: int) -> dict:
    server = Server(model)
    try:
        refs = references(server.url)
        t0 = time.perf_counter()
        warm = asyncio.run(hammer(server.url, clients, min(5.0, seconds / 3), seed + 1, refs))
        server.idle()
        rss_base = rss_mb(server.proc.pid)
        tally = asyncio.run(hammer(server.url, clients, seconds, seed, refs))
        health = server.idle()
        rss_after = rss_mb(server.proc.pid)
        elapsed = time.perf_counter() - t0
        alive = server.proc.poll() is None and health["status"] == "ok"
    finally:
        server.stop()
    return {
        "warmup": warm,
        "tally": tally,
        "rss_base_mb": rss_base,
        "rss_after_mb": rss_after,
        "alive": alive,
        "seconds": elapsed,
        "batches": health["batches"],
    }


def report(name: str, clients: int, seconds: float, result: dict) -> None:
    t = result["tally"]
    errors = Counter()
    for key, n in t.outcomes.items():
        kind, outcome = key.split(": ", 1)
        errors[f"{outcome}" if outcome != "200 correct" else "200"] += n
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items()))
    print(
        f"[figure] API load/abuse ({name}): {clients} clients x {seconds:.0f} s: {t.requests} requests "
        f"(+{result['warmup'].requests} warm-up), outcomes by type: {by_kind}; unexpected "
        f"{len(t.unexpected)}, lost {t.lost}; server up: {result['alive']}; RSS {result['rss_base_mb']:.0f} MB "
        f"after warm-up -> {result['rss_after_mb']:.0f} MB after the load "
        f"({result['rss_after_mb'] - result['rss_base_mb']:+.1f} MB); {result['batches']} batches"
    )


def check(result: dict) -> None:
    for tally in (result["warmup"], result["tally"]):
        assert tally.unexpected == [], tally.unexpected[:10]
        assert tally.lost == 0
    kinds = {key.split(": ")[0] for key in result["tally"].outcomes}
    assert kinds >= {"stream", "complete", "disconnect", "malformed", "key", "unicode"}, kinds
    assert result["alive"]
    # Memory back to where the same mix left it: no per-request leak (a leak of even 100 kB a request
    # would show as tens of MB over these hundreds of requests).
    assert result["rss_after_mb"] - result["rss_base_mb"] < 40, result


def test_api_under_load_and_abuse(tiny_model):
    clients, seconds = 8, 12.0
    result = load_and_abuse(tiny_model("chatglm3"), clients, seconds, seed=0)
    report("fast", clients, seconds, result)
    check(result)


@pytest.mark.slow
def test_api_under_load_and_abuse_long(tiny_model):
    clients, seconds = 32, 120.0
    result = load_and_abuse(tiny_model("chatglm3"), clients, seconds, seed=1)
    report("slow", clients, seconds, result)
    check(result)
