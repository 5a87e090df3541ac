"""Generation metrics during training (``eval.predict_with_generate``).

At every evaluation the model being trained answers the eval examples (the first ``eval.num_samples``
of them) through the same :class:`~glmtune.inference.Engine` and :func:`~glmtune.evaluate.predict` as
``glmtune eval``, and the replies are scored against the references: ROUGE-1/2/L and BLEU-4 in the
official definition of the model's generation (``ModelSpec.rouge_bleu_definition``: ChatGLM-6B /
ChatGLM2-6B ``ptuning/main.py``, BLEU on characters; ChatGLM3, GLM-4 and other models: ChatGLM3
``finetune_demo``, BLEU on words; see :mod:`glmtune.metrics`) and the task metrics of the references (:func:`glmtune.metrics.task_metrics`,
flattened: ``json_exact_match``, ``spo.f1``, ...). The trainer logs them beside the eval loss with the
``eval_`` prefix (``eval_rouge-l``), so they reach the console, TensorBoard, ``trainer_state.json``,
``train_summary.json`` and ``loss.png``, and ``eval.best_metric`` can pick any of them for ``best/``.

Generation leaves training as it was: the model's train/eval mode and ``config.use_cache`` (off under
gradient checkpointing, on while generating) are restored, and the global RNG is forked, so sampling
(``eval.temperature`` > 0, seeded with ``train.seed``) does not move the training's random stream. Under
DDP every process generates for its share of the examples and the replies are gathered, so all processes
score the same replies. Sharded weights (DeepSpeed ZeRO-3, FSDP) are not supported: the recipe turns
generation off there with a message.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..evaluate import predict, split_examples
from ..inference import Engine, GenerationSettings
from ..metrics import ROUGE_BLEU_KEYS, detect_task, flat_task_metrics, task_metric_names, task_metrics

#: The default of ``eval.best_metric``.
EVAL_LOSS = "eval_loss"


def metric_key(name: str) -> str:
    """The key a metric is logged under: ``rouge-l`` -> ``eval_rouge-l``; ``eval_loss`` stays."""
    return name if name.startswith("eval_") else f"eval_{name}"


def greater_is_better(name: str) -> bool:
    """The direction of a metric: lower is better for a loss (``eval_loss``), higher for every other
    metric logged (ROUGE, BLEU, exact match, F1, ...)."""
    return not name.endswith("loss")


def score_generations(
    outputs: Sequence[str], references: Sequence[str], definition: str, task: str
) -> dict[str, float]:
    """ROUGE-1/2/L and BLEU-4 (``definition``: chatglm3 or chatglm6b) and the flat task metrics."""
    from ..metrics import rouge_bleu_chatglm3, rouge_bleu_chatglm6b

    fn = rouge_bleu_chatglm6b if definition == "chatglm6b" else rouge_bleu_chatglm3
    report = fn(list(outputs), list(references))
    scores = {k: float(report[k]) for k in ROUGE_BLEU_KEYS}
    scores.update(flat_task_metrics(task_metrics(list(outputs), list(references), task=task)))
    return scores


class GenerationEval:
    """Generates for the eval examples with the model a trainer trains, and scores the replies.

    ``names``: the metrics each call returns (without the ``eval_`` prefix), fixed from the references
    before training so that ``eval.best_metric`` can be checked against them.
    """

    def __init__(
        self,
        examples,
        tokenizer,
        spec,
        settings: GenerationSettings,
        batch_size: int = 8,
        seed: int = 0,
        template=None,
    ):
        self.prompts, self.references = split_examples(examples)
        self.tokenizer = tokenizer
        self.spec = spec
        self.template = template  # the run's prompt template (ResolvedModel.template); None: the spec's
        self.settings = settings
        self.batch_size = batch_size
        self.seed = seed
        self.definition = spec.rouge_bleu_definition  # the official definition of the generation
        self.task = detect_task(self.references)
        self.names: list[str] = [*ROUGE_BLEU_KEYS, *task_metric_names(self.references, self.task)]

    def __len__(self) -> int:
        return len(self.prompts)

    def choices(self) -> list[str]:
        """What ``eval.best_metric`` can name with this eval data."""
        return [EVAL_LOSS, *self.names]

    def check_best_metric(self, name: str) -> None:
        """:class:`ConfigError` listing the choices unless ``name`` is logged for this eval data."""
        if name not in self.choices():
            raise ConfigError(
                f"eval.best_metric: {name} is not logged for this eval data (task {self.task!r}); "
                f"choices: {', '.join(self.choices())}"
            )

    def __call__(self, trainer) -> dict[str, float]:
        """The metrics of the model's replies now (every process gets the same values)."""
        outputs = self.generate(trainer)
        return score_generations(outputs, self.references, self.definition, self.task)

    def generate(self, trainer) -> list[str]:
        args = trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        rank, world = args.process_index, args.world_size
        mine = list(range(rank, len(self.prompts), world))
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        model.eval()
        try:
            if use_cache is not None:
                config.use_cache = True  # gradient checkpointing turned it off; generation wants it
            # Mixed precision: accelerate wrapped the model's forward in autocast when it prepared it.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                engine = Engine(model, self.tokenizer, self.spec, self.template)
                texts = predict(engine, [self.prompts[i] for i in mine], self.settings, self.batch_size)
        finally:
            if use_cache is not None:
                config.use_cache = use_cache
            model.train(was_training)
        pairs = list(zip(mine, texts))
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        outputs = [""] * len(self.prompts)
        for i, text in pairs:
            outputs[i] = text
        return outputs
