"""Prompt templates from YAML (glmtune.user_templates): ids and label masks token for token for every
shipped template on a tiny transformers model and a tiny ChatGLM3, loss placement, errors that name the
file and key, and a template that trains, chats (stopping on a stop string) and exports as a Jinja
chat_template that reproduces its ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk

import glmtune
from glmtune.cli import main as cli_main
from glmtune.config import load_config
from glmtune.errors import ConfigError
from glmtune.inference import Engine, GenerationSettings
from glmtune.runs import Run
from glmtune.templates import IGNORE_INDEX
from glmtune.testing import make_tiny_model
from glmtune.user_templates import TEMPLATE_FILENAME, load_template, shipped_templates

from conftest import make_tiny_hf

# A conversation with a system message, two exchanges and Chinese + English text.
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "你好 hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "again?"},
    {"role": "assistant", "content": "ok 好的"},
]
EOS = None  # in an expected layout: the tokenizer's eos id

# Each shipped template's rendering of CHAT written out by hand: (text, is_label) runs, EOS between
# the pieces the template tokenizes separately.
EXPECTED = {
    "alpaca": [
        ("You are terse.\n\n### Instruction:\n你好 hello\n\n### Response:\n", False),
        ("Hi there", True),
        EOS,
        ("\n\n### Instruction:\nagain?\n\n### Response:\n", False),
        ("ok 好的", True),
        EOS,
    ],
    "vicuna": [
        ("You are terse. USER: 你好 hello ASSISTANT:", False),
        (" Hi there", True),
        EOS,
        ("USER: again? ASSISTANT:", False),
        (" ok 好的", True),
        EOS,
    ],
    "chatml": [
        (
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n你好 hello<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("Hi there<|im_end|>", True),
        ("\n<|im_start|>user\nagain?<|im_end|>\n<|im_start|>assistant\n", False),
        ("ok 好的<|im_end|>", True),
    ],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_templates")
    glm3 = make_tiny_model(root / "chatglm3", "chatglm3")
    hf = make_tiny_hf(root / "hf", make_tiny_model(root / "glm4", "glm4"), chat_template=None)
    return {"hf": hf, "chatglm3": glm3}


def expected_encoding(tok, layout, bos: list[int]) -> tuple[list[int], list[int]]:
    """ids and labels of ``layout`` built from tokenizer.encode of its literal pieces: the text between two
    eos tokens is one piece; within it each label boundary falls where the ids of the text before it end
    (asserted to be a prefix: the shipped templates never make a token straddle a boundary)."""
    ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    piece: list[tuple[str, bool]] = []

    def flush():
        text = "".join(t for t, _ in piece)
        whole = tok.encode(text, add_special_tokens=False)
        done, chars = 0, 0
        for t, label in piece:
            chars += len(t)
            upto = tok.encode(text[:chars], add_special_tokens=False)
            assert whole[: len(upto)] == upto, f"a token straddles the end of {t!r}"
            ids.extend(whole[done : len(upto)])
            labels.extend(whole[done : len(upto)] if label else [IGNORE_INDEX] * (len(upto) - done))
            done = len(upto)
        piece.clear()

    for item in layout:
        if item is EOS:
            flush()
            ids.append(tok.eos_token_id)
            labels.append(tok.eos_token_id)  # the eos ending a reply is learnt (loss_on_suffix)
        else:
            piece.append(item)
    if piece:
        flush()
    return ids, labels


def bos_of(generation: str, tok) -> list[int]:
    # ChatGLM3's tokenizer starts a text with [gMASK] sop; the byte-level one with nothing.
    return (
        [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("sop")]
        if generation == "chatglm3"
        else []
    )


# ------------------------------------------------------------------------------- ids and label masks
@pytest.mark.parametrize("generation", ["hf", "chatglm3"])
@pytest.mark.parametrize("name", ["alpaca", "vicuna", "chatml"])
def test_ids_and_labels_token_for_token(models, generation, name):
    tok = glmtune.load_tokenizer(models[generation])
    template = load_template(name)
    got = template.encode_example(tok, CHAT)
    want_ids, want_labels = expected_encoding(tok, EXPECTED[name], bos_of(generation, tok))
    assert got.input_ids == want_ids
    assert got.labels == want_labels
    # The generation prompt before each reply is exactly the tokens the reply followed in training.
    for k in (2, 4):
        prompt = template.encode_prompt(tok, CHAT[:k])
        assert got.input_ids[: len(prompt)] == prompt
        assert got.labels[len(prompt) - 1] == IGNORE_INDEX and got.labels[len(prompt)] != IGNORE_INDEX


def test_shipped_names_and_the_alpaca_default_system_text(models):
    assert {"alpaca", "chatml", "vicuna"} <= set(shipped_templates())
    tok = glmtune.load_tokenizer(models["hf"])
    alpaca = load_template("alpaca")
    ids = alpaca.encode_prompt(tok, [{"role": "user", "content": "Name a fruit."}])
    text = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a fruit.\n\n### Response:\n"
    )
    assert ids == tok.encode(text, add_special_tokens=False)


def custom(**changes) -> dict:
    base = {
        "name": "plain",
        "bos": "",
        "user": {"prefix": "Q: ", "suffix": "\n"},
        "assistant": {"prefix": "A:", "suffix": "\n", "eos": True},
    }
    return {**base, **changes}


def test_loss_on_the_last_reply_only_and_without_the_suffix(models):
    tok = glmtune.load_tokenizer(models["hf"])
    chat = CHAT[1:]
    enc = lambda **c: load_template(custom(**c)).encode_example(tok, chat)  # noqa: E731
    eos = tok.eos_token_id

    def labelled(e):
        return [i for i, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX]

    # all_replies (default): both replies, each with its suffix and eos.
    both = enc()
    assert labelled(both) == tok.encode("Hi there\n", add_special_tokens=False) + [eos] + tok.encode(
        "ok 好的\n", add_special_tokens=False
    ) + [eos]
    last = enc(loss="last_reply")
    assert last.input_ids == both.input_ids
    assert labelled(last) == tok.encode("ok 好的\n", add_special_tokens=False) + [eos]
    bare = enc(loss_on_suffix=False)
    assert labelled(bare) == tok.encode("Hi there", add_special_tokens=False) + tok.encode(
        "ok 好的", add_special_tokens=False
    )
    # A template without a system section puts the system text in front of the first question.
    folded = load_template(custom()).encode_prompt(tok, CHAT[:2])
    assert folded == tok.encode("Q: You are terse.\n你好 hello\nA:", add_special_tokens=False)
    # train_on_prompt: every token is a label.
    every = load_template(custom()).encode_example(tok, chat, train_on_prompt=True)
    assert every.labels == every.input_ids


def test_observation_turns_and_refusals(models):
    tok = glmtune.load_tokenizer(models["hf"])
    tool = [{"role": "user", "content": "t?"}, {"role": "tool", "content": "20"}]
    ids = load_template("chatml").encode_prompt(tok, tool)
    text = "<|im_start|>user\nt?<|im_end|>\n<|im_start|>tool\n20<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError, match="no observation turn"):
        load_template("alpaca").encode_prompt(tok, tool)


def test_chatglm6b_prefix_lm_is_refused(tmp_path):
    tok = glmtune.load_tokenizer(make_tiny_model(tmp_path / "v1", "chatglm"))
    with pytest.raises(ConfigError, match="prefix LM"):
        load_template("alpaca").encode_prompt(tok, CHAT[1:2])


# ----------------------------------------------------------------------------------------- errors
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\nuser: {prefix: a}\nassistant: {sufix: b}\n",
            r"assistant\.sufix: unknown key .*did you mean suffix",
        ),
        ("name: x\nassistant: {prefix: a}\n", r"user: required key missing"),
        ("name: x\nuser: {}\nassistant: {}\nloss: everything\n", r"loss: .*'all_replies' or 'last_reply'"),
        ("name: x\nuser: {}\nassistant: {}\nstop: ['']\n", r"stop: .*stop\[0\] is empty"),
        ("name: x\nuser: {prefix: [1]}\nassistant: {}\n", r"user\.prefix: .*valid string"),
        ("name: x\nuser: {prefix: a\nassistant: {}\n", r":3:\d+: not valid YAML"),
        ("- just a list\n", r"a template is a mapping"),
    ],
)
def test_bad_yaml_names_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_template(path)
    assert str(err.value).startswith(str(path))
    assert __import__("re").search(expected, str(err.value)), str(err.value)


def test_unknown_names_list_the_shipped_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a shipped template .*alpaca, chatml, vicuna"):
        load_template("alpacca")
    with pytest.raises(ConfigError, match="missing.yaml: no such template file"):
        load_template(tmp_path / "missing.yaml")
    with pytest.raises(SystemExit):
        cli_main(["chat", str(tmp_path), "--template", "alpacca", "--prompt", "x"])
    assert "not a shipped template (alpaca, chatml, vicuna)" in capsys.readouterr().err


def test_cache_key_follows_the_contents_not_the_name(models, tmp_path):
    from glmtune.data.cache import cache_key
    from glmtune.data.encode import EncodeSettings

    data = write(tmp_path / "d.jsonl", '{"prompt": "a", "response": "b"}\n')
    one = glmtune.resolve_model(models["hf"], template=load_template(custom()))
    two = glmtune.resolve_model(models["hf"], template=load_template(custom(separator="\n")))
    plain = glmtune.resolve_model(models["hf"])
    keys = {cache_key(data, m, EncodeSettings())[0] for m in (one, two, plain)}
    assert len(keys) == 3
    assert cache_key(data, one, EncodeSettings())[0] == cache_key(data, one, EncodeSettings())[0]


# ------------------------------------------------------------------------- train, chat, stop, export
ROWS = [
    {"context": "你好", "target": "我是助手。Hello!"},
    {"context": "Hello world!", "target": "The quick brown fox."},
]


def train_run(hf: Path, tmp: Path, template_file: Path, rows, method="lora", steps=2, lr=1e-2) -> Path:
    """A few recipe steps on the tiny model with ``template_file`` as model.template."""
    from glmtune.train import train

    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp / "run"
    raw = {
        "model": {"path": str(hf)},
        "data": {"train_file": str(data), "max_length": 128, "cache_dir": str(tmp / "cache")},
        "method": {"name": method, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 4,
            "learning_rate": lr,
            "logging_steps": 1,
            "save_steps": steps,
            "report_to": [],
            "seed": 0,
        },
    }
    raw["model"]["template"] = str(template_file)
    cfg = load_config(raw)
    assert train(cfg, printer=lambda *a, **k: None)["steps"] == steps
    return out


def mine_template(folder: Path, **changes) -> Path:
    """Alpaca renamed, with a short default system text (the tiny tokenizer has ~1 token a character)."""
    mine = yaml.safe_load(load_template("alpaca").text) | {"name": "mine"} | changes
    mine["system"]["default"] = "Answer briefly."
    return write(folder / f"{mine['name']}.yaml", yaml.safe_dump(mine, allow_unicode=True))


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """(run folder, its template): a LoRA run trained with a YAML template whose file is gone afterwards
    (the run's copy is what eval, chat, serve and export read)."""
    tmp = tmp_path_factory.mktemp("template_run")
    template_file = mine_template(tmp)
    template = load_template(template_file)
    out = train_run(models["hf"], tmp, template_file, ROWS)
    assert (out / TEMPLATE_FILENAME).read_text(encoding="utf-8") == template_file.read_text(encoding="utf-8")
    template_file.unlink()
    return out, template


def test_a_run_trains_with_the_template_and_chats_with_it(run, monkeypatch, capsys):
    from glmtune.user_templates import UserTemplate

    out, template = run
    assert (out / "checkpoint-2" / TEMPLATE_FILENAME).is_file() and (out / "final").is_dir()
    # The data the recipe trained on was encoded with the template (the cache entry is keyed by it).
    cache = out.parent / "cache"
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (
        json.loads((entry / "glmtune_cache.json").read_text())["described"]["template"]
        == template.fingerprint
    )
    ds = load_from_disk(str(entry))
    resolved = Run.open(out).model()
    assert resolved.template == template and resolved.adapter == out / "final"
    engine = Engine.load(resolved)
    messages = [
        {"role": "user", "content": ROWS[0]["context"]},
        {"role": "assistant", "content": ROWS[0]["target"]},
    ]
    assert ds[0]["input_ids"] == template.encode_example(engine.tokenizer, messages).input_ids
    # glmtune chat RUN renders its prompts with the run's template.
    used = []
    original = UserTemplate.encode_prompt
    monkeypatch.setattr(
        UserTemplate, "encode_prompt", lambda self, tok, msgs: used.append(self) or original(self, tok, msgs)
    )
    settings = GenerationSettings(max_new_tokens=6)
    want = engine.generate([messages[:1]], settings)[0].text
    used.clear()
    assert cli_main(["chat", str(out), "--prompt", messages[0]["content"], "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert used and all(t == template for t in used)


def test_generation_stops_on_a_stop_string(models, tmp_path, capsys):
    free = Engine.load(glmtune.resolve_model(models["hf"], template=load_template(custom())))
    question = [{"role": "user", "content": "Hello world!"}]
    settings = GenerationSettings(max_new_tokens=16)
    raw = free.tokenizer.decode(free.generate([question], settings)[0].token_ids, skip_special_tokens=True)
    # Two well-formed characters the random model writes after others, appearing there first.
    start = next(
        i
        for i in range(1, len(raw) - 1)
        if raw[i : i + 2].isprintable() and "\ufffd" not in raw[: i + 2] and raw.find(raw[i : i + 2]) == i
    )
    stop = raw[start : start + 2]
    stopping = write(tmp_path / "stopping.yaml", yaml.safe_dump(custom(stop=[stop]), allow_unicode=True))
    stopped = Engine(free.model, free.tokenizer, free.spec, load_template(stopping))
    got = stopped.generate([question], settings)[0]
    assert got.finish_reason == "stop" and got.text == raw[:start].strip()
    assert stopped.tokenizer.decode(got.token_ids, skip_special_tokens=True) == raw[:start]
    assert "".join(stopped.stream(question, settings)).strip() == got.text
    # The same through glmtune chat --template FILE.
    args = ["chat", str(models["hf"]), "--template", str(stopping), "--prompt", "Hello world!"]
    assert cli_main([*args, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == got.text
    # And through the API server (native backend), streamed and not.
    import httpx

    from glmtune.server.app import ServerThread, create_app
    from glmtune.server.native import NativeBackend

    backend = NativeBackend(stopped)
    srv = ServerThread(create_app(backend, model_name="tiny"))
    try:
        body = {"model": "tiny", "messages": question, "max_tokens": 16, "temperature": 0}
        reply = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        assert reply["message"]["content"] == got.text and reply["finish_reason"] == "stop"
        with httpx.stream(
            "POST", f"{srv.url}/v1/chat/completions", json=body | {"stream": True}, timeout=60
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == got.text
    finally:
        srv.stop()
        backend.close()


def test_the_runs_export_has_a_chat_template_that_reproduces_the_ids(run, tmp_path):
    from transformers import AutoTokenizer

    from glmtune.export import export

    out, template = run
    exported = export(out, tmp_path / "export")
    assert load_template(exported / TEMPLATE_FILENAME) == template
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())
    fast = AutoTokenizer.from_pretrained(str(exported))
    tok = glmtune.load_tokenizer(exported)
    for chat in ([CHAT[1]], CHAT[:2], CHAT[1:4]):
        got = fast.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(got) == template.encode_prompt(tok, chat)
    full = fast.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert list(full) == template.encode_example(tok, CHAT).input_ids
    assert glmtune.resolve_model(exported).template == template  # glmtune reads the export with it
    stops = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    assert tok.eos_token_id in (stops if isinstance(stops, list) else [stops])


@pytest.mark.slow
def test_a_reply_learnt_with_the_template_comes_back_in_chat(models, tmp_path, capsys):
    """A full fine-tune memorises one reply in the template's layout; glmtune chat RUN gives it back."""
    template_file = mine_template(tmp_path)
    row = {"context": "hi", "target": "Hello there."}
    out = train_run(models["hf"], tmp_path, template_file, [row] * 8, method="full", steps=16)
    assert cli_main(["chat", str(out), "--prompt", row["context"], "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == row["target"]


def test_chatml_exports_as_a_chat_template_for_chatglm3(models, tmp_path):
    """ChatGLM3's export writes its own fast tokenizer; the chatml template replaces ChatGLM3's format."""
    from transformers import AutoTokenizer

    from glmtune.export import export

    out = export(models["chatglm3"], tmp_path / "export", template="chatml")
    template = load_template("chatml")
    fast = AutoTokenizer.from_pretrained(str(out))
    tok = glmtune.load_tokenizer(models["chatglm3"])
    for chat in (CHAT[:2], CHAT[:4], [{"role": "user", "content": "  spaces\nand newlines  "}]):
        got = fast.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(got) == template.encode_prompt(tok, chat)
    assert glmtune.get_template(out) == template


def test_a_file_with_no_example_left_says_why(models, tmp_path):
    """Every reply cut away by the limits (a long template prompt and a short max_length): a DataError
    that names the file and the counts, not datasets' IndexError on the empty entry."""
    from glmtune.data.cache import tokenize_cached
    from glmtune.data.encode import EncodeSettings
    from glmtune.data.readers import DataError

    data = write(tmp_path / "d.jsonl", '{"context": "你好", "target": "Hi there"}\n')
    resolved = glmtune.resolve_model(models["hf"], template="alpaca")
    with pytest.raises(DataError, match=r"d\.jsonl: no example left after tokenizing: 1 read, 1 dropped"):
        tokenize_cached(data, resolved, EncodeSettings(max_length=8), cache_dir=tmp_path / "cache")
