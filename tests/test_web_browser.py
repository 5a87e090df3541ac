"""glmtune web in a real browser: Playwright drives Debian's headless Chromium against the real Gradio
server (a background thread on a free loopback port) with a tiny ChatGLM3 model and a random LoRA
adapter, plus a second server whose engine is a fake with fixed replies (for the JSON display).

Every page also checks that it was served offline: a request to any host other than the server
fails the test (and the browser can't resolve other hosts anyway).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from glmtune.web.testing import chromium_missing

_missing = chromium_missing()
if _missing:
    pytest.skip(f"browser tests need Chromium and playwright: {_missing}", allow_module_level=True)
pytest.importorskip("gradio", reason="glmtune web needs gradio (pip install 'glmtune[web]')")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from glmtune.inference import GenerationSettings  # noqa: E402
from glmtune.testing import make_tiny_model  # noqa: E402
from glmtune.web import Backend, FeedbackLog, LabelStore  # noqa: E402
from glmtune.web.app import build_app  # noqa: E402
from glmtune.web.testing import launch_chromium, make_tiny_lora, serve_in_background  # noqa: E402

TIMEOUT = 30_000  # ms; generous: the CPUs are shared


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


class ScriptedEngine:
    """Replies with valid fenced JSON when the prompt says "valid", with broken JSON otherwise."""

    def stream(self, messages, settings=None):
        if "valid" in messages[-1]["content"]:
            yield from ["Here:\n```json\n", '{"name": "Ana", ', '"city": "Lima"}\n```']
        else:
            yield from ['{"name": "Ana", ', '"city": }']


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    model = make_tiny_model(root / "tiny", "chatglm3", seed=0)
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({"steps": 30, "final_train_loss": 0.028}))
    (run / "eval" / "report.md").write_text(
        "# glmtune eval: dev\n\n| metric | base | tuned |\n|---|---|---|\n| x | 1 | 2 |\n"
    )
    from PIL import Image

    Image.new("RGB", (64, 32), (30, 120, 200)).save(run / "loss.png")
    return SimpleNamespace(root=root, model=model, lora=make_tiny_lora(model, root / "lora"), run=run)


@pytest.fixture(scope="module")
def server(work):
    backend = Backend.load(work.model, work.lora)
    store = LabelStore(work.root / "data.jsonl")
    feedback = FeedbackLog(work.root / "feedback.jsonl", model=backend.model, adapter=backend.adapter)
    app = build_app(
        backend,
        store=store,
        feedback=feedback,
        run_dir=work.run,
        settings=GenerationSettings(max_new_tokens=12),
    )
    with serve_in_background(app) as url:
        yield SimpleNamespace(url=url, store=store, feedback=feedback)


@pytest.fixture(scope="module")
def fake_server(work):
    app = build_app(
        Backend(ScriptedEngine(), model="fake"), feedback=FeedbackLog(work.root / "fake-feedback.jsonl")
    )
    with serve_in_background(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch_chromium(p, extra_args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def context(browser):
    # One browser context for the module: its HTTP cache makes every page after the first load
    # faster, and its pages are tabs of one browser window, as a user would have them.
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()


@pytest.fixture
def open_page(context):
    """open_page(url) -> a new tab on url; a request to any other host fails the test."""
    pages, outside = [], []

    def open_(url):
        page = context.new_page()
        pages.append(page)
        # Listening is cheaper than routing every asset through Python; the browser is also told to
        # resolve no host but the loopback one (see the browser fixture), so nothing can leak out.
        page.on(
            "request",
            lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url),
        )
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        expect(page.locator("#pg-send")).to_be_visible()
        return page

    yield open_
    for page in pages:
        page.close()
    assert outside == [], f"the page tried to reach the internet: {outside[:5]}"


def tab(page, name):
    page.get_by_role("tab", name=name).click()


def test_playground_chat_and_feedback(server, open_page):
    page = open_page(server.url)
    # Instruction + input: one streamed answer in the training prompt format.
    page.fill("#pg-instruction textarea", "Extract the city as JSON")
    page.fill("#pg-input textarea", "I live in Lima.")
    page.click("#pg-send")
    expect(page.locator("#pg-chat .user-row")).to_contain_text("Instruction: Extract the city as JSON")
    expect(page.locator("#pg-json-status")).to_contain_text("JSON")  # the final verdict, after streaming
    assert page.locator("#pg-chat .bot-row").inner_text().strip()

    # Rate it: ✓ with a comment -> one row in the feedback file.
    page.fill("#pg-comment textarea", "looks fine")
    page.click("#pg-good")
    expect(page.locator("#pg-feedback-status")).to_contain_text("saved as good")
    (row,) = lines(server.feedback.path)
    assert row["verdict"] == "good" and row["comment"] == "looks fine"
    assert row["input"] == "Instruction: Extract the city as JSON\nInput: I live in Lima.\nAnswer: "
    assert row["output"] and row["model"] == server.feedback.model and row["adapter"].endswith("lora")
    expect(page.locator("#pg-comment textarea")).to_have_value("")

    # Free chat: two turns, the history kept.
    page.locator("#pg-mode").get_by_text("Free chat").click()
    expect(page.locator("#pg-instruction")).to_be_hidden()
    for i, text in enumerate(["hello there", "and again"], 1):
        page.fill("#pg-input textarea", text)
        page.click("#pg-send")
        expect(page.locator("#pg-chat .user-row")).to_have_count(i)
        expect(page.locator("#pg-json-status")).not_to_contain_text("generating")
        expect(page.locator("#pg-chat .bot-row")).to_have_count(i)
    expect(page.locator("#pg-chat .user-row").last).to_contain_text("and again")
    page.click("#pg-bad")
    expect(page.locator("#pg-feedback-status")).to_contain_text("saved as bad")
    assert [r["verdict"] for r in lines(server.feedback.path)] == ["good", "bad"]
    messages = lines(server.feedback.path)[1]["messages"]  # the history went with the second turn
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "hello there" and messages[-1]["content"] == "and again"


def test_compare_base_and_tuned(server, open_page):
    page = open_page(server.url)
    tab(page, "Compare")
    expect(page.locator("#cmp-note")).to_contain_text("LoRA adapter switched off")
    page.fill("#cmp-instruction textarea", "Classify the comment")
    page.fill("#cmp-input textarea", "the apples are fresh")
    page.click("#cmp-run")
    for side in ("base", "tuned"):
        expect(page.locator(f"#cmp-{side}-json")).to_contain_text("JSON")
    base = page.locator("#cmp-base textarea").input_value()
    tuned = page.locator("#cmp-tuned textarea").input_value()
    assert base.strip() and tuned.strip()
    assert base != tuned  # the random adapter changes the answer: the base really ran without it


def test_label_add_edit_delete(server, open_page):
    page = open_page(server.url)
    tab(page, "Label")
    start = server.store.count()
    page.fill("#lb-instruction textarea", "Extract the person as JSON")
    page.fill("#lb-input textarea", "Ana met Bo.")
    page.fill("#lb-output textarea", '{"name": "Ana"}')
    page.click("#lb-add")
    expect(page.locator("#lb-status")).to_contain_text(f"added row {start + 1}")
    assert lines(server.store.path)[-1] == {
        "context": "Instruction: Extract the person as JSON\nInput: Ana met Bo.\nAnswer: ",
        "target": '{"name": "Ana"}',
    }
    expect(page.locator("#lb-table")).to_contain_text("Ana met Bo.")
    expect(page.locator("#lb-count")).to_contain_text(f"{start + 1} row")

    # A bad row is refused with the reason, and nothing is written.
    page.fill("#lb-input textarea", "no answer")
    page.fill("#lb-output textarea", "   ")
    page.click("#lb-add")
    expect(page.locator("#lb-status")).to_contain_text("not saved: output: empty")
    assert server.store.count() == start + 1

    # Edit by row number, then delete.
    page.fill("#lb-row input", str(start + 1))
    page.click("#lb-load")
    expect(page.locator("#lb-output textarea")).to_have_value('{"name": "Ana"}')
    page.fill("#lb-output textarea", '{"name": "Ana", "other": "Bo"}')
    page.click("#lb-save")
    expect(page.locator("#lb-status")).to_contain_text(f"saved row {start + 1}")
    assert lines(server.store.path)[-1]["target"] == '{"name": "Ana", "other": "Bo"}'
    expect(page.locator("#lb-table")).to_contain_text('"other": "Bo"')
    page.click("#lb-delete")
    expect(page.locator("#lb-status")).to_contain_text(f"deleted row {start + 1}")
    assert server.store.count() == start
    expect(page.locator("#lb-table")).not_to_contain_text("Ana met Bo.")


def test_two_tabs_save_at_once(server, open_page):
    pages = [open_page(server.url), open_page(server.url)]
    start = server.store.count()
    for i, page in enumerate(pages):
        tab(page, "Label")
        page.fill("#lb-instruction textarea", f"tab {i}")
        page.fill("#lb-output textarea", f"answer from tab {i}")
    for page in pages:  # both clicks go out before either answer comes back
        page.evaluate("document.querySelector('#lb-add').click()")
    for page in pages:
        expect(page.locator("#lb-status")).to_contain_text("added row")
    rows = lines(server.store.path)
    assert len(rows) == start + 2
    assert {r["target"] for r in rows[-2:]} == {"answer from tab 0", "answer from tab 1"}
    pages[0].click("#lb-refresh")
    expect(pages[0].locator("#lb-table")).to_contain_text("answer from tab 1")


def test_the_server_is_local_and_serves_no_files_of_ours(server):
    assert server.url.startswith("http://127.0.0.1:")
    for path in (server.store.path, server.feedback.path, Path(__file__)):
        try:
            status = urllib.request.urlopen(f"{server.url}/gradio_api/file={path}", timeout=10).status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status in (403, 404), f"{path} is served ({status})"


def test_train_tab_shows_the_run(server, open_page):
    page = open_page(server.url)
    tab(page, "Train")
    expect(page.locator("#tr-summary")).to_contain_text("final_train_loss")
    expect(page.locator("#tr-report")).to_contain_text("glmtune eval: dev")
    expect(page.locator("#tr-loss img")).to_be_visible()


def test_json_answers_parsed_or_flagged(fake_server, open_page):
    page = open_page(fake_server)
    page.fill("#pg-instruction textarea", "give me broken JSON")
    page.click("#pg-send")
    expect(page.locator("#pg-json-status")).to_contain_text(
        "✗ invalid JSON: Expecting value (line 1, column 25)"
    )
    expect(page.locator("#pg-json")).to_be_hidden()

    page.fill("#pg-instruction textarea", "give me valid JSON")
    page.click("#pg-send")
    expect(page.locator("#pg-json-status")).to_contain_text("✓ valid JSON")
    expect(page.locator("#pg-json")).to_be_visible()
    expect(page.locator("#pg-json")).to_contain_text("Lima")

    # No adapter: the Compare tab says so and its button is off.
    tab(page, "Compare")
    expect(page.locator("#cmp-note")).to_contain_text("No adapter is loaded")
    expect(page.locator("#cmp-run")).to_be_disabled()
    # No --data: the Label tab says how to switch it on.
    tab(page, "Label")
    expect(page.get_by_text("Labelling is off")).to_be_visible()
