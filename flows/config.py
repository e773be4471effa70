"""Every imgflow parameter, as pydantic models the flows take directly.

A YAML config file holds the same keys as the command-line options (``image_size``,
``epochs``, ``learning_rate`` ...), flat, at the top level. Command-line options
override the file; unknown keys are an error that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_WORKDIR = Path("imgflow-work")


class ConfigError(ValueError):
    """A config file or option value that cannot be used (CLI exit code 2)."""


class ValidationOptions(BaseModel):
    """Thresholds of the dataset checks."""

    model_config = ConfigDict(extra="forbid")

    min_image_side: int = Field(16, ge=1, description="images smaller than this (pixels) are reported as tiny")
    imbalance_ratio: float = Field(3.0, gt=1, description="max/min class count above this is reported")
    size_outlier_factor: float = Field(4.0, gt=1, description="side this many times off the median is an outlier")
    aspect_outlier_factor: float = Field(2.0, gt=1, description="aspect ratio this many times off the median is an outlier")
    near_duplicates: bool = Field(True, description="report near-duplicates found by a perceptual hash")
    workers: int | None = Field(None, ge=1, description="parallel decoders (default: all cores)")


class PreprocessOptions(BaseModel):
    """How images become TFRecord shards."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(128, ge=8, le=2048)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42
    aspect: Literal["squash", "crop", "pad"] = "squash"
    encoding: Literal["jpeg", "png", "raw"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    shard_size_mb: float = Field(128.0, gt=0)
    dask_address: str | None = None


class TrainOptions(BaseModel):
    """Model, optimiser and fit settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="built-in name or package.module:function")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    schedule: Literal["none", "cosine", "plateau"] = "none"
    class_weights: Literal["auto", "on", "off"] = "auto"
    early_stopping_patience: int = Field(5, ge=1)
    augment: bool = True
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    architecture: dict[str, Any] = Field(default_factory=dict, description="options for the chosen model builder")
    weights: str | None = Field(None, description="local weights file for keras.applications backbones")
    seed: int = 42
    promotion_tolerance: float = Field(0.01, ge=0)


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
