"""Chat templates: how each model generation turns ``messages`` into token ids and loss labels.

``messages`` is always a list of ``{"role", "content"}`` dicts with roles system / user / assistant /
observation; a ChatGLM3 system message may carry ``tools`` and an assistant message ``metadata``.

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation")


@dataclass
class Encoded:
    """An encoded training example. Iterates as ``(input_ids, labels)``."""

    input_ids: list[int]
    labels: list[int]

    def __iter__(self):
        return iter((self.input_ids, self.labels))


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

    def encode_prompt(self, tokenizer, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def encode_example(self, tokenizer, messages: list[dict], train_on_prompt: bool = False) -> Encoded:
        raise NotImplementedError

    def clean_reply(self, text: str, partial: bool = False) -> str:
        """Decoded reply text as shown to a user (``partial``: the first piece of a stream)."""
        return text.strip() if not partial else text.lstrip()


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

    def _prefix(self, tok) -> list[int]:
        return [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids(self._sop)]

    _sop = "sop"

    def _encode(self, tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
        ids, target = self._prefix(tok), [False, False]
        for m in messages:
            role = m["role"]
            if role == "tool":
                role = "observation"
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            content = m["content"]
            if role == "system" and m.get("tools"):
                content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
            piece = self._message_ids(tok, role, m.get("metadata") or "", content)
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


class ChatGLM3Template(RoleTokenTemplate):
    def __init__(self):
        super().__init__("chatglm3")

    def _message_ids(self, tok, role, metadata, content):
        return tok.build_single_message(role, metadata, content)


class GLM4Template(RoleTokenTemplate):
    """GLM-4: like ChatGLM3 but with ``<sop>`` and no sentencepiece dummy prefix."""

    _sop = "<sop>"

    def __init__(self):
        super().__init__("glm4")

    def _message_ids(self, tok, role, metadata, content):
        role_id = tok.convert_tokens_to_ids(f"<|{role}|>")
        return [role_id] + tok.encode(f"{metadata}\n{content}", add_special_tokens=False)


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
