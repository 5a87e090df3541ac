"""``glmtune doctor`` and the once-per-process version warning of train/serve.

Installed versions and module presence are faked through ``doctor._installed_version`` and
``doctor._has_module``, the two seams the report reads the environment through, so the tests neither
depend on what happens to be installed nor install anything.
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from glmtune import doctor
from glmtune.cli import main


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    # The warning is once per process; each test starts as a new process would.
    monkeypatch.setattr(doctor, "_warned", False)


def _in_range_core() -> dict[str, str]:
    """A version inside the tested range for every core requirement (its floor, or 1.0 without one)."""
    out = {}
    for req in doctor._requirements():
        if not req.extras:
            floors = [s.version for s in req.specifier if s.operator == ">="]
            out[canonicalize_name(req.name)] = floors[0] if floors else "1.0"
    return out


@pytest.fixture
def fake_versions(monkeypatch):
    """Core packages in range by default; the test overrides single packages (None = not installed)."""
    real = doctor._installed_version
    fake = _in_range_core()

    def installed(dist: str):
        key = canonicalize_name(dist)
        return fake[key] if key in fake else real(dist)

    monkeypatch.setattr(doctor, "_installed_version", installed)
    return fake


def _package(report, name):
    return next(p for p in report.packages if canonicalize_name(p.name) == name)


def test_out_of_range_core_package_warns_once(fake_versions):
    fake_versions["transformers"] = "5.26.0"  # the upper bound is exclusive
    report = doctor.collect_report()
    assert _package(report, "transformers").status == doctor.OUTSIDE
    assert not report.ok

    printed: list[str] = []
    first = doctor.warn_untested_versions(printer=printed.append)
    second = doctor.warn_untested_versions(printer=printed.append)
    assert len(printed) == 1 and first == printed and second == []
    line = printed[0]
    assert "transformers 5.26.0" in line and ">=5.23,<5.26" in line
    assert "pip install -c constraints.txt" in line


@pytest.mark.parametrize("version", ["5.23.0", "5.25.9", "5.25.0rc1"])
def test_in_range_versions_do_not_warn(fake_versions, version):
    fake_versions["transformers"] = version
    printed: list[str] = []
    assert doctor.warn_untested_versions(printer=printed.append) == []
    assert printed == []
    assert _package(doctor.collect_report(), "transformers").status == doctor.OK


def test_train_warns_on_stderr_before_anything_else(fake_versions, tmp_path, capsys):
    fake_versions["peft"] = "0.9.0"
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2  # the config error comes after the warning
    err = capsys.readouterr().err
    assert err.count("glmtune: warning: peft 0.9.0 is outside the tested range") == 1


def test_missing_optional_package_makes_its_feature_unusable(fake_versions, monkeypatch):
    real_has = doctor._has_module
    monkeypatch.setattr(doctor, "_has_module", lambda m: m != "gradio" and real_has(m))
    fake_versions["gradio"] = None
    report = doctor.collect_report()

    web = next(f for f in report.features if f.name == "web")
    assert not web.usable
    assert "gradio not installed" in web.reason and "glmtune[web]" in web.reason
    assert _package(report, "gradio").status == doctor.MISSING
    # Optional packages do not make the install fail.
    assert report.ok


def test_qlora_names_each_missing_piece(fake_versions, monkeypatch):
    monkeypatch.setattr(doctor, "_has_module", lambda m: m == "bitsandbytes")
    no_gpu = doctor.TorchInfo(version="2.13.0", build="CPU-only build")
    monkeypatch.setattr(doctor, "_torch_info", lambda: no_gpu)
    qlora = next(f for f in doctor.collect_report().features if f.name == "QLoRA")
    assert qlora.usable and qlora.reason == ""  # bitsandbytes' 4/8-bit layers run on the CPU too

    gpu = doctor.TorchInfo(
        version="2.13.0", build="CUDA 12.8 build", cuda_available=True, devices=[{"index": 0, "bf16": True}]
    )
    monkeypatch.setattr(doctor, "_torch_info", lambda: gpu)
    qlora = next(f for f in doctor.collect_report().features if f.name == "QLoRA")
    assert qlora.usable and qlora.reason == ""

    monkeypatch.setattr(doctor, "_has_module", lambda m: False)
    qlora = next(f for f in doctor.collect_report().features if f.name == "QLoRA")
    assert not qlora.usable and "bitsandbytes not installed" in qlora.reason
    assert "CUDA" not in qlora.reason


def test_doctor_json_reports_real_version_and_metadata_range(capsys):
    main(["doctor", "--json"])
    data = json.loads(capsys.readouterr().out)
    entry = next(p for p in data["packages"] if p["name"] == "transformers")

    assert entry["installed"] == metadata.version("transformers")
    declared = next(
        Requirement(r) for r in metadata.requires("glmtune") if Requirement(r).name == "transformers"
    )
    assert SpecifierSet(entry["range"]) == declared.specifier
    assert entry["extras"] == []
    inside = declared.specifier.contains(entry["installed"], prereleases=True)
    assert entry["status"] == (doctor.OK if inside else doctor.OUTSIDE)

    untested = {p["name"]: p for p in data["packages"] if not p["covered_by_tests"]}
    # vLLM is never installed by the suite (a floor only); bitsandbytes and deepspeed are, on the CPU.
    assert "vllm" in untested and not {"bitsandbytes", "deepspeed"} & set(untested)
    assert isinstance(data["torch"]["version"], str) and isinstance(data["ok"], bool)


def test_exit_code_follows_core_packages(fake_versions, capsys):
    fake_versions["gradio"] = None  # an optional package missing does not fail the install
    assert main(["doctor"]) == 0
    assert "result: ok" in capsys.readouterr().out

    fake_versions["accelerate"] = "0.30.0"
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "accelerate (outside tested range)" in out

    fake_versions["accelerate"] = None
    assert main(["doctor"]) == 1
    assert "accelerate (missing)" in capsys.readouterr().out
