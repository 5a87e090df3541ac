"""The Train tab of ``glmtune web``: start, watch, stop and resume a ``glmtune train`` run, train again
from the adapter in use on the corrected data, and send the new adapter to the Compare tab.

The jobs themselves are :class:`glmtune.web.jobs.TrainJobs` (plain Python, no Gradio); this module lays
them out and polls them with a ``gr.Timer``. Everything shown is read back from the workspace's files at
each tick, so a page reload (or a second tab) shows the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .core import BASE, CURRENT, Backend, InputError, read_run
from .jobs import (
    FORM_FIELDS,
    JobError,
    TrainJobs,
    curve_points,
    eval_table,
    extra_overrides,
    form_overrides,
    form_values,
    latest_weights,
    progress_line,
    read_metrics,
    shipped_configs,
)
from .store import FeedbackLog, LabelError, LabelStore

__all__ = ["CompareControls", "train_tab"]

POLL_SECONDS = 2.0
CONFIG_KEY = "config"  # in the form's state: the config file its values came from
LOG_LINES = 8
METHODS = ["lora", "ptuning_v2", "full"]
ELEM_IDS = {
    "model.path": "tr-model",
    "data.train_file": "tr-train-file",
    "data.eval_file": "tr-eval-file",
    "method.name": "tr-method",
    "train.max_steps": "tr-max-steps",
    "train.learning_rate": "tr-lr",
    "train.batch_size": "tr-batch-size",
    "data.max_length": "tr-max-length",
    "train.save_steps": "tr-save-steps",
    "train.logging_steps": "tr-logging-steps",
}
STATUS_MARK = {"running": "▶", "stopping": "…", "finished": "✓", "stopped": "■", "failed": "✗"}


@dataclass
class CompareControls:
    """The Compare tab's parts the Train tab updates when a new adapter is loaded."""

    tabs: gr.Tabs
    left: gr.Dropdown
    right: gr.Dropdown
    run: gr.Button
    note: gr.Markdown


def _control(f, value=None):
    elem_id = ELEM_IDS[f.key]
    if f.kind == "choice":
        return gr.Radio(METHODS, value=value or "lora", label=f.label, elem_id=elem_id)
    if f.kind in ("int", "optional_int"):
        return gr.Number(value=value, label=f.label, precision=0, elem_id=elem_id)
    if f.kind == "float":
        return gr.Number(value=value, label=f.label, elem_id=elem_id)
    return gr.Textbox(value=value or "", label=f.label, elem_id=elem_id)


def _adapter_config(backend: Backend) -> Path | None:
    """The run config saved beside the adapter in use (a run's ``final/`` holds one), if any."""
    if not backend.adapter:
        return None
    cfg = Path(backend.adapter) / "glmtune_config.yaml"
    return cfg if cfg.is_file() else None


def _config_choices(backend: Backend, run_dir) -> list[tuple[str, str]]:
    out = []
    own = _adapter_config(backend)
    if own is not None:
        out.append((f"the adapter's run: {own}", str(own)))
    if run_dir is not None and (Path(run_dir) / "glmtune_config.yaml").is_file():
        cfg = Path(run_dir) / "glmtune_config.yaml"
        if str(cfg) not in {v for _, v in out}:
            out.append((f"--run: {cfg}", str(cfg)))
    for path in shipped_configs():
        out.append((str(path), str(path)))
    return out


def _usable(path) -> bool:
    return isinstance(path, str) and (path == "default" or Path(path).exists())


def _fill(config: str, backend: Backend, store: LabelStore | None):
    """The form's values for a config, and the config's own values (the base of the overrides). A model
    or data file that is not on this machine (the shipped configs name placeholders) is replaced by the
    model the UI runs and the Label tab's data file."""
    loaded = form_values(config)
    shown = dict(loaded)
    if not _usable(shown["model.path"]):
        base = backend.model_overrides()
        if base:
            shown["model.path"] = json.loads(base[0].partition("=")[2])
    if not _usable(shown["data.train_file"]) and store is not None:
        shown["data.train_file"] = str(store.path)
    if shown["data.eval_file"] is not None and not _usable(shown["data.eval_file"]):
        shown["data.eval_file"] = None
    return loaded, shown


def _status_md(job, rows) -> str:
    if job is None:
        return "No run started here yet."
    mark = STATUS_MARK.get(job.status, "")
    text = f"{mark} **{job.status}** · run `{Path(job.run_dir).name}` ({job.kind}) · {progress_line(rows)}"
    if job.status == "stopping":
        text += " · saving a checkpoint of the current step, then exiting (Stop again kills it now)"
    elif job.status == "stopped":
        text += " · " + ("killed" if job.killed else "checkpoint saved") + ": Resume continues it"
    elif job.status == "failed":
        code = "no exit status (killed?)" if job.exit_code is None else f"exit code {job.exit_code}"
        text += f" · {code}: see the log; Resume retries it"
    elif job.status == "finished" and latest_weights(job.run_dir) is not None:
        text += f" · adapter in `{latest_weights(job.run_dir)}`"
    return text


def train_tab(
    demo: gr.Blocks,
    backend: Backend,
    jobs: TrainJobs | None,
    store: LabelStore | None,
    feedback: FeedbackLog | None,
    run_dir,
    compare: CompareControls,
) -> None:
    """The Train tab's contents (inside ``gr.Tab``)."""
    if jobs is None:
        _run_view_only(demo, run_dir)
        return
    choices = _config_choices(backend, run_dir)
    default_config = choices[0][1] if choices else None
    loaded = gr.State({})  # the chosen config's own values of the form fields
    shown_key = gr.State(None)  # what the live view last drew (skip redrawing an unchanged curve)

    gr.Markdown(
        f"Runs go to `{jobs.runs_dir}/<run name>`; one run at a time. A run is a separate "
        "`glmtune train` process: it keeps going when this page is closed, and a reload shows it again.",
        elem_classes="glmtune-note",
    )
    with gr.Row():
        with gr.Column(scale=2):
            config = gr.Dropdown(
                choices,
                value=default_config,
                label="Config",
                allow_custom_value=True,
                elem_id="tr-config",
                info="a shipped config, the adapter's own run, or a path",
            )
            controls = [_control(f) for f in FORM_FIELDS]
            extra = gr.Textbox(
                label="Extra overrides (key.sub=value, one a line)",
                lines=2,
                elem_id="tr-extra",
                placeholder="method.lora_r=16\ntrain.warmup_ratio=0.05",
            )
            run_name = gr.Textbox(label="Run name (empty: dated)", elem_id="tr-run-name")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="tr-start")
                stop = gr.Button("Stop", variant="stop", elem_id="tr-stop")
                resume = gr.Button("Resume", elem_id="tr-resume")
            gr.Markdown("#### Train again")
            again_note = gr.Markdown("", elem_id="tr-again-note")
            again = gr.Button("Train again", elem_id="tr-again")
            action = gr.Markdown("", elem_id="tr-action")
        with gr.Column(scale=3):
            status = gr.Markdown("", elem_id="tr-status")
            log = gr.Textbox(
                label="Log (the last lines)", lines=8, max_lines=8, interactive=False, elem_id="tr-log"
            )
            curve = gr.LinePlot(
                x="step",
                y="value",
                color="series",
                label="Loss",
                elem_id="tr-curve",
                height=260,
                x_title="step",
                y_title="loss",
            )
            evals = gr.Dataframe(label="Evaluations", interactive=False, elem_id="tr-evals", wrap=True)
            with gr.Row():
                to_compare = gr.Button("Compare with the adapter in use", elem_id="tr-compare")
                use_new = gr.Button("Use the new adapter", elem_id="tr-use")
            with gr.Accordion("Run folder: loss.png, train_summary.json, eval report", open=True):
                loss = gr.Image(
                    label="loss.png", type="pil", format="png", interactive=False, elem_id="tr-loss"
                )
                summary = gr.JSON(label="train_summary.json", open=True, elem_id="tr-summary")
                report = gr.Markdown("", elem_id="tr-report")
    timer = gr.Timer(POLL_SECONDS)

    # ------------------------------------------------------------------ the form
    def fill(cfg):
        if not cfg:
            return (gr.skip(), *[gr.skip()] * len(controls), "")
        try:
            own, shown = _fill(cfg, backend, store)
        except JobError as e:
            return (gr.skip(), *[gr.skip()] * len(controls), f"✗ {e}")
        return ({**own, CONFIG_KEY: cfg}, *[shown[f.key] for f in FORM_FIELDS], f"config `{cfg}` loaded")

    config.input(fill, config, [loaded, *controls, action], api_visibility="private")

    def overrides(cfg, own, values, extra_text):
        if (own or {}).get(CONFIG_KEY) != cfg:  # the form was not filled from this config (yet)
            own = form_values(cfg)
        return form_overrides(own, dict(zip([f.key for f in FORM_FIELDS], values))) + extra_overrides(
            extra_text
        )

    def do_start(cfg, own, *rest):
        *values, extra_text, name = rest
        try:
            job = jobs.start(cfg, overrides(cfg, own, values, extra_text), run_name=name)
        except (JobError, OSError) as e:
            return f"✗ not started: {e}"
        return f"▶ started `{Path(job.run_dir).name}` (process {job.pid})"

    def do_stop():
        try:
            job = jobs.stop()
        except JobError as e:
            return f"✗ {e}"
        if job.killed:
            return f"■ killed `{Path(job.run_dir).name}`"
        return f"… stopping `{Path(job.run_dir).name}`: it saves a checkpoint of its current step, then exits"

    def do_resume():
        try:
            job = jobs.resume()
        except (JobError, OSError) as e:
            return f"✗ not resumed: {e}"
        how = (
            "from its latest checkpoint"
            if "train.resume=latest" in job.overrides
            else "afresh (no checkpoint)"
        )
        return f"▶ resumed `{Path(job.run_dir).name}` {how}"

    def do_again(cfg, own, *rest):
        *values, extra_text, name = rest
        if store is None or not backend.adapter:
            return "✗ " + _again_text(backend, store, feedback)
        forced = [
            *backend.model_overrides(),
            f"model.adapter={json.dumps(str(backend.adapter))}",
            f"data.train_file={json.dumps(str(store.path))}",
        ]
        try:
            job = jobs.start(
                cfg,
                overrides(cfg, own, values, extra_text) + forced,
                run_name=name,
                kind="again",
                adapter_from=str(backend.adapter),
                data_file=str(store.path),
            )
        except (JobError, OSError) as e:
            return f"✗ not started: {e}"
        return f"▶ training again from `{backend.adapter}` on `{store.path.name}`: run `{Path(job.run_dir).name}`"

    form = [config, loaded, *controls, extra, run_name]
    start.click(do_start, form, action, concurrency_limit=4, api_name="train_start")
    stop.click(do_stop, None, action, concurrency_limit=4, api_name="train_stop")
    resume.click(do_resume, None, action, concurrency_limit=4, api_name="train_resume")
    again.click(do_again, form, action, concurrency_limit=4, api_name="train_again")

    # ------------------------------------------------------------------ the new adapter
    def new_adapter() -> Path:
        job = jobs.current()
        final = latest_weights(job.run_dir) if job is not None and job.status == "finished" else None
        if final is None:
            raise InputError("no finished run with an adapter yet")
        return final

    def do_compare():
        try:
            key = backend.add_adapter(new_adapter())
        except (InputError, OSError, ValueError) as e:
            return f"✗ {e}", *[gr.skip()] * 5
        old = CURRENT if backend.adapter else (BASE if backend.can_compare else CURRENT)
        options = backend.choices()
        return (
            f"new adapter loaded: Compare shows `{backend.describe()}` (left) and `{key}` (right)",
            gr.Tabs(selected="compare"),
            gr.update(choices=options, value=old),
            gr.update(choices=options, value=key),
            gr.update(interactive=True),
            "**Left**: the adapter in use. **Right**: the new adapter.",
        )

    to_compare.click(
        do_compare,
        None,
        [action, compare.tabs, compare.left, compare.right, compare.run, compare.note],
        concurrency_limit=1,
        api_name="train_compare",
    )

    def do_use():
        try:
            key = backend.add_adapter(new_adapter())
            backend.use(key)
        except (InputError, OSError, ValueError) as e:
            return f"✗ {e}", gr.skip(), gr.skip(), gr.skip()
        if feedback is not None:
            feedback.adapter = str(key)
        options = backend.choices()
        return (
            f"✓ the Playground now answers with `{key}`; Train again continues from it",
            _again_text(backend, store, feedback),
            gr.update(choices=options, value=BASE if backend.can_compare else CURRENT),
            gr.update(choices=options, value=CURRENT),
        )

    use_new.click(
        do_use,
        None,
        [action, again_note, compare.left, compare.right],
        concurrency_limit=1,
        api_name="train_use",
    )

    # ------------------------------------------------------------------ the live view
    def tick(last_key):
        job = jobs.current()
        shown_run = job.run_dir if job is not None else run_dir
        rows = read_metrics(shown_run)
        view = read_run(shown_run) if shown_run is not None else None
        lines = jobs.log_lines(job, LOG_LINES) if job is not None else []
        running = job is not None and job.running
        finished = job is not None and job.status == "finished" and latest_weights(job.run_dir) is not None
        resumable = job is not None and job.status in ("stopped", "failed")
        loss_mtime = view.loss_png.stat().st_mtime if view is not None and view.loss_png else None
        key = (shown_run, len(rows), loss_mtime)
        redraw = key != last_key
        return (
            _status_md(job, rows) if job is not None else (view.message if view else "No run yet."),
            "\n".join(lines),
            _curve(rows) if redraw else gr.skip(),
            _evals(rows) if redraw else gr.skip(),
            _loss_image(view) if redraw else gr.skip(),
            (view.summary if view else None) if redraw else gr.skip(),
            _report(view) if redraw else gr.skip(),
            key,
            gr.update(interactive=not running),
            gr.update(interactive=running),
            gr.update(interactive=resumable),
            gr.update(interactive=not running and store is not None and bool(backend.adapter)),
            gr.update(interactive=finished),
            gr.update(interactive=finished),
            _again_text(backend, store, feedback),
        )

    live = [status, log, curve, evals, loss, summary, report, shown_key]
    buttons = [start, stop, resume, again, to_compare, use_new, again_note]
    timer.tick(tick, shown_key, live + buttons, api_visibility="private", concurrency_limit=8)
    demo.load(tick, shown_key, live + buttons, api_visibility="private")
    demo.load(fill, config, [loaded, *controls, action], api_visibility="private")


def _again_text(backend: Backend, store: LabelStore | None, feedback: FeedbackLog | None) -> str:
    if store is None:
        return "Train again needs a data file: start `glmtune web ... --data FILE.jsonl`."
    if not backend.adapter:
        return (
            "Train again continues from the adapter in use, and none is: start a run, then "
            "*Use the new adapter* (or start `glmtune web MODEL --adapter DIR`)."
        )
    try:
        n = _row_count(store)
    except LabelError as e:  # a broken data file: said here, refused at start
        return f"⚠ {e}"
    corrected = len(feedback.corrections()) if feedback is not None else 0
    return (
        f"Continues from `{backend.adapter}` on `{store.path.name}` ({n} rows, {corrected} corrected ✗ "
        "answers) with the config and settings above."
    )


_COUNTS: dict[tuple, int] = {}


def _row_count(store: LabelStore) -> int:
    """The data file's row count, read again only when the file changed (the view asks every tick)."""
    try:
        st = store.path.stat()
    except FileNotFoundError:
        return 0
    key = (str(store.path), st.st_mtime_ns, st.st_size)
    if key not in _COUNTS:
        _COUNTS.clear()
        _COUNTS[key] = store.count()
    return _COUNTS[key]


def _curve(rows):
    import pandas as pd

    points = curve_points(rows)
    # Typed columns even when empty: the plot takes an empty object column for a category axis.
    return pd.DataFrame(
        {
            "step": pd.Series([p["step"] for p in points], dtype="int64"),
            "value": pd.Series([p["value"] for p in points], dtype="float64"),
            "series": pd.Series([p["series"] for p in points], dtype="object"),
        }
    )


def _evals(rows):
    import pandas as pd

    headers, table = eval_table(rows)
    return pd.DataFrame(table, columns=headers)


def _loss_image(view):
    if view is None or view.loss_png is None:
        return None
    from PIL import Image

    try:
        with Image.open(view.loss_png) as im:
            return im.convert("RGB")
    except OSError:  # being rewritten: the next tick shows it
        return None


def _report(view) -> str:
    if view is None:
        return ""
    return view.report or "*No eval/report.md yet (run `glmtune eval`).*"


def _run_view_only(demo: gr.Blocks, run_dir) -> None:
    """Without a jobs workspace: a run folder's loss.png, train_summary.json and eval report."""
    message = gr.Markdown(read_run(run_dir).message, elem_id="tr-message")
    if run_dir is None:
        return
    with gr.Row():
        with gr.Column():
            loss = gr.Image(
                label="Training loss", type="pil", format="png", interactive=False, elem_id="tr-loss"
            )
            summary = gr.JSON(label="train_summary.json", open=True, elem_id="tr-summary")
        with gr.Column():
            report = gr.Markdown("", elem_id="tr-report")
    refresh = gr.Button("Refresh", elem_id="tr-refresh")

    def show():
        view = read_run(run_dir)
        return view.message, _loss_image(view), view.summary, _report(view)

    outs = [message, loss, summary, report]
    refresh.click(show, None, outs, api_visibility="private")
    demo.load(show, None, outs, api_visibility="private")
