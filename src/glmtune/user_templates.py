"""Prompt templates defined in YAML, without code: ``model.template`` / ``--template NAME|FILE``.

A template file (every key but ``name``, ``user`` and ``assistant`` optional)::

    name: alpaca
    bos: tokenizer            # tokenizer (default): the tokens the tokenizer starts a text with
                              # (Llama <s>, ChatGLM2/3 [gMASK] sop, none for GPT-2/Qwen); "": none;
                              # any other text: written literally in front
    system: {prefix: "", suffix: "", default: "Below is an instruction ..."}
    user: {prefix: "### Instruction:\\n", suffix: ""}
    assistant: {prefix: "### Response:\\n", suffix: "", eos: true}
    observation: {prefix: "### Tool:\\n", suffix: ""}   # absent: tool results are refused
    separator: "\\n\\n"          # text between two messages
    stop: ["### Instruction:"]  # text that ends a generated reply (cut off, not shown)
    loss: all_replies         # all_replies | last_reply
    loss_on_suffix: true      # the assistant suffix and eos are labels (the model learns to stop)

A conversation renders as ``bos``, then each message as ``prefix + content + suffix`` (the assistant's
followed by the tokenizer's eos token when ``assistant.eos``), ``separator`` between two messages. The
system turn is the conversation's system message, else ``system.default``; none is written when that
text is empty. Without a ``system`` section a system text goes in front of the first user message,
followed by a newline. The generation prompt is the conversation, ``separator`` and the assistant
prefix; trailing spaces of the assistant prefix are left out of it: they start the reply, because
tokenizers merge a space into the word after it (``ASSISTANT: Hi`` is ``ASSISTANT:`` + `` Hi``).

Token ids: the text between two eos tokens is tokenized in one piece (``add_special_tokens=False``), as a
Jinja chat template's output is, so ids do not depend on where the template's literals end. A token is
a label when it belongs to a reply (or the reply's suffix/eos, with ``loss_on_suffix``): the boundary
between prompt and reply text is the longest common prefix of the whole piece's ids and the ids of the
text before the boundary; a token spanning the boundary belongs to the later part. The prompt part is
therefore exactly :meth:`UserTemplate.encode_prompt` of the conversation so far whenever the tokenizer
does not merge across the boundary (the shipped templates end their assistant prefix with a newline or
``:``, never a space, for that reason).

Shipped templates (``src/glmtune/assets/templates/NAME.yaml``): :func:`shipped_templates`.
:func:`load_template` reads a name, a file or a mapping; problems are :class:`~glmtune.errors.ConfigError`
naming the file and the key. :meth:`UserTemplate.to_jinja` writes the same layout as a transformers
``chat_template`` (``glmtune export`` puts it in ``tokenizer_config.json`` after checking it reproduces
the prompt ids).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .templates import ROLES, Encoded, Template, _labels, _split_last_reply

__all__ = [
    "TEMPLATE_FILENAME",
    "TemplateFile",
    "UserTemplate",
    "load_template",
    "save_run_template",
    "shipped_templates",
]

#: The copy of a user template kept in a run folder or an exported model folder (read back by
#: ``glmtune.runs.Run`` and ``resolve_model``).
TEMPLATE_FILENAME = "glmtune_template.yaml"
_ASSETS = "assets/templates"
_TRAILING_SPACE = " \t"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Turn(_Strict):
    prefix: str = Field("", description="text in front of the message's content")
    suffix: str = Field("", description="text after the message's content")


class SystemTurn(Turn):
    default: str = Field("", description="system text used when a conversation has none")


class AssistantTurn(Turn):
    eos: bool = Field(True, description="the tokenizer's eos token after each reply (after the suffix)")


class TemplateFile(_Strict):
    """The validated contents of a template YAML file."""

    name: str = Field(description="the template's name (shown in messages and reports)")
    description: str = ""
    bos: str | None = Field("tokenizer", description='tokenizer, "" (none), or literal text')
    system: SystemTurn | None = None
    user: Turn
    assistant: AssistantTurn
    observation: Turn | None = None
    separator: str = ""
    stop: list[str] = Field(default_factory=list)
    loss: Literal["all_replies", "last_reply"] = "all_replies"
    loss_on_suffix: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str]) -> list[str]:
        for i, s in enumerate(value):
            if not s:
                raise ValueError(f"stop[{i}] is empty (an empty stop string would end every reply at once)")
        return value


def _location(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _render_errors(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            # The keys valid at that place, with the closest one suggested.
            model: type[BaseModel] = TemplateFile
            for part in loc[:-1]:
                ann = model.model_fields[part].annotation
                args = getattr(ann, "__args__", (ann,))
                model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), model)
            known = list(model.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"{where}: {_location(loc)}: unknown key (known: {', '.join(known)}){hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: {_location(loc)}: required key missing")
        else:
            lines.append(f"{where}: {_location(loc)}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


class UserTemplate(Template):
    """A prompt template read from YAML (see the module docstring for the layout and the ids)."""

    supports_tools = False
    reply_has_metadata_line = False

    def __init__(self, spec: TemplateFile, source: str = "<mapping>", text: str | None = None):
        self.spec = spec
        self.name = spec.name
        self.source = source  # the file or shipped name it came from (messages)
        # The YAML as written (comments kept) for the copy saved beside a run.
        self.text = text if text is not None else yaml.safe_dump(spec.model_dump(), sort_keys=False)
        self.supports_observation = spec.observation is not None
        self.stop_strings = tuple(spec.stop)

    # ------------------------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """The sha256 of the validated contents: the tokenized-data cache keys on it, not on the name."""
        blob = json.dumps(self.spec.model_dump(), sort_keys=True, ensure_ascii=True).encode()
        return f"user:{self.name}:{hashlib.sha256(blob).hexdigest()}"

    def __eq__(self, other) -> bool:
        return isinstance(other, UserTemplate) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"UserTemplate({self.name!r}, source={self.source!r})"

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the template into ``folder`` as :data:`TEMPLATE_FILENAME` (atomically)."""
        from .atomic import write_text

        return write_text(Path(folder) / TEMPLATE_FILENAME, self.text)

    # ------------------------------------------------------------------------------------ rendering
    def _turns(self, messages: list[dict]) -> list[tuple[str, str, int]]:
        """(role, content, index in ``messages``) of every turn written, the system turn included."""
        s = self.spec
        rest = list(enumerate(messages))
        system = s.system.default if s.system is not None else ""
        if rest and rest[0][1].get("role") == "system":
            system = rest.pop(0)[1].get("content") or ""
        turns: list[tuple[str, str, int]] = []
        fold = ""
        if system and s.system is not None:
            turns.append(("system", system, -1))
        elif system:
            fold = system + "\n"  # no system turn in this layout: in front of the first user message
        for i, m in rest:
            role = "observation" if m.get("role") == "tool" else m.get("role")
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} (the {self.name} template knows {', '.join(ROLES)})")
            if role == "system":
                raise ValueError(f"the {self.name} template takes a system message only as the first message")
            if role == "observation" and s.observation is None:
                raise ValueError(
                    f"the {self.name} template has no observation turn (tool results); add an "
                    "'observation' section with its prefix and suffix"
                )
            content = m.get("content") or ""
            if role == "user" and fold:
                content, fold = fold + content, ""
            turns.append((role, content, i))
        if fold:
            raise ValueError(f"the {self.name} template has no system turn and no user message to put it in")
        return turns

    def _pieces(self, messages: list[dict], generation_prompt: bool) -> list[tuple[str | None, int | None]]:
        """The conversation as (text, owner) pieces: owner = index of the assistant message the text
        belongs to (None: prompt text). A None text is the eos token."""
        s = self.spec
        out: list[tuple[str | None, int | None]] = []
        if s.bos and s.bos != "tokenizer":
            out.append((s.bos, None))
        sections = {"system": s.system, "user": s.user, "observation": s.observation}
        turns = self._turns(messages)
        for k, (role, content, i) in enumerate(turns):
            if k:
                out.append((s.separator, None))
            if role == "assistant":
                head = s.assistant.prefix.rstrip(_TRAILING_SPACE)
                tail_owner = i if s.loss_on_suffix else None
                out += [(head, None), (s.assistant.prefix[len(head) :] + content, i)]
                out.append((s.assistant.suffix, tail_owner))
                if s.assistant.eos:
                    out.append((None, tail_owner))
            else:
                turn = sections[role]
                out.append((turn.prefix + content + turn.suffix, None))
        if generation_prompt:
            if turns:
                out.append((s.separator, None))
            out.append((s.assistant.prefix.rstrip(_TRAILING_SPACE), None))
        return [(t, o) for t, o in out if t is None or t]

    # -------------------------------------------------------------------------------------- tokens
    def bos_ids(self, tokenizer) -> list[int]:
        """The ids in front of every conversation with ``bos: tokenizer``: those the tokenizer puts in
        front of a text (empty for ``bos`` "" or a literal text, which is part of the text).

        A tokenizer that puts its special tokens after the text (ChatGLM-6B's ``[gMASK] <sop>``, which
        end the bidirectional context of that prefix LM) is refused: a prompt template needs a causal LM.
        """
        plain = tokenizer.encode("Hello", add_special_tokens=False)
        full = tokenizer.encode("Hello", add_special_tokens=True)
        at = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), 0)
        lead, trail = full[:at], full[at + len(plain) :]
        if trail and not lead and set(trail) != {tokenizer.eos_token_id}:
            names = " ".join(tokenizer.convert_ids_to_tokens(trail))
            raise ConfigError(
                f"template {self.name} ({self.source}): this tokenizer puts its special tokens ({names}) after "
                "the text, as ChatGLM-6B's prefix LM needs; prompt templates need a causal LM (ChatGLM2/3, "
                "GLM-4 or another transformers model): use the model's own template (no template setting)"
            )
        return list(lead) if self.spec.bos == "tokenizer" else []

    def stop_token_ids(self, tokenizer) -> list[int]:
        """eos (when replies end with it) and each stop string that is one token of the vocabulary."""
        ids = (
            [tokenizer.eos_token_id] if self.spec.assistant.eos and tokenizer.eos_token_id is not None else []
        )
        unk = getattr(tokenizer, "unk_token_id", None)
        for s in self.spec.stop:
            i = tokenizer.convert_tokens_to_ids(s)
            if isinstance(i, int) and i != unk and tokenizer.encode(s, add_special_tokens=False) == [i]:
                ids.append(i)
        return list(dict.fromkeys(ids))

    def _eos(self, tokenizer) -> int:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"template {self.name} ({self.source}): assistant.eos is true but the tokenizer has no eos "
                "token; set assistant.eos: false and end replies with a suffix and a stop string"
            )
        return tokenizer.eos_token_id

    @staticmethod
    def _encode_text(tok, runs: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        """Tokenize the text of ``runs`` (text, is_label) in one piece; each token takes the flag of the
        run it starts in, found through the longest common prefix with the ids of the text before each
        change of flag (tokenizers give no character offsets for every class: the ChatGLM ones have none)."""
        merged: list[list] = []
        for text, flag in runs:
            if merged and merged[-1][1] == flag:
                merged[-1][0] += text
            else:
                merged.append([text, flag])
        whole = "".join(t for t, _ in merged)
        ids = list(tok.encode(whole, add_special_tokens=False))
        target: list[bool] = []
        chars = start = 0
        for n, (text, flag) in enumerate(merged):
            chars += len(text)
            if n == len(merged) - 1:
                end = len(ids)
            else:
                before = tok.encode(whole[:chars], add_special_tokens=False)
                common = 0
                while common < min(len(before), len(ids)) and before[common] == ids[common]:
                    common += 1
                end = max(start, common)
            target += [flag] * (end - start)
            start = end
        return ids, target

    def _encode(self, tok, messages: list[dict], generation_prompt: bool) -> tuple[list[int], list[bool]]:
        pieces = self._pieces(messages, generation_prompt)
        replies = [i for _, i in pieces if i is not None]
        trained = set(replies) if self.spec.loss == "all_replies" else set(replies[-1:])
        lead = self.bos_ids(tok)
        ids, target = list(lead), [False] * len(lead)
        runs: list[tuple[str, bool]] = []
        for text, owner in [*pieces, ("", None)]:  # the empty end piece flushes the last text
            if text is None or text == "":
                if runs:
                    more, flags = self._encode_text(tok, runs)
                    ids += more
                    target += flags
                    runs = []
                if text is None:
                    ids.append(self._eos(tok))
                    target.append(owner in trained)
            else:
                runs.append((text, owner in trained))
        return ids, target

    def encode_prompt(self, tokenizer, messages):
        return self._encode(tokenizer, messages, True)[0]

    def encode_example(self, tokenizer, messages, train_on_prompt=False):
        _split_last_reply(messages)
        ids, target = self._encode(tokenizer, messages, False)
        return Encoded(ids, _labels(ids, target, train_on_prompt))

    # --------------------------------------------------------------------------------------- export
    def to_jinja(self, tokenizer) -> str:
        """The layout as a transformers chat template (``apply_chat_template``; ``eos_token`` is the
        tokenizer's). ``bos: tokenizer`` is written as the text of those tokens."""
        s = self.spec

        def lit(text: str) -> str:
            # A JSON string is a valid Jinja string literal (Jinja unescapes \\n, \\" and \\\\ the same way);
            # non-ASCII characters stay as they are.
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        lead = self.bos_ids(tokenizer)
        bos = "".join(tokenizer.convert_ids_to_tokens(lead)) if s.bos == "tokenizer" else (s.bos or "")
        system_default = s.system.default if s.system is not None else ""
        parts = [
            lit(bos),
            "{% set ns = namespace(first=true, system=" + json.dumps(system_default, ensure_ascii=False),
            ", fold='') %}{% set msgs = messages %}",
            "{% if messages and messages[0]['role'] == 'system' %}",
            "{% set ns.system = messages[0]['content'] or '' %}{% set msgs = messages[1:] %}{% endif %}",
        ]
        if s.system is not None:
            parts.append(
                "{% if ns.system %}"
                + lit(s.system.prefix)
                + "{{ ns.system }}"
                + lit(s.system.suffix)
                + "{% set ns.first = false %}{% endif %}"
            )
        else:
            parts.append("{% if ns.system %}{% set ns.fold = ns.system + '\\n' %}{% endif %}")
        eos = "{{ eos_token }}" if s.assistant.eos else ""
        parts += [
            "{% for m in msgs %}{% if not ns.first %}" + lit(s.separator) + "{% endif %}",
            "{% set ns.first = false %}{% set role = 'observation' if m['role'] == 'tool' else m['role'] %}",
            "{% if role == 'user' %}" + lit(s.user.prefix) + "{{ ns.fold }}{{ m['content'] }}",
            lit(s.user.suffix) + "{% set ns.fold = '' %}",
            "{% elif role == 'assistant' %}" + lit(s.assistant.prefix) + "{{ m['content'] }}",
            lit(s.assistant.suffix) + eos,
        ]
        if s.observation is not None:
            parts.append(
                "{% elif role == 'observation' %}"
                + lit(s.observation.prefix)
                + "{{ m['content'] }}"
                + lit(s.observation.suffix)
            )
        parts += [
            "{% else %}{{ raise_exception('the "
            + self.name
            + " template cannot render a ' + role + ' message') }}",
            "{% endif %}{% endfor %}",
            "{% if add_generation_prompt %}{% if not ns.first %}" + lit(s.separator) + "{% endif %}",
            lit(s.assistant.prefix.rstrip(_TRAILING_SPACE)) + "{% endif %}",
        ]
        return "".join(parts)


def save_run_template(model, folder: str | os.PathLike) -> Path | None:
    """Keep ``model``'s (a ResolvedModel's) YAML template in ``folder`` as :data:`TEMPLATE_FILENAME`, so
    eval, chat, serve, web and export of a run use what it trained with; a copy left by an earlier run
    with another template (or none) is removed. Returns the file written, if any."""
    template = getattr(model, "user_template", None)
    target = Path(folder) / TEMPLATE_FILENAME
    if isinstance(template, UserTemplate):
        return template.save(folder)
    target.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------------------------- loading
def shipped_templates() -> list[str]:
    """The names of the templates shipped with glmtune (``--template NAME``)."""
    folder = resources.files("glmtune").joinpath(_ASSETS)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def from_mapping(data, where: str = "<mapping>", text: str | None = None) -> UserTemplate:
    """A template from a parsed YAML mapping; errors name ``where`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: a template is a mapping of keys (name, user, assistant, ...), got {type(data).__name__}"
        )
    try:
        spec = TemplateFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_render_errors(e, where)) from None
    return UserTemplate(spec, where, text)


def _read(path: Path, where: str) -> UserTemplate:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the template file: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    return from_mapping(data, where, text)


def load_template(ref) -> Template | None:
    """The template ``ref`` names: None (the model's own), a :class:`~glmtune.templates.Template`, a
    mapping, a shipped name (:func:`shipped_templates`) or a YAML file. A file wins over a name."""
    if ref is None or isinstance(ref, Template):
        return ref
    if isinstance(ref, dict):
        return from_mapping(ref)
    path = Path(ref)
    if path.is_file():
        return _read(path, str(path))
    names = shipped_templates()
    if str(ref) in names:
        asset = resources.files("glmtune").joinpath(_ASSETS, f"{ref}.yaml")
        with resources.as_file(asset) as p:
            return _read(Path(p), str(p))
    if path.suffix in (".yaml", ".yml") or os.sep in str(ref):
        raise ConfigError(f"{ref}: no such template file")
    raise ConfigError(
        f"unknown template {str(ref)!r}: not a YAML file, and not a shipped template ({', '.join(names)})"
    )
