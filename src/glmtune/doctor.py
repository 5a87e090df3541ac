"""``glmtune doctor``: what this install can do, and whether its versions are the tested ones.

The tested ranges are not repeated here: they are the requirement specifiers of the installed ``glmtune``
distribution (``pyproject.toml`` as installed), read at run time, so the report can never drift from
what pip was told. Optional packages are found with ``importlib.util.find_spec`` and
``importlib.metadata`` only: importing gradio, vllm or deepspeed just to report them would take seconds
(and can fail loudly). torch is the exception, as the build facts (CUDA, devices, bf16) need it.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = [
    "Feature",
    "PackageStatus",
    "Report",
    "TorchInfo",
    "collect_report",
    "render_json",
    "render_text",
    "warn_untested_versions",
]

DIST = "glmtune"

OK = "ok"
OUTSIDE = "outside tested range"
MISSING = "missing"
UNTESTED = "untested"

# ``dev`` is the contributors' tool set (pytest, ruff, ...) with floors only: not something an install
# needs, so it would only add noise to the report.
_SKIPPED_EXTRAS = {"dev"}

# Operators that cap a range from above; an optional requirement without one is a floor only, which
# this project writes for packages CI never installs (see the vllm extra).
_UPPER_BOUND_OPS = {"<", "<=", "==", "~=", "==="}

# The checkout's exact locked set sits next to ``src/`` in an editable install; it is not in the wheel.
_LOCK_FILE = Path(__file__).resolve().parents[2] / "constraints.txt"


@dataclass
class PackageStatus:
    name: str
    installed: str | None
    range: str
    status: str
    extras: list[str] = field(default_factory=list)
    covered_by_tests: bool = True

    @property
    def core(self) -> bool:
        return not self.extras


@dataclass
class Feature:
    name: str
    usable: bool
    extra: str
    reason: str = ""
    warning: str = ""


@dataclass
class TorchInfo:
    version: str | None
    build: str
    cuda_available: bool = False
    devices: list[dict] = field(default_factory=list)
    cpu: str = ""
    cpu_bf16: str = ""
    mps: bool = False
    error: str = ""


@dataclass
class Report:
    glmtune: str | None
    python: str
    python_range: str
    python_ok: bool
    platform: str
    torch: TorchInfo
    packages: list[PackageStatus]
    features: list[Feature]
    lock_file: str | None = None
    lock_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def core_problems(self) -> list[PackageStatus]:
        return [p for p in self.packages if p.core and p.status != OK]

    @property
    def ok(self) -> bool:
        return self.python_ok and not self.core_problems


@dataclass
class _Req:
    name: str
    specifier: SpecifierSet
    extras: list[str]


def _installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None. One seam so tests can fake an install."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _has_module(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _requirements() -> list[_Req]:
    """glmtune's requirements from its installed metadata: core first, then each optional one once."""
    try:
        raw = metadata.requires(DIST) or []
        extras = [
            e for e in metadata.metadata(DIST).get_all("Provides-Extra") or [] if e not in _SKIPPED_EXTRAS
        ]
    except metadata.PackageNotFoundError:
        return []
    found: dict[str, _Req] = {}
    for line in raw:
        req = Requirement(line)
        key = canonicalize_name(req.name)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            in_extras: list[str] = []
        else:
            in_extras = [e for e in extras if req.marker.evaluate({"extra": e})]
            if not in_extras:
                # Another platform's requirement, or a dev-only one.
                continue
        if key in found:
            # A package both required and optional is core; one in several extras lists them all.
            earlier = found[key]
            earlier.extras = (
                sorted(set(earlier.extras) | set(in_extras)) if earlier.extras and in_extras else []
            )
            continue
        found[key] = _Req(req.name, req.specifier, in_extras)
    return sorted(found.values(), key=lambda r: bool(r.extras))


def format_range(spec: SpecifierSet) -> str:
    """A specifier set written floor first (``>=5.23,<5.26``), the way people read ranges."""
    order = {">=": 0, ">": 0, "~=": 1, "==": 1, "===": 1, "<=": 2, "<": 2, "!=": 3}
    parts = sorted(spec, key=lambda s: (order.get(s.operator, 4), s.version))
    return ",".join(str(s) for s in parts)


def _untested(req: _Req) -> bool:
    return bool(req.extras) and not any(s.operator in _UPPER_BOUND_OPS for s in req.specifier)


def _status(installed: str | None, req: _Req) -> str:
    if installed is None:
        return MISSING
    try:
        inside = req.specifier.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        inside = False
    if not inside:
        return OUTSIDE
    return UNTESTED if _untested(req) else OK


def _package_statuses() -> list[PackageStatus]:
    out = []
    for req in _requirements():
        installed = _installed_version(req.name)
        out.append(
            PackageStatus(
                req.name,
                installed,
                format_range(req.specifier),
                _status(installed, req),
                req.extras,
                covered_by_tests=not _untested(req),
            )
        )
    return out


def _cpu_bf16() -> str:
    """Whether the CPU runs bf16 natively; torch runs bf16 on any CPU, but emulated it is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "supported (native support unknown on this platform)"
    native = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
    if native:
        return f"native ({', '.join(native)})"
    return "emulated (no avx512_bf16/amx_bf16 CPU flag)"


def _torch_info() -> TorchInfo:
    try:
        import torch
    except Exception as e:  # a broken torch install raises OSError & co., not only ImportError
        return TorchInfo(version=None, build="not importable", error=f"{type(e).__name__}: {e}")
    if torch.version.hip:
        build = f"ROCm {torch.version.hip} build"
    elif torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    else:
        build = "CPU-only build"
    info = TorchInfo(version=torch.__version__, build=build, cpu_bf16=_cpu_bf16())
    try:
        info.cpu = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        info.cpu = ""
    info.mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    info.cuda_available = torch.cuda.is_available()
    if info.cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info.devices.append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    # bf16 needs Ampere (8.0) or newer on NVIDIA; ROCm builds only ship for bf16-capable GPUs.
                    "bf16": bool(torch.version.hip) or props.major >= 8,
                }
            )
    return info


# (feature, extra to install, [(module to find, distribution to name)], needs a CUDA device). QLoRA and
# 8/4-bit inference run wherever bitsandbytes does: a CUDA GPU, or the CPU (its CPU kernels).
_FEATURES: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("serve", "serve", [("fastapi", "fastapi"), ("uvicorn", "uvicorn")], False),
    ("web", "web", [("gradio", "gradio")], False),
    (
        "eval metrics",
        "eval",
        [("rouge_chinese", "rouge-chinese"), ("jieba", "jieba"), ("nltk", "nltk")],
        False,
    ),
    ("GGUF", "gguf", [("gguf", "gguf")], False),
    ("QLoRA", "qlora", [("bitsandbytes", "bitsandbytes")], False),
    ("plot", "plot", [("matplotlib", "matplotlib"), ("tensorboard", "tensorboard")], False),
    ("GLM-4 tokenizer", "glm4", [("tiktoken", "tiktoken")], False),
    ("multi-GPU (DeepSpeed)", "deepspeed", [("deepspeed", "deepspeed")], True),
    ("vLLM serving", "vllm", [("vllm", "vllm")], False),
]


def _features(packages: list[PackageStatus], torch_info: TorchInfo) -> list[Feature]:
    by_name = {canonicalize_name(p.name): p for p in packages}
    out = []
    for name, extra, needs, needs_cuda in _FEATURES:
        missing = [dist for module, dist in needs if not _has_module(module)]
        reasons = []
        if missing:
            reasons.append(f"{', '.join(missing)} not installed (pip install 'glmtune[{extra}]')")
        if needs_cuda and not torch_info.devices:
            reasons.append("no CUDA device")
        outside = [
            f"{p.name} {p.installed} outside tested range {p.range}"
            for dist in (d for _, d in needs)
            if (p := by_name.get(canonicalize_name(dist))) is not None and p.status == OUTSIDE
        ]
        out.append(Feature(name, not reasons, extra, "; ".join(reasons), "; ".join(outside)))
    return out


def _lock_differences(packages: list[PackageStatus]) -> list[str]:
    """Reported packages whose installed version is not the one in the checkout's lock file."""
    pins = {}
    for line in _LOCK_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    out = []
    for p in packages:
        locked = pins.get(canonicalize_name(p.name))
        if locked is None or p.installed is None:
            continue
        try:
            # torch reports its build as a local version (2.13.0+cpu); the lock pins the public one.
            same = Version(p.installed).public == Version(locked).public
        except InvalidVersion:
            same = p.installed == locked
        if not same:
            out.append(f"{p.name} {p.installed} (locked {locked})")
    return out


def collect_report() -> Report:
    """Everything ``glmtune doctor`` shows, as data."""
    packages = _package_statuses()
    torch_info = _torch_info()
    notes = []
    try:
        python_range = metadata.metadata(DIST)["Requires-Python"] or ""
    except metadata.PackageNotFoundError:
        python_range = ""
        notes.append(
            "glmtune's package metadata was not found (running from a source tree without `pip install -e .`?): "
            "no tested ranges to compare against"
        )
    py = platform.python_version()
    python_ok = not python_range or SpecifierSet(python_range).contains(py, prereleases=True)
    report = Report(
        glmtune=_installed_version(DIST),
        python=f"{py} ({platform.python_implementation()})",
        python_range=python_range,
        python_ok=python_ok,
        platform=platform.platform(),
        torch=torch_info,
        packages=packages,
        features=_features(packages, torch_info),
        notes=notes,
    )
    if _LOCK_FILE.is_file():
        report.lock_file = str(_LOCK_FILE)
        report.lock_differences = _lock_differences(packages)
    return report


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _status_text(p: PackageStatus) -> str:
    if p.status == UNTESTED:
        return "untested: floor only, not covered by the test suite"
    if p.status == MISSING and p.extras:
        return (
            "missing (optional)"
            if p.covered_by_tests
            else "missing (optional; not covered by the test suite)"
        )
    return p.status


def render_text(report: Report) -> str:
    t = report.torch
    lines = [f"glmtune {report.glmtune or '(not installed)'}"]
    head = [
        [
            "python",
            f"{report.python}, requires {report.python_range or '?'}: {'ok' if report.python_ok else 'NOT SUPPORTED'}",
        ],
        ["platform", report.platform],
        ["torch", f"{t.version}, {t.build}" if t.version else f"{t.build} ({t.error})"],
    ]
    if t.version:
        head.append(["cpu", f"{t.cpu or 'unknown'} kernels, bf16 {t.cpu_bf16}"])
        if t.devices:
            for d in t.devices:
                head.append(
                    [
                        f"cuda:{d['index']}",
                        f"{d['name']}, compute {d['capability']}, {d['memory_gib']} GiB, "
                        f"bf16 {'yes' if d['bf16'] else 'no (use float16)'}",
                    ]
                )
        else:
            head.append(
                [
                    "cuda",
                    "no CUDA device"
                    + (" (the build has CUDA; driver or GPU missing?)" if "CUDA" in t.build else ""),
                ]
            )
        if t.mps:
            head.append(["mps", "Apple MPS available"])
    lines += _table(head, indent="")

    for title, group in (
        ("core packages", [p for p in report.packages if p.core]),
        ("optional packages", [p for p in report.packages if not p.core]),
    ):
        if not group:
            continue
        rows = [["package", "installed", "tested range", "extra", "status"]]
        rows += [
            [p.name, p.installed or "-", p.range or "any", ",".join(p.extras) or "-", _status_text(p)]
            for p in group
        ]
        lines += ["", f"{title}:"] + _table(rows)

    rows = [["feature", "usable", "why not / note"]]
    for f in report.features:
        rows.append([f.name, "yes" if f.usable else "no", "; ".join(x for x in (f.reason, f.warning) if x)])
    lines += ["", "features:"] + _table(rows)

    lines.append("")
    if report.lock_file:
        if report.lock_differences:
            lines.append(f"lock file {report.lock_file}: differs for {', '.join(report.lock_differences)}")
        else:
            lines.append(f"lock file {report.lock_file}: the reported packages match it")
    lines += [f"note: {n}" for n in report.notes]
    problems = report.core_problems
    if report.ok:
        lines.append("result: ok, every core requirement is installed and inside its tested range")
    else:
        bad = [f"{p.name} ({p.status})" for p in problems] + ([] if report.python_ok else ["python"])
        lines.append(f"result: PROBLEM, {', '.join(bad)}; " + _fix_hint(problems))
    return "\n".join(lines)


def render_json(report: Report) -> str:
    data = asdict(report)
    data["ok"] = report.ok
    return json.dumps(data, indent=2, ensure_ascii=False)


def _fix_hint(packages: list[PackageStatus]) -> str:
    wanted = " ".join(f"'{p.name}{p.range}'" for p in packages) or "..."
    return (
        f"fix: pip install {wanted} (in a glmtune checkout: pip install -c constraints.txt {wanted}, "
        "the exact set the tests passed with)"
    )


_warned = False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def warn_untested_versions(printer: Callable[[str], None] | None = None) -> list[str]:
    """Print one warning line per core package outside its tested range, the first time only.

    Cheap (package metadata only, no imports), so commands can call it unconditionally on start-up; the
    once-per-process rule keeps a long ``train`` or ``serve`` log from repeating it. Returns the lines.
    """
    global _warned
    if _warned:
        return []
    _warned = True
    printer = printer or _stderr
    lines = []
    for p in _package_statuses():
        if p.core and p.status == OUTSIDE:
            lines.append(
                f"glmtune: warning: {p.name} {p.installed} is outside the tested range {p.range}; "
                f"if something breaks, {_fix_hint([p])}; `glmtune doctor` shows the full report"
            )
    for line in lines:
        printer(line)
    return lines
