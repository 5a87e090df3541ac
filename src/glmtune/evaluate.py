"""Generation-based evaluation: predict replies for a dataset and score them.

Used by ``glmtune demo`` (before/after fine-tuning) and ``glmtune eval``. Prompts are the examples'
messages without the final reply; references are the final replies.
"""

from __future__ import annotations

from dataclasses import dataclass

from .inference import Engine, GenerationSettings
from .metrics import task_metrics


@dataclass
class Predictions:
    prompts: list[list[dict]]
    references: list[str]
    outputs: list[str]


def split_examples(examples) -> tuple[list[list[dict]], list[str]]:
    prompts, refs = [], []
    for ex in examples:
        messages = ex.messages if hasattr(ex, "messages") else ex
        prompts.append(messages[:-1])
        refs.append(messages[-1]["content"])
    return prompts, refs


def predict(engine: Engine, prompts: list[list[dict]], settings: GenerationSettings, batch_size: int = 8,
            progress: bool = False) -> list[str]:
    """Replies for every prompt, in order, generated ``batch_size`` at a time (left-padded, KV cache).

    Prompts are sorted by length inside the run so each batch pads little; outputs come back in input order.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    outputs: list[str | None] = [None] * len(prompts)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", leave=False)
    for start in batches:
        idx = order[start : start + batch_size]
        for i, completion in zip(idx, engine.generate([prompts[i] for i in idx], settings)):
            outputs[i] = completion.text
    return outputs  # type: ignore[return-value]


def evaluate(engine: Engine, examples, settings: GenerationSettings, batch_size: int = 8,
             task: str = "auto") -> tuple[dict, Predictions]:
    prompts, refs = split_examples(examples)
    outputs = predict(engine, prompts, settings, batch_size)
    return task_metrics(outputs, refs, task=task), Predictions(prompts, refs, outputs)
