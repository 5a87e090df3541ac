"""The Train tab in a real browser, end to end (slow: three real `glmtune train` processes on a tiny
model, a few minutes on a shared CPU): start a run, watch its loss curve grow, stop it, resume it, reload
the page while it runs, rate an answer ✗ in the Playground, correct it in the Label tab, train again
from the adapter in use on the corrected data, and compare the old and the new adapter side by side.

The default suite runs the same loop without a browser (tests/test_web_train.py).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from glmtune.web.testing import chromium_missing

_missing = chromium_missing()
if _missing:
    pytest.skip(f"browser tests need Chromium and playwright: {_missing}", allow_module_level=True)
pytest.importorskip("gradio", reason="glmtune web needs gradio (pip install 'glmtune[web]')")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from glmtune.config import load_config, save_config  # noqa: E402
from glmtune.inference import GenerationSettings  # noqa: E402
from glmtune.testing import make_tiny_model  # noqa: E402
from glmtune.web import Backend, FeedbackLog, LabelStore  # noqa: E402
from glmtune.web.app import build_app  # noqa: E402
from glmtune.web.jobs import TrainJobs, read_metrics  # noqa: E402
from glmtune.web.testing import launch_chromium, make_tiny_lora, serve_in_background  # noqa: E402

STEP = 30_000  # ms for a UI step
RUN = 400_000  # ms for a training process to start and finish on a busy CPU

ROWS = [{"context": f"Instruction: Say {w}\nAnswer: ", "target": w} for w in ("hi", "yes", "no", "ok")]


def loss_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r]


def tab(page, name):
    page.get_by_role("tab", name=name).click()


@pytest.mark.slow
def test_train_stop_resume_label_train_again_compare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model(tmp_path / "tiny", "chatglm3", seed=0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    # The adapter in use, as a run's final/ holds it: with the run's config beside it (the Train tab
    # starts from that config).
    adapter = make_tiny_lora(model, tmp_path / "adapter")
    raw = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train_file": str(data), "max_length": 32, "eval_ratio": 0.25},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {
            "output_dir": str(tmp_path / "first-run"),
            "max_steps": 30,
            "batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "eval_steps": 10,
            "save_steps": 100,
            "report_to": [],
        },
        "eval": {"predict_with_generate": False},
    }
    save_config(load_config(raw), adapter / "glmtune_config.yaml")
    assert yaml.safe_load((adapter / "glmtune_config.yaml").read_text())["train"]["max_steps"] == 30

    backend = Backend.load(model, adapter)
    store = LabelStore(data)
    feedback = FeedbackLog(tmp_path / "feedback.jsonl", model=backend.model, adapter=backend.adapter)
    jobs = TrainJobs(tmp_path / "ws", grace=120)
    app = build_app(
        backend,
        store=store,
        feedback=feedback,
        jobs=jobs,
        settings=GenerationSettings(max_new_tokens=12),
    )
    outside = []
    with serve_in_background(app) as url, sync_playwright() as p:
        browser = launch_chromium(p, extra_args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on(
            "request",
            lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url),
        )
        page.set_default_timeout(STEP)
        page.goto(url)

        # --- start: the form comes filled from the adapter's run config
        tab(page, "Train")
        expect(page.locator("#tr-model textarea, #tr-model input").first).to_have_value(str(model))
        expect(page.locator("#tr-max-steps input")).to_have_value("30")
        page.fill("#tr-max-steps input", "60")  # an edited setting: an override of the config's value
        page.fill("#tr-run-name input, #tr-run-name textarea", "first")
        page.click("#tr-start")
        expect(page.locator("#tr-action")).to_contain_text("started first")
        run_dir = tmp_path / "ws" / "runs" / "first"

        # --- live: the status line and the curve follow the run's steps
        expect(page.locator("#tr-status")).to_contain_text("running", timeout=RUN)
        expect(page.locator("#tr-status")).to_contain_text("loss", timeout=RUN)
        expect(page.locator("#tr-curve svg .mark-line path").first).to_be_visible(timeout=STEP)
        expect(page.locator("#tr-log textarea")).to_have_value(re.compile(r"step \d+/60"))

        # --- stop: a checkpoint of the step it was on
        page.click("#tr-stop")
        expect(page.locator("#tr-action")).to_contain_text("stopping first")
        expect(page.locator("#tr-status")).to_contain_text("stopped", timeout=RUN)
        expect(page.locator("#tr-status")).to_contain_text("checkpoint saved")
        (ckpt,) = run_dir.glob("checkpoint-*")
        stopped_at = int(ckpt.name.split("-")[1])
        assert 1 <= stopped_at < 60 and loss_steps(run_dir) == list(range(1, stopped_at + 1))
        expect(page.locator("#tr-start")).to_be_enabled()
        expect(page.locator("#tr-stop")).to_be_disabled()

        # --- resume, and a reload while it runs finds it
        page.click("#tr-resume")
        expect(page.locator("#tr-action")).to_contain_text("resumed first from its latest checkpoint")
        expect(page.locator("#tr-start")).to_be_disabled(timeout=STEP)  # one run at a time
        page.reload()
        tab(page, "Train")
        expect(page.locator("#tr-status")).to_contain_text("run first (resume)", timeout=STEP)
        expect(page.locator("#tr-status")).to_contain_text("finished", timeout=RUN)
        expect(page.locator("#tr-status")).to_contain_text("step 60/60")
        assert loss_steps(run_dir) == list(range(1, 61))  # continued from the checkpoint: no gap, no repeat
        expect(page.locator("#tr-evals")).to_contain_text("60")

        # --- ✗ in the Playground, corrected in the Label tab
        tab(page, "Playground")
        page.fill("#pg-instruction textarea", "Say hi")
        page.click("#pg-send")
        expect(page.locator("#pg-json-status")).not_to_contain_text("generating")
        page.click("#pg-bad")
        expect(page.locator("#pg-feedback-status")).to_contain_text("saved as bad")
        (bad,) = feedback.rows()
        tab(page, "Label")
        expect(page.locator("#lb-bad-count")).to_contain_text("1 ✗ answer")
        expect(page.locator("#lb-bad-table")).to_contain_text("Say hi")
        expect(page.locator("#lb-bad-row input")).to_have_value("1")  # the first uncorrected one
        page.click("#lb-correct")
        expect(page.locator("#lb-instruction textarea")).to_have_value("Say hi")
        expect(page.locator("#lb-output textarea")).to_have_value(bad["output"])  # the wrong answer
        page.fill("#lb-output textarea", "hi")
        page.click("#lb-add")
        expect(page.locator("#lb-status")).to_contain_text("added row 9 (the correction of ✗ answer 1)")
        expect(page.locator("#lb-bad-count")).to_contain_text("1 corrected")
        expect(page.locator("#lb-bad-table")).to_contain_text("row 9")
        assert store.count() == 9 and store.get(9)["target"] == "hi"

        # --- train again: from the adapter in use, on the corrected data
        tab(page, "Train")
        expect(page.locator("#tr-again-note")).to_contain_text("9 rows, 1 corrected")
        page.fill("#tr-max-steps input", "20")
        page.fill("#tr-run-name input, #tr-run-name textarea", "again")
        page.click("#tr-again")
        expect(page.locator("#tr-action")).to_contain_text("training again")
        expect(page.locator("#tr-status")).to_contain_text("run again (again)", timeout=STEP)
        expect(page.locator("#tr-status")).to_contain_text("finished", timeout=RUN)
        job = jobs.current()
        assert f"model.adapter={json.dumps(str(adapter))}" in job.argv
        assert f"data.train_file={json.dumps(str(data))}" in job.argv and "train.max_steps=20" in job.argv
        new = tmp_path / "ws" / "runs" / "again" / "final"
        assert (new / "adapter_config.json").is_file()

        # --- compare: the old adapter (in use) and the new one, side by side
        page.click("#tr-compare")
        expect(page.locator("#tr-action")).to_contain_text("new adapter loaded")
        expect(page.locator("#cmp-run")).to_be_visible()  # the Compare tab is open
        expect(page.locator("#cmp-left input")).to_have_value(f"in use: {backend.describe()}")
        expect(page.locator("#cmp-right input")).to_have_value(f"adapter: {new}")
        page.fill("#cmp-instruction textarea", "Say hi")
        page.click("#cmp-run")
        for side in ("base", "tuned"):
            expect(page.locator(f"#cmp-{side}-json")).to_contain_text("JSON", timeout=STEP)
        old_answer = page.locator("#cmp-base textarea").input_value()
        new_answer = page.locator("#cmp-tuned textarea").input_value()
        assert old_answer.strip() and new_answer.strip() and old_answer != new_answer
        browser.close()
    assert outside == [], f"the page tried to reach the internet: {outside[:5]}"
