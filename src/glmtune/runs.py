"""A training run folder, read in one place.

``glmtune train`` writes a run into ``train.output_dir``::

    glmtune_config.yaml   the resolved config (CONFIG_FILENAME; also inside every folder below)
    final/                what the run produced: the adapter (LoRA, P-Tuning v2) or the full model
    best/                 the weights with the lowest eval loss (when there is eval data)
    checkpoint-<step>/    the Trainer's checkpoints (train.resume=latest|STEP|PATH continues from one)

:class:`Run` opens such a folder (or the run config YAML that describes one: the run is its
``train.output_dir``) and answers every question commands ask of it: the config, the base model, the
generation, ``final/``, ``best/``, the checkpoints, which checkpoint ``train.resume`` names, and the
model the run produced as a :class:`~glmtune.resolve.ResolvedModel` (the base with ``final/`` as the
adapter, or ``final/`` itself for a full fine-tune, with the run's ``model.generation`` and
``model.trust_remote_code``, and its prompt template: the run's copy ``glmtune_template.yaml``, else the
config's ``model.template``). A folder that holds its own weights beside a ``glmtune_config.yaml`` (a
``checkpoint-<step>/``, ``best/`` or ``final/`` folder) opens as a run whose weights are that folder.

:func:`resolve_model_or_run` is ``resolve_model`` for a command's model argument: a run folder or run
config resolves to what the run produced, anything else as ``resolve_model`` does. ``glmtune eval``,
``export``, ``chat``, ``predict``, ``serve`` and ``web`` take run folders through it, and the training
recipe resolves ``train.resume`` with :meth:`Run.resume_path`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CONFIG_FILENAME, RunConfig, load_config
from .errors import ConfigError
from .resolve import ResolvedModel, is_hub_id, resolve_model, resolve_model_path
from .templates import Template
from .user_templates import TEMPLATE_FILENAME

__all__ = ["CHECKPOINT_PATTERN", "CONFIG_FILENAME", "Run", "resolve_model_or_run"]

#: A Trainer checkpoint folder's name (transformers' ``checkpoint-<step>``, as ``get_last_checkpoint``).
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

_RUN_CONFIG_SUFFIXES = (".yaml", ".yml")


def _holds_weights(folder: Path) -> bool:
    """A peft adapter, an official P-Tuning v2 checkpoint or a model: what a run saves as weights."""
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


@dataclass(frozen=True)
class Run:
    """A ``glmtune train`` run: its folder ``dir``, its resolved ``config`` and the ``config_file`` read."""

    dir: Path
    config: RunConfig
    config_file: Path

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def find(cls, path: str | os.PathLike) -> Run | None:
        """The run at ``path``, or None when ``path`` is neither a folder holding ``glmtune_config.yaml``
        nor a ``.yaml``/``.yml`` file. A run config file's run is its ``train.output_dir``. A broken
        config file raises :class:`~glmtune.errors.ConfigError`."""
        path = Path(path)
        if path.is_dir():
            config_file = path / CONFIG_FILENAME
            if not config_file.is_file():
                return None
            return cls(dir=path, config=load_config(config_file), config_file=config_file)
        if path.suffix in _RUN_CONFIG_SUFFIXES and path.is_file():
            cfg = load_config(path)
            return cls(dir=Path(cfg.train.output_dir), config=cfg, config_file=path)
        return None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Like :meth:`find`, but a path that is no run is a :class:`~glmtune.errors.ConfigError`."""
        run = cls.find(path)
        if run is None:
            if not Path(path).exists():
                raise ConfigError(f"{path}: no such run folder or run config")
            raise ConfigError(f"{path}: not a run folder (no {CONFIG_FILENAME} in it) or run config YAML")
        return run

    @classmethod
    def of(cls, cfg: RunConfig) -> Run:
        """The run ``cfg`` describes (in ``train.output_dir``; nothing is read, it may not exist yet)."""
        out = Path(cfg.train.output_dir)
        return cls(dir=out, config=cfg, config_file=out / CONFIG_FILENAME)

    # ----------------------------------------------------------------------------------- contents
    @property
    def method(self) -> str:
        """``method.name``: lora, ptuning_v2 or full."""
        return self.config.method.name

    @property
    def generation(self) -> str | None:
        """The run's ``model.generation`` (None: detected from the base model's files)."""
        return self.config.model.generation

    @property
    def template(self) -> Path | str | None:
        """The prompt template the run trained with: the copy the recipe saved in the run folder
        (``glmtune_template.yaml``; in a checkpoint folder opened as a run, the copy beside it or in the
        run folder above), else the config's ``model.template``; None: the generation's own."""
        for folder in (self.dir, self.dir.parent) if _holds_weights(self.dir) else (self.dir,):
            if (folder / TEMPLATE_FILENAME).is_file():
                return folder / TEMPLATE_FILENAME
        return getattr(self.config.model, "template", None)

    @property
    def final(self) -> Path | None:
        """``final/`` (the finished run's adapter or full model), or None before the run finished."""
        return self._sub("final")

    @property
    def best(self) -> Path | None:
        """``best/`` (the weights with the lowest eval loss), or None when there is none."""
        return self._sub("best")

    @property
    def weights(self) -> Path | None:
        """What the run produced: ``final/``, or the folder itself when it holds weights beside its config
        (a ``checkpoint-<step>/``, ``best/`` or ``final/`` folder opened as a run); None if neither."""
        final = self.final
        if final is not None:
            return final
        return self.dir if self.dir.is_dir() and _holds_weights(self.dir) else None

    def checkpoints(self) -> list[Path]:
        """The ``checkpoint-<step>`` folders, sorted by step."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = CHECKPOINT_PATTERN.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def checkpoint(self, step: int) -> Path | None:
        """``checkpoint-<step>``, or None when the run has no such folder."""
        return self._sub(f"checkpoint-{int(step)}")

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint of the highest step (what ``train.resume=latest`` continues from), or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def resume_path(self, resume: int | str | None) -> Path | None:
        """The checkpoint ``train.resume`` names: None/"" (start afresh) -> None; ``latest`` -> the latest
        checkpoint; a step -> ``checkpoint-<step>``; anything else -> that path. A checkpoint that is not
        there is a :class:`~glmtune.errors.ConfigError`."""
        if resume in (None, "", False):
            return None
        if resume == "latest":
            last = self.latest_checkpoint()
            if last is None:
                raise ConfigError(f"train.resume=latest: no checkpoint-<step> folder in {self.dir}")
            return last
        if isinstance(resume, int) or str(resume).isdigit():
            path = self.dir / f"checkpoint-{int(resume)}"
        else:
            path = Path(str(resume))
        if not path.is_dir():
            raise ConfigError(f"train.resume={resume}: {path} does not exist")
        return path

    def _sub(self, name: str) -> Path | None:
        path = self.dir / name
        return path if path.is_dir() else None

    # ------------------------------------------------------------------------------------- models
    def base(
        self,
        *,
        generation: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        template: str | os.PathLike | Template | None = None,
    ) -> ResolvedModel:
        """The base model the run trained (``model.path``), with the run's generation (``generation``
        overrides it), prompt template (``template`` overrides it) and ``trust_remote_code`` (or the
        argument's)."""
        return resolve_model(
            self.config.model.path,
            **self._settings(generation, dtype, device, quantization, trust_remote_code, template),
        )

    def _settings(self, generation, dtype, device, quantization, trust_remote_code, template=None) -> dict:
        """The run's own generation, dtype, quantization and template unless the caller names others."""
        m = self.config.model
        return dict(
            generation=generation or self.generation,
            dtype=dtype if dtype is not None else m.dtype,
            device=device,
            quantization=quantization if quantization is not None else m.quantization,
            trust_remote_code=trust_remote_code or m.trust_remote_code,
            template=template if template is not None else self.template,
        )

    def model(
        self,
        *,
        generation: str | None = None,
        adapter: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        quantization: str | None = None,
        trust_remote_code: bool = False,
        template: str | os.PathLike | Template | None = None,
    ) -> ResolvedModel:
        """What the run produced: the base with :attr:`weights` as its adapter (LoRA, P-Tuning v2), or
        :attr:`weights` as the model (full fine-tune). ``adapter`` replaces the run's adapter (for a full
        fine-tune it goes on top of the model); ``generation`` overrides the run's ``model.generation``.
        The run's ``model.dtype``, ``model.quantization`` and prompt template (:attr:`template`) apply
        unless ``dtype`` / ``quantization`` / ``template`` say otherwise; ``device`` None = CUDA when present."""
        weights = self.weights
        settings = self._settings(generation, dtype, device, quantization, trust_remote_code, template)
        if self.method == "full":
            if weights is None:
                raise ConfigError(f"{self.dir}: {self._no_weights('the fully fine-tuned model')}")
            return resolve_model(weights, adapter=adapter, **settings)
        if adapter is None and weights is None:
            raise ConfigError(
                f"{self.dir}: {self._no_weights('the adapter')} (or name an adapter: --adapter DIR)"
            )
        return resolve_model(self.config.model.path, adapter=adapter or weights, **settings)

    def _no_weights(self, what: str) -> str:
        found = [p.name for p in self.checkpoints()]
        where = f"; its checkpoints: {', '.join(found)} (pass one of those folders instead)" if found else ""
        return f"no final/ folder with {what} (has the run finished?){where}"


def resolve_model_or_run(
    source: str | os.PathLike | ResolvedModel,
    *,
    generation: str | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    template: str | os.PathLike | Template | None = None,
) -> ResolvedModel:
    """``resolve_model`` for a command's model argument: a run folder or run config YAML resolves to
    what the run produced (:meth:`Run.model`, with the run's prompt template unless ``template`` names
    one); a model folder, a .gguf file or "default" as ``resolve_model`` resolves them."""
    settings = dict(
        generation=generation,
        adapter=adapter,
        dtype=dtype,
        device=device,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        template=template,
    )
    if isinstance(source, ResolvedModel):
        return source
    if isinstance(source, str) and is_hub_id(source) and not Path(source).exists():
        return resolve_model(source, **settings)  # a hub id names a model, never a run
    run = Run.find(resolve_model_path(source))
    if run is None:
        return resolve_model(source, **settings)
    return run.model(**settings)
