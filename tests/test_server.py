"""The OpenAI-compatible server, tested against a real uvicorn server on a loopback port.

A tiny random ChatGLM3 model serves two servers in this process: ``server`` (API key, batching) and
``slow`` (no key, batch size 1, queue 1, and a model slowed to ~20 ms a step so a long answer takes
seconds). Requests use the official ``openai`` client (sync and async) and raw ``httpx``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from glmtune.inference import Engine, GenerationSettings  # noqa: E402
from glmtune.server.app import ServerThread, build_backend, create_app  # noqa: E402
from glmtune.server.commands import register  # noqa: E402
from glmtune.server.native import NativeBackend, RowSampler  # noqa: E402
from glmtune.testing import make_tiny_model  # noqa: E402

KEY = "test-key"
LONG = 200  # tokens of the long answers on the slow server (~4 s there)
CANDIDATES = ["hello world", "机器学习", "北京", "你好", "天气", "水果", "音乐", "code", "dog", "JSON"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def health(srv) -> dict:
    return httpx.get(srv.url + "/health", timeout=10).json()


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and "code" in err
    return err


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-chatglm3", "chatglm3", seed=0)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_path(tiny)


@pytest.fixture(scope="module")
def server(engine):
    backend = NativeBackend(engine, max_batch_size=8, max_queue=64)
    srv = ServerThread(create_app(backend, model_name="tiny", api_key=KEY, timeout=60))
    srv.backend = backend
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def long_prompt(engine):
    """A prompt whose greedy reply runs LONG tokens without a stop token (random models stop anywhere)."""
    for text in CANDIDATES:
        if (
            engine.generate([user(text)], GenerationSettings(max_new_tokens=LONG))[0].finish_reason
            == "length"
        ):
            return text
    pytest.skip("no candidate prompt runs to the length limit with this tiny model")


@pytest.fixture(scope="module")
def slow(tiny):
    eng = Engine.from_path(tiny)
    forward = eng.model.forward

    @functools.wraps(forward)
    def slow_forward(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    eng.model.forward = slow_forward
    backend = NativeBackend(eng, max_batch_size=1, max_queue=1)
    srv = ServerThread(create_app(backend, model_name="tiny", timeout=60))
    srv.backend, srv.engine = backend, eng
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------ basic API
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["model"] == "tiny" and h["queue_depth"] == 0 and h["backend"] == "native"


def test_chat_matches_engine_with_usage(server, client, engine):
    msgs = user("你好")
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ref = engine.generate([msgs], GenerationSettings(max_new_tokens=12))[0]
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
    prompt = engine.template.encode_prompt(engine.tokenizer, msgs)
    assert r.usage.prompt_tokens == len(prompt) == ref.prompt_tokens
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="tiny", messages=user("hello world"), max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_completions_stream_in_pieces(client, engine):
    prompt = "The quick brown fox"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    ids = engine.tokenizer(prompt)["input_ids"]
    assert full.object == "text_completion" and full.usage.prompt_tokens == len(ids)  # no chat template
    out = engine.model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        eos_token_id=engine.stop_ids,
        pad_token_id=engine.pad_id,
        do_sample=False,
        max_new_tokens=10,
    )[0, len(ids) :].tolist()
    new = [t for t in out if t != engine.pad_id]
    new = new[: next((i for i, t in enumerate(new) if t in engine.stop_ids), len(new))]
    assert full.usage.completion_tokens == len(new)
    assert full.choices[0].text.strip() == engine.tokenizer.decode(new, skip_special_tokens=True).strip()
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == full.choices[0].text
    assert sum(1 for p in pieces if p) > 1  # raw text is streamed as it comes


def test_n_choices(client):
    r = client.chat.completions.create(model="tiny", messages=user("天气"), max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    one = client.chat.completions.create(model="tiny", messages=user("天气"), max_tokens=6, temperature=0)
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    kw = dict(model="tiny", messages=user("天气"), max_tokens=6, temperature=1.0, n=2, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded


def test_stop_strings(client):
    prompt, kw = "The quick brown fox", dict(model="tiny", max_tokens=12, temperature=0)
    text = client.completions.create(prompt=prompt, **kw).choices[0].text
    window = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cut = text.find(window)
    r = client.completions.create(prompt=prompt, stop=[window, "never-there"], **kw)
    assert r.choices[0].text == text[:cut] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(prompt=prompt, stop=window, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    # Chat: the stop string applies to the reply text.
    reply = client.chat.completions.create(messages=user("你好"), **kw).choices[0].message.content
    stop = next(reply[i : i + 2] for i in range(2, len(reply) - 2) if "\ufffd" not in reply[i : i + 2])
    r = client.chat.completions.create(messages=user("你好"), stop=stop, **kw)
    assert r.choices[0].message.content == reply[: reply.find(stop)] and r.choices[0].finish_reason == "stop"


def test_penalties_logits_processor():
    class J:  # the fields RowSampler reads
        def __init__(self, p, f):
            self.presence_penalty, self.frequency_penalty = p, f
            self.temperature, self.top_p, self.seed, self.id = 0.0, 1.0, None, id(self)
            self.greedy, self.penalized = True, bool(p or f)

    proc = RowSampler([J(0.5, 0.25), J(0.0, 0.0)], width=2, device=torch.device("cpu"))
    ids = torch.tensor([[9, 9, 5, 5, 7], [9, 9, 5, 5, 7]])
    out = proc(ids, torch.zeros(2, 10))
    expected = torch.zeros(10)
    expected[5] = -(0.5 + 2 * 0.25)  # presence once + frequency x count (prompt tokens not counted)
    expected[7] = -(0.5 + 0.25)
    assert torch.allclose(out[0], expected) and torch.equal(out[1], torch.zeros(10))


def test_penalties_and_sampling_through_api(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=user("水果"),
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        seed=3,
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8


def test_chatglm3_tools_and_observation(client, engine):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather of a city",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    msgs = [
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": "get_weather()"},
        {"role": "tool", "content": '{"temp": 20}', "tool_call_id": "1"},
    ]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, max_tokens=4, temperature=0)
    sent = [
        {
            "role": "system",
            "content": "Answer the following questions as best as you can. You have access "
            "to the following tools:",
            "tools": [tools[0]["function"]],
        },
        msgs[0],
        msgs[1],
        {"role": "observation", "content": msgs[2]["content"]},
    ]
    assert r.usage.prompt_tokens == len(engine.template.encode_prompt(engine.tokenizer, sent))


# --------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_are_batched_and_match_single(server, engine):
    prompts = ["你好", "hello world", "机器学习是人工智能的一个分支", "fox", "北京的秋天很美", "code"]
    limits = [8, 12, 6, 10, 12, 9]
    refs = [
        engine.generate([user(p)], GenerationSettings(max_new_tokens=m))[0] for p, m in zip(prompts, limits)
    ]
    before = server.backend.batches

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        engine.lock.acquire()  # hold the model: every request queues up, then they run batched
        try:
            tasks = [
                asyncio.create_task(
                    aclient.chat.completions.create(
                        model="tiny", messages=user(p), max_tokens=m, temperature=0
                    )
                )
                for p, m in zip(prompts, limits)
            ]
            async with httpx.AsyncClient() as h:
                for _ in range(1000):
                    s = (await h.get(server.url + "/health")).json()
                    if s["queue_depth"] + s["running"] == len(prompts):
                        break
                    await asyncio.sleep(0.01)
        finally:
            engine.lock.release()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for r, ref in zip(results, refs):
        assert r.choices[0].message.content == ref.text
        assert (
            r.usage.completion_tokens == len(ref.token_ids)
            and r.choices[0].finish_reason == ref.finish_reason
        )
    assert server.backend.batches - before <= 2  # the first taken batch, then all the others at once


# -------------------------------------------------------------------------------------- errors
def test_auth(server):
    url = server.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 2}
    err = assert_openai_error(httpx.post(url, json=body), 401)
    assert err["code"] == "missing_api_key"
    err = assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_bad_requests(server, client):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(
        url, content=b'{"model": "tiny", "messages": [', headers={**auth, "Content-Type": "application/json"}
    )
    assert assert_openai_error(bad, 400)["code"] == "invalid_json"
    err = assert_openai_error(httpx.post(url, json={"model": "tiny", "messages": "hi"}, headers=auth), 422)
    assert "messages" in err["message"]
    assert_openai_error(httpx.post(url, json={"messages": user("hi"), "temperature": 5}, headers=auth), 422)
    assert_openai_error(
        httpx.post(url, json={"messages": [{"role": "robot", "content": "x"}]}, headers=auth), 422
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=user("hi"), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    err = assert_openai_error(
        httpx.post(url, json={"messages": user("hi"), "logprobs": True}, headers=auth), 400
    )
    assert "logprobs" in err["message"]
    # JSON can carry an unpaired surrogate ("\\ud800"); no tokenizer encodes it: a 400 naming the field.
    body = json.dumps({"messages": user("ok \ud800 no")}).encode()
    err = assert_openai_error(
        httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"}), 400
    )
    assert err["param"] == "messages[0].content" and "U+D800" in err["message"]
    body = json.dumps({"prompt": ["fine", "bad \udfff"], "max_tokens": 2}).encode()
    raw = server.url + "/v1/completions"
    err = assert_openai_error(
        httpx.post(raw, content=body, headers={**auth, "Content-Type": "application/json"}), 400
    )
    assert err["param"] == "prompt[1]"


def test_prompt_too_long(server, client, engine):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    long_text = "水果 蔬菜 电脑 手机 衣服 " * 60
    err = assert_openai_error(httpx.post(url, json={"messages": user(long_text)}, headers=auth), 400)
    assert "too long" in err["message"] and "maximum context length" in err["message"]
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # prompt + max_tokens
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=engine.context_length)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt=long_text, max_tokens=2)


def test_body_too_large(server):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    huge = {"messages": user("x" * (2 << 20))}
    assert assert_openai_error(httpx.post(url, json=huge, headers=auth), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while read
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    resp = httpx.post(url, content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert_openai_error(resp, 413)


# --------------------------------------------------------------------------- the slow server
def _start_long_stream(slow, prompt):
    """Open a streaming chat request for a LONG answer; returns (client, response, lines) after the role
    chunk (keep ``lines`` referenced: dropping the iterator closes the stream)."""
    h = httpx.Client(timeout=60)
    body = {"model": "tiny", "messages": user(prompt), "max_tokens": LONG, "temperature": 0, "stream": True}
    resp = h.send(h.build_request("POST", slow.url + "/v1/chat/completions", json=body), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    first = next(lines)
    assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    wait_for(lambda: health(slow)["running"] == 1, what="the stream to run")
    return h, resp, lines


def test_health_answers_during_generation(slow, long_prompt):
    h, resp, _lines = _start_long_stream(slow, long_prompt)
    try:
        with httpx.Client(base_url=slow.url, timeout=10) as c:
            c.get("/health")  # connection set up outside the timing
            t = time.monotonic()
            state = c.get("/health").json()
            assert time.monotonic() - t < 1.0 and state["running"] == 1 and state["status"] == "ok"
    finally:
        resp.close()
        h.close()
    wait_for(lambda: health(slow)["running"] == 0, what="the cancelled stream to stop")


def test_client_disconnect_frees_the_slot(slow, long_prompt):
    h, resp, lines = _start_long_stream(slow, long_prompt)
    lines.close()
    resp.close()
    h.close()  # the client goes away mid-stream
    closed = time.monotonic()
    wait_for(lambda: health(slow)["running"] == 0, timeout=3.0, what="the disconnected request to stop")
    assert time.monotonic() - closed < 3.0  # the full answer would take >= LONG x 20 ms = 4 s
    t = time.monotonic()
    r = httpx.post(
        slow.url + "/v1/chat/completions",
        timeout=30,
        json={"messages": user("hi"), "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200 and time.monotonic() - t < 3.0
    state = health(slow)
    assert state["queue_depth"] == 0 and state["running"] == 0


def test_timeout_gives_504_and_frees_the_model(slow, long_prompt):
    backend = NativeBackend(slow.engine, max_batch_size=1, max_queue=2)  # the slow model, a 0.5 s timeout
    srv = ServerThread(create_app(backend, model_name="tiny", timeout=0.5))
    try:
        body = {"messages": user(long_prompt), "max_tokens": LONG, "temperature": 0}
        t = time.monotonic()
        err = assert_openai_error(httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30), 504)
        assert err["type"] == "timeout_error" and time.monotonic() - t < 3.0
        wait_for(lambda: health(srv)["running"] == 0, timeout=3.0, what="the timed-out request to stop")
    finally:
        srv.stop()


def test_queue_full_gives_503(slow):
    url = slow.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 2, "temperature": 0}
    results = {}

    def post(name):
        results[name] = httpx.post(url, json=body, timeout=60)

    slow.engine.lock.acquire()  # the worker takes request 1 and waits for the model
    threads = []
    try:
        threads.append(threading.Thread(target=post, args=("first",)))
        threads[-1].start()
        wait_for(lambda: health(slow)["running"] == 1, what="the first request to be taken")
        threads.append(threading.Thread(target=post, args=("second",)))
        threads[-1].start()
        wait_for(lambda: health(slow)["queue_depth"] == 1, what="the second request to queue")
        err = assert_openai_error(httpx.post(url, json=body, timeout=10), 503)  # max_queue 1: no room
        assert err["code"] == "queue_full"
    finally:
        slow.engine.lock.release()
        for t in threads:
            t.join(timeout=30)
    assert results["first"].status_code == 200 and results["second"].status_code == 200


# ------------------------------------------------------------------------------ vLLM, command
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (it needs Linux + CUDA); the vllm backend is untested here",
)
def test_vllm_backend(tiny):  # pragma: no cover - needs vLLM and a GPU
    backend = build_backend(tiny, backend="vllm", max_batch_size=4, max_queue=4)
    srv = ServerThread(create_app(backend, model_name="tiny"))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=user("你好"), max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_missing_is_a_clear_error(tiny):
    from glmtune.errors import ConfigError

    with pytest.raises(ConfigError, match="pip install vllm"):
        build_backend(tiny, backend="vllm")


def test_serve_command(tiny, monkeypatch):
    import uvicorn

    parser = argparse.ArgumentParser(prog="glmtune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", str(tiny)])
    assert (args.host, args.port, args.max_batch_size, args.max_queue, args.timeout, args.backend) == (
        "127.0.0.1",
        8000,
        8,
        64,
        120.0,
        "native",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", str(tiny), "--max-batch-size", "0"])
    # The command itself (key from the environment), with uvicorn.run swapped for a background server.
    started = {}

    def fake_run(app, host, port, **kwargs):
        assert (host, port) == ("127.0.0.1", 8123)
        started["srv"] = ServerThread(app, host=host, port=0)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("GLMTUNE_API_KEY", "env-key")
    args = parser.parse_args(
        ["serve", str(tiny), "--port", "8123", "--model-name", "cli-tiny", "--max-queue", "3"]
    )
    assert args.func(args) == 0
    srv = started["srv"]
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="env-key", max_retries=0, timeout=30)
        assert (
            c.chat.completions.create(
                model="cli-tiny", messages=user("hi"), max_tokens=2
            ).usage.completion_tokens
            <= 2
        )
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert health(srv)["max_queue"] == 3
    finally:
        srv.stop()
