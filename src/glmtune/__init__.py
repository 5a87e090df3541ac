"""glmtune: fine-tune, evaluate, chat with and serve the ChatGLM family and other causal LMs.

Public API (stable): :func:`resolve_model`, :func:`load_tokenizer`, :func:`load_model`, :func:`get_template`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .errors import ConfigError, GlmtuneError, ModelLoadError
from .loading import load_model, load_tokenizer
from .resolve import ResolvedModel, resolve_model
from .specs import REGISTRY, ModelSpec, detect_generation, spec_for
from .templates import IGNORE_INDEX, Template

# peft reads transformers' deprecated ``is_gradient_checkpointing`` property each time it wraps a model
# (training and adapter loading alike): a FutureWarning our users can do nothing about, so it is hidden.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"


def get_template(path_or_name: str | os.PathLike | ResolvedModel) -> Template:
    """The chat template of a model folder, a resolved model (its ``template``: a prompt template from
    YAML when it has one), or a registry name (chatglm, chatglm2, chatglm3, glm4, hf). A folder holding
    ``glmtune_template.yaml`` (an export of a run trained with a prompt template) gives that template."""
    from .user_templates import TEMPLATE_FILENAME, load_template

    if isinstance(path_or_name, ResolvedModel):
        return path_or_name.template
    saved = Path(path_or_name) / TEMPLATE_FILENAME
    if saved.is_file():
        return load_template(saved)
    return spec_for(path_or_name).template


__all__ = [
    "ConfigError",
    "GlmtuneError",
    "IGNORE_INDEX",
    "ModelLoadError",
    "ModelSpec",
    "REGISTRY",
    "ResolvedModel",
    "Template",
    "detect_generation",
    "get_template",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "spec_for",
    "__version__",
]
