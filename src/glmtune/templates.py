"""Chat templates: how each model generation turns ``messages`` into token ids and loss labels.

``messages`` is always a list of ``{"role", "content"}`` dicts with roles system / user / assistant /
observation; a ChatGLM3 / GLM-4 system message may carry ``tools`` and an assistant message ``metadata``
(the name of the tool it calls).

- ``encode_prompt(tok, messages)``: ids up to where the model's reply starts (identical to the
  official ``build_chat_input`` / ``build_prompt`` + tokenizer call).
- ``encode_example(tok, messages)``: ``(input_ids, labels)`` for training, labels aligned with
  input_ids (the model shifts them by one) and -100 everywhere no loss applies.

Loss placement follows each generation's official fine-tuning code:
- ChatGLM-6B: ``prompt + [gMASK] <sop> reply <eop>``; labels from ``<sop>`` on (history goes into the
  ``[Round i]`` prompt, so only the last reply is trained).
- ChatGLM2-6B: ``[gMASK] sop [Round i]...答：`` + reply + eos; labels on reply + eos.
- ChatGLM3 / GLM-4: ``[gMASK] sop`` then per message ``<|role|>`` + metadata + newline + content; loss on
  every assistant message (after its role token) and on the token that ends it (next role token or eos).
- Other models: the tokenizer's own chat template; loss on each assistant span.

Tool calling (ChatGLM3 / GLM-4, ``supports_tools``), as each model was trained:
- tools go into the system message. ChatGLM3: the system text, a newline, then the function definitions
  as one JSON list (indent 4). GLM-4 (glm-4-9b-chat's chat template): a fixed system text with one
  ``## name`` section per function (its JSON, indent 4), then the system message's own text, if any, as
  a second system turn.
- a call is an assistant turn whose metadata line is the function name. ChatGLM3's body is Python code,
  ```` ```python\ntool_call(city="北京")\n``` ````; GLM-4's is the arguments as a JSON object. One reply
  may hold several turns, each opened by ``<|assistant|>`` (text, then a call).
- the tool's result comes back as an ``observation`` turn.
``tool_call_message`` renders a past call, ``parse_reply`` turns generated ids into text + calls.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation")


@dataclass
class Encoded:
    """An encoded training example. Iterates as ``(input_ids, labels)``."""

    input_ids: list[int]
    labels: list[int]

    def __iter__(self):
        return iter((self.input_ids, self.labels))


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's ``function.arguments``


@dataclass
class Reply:
    """A generated reply read for a request with tools: its text and the calls it makes."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def _split_last_reply(messages: list[dict]) -> tuple[list[dict], dict]:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training example must end with an assistant message")
    return messages[:-1], messages[-1]


def _rounds(messages: list[dict]) -> tuple[str, list[tuple[str, str]], str]:
    """(system, [(query, reply), ...] history, current query) for the [Round i] templates."""
    system = ""
    rest = list(messages)
    if rest and rest[0]["role"] == "system":
        system = rest.pop(0)["content"]
    history, query, pending = [], None, None
    for m in rest:
        if m["role"] == "user":
            if pending is not None:
                raise ValueError("two user messages in a row")
            pending = m["content"]
        elif m["role"] == "assistant":
            if pending is None:
                raise ValueError("an assistant message must follow a user message")
            history.append((pending, m["content"]))
            pending = None
        else:
            raise ValueError(
                f"role {m['role']!r} is not supported by the [Round i] (ChatGLM-6B/ChatGLM2) format"
            )
    if pending is None:
        raise ValueError("the prompt must end with a user message")
    query = pending
    if system:
        # ChatGLM-6B/2 have no system role: the instruction is put in front of the first query.
        if history:
            history[0] = (f"{system}\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n{query}"
    return system, history, query


class Template:
    name = "base"
    # Tool definitions (a system message's ``tools``) can be rendered.
    supports_tools = False
    # ``observation`` (tool result) messages can be rendered.
    supports_observation = False
    # A reply starts with a metadata line (a tool name, usually empty) that clean_reply drops.
    reply_has_metadata_line = False
    # System text put in front of the tools when a request brings tools and no system message.
    tools_system_prompt = ""
    # Text that ends a generated reply (cut off); the generation templates end replies with tokens only.
    stop_strings: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """What identifies the layout in the tokenized-data cache key (a file-defined one hashes its
        contents)."""
        return self.name

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end a reply besides the model spec's (``ModelSpec.stop_token_ids``)."""
        return []

    def encode_prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def encode_example(self, tokenizer, messages: list[dict], train_on_prompt: bool = False) -> Encoded:
        raise NotImplementedError

    def clean_reply(self, text: str, partial: bool = False) -> str:
        """Decoded reply text as shown to a user (``partial``: the first piece of a stream)."""
        return text.strip() if not partial else text.lstrip()

    def tool_call_message(self, name: str, arguments: str) -> dict:
        """The assistant message of a past call (``arguments``: a JSON object); ValueError if bad."""
        raise ValueError(f"the {self.name} chat format has no tool calls")

    def reply_turns(self, tokenizer, ids: list[int]) -> list[list[int]]:
        """Generated ids split into the turns of one reply (one turn unless the format has more)."""
        return [list(ids)]

    def parse_reply(self, tokenizer, ids: list[int], tool_names) -> Reply:
        """Generated ids (stop token excluded) as text + calls to functions among ``tool_names``."""
        return Reply(self.clean_reply(tokenizer.decode(ids, skip_special_tokens=True)))


def _labels(ids: list[int], target: list[bool], train_on_prompt: bool) -> list[int]:
    return [i if (t or train_on_prompt) else IGNORE_INDEX for i, t in zip(ids, target)]


class ChatGLMv1Template(Template):
    """ChatGLM-6B: ``[Round i]\\n问：…\\n答：`` counted from 0, or the bare query with no history."""

    name = "chatglm"

    @staticmethod
    def prompt_text(messages: list[dict]) -> str:
        _, history, query = _rounds(messages)
        if not history:
            return query
        text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
        return text + f"[Round {len(history)}]\n问：{query}\n答："

    def _specials(self, tok) -> tuple[int, int, int]:
        return tok.convert_tokens_to_ids("[gMASK]"), tok.bos_token_id, tok.eos_token_id

    def encode_prompt(self, tokenizer, messages):
        gmask, sop, _ = self._specials(tokenizer)
        return tokenizer.encode(self.prompt_text(messages), add_special_tokens=False) + [gmask, sop]

    def encode_example(self, tokenizer, messages, train_on_prompt=False):
        prompt, reply = _split_last_reply(messages)
        gmask, sop, eop = self._specials(tokenizer)
        src = tokenizer.encode(self.prompt_text(prompt), add_special_tokens=False)
        tgt = tokenizer.encode(reply["content"], add_special_tokens=False)
        ids = src + [gmask, sop] + tgt + [eop]
        # Official: labels = [-100] * index(<sop>) + ids[index(<sop>):] (so <sop> itself is a label).
        target = [False] * (len(src) + 1) + [True] * (len(tgt) + 2)
        return Encoded(ids, _labels(ids, target, train_on_prompt))


class ChatGLM2Template(Template):
    """ChatGLM2-6B: ``[gMASK] sop [Round i]\\n\\n问：…\\n\\n答：`` counted from 1."""

    name = "chatglm2"

    @staticmethod
    def prompt_text(messages: list[dict]) -> str:
        _, history, query = _rounds(messages)
        text = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history))
        return text + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def encode_prompt(self, tokenizer, messages):
        return tokenizer.encode(self.prompt_text(messages), add_special_tokens=True)

    def encode_example(self, tokenizer, messages, train_on_prompt=False):
        prompt, reply = _split_last_reply(messages)
        src = self.encode_prompt(tokenizer, prompt)
        tgt = tokenizer.encode(reply["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = src + tgt
        return Encoded(ids, _labels(ids, [False] * len(src) + [True] * len(tgt), train_on_prompt))


class RoleTokenTemplate(Template):
    """ChatGLM3 / GLM-4: ``[gMASK] sop`` + per message ``<|role|>`` metadata ``\\n`` content."""

    supports_tools = True
    supports_observation = True
    reply_has_metadata_line = True

    def __init__(self, name: str):
        self.name = name

    def _message_ids(self, tok, role: str, metadata: str, content: str) -> list[int]:
        raise NotImplementedError

    def _system_with_tools(self, content: str, tools: list) -> list[tuple[str, str]]:
        """(metadata, content) of the system turn(s) carrying ``tools``."""
        raise NotImplementedError

    def _call_body(self, arguments: dict) -> str:
        """The content of an assistant turn calling a function with ``arguments``."""
        raise NotImplementedError

    def _call_arguments(self, body: str) -> dict | None:
        """The arguments of a call turn's content, or None when it is not a well-formed call."""
        raise NotImplementedError

    def _prefix(self, tok) -> list[int]:
        return [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids(self._sop)]

    _sop = "sop"

    def _turns(self, m: dict) -> list[tuple[str, str, str]]:
        """(role, metadata, content) of the turn(s) one message is rendered as."""
        role = m["role"]
        if role == "tool":
            role = "observation"
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if role == "system" and m.get("tools"):
            return [
                ("system", meta, text) for meta, text in self._system_with_tools(m["content"], m["tools"])
            ]
        return [(role, m.get("metadata") or "", m["content"])]

    def _encode(self, tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
        ids, target = self._prefix(tok), [False, False]
        for m in messages:
            for role, metadata, content in self._turns(m):
                piece = self._message_ids(tok, role, metadata, content)
                ids += piece
                if role == "assistant":
                    # The role token is given; everything after it is predicted ...
                    target += [False] + [True] * (len(piece) - 1)
                else:
                    target += [False] * len(piece)
        return ids, target

    def encode_prompt(self, tokenizer, messages):
        ids, _ = self._encode(tokenizer, messages)
        return ids + [tokenizer.convert_tokens_to_ids("<|assistant|>")]

    def encode_example(self, tokenizer, messages, train_on_prompt=False):
        _split_last_reply(messages)
        ids, target = self._encode(tokenizer, messages)
        ids.append(tokenizer.eos_token_id)
        target.append(False)
        # ... and so is the token that ends an assistant message (the next role token or eos).
        for p in range(len(ids) - 1, 0, -1):
            if target[p - 1] and not target[p]:
                target[p] = True
        return Encoded(ids, _labels(ids, target, train_on_prompt))

    def clean_reply(self, text: str, partial: bool = False) -> str:
        # A reply starts with its metadata line (a tool name, usually empty) then a newline.
        if partial:
            return text.lstrip("\n")
        return text.split("\n", 1)[1].strip() if "\n" in text else text.strip()

    def tool_call_message(self, name: str, arguments: str) -> dict:
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"the arguments of a call to {name!r} are not JSON: {e}") from None
        if not isinstance(args, dict):
            raise ValueError(f"the arguments of a call to {name!r} must be a JSON object")
        return {"role": "assistant", "metadata": name, "content": self._call_body(args)}

    def reply_turns(self, tokenizer, ids):
        # The model opens each further turn of the same reply with <|assistant|> (e.g. text, then a call).
        sep = tokenizer.convert_tokens_to_ids("<|assistant|>")
        turns: list[list[int]] = [[]]
        for t in ids:
            if t == sep:
                turns.append([])
            else:
                turns[-1].append(t)
        return turns

    def parse_reply(self, tokenizer, ids, tool_names):
        texts, calls = [], []
        for turn in self.reply_turns(tokenizer, ids):
            text = tokenizer.decode(turn, skip_special_tokens=True)
            metadata, body = text.split("\n", 1) if "\n" in text else ("", text)
            name = metadata.strip()
            if not name:
                if body.strip():
                    texts.append(body.strip())
                continue
            args = self._call_arguments(body) if name in tool_names else None
            if args is None:
                # Not a call to a known function, or not well formed: the client gets the text as it is.
                texts.append(f"{name}\n{body.strip()}")
            else:
                calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        return Reply("\n".join(texts), calls)


def _py_literal(value) -> str:
    """``value`` (parsed JSON) as a Python literal; strings double-quoted as in ChatGLM3's prompts."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid Python string literal
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"


class ChatGLM3Template(RoleTokenTemplate):
    """ChatGLM3: tools as a JSON list after the system text; a call is ``tool_call(name=value, ...)`` code."""

    tools_system_prompt = (
        "Answer the following questions as best as you can. You have access to the following tools:"
    )

    def __init__(self):
        super().__init__("chatglm3")

    def _message_ids(self, tok, role, metadata, content):
        return tok.build_single_message(role, metadata, content)

    def _system_with_tools(self, content, tools):
        return [("", content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False))]

    def _call_body(self, arguments):
        call = ", ".join(f"{k}={_py_literal(v)}" for k, v in arguments.items())
        return f"```python\ntool_call({call})\n```"

    def _call_arguments(self, body):
        lines = body.strip().split("\n")
        if lines and lines[0].startswith("```"):
            lines = lines[1:]
        if lines and lines[-1].strip() == "```":
            lines = lines[:-1]
        # The official demo eval()s this code; a literal-only parse runs nothing the model writes.
        try:
            call = ast.parse("\n".join(lines).strip(), mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte
            return None
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "tool_call"
            and not call.args
        ):
            return None
        args = {}
        for kw in call.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError):  # a set, bytes, complex, 1e999: not JSON arguments
            return None
        return args


# glm-4-9b-chat's chat template (tokenizer_config.json) as transformers renders it -- what the official
# API server and fine-tuning script feed the model: the system turn written for a message with tools,
# then one section per function. (Jinja's trim_blocks eats the first of the two newlines before each
# "## name"; the older hand-built prompts of the demos keep both.)
GLM4_TOOLS_HEADER = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_FUNCTION_SECTION = "\n## {name}\n\n{definition}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


class GLM4Template(RoleTokenTemplate):
    """GLM-4: like ChatGLM3 but with ``<sop>``, no sentencepiece dummy prefix, tools as ``## name``
    sections of a fixed system text, and calls as ``name\\n{json arguments}``."""

    _sop = "<sop>"

    def __init__(self):
        super().__init__("glm4")

    def _message_ids(self, tok, role, metadata, content):
        role_id = tok.convert_tokens_to_ids(f"<|{role}|>")
        return [role_id] + tok.encode(f"{metadata}\n{content}", add_special_tokens=False)

    def _system_with_tools(self, content, tools):
        text = GLM4_TOOLS_HEADER
        for i, tool in enumerate(tools):
            # OpenAI's {"type": "function", "function": {...}} or a bare function definition.
            fn = tool.get("function") if isinstance(tool, dict) and "type" in tool else tool
            if not isinstance(fn, dict) or tool.get("type", "function") != "function" or "name" not in fn:
                kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
                raise ValueError(
                    f"tools[{i}]: only function definitions can be rendered for GLM-4, got {kind!r}"
                )
            definition = json.dumps(fn, ensure_ascii=False, indent=4)
            text += GLM4_FUNCTION_SECTION.format(name=fn["name"], definition=definition)
        # The template writes a message's own content as a separate turn, and skips it when empty.
        return [("", text)] + ([("", content)] if content else [])

    def _call_body(self, arguments):
        return json.dumps(arguments, ensure_ascii=False)

    def _call_arguments(self, body):
        try:
            args = json.loads(body.strip())
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            return None
        return args if isinstance(args, dict) else None


class HFChatTemplate(Template):
    """Any model with a Jinja chat template in its tokenizer (``tokenizer.apply_chat_template``)."""

    name = "hf"
    # The model's own Jinja template decides what an observation message means.
    supports_observation = True

    @staticmethod
    def _plain(messages):
        out = []
        for m in messages:
            role = "tool" if m["role"] == "observation" else m["role"]
            out.append({"role": role, "content": m["content"]})
        return out

    def _render(self, tok, messages, generation_prompt: bool) -> str:
        if not getattr(tok, "chat_template", None):
            # No template shipped: a minimal, documented plain-text layout.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if generation_prompt else "")
        return tok.apply_chat_template(
            self._plain(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode_prompt(self, tokenizer, messages):
        return tokenizer.encode(self._render(tokenizer, messages, True), add_special_tokens=False)

    def encode_example(self, tokenizer, messages, train_on_prompt=False):
        _split_last_reply(messages)
        full = self._render(tokenizer, messages, False)
        # Character spans of each assistant reply: the text a reply adds after the generation prompt.
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(tokenizer, messages[:i], True)
            upto = self._render(tokenizer, messages[: i + 1], False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError(
                    "the chat template does not render conversations incrementally; cannot place the loss"
                )
            spans.append((len(before), len(upto)))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        target = [any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc["offset_mapping"]]
        return Encoded(list(ids), _labels(ids, target, train_on_prompt))
