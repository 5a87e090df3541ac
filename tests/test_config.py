"""The typed run config: loading, overrides, errors, round trip, help, and the shipped configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from glmtune.config import (
    CONFIG_FILENAME,
    DATA_FORMATS,
    GROUPS,
    RunConfig,
    apply_overrides,
    config_help,
    load_config,
    parse_override,
    render_example_config,
    save_config,
    to_dict,
)
from glmtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The demo config ships in the package, beside its data (glmtune demo runs from an installed wheel).
DEMO_CONFIG = REPO / "src" / "glmtune" / "assets" / "demo" / "demo.yaml"
RUN_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in ("accelerate", "deepspeed")
) + [DEMO_CONFIG]


def _config_id(path: Path) -> str:
    return path.name if path == DEMO_CONFIG else path.relative_to(CONFIGS).as_posix()


BASE = {
    "model": {"path": "models/x"},
    "data": {"train_file": "data/train.jsonl", "max_length": 256},
    "train": {"output_dir": "runs/x"},
}


def _generator():
    spec = importlib.util.spec_from_file_location("glmtune_configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error(overrides=(), raw=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(BASE if raw is None else raw, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# Shipped configs


def test_every_run_config_is_shipped():
    names = {_config_id(p) for p in RUN_CONFIGS}
    for generation in ("chatglm", "chatglm2", "chatglm3", "glm4"):
        for method in ("lora", "qlora", "ptuning_v2", "full"):
            assert f"{generation}/{method}.yaml" in names
    assert "demo.yaml" in names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_config_id)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.validate() is cfg
    text = path.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert "# " in text  # the field docs are there as comments
    if path != DEMO_CONFIG:
        rel = path.relative_to(CONFIGS)
        generation, method = rel.parts[0], rel.stem
        expected = {"qlora": "lora"}.get(method, method)
        assert cfg.method.name == expected
        assert (cfg.model.quantization == "4bit") == (method == "qlora")
        assert generation in cfg.train.output_dir


def test_shipped_values_follow_the_original_workflows():
    v1 = load_config(CONFIGS / "chatglm/lora.yaml")
    assert (v1.method.lora_r, v1.train.learning_rate) == (8, 3e-5)
    assert (v1.data.max_source_length, v1.data.max_target_length) == (400, 300)
    v1p = load_config(CONFIGS / "chatglm/ptuning_v2.yaml")
    assert (v1p.method.pre_seq_len, v1p.train.learning_rate) == (128, 2e-4)
    v2 = load_config(CONFIGS / "chatglm2/ptuning_v2.yaml")
    assert (v2.method.pre_seq_len, v2.train.learning_rate, v2.train.max_steps) == (128, 2e-2, 600)
    assert (v2.data.format, v2.data.columns) == (
        "prompt_response",
        {"prompt": "content", "response": "summary"},
    )
    assert (v2.data.max_source_length, v2.data.max_target_length) == (64, 128)
    v3 = load_config(CONFIGS / "chatglm3/lora.yaml")
    assert v3.data.format == "conversations"
    assert (v3.method.lora_r, v3.method.lora_alpha, v3.method.lora_dropout) == (8, 32, 0.1)
    full = load_config(CONFIGS / "chatglm3/full.yaml")
    assert (full.train.learning_rate, full.train.gradient_checkpointing, full.train.precision) == (
        5e-5,
        True,
        "bf16",
    )
    assert (CONFIGS.parent / full.train.deepspeed).is_file()
    q = load_config(CONFIGS / "glm4/qlora.yaml")
    assert (q.model.quantization, q.train.precision, q.is_qlora) == ("4bit", "bf16", True)
    demo = load_config(DEMO_CONFIG)
    assert demo.model.path == "default" and demo.model.dtype == "float32"
    assert demo.method.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (demo.method.lora_r, demo.method.lora_alpha) == (16, 32)
    # Named beside the config; read from there (absolute) whatever the working directory.
    assert demo.data.train_file == str(DEMO_CONFIG.parent / "demo_train.jsonl")
    assert demo.data.eval_file == str(DEMO_CONFIG.parent / "demo_dev.jsonl")
    assert demo.train.output_dir == "runs/demo" and 0 < demo.train.max_steps <= 100


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
    if data["distributed_type"] == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] in (2, 3)


def test_accelerate_configs_are_all_there():
    names = {p.stem for p in (CONFIGS / "accelerate").glob("*.yaml")}
    assert names == {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_parse(name, stage):
    data = json.loads((CONFIGS / "deepspeed" / f"{name}.json").read_text(encoding="utf-8"))
    assert data["zero_optimization"]["stage"] == stage
    assert data["train_micro_batch_size_per_gpu"] == "auto"  # filled in by the Trainer


def test_generated_configs_are_up_to_date(tmp_path):
    written = _generator().generate(tmp_path)
    generated = {p.relative_to(tmp_path).as_posix(): p.read_text(encoding="utf-8") for p in written}
    shipped = {
        p.relative_to(REPO).as_posix()
        for p in CONFIGS.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".json") and "__pycache__" not in p.parts
    } | {DEMO_CONFIG.relative_to(REPO).as_posix()}
    assert shipped == set(generated), "run `python configs/generate.py` (stale or extra files under configs/)"
    for rel, text in generated.items():
        assert (REPO / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: run configs/generate.py"


def test_data_files_beside_the_config_file(tmp_path, monkeypatch):
    """Relative data files are relative to the working directory; one that is not there but lies beside
    the config file is read from beside it (how the packaged demo config finds its data)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "sub").mkdir(parents=True)
    cwd.mkdir()
    for name in ("train.jsonl", "dev.jsonl", "sub/other.jsonl"):
        (home / name).write_text("{}\n", encoding="utf-8")
    raw = {**BASE, "data": {"train_file": "train.jsonl", "eval_file": "dev.jsonl", "max_length": 256}}
    config = home / "run.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.chdir(cwd)

    cfg = load_config(config)
    assert (cfg.data.train_file, cfg.data.eval_file) == (str(home / "train.jsonl"), str(home / "dev.jsonl"))
    assert load_config(Path("..") / "home" / "run.yaml").data.train_file == str(home / "train.jsonl")
    # The working directory wins; overrides, dict configs and files found nowhere stay as written.
    (cwd / "train.jsonl").write_text("{}\n", encoding="utf-8")
    cfg = load_config(config, ["data.eval_file=sub/other.jsonl"])
    assert (cfg.data.train_file, cfg.data.eval_file) == ("train.jsonl", "sub/other.jsonl")
    assert load_config(raw).data.eval_file == "dev.jsonl"
    assert load_config(config, ["data.train_file=missing.jsonl"]).data.train_file == "missing.jsonl"
    # Other paths (model, output) stay relative to the working directory.
    assert (cfg.model.path, cfg.train.output_dir) == ("models/x", "runs/x")
    # A checkpoint folder's saved config: beside it is the folder.
    (cwd / "train.jsonl").unlink()
    save_config(load_config(raw, ["data.train_file=other.jsonl", "data.eval_file=null"]), home / "sub")
    assert load_config(home / "sub").data.train_file == str(home / "sub" / "other.jsonl")
    assert "lies beside the config file" in config_help()


# ---------------------------------------------------------------------------------------------------
# Overrides and conversion


@pytest.mark.parametrize(
    "override,path,expected",
    [
        ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),  # YAML reads 1e-4 as a string
        ("train.learning_rate=0.001", "train.learning_rate", 0.001),
        ("train.learning_rate=3", "train.learning_rate", 3.0),
        ("train.max_steps=500", "train.max_steps", 500),
        ("train.max_steps='1e3'", "train.max_steps", 1000),
        ("train.gradient_checkpointing=true", "train.gradient_checkpointing", True),
        ("data.packing=yes", "data.packing", True),
        ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
        ("model.dtype=bf16", "model.dtype", "bfloat16"),
        ("train.precision=BF16", "train.precision", "bf16"),
        ("model.quantization=4bit", "model.quantization", "4bit"),
        ("model.quantization=off", "model.quantization", "none"),
        ("method.name=p-tuning", "method.name", "ptuning_v2"),
        ("method.lora_target_modules=[q_proj,v_proj]", "method.lora_target_modules", ["q_proj", "v_proj"]),
        ("method.lora_target_modules=q_proj,v_proj", "method.lora_target_modules", ["q_proj", "v_proj"]),
        ("data.columns.prompt=content", "data.columns", {"prompt": "content"}),
        ("data.columns={prompt_column: q, history: null}", "data.columns", {"prompt": "q", "history": None}),
        ("model.adapter=runs/old/checkpoint-100", "model.adapter", "runs/old/checkpoint-100"),
        ("model.adapter=null", "model.adapter", None),
        ("model.generation=chatglm3", "model.generation", "chatglm3"),
        ("train.resume=latest", "train.resume", "latest"),
        ("train.resume=yes", "train.resume", "latest"),
        ("train.resume=300", "train.resume", 300),
        ("train.resume=runs/x/checkpoint-300", "train.resume", "runs/x/checkpoint-300"),
        ("train.save_total_limit=null", "train.save_total_limit", None),
        ("train.report_to=[]", "train.report_to", []),
        ("eval.metrics=[rouge, bleu]", "eval.metrics", ["rouge", "bleu"]),
        ("eval.metrics=auto", "eval.metrics", "auto"),
        ("eval.num_samples=20", "eval.num_samples", 20),
        ("data.eval_ratio=0.1", "data.eval_ratio", 0.1),
        ("--train.seed=7", "train.seed", 7),
    ],
)
def test_override_types(override, path, expected):
    cfg = load_config(BASE, [override])
    group, key = path.split(".")
    value = getattr(getattr(cfg, group), key)
    assert value == expected and type(value) is type(expected)


def test_overrides_do_not_touch_the_input_and_later_ones_win():
    raw = {**BASE, "train": {"output_dir": "runs/x", "seed": 1}}
    cfg = load_config(raw, ["train.seed=2", "train.seed=3", "method.name=ptuning_v2"])
    assert cfg.train.seed == 3 and cfg.method.name == "ptuning_v2"
    assert raw["train"]["seed"] == 1 and "method" not in raw


def test_overrides_on_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    cfg = load_config(path, ["train.output_dir=runs/y", "data.max_length=128"])
    assert (cfg.train.output_dir, cfg.data.max_length) == ("runs/y", 128)


def test_parse_override():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("model.path=@weird: [") == ("model.path", "@weird: [")
    for bad in ("train.learning_rate", "=1", "train..seed=1"):
        with pytest.raises(ConfigError, match="key.sub=value"):
            parse_override(bad)
    raw, origins = apply_overrides({"train": {"seed": 1}}, ["train.seed=2"])
    assert raw == {"train": {"seed": 2}} and origins == {"train.seed": "train.seed=2"}


def test_override_into_a_scalar_is_an_error():
    msg = _error(["data.max_length.x=1"])
    assert "data.max_length" in msg and "not a group" in msg
    msg = _error(["train.seed.x=1"])
    assert "train.seed" in msg and "expected integer" in msg


# ---------------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_names_the_path_lists_valid_keys_and_suggests():
    msg = _error(["train.learning_rat=1e-4"])
    assert "train.learning_rat=1e-4" in msg  # the override at fault
    assert "unknown key train.learning_rat" in msg
    assert "output_dir" in msg and "num_workers" in msg  # the valid keys of the group
    assert "did you mean train.learning_rate?" in msg


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "method": {"name": "lora", "lora_rnk": 4}}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "method.lora_rnk" in msg and "did you mean method.lora_r?" in msg


@pytest.mark.parametrize(
    "raw_key,suggestion",
    [
        ("trian", "train"),  # misspelt group
        ("learning_rate", "train.learning_rate"),  # a key left at the top level
        ("lr", "train.learning_rate"),  # another tool's name
    ],
)
def test_unknown_top_level_keys_suggest(raw_key, suggestion):
    msg = _error(raw={**BASE, raw_key: 1})
    assert f"unknown key {raw_key}" in msg and "valid groups: model, data, method, train, eval" in msg
    assert f"did you mean {suggestion}?" in msg


def test_known_names_from_other_tools_are_suggested():
    assert "did you mean method.lora_r?" in _error(["method.lora_rank=8"])
    assert "did you mean train.grad_accum?" in _error(["train.gradient_accumulation_steps=8"])
    assert "did you mean method.lora_r?" in _error(["train.lora_r=8"])  # right key, wrong group


def test_wrong_type_names_path_value_and_expected_type():
    msg = _error(["train.learning_rate=fast"])
    assert "train.learning_rate" in msg and "'fast'" in msg and "expected float" in msg
    msg = _error(["train.batch_size=[1, 2]"])
    assert "train.batch_size" in msg and "expected integer" in msg
    msg = _error(["data.packing=maybe"])
    assert "data.packing" in msg and "expected bool" in msg
    msg = _error(["data.max_length=1.5"])
    assert "data.max_length" in msg and "1.5" in msg
    assert "train.learning_rate" in _error(["train.learning_rate=.inf"])
    msg = _error(["train.epochs=true"])
    assert "train.epochs" in msg and "True" in msg
    msg = _error(["model.dtype=flaot16"])
    assert "one of auto|float32|bfloat16|float16" in msg and "did you mean 'float16'?" in msg
    msg = _error(["data.columns.promt=x"])
    assert "unknown column 'promt'" in msg and "did you mean 'prompt'?" in msg
    msg = _error(["method.lora_target_modules=[1, {a: b}]"])
    assert "method.lora_target_modules[1]: expected string" in msg and "{'a': 'b'}" in msg
    assert "method.lora_target_modules=[1, {a: b}]" in msg  # the override at fault
    msg = _error(["train.resume=[1]"])  # every member of the union fails: one problem, the whole type
    assert msg.count("train.resume") == 2 and "expected integer or string or null, got [1]" in msg
    msg = _error(["data.columns=[a]"])
    assert "data.columns: expected mapping of string to string or null, got ['a'] (list)" in msg


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.batch_size=0", ["train.batch_size", ">= 1"]),
        ("train.max_steps=0", ["train.max_steps", "-1"]),
        ("data.eval_ratio=1", ["data.eval_ratio", "[0, 1)"]),
        ("method.lora_dropout=-0.1", ["method.lora_dropout"]),
        ("train.learning_rate=0", ["train.learning_rate", "> 0"]),
        ("train.resume=0", ["train.resume", "latest"]),
        ("method.lora_target_modules=[]", ["method.lora_target_modules", "empty"]),
    ],
)
def test_ranges(override, words):
    msg = _error([override])
    for word in words:
        assert word in msg


def test_missing_required_keys_are_all_named():
    msg = _error(raw={"data": {"max_length": 8}})
    for key in ("model.path", "data.train_file", "train.output_dir"):
        assert f"missing required key {key}" in msg


def test_several_problems_are_reported_together():
    msg = _error(["train.batch_size=x", "model.dtyp=float16"])
    assert msg.startswith("2 config problems") and "train.batch_size" in msg and "model.dtyp" in msg


def test_group_that_is_not_a_mapping():
    assert "expected a mapping of the keys of data" in _error(raw={**BASE, "data": "data/train.jsonl"})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping of groups"):
        load_config(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="missing required key model.path"):
        load_config(empty)


# ---------------------------------------------------------------------------------------------------
# Cross-field rules


def test_both_length_limits_is_an_error():
    msg = _error(["data.max_source_length=64", "data.max_target_length=128"])
    assert "data.max_length" in msg and "both set" in msg


def test_length_limits_pair_or_max_length():
    cfg = load_config(
        BASE, ["data.max_length=null", "data.max_source_length=64", "data.max_target_length=128"]
    )
    assert (cfg.data.max_source_length, cfg.data.max_target_length, cfg.data.max_length) == (64, 128, None)
    assert "go together" in _error(["data.max_length=null", "data.max_source_length=64"])
    assert "no length limit" in _error(["data.max_length=null"])


def test_cross_field_rules():
    assert "use one" in _error(["data.eval_file=data/dev.jsonl", "data.eval_ratio=0.1"])
    assert "cannot be trained" in _error(["method.name=full", "model.quantization=4bit"])
    assert "method.name full" in _error(["method.freeze_layers_except_last=2"])
    assert "both set" in _error(["train.warmup_steps=10", "train.warmup_ratio=0.1"])
    assert "does not apply" in _error(["method.name=full", "model.adapter=runs/lora"])
    # The official 8-bit P-Tuning v2: allowed.
    cfg = load_config(BASE, ["method.name=ptuning_v2", "model.quantization=8bit"])
    assert cfg.method.name == "ptuning_v2" and not cfg.is_qlora
    cfg = load_config(BASE, ["method.name=full", "method.freeze_layers_except_last=2"])
    assert cfg.method.freeze_layers_except_last == 2


def test_derived_values():
    cfg = load_config(BASE)
    assert cfg.eval_steps == cfg.train.save_steps == 100 and cfg.data_seed == cfg.train.seed == 42
    cfg = load_config(BASE, ["train.eval_steps=7", "data.seed=3"])
    assert (cfg.eval_steps, cfg.data_seed) == (7, 3)


def test_validate_checks_configs_built_in_python():
    cfg = load_config(BASE)
    cfg.train.batch_size = "8"
    cfg.model.dtype = "bf16"
    cfg.validate()  # converted and normalised in place
    assert cfg.train.batch_size == 8 and cfg.model.dtype == "bfloat16"
    cfg.data.max_source_length = 10
    with pytest.raises(ConfigError, match="both set"):
        cfg.validate()


def test_device_hook():
    cfg = load_config(BASE, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        cfg.check_device(cuda=False)
    cfg.check_device(cuda=True, bf16_supported=False)
    cfg = load_config(BASE, ["train.precision=bf16"])
    cfg.check_device(cuda=False)  # CPU autocast handles bf16
    with pytest.raises(ConfigError, match="bf16"):
        cfg.check_device(cuda=True, bf16_supported=False, device_name="Tesla V100")
    # bitsandbytes quantizes on the CPU too: not a device problem (the recipe checks the package).
    load_config(BASE, ["model.quantization=4bit"]).check_device(cuda=False)
    cfg = load_config(BASE, ["train.deepspeed=configs/deepspeed/zero2.json"])
    with pytest.raises(ConfigError, match="train.deepspeed"):
        cfg.check_device(cuda=False)


# ---------------------------------------------------------------------------------------------------
# Save / load, help, rendering


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        BASE,
        [
            "train.learning_rate=3e-5",
            "method.lora_target_modules=[q_proj,v_proj]",
            "data.columns={prompt: 内容, response: summary, history: null}",
            "train.resume=300",
            "eval.metrics=[rouge]",
            "model.adapter=runs/a b/ckpt",
            "train.optimizer='yes'",
            "data.cache_dir='123'",
        ],
    )
    path = save_config(cfg, tmp_path / "run" / CONFIG_FILENAME)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    again = load_config(path)
    assert again == cfg
    assert again.train.optimizer == "yes" and again.data.cache_dir == "123"
    assert load_config(path.parent) == cfg  # a checkpoint folder
    # Saving over an existing file replaces it.
    cfg.train.seed = 5
    save_config(cfg, path.parent)
    assert load_config(path).train.seed == 5


@pytest.mark.parametrize("path", RUN_CONFIGS[:3], ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_round_trip(tmp_path, path):
    cfg = load_config(path)
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    assert load_config(to_dict(cfg)) == cfg


def test_to_dict_is_plain():
    d = to_dict(load_config(BASE))
    assert list(d) == list(GROUPS)
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def _docs(cls) -> dict[str, str]:
    """field name -> its documentation (pydantic's Field description)."""
    return {name: info.description or "" for name, info in cls.__pydantic_fields__.items()}


def test_config_help_mentions_every_field():
    text = config_help()
    for group, cls in GROUPS.items():
        assert list(_docs(cls)) == [f.name for f in dataclasses.fields(cls)]
        for name, doc in _docs(cls).items():
            assert f"{group}.{name} (" in text
            assert doc.split()[0] in text
    assert "model.path (string; required)" in text
    assert "train.learning_rate (float; default: 0.0002)" in text
    assert "train.report_to (list of string; default: [tensorboard])" in text
    assert "model.dtype (one of auto|float32|bfloat16|float16; default: auto)" in text


def test_every_field_has_help():
    for cls in [*GROUPS.values(), RunConfig]:
        for name, doc in _docs(cls).items():
            assert len(doc) > 10, f"{cls.__name__}.{name}"


def test_render_example_config():
    raw = {
        "train": {"output_dir": "runs/z", "learning_rate": 3e-5},
        "model": {"path": "m", "dtype": "float16"},
        "data": {"train_file": "t.jsonl", "max_length": 64, "columns": {"prompt": "q"}},
        "method": {"lora_target_modules": ["q_proj", "v_proj"]},
    }
    text = render_example_config(raw, "Title line\nsecond line")
    assert text.startswith("# Title line\n# second line\n")
    assert yaml.safe_load(text) == raw
    assert text.index("model:") < text.index("data:") < text.index("method:") < text.index("train:")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), line  # every key under its help
    assert "lora_target_modules: [q_proj, v_proj]" in text
    assert load_config(yaml.safe_load(text)).train.learning_rate == 3e-5
    with pytest.raises(ConfigError, match="did you mean train.learning_rate"):
        render_example_config({"train": {"learning_rat": 1}}, "x")


def test_data_formats_and_aliases_are_the_readers():
    from glmtune.data import readers

    assert DATA_FORMATS == readers.FORMATS
    assert "did you mean 'alpaca'?" in _error(["data.format=alpacca"])
    for fmt in readers.FORMATS:
        assert load_config(BASE, [f"data.format={fmt}"]).data.format == fmt
    for alias, fmt in readers.FORMAT_ALIASES.items():
        assert load_config(BASE, [f"data.format={alias}"]).data.format == fmt
    assert "auto" in _error(["data.format=nonsense"])  # the choices, auto first
    # data.columns knows the readers' columns, and only those.
    for column in readers.KNOWN_COLUMNS:
        assert load_config(BASE, [f"data.columns.{column}=x"]).data.columns == {column: "x"}


def test_method_names_are_the_registry_keys():
    from glmtune.method_names import METHOD_NAMES
    from glmtune.train.methods import METHODS

    assert tuple(METHODS) == METHOD_NAMES
    for name in METHOD_NAMES:
        assert load_config(BASE, [f"method.name={name}"]).method.name == name
    assert "one of " + "|".join(METHOD_NAMES) in _error(["method.name=dora"])


# ---------------------------------------------------------------------------------------------------
# model.dtype: auto follows the machine (glmtune.resolve), an explicit value wins


def _resolved_dtype(tmp_path, cfg):
    from glmtune.resolve import resolve_model

    # resolve_model reads config.json only: no weights are needed to know the dtype.
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    return resolve_model(model, generation="hf", dtype=cfg.model.dtype).dtype


def test_dtype_auto_is_the_default_and_resolves_to_float32_on_the_cpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(BASE)
    assert cfg.model.dtype == "auto"
    assert _resolved_dtype(tmp_path, cfg) is torch.float32
    explicit = load_config(BASE, ["model.dtype=bf16"])
    assert explicit.model.dtype == "bfloat16" and _resolved_dtype(tmp_path, explicit) is torch.bfloat16
    # Saved as auto: a rerun on another machine resolves it there.
    assert load_config(save_config(cfg, tmp_path / "c.yaml")).model.dtype == "auto"


def test_dtype_auto_on_a_gpu_follows_its_bf16_support(tmp_path, monkeypatch):
    import torch

    from glmtune.resolve import resolve_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16, **_: bf16)
        for overrides, want in (([], expected), (["model.dtype=float32"], torch.float32)):
            dtype = load_config(BASE, overrides).model.dtype
            got = resolve_model(model, generation="hf", dtype=dtype, device="cuda").dtype
            assert got is want, (bf16, overrides)


def test_dtype_auto_with_full_fine_tuning_is_float32():
    """Full fine-tuning trains the loaded weights: they stay float32 unless the config says otherwise."""
    cfg = load_config(BASE, ["method.name=full"])
    assert cfg.model.dtype == "float32"
    assert load_config(BASE, ["method.name=full", "model.dtype=bf16"]).model.dtype == "bfloat16"
    assert load_config(BASE, ["method.name=lora"]).model.dtype == "auto"


# ---------------------------------------------------------------------------------------------------
# The groups stay dataclasses (glmtune.demo and others use dataclasses.replace)


def test_groups_are_dataclasses_validated_by_pydantic():
    import pydantic

    cfg = load_config(BASE)
    quiet = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, predict_with_generate=True))
    assert quiet.eval.predict_with_generate and not cfg.eval.predict_with_generate
    assert dataclasses.asdict(quiet) == {
        **to_dict(cfg),
        "eval": {**to_dict(cfg.eval), "predict_with_generate": True},
    }
    # Built in Python, the values are converted and the rules hold (pydantic's own error there).
    assert dataclasses.replace(cfg.train, batch_size="8").batch_size == 8
    with pytest.raises(pydantic.ValidationError, match="warmup_ratio are both set"):
        dataclasses.replace(cfg.train, warmup_steps=10, warmup_ratio=0.1)
    # The full-fine-tuning dtype is a new model group: the config it was replaced from keeps its own.
    full = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="full"))
    assert (full.model.dtype, cfg.model.dtype) == ("float32", "auto")
