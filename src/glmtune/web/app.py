"""The Gradio layout of ``glmtune web``: four tabs over the plain logic in :mod:`glmtune.web.core` and
:mod:`glmtune.web.store`.

* **Playground**: instruction + input (in the training prompt format) or free chat -> a streamed
  answer, its JSON parsed (or flagged invalid with the reason), generation settings, and ✓ / ✗
  feedback with a comment, appended to the feedback JSONL.
* **Compare**: the same input through two models side by side: the base model, the model in use, or
  an adapter a run of the Train tab produced.
* **Label**: a form that validates rows as training reads them and appends them to the dataset; a
  table of the saved rows with edit / delete by row number; the ✗ answers of the feedback log, each
  loaded into the form for correction with one click.
* **Train** (:mod:`glmtune.web.train_tab`): start, watch (log, loss curve, evaluations), stop and
  resume a ``glmtune train`` run; train again from the adapter in use on the corrected data; compare
  or use the new adapter. Without a jobs workspace: a run folder's loss curve, summary and report.

Everything is served from the local Gradio package (no CDN, no share link, no analytics), bound to
127.0.0.1 unless told otherwise. The data, feedback and workspace paths are fixed when the app is
built and no file is served; the Train tab reads the config, model and data files a user names (as
``glmtune train`` would) and writes only under the workspace.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from dataclasses import asdict  # noqa: E402
from datetime import datetime  # noqa: E402

import gradio as gr  # noqa: E402

from glmtune.inference import GenerationSettings  # noqa: E402

from .core import BASE, CURRENT, Backend, InputError, build_messages, json_view, make_settings  # noqa: E402
from .jobs import TrainJobs  # noqa: E402
from .store import FeedbackError, FeedbackLog, LabelError, LabelStore  # noqa: E402
from .train_tab import CompareControls, train_tab  # noqa: E402

__all__ = ["build_app", "launch"]

TABLE_HEADERS = ["#", "instruction", "input", "output"]
BAD_HEADERS = ["#", "instruction", "input", "wrong answer", "comment", "corrected"]
MODE_CHOICES = [("Instruction + input", "instruction"), ("Free chat", "chat")]
FORMAT_CHOICES = [
    ("Instruction/Input/Answer (context_target)", "context_target"),
    ("ChatGLM3 conversations", "conversations"),
]

CSS = """
#pg-json-status p, #cmp-base-json p, #cmp-tuned-json p {font-weight: 600}
.glmtune-note {opacity: 0.8}
"""


def _settings_controls(prefix: str, defaults: GenerationSettings):
    with gr.Accordion("Generation settings", open=False):
        max_new = gr.Slider(
            1,
            2048,
            value=defaults.max_new_tokens,
            step=1,
            label="Max new tokens",
            elem_id=f"{prefix}-max-new",
        )
        temperature = gr.Slider(
            0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"
        )
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (when sampling)")
    return max_new, temperature, top_p


def _json_out(view=None):
    """The parsed-JSON panel: shown with the value for valid JSON, hidden otherwise."""
    if view is None or not view.ok:
        return gr.update(value=None, visible=False)
    return gr.update(value=view.value, visible=True)


def _table(store: LabelStore):
    import pandas as pd

    return pd.DataFrame(store.table(), columns=TABLE_HEADERS)


def _count_text(store: LabelStore) -> str:
    n = store.count()
    return f"**{n}** row{'s' * (n != 1)} in `{store.path.name}` (format: {store.current_format()})"


def build_app(
    backend: Backend,
    *,
    store: LabelStore | None = None,
    feedback: FeedbackLog | None = None,
    run_dir: str | os.PathLike | None = None,
    settings: GenerationSettings | None = None,
    title: str = "glmtune web",
    jobs: TrainJobs | None = None,
) -> gr.Blocks:
    """The Blocks app. ``store`` (the ``--data`` file) and ``feedback`` switch the Label tab and
    the ✓ / ✗ buttons on; ``jobs`` (a workspace) lets the Train tab start runs, ``run_dir`` shows a
    run there until one is started; ``settings`` are the initial generation settings of the sliders."""
    settings = settings or GenerationSettings()
    default_fmt = store.current_format() if store is not None else "context_target"

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## glmtune web\nModel: `{backend.describe()}`", elem_classes="glmtune-note")
        with gr.Tabs() as tabs:
            with gr.Tab("Playground", id="playground"):
                _playground(backend, feedback, default_fmt, settings)
            with gr.Tab("Compare", id="compare"):
                compare = _compare(demo, tabs, backend, default_fmt, settings)
            with gr.Tab("Label", id="label") as label_tab:
                _label(demo, label_tab, store, feedback)
            with gr.Tab("Train", id="train"):
                train_tab(demo, backend, jobs, store, feedback, run_dir, compare)
    return demo


def _mode_fields(mode: str) -> tuple:
    """Updates of the instruction box, the format choice and the text box for a mode switch: free chat
    hides the first two and calls the text box "Message"."""
    chat = mode == "chat"
    return (
        gr.update(visible=not chat),
        gr.update(visible=not chat),
        gr.update(label="Message" if chat else "Input"),
    )


# ------------------------------------------------------------------------------------------ playground
def _playground(
    backend: Backend, feedback: FeedbackLog | None, default_fmt: str, defaults: GenerationSettings
) -> None:
    last = gr.State(None)  # the last exchange, for the feedback buttons
    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(MODE_CHOICES, value="instruction", label="Mode", elem_id="pg-mode")
            fmt = gr.Radio(
                FORMAT_CHOICES, value=default_fmt, label="Prompt format", info="as in the training data"
            )
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="pg-instruction")
            text = gr.Textbox(label="Input", lines=3, elem_id="pg-input")
            system = gr.Textbox(label="System prompt", lines=2, visible=False, elem_id="pg-system")
            with gr.Row():
                send = gr.Button("Generate", variant="primary", elem_id="pg-send")
                stop = gr.Button("Stop", elem_id="pg-stop")
                clear = gr.Button("Clear", elem_id="pg-clear")
            max_new, temperature, top_p = _settings_controls("pg", defaults)
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Answer", height=340, elem_id="pg-chat")
            json_status = gr.Markdown("", elem_id="pg-json-status")
            json_value = gr.JSON(label="Parsed JSON", elem_id="pg-json", visible=False, open=True)
            with gr.Group():
                comment = gr.Textbox(label="Comment on this answer (optional)", elem_id="pg-comment")
                with gr.Row():
                    good = gr.Button("✓ Good", elem_id="pg-good", interactive=feedback is not None)
                    bad = gr.Button("✗ Bad", elem_id="pg-bad", interactive=feedback is not None)
            fb_status = gr.Markdown(
                "" if feedback is not None else "Feedback is off.", elem_id="pg-feedback-status"
            )

    def switch_mode(m):
        # + the system prompt shown in chat mode; the conversation and the last answer cleared
        return (*_mode_fields(m), gr.update(visible=m == "chat"), [], None)

    mode.change(switch_mode, mode, [instruction, fmt, text, system, chatbot, last], queue=False)

    def generate(m, f, instr, txt, sys_prompt, history, n, t, p):
        try:
            settings = make_settings(n, t, p)
            messages = backend.prepare(
                _build(m, instr, txt, f, sys_prompt, history),
                settings,
            )
        except InputError as e:
            yield history, f"⚠ {e}", _json_out(), gr.skip(), gr.skip()
            return
        shown = [] if m == "instruction" else [x for x in (history or []) if isinstance(x, dict)]
        shown = shown + [{"role": "user", "content": messages[-1]["content"]}]
        clear_text = "" if m == "chat" else gr.skip()
        yield shown + [{"role": "assistant", "content": "…"}], "generating…", _json_out(), None, clear_text
        answer = ""
        try:
            for answer in backend.answer(messages, settings):
                yield (
                    shown + [{"role": "assistant", "content": answer}],
                    "generating…",
                    gr.skip(),
                    None,
                    gr.skip(),
                )
        except Exception as e:  # shown, not raised: the page stays usable
            yield (
                shown + [{"role": "assistant", "content": answer}],
                f"⚠ generation failed: {e}",
                _json_out(),
                None,
                gr.skip(),
            )
            return
        view = json_view(answer)
        exchange = {
            "mode": m,
            "input": messages[-1]["content"],
            "messages": messages,
            "output": answer,
            "settings": asdict(settings),
        }
        yield (
            shown + [{"role": "assistant", "content": answer}],
            view.message,
            _json_out(view),
            exchange,
            gr.skip(),
        )

    inputs = [mode, fmt, instruction, text, system, chatbot, max_new, temperature, top_p]
    outputs = [chatbot, json_status, json_value, last, text]
    ev_click = send.click(generate, inputs, outputs, concurrency_id="generate", api_name="generate")
    ev_submit = text.submit(generate, inputs, outputs, concurrency_id="generate", api_visibility="private")
    stop.click(None, cancels=[ev_click, ev_submit])
    clear.click(
        lambda: ([], "", _json_out(), None, ""),
        None,
        [chatbot, json_status, json_value, last, comment],
        queue=False,
    )

    def rate(verdict, exchange, note):
        if feedback is None:
            return "Feedback is off.", gr.skip()
        if not exchange:
            return "⚠ nothing to rate yet: generate an answer first", gr.skip()
        try:
            row = feedback.append(
                exchange["input"],
                exchange["output"],
                verdict,
                note,
                mode=exchange.get("mode"),
                messages=exchange.get("messages"),
                settings=exchange.get("settings"),
            )
        except (FeedbackError, OSError) as e:
            return f"⚠ {e}", gr.skip()
        mark = "✓" if row["verdict"] == "good" else "✗"
        at = datetime.now().strftime("%H:%M:%S")
        return f"{mark} saved as {row['verdict']} to `{feedback.path.name}` at {at}", ""

    good.click(lambda e, c: rate("good", e, c), [last, comment], [fb_status, comment], concurrency_limit=8)
    bad.click(lambda e, c: rate("bad", e, c), [last, comment], [fb_status, comment], concurrency_limit=8)


def _build(mode, instruction, text, fmt, system, history):
    return build_messages(mode, instruction, text, fmt=fmt, system=system, history=history)


# --------------------------------------------------------------------------------------------- compare
def _compare(
    demo: gr.Blocks, tabs: gr.Tabs, backend: Backend, default_fmt: str, defaults: GenerationSettings
) -> CompareControls:
    note = gr.Markdown(backend.compare_note, elem_id="cmp-note")
    options = backend.choices()
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                left = gr.Dropdown(
                    options,
                    value=BASE if backend.can_compare else CURRENT,
                    label="Left",
                    elem_id="cmp-left",
                )
                right = gr.Dropdown(options, value=CURRENT, label="Right", elem_id="cmp-right")
            mode = gr.Radio(MODE_CHOICES, value="instruction", label="Mode", elem_id="cmp-mode")
            fmt = gr.Radio(FORMAT_CHOICES, value=default_fmt, label="Prompt format")
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="cmp-instruction")
            text = gr.Textbox(label="Input", lines=3, elem_id="cmp-input")
            run = gr.Button("Compare", variant="primary", elem_id="cmp-run", interactive=backend.can_compare)
            max_new, temperature, top_p = _settings_controls("cmp", defaults)
        with gr.Column(scale=3):
            with gr.Row():
                with gr.Column():
                    base_out = gr.Textbox(label="Base model", lines=10, interactive=False, elem_id="cmp-base")
                    base_json = gr.Markdown("", elem_id="cmp-base-json")
                with gr.Column():
                    tuned_out = gr.Textbox(
                        label="Fine-tuned model", lines=10, interactive=False, elem_id="cmp-tuned"
                    )
                    tuned_json = gr.Markdown("", elem_id="cmp-tuned-json")

    mode.change(_mode_fields, mode, [instruction, fmt, text], queue=False)

    def compare(lft, rgt, m, f, instr, txt, n, t, p):
        try:
            settings = make_settings(n, t, p)
            messages = backend.prepare(_build(m, instr, txt, f, "", None), settings)
            if lft == rgt:
                raise InputError("left and right are the same model: choose two")
            if BASE in (lft, rgt) and not backend.can_compare:
                raise InputError(backend.compare_note)
        except InputError as e:
            yield "", f"⚠ {e}", "", ""
            return
        tuned = base = ""
        try:
            for tuned in backend.answer(messages, settings, variant=rgt):
                yield "", "", tuned, "generating…"
            tuned_msg = json_view(tuned).message
            yield "", "generating…", tuned, tuned_msg
            for base in backend.answer(messages, settings, variant=lft):
                yield base, "generating…", tuned, tuned_msg
        except Exception as e:
            yield base, f"⚠ generation failed: {e}", tuned, ""
            return
        yield base, json_view(base).message, tuned, tuned_msg

    run.click(
        compare,
        [left, right, mode, fmt, instruction, text, max_new, temperature, top_p],
        [base_out, base_json, tuned_out, tuned_json],
        concurrency_id="generate",
        api_name="compare",
    )

    def label_of(key):
        return next((label for label, k in backend.choices() if k == key), key)

    left.change(lambda k: gr.update(label=f"Left: {label_of(k)}"), left, base_out, queue=False)
    right.change(lambda k: gr.update(label=f"Right: {label_of(k)}"), right, tuned_out, queue=False)

    def refresh():
        # Adapters another tab (or the Train tab) loaded since this page was built.
        options = backend.choices()
        keys = {k for _, k in options}
        return gr.update(choices=options), gr.update(choices=options), gr.update(interactive=len(keys) > 1)

    demo.load(refresh, None, [left, right, run], api_visibility="private")
    return CompareControls(tabs=tabs, left=left, right=right, run=run, note=note)


# ----------------------------------------------------------------------------------------------- label
def _label(
    demo: gr.Blocks, label_tab: gr.Tab, store: LabelStore | None, feedback: FeedbackLog | None
) -> None:
    if store is None:
        gr.Markdown("Labelling is off: start `glmtune web MODEL --data FILE.jsonl` to add rows to a dataset.")
        return
    loaded = gr.State(None)  # {"number", "fingerprint"} of the row loaded into the form
    correcting = gr.State(None)  # the feedback row number of the ✗ answer loaded into the form
    gr.Markdown(
        f"Dataset: `{store.path}`. Rows are checked with the reader training uses before they are "
        "saved; every save rewrites the file atomically.",
        elem_classes="glmtune-note",
    )
    with gr.Row():
        with gr.Column(scale=2):
            fmt = gr.Radio(FORMAT_CHOICES, value=store.current_format(), label="Format", elem_id="lb-format")
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="lb-instruction")
            inp = gr.Textbox(label="Input (optional)", lines=3, elem_id="lb-input")
            output = gr.Textbox(label="Output (the answer to train on)", lines=3, elem_id="lb-output")
            with gr.Row():
                add = gr.Button("Add row", variant="primary", elem_id="lb-add")
                save = gr.Button("Save changes to loaded row", elem_id="lb-save")
                clear = gr.Button("Clear form", elem_id="lb-clear")
            status = gr.Markdown("", elem_id="lb-status")
            with gr.Row():
                number = gr.Number(label="Row #", precision=0, minimum=1, elem_id="lb-row")
                load = gr.Button("Load row into the form", elem_id="lb-load")
                delete = gr.Button("Delete row", variant="stop", elem_id="lb-delete")
        with gr.Column(scale=3):
            count = gr.Markdown("", elem_id="lb-count")
            table = gr.Dataframe(
                headers=TABLE_HEADERS,
                interactive=False,
                wrap=True,
                elem_id="lb-table",
                column_widths=["8%", "34%", "29%", "29%"],
            )
            refresh = gr.Button("Refresh", elem_id="lb-refresh")
    if feedback is not None:
        gr.Markdown("#### Answers marked ✗ in the Playground")
        bad_count = gr.Markdown("", elem_id="lb-bad-count")
        bad_table = gr.Dataframe(
            headers=BAD_HEADERS,
            interactive=False,
            wrap=True,
            elem_id="lb-bad-table",
            column_widths=["6%", "24%", "20%", "24%", "14%", "12%"],
        )
        with gr.Row():
            bad_number = gr.Number(label="✗ row #", precision=0, minimum=1, elem_id="lb-bad-row")
            correct = gr.Button("Correct this answer (load it into the form)", elem_id="lb-correct")

    def bad_view():
        import pandas as pd

        try:
            fmt = store.current_format()
        except LabelError as e:
            return gr.skip(), f"⚠ {e}", gr.skip()
        answers = feedback.bad()
        todo = [b for b in answers if b.correction is None]
        rows = []
        for b in answers:
            f = b.fields(fmt)
            done = f"row {b.correction['data_row']}" if b.correction else ""
            rows.append([b.number, f.instruction, f.input, f.output, b.row.get("comment", ""), done])
        text = (
            f"**{len(answers)}** ✗ answer{'s' * (len(answers) != 1)} in `{feedback.path.name}`, "
            f"**{len(answers) - len(todo)}** corrected into `{store.path.name}`"
        )
        first = todo[0].number if todo else None
        return pd.DataFrame(rows, columns=BAD_HEADERS), text, first

    def view():
        try:
            return _table(store), _count_text(store)
        except LabelError as e:
            return gr.skip(), f"⚠ {e}"

    def after(message):
        t, c = view()
        return message, t, c

    def do_add(f, i, x, o, fixing):
        try:
            n = store.append(i, x, o, f)
        except (LabelError, OSError) as e:
            return (*after(f"✗ not saved: {e}"), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        message = f"✓ added row {n}"
        if fixing is not None and feedback is not None:
            try:
                feedback.mark_corrected(feedback.bad_answer(fixing), store.path, n)
                message += f" (the correction of ✗ answer {fixing})"
            except (FeedbackError, OSError) as e:
                message += f"; ⚠ not recorded as the correction of ✗ answer {fixing}: {e}"
        # The form is cleared for the next row, the instruction kept (rows often share it).
        return (*after(message), gr.skip(), "", "", None, None)

    def do_load(n):
        try:
            fields = store.fields(n)
            row = store.get(n)
        except LabelError as e:
            return f"✗ {e}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), None
        state = {"number": int(n), "fingerprint": store.fingerprint(row)}
        return (
            f"row {int(n)} loaded: edit it and press *Save changes*",
            fields.format,
            fields.instruction,
            fields.input,
            fields.output,
            state,
        )

    def do_save(f, i, x, o, state):
        if not state:
            return (*after("✗ load a row first (row # and *Load row*), or use *Add row*"), gr.skip())
        try:
            store.update(state["number"], i, x, o, f, expected=state["fingerprint"])
        except (LabelError, OSError) as e:
            return (*after(f"✗ not saved: {e}"), gr.skip())
        row = store.get(state["number"])
        return (*after(f"✓ saved row {state['number']}"), {**state, "fingerprint": store.fingerprint(row)})

    def do_delete(n, state):
        expected = state["fingerprint"] if state and n is not None and state["number"] == int(n) else None
        try:
            store.delete(n, expected=expected)
        except (LabelError, OSError) as e:
            return (*after(f"✗ not deleted: {e}"), gr.skip())
        return (*after(f"✓ deleted row {int(n)}"), None)

    form = [fmt, instruction, inp, output]
    add_event = add.click(
        do_add,
        [*form, correcting],
        [status, table, count, instruction, inp, output, loaded, correcting],
        concurrency_limit=8,
        api_name="add_row",
    )
    save.click(
        do_save, [*form, loaded], [status, table, count, loaded], concurrency_limit=8, api_name="save_row"
    )
    load.click(do_load, number, [status, *form, loaded], concurrency_limit=8, api_name="load_row")
    delete.click(
        do_delete,
        [number, loaded],
        [status, table, count, loaded],
        concurrency_limit=8,
        api_name="delete_row",
    )
    clear.click(
        lambda: ("", "", "", "", None, None),
        None,
        [status, instruction, inp, output, loaded, correcting],
        queue=False,
    )
    refresh.click(view, None, [table, count], concurrency_limit=8, api_visibility="private")
    demo.load(view, None, [table, count], api_visibility="private")
    if feedback is None:
        return

    def do_correct(number):
        try:
            answer = feedback.bad_answer(number)
        except FeedbackError as e:
            return f"✗ {e}", *[gr.skip()] * 5, None
        f = answer.fields(store.current_format())
        note = " (corrected before: adding saves another row)" if answer.correction else ""
        return (
            f"✗ answer {answer.number} loaded{note}: correct the output, then press *Add row*",
            f.format,
            f.instruction,
            f.input,
            f.output,
            None,
            answer.number,
        )

    correct.click(
        do_correct,
        bad_number,
        [status, *form, loaded, correcting],
        concurrency_limit=8,
        api_name="correct_bad",
    )
    bad_outs = [bad_table, bad_count, bad_number]
    add_event.then(bad_view, None, bad_outs, api_visibility="private")
    refresh.click(bad_view, None, bad_outs, api_visibility="private")
    label_tab.select(bad_view, None, bad_outs, api_visibility="private")
    demo.load(bad_view, None, bad_outs, api_visibility="private")


# ---------------------------------------------------------------------------------------------- launch
def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    *,
    block: bool = True,
    quiet: bool = False,
):
    """Serve ``app`` on ``host:port`` from the local Gradio assets: no share link, no SSR (no
    Node), no analytics. ``block=False`` returns once the server is up (tests, screenshots)."""
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        inbrowser=False,
        show_error=True,
        quiet=quiet,
        pwa=False,
        mcp_server=False,
        css=CSS,
    )
