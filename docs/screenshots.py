"""Screenshots of every tab of ``glmtune web`` into docs/: playground.png, compare.png, label.png, train.png.

Starts the real UI in this process on a free loopback port and drives Debian's headless Chromium
with Playwright (offline: the page loads only from the local server)::

    python docs/screenshots.py                         # a tiny random model + a random LoRA (fast)
    python docs/screenshots.py --model default --adapter runs/demo/final --run runs/demo

The Label tab writes to a temporary copy of a few rows of src/glmtune/assets/demo/demo_train.jsonl, the
feedback and the Train tab's workspace to temporary files: the script changes nothing but the PNGs
(it starts no training run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "src" / "glmtune" / "assets" / "demo" / "demo_train.jsonl"
INSTRUCTION = (
    "Extract the person, city and date from the text as JSON with keys name, city, date (YYYY-MM-DD)."
)
INPUT = "Dr. Wei Garcia signed in Quito on 3 May 2025."


def _seed_rows(path: Path, n: int = 4) -> None:
    if DEMO_DATA.exists():
        rows = [json.loads(x) for x in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:n]]
    else:
        rows = [
            {
                "context": f"Instruction: {INSTRUCTION}\nInput: Ana Lima moved to Porto on 2 June 2024.\nAnswer: ",
                "target": '{"name": "Ana Lima", "city": "Porto", "date": "2024-06-02"}',
            }
        ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="tiny", help="tiny (built on the fly), default (embedded SmolLM2) or a folder"
    )
    ap.add_argument("--adapter", type=Path, help="adapter folder (with --model tiny: a random LoRA is made)")
    ap.add_argument("--run", type=Path, help="training run folder for the Train tab")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 (tiny) or 64")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for one generation")
    args = ap.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from glmtune.inference import GenerationSettings
    from glmtune.web import Backend, FeedbackLog, LabelStore
    from glmtune.web.app import build_app
    from glmtune.web.jobs import TrainJobs
    from glmtune.web.testing import chromium_missing, launch_chromium, make_tiny_lora, serve_in_background

    missing = chromium_missing()
    if missing:
        print(f"screenshots: {missing}", file=sys.stderr)
        return 1

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="glmtune-shots-") as tmp:
        tmp = Path(tmp)
        adapter = args.adapter
        if args.model == "tiny":
            from glmtune.testing import make_tiny_model

            model = make_tiny_model(tmp / "tiny-chatglm3", "chatglm3", seed=0)
            adapter = adapter or make_tiny_lora(model, tmp / "tiny-lora")
        elif args.model == "default":
            from glmtune.resolve import embedded_model_path

            model = embedded_model_path()
        else:
            model = Path(args.model)
        n_new = args.max_new_tokens or (16 if args.model == "tiny" else 64)
        print(f"screenshots: loading {model}" + (f" + {adapter}" if adapter else ""), flush=True)
        backend = Backend.load(model, adapter)
        data = tmp / "labels.jsonl"
        _seed_rows(data)
        store = LabelStore(data)
        feedback = FeedbackLog(tmp / "feedback.jsonl", model=backend.model, adapter=backend.adapter)
        app = build_app(
            backend,
            store=store,
            feedback=feedback,
            run_dir=args.run,
            settings=GenerationSettings(max_new_tokens=n_new),
            jobs=TrainJobs(tmp / "workspace"),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        wait = args.timeout * 1000
        with serve_in_background(app) as url, sync_playwright() as p:
            browser = launch_chromium(p, ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.locator("#pg-send")).to_be_visible()

            # Playground: the demo task, its answer parsed, rated ✓ with a comment.
            page.fill("#pg-instruction textarea", INSTRUCTION)
            page.fill("#pg-input textarea", INPUT)
            page.click("#pg-send")
            expect(page.locator("#pg-json-status")).to_contain_text("JSON", timeout=wait)
            page.fill("#pg-comment textarea", "date should be 2025-05-03")
            page.click("#pg-good")
            expect(page.locator("#pg-feedback-status")).to_contain_text("saved")
            _shot(page, args.out / "playground.png")

            # Compare: the same input through the base and the fine-tuned model.
            page.get_by_role("tab", name="Compare").click()
            page.fill("#cmp-instruction textarea", INSTRUCTION)
            page.fill("#cmp-input textarea", INPUT)
            if backend.can_compare:
                page.click("#cmp-run")
                for side in ("base", "tuned"):
                    expect(page.locator(f"#cmp-{side}-json")).to_contain_text("JSON", timeout=wait)
            _shot(page, args.out / "compare.png")

            # Label: add a row; the table shows it.
            page.get_by_role("tab", name="Label").click()
            page.fill("#lb-instruction textarea", INSTRUCTION)
            page.fill("#lb-input textarea", INPUT)
            page.fill("#lb-output textarea", '{"name": "Wei Garcia", "city": "Quito", "date": "2025-05-03"}')
            page.click("#lb-add")
            expect(page.locator("#lb-status")).to_contain_text("added row")
            page.fill("#lb-row input", "2")
            _shot(page, args.out / "label.png")

            # Train: the form filled from a config, and the run's loss curve, summary and eval report.
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#tr-model textarea, #tr-model input").first).not_to_have_value("")
            if args.run is not None:
                expect(page.locator("#tr-summary")).to_contain_text("steps")
            _shot(page, args.out / "train.png")
            browser.close()
    print(
        f"screenshots: wrote playground, compare, label, train PNGs to {args.out} in {time.time() - t0:.0f} s"
    )
    return 0


def _shot(page, path: Path) -> None:
    page.wait_for_timeout(400)  # let the last render settle
    page.screenshot(path=str(path), full_page=True)
    print(f"  {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
