"""``glmtune web``: a browser UI over the inference engine (playground, compare, labelling, and
training runs started, watched, stopped and resumed from the browser).

The logic lives in plain, Gradio-free modules (:mod:`.core`, :mod:`.store`, :mod:`.jobs`); :mod:`.app`
and :mod:`.train_tab` are the Gradio layout and are imported only when the UI is built.
"""

from .core import Backend, InputError, JsonView, RunView, build_messages, json_view, make_settings, read_run
from .jobs import JobError, TrainJob, TrainJobs
from .store import (
    LABEL_FORMATS,
    BadAnswer,
    FeedbackError,
    FeedbackLog,
    LabelError,
    LabelFields,
    LabelStore,
    file_lock,
    format_prompt,
    row_fields,
)

__all__ = [
    "LABEL_FORMATS",
    "BadAnswer",
    "Backend",
    "FeedbackError",
    "FeedbackLog",
    "InputError",
    "JobError",
    "JsonView",
    "LabelError",
    "LabelFields",
    "LabelStore",
    "RunView",
    "TrainJob",
    "TrainJobs",
    "build_messages",
    "file_lock",
    "format_prompt",
    "json_view",
    "make_settings",
    "read_run",
    "row_fields",
]
