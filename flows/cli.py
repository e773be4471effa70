"""The ``imgflow`` command: parse options, call a flow, print a summary, set the exit code.

Exit codes: 0 success; 1 the pipeline ran and failed a check (unusable data, unhealthy
training, rejected model, ``--strict`` problems); 2 bad usage or unreadable input.
Flows are imported inside each command so ``imgflow --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from imgflow.flows.config import DEFAULT_WORKDIR, ImgflowConfig, load_config
from imgflow.flows import validate_ahead
from imgflow.flows.errormap import ImgflowGroup, debug_requested, fail, map_errors, note_outputs  # noqa: F401
from imgflow.tasks.errors import EXIT_FAILED_CHECK, EXIT_USAGE

app = typer.Typer(
    name="imgflow",
    help="Validate a folder of class-labelled images, write TFRecords, train and evaluate a Keras CNN, "
    "and classify new image folders into CSV — as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ImgflowGroup,
)

_USER_TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL" in os.environ  # --verbose leaves a user's own setting alone
_PROCESS_SETTINGS = contextlib.ExitStack()  # Prefect settings for the rest of the process, never closed


def _version(value: bool) -> None:
    if value:
        from imgflow.flows.info import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error (also IMGFLOW_DEBUG=1)"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the versions of imgflow, TensorFlow, Keras and Prefect and exit"),
    verbose: bool = typer.Option(False, "--verbose", help="show every log line: TensorFlow start-up, Prefect task "
                                 "states and logs, Keras (sets IMGFLOW_VERBOSE=1)"),
) -> None:
    """Validate a folder of class-labelled images, train and evaluate a Keras CNN, classify new folders."""
    ctx.meta["imgflow.debug"] = debug
    if verbose:
        os.environ["IMGFLOW_VERBOSE"] = "1"
        if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "2" and not _USER_TF_LOG_LEVEL:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


WorkdirOption = typer.Option(DEFAULT_WORKDIR, "--workdir", help="where reports, shards, models and predictions go")
ConfigOption = typer.Option(None, "--config", help="YAML file with the same keys as the options")
ValDirOption = typer.Option(None, "--val-dir", help="separate validation folder with the same class folders")
DaskOption = typer.Option(None, "--dask-address", help="run mapped tasks on this Dask scheduler (tcp://host:8786)")


def require_dir(path: Path, what: str) -> Path:
    """Exit 2 with one line unless ``path`` is a readable directory."""
    if not path.exists():
        fail(f"{what} {path} does not exist", EXIT_USAGE)
    if not path.is_dir():
        fail(f"{what} {path} is not a directory", EXIT_USAGE)
    if not os.access(path, os.R_OK | os.X_OK):
        fail(f"{what} {path} is not readable", EXIT_USAGE)
    return path


def check_paths(inputs: dict[str, Optional[Path]], workdir: Optional[Path], outputs: dict[str, Optional[Path]]) -> None:
    """Exit 2 with one line when an output would land on or inside an input (imgflow.tasks.paths)."""
    from imgflow.tasks.paths import check_run

    check_run(inputs, workdir, outputs)  # a PathConflict is a UsageError: exit 2, one line
def require_workdir(workdir: Path) -> Path:
    """Exit 2 with one line when ``--workdir`` exists but is not a writable folder."""
    if workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir} is a file, not a folder: give a folder (it is created when missing)", EXIT_USAGE)
    if workdir.is_dir() and not os.access(workdir, os.W_OK | os.X_OK):
        fail(f"--workdir {workdir} is not writable: choose a folder you can write to", EXIT_USAGE)
    return workdir


def require_output_file(path: Optional[Path], option: str) -> Optional[Path]:
    """Exit 2 with one line when an output file option names a folder or an unwritable place."""
    if path is None:
        return None
    if path.is_dir():
        fail(f"{option} {path} is a folder: give a file name inside it, for example {path / 'predictions.csv'}",
             EXIT_USAGE)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{option} {path}: {parent} is a file, not a folder: choose another path", EXIT_USAGE)
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"{option} {path} is not writable (read-only file or folder {parent}): choose a writable path",
             EXIT_USAGE)
    return path


def build_config(config_file: Optional[Path], **overrides: Any) -> ImgflowConfig:
    """The YAML file's values overridden by the options given (a bad value is a ConfigError: exit 2)."""
    return load_config(config_file, overrides)


def start(command: str, workdir: Optional[Path], tensorflow: bool = True, prefect: bool = True) -> Any:
    """Begin a command's terminal output: quiet logging (flows.console), TensorFlow and Keras imported quietly and lean.

    The frameworks come in without the optional packages they import only for
    integrations imgflow does not use (:mod:`imgflow.tasks.lean_imports`).

    Returns:
        The command's :class:`imgflow.flows.console.Summary` (with ``log``, the log file path).
    """
    from imgflow.flows import console

    summary = console.Summary(command)
    summary.log = console.configure(workdir, prefect)
    if tensorflow:
        from imgflow.tasks.lean_imports import import_frameworks

        import_frameworks()
    return summary


def finish(summary: Any, verdict: str) -> None:
    """Print the summary, the log file and the time taken, then ``verdict`` as the last line.

    An empty ``verdict`` prints none: the caller's failure line (``fail``) comes last.
    """
    from imgflow.flows import console

    summary.path("Log", summary.log)
    console.echo_all([*summary.render(), *([verdict] if verdict else [])])


def start_prefect_early() -> None:
    """Boot the temporary Prefect server now, while the command imports and works (imgflow.flows.server)."""
    from imgflow.flows.server import start_early

    start_early()


def wait_for_prefect() -> None:
    """Before the first flow: wait for the early server; exit 2 with the reason when it did not start."""
    from imgflow.flows.server import ServerStartError, wait_ready

    try:
        wait_ready()
    except ServerStartError as exc:
        fail(str(exc), EXIT_USAGE)
    skip_unconfigured_heartbeats()
    collect_garbage_from_here()


def collect_garbage_from_here() -> None:
    """End :func:`main`'s pause of the garbage collector: freeze what the imports made, collect again.

    Importing TensorFlow, Keras and Prefect creates ~500,000 long-lived objects; with the
    collector on, each full collection during the imports walks all of them again (seven
    times, ~1.5 s of a 6 s import on 2 cores). ``gc.freeze()`` moves them out of its reach,
    so the collections during training and prediction stay short too. Does nothing when
    the collector was not paused (an in-process caller such as a test).
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def skip_unconfigured_heartbeats() -> None:
    """Run this command's flows without Prefect's heartbeat thread unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set.

    A flow run started by hand lives and dies with this process; its heartbeats (Prefect's
    default: one every 180 s) only feed automations that mark a silent run Crashed, and
    imgflow's apply those to deployment runs, which set the frequency themselves. The
    thread costs every flow run up to 1 s at its end (Prefect joins it, and it sleeps in
    1 s steps): three flow runs in ``imgflow train``. A frequency set in the environment or
    the Prefect profile is kept. The setting lasts for the rest of the process (the
    command is the process; an in-process caller such as a test keeps it too).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" not in get_current_settings().flows.model_fields_set:
        _PROCESS_SETTINGS.enter_context(temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))


def reused_validation(data_dir: Path, val_dir: Optional[Path], workdir: Path, options: Any,
                      report: Optional[Path]) -> Optional[dict[str, Any]]:
    """The summary of an unchanged report when no Prefect API is configured, else None (run the flow).

    Answering from the report skips the temporary server's start-up: there is nothing
    to orchestrate. With ``PREFECT_API_URL`` set the flow runs, so the run is recorded.
    """
    from imgflow.flows.server import configured_api_url
    from imgflow.tasks.validation_reuse import reusable_summary

    if configured_api_url():
        return None
    summary = reusable_summary(data_dir, val_dir, workdir, options, report)
    if summary is not None:
        typer.echo(f"Reusing {summary['report_path']}: the files, options and code are unchanged")
    return summary


def reused_shards(data_dir: Path, val_dir: Optional[Path], workdir: Path, cfg: ImgflowConfig) -> Optional[dict[str, Any]]:
    """The result of an unchanged ``imgflow preprocess`` when no Prefect API is configured, else None (run the flow).

    Unchanged means the validation report is reusable (:func:`reused_validation`) and the
    shards its files and the options give are complete: answered from the manifest
    without starting Prefect or importing TensorFlow. With ``PREFECT_API_URL`` set (or a
    Dask cluster named) the flow runs, so the run is recorded.
    """
    if cfg.preprocess.dask_address:
        return None
    validation = reused_validation(data_dir, val_dir, workdir, cfg.validation, None)
    if validation is None or not validation["usable"]:
        return None
    from imgflow.tasks import tfrecords
    from imgflow.tasks.atomic import read_json

    result = tfrecords.reusable_shards(read_json(validation["report_path"]), cfg.preprocess,
                                       Path(workdir).absolute() / tfrecords.TFRECORDS_DIR)
    if result is not None:
        typer.echo(f"Reusing {result['manifest']}: the files, options and code are unchanged")
        for warning in tfrecords.split_warnings(result["per_class"]):
            typer.echo(f"Warning: {warning}")
    return result


SERVER_COMMANDS = {"preprocess", "train", "evaluate", "predict", "doctor", "demo"}  # all of them use TensorFlow
# main() starts the temporary Prefect server first thing for these; preprocess, like
# validate, first checks whether it can answer from its outputs without Prefect
EARLY_SERVER_COMMANDS = SERVER_COMMANDS - {"preprocess"}


def ready_for_flows(ahead: validate_ahead.Child | None = None) -> None:
    """Right before a command's first flow: import TensorFlow while the early server boots, then wait for it.

    ``ahead``: the child validating the data meanwhile (:mod:`imgflow.flows.validate_ahead`), waited for too.
    """
    preload_tensorflow()
    if ahead is not None:
        ahead.finish()
    wait_for_prefect()


def preload_tensorflow() -> None:
    """Import TensorFlow and Keras now, while the temporary server boots in its own process.

    The first flow run waits for the server's health check; importing TensorFlow, Keras
    and Prefect before that wait (instead of after it, inside the flow's first task)
    takes the imports off the critical path.
    """
    from imgflow.tasks.lean_imports import import_frameworks

    import_frameworks()
    import prefect  # noqa: F401 - the flows' own import, also off the critical path


@app.command()
def info(workdir: Path = WorkdirOption,
         devices: bool = typer.Option(True, "--devices/--no-devices", help="list the devices TensorFlow sees (imports it)")) -> None:
    """Versions of imgflow, TensorFlow, Keras and Prefect; devices; what the workdir holds."""
    from imgflow.flows.info import devices as list_devices, info_lines

    for line in info_lines(workdir, list_devices() if devices else None):
        typer.echo(line)


@app.command()
def validate(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/<class>/*.jpg"),
    val_dir: Optional[Path] = ValDirOption,
    report: Optional[Path] = typer.Option(None, "--report", help="write the JSON report here (default: WORKDIR/validation.json)"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 on any problem, warnings included"),
    workdir: Path = WorkdirOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Check every image of a class-folder dataset and report what would hurt training."""
    require_workdir(workdir)
    require_output_file(report, "--report")
    require_dir(data_dir, "DATA_DIR")
    if val_dir is not None:
        require_dir(val_dir, "VAL_DIR")
    check_paths({"DATA_DIR": data_dir, "VAL_DIR": val_dir}, workdir, {"--report": report})
    options = build_config(config).validation
    from imgflow.tasks.atomic import read_json

    summary = reused_validation(data_dir, val_dir, workdir, options, report)
    if summary is None:
        start_prefect_early()  # before anything imports Prefect: its settings must see the early server
    run = start("validate", workdir, tensorflow=False, prefect=summary is None)
    if summary is None:
        from imgflow.flows.validation import validate_flow

        wait_for_prefect()
        summary = validate_flow(data_dir=data_dir, val_dir=val_dir, workdir=workdir, options=options, report=report)
    full = read_json(summary["report_path"])
    stats = full["stats"]
    typer.echo(f"\nScanned {stats['files_scanned']} files: {stats['usable_files']} usable, "
               f"{stats['excluded_files']} excluded; {summary['errors']} errors, {summary['warnings']} warnings.")
    val = full.get("val_classes") or {}
    for name, count in summary["classes"].items():
        typer.echo(f"  {name:<24} {count:>7} images" + (f"   {val.get(name, 0):>6} validation" if val else ""))
    typer.echo("Image modes: " + ", ".join(f"{k} {v}" for k, v in stats["modes"].items()))
    for problem in full["problems"][:10]:
        typer.echo(f"  {problem['severity']:<7} {problem['code']:<20} {problem['path']}: {problem['message']}")
    if len(full["problems"]) > 10:
        typer.echo(f"  … {len(full['problems']) - 10} more problems")
    from imgflow.tasks.paths import summary_path

    typer.echo(f"Full report: {Path(summary['report_path']).absolute()} (and {summary_path(summary['report_path'])})")
    if not summary["usable"]:
        finish(run, "")
        fail("the dataset is not usable for training: it needs at least 2 classes with usable images", EXIT_FAILED_CHECK)
    if strict and full["problems"]:
        finish(run, "")
        fail(f"--strict: {len(full['problems'])} problems found", EXIT_FAILED_CHECK)
    finish(run, f"Usable: {stats['usable_files']} images in {len(summary['classes'])} classes"
                + (f" ({len(full['problems'])} problems reported)" if full["problems"] else ""))


@app.command()
def preprocess(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/<class>/*.jpg"),
    val_dir: Optional[Path] = ValDirOption,
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="held-out share when there is no --val-dir (default 0.1)"),
    workdir: Path = WorkdirOption,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="square side in pixels (default 128)"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dask_address: Optional[str] = DaskOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Validate, then write TFRecord shards and manifest.json (cached: unchanged data does no work)."""
    require_workdir(workdir)
    require_dir(data_dir, "DATA_DIR")
    if val_dir is not None:
        require_dir(val_dir, "VAL_DIR")
        if val_fraction is not None:
            fail("give --val-dir or --val-fraction, not both", EXIT_USAGE)
    check_paths({"DATA_DIR": data_dir, "VAL_DIR": val_dir}, workdir, {})
    cfg = build_config(config, val_fraction=val_fraction, image_size=image_size, seed=seed, dask_address=dask_address)
    result = reused_shards(data_dir, val_dir, workdir, cfg)
    if result is None:
        start_prefect_early()  # before anything imports Prefect: its settings must see the early server
        with validate_ahead.head_start(data_dir, val_dir, workdir, cfg.validation) as ahead:
            run = start("preprocess", workdir)
            from imgflow.flows.preprocessing import preprocess_flow

            ready_for_flows(ahead)
        result = preprocess_flow(data_dir=data_dir, val_dir=val_dir, workdir=workdir, config=cfg)
    else:
        run = start("preprocess", workdir, tensorflow=False, prefect=False)
    counts = result["counts"]
    run.add(f"{'Reused cached' if result['cached'] else 'Wrote'} {result['shards']} shards: "
            f"{counts.get('train', 0)} train, {counts.get('val', 0)} val images.")
    run.path("Manifest", result["manifest"])
    finish(run, f"Ready to train: {counts.get('train', 0) + counts.get('val', 0)} images in shards")


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/<class>/*.jpg"),
    val_dir: Optional[Path] = ValDirOption,
    workdir: Path = WorkdirOption,
    config: Optional[Path] = ConfigOption,
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    model: Optional[str] = typer.Option(None, "--model", help="built-in name or package.module:function"),
    weights: Optional[str] = typer.Option(None, "--weights", help="pretrained backbone weights: imagenet (Keras "
                                          "cache, ~/.keras/models) or a local file; fine-tunes in two phases"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam, adamw, sgd or rmsprop"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    force: bool = typer.Option(False, "--force", help="train even if data and config are unchanged since the champion"),
    no_wait: bool = typer.Option(False, "--no-wait", help="exit 2 at once when another imgflow writes to this workdir"),
) -> None:
    """Run the whole training pipeline: validate, preprocess, train, evaluate, promote."""
    require_workdir(workdir)
    note_outputs(workdir)
    require_dir(data_dir, "DATA_DIR")
    if val_dir is not None:
        require_dir(val_dir, "VAL_DIR")
    check_paths({"DATA_DIR": data_dir, "VAL_DIR": val_dir}, workdir, {})
    cfg = build_config(config, epochs=epochs, image_size=image_size, batch_size=batch_size, model=model,
                       weights=weights, optimizer=optimizer, learning_rate=learning_rate, seed=seed)
    from imgflow.tasks.backbones import ensure_weights

    ensure_weights(cfg.train.model, cfg.train.weights)  # before any work: imagenet cached or downloaded, or exit 2
    with validate_ahead.head_start(data_dir, val_dir, workdir, cfg.validation) as ahead:
        run = start("train", workdir)
        from imgflow.flows import console
        from imgflow.flows.training import training_pipeline
        ready_for_flows(ahead)
    result = training_pipeline(data_dir=data_dir, val_dir=val_dir, workdir=workdir, config=cfg, force=force,
                               wait_for_lock=not no_wait)
    console.train_summary(run, result)
    if result.get("promoted"):
        finish(run, result.get("reason", ""))
    else:
        run.add(result.get("reason", ""))
        finish(run, "")  # the cause of the failure is the last line
        from imgflow.tasks.doctor.findings import root_cause

        # the diagnosis ranks the root cause first (e.g. unnormalized_input above the nan_loss it caused)
        found = root_cause({"healthy": result.get("healthy", False), "findings": result.get("findings") or []})
        critical = found if found and found.get("severity") == "critical" else None
        cause = f"{critical['code']}: {critical['advice']}" if critical else result.get("reason")
        fail(f"not promoted — {cause or 'the model was rejected'}", EXIT_FAILED_CHECK)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="model directory, or 'champion'"),
    data_dir: Path = typer.Argument(..., help="labelled class folders to evaluate on"),
    workdir: Path = WorkdirOption,
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default: WORKDIR/evaluations/<run>)"),
    csv_neutralise: Optional[bool] = typer.Option(
        None, "--csv-neutralise/--no-csv-neutralise",
        help="prefix predictions.csv cells starting with = + - @ with ' so spreadsheets do not run them (default on)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per model call (default 64)"),
    config: Optional[Path] = ConfigOption,
    ood_dir: Optional[Path] = typer.Option(
        None, "--ood-dir", help="images known to be none of the classes: report the novelty AUROC against them"),
) -> None:
    """Evaluate a model on a labelled folder: metrics.json, PNG plots, report.html."""
    require_workdir(workdir)
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: evaluate writes a report folder; give a folder path", EXIT_USAGE)
    require_dir(data_dir, "DATA_DIR")
    options = build_config(config, evaluate={"batch_size": batch_size, "csv_neutralise": csv_neutralise}).evaluate
    check_paths({"DATA_DIR": data_dir}, workdir, {"--out": out})
    if ood_dir is not None:
        require_dir(ood_dir, "--ood-dir")
    run = start("evaluate", workdir)
    from imgflow.flows.evaluation import evaluate_flow

    ready_for_flows()
    result = evaluate_flow(model=model, data_dir=data_dir, workdir=workdir, out=out, options=options, ood_dir=ood_dir)
    run.add(f"Accuracy: {result['accuracy']:.4f} ({result.get('skipped', 0)} unreadable files skipped)")
    if result.get("non_finite_outputs"):
        run.add(f"{result['non_finite_outputs']} of {result['count']} images got NaN or infinite model outputs "
                "(counted wrong; the model cannot be promoted)")
    if result.get("novelty_auroc") is not None:
        run.add(f"Novelty AUROC against --ood-dir: {result['novelty_auroc']:.4f}")
    run.path("Report", result["report_html"])
    run.path("Metrics", result["metrics_json"])
    finish(run, f"Evaluated {result.get('count', '?')} images: accuracy {result['accuracy']:.4f}")


@app.command()
def predict(
    model: str = typer.Argument(..., help="model directory, or 'champion'"),
    input_dir: Path = typer.Argument(..., help="folder of images to classify (searched recursively)"),
    workdir: Path = WorkdirOption,
    out: Optional[Path] = typer.Option(None, "--out", help="CSV file to write (default: WORKDIR/predictions/<INPUT_DIR name>.csv)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per model call (default 256)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="also write the k best labels per file"),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="files per chunk task (default 1024)"),
    dask_address: Optional[str] = DaskOption,
    config: Optional[Path] = ConfigOption,
    csv_neutralise: Optional[bool] = typer.Option(
        None, "--csv-neutralise/--no-csv-neutralise",
        help="prefix cells starting with = + - @ with ' so spreadsheets do not run them (default on)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="exit 2 at once when another imgflow writes to this workdir"),
    unknown_label: Optional[str] = typer.Option(
        None, "--unknown-label", help="write this label instead of the most likely class for unknown files"),
) -> None:
    """Classify every image under INPUT_DIR into one CSV row each (resumable)."""
    require_workdir(workdir)
    require_output_file(out, "--out")
    note_outputs(out, workdir)
    require_dir(input_dir, "INPUT_DIR")
    options = build_config(config, predict={"out": out, "batch_size": batch_size, "top_k": top_k,
                                            "chunk_size": chunk_size, "dask_address": dask_address,
                                            "csv_neutralise": csv_neutralise}).predict
    check_paths({"INPUT_DIR": input_dir}, workdir, {"--out": options.out})
    if not options.dask_address:
        from imgflow.tasks import decoding

        decoding.start()  # the decoding processes import Pillow while this one imports TensorFlow
    run = start("predict", workdir)
    from imgflow.flows.prediction import batch_predict

    ready_for_flows()
    result = batch_predict(model=model, input_dir=input_dir, workdir=workdir, options=options,
                           unknown_label=unknown_label, wait_for_lock=not no_wait)
    unknown = result.get("unknown")
    run.add(f"{result['rows']} rows, {result['errors']} unreadable files"
            + (f", {unknown} unknown (novelty above the calibrated threshold)" if unknown is not None else "") + f", {result['images_per_second']:.0f} images/s")
    for label, count in result["label_counts"].items():
        run.add(f"  {label:<24} {count:>7}")
    run.path("Predictions", result["csv"])
    run.path("Drift report", result.get("drift_json"))
    if result.get("drift"):
        run.add(f"Warning: this inbox drifted from the training data, see {result['drift_json']}")
    classified = result["rows"] - result["errors"]
    finish(run, f"Classified {classified} of {result['rows']} files" +
           (f"; {result['errors']} could not be read (see the error column)" if result["errors"] else ""))


@app.command()
def doctor(
    model: Optional[str] = typer.Argument(None, help="built-in model name, package.module:function, or a model directory"),
    data_dir: Optional[Path] = typer.Argument(None, help="DATA_DIR/<class>/*.jpg"),
    workdir: Path = WorkdirOption,
    config: Optional[Path] = ConfigOption,
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate"),
    label_issues: Optional[Path] = typer.Option(
        None, "--label-issues", metavar="DATA_DIR",
        help="rank the images of DATA_DIR whose label a quick cross-validated model disputes "
        "(WORKDIR/label_issues.csv and .html); MODEL and DATA_DIR are then optional"),
    lr_find: bool = typer.Option(False, "--lr-find", help="run a learning-rate range test on DATA_DIR first "
                                 "(lr_finder.png in the doctor's folder), print the suggested rate, probe at it"),
) -> None:
    """Check a model before a long run: preflight checks and a short probe training."""
    if label_issues is not None:
        _doctor_label_issues(require_dir(label_issues, "DATA_DIR"), workdir, build_config(config))
        if model is None:
            return
    if model is None or data_dir is None:
        fail("doctor needs MODEL_OR_BUILDER and DATA_DIR (or --label-issues DATA_DIR)", EXIT_USAGE)
    require_workdir(workdir)
    require_dir(data_dir, "DATA_DIR")
    check_paths({"DATA_DIR": data_dir}, workdir, {})
    if lr_find and learning_rate is not None:
        fail("give --lr-find (a range test picks the rate) or --learning-rate, not both", EXIT_USAGE)
    cfg = build_config(config, image_size=image_size, optimizer=optimizer,
                       learning_rate="auto" if lr_find else learning_rate)
    run = start("doctor", workdir)
    from imgflow.flows.doctor import doctor_flow

    ready_for_flows()
    diagnosis = doctor_flow(model=model, data_dir=data_dir, workdir=workdir, config=cfg)
    run.add(f"Healthy: {'yes' if diagnosis['healthy'] else 'no'}")
    for finding in diagnosis["findings"][:10]:
        run.add(f"  [{finding['severity']}] {finding['code']}: {finding['advice']}")
    run.path("Diagnosis", diagnosis.get("diagnosis_path"))
    if lr_find:
        found = diagnosis.get("lr_finder") or {}
        run.add(f"Suggested learning rate: {found['suggested']:.3g} (range test over {found['steps']} steps, "
                f"lowest loss at {found['min_loss_lr']:.3g})" if found.get("suggested") else
                f"Suggested learning rate: none ({found.get('reason', 'the range test found no usable loss curve')})")
        run.path("LR finder", found.get("plot"))
    if not diagnosis["healthy"]:
        from imgflow.tasks.doctor.findings import root_cause

        finish(run, "")
        cause = root_cause(diagnosis)
        fail(f"{cause['code']}: {cause['advice']}", EXIT_FAILED_CHECK)
    finish(run, "Healthy: nothing stops a full training run")


def _doctor_label_issues(data_dir: Path, workdir: Path, cfg: ImgflowConfig) -> None:
    """``imgflow doctor --label-issues``: run the check, print the top candidates."""
    from imgflow.flows.doctor import label_issues_flow

    result = label_issues_flow(data_dir, workdir=workdir, config=cfg)
    typer.echo(f"\n{result['candidates']} of {result['images']} training images may be mislabelled"
               + (", most disputed first:" if result["top"] else "."))
    for row in result["top"]:
        typer.echo(f"  {row['path']}: labelled {row['given']} ({row['given_prob']:.2f}), "
                   f"looks like {row['predicted']} ({row['predicted_prob']:.2f})")
    typer.echo(f"All candidates: {result['csv']}; gallery: {result['html']}")


@app.command()
def serve(
    data_dir: Path = typer.Argument(..., help="DATA_DIR/<class>/*.jpg to retrain on"),
    inbox: Path = typer.Option(..., "--inbox", help="folder whose new images are classified every hour"),
    workdir: Path = WorkdirOption,
    config: Optional[Path] = ConfigOption,
    val_dir: Optional[Path] = ValDirOption,
    train_cron: str = typer.Option("0 2 * * *", "--train-cron", help="when to retrain (cron)"),
    predict_cron: str = typer.Option("0 * * * *", "--predict-cron", help="when to classify the inbox (cron)"),
    timezone: str = typer.Option("UTC", "--timezone"),
    limit: int = typer.Option(2, "--limit", help="flow runs at once in this process"),
    dask_address: Optional[str] = DaskOption,
) -> None:
    """Serve the nightly retraining and hourly prediction deployments from this process (needs a Prefect server)."""
    from imgflow.flows.serve import check_api_url, serve_deployments

    url = check_api_url()  # NoServerError, ServeConflict: usage errors, one line, exit 2
    serve_deployments(data_dir, inbox, workdir=workdir, config_file=config, val_dir=val_dir,
                      train_cron=train_cron, predict_cron=predict_cron, timezone=timezone, limit=limit,
                      dask_address=dask_address,
                      announce=lambda: typer.echo(
                          f"serving scheduled-retraining/nightly-retraining (cron {train_cron}) and "
                          f"batch-predict/hourly-inbox-predictions (cron {predict_cron}) on {url}; "
                          "Ctrl-C stops and pauses the schedules"))


@app.command()
def watch(
    inbox: Path = typer.Argument(..., help="folder to watch (recursively) for new or changed images"),
    interval: float = typer.Option(10.0, "--interval", help="seconds between two polls (a poll only stats files)"),
    settle: float = typer.Option(30.0, "--settle", help="seconds the inbox must stay unchanged before an event"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="a workdir inside INBOX, not watched"),
    report_existing: bool = typer.Option(False, "--report-existing", help="report files already there at start"),
    max_polls: Optional[int] = typer.Option(None, "--max-polls", help="stop after N polls (default: run until Ctrl-C)"),
) -> None:
    """Emit the Prefect event imgflow.inbox.changed when files arrive in INBOX and settle (needs a Prefect server)."""
    from imgflow.flows.serve import check_api_url
    from imgflow.flows.watch import run_watch

    require_dir(inbox, "INBOX")
    url = check_api_url()
    typer.echo(f"watching {inbox} every {interval:g} s (settle {settle:g} s); events go to {url}; Ctrl-C stops")
    run_watch(inbox, interval, settle, [workdir] if workdir else None, report_existing, max_polls, log=typer.echo)


@app.command()
def demo(workdir: Path = WorkdirOption) -> None:
    """Real 3-class handwritten-digit data through the whole pipeline, then batch prediction."""
    require_workdir(workdir)
    run = start("demo", workdir)
    from imgflow.flows.demo import run_demo

    ready_for_flows()
    result = run_demo(workdir=workdir)
    for key, value in result.items():
        run.add(f"{key:<22} {value}")
    if not result["promoted"]:
        finish(run, "")
        fail(f"the demo model was not promoted: {result['reason']}", EXIT_FAILED_CHECK)
    finish(run, f"Demo done: the model was promoted ({result['reason']})")


def main() -> None:
    """Console entry point: quiet TensorFlow's start-up chatter, keep real warnings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # this machine may be offline: no usage telemetry from a temporary Prefect server
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # nor from the client (and no first-run notice in the terminal)
    # the temporary server logs its shutdown after our last line; keep the cause of a
    # failure the last thing the user reads
    logging.getLogger("prefect").addFilter(
        lambda record: not record.getMessage().startswith("Stopping temporary server")
    )
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in EARLY_SERVER_COMMANDS and not {"--help", "-h"} & set(sys.argv[1:]):
        start_prefect_early()  # the commands call ready_for_flows() once their options are checked
    if command in SERVER_COMMANDS or command == "validate":
        gc.disable()  # until the imports are done: collect_garbage_from_here(), before the first flow
    try:
        app()
    except SystemExit as exc:
        if command in SERVER_COMMANDS:  # nothing left to write: skip the slow interpreter teardown
            from imgflow.flows.server import exit_now

            if isinstance(exc.code, str):
                typer.echo(exc.code, err=True)
            exit_now(exc.code)
        raise
    except KeyboardInterrupt:
        typer.echo("imgflow: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
