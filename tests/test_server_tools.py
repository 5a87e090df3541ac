"""Tool calls over the OpenAI-compatible API (ChatGLM3 and GLM-4), driven by the official ``openai`` client.

A tiny random model never calls a tool, so its ``generate`` is replaced by a script at the boundary the
native backend uses: prompt ids in, one token per step to the streamer, the stopping criteria asked after
each step. Everything else is real: the request is rendered by the model's template into the ids the
script receives -- checked against the official layouts (ChatGLM3's ``build_chat_input``, GLM-4's chat
template) -- and the scripted reply, the ids the model writes for a call (built with the real tokenizer
the way training encodes a call turn), goes through the backend's rows, the template's parser and the
HTTP layer. With nothing scripted the real model generates.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from glmtune.inference import Engine, GenerationSettings  # noqa: E402
from glmtune.server.app import ServerThread, create_app  # noqa: E402
from glmtune.server.native import NativeBackend  # noqa: E402
from glmtune.templates import ChatGLM3Template, GLM4Template  # noqa: E402
from glmtune.testing import make_tiny_model  # noqa: E402

WEATHER = {
    "name": "get_weather",
    "description": "城市天气",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TOOLS = [{"type": "function", "function": WEATHER}]
ARGS = {"city": "北京", "days": 2}
USER = {"role": "user", "content": "北京天气怎么样？"}
RESULT = '{"temp": 20}'
ANSWER = "北京今天20度，晴。"
# The body of a call turn as each model writes it (ChatGLM3: PROMPT.md; GLM-4: its API server's parser).
CALL_BODY = {
    "chatglm3": '```python\ntool_call(city="北京", days=2)\n```',
    "glm4": '{"city": "北京", "days": 2}',
}
# ChatGLM3's system text for tools (its API demo) and GLM-4's template branch for function tools, as in
# glm-4-9b-chat's tokenizer_config.json: the expected prompts are built with these, not with glmtune.
CHATGLM3_TOOLS_SYSTEM = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ScriptedGenerate:
    """Stands in for ``model.generate``: records each prompt and answers it with the next scripted reply
    (finished rows get the pad id, as ``generate`` does); with nothing scripted the real model runs."""

    def __init__(self, real):
        self.real = real
        self.replies: list[list[int]] = []
        self.prompts: list[list[int]] = []

    def __call__(self, input_ids, attention_mask, **kw):
        if not self.replies:
            return self.real(input_ids=input_ids, attention_mask=attention_mask, **kw)
        streamer, stopping_criteria = kw["streamer"], kw["stopping_criteria"]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            self.prompts.append([t for t, m in zip(ids, mask) if m])
            rows.append(self.replies.pop(0))
        stops, pad = set(kw["eos_token_id"]), kw["pad_token_id"]
        streamer.put(input_ids)
        done = [False] * len(rows)
        for step in range(kw["max_new_tokens"]):
            tokens = [r[step] if not d and step < len(r) else pad for r, d in zip(rows, done)]
            streamer.put(torch.tensor(tokens))
            input_ids = torch.cat([input_ids, torch.tensor(tokens)[:, None]], dim=1)
            done = [d or t in stops or step + 1 >= len(r) for d, t, r in zip(done, tokens, rows)]
            if all(done) or bool(stopping_criteria(input_ids, None).all()):
                break
        return input_ids


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def served(request, tmp_path_factory):
    generation = request.param
    path = make_tiny_model(tmp_path_factory.mktemp("tools") / generation, generation, seed=0)
    engine = Engine.from_path(path)
    script = ScriptedGenerate(engine.model.generate)
    engine.model.generate = script
    backend = NativeBackend(engine, max_batch_size=4, max_queue=16)
    # Tool definitions run past the tiny model's 256 positions; the script has no position limit.
    backend.context_length = 4096
    srv = ServerThread(create_app(backend, model_name="tiny", timeout=60))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    tok = engine.tokenizer
    yield SimpleNamespace(
        generation=generation,
        engine=engine,
        backend=backend,
        tok=tok,
        script=script,
        client=client,
        special=lambda name: tok.convert_tokens_to_ids(name),
    )
    srv.stop()


# ------------------------------------------------------------------------------------- helpers
def turn(s, metadata: str, content: str) -> list[int]:
    """The ids the model writes for one assistant turn after ``<|assistant|>`` (as training encodes it)."""
    if s.generation == "chatglm3":
        return s.tok.build_single_message("assistant", metadata, content)[1:]
    return s.tok.encode(f"{metadata}\n{content}", add_special_tokens=False)


def call_reply(s, body: str | None = None, name: str = "get_weather") -> list[int]:
    """A call turn, ended by ``<|observation|>`` (a stop token: the model waits for the result)."""
    return turn(s, name, CALL_BODY[s.generation] if body is None else body) + [s.special("<|observation|>")]


def text_reply(s, text: str = ANSWER) -> list[int]:
    return turn(s, "", text) + [s.tok.eos_token_id]


def official_system(s, tools=(WEATHER,)) -> dict:
    if s.generation == "chatglm3":  # ChatGLM3's layout (PROMPT.md): bare function definitions
        return {"role": "system", "content": CHATGLM3_TOOLS_SYSTEM, "tools": list(tools)}
    return {"role": "system", "content": "", "tools": [{"type": "function", "function": t} for t in tools]}


def official_call(s) -> dict:
    return {"role": "assistant", "metadata": "get_weather", "content": CALL_BODY[s.generation]}


def official_prompt(s, history: list[dict], query: str, role: str = "user") -> list[int]:
    """The prompt ids the official code builds for ``history`` then a ``role`` message ``query``."""
    if s.generation == "chatglm3":
        return s.tok.build_chat_ids(query, history, role)  # the official tokenizer's build_chat_input
    return s.tok.apply_chat_template(
        [*history, {"role": role, "content": query}],
        chat_template=GLM4_CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def collect_stream(s, **kw):
    """(assembled completion, raw chunks) of a streamed request, assembled by the client's helper."""
    with s.client.chat.completions.stream(model="tiny", **kw) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        return stream.get_final_completion(), chunks


# ---------------------------------------------------------------------------------- the tool loop
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_two_step_tool_loop(served, stream):
    s = served
    s.script.replies = [call_reply(s)]
    if stream:
        first, chunks = collect_stream(s, messages=[USER], tools=TOOLS, max_tokens=64)
        streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
        assert {tc.function.name for tc in streamed if tc.function.name} == {"get_weather"}
    else:
        first = s.client.chat.completions.create(model="tiny", messages=[USER], tools=TOOLS, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    # The tools went into the system message the way the model was trained.
    assert s.script.prompts[-1] == official_prompt(s, [official_system(s)], USER["content"])

    # Step 2: the call and its result go back; the model answers in text.
    s.script.replies = [text_reply(s)]
    messages = [USER, choice.message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    if stream:
        second, _ = collect_stream(s, messages=messages, tools=TOOLS, max_tokens=64)
    else:
        second = s.client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=64)
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    # The call is rendered back as the model wrote it, the tool message as an observation turn.
    prompt = s.script.prompts[-1]
    history = [official_system(s), USER, official_call(s)]
    assert prompt == official_prompt(s, history, RESULT, role="observation")
    assert prompt.count(s.special("<|observation|>")) == 1


def test_text_then_call_in_one_reply(served):
    """A reply may say something, then open a new ``<|assistant|>`` turn with the call (PROMPT.md)."""
    s = served
    say = "好的，我来查一下。"
    reply = turn(s, "", say) + [s.special("<|assistant|>")] + call_reply(s)
    s.script.replies = [list(reply)]
    plain = s.client.chat.completions.create(model="tiny", messages=[USER], tools=TOOLS, max_tokens=64)
    s.script.replies = [list(reply)]
    streamed, chunks = collect_stream(s, messages=[USER], tools=TOOLS, max_tokens=64)
    for r in (plain, streamed):
        assert r.choices[0].message.content == say and r.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments) for c in r.choices[0].message.tool_calls] == [ARGS]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == say


@pytest.mark.parametrize(
    "name, body",
    [
        ("get_weather", {"chatglm3": "```python\ntool_call(city=北京)\n```", "glm4": '{"city": 北京}'}),
        ("get_weather", {"chatglm3": "```python\nimport os\n```", "glm4": '["北京", 2]'}),
        ("get_time", None),  # a well-formed call to a function the request did not offer
    ],
    ids=["bad-arguments", "not-a-call", "unknown-function"],
)
def test_malformed_call_is_plain_content(served, name, body):
    s = served
    text = CALL_BODY[s.generation] if body is None else body[s.generation]
    s.script.replies = [call_reply(s, text, name=name)]
    r = s.client.chat.completions.create(model="tiny", messages=[USER], tools=TOOLS, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == f"{name}\n{text}"
    s.script.replies = [call_reply(s, text, name=name)]
    streamed, chunks = collect_stream(s, messages=[USER], tools=TOOLS, max_tokens=64)
    assert streamed.choices[0].message.content == f"{name}\n{text}"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


@pytest.mark.parametrize(
    "body",
    [
        "tool_call(city=__import__('os').system('exit 1'))",  # code, not a literal: never run
        "tool_call(**{'city': 'x'})",
        "tool_call('北京')",
        "print(city='北京')",
        "tool_call(city=1e999)",  # not JSON
        "tool_call(city={1, 2})",
        "tool_call(city='\x00')\x00",
        "tool_call(city=" + "[" * 5000 + "]" * 5000 + ")",
    ],
)
def test_chatglm3_call_parser_accepts_only_literals(body):
    assert ChatGLM3Template()._call_arguments(f"```python\n{body}\n```") is None


def test_glm4_call_parser_never_raises():
    assert GLM4Template()._call_arguments("[" * 100000) is None


def test_call_cut_by_max_tokens_is_plain_content(served):
    s = served
    reply = call_reply(s)
    s.script.replies = [reply]
    r = s.client.chat.completions.create(
        model="tiny", messages=[USER], tools=TOOLS, max_tokens=len(reply) - 3
    )
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("get_weather\n")


def test_tool_choice(served):
    s = served
    other = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
    tools = [*TOOLS, {"type": "function", "function": other}]
    # A named function: only that definition is shown (as the official GLM-4 server does).
    s.script.replies = [call_reply(s)]
    r = s.client.chat.completions.create(
        model="tiny",
        messages=[USER],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert s.script.prompts[-1] == official_prompt(s, [official_system(s)], USER["content"])
    # "none": no tools in the prompt, and a call-shaped reply is text.
    s.script.replies = [call_reply(s)]
    r = s.client.chat.completions.create(
        model="tiny", messages=[USER], tools=tools, tool_choice="none", max_tokens=64
    )
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    assert s.script.prompts[-1] == official_prompt(s, [], USER["content"])
    with pytest.raises(openai.BadRequestError, match="cannot force a call"):
        s.client.chat.completions.create(model="tiny", messages=[USER], tools=tools, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        s.client.chat.completions.create(
            model="tiny",
            messages=[USER],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_bad_tool_requests_are_400(served):
    s = served
    with pytest.raises(openai.BadRequestError, match="only function tools") as e:
        s.client.chat.completions.create(model="tiny", messages=[USER], tools=[{"type": "code_interpreter"}])
    assert e.value.body["param"] == "tools[0]"
    bad_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}
        ],
    }
    with pytest.raises(openai.BadRequestError, match="not JSON") as e:
        s.client.chat.completions.create(
            model="tiny",
            messages=[USER, bad_call, {"role": "tool", "tool_call_id": "call_1", "content": "x"}],
        )
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"


def test_real_model_reply_with_tools_is_parsed_like_the_template(served):
    """Nothing scripted: the random model's greedy reply, read by the server, equals the template's
    parse of ``Engine.generate``'s ids for the same prompt (a random reply is text, not a call)."""
    s = served
    tools = [{"type": "function", "function": {"name": "get_weather"}}]  # short: fits 256 positions
    r = s.client.chat.completions.create(
        model="tiny", messages=[USER], tools=tools, max_tokens=8, temperature=0
    )
    sent = [
        {"role": "system", "content": s.engine.template.tools_system_prompt, "tools": [tools[0]["function"]]}
    ]
    ref = s.engine.generate([[*sent, USER]], GenerationSettings(max_new_tokens=8))[0]
    parsed = s.engine.template.parse_reply(s.tok, ref.token_ids, {"get_weather"})
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].message.content == parsed.content and not parsed.tool_calls
    assert r.choices[0].finish_reason == ref.finish_reason


def test_model_without_tool_support_rejects_tools(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("notools") / "chatglm2", "chatglm2", seed=0)
    backend = NativeBackend(Engine.from_path(path), max_batch_size=1, max_queue=2)
    srv = ServerThread(create_app(backend, model_name="tiny", timeout=30))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="tools are not supported by the chatglm2") as e:
            client.chat.completions.create(model="tiny", messages=[USER], tools=TOOLS)
        assert e.value.status_code == 400 and e.value.body["param"] == "tools"
        past_call = {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        }
        with pytest.raises(openai.BadRequestError, match="tools are not supported"):
            client.chat.completions.create(model="tiny", messages=[USER, past_call, USER])
        r = client.chat.completions.create(model="tiny", messages=[USER], max_tokens=2)  # plain chat works
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        srv.stop()
