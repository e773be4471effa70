"""``imgflow doctor``'s work: preflight plus a short probe training of a model on real data.

The probe training is an ordinary imgflow training run, short: the model is compiled,
checked and fitted by :func:`imgflow.tasks.training.fit_model` (same optimizer, callbacks,
class weights, doctor monitor and diagnosis as ``imgflow train``), into the doctor's own
output folder. Only the overfit-one-batch check is extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgflow.tasks.doctor.findings import _number, diagnose, findings_markdown, write_diagnosis
from imgflow.tasks.doctor.probe import probe_batch


def run_doctor(
    model: Any,
    train_data: Any,
    val_data: Any | None,
    class_counts: Sequence[int],
    out_dir: Path | str,
    options: Any,
    overfit_steps: int = 20,
    probe_size: int = 256,
    class_names: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Preflight (with the overfit-one-batch check) plus a short probe training.

    Training is skipped when preflight finds a critical problem (it would only confirm it).

    Args:
        model: a built Keras model taking raw images (compiled by the training set-up unless
            its builder compiled it).
        train_data: batched ``(images, labels)`` training dataset.
        val_data: batched validation dataset (probe batch and val loss), or None.
        class_counts: training images per class in label order.
        out_dir: the probe run's folder (history, curves, diagnosis).
        options: ``TrainOptions``; ``epochs`` is the number of probe epochs.
        overfit_steps: steps of the overfit-one-batch check (0 to skip).
        probe_size: images in the fixed probe batch.
        class_names: class names in label order, for the advice.
        log: where progress lines go.

    Returns:
        The diagnosis (``healthy``, ``findings``) plus ``"epochs_run"``, ``"history"``
        (metric name -> values per epoch) and ``"lr_finder"`` (the range test's record when
        ``options.learning_rate`` is ``auto``, else None).
    """
    from imgflow.tasks.training import fit_model, read_history

    probe = probe_batch(val_data if val_data is not None else train_data, max_images=probe_size)
    fit = fit_model(model, train_data, val_data, Path(out_dir), options, list(class_counts), probe=probe, log=log,
                    overfit_steps=overfit_steps, class_names=list(class_names or []))
    rows = read_history(Path(out_dir))
    history = {k: [_number(r[k]) for r in rows] for k in (rows[0] if rows else {}) if k not in ("epoch", "seconds")}
    return {**diagnose(fit["diagnosis"]["findings"]), "epochs_run": fit["epochs_run"], "history": history,
            "lr_finder": fit.get("lr_finder")}


def check_model(
    model_ref: str,
    manifest_path: Path | str,
    out_dir: Path | str,
    options: Any = None,
    workdir: Path | str = Path("imgflow-work"),
    epochs: int = 3,
    overfit_steps: int = 20,
    probe_size: int = 256,
) -> dict[str, Any]:
    """Build (or load) a model, run preflight and a short probe training on preprocessed data.

    Args:
        model_ref: a built-in model name, ``package.module:function``, a model directory
            or ``champion``.
        manifest_path: ``manifest.json`` of the preprocessed data.
        out_dir: where ``diagnosis.json``, ``diagnosis.md`` and the probe run's history go.
        options: ``imgflow.tasks.options.TrainOptions`` (defaults when None): optimizer,
            learning rate, batch size, architecture, seed.
        workdir: workdir holding the champion (for ``champion``).
        epochs: probe training epochs.
        overfit_steps: steps of the overfit-one-batch check (0 to skip).
        probe_size: images in the fixed probe batch.

    Returns:
        ``{"healthy", "findings", "epochs_run", "history", "model", "diagnosis_path",
        "markdown_path", "lr_finder"}`` (``lr_finder``: with ``learning_rate: auto``, the range
        test's ``suggested`` rate and ``plot``, ``lr_finder.png`` in ``out_dir``; else None).
    """
    import keras

    from imgflow.tasks import tfrecords
    from imgflow.tasks.atomic import write_text
    from imgflow.tasks.records import read_manifest
    from imgflow.tasks.options import TrainOptions

    options = (options or TrainOptions()).model_copy(update={"epochs": int(epochs)})
    if "schedule" not in options.model_fields_set:
        # a few probe epochs at the configured rate: the run's warm-up and decay, squeezed
        # into them, would leave the rate near its floor and hide what the model can learn
        options = options.model_copy(update={"schedule": "none"})
    manifest = read_manifest(manifest_path).to_dict()
    class_names = list(manifest["class_names"])
    image_size = int(manifest["image_size"])
    keras.utils.set_random_seed(options.seed)
    train_ds = tfrecords.make_dataset(manifest_path, "train", options.batch_size, training=True, seed=options.seed)
    val_count = int(manifest["splits"].get("val", {}).get("count", 0))
    val_ds = (tfrecords.make_dataset(manifest_path, "val", options.batch_size, training=False, seed=options.seed)
              if val_count else None)
    per_class = manifest["splits"]["train"].get("per_class", {})
    class_counts = [int(per_class.get(name, 0)) for name in class_names]
    steps = max(1, -(-int(manifest["splits"]["train"].get("count", 0)) // options.batch_size))
    model = _load_or_build(model_ref, image_size, len(class_names), options, Path(workdir), steps)
    out_dir = Path(out_dir)
    result = run_doctor(model, train_ds, val_ds, class_counts, out_dir, options, overfit_steps=overfit_steps,
                        probe_size=probe_size, class_names=class_names)
    diagnosis = {"healthy": result["healthy"], "findings": result["findings"]}
    diagnosis_path = write_diagnosis(out_dir / "diagnosis.json", diagnosis)
    markdown_path = write_text(out_dir / "diagnosis.md", findings_markdown(diagnosis))
    return {**diagnosis, "epochs_run": result["epochs_run"], "history": result["history"], "model": model_ref,
            "diagnosis_path": str(diagnosis_path), "markdown_path": str(markdown_path),
            "lr_finder": result.get("lr_finder")}


def _load_or_build(model_ref: str, image_size: int, num_classes: int, options: Any, workdir: Path, steps: int) -> Any:
    """A model directory (or ``champion``) is loaded; anything else goes to the model builders."""
    if model_ref == "champion" or Path(model_ref).is_dir():
        from imgflow.tasks.registry import load_model_dir, resolve_model_dir

        model, metadata = load_model_dir(resolve_model_dir(model_ref, workdir))
        size = metadata.get("image_size")
        if size is not None and int(size) != image_size:
            raise ValueError(
                f"model {model_ref}: it takes {size} px images but the data was preprocessed at {image_size} px; "
                f"run the doctor with --image-size {size}"
            )
        return model
    from imgflow.tasks.models import build_model

    return build_model(model_ref, image_size, num_classes, options.architecture, options.augment,
                       options.weights, options.seed, steps_per_epoch=steps)
