"""The training pipeline flow: validate -> preprocess -> train -> evaluate -> promote.

The run directory ``<workdir>/models/<run_id>`` is derived from the dataset fingerprint
and the configuration, so a retried train task, or the same command run again after a
crash, resumes the same run from its last finished epoch (``BackupAndRestore``). A run
that already finished is reused unless ``force`` asks for a fresh attempt.

TensorFlow and Keras are imported inside the tasks: importing this module stays cheap.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from imgflow.flows.config import DEFAULT_WORKDIR, ConfigError, ImgflowConfig, TrainOptions
from imgflow.flows.gpu_slot import as_gpu_task
from imgflow.flows.locking import with_workdir_lock
from imgflow.flows.retrying import retry_unless
from imgflow.tasks import registry
from imgflow.tasks.atomic import read_json
from imgflow.tasks.records import EvaluationSummary, read_manifest
from imgflow.tasks.errors import ImgflowError

_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
TOP_FINDINGS = 5


def _permanent_errors() -> tuple[type[BaseException], ...]:
    # every ImgflowError is a logic error (bad option, bad data, a full disk: the same
    # again); the others are programming errors that a retry cannot fix either
    return (ImgflowError, ValueError, TypeError, KeyError, ImportError)


def _retry_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    # a logic error fails the same way every time; anything else (OOM, a killed worker,
    # a flaky filesystem) is retried and resumes from the backup
    return retry_unless(*_permanent_errors())(task_obj, task_run, state)


# No timeout_seconds on training: a Prefect timeout cannot interrupt a thread inside
# model.fit. The `gpu` tag lets `prefect concurrency-limit create gpu 1` keep two
# trainings off one GPU.
@task(
    name="train-model",
    tags={"gpu"},
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_retry_transient,
)
def train_task(manifest_path: str, run_dir: str, options: TrainOptions) -> dict[str, Any]:
    """Fit the configured model into ``run_dir`` (resuming a killed attempt); return its summary."""
    from imgflow.tasks.training import train_from_manifest

    logger = get_run_logger()
    return train_from_manifest(Path(manifest_path), Path(run_dir), options, log=logger.info)


@task(name="fit-novelty", tags={"gpu"}, cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def fit_novelty_task(model_dir: str, manifest_path: str, data_dir: str, unknown_rate: float) -> dict[str, Any]:
    """Fit novelty statistics, the temperature and the training image profile; return the metadata keys.

    The profile (Pillow decoding the files) is taken in a thread beside the statistics
    (the model's calls): the two overlap on separate cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from imgflow.tasks.drift import profile_training
    from imgflow.tasks.novelty import NoveltyError, fit_from_manifest

    metadata = registry.read_metadata(Path(model_dir))
    with ThreadPoolExecutor(1, thread_name_prefix="imgflow-profile") as pool:
        profiled = pool.submit(profile_training, Path(model_dir), Path(data_dir), metadata["class_names"],
                               int(metadata["image_size"]), metadata["aspect"], metadata.get("background"))
        try:
            keys = fit_from_manifest(Path(model_dir), Path(manifest_path), unknown_rate)
        except NoveltyError as exc:  # the model still works: predictions just have no novelty/unknown cells
            get_run_logger().warning("no novelty statistics for %s: %s", model_dir, exc)
            keys = {}
        profiled.result()
    if not keys:
        return {}
    get_run_logger().info("novelty threshold %.4g (%s, unknown rate %s); temperature %.3f",
                          keys["novelty"]["threshold"], keys["novelty"]["method"], unknown_rate,
                          keys["calibration"]["temperature"])
    return keys


@task(name="evaluate-model", tags={"gpu"}, cache_policy=NO_CACHE, timeout_seconds=3600, retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def evaluate_task(
    model_dir: str,
    manifest_path: str,
    champion_dir: str | None,
    tolerance: float,
    min_class_images_for_recall_gate: int = registry.MIN_CLASS_IMAGES_FOR_RECALL_GATE,
    csv_neutralise: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score the model on the validation split (and the champion on the same images); carries the promotion decision."""
    from imgflow.tasks.evaluation import evaluate_split

    result = evaluate_split(
        Path(model_dir), Path(manifest_path), split="val", champion_dir=Path(champion_dir) if champion_dir else None,
        tolerance=tolerance, min_class_images_for_recall_gate=min_class_images_for_recall_gate,
        csv_neutralise=csv_neutralise, batch_size=batch_size,
    )
    append_findings(Path(model_dir) / "diagnosis.json", result.get("evaluation_findings") or [])
    return EvaluationSummary.from_result(result, keep=("evaluation_findings",)).to_dict()


def append_findings(path: Path, findings: list[dict[str, Any]]) -> None:
    """Add the evaluation's findings (``attends_to_background``) to the run's ``diagnosis.json``.

    The doctor's ranking is redone with ``diagnose`` (a finding already there with the same
    code is replaced, so a retried evaluation adds it once); the file is written atomically.
    """
    if not findings:
        return
    from imgflow.tasks.doctor.findings import diagnose, read_diagnosis, write_diagnosis

    old = read_diagnosis(path)["findings"] if path.is_file() else []
    write_diagnosis(path, diagnose([*old, *findings]))


@task(name="promote-model", cache_policy=NO_CACHE, timeout_seconds=120, retries=2, retry_delay_seconds=5,
      retry_condition_fn=_retry_transient)
def promote_task(workdir: str, model_dir: str, decision: dict[str, Any]) -> dict[str, Any]:
    """Act on the evaluation's promotion decision (``registry.decide``): point champion.json at the run; record why.

    The decision was taken against one champion; when another run became champion since,
    the candidate is not promoted over a model it was never compared with.
    """
    workdir_path, model_path = Path(workdir), Path(model_dir)
    metadata = registry.read_metadata(model_path)
    promoted, reason = bool(decision.get("promote")), str(decision.get("reason", ""))
    pointer = registry.read_champion(workdir_path)
    current = pointer.get("run_id") if pointer and registry.champion_dir(workdir_path) else None
    if promoted and current is not None and current not in (decision.get("champion_run_id"), metadata["run_id"]):
        promoted, reason = False, (
            f"rejected: the champion changed to {current} after this run was compared with "
            f"{decision.get('champion_run_id')}; evaluate again to compare with the new champion"
        )
    if promoted:
        registry.promote(workdir_path, model_path, metadata)
    metadata["promotion"] = {"promoted": promoted, "reason": reason, "decided": registry.now_iso()}
    registry.write_metadata(model_path, metadata)
    return {"promoted": promoted, "reason": reason}


def top_findings(findings: list[dict[str, Any]], limit: int = TOP_FINDINGS) -> list[dict[str, Any]]:
    """The most severe findings first (critical, warning, info), at most ``limit``."""
    ranked = sorted(findings, key=lambda f: _SEVERITY_ORDER.get(f.get("severity", "info"), 3))
    return ranked[:limit]


def _metrics(train_summary: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    final = train_summary.get("final", {})
    metrics: dict[str, Any] = {
        "val_accuracy": evaluation.get("accuracy"),
        "val_loss": evaluation.get("loss"),
        "val_count": evaluation.get("count"),
        "per_class_recall": {n: v.get("recall") for n, v in (evaluation.get("per_class") or {}).items()},
        "train_accuracy": final.get("accuracy"),
        "train_loss": final.get("loss"),
        "epochs_run": train_summary.get("epochs_run"),
        "best_epoch": train_summary.get("best_epoch"),
        "fit_seconds": train_summary.get("fit_seconds"),
    }
    return metrics


def _result_from_metadata(metadata: dict[str, Any], model_dir: Path, workdir: Path, skipped: bool) -> dict[str, Any]:
    pointer = registry.read_champion(workdir)
    promotion = metadata.get("promotion", {})
    promoted = bool(pointer and pointer.get("run_id") == metadata["run_id"])
    reason = promotion.get("reason", "")
    if skipped:
        reason = (
            f"reused run {metadata['run_id']}: this data and configuration were already trained "
            f"({'it is the champion' if promoted else 'it is not the champion: ' + reason}); pass force to train again"
        )
    diagnosis_path = model_dir / "diagnosis.json"
    findings = read_json(diagnosis_path).get("findings", []) if diagnosis_path.is_file() else []
    return {
        "run_id": metadata["run_id"],
        "model_dir": str(model_dir.resolve()),
        "val_accuracy": metadata.get("metrics", {}).get("val_accuracy"),
        "healthy": bool(metadata.get("healthy")),
        "promoted": promoted if skipped else bool(promotion.get("promoted")),
        "reason": reason,
        "findings": top_findings(findings),
        "champion_dir": pointer.get("model_dir") if pointer else None,
        "skipped": skipped,
        "outcome": metadata.get("outcome"),
    }


def _publish(result: dict[str, Any], evaluation: dict[str, Any] | None) -> None:
    lines = [
        f"# Training run `{result['run_id']}`",
        "",
        "| | |",
        "|---|---|",
        f"| validation accuracy | {result['val_accuracy'] if result['val_accuracy'] is None else round(result['val_accuracy'], 4)} |",
        f"| healthy | {result['healthy']} |",
        f"| promoted | {result['promoted']} |",
        f"| model directory | `{result['model_dir']}` |",
        f"| champion | `{result['champion_dir']}` |",
        "",
        result["reason"],
    ]
    if evaluation and evaluation.get("report_html"):
        lines += ["", f"Evaluation report: `{evaluation['report_html']}`"]
    if result["findings"]:
        lines += ["", "## Doctor's findings", ""]
        lines += [f"- **{f['severity']}** `{f['code']}`: {f.get('advice', '')}" for f in result["findings"]]
    create_markdown_artifact(key="training-run", markdown="\n".join(lines), description="Training pipeline summary")


def _skip_evaluation_reason(diagnosis: dict[str, Any]) -> str | None:
    """Why the trained weights are not worth evaluating (a diverged run), or None.

    A run whose loss became NaN/inf has non-finite weights: evaluation would only fail on
    them. The reason names the diagnosis's root cause and its advice.
    """
    from imgflow.tasks.doctor.findings import diverged, root_cause

    if not diverged(diagnosis):
        return None
    cause = root_cause(diagnosis) or {"code": "nan_loss", "advice": "the training loss became NaN/inf"}
    return f"rejected: training diverged (NaN/inf loss), evaluation skipped — {cause['code']}: {cause['advice']}"


def _finish_unevaluated(model_dir: Path, workdir: Path, metadata: dict[str, Any], reason: str) -> dict[str, Any]:
    """Record a run that is not evaluated (and so not promoted) with its reason; the flow's result."""
    metadata["evaluation"] = {"skipped": True, "reason": reason}
    metadata["promotion"] = {"promoted": False, "reason": reason, "decided": registry.now_iso()}
    registry.write_metadata(model_dir, metadata)
    get_run_logger().warning(reason)
    result = _result_from_metadata(registry.read_metadata(model_dir), model_dir, workdir, skipped=False)
    result.update(promoted=False, reason=reason, evaluation_skipped=True)
    _publish(result, None)
    print(f"val accuracy n/a | model {result['model_dir']} | {reason}")
    return result
def _emit_decision(workdir: Path, result: dict[str, Any], metadata: dict[str, Any]) -> None:
    from imgflow.flows import events

    recall = metadata.get("metrics", {}).get("per_class_recall") or {}
    events.model_decided(workdir, {**result, "per_class_recall": recall})


@flow(name="training-pipeline", log_prints=True)
@with_workdir_lock("imgflow train")
def training_pipeline(
    data_dir: Path,
    val_dir: Path | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    config: ImgflowConfig | None = None,
    force: bool = False,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Validate, preprocess, train, evaluate and promote; return a small summary.

    Args:
        data_dir: ``DATA_DIR/<class>/*`` training images.
        val_dir: optional separate validation class folders (else ``val_fraction`` splits).
        workdir: the imgflow work folder (reports, shards, models, champion pointer).
        config: every parameter; defaults when None.
        force: train a fresh attempt even when this data and configuration already
            produced a finished run (an interrupted run is always resumed).
        wait_for_lock: wait for another writer of ``workdir`` (the whole run holds its
            lock); False raises ``imgflow.tasks.errors.LockHeld`` at once.

    Returns:
        ``{"run_id", "model_dir", "val_accuracy", "healthy", "promoted", "reason",
        "findings", "champion_dir", "skipped"}`` (``skipped`` is True when a finished
        run was reused instead of training; a diverged run, NaN loss, is not evaluated:
        it adds ``"evaluation_skipped": True`` and the reason names its root cause).

    Raises:
        imgflow.tasks.dataset.DatasetUnusable: validation found the data unusable.
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    from imgflow.flows.preprocessing import preprocess_flow

    config = config or ImgflowConfig()
    workdir = Path(workdir)
    logger = get_run_logger()
    prep = preprocess_flow(data_dir, val_dir, workdir, config)
    if not prep["counts"].get("val"):
        raise ConfigError(
            "training needs validation images to stop early, evaluate and promote, and found none: "
            "give --val-dir, or a --val-fraction above 0 (the default is 0.1)"
        )
    if config.validation.label_issues:  # opt-in: writes label_issues.csv/.html into the workdir
        from imgflow.flows.doctor import label_issues_task

        label_issues_task(prep["validation"]["report_path"], str(workdir), config.train.seed)
    manifest_path = Path(prep["manifest"])
    manifest = read_manifest(manifest_path)

    base_id = registry.run_id_for(manifest.fingerprint or "", config.flat(), config.train.model.split(":")[-1])
    run_id, model_dir, state = registry.allocate_run_dir(workdir, base_id, force)
    if state == "done":
        logger.info("run %s already finished with this data and configuration; reusing it", run_id)
        result = _result_from_metadata(registry.read_metadata(model_dir), model_dir, workdir, skipped=True)
        print(result["reason"])
        return result
    if force and state == "resume":
        from imgflow.tasks.training import discard_resume_state

        # --force always starts fresh: an interrupted attempt's backup is discarded, never trusted
        logger.warning("force: discarding the interrupted attempt's backup in %s; starting it fresh", model_dir)
        discard_resume_state(model_dir)
        state = "new"
    logger.info("%s run %s in %s", "resuming" if state == "resume" else "starting", run_id, model_dir)

    try:
        summary = as_gpu_task(train_task)(str(manifest_path), str(model_dir), config.train)
        previous = registry.read_metadata(model_dir) if (model_dir / registry.METADATA_FILE).is_file() else None
        metadata = registry.build_metadata(run_id, summary, manifest, manifest_path, config.flat(), _metrics(summary, {}),
                                           data_dir, val_dir, previous)
        # evaluation reads class names and image size from metadata.json: write it first
        registry.write_metadata(model_dir, metadata)
        started = time.perf_counter()
        metadata.update(as_gpu_task(fit_novelty_task)(str(model_dir), str(manifest_path), str(data_dir), config.train.unknown_rate))
        seconds = {"novelty_seconds": round(time.perf_counter() - started, 2)}
        metadata["metrics"].update(seconds)  # kept by a diverged run too, which is not evaluated

        skip_reason = _skip_evaluation_reason(summary["diagnosis"])
        if skip_reason:
            return _finish_unevaluated(model_dir, workdir, metadata, skip_reason)

        champion_dir = registry.champion_dir(workdir)
        started = time.perf_counter()
        evaluation = as_gpu_task(evaluate_task)(str(model_dir), str(manifest_path), str(champion_dir) if champion_dir else None,
                                   config.train.promotion_tolerance, config.train.min_class_images_for_recall_gate,
                                   config.evaluate.csv_neutralise, config.evaluate.batch_size)
        seconds["evaluation_seconds"] = round(time.perf_counter() - started, 2)
        metadata["metrics"] = {**_metrics(summary, evaluation), **seconds}
        metadata["evaluation"] = {k: evaluation.get(k) for k in ("report_html", "report_md", "metrics_json")}
        registry.write_metadata(model_dir, metadata)

        decision = promote_task(str(workdir), str(model_dir), evaluation["promotion"])
        result = _result_from_metadata(registry.read_metadata(model_dir), model_dir, workdir, skipped=False)
        result["reason"] = decision["reason"]
        result["promoted"] = decision["promoted"]
        _publish(result, evaluation)
        _emit_decision(workdir, result, metadata)
        accuracy = "n/a" if result["val_accuracy"] is None else f"{result['val_accuracy']:.4f}"
        print(f"val accuracy {accuracy} | model {result['model_dir']} | {result['reason']}")
        return result
    finally:
        registry.forget_saved_model()  # the novelty and evaluation steps used the trained model as it is
