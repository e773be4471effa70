"""Run imgflow unattended: nightly retraining and hourly inbox predictions.

Two deployments, defined once here and mirrored by ``deployments/prefect.yaml``:

* ``scheduled-retraining/nightly-retraining`` - :func:`scheduled_retraining` every
  night: validate, preprocess, train, evaluate, promote. Unchanged data and
  configuration end in seconds with "nothing to do"; ``force=True`` trains anyway.
  A new model only becomes champion through the promotion gate of ``training_pipeline``.
* ``batch-predict/hourly-inbox-predictions`` - ``batch_predict`` of an inbox folder
  with the ``champion`` model every hour; a run resumes the previous CSV and only
  predicts new or changed files.

Both carry a deployment concurrency limit of 1 with ``CANCEL_NEW``: a run still
going when the next one is due makes the new one cancel itself instead of piling up.

:func:`serve_deployments` serves both from one Python process (``prefect.serve``)
for users who do not want a work pool and a worker. Nothing heavy is imported at
module import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from imgflow.flows.config import DEFAULT_WORKDIR, load_config
from imgflow.tasks.errors import UsageError

TRAINING_DEPLOYMENT = "nightly-retraining"
PREDICTION_DEPLOYMENT = "hourly-inbox-predictions"
DEFAULT_TRAIN_CRON = "0 2 * * *"  # 02:00 every night
DEFAULT_PREDICT_CRON = "0 * * * *"  # on the hour
DEFAULT_TIMEZONE = "UTC"
# a training run can take hours; a stuck one must not block the next night forever
TRAINING_TIMEOUT_S = 12 * 3600
NOTHING_TO_DO = "nothing to do"


# No flow-level retries: Prefect cannot filter them by exception, so unusable data or a
# bad config key would be re-validated for nothing; the train task itself retries
# transient failures and resumes from its last epoch.
@flow(name="scheduled-retraining", timeout_seconds=TRAINING_TIMEOUT_S, log_prints=True)
def scheduled_retraining(
    data_dir: Path,
    val_dir: Path | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    config_file: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Retrain on whatever is in DATA_DIR now; do nothing when data and config are unchanged.

    Reads the flat YAML ``config_file`` at run time (edits apply to the next night
    without redeploying), then runs ``imgflow.flows.training.training_pipeline``. That
    pipeline derives the run id from the dataset fingerprint and the configuration:
    a finished run for the same pair is reused instead of trained again, and an
    interrupted one (a killed worker, a timeout) resumes from its last epoch on the
    next run.

    Args:
        data_dir: ``DATA_DIR/<class>/*`` training images.
        val_dir: optional separate validation class folders.
        workdir: the imgflow work folder (shards, models, champion pointer).
        config_file: flat YAML config (same keys as ``imgflow train --config``); None = defaults.
        force: train a fresh attempt even when nothing changed.

    Returns:
        The ``training_pipeline`` summary plus ``"nothing_to_do"`` (True when a finished
        run was reused) and ``"config_file"``.

    Raises:
        imgflow.flows.config.ConfigError: ``config_file`` unreadable or holding an unknown key or bad value.
        imgflow.tasks.dataset.DatasetUnusable: validation found the data unusable.
    """
    from imgflow.flows.training import training_pipeline

    logger = get_run_logger()
    config = load_config(Path(config_file) if config_file else None)
    result = dict(training_pipeline(Path(data_dir), Path(val_dir) if val_dir else None, Path(workdir), config, force))
    result["nothing_to_do"] = bool(result.get("skipped"))
    result["config_file"] = str(Path(config_file).resolve()) if config_file else None
    if result["nothing_to_do"]:
        logger.info(
            "%s: data and configuration unchanged since run %s (champion: %s); pass force=True to retrain",
            NOTHING_TO_DO, result.get("run_id"), result.get("champion_dir"),
        )
    return result


def _limit_one() -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def build_deployments(
    data_dir: Path | str,
    inbox: Path | str,
    workdir: Path | str = DEFAULT_WORKDIR,
    config_file: Path | str | None = None,
    val_dir: Path | str | None = None,
    train_cron: str = DEFAULT_TRAIN_CRON,
    predict_cron: str = DEFAULT_PREDICT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    batch_size: int = 256,
    dask_address: str | None = None,
) -> list[Any]:
    """The two imgflow deployments as ``RunnerDeployment`` objects (no server needed).

    Paths are made absolute so a run finds its folders whatever the worker's
    working directory is. Entrypoints are module paths (``imgflow.flows.serve.scheduled_retraining``,
    ``imgflow.flows.prediction.batch_predict``), as in ``deployments/prefect.yaml``: they load from
    the installed package whatever the current folder is.

    Args:
        data_dir: training class folders, read every night.
        inbox: folder of images classified every hour with the champion model.
        workdir: the imgflow work folder shared by both deployments.
        config_file: flat YAML config for retraining (optional).
        val_dir: optional separate validation class folders.
        train_cron: cron expression of the retraining schedule.
        predict_cron: cron expression of the prediction schedule.
        timezone: IANA time zone the cron expressions are read in.
        batch_size: images per model call in prediction.
        dask_address: Dask scheduler for prediction chunks (None: local threads).

    Returns:
        ``[training deployment, prediction deployment]``.

    Raises:
        ValueError: a cron expression Prefect cannot parse (the message names it).
    """
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.types.entrypoint import EntrypointType

    from imgflow.flows.prediction import batch_predict

    def cron(expression: str, option: str) -> Any:
        try:
            return CronSchedule(cron=expression, timezone=timezone)
        except ValueError as exc:
            raise ValueError(f"{option}: expected a cron expression such as '0 2 * * *', found {expression!r} ({exc})") from None

    def absolute(path: Path | str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path is not None else None

    training = scheduled_retraining.to_deployment(
        name=TRAINING_DEPLOYMENT,
        schedule=cron(train_cron, "train_cron"),
        concurrency_limit=_limit_one(),
        parameters={
            "data_dir": absolute(data_dir),
            "val_dir": absolute(val_dir),
            "workdir": absolute(workdir),
            "config_file": absolute(config_file),
            "force": False,
        },
        tags=["imgflow", "training"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Nightly: validate, preprocess, train, evaluate and promote; nothing to do when data and config are unchanged.",
    )
    prediction = batch_predict.to_deployment(
        name=PREDICTION_DEPLOYMENT,
        schedule=cron(predict_cron, "predict_cron"),
        concurrency_limit=_limit_one(),
        parameters={
            "model": "champion",
            "input_dir": absolute(inbox),
            "workdir": absolute(workdir),
            "batch_size": batch_size,
            "dask_address": dask_address,
        },
        tags=["imgflow", "prediction"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Hourly: classify every new file of the inbox with the champion model into one CSV.",
    )
    return [training, prediction]


class NoServerError(UsageError, RuntimeError):
    """No Prefect API configured: schedules need a server that outlives this process."""


def check_api_url() -> str:
    """The configured Prefect API URL.

    Raises:
        NoServerError: ``PREFECT_API_URL`` is not set (a temporary server would lose the
            schedules when this process ends).
    """
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise NoServerError(
            "PREFECT_API_URL: expected the URL of a running Prefect server, found none; start one with "
            "`prefect server start` and run `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    return str(url)


def serve_deployments(
    data_dir: Path | str,
    inbox: Path | str,
    workdir: Path | str = DEFAULT_WORKDIR,
    config_file: Path | str | None = None,
    val_dir: Path | str | None = None,
    train_cron: str = DEFAULT_TRAIN_CRON,
    predict_cron: str = DEFAULT_PREDICT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    limit: int = 2,
) -> None:
    """Register both deployments and run their schedules from this process until Ctrl-C.

    Needs a Prefect API (``prefect server start`` in another terminal, with
    ``PREFECT_API_URL`` pointing at it). Schedules are paused when the process stops.
    Nothing is registered before the folders and the API URL are checked.

    Args:
        data_dir, inbox, workdir, config_file, val_dir, train_cron, predict_cron, timezone:
            as :func:`build_deployments`.
        limit: flow runs this process executes at once.

    Raises:
        NoServerError: ``PREFECT_API_URL`` is not set.
        FileNotFoundError: DATA_DIR is not a folder, or ``config_file`` is not a file.
    """
    from prefect import serve

    check_api_url()
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"DATA_DIR {data_dir}: expected a folder of class folders, found nothing there")
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config_file {config_file}: expected a YAML file, found nothing there")
    Path(inbox).mkdir(parents=True, exist_ok=True)  # an empty inbox is fine: the hourly run writes an empty CSV
    deployments = build_deployments(
        data_dir, inbox, workdir, config_file, val_dir, train_cron, predict_cron, timezone
    )
    serve(*deployments, limit=limit)
