"""Errors glmtune raises on purpose: each names the file, line, key or field at fault."""

from __future__ import annotations


class GlmtuneError(Exception):
    """Base class: a problem with the user's input that glmtune explains, not a bug."""


class ModelLoadError(GlmtuneError):
    """A model folder or weights file cannot be loaded (names the file and key)."""


class ConfigError(GlmtuneError):
    """A configuration value is invalid or asks for something the model or device can't do."""
