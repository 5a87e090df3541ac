"""The training methods glmtune has, named once.

``glmtune.train.methods`` builds its registry (``METHODS``) from this table and the run config's
``method.name`` accepts exactly these names. It lives apart from the registry because the config must
stay light to import: the registry's module imports torch and peft (and ``glmtune.train`` imports the
config, so the config importing it would be a cycle). This module imports nothing.
"""

from __future__ import annotations

#: method name -> what it trains (shown in messages and docs), in the order the docs list them.
METHOD_DESCRIPTIONS: dict[str, str] = {
    "lora": "LoRA adapters through peft (QLoRA with model.quantization 4bit/8bit)",
    "ptuning_v2": "P-Tuning v2 prefix encoder, official ChatGLM checkpoint layout",
    "full": "full fine-tuning, optionally only the last N layers",
}

#: The method names, as ``method.name`` spells them.
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_DESCRIPTIONS)
