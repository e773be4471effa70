"""Model directories, their metadata, and the champion pointer of a workdir.

Layout::

    <workdir>/models/<run_id>/model.keras, metadata.json, history.csv, diagnosis.json, ...
    <workdir>/champion.json   {"run_id", "model_dir", "promoted", "val_accuracy"}

A run id is derived from the dataset fingerprint and the configuration, so a retried or
re-launched run lands in the same directory and resumes there instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgflow.tasks.atomic import read_json, write_json
from imgflow.tasks.records import METADATA_FILE, Manifest, check_metadata, read_model_metadata
from imgflow.tasks.errors import UsageError

MODELS_DIR = "models"
CHAMPION_FILE = "champion.json"
MODEL_FILE = "model.keras"

# Config keys that do not change what a run trains (so they do not change the run id).
_RUN_ID_IGNORED_KEYS = frozenset({
    "dask_address", "workers", "promotion_tolerance", "min_class_images_for_recall_gate", "csv_neutralise",
    "unknown_rate",
})
#: a class needs this many validation images before a recall of 0 on it blocks promotion
MIN_CLASS_IMAGES_FOR_RECALL_GATE = 10

# The model this process has just trained and saved, under its file's identity (path,
# inode, mtime, size): the same run's novelty and evaluation steps take it from here
# instead of reading the file back (one slot; see hand_over_saved_model).
_saved_model: dict[tuple[str, int, int, int], Any] = {}


class RegistryError(UsageError, ValueError):
    """A model directory or champion pointer that cannot be used."""


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_id_for(fingerprint: str, config: dict[str, Any], model_name: str = "model") -> str:
    """A deterministic run id for (dataset fingerprint, config): ``<model>-<12 hex digits>``.

    The same data and the same configuration always give the same id, so a retried or
    re-launched training finds its own backup and resumes.
    """
    relevant = {k: v for k, v in sorted(config.items()) if k not in _RUN_ID_IGNORED_KEYS}
    digest = hashlib.sha256(json.dumps([fingerprint, relevant], sort_keys=True, default=str).encode()).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_")[:24] or "model"
    return f"{slug}-{digest[:12]}"


def is_complete(model_dir: Path) -> bool:
    """Whether a model directory holds a finished run: model saved, evaluated, promotion decided."""
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_FILE).is_file() or not (model_dir / METADATA_FILE).is_file():
        return False
    try:
        return read_model_metadata(model_dir).promotion is not None
    except RegistryError:
        return False


def allocate_run_dir(workdir: Path, base_id: str, force: bool = False) -> tuple[str, Path, str]:
    """Choose the directory of a run with id ``base_id`` (attempts are ``base_id``, ``base_id-2``, ...).

    The latest attempt is resumed when it did not finish; when it finished it is reused
    (``"done"``), unless ``force`` asks for a fresh attempt.

    Returns:
        (run_id, model_dir, state) where state is ``"new"``, ``"resume"`` or ``"done"``.
    """
    root = Path(workdir) / MODELS_DIR
    attempt = 1
    while (root / _attempt_id(base_id, attempt + 1)).exists():
        attempt += 1
    run_id = _attempt_id(base_id, attempt)
    model_dir = root / run_id
    if not model_dir.exists():
        return run_id, model_dir, "new"
    if not is_complete(model_dir):
        return run_id, model_dir, "resume"
    if not force:
        return run_id, model_dir, "done"
    run_id = _attempt_id(base_id, attempt + 1)
    return run_id, root / run_id, "new"


def _attempt_id(base_id: str, attempt: int) -> str:
    return base_id if attempt == 1 else f"{base_id}-{attempt}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model depends on (for metadata.json)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "numpy", "imgflow"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return versions


def write_metadata(model_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata.json`` atomically, after checking it as a :class:`ModelMetadata`.

    Raises:
        RegistryError: a required key is missing or a field has the wrong type.
    """
    path = Path(model_dir) / METADATA_FILE
    check_metadata(metadata, path)
    return write_json(path, metadata)


def read_metadata(model_dir: Path) -> dict[str, Any]:
    """Read ``metadata.json`` of a model directory as a dict (defaults such as ``aspect`` filled in).

    A thin wrapper of :func:`imgflow.tasks.records.read_model_metadata`, the one reader.

    Raises:
        RegistryError: no metadata file, not a JSON object, or a bad field (named in the message).
    """
    return read_model_metadata(model_dir).to_dict()


# Keys of the train summary (``train_summary.json``) that metadata.json carries over when present.
_SUMMARY_KEYS = (
    "aspect", "background", "best_epoch", "best_value", "epochs_run", "epochs_planned", "stopped_early",
    "stop_reason", "monitor", "outcome", "learning_rate", "device_plan", "resumed", "lr_finder", "fine_tune",
)
# Keys of the manifest that metadata.json carries over when the train summary lacks them.
_MANIFEST_KEYS = ("background",)


def build_metadata(
    run_id: str,
    summary: dict[str, Any],
    manifest: Manifest,
    manifest_path: Path,
    config: dict[str, Any],
    metrics: dict[str, Any],
    data_dir: Path,
    val_dir: Path | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metadata.json`` record of a trained run (the one metadata builder).

    Args:
        run_id: the run's id.
        summary: the train summary (``class_names``, ``image_size``, ``diagnosis``, fit figures).
        manifest: the manifest of the shards it was trained on (fingerprints, aspect).
        manifest_path: where that manifest is.
        config: the flat configuration of the run.
        metrics: the metrics to record (validation accuracy ...).
        data_dir: the training data folder.
        val_dir: the separate validation folder, if any.
        previous: the metadata this run already has (a resumed run keeps its ``created`` time).

    Returns:
        The checked metadata as a dict, in the key order of the contract.

    Raises:
        RegistryError: a field has the wrong type.
    """
    previous = previous or {}
    record: dict[str, Any] = {
        "run_id": run_id,
        "class_names": list(summary["class_names"]),
        "image_size": int(summary["image_size"]),
        "aspect": summary.get("aspect", manifest.aspect),
        "metrics": metrics,
        "fingerprint": manifest.fingerprint,
        "data_fingerprint": manifest.data_fingerprint,
        "config": config,
        "versions": library_versions(),
        "created": previous.get("created") or now_iso(),
        "healthy": bool((summary.get("diagnosis") or {}).get("healthy")),
        "data_dir": str(Path(data_dir).resolve()),
        "val_dir": str(Path(val_dir).resolve()) if val_dir else None,
        "manifest": str(Path(manifest_path).resolve()),
    }
    record.update({key: summary[key] for key in _SUMMARY_KEYS if key in summary and key not in record})
    # how the shards were made, when the train summary does not say (the background of transparent images)
    record.update({k: v for k, v in (manifest.model_extra or {}).items() if k in _MANIFEST_KEYS and k not in record})
    record.setdefault("resumed", False)
    check_metadata(record, f"{METADATA_FILE} of run {run_id}")
    return record


def read_champion(workdir: Path) -> dict[str, Any] | None:
    """The champion pointer of ``workdir``, or None when nothing was promoted yet."""
    path = Path(workdir) / CHAMPION_FILE
    if not path.is_file():
        return None
    return read_json(path)


def resolve_model_dir(model: str | Path, workdir: Path | str = Path("imgflow-work")) -> Path:
    """Resolve MODEL (``"champion"`` or a model directory path) to a model directory.

    A run id of ``<workdir>/models`` is accepted too.

    Raises:
        RegistryError: no champion in ``workdir``, or the path is not a model directory.
    """
    workdir = Path(workdir)
    if str(model) == "champion":
        pointer = read_champion(workdir)
        if pointer is None:
            raise RegistryError(
                f"champion: no model was promoted in workdir {workdir} ({workdir / CHAMPION_FILE} is missing); "
                "run `imgflow train` first or pass a model directory"
            )
        candidate = Path(pointer["model_dir"])
        if not candidate.is_absolute():
            candidate = workdir / candidate
    else:
        candidate = Path(model)
        if not candidate.exists() and (workdir / MODELS_DIR / str(model)).exists():
            candidate = workdir / MODELS_DIR / str(model)
    if not (candidate / MODEL_FILE).is_file():
        raise RegistryError(f"{candidate}: expected a model directory holding {MODEL_FILE}, found none")
    return candidate.resolve()


def _file_identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size


def hand_over_saved_model(path: Path | str, model: Any) -> None:
    """Let this process's next loads of ``path`` return ``model``, which was just saved there.

    The file stays the truth: once it is replaced or changed, loads read it again. One
    model at a time; :func:`forget_saved_model` drops it.
    """
    _saved_model.clear()
    identity = _file_identity(Path(path))
    if identity is not None:
        _saved_model[identity] = model


def forget_saved_model() -> None:
    """Drop the model of :func:`hand_over_saved_model` (the run that trained it is over)."""
    _saved_model.clear()


def load_model_dir(path: Path | str) -> tuple[Any, dict[str, Any]]:
    """Load ``model.keras`` (safe mode) and ``metadata.json`` of a model directory.

    A model this process has just trained and saved there (:func:`hand_over_saved_model`)
    is returned as it is, without reading the file back.

    Returns:
        (keras.Model, metadata dict).
    """
    import keras

    path = Path(path)
    metadata = read_metadata(path)
    identity = _file_identity(path / MODEL_FILE)
    handed_over = _saved_model.get(identity) if identity else None  # one read: a concurrent forget cannot break it
    if handed_over is not None:
        return handed_over, metadata
    try:
        model = keras.saving.load_model(path / MODEL_FILE, compile=False, safe_mode=True)
    except (TypeError, ValueError, AttributeError, ImportError, KeyError, OSError) as exc:
        # a hostile or foreign model.keras: unknown custom classes and Lambda layers are refused
        chain, link = [], exc
        while link is not None and len(chain) < 8:  # Keras wraps the real cause in a generic TypeError
            chain.append(" ".join(str(link).split()))
            link = link.__cause__ or link.__context__
        named = re.search(r"Could not locate (?:class|function) '[^']+'", " ".join(chain))
        cause = named.group(0) if named else chain[-1][:300]
        raise RegistryError(
            f"MODEL {path / MODEL_FILE} cannot be loaded safely: {cause}. imgflow loads models in Keras safe mode "
            "(no Lambda layers, no unknown custom classes): use a model trained by imgflow, or register the custom "
            "class with keras.saving.register_keras_serializable in a module you trust"
        ) from exc
    return model, metadata


def champion_dir(workdir: Path) -> Path | None:
    """The champion's model directory in ``workdir``; None when none is promoted or its model is gone."""
    pointer = read_champion(Path(workdir))
    if not pointer or "model_dir" not in pointer:
        return None
    path = Path(pointer["model_dir"])
    if not path.is_absolute():
        path = Path(workdir) / path
    return path if (path / MODEL_FILE).is_file() else None


def compare_models(
    candidate: dict[str, Any],
    champion: dict[str, Any],
    candidate_run_id: str,
    champion_run_id: str,
) -> dict[str, Any]:
    """Side-by-side metrics of a candidate and the champion scored on the same images; pure.

    Args:
        candidate: ``compute_metrics`` output of the candidate.
        champion: ``compute_metrics`` output of the champion on the same images.
        candidate_run_id: shown in the table header.
        champion_run_id: shown in the table header.

    Returns:
        {"candidate_run_id", "champion_run_id", "rows": [{"metric", "candidate",
        "champion", "difference"}]}; :func:`promotion_decision` adds the decision.
    """
    def pick(m: dict[str, Any]) -> dict[str, float]:
        values = {
            "accuracy": m["accuracy"],
            "loss": m["loss"],
            "macro F1": m["macro"]["f1"],
            "weighted F1": m["weighted"]["f1"],
            "calibration error": m["expected_calibration_error"],
        }
        if "top_k_accuracy" in m:
            values[f"top-{m['top_k']} accuracy"] = m["top_k_accuracy"]
        for name in m["class_names"]:
            values[f"recall {name}"] = m["per_class"][name]["recall"]
        return values

    a, b = pick(candidate), pick(champion)
    rows = [
        {"metric": key, "candidate": round(a[key], 4), "champion": round(b[key], 4), "difference": round(a[key] - b[key], 4)}
        for key in a if key in b
    ]
    return {"candidate_run_id": candidate_run_id, "champion_run_id": champion_run_id, "rows": rows}


def _recall_gate(
    candidate_metrics: dict[str, Any] | None,
    champion_metrics: dict[str, Any] | None,
    champion: dict[str, Any],
    min_class_images: int,
) -> str | None:
    """Why a lopsided candidate may not replace the champion (a class it never recognises), or None."""
    per_class = (candidate_metrics or {}).get("per_class") or {}
    if champion_metrics is not None:
        champion_recall = {n: v.get("recall") for n, v in (champion_metrics.get("per_class") or {}).items()}
    else:  # same validation set: the champion's stored recalls count
        champion_recall = dict((champion.get("metrics") or {}).get("per_class_recall") or {})
    for name, row in per_class.items():
        support, recall, theirs = int(row.get("support", 0)), row.get("recall"), champion_recall.get(name)
        if support >= min_class_images and recall == 0 and theirs:
            return (
                f"rejected: the candidate never recognises class {name!r} (recall 0 on {support} validation "
                f"images) while champion {champion.get('run_id')} does (recall {theirs:.4f}); a model blind to a "
                f"class is not promoted over one that sees it, whatever the tolerance "
                f"(min_class_images_for_recall_gate {min_class_images})"
            )
    return None


def promotion_decision(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    tolerance: float = 0.01,
    champion_accuracy_on_candidate_val: float | None = None,
    *,
    candidate_metrics: dict[str, Any] | None = None,
    champion_metrics: dict[str, Any] | None = None,
    min_class_images_for_recall_gate: int = MIN_CLASS_IMAGES_FOR_RECALL_GATE,
) -> tuple[bool, str]:
    """Decide whether a finished run becomes champion; pure. The one promotion rule of imgflow.

    A run is promoted only when it is healthy, every validation image got finite model
    outputs, it does not miss a class (recall 0 on a class with at least
    ``min_class_images_for_recall_gate`` validation images) that the champion
    recognises, and its val accuracy is not worse than the champion's, on the same
    validation set, by more than ``tolerance``.

    Args:
        candidate: the run's metadata (``healthy``, ``metrics.val_accuracy``, ``fingerprint``,
            ``class_names``, ``run_id``).
        champion: the current champion's metadata, or None.
        tolerance: how much lower (absolute accuracy) the candidate may score.
        champion_accuracy_on_candidate_val: the champion's accuracy measured on the
            candidate's validation set, when the stored figure was measured on another set.
        candidate_metrics: the candidate's evaluation (``compute_metrics``: ``per_class``
            recall and support, ``non_finite_outputs``, ``accuracy``), when available.
        champion_metrics: the champion's evaluation on the same images; its accuracy
            is the reference, and its recalls feed the recall gate.
        min_class_images_for_recall_gate: classes with fewer validation images are not gated.

    Returns:
        (promote, reason) where reason is a sentence starting ``promoted`` or ``rejected``.
    """
    acc = candidate.get("metrics", {}).get("val_accuracy")
    if candidate_metrics is not None and candidate_metrics.get("accuracy") is not None:
        acc = candidate_metrics["accuracy"]
    if champion_metrics is not None and champion_metrics.get("accuracy") is not None:
        champion_accuracy_on_candidate_val = champion_metrics["accuracy"]
    if not candidate.get("healthy", False):
        return False, "rejected: the training diagnosis is not healthy (see diagnosis.json for the critical findings)"
    if acc is None:
        return False, "rejected: the run has no validation accuracy to compare"
    broken = int((candidate_metrics or {}).get("non_finite_outputs") or 0)
    if broken:
        return False, (
            f"rejected: the model gave NaN or infinite outputs for {broken} of {candidate_metrics.get('count')} "
            "validation images (a diverged training: lower the learning rate, scale the inputs)"
        )
    if champion is None:
        return True, f"promoted: first healthy model in this workdir (val accuracy {acc:.4f})"
    if champion.get("run_id") == candidate.get("run_id"):
        return True, f"promoted: this run is already the champion (val accuracy {acc:.4f})"
    if list(champion.get("class_names", [])) != list(candidate.get("class_names", [])):
        return True, (
            f"promoted: the class list changed ({champion.get('class_names')} -> {candidate.get('class_names')}), "
            f"so the old champion does not compete (val accuracy {acc:.4f})"
        )
    same_set = champion.get("fingerprint") == candidate.get("fingerprint")
    if champion_metrics is not None or same_set:
        lopsided = _recall_gate(candidate_metrics, champion_metrics, champion, min_class_images_for_recall_gate)
        if lopsided:
            return False, lopsided
    if same_set and champion_metrics is None:
        reference = champion.get("metrics", {}).get("val_accuracy")
    else:
        reference = champion_accuracy_on_candidate_val
    if reference is None:
        return True, f"promoted: the champion could not be scored on this validation set (val accuracy {acc:.4f})"
    if acc + tolerance < reference:
        return False, (
            f"rejected: val accuracy {acc:.4f} is worse than champion {champion.get('run_id')} "
            f"({reference:.4f}) by more than the tolerance {tolerance}"
        )
    return True, (
        f"promoted: val accuracy {acc:.4f} vs champion {champion.get('run_id')} {reference:.4f} "
        f"(tolerance {tolerance})"
    )


def decide(
    candidate: dict[str, Any],
    candidate_metrics: dict[str, Any],
    champion: dict[str, Any] | None = None,
    champion_metrics: dict[str, Any] | None = None,
    tolerance: float = 0.01,
    min_class_images_for_recall_gate: int = MIN_CLASS_IMAGES_FOR_RECALL_GATE,
) -> dict[str, Any]:
    """The promotion decision as the record the evaluation summary carries and ``promote_task`` acts on.

    Args:
        candidate: the candidate's metadata.
        candidate_metrics: its evaluation on the validation images.
        champion: the champion's metadata, or None.
        champion_metrics: the champion's evaluation on the same images, or None.
        tolerance: see :func:`promotion_decision`.
        min_class_images_for_recall_gate: see :func:`promotion_decision`.

    Returns:
        {"promote": bool, "decision": "promote"|"keep champion"|"reject", "reason",
        "champion_run_id" (None without a champion), "tolerance"}.
    """
    promote_it, reason = promotion_decision(
        candidate, champion, tolerance,
        candidate_metrics=candidate_metrics, champion_metrics=champion_metrics,
        min_class_images_for_recall_gate=min_class_images_for_recall_gate,
    )
    if champion_metrics is not None:
        reason += f"; both scored on the same {candidate_metrics.get('count')} images"
    return {
        "promote": promote_it,
        "decision": "promote" if promote_it else ("keep champion" if champion else "reject"),
        "reason": reason,
        "champion_run_id": champion.get("run_id") if champion else None,
        "tolerance": tolerance,
    }


def promote(workdir: Path, model_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Point ``<workdir>/champion.json`` at ``model_dir`` (atomic rename)."""
    pointer = {
        "run_id": metadata["run_id"],
        "model_dir": str(Path(model_dir).resolve()),
        "promoted": now_iso(),
        "val_accuracy": metadata.get("metrics", {}).get("val_accuracy"),
    }
    write_json(Path(workdir) / CHAMPION_FILE, pointer)
    return pointer
