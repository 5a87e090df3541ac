#!/usr/bin/env python
"""Kill a training run with SIGKILL K times, resume it with ``train.resume=latest`` each time, and
compare its final weights with an uninterrupted run of the same config and seed.

    python tests/reliability/kill_resume.py --kills 5                 # 12 steps, mixed kill moments
    python tests/reliability/kill_resume.py --kills 2 --steps 6 --eval-every 3 --plan eval,save

The run: a tiny ChatGLM3 LoRA (dropout 0.3, so the RNG state must survive too), ``--steps`` steps of
batch 2, a checkpoint every ``--save-every`` steps, an evaluation on an eval file every
``--eval-every``. Each kill lands at one of these moments (``--plan``, cycled; ``mixed`` draws them):

- ``save``:   while a checkpoint is being written (the ``.staging`` folder exists);
- ``eval``:   during an evaluation (right after the log line of an evaluation step);
- ``random``: after a random delay.

While the runs go, every ``checkpoint-<step>`` folder present is checked for complete files
(adapter_model.safetensors, optimizer.pt, scheduler.pt, trainer_state.json, rng_state.pth), and the
checkpoint each resume picks as latest is checked to be readable. Prints one ``[figure]`` line and,
with ``--json``, writes the summary; exits 1 when the final weights differ by more than ``--tol``,
a partial checkpoint was seen, or a resume failed.

``--spawn exec`` starts each run as ``python -m glmtune.cli train`` (what users run); ``--spawn
fork`` (the default) forks it from this process after the imports, which saves ~10 s of imports per
launch. Either way each run is its own process, killed with SIGKILL; nothing is shared but the files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REQUIRED = (
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "rng_state.pth",
)
STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")
_EVAL_LINE = re.compile(r"^step (\d+): eval loss")

ROWS = [
    {"context": "你好，请介绍一下你自己。", "target": "我是一个人工智能助手，可以回答问题、写作和翻译。"},
    {"context": "Hello world!", "target": "The quick brown fox jumps over the lazy dog."},
    {"context": "今天天气不错。", "target": "我们去公园散步吧。北京的秋天很美。"},
    {"context": "Instruction: classify the comment.", "target": "the apples are fresh and sweet."},
    {"context": "机器学习是什么？", "target": "机器学习是人工智能的一个分支。"},
    {"context": "def add(a, b):", "target": "return a + b"},
]


# ------------------------------------------------------------------------------------------ set-up
def prepare(work: Path, args) -> Path:
    """The data files and the run config (YAML); the tiny model too unless --model names one."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "model"
    if not args.model and not (model / "config.json").exists():
        _build_model_elsewhere(model, args.spawn)
    # The evaluation set is long enough (~0.5 s on a tiny model) that a kill aimed at it lands inside it.
    for name, rows in (("train.jsonl", ROWS), ("eval.jsonl", ROWS * 16)):
        (work / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    config = {
        "model": {"path": str(model)},
        "data": {
            "train_file": str(work / "train.jsonl"),
            "eval_file": str(work / "eval.jsonl"),
            "max_length": 64,
            "cache_dir": str(work / "cache"),
        },
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.3},
        "train": {
            "max_steps": args.steps,
            "batch_size": 2,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": args.save_every,
            "eval_steps": args.eval_every,
            "save_total_limit": None,
            "report_to": [],
            "seed": args.seed,
        },
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def _make_model(out: Path) -> None:
    from glmtune.testing import make_tiny_model

    make_tiny_model(out, "chatglm3")


def _build_model_elsewhere(model: Path, spawn: str) -> None:
    """Build the tiny model in another process: torch work stays out of the one that forks the runs."""
    if spawn == "exec":
        code = subprocess.run([sys.executable, __file__, "--build-model", str(model)], check=False).returncode
    else:
        _, status = os.waitpid(_fork(lambda: _make_model(model)), 0)
        code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"building the tiny model in {model} failed")


def _fork(body) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run, never return into the parent's code
        code = 1
        try:
            code = int(body() or 0)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


# ------------------------------------------------------------------------------------------ a run
class Run:
    """One training process, its output read without threads (select), killable with SIGKILL."""

    def __init__(self, config: Path, out: Path, resume: bool, spawn: str, log):
        argv = ["train", str(config), f"train.output_dir={out}"] + (["train.resume=latest"] if resume else [])
        self.log = log
        self.lines: list[str] = []
        self._buf = b""
        self.returncode: int | None = None
        self.t0 = time.monotonic()
        if spawn == "exec":
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "glmtune.cli", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            self.pid, self.fd = self.proc.pid, self.proc.stdout.fileno()
        else:
            self.proc = None
            r, w = os.pipe()

            def child():
                os.close(r)
                os.dup2(w, 1)
                os.dup2(w, 2)
                os.close(w)
                from glmtune.cli import main

                return main(argv)

            self.pid = _fork(child)
            os.close(w)
            self.fd = r

    def pump(self, timeout: float) -> list[str]:
        """Read what the run printed within ``timeout`` seconds; returns the new complete lines."""
        new = []
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self._reap(block=True)
            self._buf += chunk
            *done, self._buf = self._buf.split(b"\n")
            for raw in done:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                self.log.write(line + "\n")
                new.append(line)
            self.lines += new
        else:
            self._reap(block=False)
        return new

    def _reap(self, block: bool) -> None:
        if self.returncode is not None:
            return
        if self.proc is not None:  # exec: through Popen, which then knows the process is gone
            self.returncode = self.proc.wait() if block else self.proc.poll()
            return
        pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self._reap(block=True)
        while self.pump(0.0):  # whatever it printed before dying
            pass

    def close(self) -> None:
        os.close(self.fd) if self.proc is None else self.proc.stdout.close()


# ---------------------------------------------------------------------------------------- checks
def checkpoints(out: Path) -> dict[int, Path]:
    found = {}
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return found
    for name in names:
        m = _CHECKPOINT.match(name)
        if m and (out / name).is_dir():
            found[int(m.group(1))] = out / name
    return found


def partial_checkpoints(out: Path) -> list[str]:
    """Every checkpoint-<step> folder present now that lacks a required file."""
    bad = []
    for folder in checkpoints(out).values():
        try:
            present = set(os.listdir(folder))
        except FileNotFoundError:  # removed between the two listings: not a partial checkpoint
            continue
        missing = [f for f in REQUIRED if f not in present]
        if missing:
            bad.append(f"{folder.name} lacks {', '.join(missing)}")
    return bad


def check_readable(folder: Path, step: int) -> None:
    """The checkpoint a resume picks: every file complete and readable (no torch in this process)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        for key in f.keys():
            f.get_tensor(key)
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    if state["global_step"] != step:
        raise AssertionError(f"{folder}: trainer_state.json says step {state['global_step']}")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        with zipfile.ZipFile(folder / name) as z:  # torch.save writes a zip archive
            bad = z.testzip()
            if bad is not None:
                raise AssertionError(f"{folder / name}: member {bad} is corrupt")


def adapter(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def losses(out: Path, step: int) -> dict[tuple[str, int], float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text(encoding="utf-8"))
    got = {}
    for h in state["log_history"]:
        for key in ("loss", "eval_loss"):
            if key in h:
                got[(key, h["step"])] = h[key]
    return got


# ------------------------------------------------------------------------------------------- main
def straight_run(config: Path, out: Path, args, log) -> float:
    run = Run(config, out, resume=False, spawn=args.spawn, log=log)
    while run.returncode is None:
        run.pump(0.05)
    run.close()
    if run.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {run.returncode}); see {log.name}")
    return time.monotonic() - run.t0


def interrupted_runs(config: Path, out: Path, args, log, reference_seconds: float) -> dict:
    rng = random.Random(args.seed * 7919 + args.kills)
    modes = ["save", "eval", "random"] if args.plan == "mixed" else args.plan.split(",")
    plan = (
        [rng.choice(modes) for _ in range(args.kills)]
        if args.plan == "mixed"
        else [modes[i % len(modes)] for i in range(args.kills)]
    )
    kills, partial_seen, resumes, launches = [], [], [], 0
    while True:
        have = checkpoints(out)
        resume = bool(have)
        if resume:  # what train.resume=latest will pick: complete and readable
            step = max(have)
            check_readable(have[step], step)
            resumes.append(step)
        start_step = max(have) if have else 0
        launches += 1
        run = Run(config, out, resume=resume, spawn=args.spawn, log=log)
        mode = plan[len(kills)] if len(kills) < len(plan) else None
        saves_left = (args.steps - start_step) // args.save_every
        evals_left = args.steps // args.eval_every - start_step // args.eval_every
        # Aim only at what this launch still has ahead of it (a resumed run may have no eval left).
        if mode == "eval" and not evals_left:
            mode = "save" if saves_left else "random"
        if mode == "save" and not saves_left:
            mode = "random"
        nth_save = rng.randint(1, min(2, saves_left)) if mode == "save" else 0
        # random: somewhere in what is left of the run (the reference run's pace)
        left = reference_seconds * (1 - start_step / args.steps) + 1.0
        deadline = run.t0 + rng.uniform(0.3, max(0.6, 0.9 * left)) if mode == "random" else None
        saves_seen, staging_before = 0, (out / STAGING).exists()
        killed = None
        while run.returncode is None:
            new = run.pump(0.005)
            for bad in partial_checkpoints(out):
                if bad not in partial_seen:
                    partial_seen.append(bad)
            if mode is None:
                continue
            staging = (out / STAGING).exists()
            if staging and not staging_before:
                saves_seen += 1
            staging_before = staging
            trigger = False
            if mode == "save" and staging and saves_seen >= nth_save:
                trigger = True
            elif mode == "eval":
                for line in new:
                    m = _STEP_LINE.match(line)
                    if m and int(m.group(1)) % args.eval_every == 0 and int(m.group(1)) > start_step:
                        time.sleep(rng.uniform(0, 0.03))  # into the evaluation
                        trigger = True
            elif mode == "random" and time.monotonic() >= deadline:
                trigger = True
            if trigger:
                step_lines = [int(m.group(1)) for line in run.lines if (m := _STEP_LINE.match(line))]
                last_step = max(step_lines, default=start_step)
                run.kill()
                landed = mode
                if mode == "save":
                    landed = "checkpoint write" if (out / STAGING).exists() else "after checkpoint write"
                elif mode == "eval":
                    evals = [int(m.group(1)) for line in run.lines if (m := _EVAL_LINE.match(line))]
                    landed = "eval" if last_step not in evals else "after eval"
                killed = {
                    "mode": mode,
                    "landed": landed,
                    "launch": launches,
                    "resumed_from": start_step,
                    "last_logged_step": last_step,
                    "seconds_into_launch": round(time.monotonic() - run.t0, 2),
                }
                kills.append(killed)
                print(f"kill {len(kills)}/{args.kills}: {killed}", flush=True)
                break
        run.close()
        if killed is None:
            if run.returncode != 0:
                tail = "\n".join(run.lines[-15:])
                raise SystemExit(f"launch {launches} failed (exit {run.returncode}):\n{tail}")
            break  # the run completed
        if launches > 4 * args.kills + 10:
            raise SystemExit("the run does not finish")
    return {
        "kills": kills,
        "partial_checkpoints_seen": partial_seen,
        "resumed_from": resumes,
        "launches": launches,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs to deliver (K)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument(
        "--plan", default="mixed", help="mixed, or kill moments to cycle through: save,eval,random"
    )
    p.add_argument("--seed", type=int, default=0, help="the training seed (and the kill plan's)")
    p.add_argument("--spawn", choices=("fork", "exec"), default="fork")
    p.add_argument("--model", help="a model folder (default: a tiny ChatGLM3 built in the work dir)")
    p.add_argument("--workdir", help="default: a temporary folder, removed afterwards unless --keep")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--tol", type=float, default=1e-6, help="largest |Δweight| accepted")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--build-model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_model:
        _make_model(Path(args.build_model))
        return 0
    if args.spawn == "fork" and not hasattr(os, "fork"):
        args.spawn = "exec"

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill_resume-"))
    t0 = time.monotonic()
    if args.spawn == "fork":  # imported once here (no torch work), inherited by every forked run
        import importlib

        for module in (
            "glmtune.cli",
            "glmtune.train.recipe",
            "glmtune.train.trainer",
            "glmtune.data.cache",
            "glmtune.tokenization",
            "transformers.trainer",
            "transformers.models.glm.modeling_glm",
            "peft",
            "datasets",
            "accelerate",
            "matplotlib.pyplot",
        ):
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    config = prepare(work, args)
    ref_out, out = work / "straight", work / "interrupted"
    for d in (ref_out, out):
        shutil.rmtree(d, ignore_errors=True)
    with open(work / "runs.log", "w", encoding="utf-8") as log:
        reference_seconds = straight_run(config, ref_out, args, log)
        result = interrupted_runs(config, out, args, log, reference_seconds)

    a, b = adapter(ref_out / "final"), adapter(out / "final")
    if a.keys() != b.keys():
        raise SystemExit(f"the final adapters hold different weights: {sorted(a.keys() ^ b.keys())}")
    dweight = max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)
    la, lb = losses(ref_out, args.steps), losses(out, args.steps)
    dloss = max((abs(la[k] - lb[k]) for k in la.keys() & lb.keys()), default=float("nan"))
    delivered = len(result["kills"])
    ok = (
        dweight <= args.tol
        and not result["partial_checkpoints_seen"]
        and la.keys() == lb.keys()
        and delivered == args.kills
    )
    landed = {}
    for k in result["kills"]:
        landed[k["landed"]] = landed.get(k["landed"], 0) + 1
    summary = {
        "kills_planned": args.kills,
        "kills_delivered": delivered,
        "kills_survived": delivered if ok else 0,
        "landed": landed,
        "max_abs_dweight": dweight,
        "max_abs_dloss": dloss,
        "logged_steps_match": la.keys() == lb.keys(),
        "tolerance": args.tol,
        "reference_seconds": round(reference_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "spawn": args.spawn,
        "steps": args.steps,
        "ok": ok,
        **result,
    }
    print(
        f"[figure] kill/resume: {summary['kills_survived']}/{args.kills} kills survived "
        f"({', '.join(f'{v} {k}' for k, v in sorted(landed.items()))}); max |Δweight| {dweight:.3g}, "
        f"max |Δloss| {dloss:.3g}; partial checkpoints seen: {len(result['partial_checkpoints_seen'])}; "
        f"resumed from steps {result['resumed_from']}; {summary['total_seconds']} s",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
