"""Typed records: the TFRecord manifest, the model metadata and the evaluation summary.

Each record is a pydantic model with ONE validating reader, and owns the defaults of its
fields (``aspect`` is ``"squash"`` when a file does not say, here and nowhere else).
Records still cross task boundaries as JSON-able dicts (:meth:`Record.to_dict`), and the
files on disk keep the keys of the DESIGN contract. Unknown keys are kept (``extra =
"allow"``), so a file written by a newer imgflow still reads with an older one.

Only pydantic is imported here: flows and the CLI may import this module cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from pydantic_core import to_jsonable_python

from imgflow.tasks.errors import UsageError

MANIFEST_NAME = "manifest.json"
METADATA_FILE = "metadata.json"

Aspect = Literal["squash", "crop", "pad"]
Encoding = Literal["jpeg", "png", "raw"]
DEFAULT_ASPECT: Aspect = "squash"

_R = TypeVar("_R", bound="Record")


class ManifestError(UsageError, ValueError):
    """A ``manifest.json`` that is not a usable TFRecord manifest (re-run preprocessing)."""


class Record(BaseModel):
    """Base of the records: unknown keys are kept, dicts out via :meth:`to_dict`."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict[str, Any]:
        """The record as the JSON-able dict tasks pass and files hold.

        Defaults are filled in (``aspect``, a split's ``per_class``), nested records too;
        a key the source did not have whose default is ``None`` stays out, so a reader sees
        the keys the writer wrote and no invented ``null``. Unknown keys follow.
        """
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if name in self.model_fields_set or field.get_default(call_default_factory=True) is not None:
                out[name] = _plain(getattr(self, name))
        out.update((key, _plain(value)) for key, value in (self.model_extra or {}).items())
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return to_jsonable_python(value)


def describe_error(exc: ValidationError) -> str:
    """The first problem of a validation error as ``'field.path': message, found value``."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "missing":
        return f"{where!r}: missing"
    return f"{where!r}: {first['msg'].lower()}, found {first.get('input')!r}"


def _load_json_object(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected the {what} as a JSON object, found {type(data).__name__}")
    return data


def _validate(record: type[_R], data: dict[str, Any], path: Path | str, error: type[Exception], fix: str) -> _R:
    try:
        return record.model_validate(data)
    except ValidationError as exc:
        raise error(f"{path}: {describe_error(exc)}; {fix}") from None


# ---------------------------------------------------------------------------- manifest


class ShardRecord(Record):
    """One shard file of a split."""

    file: StrictStr
    records: int = Field(ge=0)
    bytes: int | None = Field(None, ge=0)


class SplitRecord(Record):
    """One split (``train`` or ``val``): image count, per-class counts, shards."""

    count: int = Field(0, ge=0)
    per_class: dict[str, int] = Field(default_factory=dict)
    shards: list[ShardRecord] = Field(default_factory=list)


class Manifest(Record):
    """``manifest.json`` beside the TFRecord shards (DESIGN: TFRecord shards)."""

    class_names: list[StrictStr] = Field(min_length=1)
    image_size: StrictInt = Field(ge=1)
    aspect: Aspect = DEFAULT_ASPECT
    encoding: Encoding
    jpeg_quality: int | None = None
    fingerprint: str | None = None
    data_fingerprint: str | None = None
    code_version: str | None = None
    created: str | None = None
    data_dir: str | None = None
    val_dir: str | None = None
    splits: dict[str, SplitRecord]

    def split(self, name: str) -> SplitRecord:
        """The split ``name``, empty when the manifest has none by that name."""
        return self.splits.get(name) or SplitRecord()


def read_manifest(path: Path | str) -> Manifest:
    """Read and check a ``manifest.json`` (the one manifest reader).

    Args:
        path: the manifest file.

    Raises:
        FileNotFoundError: no manifest (preprocessing did not finish: run ``imgflow preprocess``).
        ManifestError: not JSON, not an object, a missing key or a value of the wrong type;
            the message names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TFRecord manifest here; run `imgflow preprocess` first")
    data = _load_json_object(path, ManifestError, "TFRecord manifest")
    return _validate(Manifest, data, path, ManifestError, "re-run `imgflow preprocess` to rewrite it")


# ---------------------------------------------------------------------------- model metadata


class ModelMetadata(Record):
    """``metadata.json`` of a model directory (DESIGN: model directory, model metadata).

    Only ``class_names`` and ``image_size`` are needed to use a model; the rest is written
    by the training pipeline (:func:`imgflow.tasks.registry.build_metadata`).
    """

    run_id: str | None = None
    class_names: list[StrictStr] = Field(min_length=1)
    image_size: StrictInt = Field(ge=1)
    aspect: Aspect = DEFAULT_ASPECT
    metrics: dict[str, Any] | None = None
    fingerprint: str | None = None
    data_fingerprint: str | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    created: str | None = None
    healthy: bool | None = None
    data_dir: str | None = None
    val_dir: str | None = None
    manifest: str | None = None
    device_plan: dict[str, Any] | None = None
    resumed: bool | None = None
    evaluation: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None


# What a finished training run must record (checked when metadata is written).
REQUIRED_METADATA_KEYS = (
    "run_id", "class_names", "image_size", "metrics", "fingerprint", "config", "versions", "created", "healthy",
)


def read_model_metadata(model_dir: Path | str) -> ModelMetadata:
    """Read and check ``metadata.json`` of a model directory (the one metadata reader).

    Args:
        model_dir: the model directory.

    Raises:
        imgflow.tasks.registry.RegistryError: no metadata file, not a JSON object, or a bad
            field (``class_names`` not a non-empty list of strings, ``image_size`` not a
            positive integer, ...); the message names the file and the field.
    """
    from imgflow.tasks.registry import RegistryError  # registry imports this module

    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise RegistryError(f"{model_dir}: expected a model directory with {METADATA_FILE}, found none")
    data = _load_json_object(path, RegistryError, "model metadata")
    return _validate(ModelMetadata, data, path, RegistryError, "the model directory was not written by imgflow "
                     "or was edited; retrain it or fix the field")


def check_metadata(metadata: dict[str, Any], where: Path | str) -> ModelMetadata:
    """Check a metadata dict before it is written: required keys present, fields well typed.

    Raises:
        imgflow.tasks.registry.RegistryError: a required key is missing or a field is bad.
    """
    from imgflow.tasks.registry import RegistryError

    missing = [key for key in REQUIRED_METADATA_KEYS if key not in metadata]
    if missing:
        raise RegistryError(f"{where}: missing key(s) {', '.join(missing)}")
    return _validate(ModelMetadata, metadata, where, RegistryError, "this is a bug in the writer")


# ---------------------------------------------------------------------------- evaluation summary


class EvaluationSummary(Record):
    """The small record an evaluation task hands back (the full metrics live in metrics.json)."""

    out_dir: str
    accuracy: float
    count: StrictInt = Field(ge=0)
    skipped: StrictInt = Field(0, ge=0)
    loss: float | None = None
    report_html: str | None = None
    report_md: str | None = None
    metrics_json: str | None = None
    per_class: dict[str, dict[str, Any]] | None = None
    class_names: list[str] | None = None
    comparison: dict[str, Any] | None = None
    non_finite_outputs: StrictInt = Field(0, ge=0)
    promotion: dict[str, Any] | None = None

    @classmethod
    def from_result(cls, result: dict[str, Any], keep: tuple[str, ...] = ()) -> "EvaluationSummary":
        """The summary of a full evaluation result: the typed fields plus the ``keep`` keys.

        Raises:
            ValueError: the result lacks ``out_dir``, ``accuracy`` or ``count``, or has a bad value.
        """
        wanted = set(cls.model_fields) | set(keep)
        try:
            return cls.model_validate({k: v for k, v in result.items() if k in wanted})
        except ValidationError as exc:
            raise ValueError(f"evaluation result: {describe_error(exc)}") from None
