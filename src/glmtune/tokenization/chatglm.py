"""Clean-room transformers tokenizers for the ChatGLM family.

The official checkpoints ship their tokenizer as Python code inside the model folder
(``tokenization_chatglm.py``, loaded with ``trust_remote_code``). glmtune never runs that code: these classes
re-implement the same behaviour on top of the folder's sentencepiece model and ``tokenizer_config.json`` and
give identical ids (checked against outputs of the official code in ``../shared/fixtures``).

- :class:`ChatGLMTokenizer`: ChatGLM2-6B and ChatGLM3-6B (``tokenizer.model``). Sentencepiece ids are used
  unchanged; the command tokens ``[MASK] [gMASK] [sMASK] sop eop`` (+ ``<|system|> <|user|> <|assistant|>
  <|observation|>`` for ChatGLM3) get the ids right after the sentencepiece vocabulary.
- :class:`ChatGLMv1Tokenizer`: ChatGLM-6B (``ice_text.model``). Text ids are shifted by ``num_image_tokens``;
  newlines, tabs and runs of spaces are rewritten to dedicated pieces before sentencepiece sees the text.
- :func:`load_chatglm_tokenizer`: builds the right class from an official folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from shutil import copyfile

import sentencepiece as spm
from transformers.tokenization_python import PythonBackend, Trie
from transformers.tokenization_utils_base import AddedToken, BatchEncoding

from ..errors import ModelLoadError

__all__ = [
    "ChatGLMTokenizer",
    "ChatGLMv1Tokenizer",
    "load_chatglm_tokenizer",
    "v1_postprocess_text",
    "v1_preprocess_text",
]

GLM_COMMAND_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHAT_ROLES = ("system", "user", "assistant", "observation")

V1_MAX_BLANK_LENGTH = 80
_V1_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")


def v1_preprocess_text(text: str, max_blank_length: int = V1_MAX_BLANK_LENGTH) -> str:
    """ChatGLM-6B's rewrite before sentencepiece: ``\\n`` -> ``<n>``, tab -> ``<|tab|>``, k spaces -> ``<|blank_k|>``.

    Runs are replaced longest first, one length at a time, exactly like the official loop: a run longer
    than ``max_blank_length`` becomes ``<|blank_80|>`` followed by the blank token of the remainder, and a
    single space is left for sentencepiece (which turns it into ``▁``).
    """
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for k in range(max_blank_length, 1, -1):
        text = text.replace(" " * k, f"<|blank_{k}|>")
    return text


def v1_postprocess_text(text: str, max_blank_length: int = V1_MAX_BLANK_LENGTH) -> str:
    """Inverse of :func:`v1_preprocess_text` on decoded text."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for k in range(2, max_blank_length + 1):
        text = text.replace(f"<|blank_{k}|>", " " * k)
    return text


class _GLMSentencePieceTokenizer(PythonBackend):
    """What both generations share: a sentencepiece model plus ids and tokens around it.

    Subclasses say where the sentencepiece ids sit (``_sp_offset``), which extra ids exist
    (``_extra_base_token_to_id`` / ``_extra_base_id_to_token``) and which strings in the text are
    cut out before sentencepiece (``_protected_tokens``).
    """

    model_input_names = ["input_ids", "attention_mask"]
    # The official tokenizers pad on the left: generation appends at the right end of every row.
    padding_side = "left"

    def __init__(
        self, vocab_file: str | os.PathLike, do_lower_case: bool = False, remove_space: bool = False, **kwargs
    ):
        self.vocab_file = str(vocab_file)
        if "sp_model" not in self.__dict__:
            self.sp_model = spm.SentencePieceProcessor(model_file=self.vocab_file)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self._trie_tokens: frozenset[str] = frozenset()
        # auto_map points at the model folder's tokenization_chatglm.py, which glmtune never runs: a saved
        # copy must not send AutoTokenizer there either.
        kwargs.pop("auto_map", None)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, **kwargs)

    # ------------------------------------------------------------------ the base (non-added) vocabulary
    @property
    def _sp_offset(self) -> int:
        return 0

    @property
    def _sp_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _sp_id(self, index: int) -> int | None:
        """The sentencepiece id behind a token id, or None when the id is not a sentencepiece piece."""
        sp_id = index - self._sp_offset
        return sp_id if 0 <= sp_id < self._sp_size else None

    def _extra_base_token_to_id(self, token: str) -> int | None:
        return None

    def _extra_base_id_to_token(self, index: int) -> str | None:
        return None

    def _base_vocab_id(self, token: str) -> int | None:
        """The id of ``token`` in the base vocabulary, or None when it is not there (exact match only)."""
        index = self._extra_base_token_to_id(token)
        if index is not None:
            return index
        sp_id = self.sp_model.piece_to_id(token)
        if 0 <= sp_id < self._sp_size and self.sp_model.id_to_piece(sp_id) == token:
            return sp_id + self._sp_offset
        return None

    def _convert_token_to_id(self, token: str) -> int:
        index = self._extra_base_token_to_id(token)
        if index is not None:
            return index
        return self.sp_model.piece_to_id(token) + self._sp_offset

    def _convert_id_to_token(self, index: int) -> str:
        token = self._extra_base_id_to_token(index)
        if token is not None:
            return token
        sp_id = self._sp_id(index)
        # Ids past the tokenizer (a padded embedding matrix can generate them) have no token; the official
        # ChatGLM2/3 tokenizer answers "" for them too.
        return self.sp_model.id_to_piece(sp_id) if sp_id is not None else ""

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def __len__(self) -> int:
        # Counted from ids rather than from get_vocab()'s keys: a sentencepiece piece spelled like a command
        # token (e.g. "sop") would otherwise make the count, and the id of the next added token, too small.
        return max(self.vocab_size, max(self._added_tokens_decoder, default=-1) + 1)

    def _update_total_vocab_size(self):
        self.total_vocab_size = len(self)

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False) -> int:
        """Register tokens; one already in the base vocabulary keeps its id, a new one gets the next free id."""
        if not new_tokens:
            return 0
        next_index = len(self)
        num_added = 0
        for token in new_tokens:
            if not isinstance(token, (str, AddedToken)):
                raise TypeError(f"Token {token} is not a string but a {type(token)}.")
            if str(token) == "":
                continue
            if isinstance(token, str):
                if token in self._added_tokens_encoder:
                    continue
                is_special = token in self.all_special_tokens or special_tokens
                token = AddedToken(
                    token, rstrip=False, lstrip=False, normalized=not is_special, special=is_special
                )
            elif special_tokens:
                token.__setstate__({"special": True, "normalized": token.normalized})
            if token.content in self._added_tokens_encoder:
                continue
            if not token.special and token.normalized and self.do_lower_case:
                token.content = token.content.lower()
            index = self._base_vocab_id(token.content)
            if index is None:
                index = next_index
                next_index += 1
                num_added += 1
            if token.special and token.content not in self.all_special_tokens:
                self._extra_special_tokens.append(token)
            self._added_tokens_decoder[index] = token
            self._added_tokens_encoder[token.content] = index
        self._update_total_vocab_size()
        return num_added

    # ------------------------------------------------------------------------------- text -> tokens
    def _preprocess_text(self, text: str) -> str:
        """``remove_space`` / ``do_lower_case`` of tokenizer_config.json (both false in official releases)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def _protected_tokens(self) -> dict[str, AddedToken]:
        """Strings cut out of the text before sentencepiece, each kept as one token.

        By default only tokens added after construction (ids past the base vocabulary): the tokens the
        official code knows are never recognised in plain text unless a subclass says otherwise.
        """
        base = self.vocab_size
        return {tok.content: tok for index, tok in self._added_tokens_decoder.items() if index >= base}

    def _update_trie(self, unique_no_split_tokens: list[str] | None = None):
        tokens = frozenset(self._protected_tokens())
        if tokens != self._trie_tokens:
            self.tokens_trie = Trie()
            for token in tokens:
                self.tokens_trie.add(token)
            self._trie_tokens = tokens

    def tokenize(self, text: str, **kwargs) -> list[str]:
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, _ = self.prepare_for_tokenization(text, **kwargs)
        protected = {} if split_special_tokens else self._protected_tokens()
        if not protected:
            return self._tokenize(text)
        self._update_trie()
        parts = self.tokens_trie.split(text)
        for i, part in enumerate(parts):
            token = protected.get(part)
            if token is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i + 1 < len(parts) else None
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            if token.single_word:
                if left and left[-1] != " ":
                    parts[i - 1] += part
                    parts[i] = ""
                elif right and right[0] != " ":
                    parts[i + 1] = part + parts[i + 1]
                    parts[i] = ""
        result: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in protected:
                result.append(part)
            else:
                result.extend(self._tokenize(part))
        return result

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(self._preprocess_text(text), out_type=str)

    # ------------------------------------------------------------------------------- ids -> text
    def _postprocess_text(self, text: str) -> str:
        return text

    def _always_dropped_ids(self) -> set[int]:
        return set()

    def _literal_text(self, index: int) -> str | None:
        """Text of an id outside the sentencepiece range (added or command token), None when it has none."""
        token = self._added_tokens_decoder.get(index)
        return token.content if token is not None else self._extra_base_id_to_token(index)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """Runs of sentencepiece ids decode exactly like sentencepiece (byte pieces merge into UTF-8, the
        dummy-prefix space of each run is dropped); other known ids decode to their token text."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        dropped = self._always_dropped_ids()
        if skip_special_tokens:
            dropped |= set(self.all_special_ids)
        out: list[str] = []
        run: list[int] = []
        for index in map(int, ids):
            if index in dropped:
                continue
            sp_id = self._sp_id(index)
            if sp_id is not None:
                run.append(sp_id)
                continue
            text = self._literal_text(index)
            if text is None:
                # Image ids of ChatGLM-6B and ids past the vocabulary have no text.
                continue
            if run:
                out.append(self._postprocess_text(self.sp_model.decode(run)))
                run = []
            out.append(text)
        if run:
            out.append(self._postprocess_text(self.sp_model.decode(run)))
        text = "".join(out)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            index = self._added_tokens_encoder.get(token)
            if index is None:
                index = self._base_vocab_id(token)
            if index is not None and self._sp_id(index) is None:
                if run:
                    out.append(self._postprocess_text(self.sp_model.decode_pieces(run)))
                    run = []
                out.append(self._literal_text(index) or "")
            else:
                run.append(token)
        if run:
            out.append(self._postprocess_text(self.sp_model.decode_pieces(run)))
        return "".join(out)

    # ------------------------------------------------------------------------------- saving, pickling
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(
                f"{save_directory}: not a directory, cannot save {self.vocab_files_names}"
            )
        out = os.path.join(
            save_directory,
            (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"],
        )
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out):
                copyfile(self.vocab_file, out)
        else:
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)

    def __getstate__(self):
        # SentencePieceProcessor does not pickle (datasets.map with num_proc, deepcopy); ship its bytes.
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__["sp_model"] = spm.SentencePieceProcessor(model_proto=state["sp_model"])


class ChatGLMTokenizer(_GLMSentencePieceTokenizer):
    """ChatGLM2-6B / ChatGLM3-6B tokenizer (``tokenizer.model``), ids identical to the official one.

    ``encode(text)`` is ``[gMASK] sop`` + the sentencepiece ids of ``text``; ``chat_roles=False`` gives the
    ChatGLM2 vocabulary (no role tokens). ``pad`` is the sentencepiece ``<unk>`` (id 0) and ``eos`` is
    ``</s>``, as in the official tokenizer; batches are padded on the left.

    Command and role tokens written in the text stay plain text (``"<|user|>"`` is tokenized character by
    character, ``"[gMASK]"`` too), as the official default does: their ids come only from
    :meth:`build_inputs_with_special_tokens`, :meth:`build_single_message` and :meth:`get_command`, so user
    text can never forge a role switch. ``encode_special_tokens=True`` recognises all of them in the text
    like the official option, bare ``sop``/``eop`` included (kept for id parity with it).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        chat_roles: bool = True,
        encode_special_tokens: bool = False,
        do_lower_case: bool = False,
        remove_space: bool = False,
        **kwargs,
    ):
        # Loaded before the base class: the command ids follow the sentencepiece vocabulary.
        self.sp_model = sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.chat_roles = chat_roles
        self.encode_special_tokens = encode_special_tokens
        commands = GLM_COMMAND_TOKENS + (CHAT_ROLE_TOKENS if chat_roles else ())
        n = sp.get_piece_size()
        self._command_ids = {token: n + i for i, token in enumerate(commands)}
        self._command_tokens = {i: token for token, i in self._command_ids.items()}
        self._command_pattern = re.compile("|".join(re.escape(t) for t in commands))
        # The official tokenizer pads with the sentencepiece unk id (there is no pad piece).
        named = {
            "unk_token": sp.unk_id(),
            "pad_token": sp.unk_id(),
            "bos_token": sp.bos_id(),
            "eos_token": sp.eos_id(),
        }
        for name, index in named.items():
            if index >= 0:
                kwargs.setdefault(name, sp.id_to_piece(index))
        super().__init__(
            vocab_file,
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            chat_roles=chat_roles,
            encode_special_tokens=encode_special_tokens,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self._sp_size + len(self._command_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = super().all_special_tokens
        return tokens + [t for t in self._command_ids if t not in tokens]

    def _extra_base_token_to_id(self, token: str) -> int | None:
        # Command tokens first, like the official: a sentencepiece piece spelled "sop" maps to the command.
        return self._command_ids.get(token)

    def _extra_base_id_to_token(self, index: int) -> str | None:
        return self._command_tokens.get(index)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        text = self._preprocess_text(text)
        if not self.encode_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        pieces: list[str] = []
        last = 0
        for match in self._command_pattern.finditer(text):
            if last < match.start():
                pieces.extend(self.sp_model.encode(text[last : match.start()], out_type=str))
            pieces.append(match.group())
            last = match.end()
        if last < len(text):
            pieces.extend(self.sp_model.encode(text[last:], out_type=str))
        return pieces

    def get_command(self, token: str) -> int:
        """Id of a command token (``[gMASK]``, ``sop``, ``<|user|>`` ...) or of ``<bos> <eos> <unk> <pad>``."""
        named = {
            "<bos>": self.sp_model.bos_id(),
            "<eos>": self.sp_model.eos_id(),
            "<unk>": self.sp_model.unk_id(),
            "<pad>": self.sp_model.unk_id(),
        }
        if token in named:
            return named[token]
        if token not in self._command_ids:
            raise KeyError(
                f"{token!r} is not a command token of this tokenizer "
                f"(known: {sorted(named) + list(self._command_ids)})"
            )
        return self._command_ids[token]

    def get_prefix_tokens(self) -> list[int]:
        return [self._command_ids["[gMASK]"], self._command_ids["sop"]]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3 ids of one message: ``<|role|>`` + ``metadata\\n`` + ``message``, each text encoded alone."""
        if not self.chat_roles:
            raise ValueError("this tokenizer has no role tokens (a ChatGLM2 vocabulary, chat_roles=False)")
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown role {role!r}: expected one of {CHAT_ROLES}")
        return (
            [self._command_ids[f"<|{role}|>"]]
            + self.sp_model.encode(f"{metadata}\n")
            + self.sp_model.encode(message)
        )

    def build_chat_ids(
        self, query: str, history: Iterable[dict] | None = None, role: str = "user"
    ) -> list[int]:
        """Prompt ids of the official ``build_chat_input``: history messages, the query, then ``<|assistant|>``."""
        ids = self.get_prefix_tokens()
        for item in history or ():
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        return ids + [self._command_ids["<|assistant|>"]]

    def build_chat_input(
        self,
        query: str,
        history: Iterable[dict] | None = None,
        role: str = "user",
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """A batch of one prompt, like the official method; position ids are left to the model."""
        ids = self.build_chat_ids(query, history, role)
        return BatchEncoding(
            {"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type=return_tensors
        )


class ChatGLMv1Tokenizer(_GLMSentencePieceTokenizer):
    """ChatGLM-6B (v1) tokenizer (``ice_text.model``), ids identical to the official one.

    Token id = sentencepiece id + ``num_image_tokens`` (ids below it are ``<image_i>``). Newlines, tabs and
    runs of 2-80 spaces are rewritten to ``<n>``, ``<|tab|>`` and ``<|blank_k|>`` before sentencepiece and
    back after decoding. ``encode(text)`` is the text ids + ``[gMASK] <sop>``. The special tokens are pieces
    of the sentencepiece model; ``<sop> <eop> <unk> <pad> [MASK]`` written in the text are cut out with the
    whitespace around them, as the official tokenizer did under transformers 4.30; other piece names
    (``[gMASK]``, ``<n>`` ...) are matched by sentencepiece itself. Pad ids vanish from decoded text (official).

    ``num_image_tokens`` defaults to 20000, the official class default (the first release); the current
    official tokenizer_config.json says 0, and :func:`load_chatglm_tokenizer` reads it from there.
    """

    vocab_files_names = {"vocab_file": "ice_text.model"}

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        num_image_tokens: int = 20000,
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        super().__init__(
            vocab_file,
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            num_image_tokens=self.num_image_tokens,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            **kwargs,
        )

    @property
    def _sp_offset(self) -> int:
        return self.num_image_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self._sp_size

    def _extra_base_token_to_id(self, token: str) -> int | None:
        match = _V1_IMAGE_TOKEN.fullmatch(token)
        if match and int(match.group(1)) < self.num_image_tokens:
            return int(match.group(1))
        return None

    def _extra_base_id_to_token(self, index: int) -> str | None:
        return f"<image_{index}>" if 0 <= index < self.num_image_tokens else None

    def _protected_tokens(self) -> dict[str, AddedToken]:
        protected = super()._protected_tokens()
        # transformers 4.30 registered the official class's named special tokens as plain-string no-split
        # tokens, which strip the whitespace on both sides.
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
            value = self._special_tokens_map.get(name)
            if value is not None:
                protected.setdefault(
                    str(value), AddedToken(str(value), lstrip=True, rstrip=True, special=True)
                )
        return protected

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(v1_preprocess_text(self._preprocess_text(text)), out_type=str)

    def _postprocess_text(self, text: str) -> str:
        return v1_postprocess_text(text)

    def _always_dropped_ids(self) -> set[int]:
        # The official decode removes pads before anything else (left-padded batches decode cleanly).
        return {self.pad_token_id} if self.pad_token_id is not None else set()

    def _literal_text(self, index: int) -> str | None:
        # Image ids have no text: the official decoder drops them.
        if 0 <= index < self.num_image_tokens and index not in self._added_tokens_decoder:
            return None
        return super()._literal_text(index)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask


# ------------------------------------------------------------------------------------------- loading
_COMMON_KEYS = ("do_lower_case", "remove_space", "padding_side", "model_max_length")
_V1_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "end_token",
    "mask_token",
    "gmask_token",
    "pad_token",
    "unk_token",
)


def _token_value(value):
    """A token name from tokenizer_config.json: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_chatglm_tokenizer(path: str | os.PathLike, generation: str):
    """The tokenizer of an official ChatGLM folder, built from its vocabulary file and tokenizer_config.json.

    ``generation`` names a registry entry with a sentencepiece tokenizer: ``"chatglm"`` (ChatGLM-6B,
    ``ice_text.model``), ``"chatglm2"`` or ``"chatglm3"`` (``tokenizer.model``); the entry says which file
    and class. Nothing in the folder is imported or executed.
    """
    from ..specs import REGISTRY

    spec = REGISTRY.get(generation)
    kinds = ("chatglm_v1", "chatglm_spm")
    if spec is None or spec.tokenizer_loader not in kinds:
        known = sorted(n for n, s in REGISTRY.items() if s.tokenizer_loader in kinds)
        raise ValueError(f"unknown ChatGLM generation {generation!r}: expected one of {known}")
    path = Path(path)
    vocab_file = path / spec.vocab_file
    config_file = path / "tokenizer_config.json"
    for needed in (vocab_file, config_file):
        if not needed.is_file():
            raise ModelLoadError(
                f"{needed}: missing; a {generation} tokenizer folder holds "
                f"{spec.vocab_file} and tokenizer_config.json"
            )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    kwargs = {k: config[k] for k in _COMMON_KEYS if k in config}
    if spec.tokenizer_loader == "chatglm_v1":
        # The official class defaults to 20000 image tokens when the config does not say.
        kwargs["num_image_tokens"] = int(config.get("num_image_tokens", 20000))
        for key in _V1_TOKEN_KEYS:
            value = _token_value(config.get(key))
            if value is not None:
                kwargs[key] = value
        return ChatGLMv1Tokenizer(str(vocab_file), name_or_path=str(path), **kwargs)
    # The official ChatGLM2/3 class hard-codes unk/pad/eos from the sentencepiece model and ignores the token
    # names of the config, so they are not read here either.
    if "encode_special_tokens" in config:
        kwargs["encode_special_tokens"] = bool(config["encode_special_tokens"])
    return ChatGLMTokenizer(
        str(vocab_file), chat_roles=spec.chat_role_tokens, name_or_path=str(path), **kwargs
    )
