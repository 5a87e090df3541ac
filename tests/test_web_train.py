"""Training from the web UI without a browser: the trainer's SIGTERM stop and metrics log, the job
manager (one run at a time, stop, kill after the grace, resume, a reload or a restarted server finding
the job), the Train tab's form, the ✗-answer corrections and the adapters loaded for Compare.

The job-manager tests run a stand-in trainer (``FAKE_TRAINER``, a few lines of Python that logs steps to
metrics.jsonl, saves a checkpoint on SIGTERM and resumes from it) so that they take seconds; the same
loop with the real ``glmtune train`` is ``test_real_run_start_stop_resume`` (slow) and the browser walk
in tests/test_web_browser.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from glmtune.web import jobs as jobs_module
from glmtune.web.jobs import (
    FORM_FIELDS,
    JobError,
    TrainJobs,
    curve_points,
    eval_table,
    extra_overrides,
    form_overrides,
    form_values,
    progress_line,
    read_metrics,
    shipped_configs,
)
from glmtune.web.store import FeedbackError, FeedbackLog, LabelStore, format_prompt

ROWS = [{"context": format_prompt(f"Say {w}", ""), "target": w} for w in ("hi", "yes", "no", "ok")]

# Stands in for `glmtune train CONFIG OVERRIDES`: reads train.output_dir, train.max_steps and
# train.resume from the overrides; logs one step to metrics.jsonl every STEP_SECONDS; on SIGTERM saves
# checkpoint-<step>/ and exits 2 (as glmtune's GracefulStopCallback does); resumes from the latest
# checkpoint; writes final/ (a copy of $FAKE_FINAL when set) and exits 0. $FAKE_IGNORE_TERM: ignores
# SIGTERM (a trainer stuck in a long step); $FAKE_EXIT: fails with that code after the first step.
FAKE_TRAINER = r"""
import json, os, shutil, signal, sys, time
over = dict(a.split("=", 1) for a in sys.argv[2:])
out = json.loads(over["train.output_dir"])
steps = int(over.get("train.max_steps", 40))
os.makedirs(out, exist_ok=True)
start = 0
if over.get("train.resume") == "latest":
    start = max(int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-"))
stop = []
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))] if start else []
rows = [r for r in rows if r["step"] <= start]
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
print("fake trainer:", sys.argv[1:], flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(float(os.environ.get("STEP_SECONDS", "0.05")))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"loss": 5.0 / step, "step": step, "max_steps": steps}) + "\n")
        if step % 5 == 0:
            f.write(json.dumps({"eval_loss": 6.0 / step, "step": step}) + "\n")
    print(f"step {step}/{steps} loss {5.0 / step:.4f}", flush=True)
    if os.environ.get("FAKE_EXIT"):
        sys.exit(int(os.environ["FAKE_EXIT"]))
    if stop:
        os.makedirs(os.path.join(out, f"checkpoint-{step}"))
        print(f"stopped at step {step}", flush=True)
        sys.exit(2)
if os.environ.get("FAKE_FINAL"):
    shutil.copytree(os.environ["FAKE_FINAL"], os.path.join(out, "final"))
else:
    os.makedirs(os.path.join(out, "final"))
print("done", flush=True)
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A valid run config (checked by the manager before it starts anything), the stand-in trainer."""
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp_path / "model")},
                "data": {"train_file": str(data), "max_length": 32},
                "train": {"output_dir": "ignored", "max_steps": 40},
            }
        )
    )
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    return config, [sys.executable, str(fake)]


def manager(tmp_path, command, grace=30.0) -> TrainJobs:
    return TrainJobs(tmp_path / "ws", grace=grace, command=command)


def wait_for(cond, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def loss_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


# ------------------------------------------------------------------------------------ the job manager
def test_start_watch_refuse_reload_stop_resume(setup, tmp_path, monkeypatch):
    config, fake = setup
    monkeypatch.setenv("STEP_SECONDS", "0.1")  # slow enough to be stopped half-way
    jobs = manager(tmp_path, fake)
    job = jobs.start(config, ["train.max_steps=400"], run_name="first")
    assert job.status == "running" and Path(job.run_dir) == tmp_path / "ws" / "runs" / "first"
    wait_for(lambda: len(loss_steps(job.run_dir)) >= 3, what="metrics")

    # One run at a time: a second start is refused while it runs, and nothing is launched.
    with pytest.raises(JobError, match="one run at a time"):
        jobs.start(config, [], run_name="second")
    assert not (tmp_path / "ws" / "runs" / "second").exists()

    # A reload: a new manager object on the workspace finds the running job.
    again = TrainJobs(tmp_path / "ws", command=fake)
    assert again.current().id == job.id and again.current().status == "running"
    assert any(line.startswith("step ") for line in again.log_lines(again.current()))

    stopped = again.stop()
    assert stopped.status == "stopping"
    done = jobs.wait(30)
    assert done.status == "stopped" and done.exit_code == 2 and not done.killed
    ckpt = int(next(Path(job.run_dir).glob("checkpoint-*")).name.split("-")[1])
    assert loss_steps(job.run_dir)[-1] == ckpt < 400  # stopped at the step it saved

    monkeypatch.setenv("STEP_SECONDS", "0.001")
    resumed = jobs.resume()
    assert resumed.kind == "resume" and resumed.run_dir == job.run_dir
    assert resumed.overrides[-1] == "train.resume=latest"
    assert resumed.overrides[:-1] == job.overrides  # the same run, continued
    with pytest.raises(JobError, match="running"):
        jobs.resume()
    finished = jobs.wait(60)
    assert finished.status == "finished" and finished.exit_code == 0
    assert (Path(job.run_dir) / "final").is_dir()
    assert loss_steps(job.run_dir) == list(range(1, 401))  # continued from the checkpoint, no gap or repeat
    with pytest.raises(JobError, match="finished"):
        jobs.resume()
    assert [j.kind for j in jobs.jobs()] == ["start", "resume"]


def test_a_trainer_that_ignores_sigterm_is_killed_after_the_grace(setup, tmp_path, monkeypatch):
    config, fake = setup
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    jobs = manager(tmp_path, fake, grace=1.0)
    job = jobs.start(config, ["train.max_steps=100000"])
    wait_for(lambda: loss_steps(job.run_dir), what="metrics")
    jobs.stop()
    done = jobs.wait(20)  # the manager's timer kills it, nobody polling in between is needed
    assert done.status == "stopped" and done.killed and done.exit_code is None
    assert not list(Path(job.run_dir).glob("checkpoint-*"))
    # No checkpoint: resume starts the run over in the same folder.
    slow = manager(tmp_path, fake, grace=600.0)
    resumed = slow.resume()
    assert "train.resume=latest" not in resumed.overrides and resumed.run_dir == job.run_dir
    wait_for(lambda: "fake trainer" in "".join(slow.log_lines(resumed)), what="the trainer to start")
    assert not slow.stop().killed
    assert slow.stop().killed  # the second Stop kills at once, not after the grace
    done = slow.wait(20)
    assert done.killed and done.status == "stopped"


def test_a_failed_run_says_so_and_can_be_resumed(setup, tmp_path, monkeypatch):
    config, fake = setup
    monkeypatch.setenv("FAKE_EXIT", "3")
    jobs = manager(tmp_path, fake)
    job = jobs.start(config, [])
    done = jobs.wait(20)
    assert done.id == job.id and done.status == "failed" and done.exit_code == 3
    monkeypatch.delenv("FAKE_EXIT")
    assert jobs.resume().status == "running"
    assert jobs.wait(30).status == "finished"


def test_a_restarted_server_sees_the_job_end(setup, tmp_path, monkeypatch):
    """A server that did not start the job (after a restart) can't wait for it: it finds the process
    by its id (checked against its command line) and the exit status in the file the wrapper leaves."""
    config, fake = setup
    jobs = manager(tmp_path, fake)
    job = jobs.start(config, ["train.max_steps=100000"])
    wait_for(lambda: loss_steps(job.run_dir), what="metrics")
    monkeypatch.setattr(jobs_module, "_CHILDREN", {})  # the new server started no process
    fresh = TrainJobs(tmp_path / "ws", command=fake)
    assert fresh.current().status == "running"
    os.killpg(job.pid, signal.SIGTERM)  # stopped from outside: a failure for this server
    done = fresh.wait(20)
    assert done.status == "failed" and done.exit_code == 2


def test_bad_requests_are_refused_before_anything_runs(setup, tmp_path):
    config, fake = setup
    jobs = manager(tmp_path, fake)
    with pytest.raises(JobError, match="train.leaning_rate"):
        jobs.start(config, ["train.leaning_rate=1e-4"])
    with pytest.raises(JobError, match="run name"):
        jobs.start(config, [], run_name="../escape")
    with pytest.raises(JobError, match="no such file"):
        jobs.start(tmp_path / "missing.yaml", [])
    with pytest.raises(JobError, match="sets train.output_dir"):
        jobs.start(config, ["train.output_dir=/tmp/elsewhere"])
    (tmp_path / "ws" / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "ws" / "runs" / "taken" / "checkpoint-1").mkdir()
    with pytest.raises(JobError, match="already holds a run"):
        jobs.start(config, [], run_name="taken")
    with pytest.raises(JobError, match="nothing to resume"):
        jobs.resume()
    with pytest.raises(JobError, match="no run is going"):
        jobs.stop()
    assert jobs.jobs() == []


# ------------------------------------------------------------------------------------------- the form
def test_form_values_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = shipped_configs()
    names = [f"{p.parent.name}/{p.name}" for p in configs]
    assert names[0] == "demo/demo.yaml" and "chatglm3/lora.yaml" in names
    assert not any(n.startswith(("accelerate/", "deepspeed/")) for n in names)

    demo = form_values(configs[0])
    assert demo["model.path"] == "default" and demo["method.name"] == "lora"
    assert Path(demo["data.train_file"]).is_absolute()  # read from beside the config, as train does
    same = {**demo, "train.max_steps": float(demo["train.max_steps"])}  # gr.Number hands back floats
    assert form_overrides(demo, same) == []
    (tmp_path / "mine.jsonl").write_text("")
    changed = {
        **same,
        "train.max_steps": 7.0,
        "train.learning_rate": "0.01",
        "data.train_file": "mine.jsonl",
        "data.eval_file": "",
        "method.name": "full",
    }
    assert form_overrides(demo, changed) == [
        f"data.train_file={json.dumps(str(tmp_path / 'mine.jsonl'))}",
        "data.eval_file=null",
        'method.name="full"',
        "train.max_steps=7",
        "train.learning_rate=0.01",
    ]
    with pytest.raises(JobError, match="train.max_steps.*whole number"):
        form_overrides(demo, {**demo, "train.max_steps": 2.5})
    with pytest.raises(JobError, match="model.path.*empty"):
        form_overrides(demo, {**demo, "model.path": " "})
    assert {f.key for f in FORM_FIELDS} == set(demo)

    assert extra_overrides("# comment\nmethod.lora_r=16\n\n train.warmup_ratio=0.1 ") == [
        "method.lora_r=16",
        "train.warmup_ratio=0.1",
    ]
    with pytest.raises(JobError, match="line 2"):
        extra_overrides("method.lora_r=16\nlora_r 16")
    with pytest.raises(JobError, match="Resume button"):
        extra_overrides("train.resume=latest")


def test_metrics_are_read_as_they_are_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert read_metrics(run) == [] and progress_line([]) == "no step logged yet"
    # No metrics.jsonl (a run from before it existed): the newest checkpoint's log history.
    for step in (2, 10):
        (run / f"checkpoint-{step}").mkdir()
        history = [{"loss": 1.0 / s, "step": s} for s in range(1, step + 1)]
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    rows = [
        {"loss": 2.0, "step": 1, "max_steps": 4},
        {"loss": 1.5, "step": 2, "max_steps": 4},
        {"eval_loss": 1.7, "eval_rouge-l": 12.5, "eval_runtime": 0.3, "step": 2},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"loss": 1.2, "st'  # a line half written
    (run / "metrics.jsonl").write_text(text)
    got = read_metrics(run)
    assert got == rows
    assert curve_points(got) == [
        {"step": 1, "value": 2.0, "series": "train loss"},
        {"step": 2, "value": 1.5, "series": "train loss"},
        {"step": 2, "value": 1.7, "series": "eval loss"},
    ]
    assert eval_table(got) == (["step", "loss", "rouge-l"], [[2, 1.7, 12.5]])
    assert progress_line(got) == "step 2/4 (50%) · loss 1.5000 · eval loss 1.7000 (step 2)"


# ------------------------------------------------------------------------------- ✗ answers -> the data
def test_bad_answers_prefill_the_form_and_corrections_are_recorded(tmp_path):
    fb = FeedbackLog(tmp_path / "feedback.jsonl", model="m", adapter="a")
    fb.append(format_prompt("Extract the city", "I live in Lima."), '{"city": "Lima"}', "good")
    fb.append(format_prompt("Extract the city", "Ana is in Quito."), '{"city": "Ana"}', "bad", "wrong key")
    fb.append(format_prompt("Translate", "hello", "conversations"), "hallo", "bad", mode="instruction")
    fb.append(
        "and now?",
        "no idea",
        "bad",
        mode="chat",
        messages=[
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "and now?"},
        ],
    )
    bad = fb.bad()
    assert [b.number for b in bad] == [2, 3, 4] and all(b.correction is None for b in bad)
    f = bad[0].fields("context_target")
    assert (f.instruction, f.input, f.output) == ("Extract the city", "Ana is in Quito.", '{"city": "Ana"}')
    f = bad[1].fields("conversations")
    assert (f.format, f.instruction, f.input) == ("conversations", "Translate", "hello")
    f = bad[2].fields()
    assert (f.instruction, f.input, f.output) == ("and now?", "", "no idea")
    with pytest.raises(FeedbackError, match="row 1 is not a ✗ answer"):
        fb.bad_answer(1)

    store = LabelStore(tmp_path / "data.jsonl")
    answer = fb.bad_answer(2)
    form = answer.fields(store.current_format())
    n = store.append(form.instruction, form.input, '{"city": "Quito"}', form.format)
    fb.mark_corrected(answer, store.path, n)
    assert store.get(n) == {
        "context": "Instruction: Extract the city\nInput: Ana is in Quito.\nAnswer: ",
        "target": '{"city": "Quito"}',
    }
    again = FeedbackLog(tmp_path / "feedback.jsonl")  # a reload
    assert [(b.number, b.correction and b.correction["data_row"]) for b in again.bad()] == [
        (2, 1),
        (3, None),
        (4, None),
    ]
    assert len(fb.rows()) == 4  # the feedback log itself is only appended to


# ------------------------------------------------------------------------------------------- the loop
def test_the_loop_train_stop_resume_correct_train_again_compare(setup, tmp_path, monkeypatch):
    """The Train tab's loop as its handlers drive it: start, stop, resume to the end, use the new
    adapter, correct a ✗ answer into the data, train again from the adapter in use on the data, and
    load the new adapter beside it for Compare: the two answer differently."""
    from glmtune.inference import GenerationSettings
    from glmtune.testing import make_tiny_model
    from glmtune.web import Backend
    from glmtune.web.core import BASE, CURRENT
    from glmtune.web.testing import make_tiny_lora

    config, fake = setup
    model = make_tiny_model(tmp_path / "tiny", "chatglm3", seed=0)
    first, second = (
        make_tiny_lora(model, tmp_path / "lora1", seed=1),
        make_tiny_lora(model, tmp_path / "lora2", seed=2),
    )
    backend = Backend.load(model)
    assert backend.adapter is None and not backend.can_compare
    jobs = manager(tmp_path, fake)
    monkeypatch.setenv("FAKE_FINAL", str(first))

    run = jobs.start(config, ["train.max_steps=60"], run_name="one")
    wait_for(lambda: loss_steps(run.run_dir), what="metrics")
    jobs.stop()
    assert jobs.wait(20).status == "stopped"
    jobs.resume()
    assert jobs.wait(30).status == "finished"
    key = backend.add_adapter(Path(run.run_dir) / "final")
    backend.use(key)
    assert backend.adapter == key and backend.can_compare  # the plain model stays as the base

    fb = FeedbackLog(tmp_path / "feedback.jsonl", adapter=backend.adapter)
    fb.append(format_prompt("Say hi", ""), "bye", "bad")
    store = LabelStore(write_jsonl(tmp_path / "data.jsonl", ROWS))
    answer = fb.bad()[0]
    form = answer.fields(store.current_format())
    fb.mark_corrected(answer, store.path, store.append(form.instruction, form.input, "hi", form.format))
    assert store.count() == len(ROWS) + 1

    monkeypatch.setenv("FAKE_FINAL", str(second))
    forced = [
        *backend.model_overrides(),
        f"model.adapter={json.dumps(backend.adapter)}",
        f"data.train_file={json.dumps(str(store.path))}",
    ]
    again = jobs.start(config, ["train.max_steps=5", *forced], kind="again", adapter_from=backend.adapter)
    assert f"model.path={json.dumps(str(model))}" in again.argv
    assert f"model.adapter={json.dumps(key)}" in again.argv and again.kind == "again"
    assert jobs.wait(30).status == "finished"

    new = backend.add_adapter(Path(again.run_dir) / "final")
    assert [k for _, k in backend.choices()] == [BASE, CURRENT, new]
    assert backend.variants[new].peft_name is not None  # loaded into the same peft model
    messages = [{"role": "user", "content": format_prompt("Say hi", "")}]
    settings = GenerationSettings(max_new_tokens=8)
    old_answer = "".join(backend.stream(messages, settings, variant=CURRENT))
    new_answer = "".join(backend.stream(messages, settings, variant=new))
    base_answer = "".join(backend.stream(messages, settings, variant=BASE))
    assert old_answer != new_answer and base_answer not in (old_answer, new_answer)
    assert "".join(backend.stream(messages, settings)) == old_answer  # the old adapter is active again

    backend.use(new)
    assert backend.adapter == new and key in backend.variants
    assert "".join(backend.stream(messages, settings)) == new_answer
    assert "".join(backend.stream(messages, settings, variant=key)) == old_answer


# ------------------------------------------------------------------------------- the real trainer
def tiny_run_config(tmp_path: Path, model: Path, out: Path, **train) -> dict:
    data = write_jsonl(tmp_path / "tiny_train.jsonl", ROWS * 2)
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train_file": str(data), "max_length": 32, "eval_ratio": 0.25},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "eval_steps": 2,
            "save_steps": 100,
            "report_to": [],
            "seed": 0,
            **train,
        },
        "eval": {"predict_with_generate": False},
    }


def test_sigterm_stops_at_a_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    """SIGTERM during step 3 (no checkpoint is due before step 100): the step ends, checkpoint-3 is
    saved, TrainingStopped names it and no final/ is written; metrics.jsonl has steps 1-3. Resuming
    continues at step 4 and the metrics log ends as one run's would: steps 1-6, none twice."""
    from transformers import TrainerCallback

    from glmtune.config import load_config
    from glmtune.testing import make_tiny_model
    from glmtune.train import train
    from glmtune.train.trainer import GlmtuneTrainer, TrainingStopped

    class TermDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    init = GlmtuneTrainer.__init__

    def with_term(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(TermDuringStep3())

    model = make_tiny_model(tmp_path / "tiny", "chatglm3", seed=0)
    out = tmp_path / "run"
    raw = tiny_run_config(tmp_path, model, out)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(GlmtuneTrainer, "__init__", with_term)
    with pytest.raises(TrainingStopped, match="at step 3 of 6: checkpoint-3 is saved"):
        train(load_config(raw), printer=lambda *a, **k: None)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the trainer's only while it runs
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "final").exists()
    assert loss_steps(out) == [1, 2, 3]
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [2]

    monkeypatch.setattr(GlmtuneTrainer, "__init__", init)
    summary = train(load_config(raw, ["train.resume=latest"]), printer=lambda *a, **k: None)
    assert summary["steps"] == 6 and (out / "final" / "adapter_config.json").is_file()
    assert loss_steps(out) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [2, 4, 6]
    assert all(r["max_steps"] == 6 for r in read_metrics(out))


@pytest.mark.slow
def test_real_run_start_stop_resume(tmp_path, monkeypatch):
    """The job manager over the real `glmtune train` (a minute or more: two process starts): metrics
    appear while it runs, Stop leaves a checkpoint of the step it was on, Resume finishes the run."""
    from glmtune.testing import make_tiny_model

    monkeypatch.chdir(tmp_path)
    model = make_tiny_model(tmp_path / "tiny", "chatglm3", seed=0)
    config = tmp_path / "run.yaml"
    raw = tiny_run_config(tmp_path, model, tmp_path / "ignored", max_steps=40, eval_steps=20)
    config.write_text(yaml.safe_dump(raw))
    jobs = TrainJobs(tmp_path / "ws", grace=120)
    job = jobs.start(config, [], run_name="real")
    wait_for(lambda: loss_steps(job.run_dir) or not jobs.current().running, 240, "the first step")
    with pytest.raises(JobError, match="one run at a time"):
        jobs.start(config, [], run_name="other")
    assert TrainJobs(tmp_path / "ws").current().status == "running"  # a reload finds it
    jobs.stop()
    done = jobs.wait(120)
    assert done.status == "stopped" and done.exit_code == 2 and not done.killed
    assert "stopped by SIGTERM" in "\n".join(jobs.log_lines(done))
    (ckpt,) = Path(job.run_dir).glob("checkpoint-*")
    step = int(ckpt.name.split("-")[1])
    assert loss_steps(job.run_dir) == list(range(1, step + 1))
    jobs.resume()
    done = jobs.wait(400)
    assert done.status == "finished", "\n".join(jobs.log_lines(done))
    assert loss_steps(job.run_dir) == list(range(1, 41))
    assert (Path(job.run_dir) / "final" / "adapter_config.json").is_file()
