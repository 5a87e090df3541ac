"""Training: the recipe (``train``), the method registry and glmtune's Trainer additions."""

from .methods import METHODS, get_method
from .recipe import train

__all__ = ["METHODS", "get_method", "train"]
