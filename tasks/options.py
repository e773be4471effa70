"""The options of each stage: validation, preprocessing, training, prediction, evaluation.

Plain pydantic models, so the work in ``tasks/`` can take them without depending on the
Prefect wiring in ``flows/``. ``imgflow.flows.config`` groups them into one ``ImgflowConfig`` and
reads them from YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgflow.tasks.errors import OptionError
from imgflow.tasks.records import DEFAULT_ASPECT, Aspect, describe_error

# `augment: auto` turns augmentation on from this many epochs: on bench/recipe.py (10 epochs,
# 250-1,350 images) it cost 10 points of validation accuracy, because a short run spends its
# epochs learning the augmented variety instead of fitting; longer runs need the regulariser.
AUGMENT_FROM_EPOCHS = 30


class ValidationOptions(BaseModel):
    """Thresholds of the dataset checks."""

    model_config = ConfigDict(extra="forbid")

    min_image_side: int = Field(16, ge=1, description="images smaller than this (pixels) are reported as tiny")
    imbalance_ratio: float = Field(3.0, gt=1, description="max/min class count above this is reported")
    size_outlier_factor: float = Field(4.0, gt=1, description="side this many times off the median is an outlier")
    aspect_outlier_factor: float = Field(2.0, gt=1, description="aspect ratio this many times off the median is an outlier")
    near_duplicates: bool = Field(True, description="report near-duplicates found by a perceptual hash")
    workers: int | None = Field(None, ge=1, description="parallel decoders (default: all cores)")
    shortcuts: bool = Field(True, description="test whether one cheap file property alone predicts the class")
    shortcut_margin: float = Field(
        0.4, gt=0, le=1, description="report a property whose balanced accuracy is at least chance + this"
    )
    shortcut_content_gap: float = Field(
        0.2, ge=0, le=1, description="brightness, border colour, file size must beat their content baseline by this"
    )
    shortcut_min_files: int = Field(10, ge=2, description="files per class a shortcut test needs")
    shortcut_folds: int = Field(5, ge=2, description="cross-validation folds of the shortcut test")
    label_issues: bool = Field(
        False, description="rank training images whose label a quick out-of-fold model confidently disputes"
    )


class PreprocessOptions(BaseModel):
    """How images become TFRecord shards."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(128, ge=8, le=2048)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42
    aspect: Aspect = DEFAULT_ASPECT
    background: str = Field(
        "black", description="colour under transparent pixels: black, white or a hex colour such as #808080"
    )
    encoding: Literal["auto", "jpeg", "png", "raw"] = Field(
        "auto", description="shard image encoding; auto: raw pixels while the records fit 1 GiB, else jpeg")
    jpeg_quality: int = Field(95, ge=1, le=100)
    shard_size_mb: float = Field(128.0, gt=0)
    dask_address: str | None = None

    @field_validator("background")
    @classmethod
    def _known_background(cls, value: str) -> str:
        from imgflow.tasks.images import parse_background

        parse_background(value)  # raises ValueError naming the accepted forms
        return value.strip().lower()


class TrainOptions(BaseModel):
    """Model, optimiser and fit settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="built-in name or package.module:function")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    # AdamW with a warm-up and cosine decay: on bench/recipe.py (10 epochs, 3 seeds) it beat
    # constant-rate Adam by 3-4 points on the stamps and icons and halved the digit errors
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adamw"
    learning_rate: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        None,
        description="the optimizer's rate; unset: the model's recipe rate (2e-3 default model, else 1e-3); "
        "auto: a learning-rate range test picks it (lr_finder.png in the run folder)",
    )
    schedule: Literal["none", "cosine", "plateau"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="linear learning-rate warm-up before the cosine decay, in epochs; "
        "auto: a tenth of the run, at most one epoch")
    # off by default: on bench/recipe.py weighting the imbalanced sets (3x) cost 4.5-5 points
    # of validation accuracy and did not raise the lowest class recall (bench/RESULTS.md)
    class_weights: Literal["auto", "on", "off"] = Field(
        "off", description="weight the loss by inverse class frequency: on, off, or auto (when max/min count > 1.5)"
    )
    monitor: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="the validation metric that picks the kept epoch and stops training early"
    )
    early_stopping_patience: int = Field(5, ge=1)
    augment: bool | Literal["auto"] = Field(
        "auto", description=f"augmentation layers in the model; auto: on from {AUGMENT_FROM_EPOCHS} epochs"
    )
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    architecture: dict[str, Any] = Field(default_factory=dict, description="options for the chosen model builder")
    weights: str | None = Field(
        None, description="pretrained weights of a keras.applications backbone: imagenet (downloaded once into "
        "the Keras cache, ~/.keras/models) or a local weights file; training then fine-tunes in two phases")
    seed: int = 42
    promotion_tolerance: float = Field(0.01, ge=0)
    min_class_images_for_recall_gate: int = Field(
        10, ge=1, description="a candidate with recall 0 on a class with this many validation images is never "
        "promoted over a champion that recognises the class")
    unknown_rate: float = Field(
        0.05, gt=0, lt=1, description="share of validation images flagged unknown: sets the novelty threshold")

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Warm-up steps of the learning-rate schedule for ``steps_per_epoch`` batches an epoch."""
        epochs = min(1.0, self.epochs / 10) if self.warmup_epochs == "auto" else float(self.warmup_epochs)
        return round(steps_per_epoch * epochs)

    @model_validator(mode="after")
    def _resolve_augment(self) -> "TrainOptions":
        if self.augment == "auto":
            self.augment = self.epochs >= AUGMENT_FROM_EPOCHS
        return self


class PredictOptions(BaseModel):
    """How ``imgflow predict`` classifies a folder (the ``predict`` section of the config)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(256, ge=1, description="images per model call")
    chunk_size: int = Field(1024, ge=1, description="target files per chunk task (chunks hold half to twice this)")
    top_k: int | None = Field(None, ge=1, description="also write the k best labels and probabilities per file")
    out: Path | None = Field(None, description="the CSV to write (default: WORKDIR/predictions/<INPUT_DIR name>.csv)")
    dask_address: str | None = Field(None, description="run the chunk tasks on this Dask scheduler")
    csv_neutralise: bool = Field(
        True, description="prefix CSV cells starting with =, +, -, @, tab or CR with ' so spreadsheets do not "
        "run them as formulas; false keeps paths and class names raw")


class EvaluateOptions(BaseModel):
    """How ``imgflow evaluate`` scores a model (the ``evaluate`` section of the config)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, description="images per model call")
    csv_neutralise: bool = Field(
        True, description="prefix CSV cells starting with =, +, -, @, tab or CR with ' so spreadsheets do not "
        "run them as formulas; false keeps paths and class names raw")


_Options = TypeVar("_Options", bound=BaseModel)


def with_overrides(options: _Options, **values: Any) -> _Options:
    """``options`` with the given values on top (``None`` means not given), validated.

    Raises:
        OptionError: a value the option does not accept (a ValueError); the message names the option.
    """
    given = {key: value for key, value in values.items() if value is not None}
    if not given:
        return options
    try:
        return type(options).model_validate({**options.model_dump(), **given})
    except ValidationError as exc:
        raise OptionError(describe_error(exc)) from None
