"""Training runs started from the web UI's Train tab: one ``glmtune train`` process at a time.

:class:`TrainJobs` keeps the jobs of a workspace folder (``glmtune web --workspace``, default
``./glmtune-web``)::

    train-jobs.json          every job: command, run folder, process id, status (rewritten atomically)
    jobs/<id>/train.log      the job's stdout and stderr
    jobs/<id>/exit_code      its exit status, written by the wrapper process when it ends
    runs/<name>/             the run folders (train.output_dir) of the runs started here

A job is ``python -m glmtune.cli train CONFIG OVERRIDES...`` under a small wrapper process, in a new
session (its own process group). The wrapper waits for the trainer and writes its exit status to
``exit_code``: a server started later (after a restart) is not the trainer's parent and could not
learn it otherwise. Everything the UI shows is read back from these files, so a page reload, a second
browser tab or a restarted server finds the running or finished job.

* **One at a time**: :meth:`TrainJobs.start` refuses while a job of the workspace runs (the state file
  is read and written under :func:`glmtune.web.store.file_lock`, so two servers on one workspace agree).
* **Stop**: SIGTERM to the process group. The trainer ends the current step, saves a checkpoint of it
  and exits (:class:`glmtune.train.trainer.GracefulStopCallback`); the wrapper ignores the signal and
  records the exit. After ``grace`` seconds, or at a second Stop, the group gets SIGKILL (the last
  checkpoint is intact: checkpoints appear atomically).
* **Resume**: the stopped job's command again with ``train.resume=latest``.
* **Live view**: :func:`read_metrics` reads the run's ``metrics.jsonl``
  (:class:`glmtune.train.trainer.MetricsLogCallback`), :meth:`TrainJobs.log_lines` the log's tail.

Nothing here imports Gradio or torch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from glmtune.atomic import write_json
from glmtune.errors import GlmtuneError

from .store import file_lock

__all__ = [
    "FORM_FIELDS",
    "JobError",
    "TrainJob",
    "TrainJobs",
    "curve_points",
    "eval_table",
    "extra_overrides",
    "form_overrides",
    "form_values",
    "progress_line",
    "read_metrics",
    "shipped_configs",
]

JOBS_FILE = "train-jobs.json"
METRICS_FILE = "metrics.jsonl"  # glmtune.train.trainer.METRICS_FILE (not imported: that pulls in torch)
RUNNING = ("running", "stopping")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The wrapper each job runs under (``python -c``): it records the trainer's exit status in a file, and
# ignores SIGTERM (a Python handler, which exec resets to the default in the trainer) so that it
# outlives the trainer's checkpoint-and-exit. Written out here because no library runs a command and
# leaves its exit status behind for a process that is not its parent.
_WRAPPER = """\
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: None)
exit_file, argv = sys.argv[1], sys.argv[2:]
code = subprocess.call(argv)
with open(exit_file + ".tmp", "w") as f:
    f.write(str(code))
    f.flush()
    os.fsync(f.fileno())
os.replace(exit_file + ".tmp", exit_file)
"""

# Processes this server started: their Popen objects, so that a thread reaps each one when it ends
# (no zombie keeps its process group "alive"). Module-wide: a new TrainJobs object (a reload in a test,
# another workspace object) does not lose them.
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_GUARD = threading.Lock()


class JobError(GlmtuneError, ValueError):
    """A training job can't be started, stopped or resumed (says why)."""


@dataclass
class TrainJob:
    """One ``glmtune train`` process started from the UI, as ``train-jobs.json`` keeps it."""

    id: str
    kind: str  # start | resume | again
    run_dir: str
    config: str
    overrides: list[str]
    argv: list[str]  # the trainer's command line (without the wrapper)
    cwd: str
    log: str
    exit_file: str
    started: float
    pid: int | None = None
    status: str = "running"  # running | stopping | finished | stopped | failed
    stop_requested: float | None = None
    killed: bool = False
    ended: float | None = None
    exit_code: int | None = None
    adapter_from: str | None = None  # "train again": the adapter the run continues from
    data_file: str | None = None

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @classmethod
    def from_dict(cls, d: dict) -> TrainJob:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -------------------------------------------------------------------------------------------- the manager
class TrainJobs:
    """The training jobs of ``workspace``. ``command`` is the trainer's command without the config
    (default ``python -m glmtune.cli train``); ``grace`` the seconds a stopping run gets before SIGKILL."""

    def __init__(
        self,
        workspace: str | os.PathLike,
        *,
        grace: float = 120.0,
        command: list[str] | None = None,
    ):
        self.workspace = Path(workspace).absolute()
        self.state_file = self.workspace / JOBS_FILE
        self.runs_dir = self.workspace / "runs"
        self.grace = float(grace)
        self.command = list(command) if command else [sys.executable, "-m", "glmtune.cli", "train"]

    # ---------------------------------------------------------------- state file
    def _read(self) -> list[TrainJob]:
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise JobError(f"{self.state_file}: unreadable ({e}); move it aside to start afresh") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list):
            raise JobError(f'{self.state_file}: expected {{"jobs": [...]}}; move it aside to start afresh')
        return [TrainJob.from_dict(j) for j in raw["jobs"] if isinstance(j, dict)]

    def _write(self, jobs: list[TrainJob]) -> None:
        write_json(self.state_file, {"jobs": [asdict(j) for j in jobs]}, indent=1)

    def jobs(self) -> list[TrainJob]:
        """Every job, oldest first, with the status of running ones brought up to date."""
        with file_lock(self.state_file):
            jobs = self._read()
            changed = False
            for job in jobs:
                changed |= self._update(job)
            if changed:
                self._write(jobs)
        return jobs

    def current(self) -> TrainJob | None:
        """The newest job (running or not), or None before the first."""
        jobs = self.jobs()
        return jobs[-1] if jobs else None

    def _update(self, job: TrainJob) -> bool:
        """Bring a running job's status up to date; True when it changed. Enforces the stop grace."""
        if not job.running:
            return False
        code = _read_exit(job.exit_file)
        if code is None and _alive(job):
            if job.stop_requested is not None and time.time() - job.stop_requested > self.grace:
                _signal_group(job.pid, signal.SIGKILL)
                job.killed = True
                return True
            return False
        job.exit_code, job.ended = code, time.time()
        if code == 0:
            job.status = "finished"
        elif job.stop_requested is not None:
            job.status = "stopped"
        else:
            job.status = "failed"
        return True

    # ---------------------------------------------------------------- starting
    def start(
        self,
        config: str | os.PathLike,
        overrides: list[str] = (),
        *,
        run_name: str | None = None,
        kind: str = "start",
        adapter_from: str | None = None,
        data_file: str | None = None,
    ) -> TrainJob:
        """Start ``glmtune train CONFIG OVERRIDES`` into ``runs/<run_name>`` (a fresh folder); refused while
        another job runs. The config and overrides are checked first (the error names the key)."""
        name = run_name.strip() if run_name and run_name.strip() else default_run_name(kind)
        if not RUN_NAME.match(name):
            raise JobError(
                f"run name: {name!r}; use letters, digits, '.', '_' and '-' (at most 64, not starting with '.')"
            )
        run_dir = self.runs_dir / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise JobError(f"run name: {run_dir} already holds a run; resume it, or choose another name")
        overrides = [*_check_overrides(overrides), f"train.output_dir={json.dumps(str(run_dir))}"]
        return self._launch(
            kind, str(config), overrides, run_dir, adapter_from=adapter_from, data_file=data_file
        )

    def resume(self) -> TrainJob:
        """Continue the newest job's run from its latest checkpoint (``train.resume=latest``); without a
        checkpoint (stopped before the first was saved) the run starts over in the same folder."""
        last = self.current()
        if last is None:
            raise JobError("nothing to resume: no run was started here yet")
        if last.running:
            raise JobError(f"run {last.id} is still {last.status}")
        if last.status == "finished":
            raise JobError(f"run {last.id} finished; start a new one, or train again from its adapter")
        overrides = [o for o in last.overrides if not o.startswith("train.resume=")]
        if _checkpoints(Path(last.run_dir)):
            overrides.append("train.resume=latest")
        return self._launch(
            "resume",
            last.config,
            overrides,
            Path(last.run_dir),
            adapter_from=last.adapter_from,
            data_file=last.data_file,
        )

    def _launch(
        self,
        kind: str,
        config: str,
        overrides: list[str],
        run_dir: Path,
        *,
        adapter_from: str | None,
        data_file: str | None,
    ) -> TrainJob:
        _validate(config, overrides)
        with file_lock(self.state_file):
            jobs = self._read()
            for job in jobs:
                self._update(job)
            busy = next((j for j in jobs if j.running), None)
            if busy is not None:
                raise JobError(
                    f"run {busy.id} is {busy.status} (one run at a time per workspace); stop it first"
                )
            job_id = _unique_id(kind, {j.id for j in jobs})
            folder = self.workspace / "jobs" / job_id
            folder.mkdir(parents=True)
            argv = [*self.command, str(config), *overrides]
            job = TrainJob(
                id=job_id,
                kind=kind,
                run_dir=str(run_dir),
                config=str(config),
                overrides=list(overrides),
                argv=argv,
                cwd=os.getcwd(),
                log=str(folder / "train.log"),
                exit_file=str(folder / "exit_code"),
                started=time.time(),
                adapter_from=adapter_from,
                data_file=data_file,
            )
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows each line as it is printed
            with open(job.log, "ab") as log:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-c", _WRAPPER, job.exit_file, *argv],
                    cwd=job.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: Stop signals the trainer, not us
                )
            job.pid = proc.pid
            _adopt(proc)
            jobs.append(job)
            self._write(jobs)
        return job

    # ---------------------------------------------------------------- stopping
    def stop(self) -> TrainJob:
        """Ask the running job to stop (SIGTERM: it saves a checkpoint of its step and exits); a second
        call while it is stopping kills it (SIGKILL). Returns the job."""
        with file_lock(self.state_file):
            jobs = self._read()
            for job in jobs:
                self._update(job)
            job = next((j for j in reversed(jobs) if j.running), None)
            if job is None:
                raise JobError("no run is going")
            if job.stop_requested is None:
                job.stop_requested = time.time()
                job.status = "stopping"
                _signal_group(job.pid, signal.SIGTERM)
                timer = threading.Timer(self.grace + 0.5, self.jobs)  # enforces the grace unwatched
                timer.daemon = True
                timer.start()
            else:
                _signal_group(job.pid, signal.SIGKILL)
                job.killed = True
            self._write(jobs)
        return job

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> TrainJob | None:
        """Wait until no job runs (or ``timeout`` seconds pass); returns the newest job."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.current()
            if job is None or not job.running or (end is not None and time.monotonic() > end):
                return job
            time.sleep(poll)

    # ---------------------------------------------------------------- reading
    def log_lines(self, job: TrainJob, n: int = 20, max_bytes: int = 65536) -> list[str]:
        """The last ``n`` lines of the job's log (tqdm's carriage-return redraws split into lines)."""
        try:
            with open(job.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                tail = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        lines = [x.rstrip() for x in re.split(r"[\r\n]+", tail)]
        return [x for x in lines if x.strip()][-n:]


# -------------------------------------------------------------------------------------------- processes
def _adopt(proc: subprocess.Popen) -> None:
    with _CHILDREN_GUARD:
        _CHILDREN[proc.pid] = proc

    def reap():
        proc.wait()
        with _CHILDREN_GUARD:
            _CHILDREN.pop(proc.pid, None)

    threading.Thread(target=reap, daemon=True, name=f"glmtune-web-reap-{proc.pid}").start()


def _alive(job: TrainJob) -> bool:
    """The job's process group still has a process, and its leader is still our wrapper (not a process
    that got the id after ours ended: its command line names the job's exit file)."""
    if job.pid is None:
        return False
    proc = _CHILDREN.get(job.pid)
    if proc is not None:  # ours: the reaper thread sets returncode when it ends (poll() can't see it then)
        return proc.returncode is None
    try:
        os.killpg(job.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the id
        return False
    cmdline = Path(f"/proc/{job.pid}/cmdline")
    if cmdline.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return job.exit_file.encode() in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _signal_group(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_exit(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return [p for p in run_dir.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]


def default_run_name(kind: str = "start") -> str:
    return f"{'again' if kind == 'again' else 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


def _unique_id(kind: str, taken: set[str]) -> str:
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{kind}"
    job_id, n = base, 1
    while job_id in taken:
        n += 1
        job_id = f"{base}-{n}"
    return job_id


# -------------------------------------------------------------------------------------------- the form
def _check_overrides(overrides) -> list[str]:
    out = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in ("train.output_dir", "train.resume"):
            raise JobError(
                f"override {text!r}: the Train tab sets {key} itself (the run name; the Resume button)"
            )
        out.append(text)
    return out


def _validate(config: str, overrides: list[str]) -> None:
    """The config with the overrides, checked as ``glmtune train`` will (errors name the key)."""
    from glmtune.config import load_config

    if not config:
        raise JobError("config: choose a config file")
    if not Path(config).exists():
        raise JobError(f"config: {config}: no such file")
    try:
        load_config(config, overrides)
    except GlmtuneError as e:
        raise JobError(str(e)) from None


def shipped_configs() -> list[Path]:
    """The run configs a user can start from: the packaged demo config, and ``configs/<generation>/*.yaml``
    of the working directory and of the source checkout glmtune runs from (when it does)."""
    from glmtune.demo import default_demo_config

    found = [default_demo_config()]
    roots = [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]
    seen = set()
    for root in roots:
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for path in sorted(root.glob("*/*.yaml")):
            if path.parent.name not in ("accelerate", "deepspeed"):  # launcher configs, not run configs
                found.append(path)
    return found


@dataclass(frozen=True)
class FormField:
    key: str  # the config key (dotted)
    label: str
    kind: str  # path | optional_path | choice | int | optional_int | float


#: The settings the Train tab shows (the rest: the extra overrides box).
FORM_FIELDS = (
    FormField("model.path", "Model (folder, .gguf, hub id or default)", "path"),
    FormField("data.train_file", "Training data", "path"),
    FormField("data.eval_file", "Eval data (optional)", "optional_path"),
    FormField("method.name", "Method", "choice"),
    FormField("train.max_steps", "Max steps (-1 = epochs)", "int"),
    FormField("train.learning_rate", "Learning rate", "float"),
    FormField("train.batch_size", "Batch size", "int"),
    FormField(
        "data.max_length", "Max length (tokens; empty = the config's source/target lengths)", "optional_int"
    ),
    FormField("train.save_steps", "Save a checkpoint every N steps", "int"),
    FormField("train.logging_steps", "Log every N steps", "int"),
)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def form_values(config: str | os.PathLike) -> dict[str, Any]:
    """The :data:`FORM_FIELDS` values of a config file (data files beside the config resolved as
    ``glmtune train`` resolves them)."""
    from glmtune.config import load_config

    try:
        cfg = load_config(config)
    except GlmtuneError as e:
        raise JobError(str(e)) from None
    return {f.key: _get(cfg, f.key) for f in FORM_FIELDS}


def _normalise(f: FormField, value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        if f.kind.startswith("optional"):
            return None
        raise JobError(f"{f.key} ({f.label}): empty")
    if f.kind in ("path", "optional_path", "choice"):
        return str(value).strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise JobError(f"{f.key} ({f.label}): expected a number, got {value!r}") from None
    if f.kind in ("int", "optional_int"):
        if not number.is_integer():
            raise JobError(f"{f.key} ({f.label}): expected a whole number, got {value!r}")
        return int(number)
    return number


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML string: paths with ':' or '#' stay text
    return repr(value)


def form_overrides(loaded: dict[str, Any], form: dict[str, Any]) -> list[str]:
    """Dotted overrides for the form's fields that differ from the config's values (``loaded``, from
    :func:`form_values`); paths a user typed become absolute (the run may be resumed from elsewhere)."""
    out = []
    for f in FORM_FIELDS:
        if f.key not in form:
            continue
        value = _normalise(f, form[f.key])
        old = loaded.get(f.key)
        if f.kind in ("int", "optional_int", "float") and old is not None and value is not None:
            if float(old) == float(value):
                continue
        elif value == old or (old is not None and value == str(old)):
            continue
        if f.kind.endswith("path") and value is not None and _is_local(value):
            value = os.path.abspath(value)
        out.append(f"{f.key}={_yaml_value(value)}")
    return out


def _is_local(path: str) -> bool:
    """A path on disk (not ``default``, not a hub id ``org/name`` that is not a folder here)."""
    return path != "default" and (Path(path).exists() or path.startswith((".", "/", "~")))


def extra_overrides(text: str | None) -> list[str]:
    """The extra-overrides box: one ``key.sub=value`` a line; blank lines and ``#`` comments skipped."""
    out = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, _ = line.partition("=")
        if not eq or not key.strip() or "." not in key:
            raise JobError(f"extra overrides, line {n}: {line!r}: expected key.sub=value")
        out.append(line)
    return _check_overrides(out)


# -------------------------------------------------------------------------------------------- metrics
def read_metrics(run_dir: str | os.PathLike | None) -> list[dict]:
    """The run's logged metrics, oldest first: ``metrics.jsonl`` (written as the run goes; a half-written
    last line is skipped), else the log history of its newest checkpoint's ``trainer_state.json``."""
    if run_dir is None:
        return []
    run = Path(run_dir)
    rows = []
    try:
        text = (run / METRICS_FILE).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = None
    if text is not None:
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows
    ckpts = sorted(_checkpoints(run), key=lambda p: int(p.name.rpartition("-")[2]))
    if ckpts:
        try:
            state = json.loads((ckpts[-1] / "trainer_state.json").read_text(encoding="utf-8"))
            return [h for h in state.get("log_history", []) if isinstance(h, dict)]
        except (OSError, ValueError):
            return []
    return []


def curve_points(rows: list[dict]) -> list[dict]:
    """``{"step", "value", "series"}`` points of the train loss and the eval loss (a line plot's data)."""
    out = []
    for r in rows:
        if "step" not in r:
            continue
        if isinstance(r.get("loss"), (int, float)):
            out.append({"step": r["step"], "value": r["loss"], "series": "train loss"})
        if isinstance(r.get("eval_loss"), (int, float)):
            out.append({"step": r["step"], "value": r["eval_loss"], "series": "eval loss"})
    return out


_EVAL_SKIP = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def eval_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The evaluations as a table: headers ``step``, ``eval_loss`` and each generation metric logged."""
    evals = [r for r in rows if "eval_loss" in r and "step" in r]
    keys: list[str] = ["eval_loss"]
    for r in evals:
        for k in r:
            if k.startswith("eval_") and k not in keys and k not in _EVAL_SKIP:
                keys.append(k)
    table = [[r["step"], *(_round(r.get(k)) for k in keys)] for r in evals]
    return ["step", *(k.removeprefix("eval_") for k in keys)], table


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def progress_line(rows: list[dict]) -> str:
    """``step 3/6 (50%) · loss 5.9371 · eval loss 5.4953``: where the run is, from its metrics."""
    steps = [r for r in rows if "loss" in r and "step" in r]
    if not steps:
        return "no step logged yet"
    last = steps[-1]
    total = last.get("max_steps")
    text = f"step {last['step']}" + (f"/{total} ({100 * last['step'] / total:.0f}%)" if total else "")
    text += f" · loss {last['loss']:.4f}"
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        text += f" · eval loss {evals[-1]['eval_loss']:.4f} (step {evals[-1].get('step')})"
    return text


def latest_weights(run_dir: str | os.PathLike) -> Path | None:
    """``final/`` of a finished run, else None."""
    final = Path(run_dir) / "final"
    return final if final.is_dir() else None
