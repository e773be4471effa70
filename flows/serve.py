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

from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from imgflow.flows.config import DEFAULT_WORKDIR, load_config
from imgflow.flows.gpu_slot import log_gpu_slot_wait
from imgflow.tasks.errors import UsageError

TRAINING_DEPLOYMENT = "nightly-retraining"
PREDICTION_DEPLOYMENT = "hourly-inbox-predictions"
DEFAULT_TRAIN_CRON = "0 2 * * *"  # 02:00 every night
DEFAULT_PREDICT_CRON = "0 * * * *"  # on the hour
DEFAULT_TIMEZONE = "UTC"
# a training run can take hours; a stuck one must not block the next night forever
TRAINING_TIMEOUT_S = 12 * 3600
NOTHING_TO_DO = "nothing to do"


PROJECT_CONFIG = "imgflow.yaml"  # read from the project folder when the deployment names no config_file
PROJECT_VAL_DIR = "val"  # used as val_dir when the deployment names none and the folder exists
RERUN_ON_CRASH_TAG = "rerun-on-crash"  # automations.yaml re-runs a crashed run carrying it, once
SKIPPED = "Skipped"  # the name of the Completed state of a run that had nothing to do


class TrainingOverrides(BaseModel):
    """Training options set on the deployment or in the UI's run form; each one set beats ``imgflow.yaml``.

    Left empty (None) an option comes from the project's ``imgflow.yaml``, else from
    imgflow's defaults: deployment parameters > project config file > defaults.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, description="training epochs (early stopping may end sooner)")
    image_size: int | None = Field(None, ge=8, le=2048, description="side in pixels images are resized to")
    batch_size: int | None = Field(None, ge=1, description="images per training step")
    learning_rate: float | None = Field(None, gt=0, description="optimiser learning rate")
    model: str | None = Field(None, description="built-in model name or package.module:function")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] | None = Field(None, description="optimiser")
    val_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="validation share when there is no val_dir")
    seed: int | None = Field(None, description="seed of the split, shuffling and initialisation")
    dask_address: str | None = Field(None, description="Dask scheduler for preprocessing (tcp://host:8786)")

    def values(self) -> dict[str, Any]:
        """The options that are set, as flat config keys."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def project_settings(
    project_dir: Path | str, config_file: Path | str | None, val_dir: Path | str | None
) -> dict[str, Any]:
    """Which config file and validation folder a scheduled run uses, and why.

    A parameter that names a path wins; else ``<project_dir>/imgflow.yaml`` and
    ``<project_dir>/val`` are used when they exist; else imgflow's defaults (no file,
    a ``val_fraction`` split). Relative parameters are read against ``project_dir``.

    Returns:
        ``{"config_file": Path | None, "config_source": "parameter" | "project" | "defaults",
        "val_dir": Path | None, "val_source": ...}``.
    """
    project = Path(project_dir).expanduser().resolve()

    def pick(given: Path | str | None, default_name: str, exists: Any) -> tuple[Path | None, str]:
        if given is not None and str(given) != "":
            return project / Path(given).expanduser(), "parameter"
        candidate = project / default_name
        return (candidate, "project") if exists(candidate) else (None, "defaults")

    config, config_source = pick(config_file, PROJECT_CONFIG, Path.is_file)
    val, val_source = pick(val_dir, PROJECT_VAL_DIR, Path.is_dir)
    return {"config_file": config, "config_source": config_source, "val_dir": val, "val_source": val_source}


def _tag_run(add: list[str], drop: tuple[str, ...] = ()) -> None:
    """Change the current flow run's tags (they show what happened in the runs list); best effort."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(ctx.flow_run.id)
            tags = (set(run.tags) | set(add)) - set(drop)
            client.update_flow_run(ctx.flow_run.id, tags=sorted(tags))
    except Exception as exc:  # noqa: BLE001 - tags are a label, never a reason to fail a training
        get_run_logger().debug("could not tag the run: %s", exc)


def _created_by_automation() -> bool:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    created_by = getattr(getattr(ctx, "flow_run", None), "created_by", None)
    return bool(created_by and str(getattr(created_by, "type", "")).upper() == "AUTOMATION")


def publish_summary(result: dict[str, Any]) -> list[str]:
    """Table artifacts on the top-level run: per-class recall, the promotion decision, the doctor's findings, files.

    Returns:
        The artifact keys created.
    """
    from prefect.artifacts import create_table_artifact

    from imgflow.tasks.atomic import read_json

    model_dir = Path(result["model_dir"]) if result.get("model_dir") else None
    metadata: dict[str, Any] = {}
    if model_dir is not None and (model_dir / "metadata.json").is_file():
        metadata = read_json(model_dir / "metadata.json")
    recall = (metadata.get("metrics") or {}).get("per_class_recall") or {}
    keys = []
    if recall:
        create_table_artifact(
            key="retraining-metrics",
            table=[{"class": name, "recall": value} for name, value in recall.items()]
            + [{"class": "(all) validation accuracy", "recall": result.get("val_accuracy")}],
            description=f"Run {result.get('run_id')}: validation recall per class",
        )
        keys.append("retraining-metrics")
    create_table_artifact(
        key="retraining-decision",
        table=[{"run": result.get("run_id"), "promoted": result.get("promoted"), "skipped": result.get("nothing_to_do"),
                "healthy": result.get("healthy"), "reason": result.get("reason"),
                "config": result.get("config_file") or "defaults", "config source": result.get("config_source")}],
        description="Promotion decision and why",
    )
    keys.append("retraining-decision")
    findings = result.get("findings") or []
    if findings:
        create_table_artifact(
            key="retraining-findings",
            table=[{"severity": f.get("severity"), "code": f.get("code"), "advice": f.get("advice")} for f in findings],
            description="The training doctor's top findings (root cause first)",
        )
        keys.append("retraining-findings")
    evaluation = metadata.get("evaluation") or {}
    files = [{"file": "model directory", "path": result.get("model_dir")},
             {"file": "champion", "path": result.get("champion_dir")}]
    files += [{"file": name, "path": path} for name, path in evaluation.items() if path]
    create_table_artifact(key="retraining-files", table=files,
                          description="Where the outputs are (paths on the machine that ran the flow)")
    keys.append("retraining-files")
    return keys


# No flow-level retries: Prefect cannot filter them by exception, so unusable data or a
# bad config key would be re-validated for nothing; the train task itself retries
# transient failures and resumes from its last epoch.
@flow(name="scheduled-retraining", timeout_seconds=TRAINING_TIMEOUT_S, log_prints=True, persist_result=True)
def scheduled_retraining(
    data_dir: Path = Path("data"),
    val_dir: Path | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    config_file: Path | None = None,
    force: bool = False,
    options: TrainingOverrides | None = None,
    project_dir: Path = Path("."),
) -> Any:
    """Retrain on whatever is in DATA_DIR now; do nothing when data and config are unchanged.

    Reads the config at run time (edits apply to the next night without redeploying):
    ``options`` set on the deployment or run form > ``config_file`` or the project's
    ``imgflow.yaml`` > defaults; ``val_dir`` or the project's ``val/`` when it exists.
    The run logs which it used. Then runs ``imgflow.flows.training.training_pipeline``,
    which derives the run id from the dataset fingerprint and the configuration: a
    finished run for the same pair is reused (the flow run ends ``Completed`` named
    ``Skipped``, tagged ``skipped``), an interrupted one resumes from its last epoch.

    Args:
        data_dir: ``DATA_DIR/<class>/*`` training images (relative: to ``project_dir``).
        val_dir: separate validation class folders; None = ``<project_dir>/val`` if it exists.
        workdir: the imgflow work folder (shards, models, champion pointer).
        config_file: flat YAML config (``imgflow train --config`` keys); None = ``<project_dir>/imgflow.yaml``
            if it exists, else defaults.
        force: train a fresh attempt even when nothing changed.
        options: training options that override the config file (the UI run form shows each).
        project_dir: the project folder relative paths and the project files are read in
            (default: the folder the run starts in, which ``prefect deploy`` records).

    Returns:
        The ``training_pipeline`` summary plus ``"nothing_to_do"`` (True when a finished
        run was reused), ``"config_file"``, ``"config_source"``, ``"val_dir"`` and ``"val_source"``
        (inside a ``Completed``/``Skipped`` state when there was nothing to do).

    Raises:
        imgflow.flows.config.ConfigError: ``config_file`` unreadable or holding an unknown key or bad value.
        imgflow.tasks.dataset.DatasetUnusable: validation found the data unusable.
    """
    from prefect.states import Completed

    from imgflow.flows.training import training_pipeline

    logger = get_run_logger()
    if _created_by_automation():
        # a re-run started by automations.yaml is not re-run again if it crashes too
        _tag_run([], drop=(RERUN_ON_CRASH_TAG,))
    project = Path(project_dir).expanduser().resolve()
    settings = project_settings(project, config_file, val_dir)
    overrides = (options or TrainingOverrides()).values()
    config = load_config(settings["config_file"], overrides)
    logger.info(
        "config: %s (%s); overrides from the deployment: %s; val_dir: %s (%s); project folder %s",
        settings["config_file"] or "imgflow defaults", settings["config_source"], overrides or "none",
        settings["val_dir"] or f"none, val_fraction {config.preprocess.val_fraction}", settings["val_source"], project,
    )
    log_gpu_slot_wait(logger)
    result = dict(training_pipeline(project / Path(data_dir), settings["val_dir"], project / Path(workdir), config, force))
    result["nothing_to_do"] = bool(result.get("skipped"))
    result["config_file"] = str(settings["config_file"]) if settings["config_file"] else None
    result["config_source"] = settings["config_source"]
    result["val_dir"] = str(settings["val_dir"]) if settings["val_dir"] else None
    result["val_source"] = settings["val_source"]
    publish_summary(result)
    if result["nothing_to_do"]:
        message = (f"{NOTHING_TO_DO}: data and configuration unchanged since run {result.get('run_id')} "
                   f"(champion: {result.get('champion_dir')}); pass force=True to retrain")
        logger.info(message)
        _tag_run(["skipped"])
        return Completed(name=SKIPPED, message=message, data=result)
    _tag_run(["promoted" if result.get("promoted") else "rejected"])
    return result


def _limit_one() -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


# The prediction deployment's triggers, exactly as in deployments/prefect.yaml (a test compares them).
PREDICTION_TRIGGERS: list[dict[str, Any]] = [
    {"type": "event", "name": "imgflow-predict-after-promotion", "enabled": True,
     "match": {"prefect.resource.id": "imgflow.model.*"}, "expect": ["imgflow.model.promoted"],
     "posture": "Reactive", "threshold": 1, "within": 0},
    {"type": "event", "name": "imgflow-predict-on-inbox-change", "enabled": True,
     "match": {"prefect.resource.id": "imgflow.inbox.*"}, "expect": ["imgflow.inbox.changed"],
     "for_each": ["prefect.resource.id"], "posture": "Reactive", "threshold": 1, "within": 120},
]


def prediction_triggers() -> list[Any]:
    """:data:`PREDICTION_TRIGGERS` as Prefect ``DeploymentEventTrigger`` objects."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return [DeploymentEventTrigger.model_validate(spec) for spec in PREDICTION_TRIGGERS]


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
    project_dir: Path | str = ".",
) -> list[Any]:
    """The two imgflow deployments as ``RunnerDeployment`` objects (no server needed).

    Paths are made absolute so a run finds its folders whatever the worker's
    working directory is. Entrypoints are module paths (``imgflow.flows.serve.scheduled_retraining``,
    ``imgflow.flows.prediction.batch_predict``), as in ``deployments/prefect.yaml``: they load from
    the installed package whatever the current folder is. The prediction deployment carries the
    triggers of :data:`PREDICTION_TRIGGERS`; neither keeps a work pool (a served deployment is run by
    the serving process only).

    Args:
        data_dir: training class folders, read every night.
        inbox: folder of images classified every hour with the champion model.
        workdir: the imgflow work folder shared by both deployments.
        config_file: flat YAML config for retraining (None: ``<project_dir>/imgflow.yaml`` when it exists).
        val_dir: separate validation class folders (None: ``<project_dir>/val`` when it exists).
        train_cron: cron expression of the retraining schedule.
        predict_cron: cron expression of the prediction schedule.
        timezone: IANA time zone the cron expressions are read in.
        batch_size: images per model call in prediction.
        dask_address: Dask scheduler for prediction chunks and preprocessing (None: local).
        project_dir: the project folder ``imgflow.yaml`` and ``val/`` are looked up in.

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

    options = {"dask_address": dask_address} if dask_address else {}
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
            "options": options,
            "project_dir": absolute(project_dir),
        },
        tags=["imgflow", "training", RERUN_ON_CRASH_TAG],
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
        triggers=prediction_triggers(),
        tags=["imgflow", "prediction"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Hourly, after a promotion and when the inbox changes: classify every new file of the inbox "
        "with the champion model into one CSV.",
    )
    for deployment in (training, prediction):
        # set explicitly (not left unset): applying it detaches a work pool an earlier `prefect deploy`
        # attached, so a worker never runs a served deployment too
        deployment.work_pool_name = None
    return [training, prediction]


class NoServerError(UsageError, RuntimeError):
    """No Prefect API configured: schedules need a server that outlives this process."""


class ServeConflict(UsageError, RuntimeError):
    """A deployment ``imgflow serve`` would serve is attached to a work pool with a live worker."""


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


def live_workers_serving(deployment_names: list[str]) -> list[tuple[str, str, list[str]]]:
    """Deployments (``flow/name``) on the server that a live worker would also run.

    Returns:
        ``[(deployment, work pool, [online worker names])]`` for each deployment that exists,
        is attached to a work pool, and that pool has a worker whose status is ``ONLINE``.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    conflicts: list[tuple[str, str, list[str]]] = []
    with get_client(sync_client=True) as client:
        for name in deployment_names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            pool = deployment.work_pool_name
            if not pool:
                continue
            try:
                workers = client.read_workers_for_work_pool(pool)
            except ObjectNotFound:
                continue
            online = [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]
            if online:
                conflicts.append((name, pool, online))
    return conflicts


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
    dask_address: str | None = None,
    announce: Any = None,
) -> None:
    """Register both deployments and run their schedules and triggers from this process until Ctrl-C.

    Needs a Prefect API (``prefect server start`` in another terminal, with
    ``PREFECT_API_URL`` pointing at it). Schedules are paused when the process stops.
    Nothing is registered before the folders, the API URL and the work pools are checked:
    a deployment of the same name attached to a work pool with an online worker (from
    ``prefect deploy`` of ``deployments/prefect.yaml``) makes this refuse, naming the pool and
    worker; one attached to a pool with no live worker is detached, so no later worker runs it too.
    The project folder (``imgflow.yaml``, ``val/``) is the current folder.

    Args:
        data_dir, inbox, workdir, config_file, val_dir, train_cron, predict_cron, timezone, dask_address:
            as :func:`build_deployments`.
        limit: flow runs this process executes at once.
        announce: called (no arguments) once every check passed, just before serving.

    Raises:
        NoServerError: ``PREFECT_API_URL`` is not set.
        ServeConflict: a live worker serves the same deployments.
        FileNotFoundError: DATA_DIR is not a folder, or ``config_file`` is not a file.
    """
    import os

    from prefect import serve

    check_api_url()
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"DATA_DIR {data_dir}: expected a folder of class folders, found nothing there")
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config_file {config_file}: expected a YAML file, found nothing there")
    names = [f"scheduled-retraining/{TRAINING_DEPLOYMENT}", f"batch-predict/{PREDICTION_DEPLOYMENT}"]
    conflicts = live_workers_serving(names)
    if conflicts:
        described = "; ".join(f"{d} on work pool {p!r} (worker {', '.join(w)})" for d, p, w in conflicts)
        raise ServeConflict(
            f"a worker already runs these deployments: {described}. Stop that worker (or `prefect deployment "
            f"delete` them) to serve from this process, or keep the worker and do not serve"
        )
    Path(inbox).mkdir(parents=True, exist_ok=True)  # an empty inbox is fine: the hourly run writes an empty CSV
    deployments = build_deployments(
        data_dir, inbox, workdir, config_file, val_dir, train_cron, predict_cron, timezone,
        dask_address=dask_address, project_dir=Path.cwd(),
    )
    # served runs send heartbeats often enough for automations.yaml to mark a dead one Crashed
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    if announce is not None:
        announce()
    serve(*deployments, limit=limit)
