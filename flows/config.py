"""Every imgflow parameter, as pydantic models the flows take directly.

A YAML config file holds the same keys as the command-line options (``image_size``,
``epochs``, ``learning_rate``, ``top_k`` ...), flat, at the top level; a flat key sets
every stage that has it (``seed``, ``dask_address``), except ``batch_size``, which
flat means the training batch (a training batch of 32 must not slow prediction down to
32 images a call). A mapping named after a stage sets that stage only::

    batch_size: 32          # training
    predict:
      batch_size: 512       # prediction only

Command-line options override the file; unknown keys are an error that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgflow.tasks.options import (
    EvaluateOptions,
    PredictOptions,
    PreprocessOptions,
    TrainOptions,
    ValidationOptions,
)
from imgflow.tasks.errors import UsageError
from imgflow.tasks.records import describe_error

DEFAULT_WORKDIR = Path("imgflow-work")


class ConfigError(UsageError, ValueError):
    """A config file or option value that cannot be used (CLI exit code 2)."""


_SECTIONS: dict[str, type[BaseModel]] = {
    "validation": ValidationOptions,
    "preprocess": PreprocessOptions,
    "train": TrainOptions,
    "predict": PredictOptions,
    "evaluate": EvaluateOptions,
}
# The stages of the training pipeline: what a training run records and its run id depends on.
TRAINING_SECTIONS = ("validation", "preprocess", "train")
# Flat keys that mean the training stages only; other stages take them from their own section.
_TRAINING_ONLY_FLAT_KEYS = frozenset({"batch_size"})


def _known_keys() -> str:
    return ", ".join(sorted({k for m in _SECTIONS.values() for k in m.model_fields}))


def _route(values: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Flat keys to every stage that has them, then ``<stage>:`` mappings to their stage only."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    scoped: list[tuple[str, dict[str, Any]]] = []
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {key!r} must be a mapping of {key} options, found {type(value).__name__}"
                )
            unknown = [k for k in value if k not in _SECTIONS[key].model_fields]
            if unknown:
                known = ", ".join(sorted(_SECTIONS[key].model_fields))
                raise ConfigError(f"{source}: unknown key {key}.{unknown[0]}; known {key} keys: {known}")
            scoped.append((key, value))
            continue
        owners = [name for name, model in _SECTIONS.items() if key in model.model_fields
                  and (name in TRAINING_SECTIONS or key not in _TRAINING_ONLY_FLAT_KEYS)]
        if not owners:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {_known_keys()}")
        for owner in owners:
            routed[owner][key] = value
    for section, mapping in scoped:
        routed[section].update(mapping)
    return routed


class ImgflowConfig(BaseModel):
    """All parameters, grouped by stage."""

    model_config = ConfigDict(extra="forbid")

    validation: ValidationOptions = Field(default_factory=ValidationOptions)
    preprocess: PreprocessOptions = Field(default_factory=PreprocessOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    predict: PredictOptions = Field(default_factory=PredictOptions)
    evaluate: EvaluateOptions = Field(default_factory=EvaluateOptions)

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "options") -> "ImgflowConfig":
        """Build a config from flat keys (``image_size: 64``), routing each to its stage.

        A key that belongs to several stages (``seed``) sets all of them; a ``<stage>:``
        mapping (``predict: {batch_size: 512}``) sets that stage only and wins over flat keys.

        Raises:
            ConfigError: a key no stage knows, or a value of the wrong type.
        """
        return cls._from_layers([(values, source)])

    @classmethod
    def _from_layers(cls, layers: list[tuple[dict[str, Any], str]]) -> "ImgflowConfig":
        """Route each layer (file, then options) and let a later layer win over an earlier one."""
        merged: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        routed = [(_route(values, source), source) for values, source in layers]
        for sections, _ in routed:
            for section, mapping in sections.items():
                merged[section].update(mapping)
        try:
            return cls(**merged)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            # name the layer (file or options) that gave the bad value
            source = next((src for sections, src in reversed(routed) if loc[1:2] and loc[1] in sections[str(loc[0])]),
                          routed[0][1])
            raise ConfigError(f"{source}: {describe_error(exc)}") from None

    def flat(self) -> dict[str, Any]:
        """The training stages' options as the flat key/value mapping a YAML file holds.

        This is what a training run records in its metadata and derives its run id from;
        the ``predict`` and ``evaluate`` sections do not change what is trained, so they
        are not part of it.
        """
        out: dict[str, Any] = {}
        for name in TRAINING_SECTIONS:
            out.update(getattr(self, name).model_dump(mode="json"))
        return out


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ImgflowConfig:
    """Read a YAML config file (optional) and apply command-line overrides.

    Args:
        path: YAML file with flat keys (and optional ``<stage>:`` mappings), or None for the defaults.
        overrides: option values given on the command line, flat or as ``{stage: {key: value}}``;
            ``None`` values are ignored. They win over the file.

    Raises:
        ConfigError: unreadable file, not a mapping, unknown key or bad value.
    """
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, found {type(loaded).__name__}")
        layers.append((loaded, str(path)))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for section in _SECTIONS:
        if isinstance(given.get(section), dict):
            given[section] = {k: v for k, v in given[section].items() if v is not None}
    layers.append((given, "options"))
    return ImgflowConfig._from_layers(layers)
