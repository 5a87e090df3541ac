"""Shared helpers of the reliability suite: tiny models, small data, run configs, peak-memory probes."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from glmtune.config import load_config
from glmtune.testing import make_tiny_model

# Distinct rows (so data order and dropout RNG matter to the result) in the context/target format;
# the kill/resume script (a standalone script, no pytest) holds them.
from .kill_resume import ROWS  # noqa: F401 - re-exported to the test files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(model: Path, out: Path, train_file: Path, cache: Path, **train) -> dict:
    """A tiny LoRA run: batch 2, a checkpoint every 2 steps, all kept, nothing reported."""
    return {
        "model": {"path": str(model)},
        "data": {"train_file": str(train_file), "max_length": 64, "cache_dir": str(cache)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": 4,
            "batch_size": 2,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": None,
            "report_to": [],
            "seed": 0,
            **train,
        },
    }


def run(raw: dict, *overrides: str) -> dict:
    from glmtune.train import train

    return train(load_config(raw, overrides), printer=lambda *a, **k: None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(generation="chatglm3") -> a tiny random model folder, built once per session."""
    root = tmp_path_factory.mktemp("reliability_models")
    built: dict[str, Path] = {}

    def get(generation: str = "chatglm3") -> Path:
        if generation not in built:
            # Sharded (model.safetensors.index.json + a few shards): the index paths are exercised too.
            built[generation] = make_tiny_model(root / generation, generation, max_shard_bytes=200_000)
        return built[generation]

    return get


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability_data_cache")


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def peak_rss_growth():
    """Yields a dict whose ``"mb"`` is, afterwards, how far peak RSS rose above the RSS at entry.

    Linux: the peak (VmHWM) is reset to the current RSS first (``/proc/self/clear_refs`` = 5), so an
    earlier, higher peak cannot hide an allocation. Elsewhere: the growth of ``ru_maxrss``.
    """
    out: dict = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    base = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        yield out
    finally:
        peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["mb"] = max(0, (peak or 0) - (base or 0)) / 1024


@contextmanager
def address_space_cap(extra_bytes: int):
    """Lower RLIMIT_AS to the current address space + ``extra_bytes`` for the block (Linux), so an
    allocation bomb fails at once (MemoryError / RuntimeError) instead of swapping the machine."""
    size_kb = _status_kb("VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if size_kb is None:
        yield
        return
    cap = size_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ------------------------------------------------------------------------------ kill/resume script
KILL_RESUME = Path(__file__).with_name("kill_resume.py")
FAST_KILL_ARGS = (
    "--kills",
    "2",
    "--steps",
    "4",
    "--save-every",
    "2",
    "--eval-every",
    "3",
    "--plan",
    "eval,save",
)
FAST_KILL_TEST = "test_kill_resume.py::test_kill_during_eval_and_checkpoint_write_then_resume"


def start_kill_resume(work: Path, model: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start kill_resume.py (a process of its own); returns it and where its JSON summary goes."""
    summary = work / "summary.json"
    cmd = [sys.executable, str(KILL_RESUME), "--model", str(model), "--workdir", str(work / "work")]
    proc = subprocess.Popen(
        [*cmd, "--json", str(summary), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, summary


def finish_kill_resume(proc: subprocess.Popen, summary: Path, timeout: float) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"kill_resume.py did not finish in {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    print("\n".join(line for line in stdout.splitlines() if line.startswith(("[figure]", "kill "))))
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(summary.read_text())


@pytest.fixture(scope="session", autouse=True)
def _fast_kill_resume_in_background(request, tiny_model, tmp_path_factory):
    """The fast kill/resume run is a process of its own, mostly waiting on its training runs: it is
    started with the session (when its test is selected) so that it overlaps the other tests on a
    second core; its test then collects the result."""
    if not any(item.nodeid.endswith(FAST_KILL_TEST) for item in request.session.items):
        yield None
        return
    proc, summary = start_kill_resume(
        tmp_path_factory.mktemp("kill_resume_fast"), tiny_model("chatglm3"), *FAST_KILL_ARGS
    )
    yield proc, summary
    if proc.poll() is None:  # the session ended first (interrupted): stop what it started
        proc.kill()
        proc.communicate()


class CaseTimeout(BaseException):
    """Raised by :func:`time_limit`; a BaseException so that no ``except Exception`` on the way hides it."""


@contextmanager
def time_limit(seconds: float):
    """Interrupt the block (main thread, POSIX) after ``seconds``: a hang becomes a reported failure."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
