"""`imgflow doctor`: check a model before a long run (preflight + a short probe training).

``imgflow doctor --label-issues DATA_DIR`` (:func:`label_issues_flow`, and the training
pipeline when the config key ``label_issues`` is true) instead ranks the training images
whose label a quick out-of-fold model disputes (:mod:`imgflow.tasks.label_issues`).

MODEL_OR_BUILDER is a built-in model name, ``package.module:function`` or a model
directory (or ``champion``). The data is validated and preprocessed exactly as for
training (cached shards are reused), then :func:`imgflow.tasks.doctor.check_model` runs the
preflight checks and, unless they find a critical problem, a few probe epochs through the
same fit as training (:func:`imgflow.tasks.training.fit_model`), watched by the
:class:`imgflow.tasks.doctor.DoctorMonitor`. TensorFlow/Keras are imported inside the task.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from imgflow.flows.config import DEFAULT_WORKDIR, ImgflowConfig
from imgflow.flows.gpu_slot import as_gpu_task

DOCTOR_DIR = "doctor"


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name if Path(model).is_dir() else model).strip("_") or "model"


@task(name="doctor-check-model", tags={"gpu"}, cache_policy=NO_CACHE)
def check_model_task(
    model: str, manifest_path: str, out_dir: str, config: ImgflowConfig, workdir: str, epochs: int, overfit_steps: int
) -> dict[str, Any]:
    """Preflight and probe-train one model on the preprocessed data."""
    from imgflow.tasks.doctor import check_model

    return check_model(model, manifest_path, out_dir, config.train, workdir, epochs=epochs, overfit_steps=overfit_steps)


def publish_diagnosis(diagnosis: dict[str, Any], key: str = "training-diagnosis", title: str = "") -> None:
    """Publish a diagnosis as a Prefect markdown artifact (inside a flow or task run)."""
    from imgflow.tasks.doctor import findings_markdown

    create_markdown_artifact(
        key=key,
        markdown=(f"# {title}\n\n" if title else "") + findings_markdown(diagnosis),
        description="healthy" if diagnosis.get("healthy") else "unhealthy: " + ", ".join(
            f["code"] for f in diagnosis.get("findings", []) if f.get("severity") == "critical"
        ),
    )


@flow(name="doctor", log_prints=True)
def doctor_flow(
    model: str,
    data_dir: Path,
    workdir: Path = DEFAULT_WORKDIR,
    config: ImgflowConfig | None = None,
    epochs: int = 3,
    overfit_steps: int = 20,
) -> dict[str, Any]:
    """Diagnose MODEL_OR_BUILDER on DATA_DIR before a long training run.

    Args:
        model: built-in model name, ``package.module:function``, a model directory or ``champion``.
        data_dir: the class-folder dataset (validated and preprocessed like for training).
        workdir: imgflow workdir (shards are shared with training; output in ``<workdir>/doctor/``).
        config: parameters (image size, batch size, optimizer, learning rate, seed...);
            ``learning_rate: auto`` (``imgflow doctor --lr-find``) runs the range test first
            (``lr_finder.png`` in the doctor's folder) and probes at its rate.
        epochs: probe training epochs (fewer than ``config.train.epochs`` when that is smaller).
        overfit_steps: steps of the overfit-one-batch preflight check (0 to skip).

    Returns:
        ``{"healthy", "findings", "epochs_run", "history", "model", "diagnosis_path",
        "markdown_path", "lr_finder", "manifest"}``.

    Raises:
        imgflow.tasks.dataset.DatasetUnusable: the data failed validation.
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    from imgflow.flows.preprocessing import preprocess_flow

    config = config or ImgflowConfig()
    workdir = Path(workdir)
    if model == "champion" or Path(model).is_dir():
        # a saved model fixes the image size and resize mode; preprocess to match it
        from imgflow.tasks.registry import read_metadata, resolve_model_dir

        metadata = read_metadata(resolve_model_dir(model, workdir))
        updates = {k: metadata[k] for k in ("image_size", "aspect") if metadata.get(k) is not None}
        config = config.model_copy(update={"preprocess": config.preprocess.model_copy(update=updates)})
    prep = preprocess_flow(data_dir, workdir=workdir, config=config)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out_dir = workdir / DOCTOR_DIR / f"{_slug(model)}-{stamp}"
    result = as_gpu_task(check_model_task)(model, prep["manifest"], str(out_dir), config, str(workdir),
                              min(epochs, config.train.epochs), overfit_steps)
    publish_diagnosis(result, key="doctor-diagnosis", title=f"Doctor: {model}")
    print(f"doctor: {model} is {'healthy' if result['healthy'] else 'UNHEALTHY'} after "
          f"{result['epochs_run']} probe epoch(s); diagnosis in {result['diagnosis_path']}")
    if (result.get("lr_finder") or {}).get("suggested"):
        print(f"doctor: the learning-rate range test suggests {result['lr_finder']['suggested']:.3g} "
              f"(plot {result['lr_finder']['plot']})")
    return {**result, "manifest": prep["manifest"]}


@task(name="label-issues", cache_policy=NO_CACHE)
def label_issues_task(report_path: str, out_dir: str, seed: int = 0) -> dict[str, Any]:
    """Rank the training images whose label an out-of-fold model confidently disputes."""
    from imgflow.tasks.atomic import read_json
    from imgflow.tasks.label_issues import label_issues_from_report

    result = label_issues_from_report(read_json(report_path), out_dir, seed=seed)
    lines = [f"{result['candidates']} of {result['images']} training images have a disputed label; "
             f"all in `{result['csv']}`, gallery in `{result['html']}`.", "",
             "| path | given | predicted | given prob | predicted prob |", "|---|---|---|---:|---:|"]
    lines += [f"| `{r['path']}` | {r['given']} | {r['predicted']} | {r['given_prob']:.2f} | {r['predicted_prob']:.2f} |"
              for r in result["top"]]
    create_markdown_artifact(key="label-issues", markdown="\n".join(lines),
                             description=f"{result['candidates']} possible label issues")
    return result


@flow(name="label-issues", log_prints=True)
def label_issues_flow(data_dir: Path, workdir: Path = DEFAULT_WORKDIR, config: ImgflowConfig | None = None) -> dict[str, Any]:
    """Validate DATA_DIR, then rank its training images whose label looks wrong.

    Args:
        data_dir: the class-folder dataset.
        workdir: imgflow workdir: ``validation.json``, ``label_issues.csv`` and ``label_issues.html`` go there.
        config: parameters (validation options, seed).

    Returns:
        ``{"csv", "html", "images", "candidates", "top"}``.

    Raises:
        imgflow.tasks.dataset.DatasetUnusable: the data failed validation.
    """
    from imgflow.flows.validation import validate_flow
    from imgflow.tasks.dataset import DatasetUnusable

    config = config or ImgflowConfig()
    validation = validate_flow(Path(data_dir), None, Path(workdir), options=config.validation)
    if not validation["usable"]:
        raise DatasetUnusable(f"{data_dir}: validation found the data unusable ({validation['errors']} errors); "
                              f"see {validation['report_path']}")
    result = label_issues_task(validation["report_path"], str(workdir), config.train.seed)
    print(f"label issues: {result['candidates']} of {result['images']} training images have a disputed label; "
          f"see {result['csv']} and {result['html']}")
    return result
