"""``glmtune web``: a browser UI over the inference engine (playground, base-vs-tuned compare,
labelling, training run view).

The logic lives in plain, Gradio-free modules (:mod:`.core`, :mod:`.store`); :mod:`.app` is the
Gradio layout and is imported only when the UI is built.
"""

from .core import Backend, InputError, JsonView, RunView, build_messages, json_view, make_settings, read_run
from .store import (
    LABEL_FORMATS,
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
    "Backend",
    "FeedbackError",
    "FeedbackLog",
    "InputError",
    "JsonView",
    "LabelError",
    "LabelFields",
    "LabelStore",
    "RunView",
    "build_messages",
    "file_lock",
    "format_prompt",
    "json_view",
    "make_settings",
    "read_run",
    "row_fields",
]
