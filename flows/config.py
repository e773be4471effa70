"""Every imgflow parameter, as pydantic models the flows take directly.

A YAML config file holds the same keys as the command-line options (``image_size``,
``epochs``, ``learning_rate`` ...), flat, at the top level. Command-line options
override the file; unknown keys are an error that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgflow.tasks.options import PreprocessOptions, TrainOptions, ValidationOptions
from imgflow.tasks.errors import UsageError

DEFAULT_WORKDIR = Path("imgflow-work")


class ConfigError(UsageError, ValueError):
    """A config file or option value that cannot be used (CLI exit code 2)."""


_SECTIONS: dict[str, type[BaseModel]] = {
    "validation": ValidationOptions,
    "preprocess": PreprocessOptions,
    "train": TrainOptions,
}


class ImgflowConfig(BaseModel):
    """All parameters of one pipeline run, grouped by stage."""

    model_config = ConfigDict(extra="forbid")

    validation: ValidationOptions = Field(default_factory=ValidationOptions)
    preprocess: PreprocessOptions = Field(default_factory=PreprocessOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "options") -> "ImgflowConfig":
        """Build a config from flat keys (``image_size: 64``), routing each to its stage.

        A key that belongs to several stages (``seed``) sets all of them.

        Raises:
            ConfigError: a key no stage knows, or a value of the wrong type.
        """
        routed: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in values.items():
            owners = [name for name, model in _SECTIONS.items() if key in model.model_fields]
            if not owners:
                known = sorted({k for m in _SECTIONS.values() for k in m.model_fields})
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
            for owner in owners:
                routed[owner][key] = value
        try:
            return cls(**routed)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0])
            raise ConfigError(f"{source}: {where}: {first['msg']} (got {first.get('input')!r})") from None

    def flat(self) -> dict[str, Any]:
        """The config as the flat key/value mapping a YAML file holds."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            out.update(getattr(self, name).model_dump(mode="json"))
        return out


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ImgflowConfig:
    """Read a flat YAML config file (optional) and apply command-line overrides.

    Args:
        path: YAML file with flat keys, or None for the defaults.
        overrides: option values given on the command line; ``None`` values are ignored.

    Raises:
        ConfigError: unreadable file, not a mapping, unknown key or bad value.
    """
    values: dict[str, Any] = {}
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
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ImgflowConfig.from_flat(values, source=str(path) if path else "options")
