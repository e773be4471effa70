"""Batch prediction of an image folder into one CSV: scan, mapped chunk tasks, assemble.

``batch_predict`` is a Prefect flow and a plain Python call (a notebook can call it
with the same arguments as ``imgflow predict``)::

    from imgflow.flows.prediction import batch_predict
    summary = batch_predict("champion", "inbox/", workdir="imgflow-work")

Where things go:

* the CSV: ``out``, by default ``<workdir>/predictions/<INPUT_DIR name>.csv``;
* part files: ``<workdir>/predictions/runs/<hash of model, INPUT_DIR, out>/part-<group key>.csv``,
  one per small content-defined group of about ``GROUP_SIZE`` files (16 to 64). They are kept
  after a run: the next run over the same inbox skips every group whose files are unchanged
  and predicts only groups holding new or changed files (a task bundles such groups up to
  ``chunk_size`` files, so the model still sees full batches); parts
  of chunks that no longer exist are deleted once the CSV is assembled, and so are the
  run folders of the same INPUT_DIR and output made with an older model (a new
  champion predicts the whole inbox again, once).

Chunks run as Prefect tasks on a local thread pool, or on an existing Dask cluster
(``dask_address``, through ``prefect-dask``); each worker process loads the model once.
Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imgflow.flows.config import DEFAULT_WORKDIR
from imgflow.flows.locking import with_workdir_lock
from imgflow.flows.retrying import retry_unless
from imgflow.tasks import paths, progress
from imgflow.tasks.errors import OptionError
from imgflow.tasks import prediction as P
from imgflow.tasks.atomic import write_json
from imgflow.tasks.options import PredictOptions, with_overrides

GROUP_SIZE = 32  # files per part file on average (16 to 64): what a new file costs to re-predict
LOCAL_CHUNK_WORKERS = 2  # one chunk decoding while another is on the model


@task(
    name="predict-files",
    task_run_name="predict-files-{key}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless(ValueError),
)
def predict_groups_task(key: str, model_dir: str, input_dir: str, groups: str, batch_size: int) -> dict[str, Any]:
    """Predict the file groups that have no part file yet; write one part file per group atomically.

    ``groups`` is JSON text of ``[part file, [[rel, size, mtime_ns, error], ...]]`` pairs:
    a list of ~1,000 file records as a parameter costs Prefect a visit of each one
    (0.1 s a task), text costs it nothing.
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # a Dask worker runs only this task: keep its TensorFlow start-up quiet too
    return P.predict_groups(model_dir, input_dir, json.loads(groups), batch_size=batch_size)


def default_output(input_dir: Path | str, workdir: Path | str = DEFAULT_WORKDIR) -> Path:
    """``<workdir>/predictions/<INPUT_DIR name>.csv`` (``predictions.csv`` for a nameless root)."""
    name = Path(input_dir).resolve().name or "predictions"
    return Path(workdir) / "predictions" / f"{name}.csv"


def _resolve_model(model: str | Path, workdir: Path) -> Path:
    from imgflow.tasks.registry import RegistryError, resolve_model_dir

    try:
        return resolve_model_dir(str(model), workdir)
    except RegistryError as exc:  # the CLI maps FileNotFoundError to exit code 2 (bad input)
        raise FileNotFoundError(f"MODEL: {exc}") from exc


def _task_runner(dask_address: str | None) -> Any:
    if dask_address:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise OptionError(
                f"dask_address {dask_address!r}: needs prefect-dask, which is not installed "
                "(pip install 'imgflow[dask]')"
            ) from exc
        return DaskTaskRunner(address=dask_address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=LOCAL_CHUNK_WORKERS)


def _window(runner: Any) -> int:
    """How many chunks may be in flight: enough to keep every worker busy, few enough to stay flat."""
    client = getattr(runner, "_client", None)
    if client is not None:
        try:
            return max(2, 2 * sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - the window is only a tuning knob
            return 8
    return LOCAL_CHUNK_WORKERS + 1


def _publish(summary: dict[str, Any], input_dir: Path) -> None:
    from prefect.artifacts import create_table_artifact

    from imgflow.tasks.drift import report_path

    table = [{"label": label, "files": count} for label, count in summary["label_counts"].items()]
    table.append({"label": "(unreadable)", "files": summary["errors"]})
    create_table_artifact(
        key="batch-predictions-labels",
        table=table,
        description=f"Predicted labels for {input_dir} ({summary['rows']} files, "
        f"{summary['images_per_second']:.0f} images/s this run)",
    )
    csv = Path(summary["csv"]).resolve()
    # a table of paths, not file:// links: the UI runs elsewhere and cannot open local files
    create_table_artifact(
        key="batch-predictions-files",
        table=[{"file": "predictions CSV (path, label, confidence, novelty, unknown, prob_<class>..., error)",
                "path": str(csv)},
               {"file": "drift report", "path": str(report_path(csv))}],
        description="Where the outputs are (paths on the machine that ran the flow)",
    )


def _drift(model_dir: Path, metadata: dict[str, Any], parts: list[Path], summary: dict[str, Any],
           out: Path, workdir: Path, input_dir: Path) -> dict[str, Any]:
    """Write ``<csv name>.drift.json``, publish it, and warn + emit ``imgflow.inbox.drift`` when it drifted."""
    from prefect.artifacts import create_markdown_artifact

    from imgflow.flows import events
    from imgflow.tasks.drift import run_report

    logger = get_run_logger()
    report = run_report(model_dir, metadata, parts, summary, out)
    if metadata.get("novelty") is None:
        logger.warning("model %s has no novelty statistics: the novelty/unknown columns are empty; fit them with "
                       "`python -m imgflow.tasks.novelty %s` or `imgflow evaluate`", model_dir, model_dir)
    rows = [f"| {name} | {v['distance']:.3f} | {v['threshold']:.3f} | {'**yes**' if v['drift'] else 'no'} |"
            for name, v in report["properties"].items()]
    share = report["unknown_share"]
    create_markdown_artifact(
        key="batch-predictions-drift",
        markdown="\n".join([
            f"# Inbox drift: {'**DRIFT**' if report['drift'] else 'none'}", "",
            f"unknown share: {'n/a' if share is None else f'{share:.3f}'} "
            f"(calibrated rate {report['unknown_rate']}); class-share distance {report['class_shares']['distance']:.3f}",
            "", "| property | JS distance | threshold | drift |", "|---|---|---|---|", *rows, "",
            *[f"- {reason}" for reason in report["reasons"]],
        ]),
        description=f"Drift of {summary['csv']} against the training data ({report['path']})",
    )
    if report["drift"]:
        logger.warning("inbox drift in %s: %s (details in %s)", out, "; ".join(report["reasons"]), report["path"])
        events.inbox_drift(workdir, input_dir, report, model_dir, report["path"])
    return report


@flow(name="batch-predict")
@with_workdir_lock("imgflow predict")
def batch_predict(
    model: str | Path,
    input_dir: Path,
    workdir: Path = DEFAULT_WORKDIR,
    out: Path | None = None,
    batch_size: int | None = None,
    dask_address: str | None = None,
    top_k: int | None = None,
    chunk_size: int | None = None,
    csv_neutralise: bool | None = None,
    options: PredictOptions | None = None,
    unknown_label: str | None = None,
    wait_for_lock: bool = True,
) -> dict[str, Any]:
    """Classify every file under INPUT_DIR into one CSV row each; resumable.

    Args:
        model: a model directory, a run id in ``<workdir>/models``, or ``"champion"``.
        input_dir: folder of images, searched recursively (symlinks never lead out of it).
        workdir: the imgflow work folder (champion pointer, part files, default output).
        out: the CSV to write; default ``<workdir>/predictions/<INPUT_DIR name>.csv``.
        batch_size: images per model call (default 256).
        dask_address: scheduler address of an existing Dask cluster to run chunks on.
        top_k: also write ``top<i>_label``/``top<i>_prob`` for the k best classes.
        chunk_size: target files per chunk task (chunks hold between half and twice this; default 1024).
        csv_neutralise: prefix cells starting with ``=``, ``+``, ``-``, ``@``, tab or CR
            with ``'`` so spreadsheets show them as text (False: raw paths and names; default True).
        options: the ``predict`` section of the config; the arguments above, when given, win over it.
        wait_for_lock: wait for another writer of ``workdir`` (the run holds its lock);
            False raises ``imgflow.tasks.errors.LockHeld`` at once.
        unknown_label: write this name as the ``label`` of rows flagged ``unknown``
            (default: the most likely class, so existing consumers keep working).

    Returns:
        ``{"csv", "rows", "errors", "label_counts", "images_per_second", "skipped_chunks",
        "chunks", "predicted", "worker_processes", "seconds", "model_dir", "run_dir", "unknown", "drift"}``
        (``drift`` is the overall flag of ``<csv name>.drift.json``; ``chunks`` and
        ``skipped_chunks`` count part-file groups: all of them, and those already done); ``images_per_second``
        counts the files predicted in this run (0 when every chunk was already done).

    Raises:
        FileNotFoundError: INPUT_DIR is not a folder, or MODEL is not a model directory.
        ValueError: an option out of range, or a model whose outputs do not match its metadata.
        imgflow.tasks.paths.PathConflict: (a ValueError) ``out`` or ``workdir`` is, or lies
            inside, INPUT_DIR (a work folder inside INPUT_DIR is allowed and never scanned).
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    logger = get_run_logger()
    opts = with_overrides(options or PredictOptions(), out=out, batch_size=batch_size, dask_address=dask_address,
                          top_k=top_k, chunk_size=chunk_size, csv_neutralise=csv_neutralise)
    out, batch_size, dask_address, top_k, chunk_size = opts.out, opts.batch_size, opts.dask_address, opts.top_k, opts.chunk_size
    if not dask_address:
        from imgflow.tasks import decoding

        decoding.start()  # local chunk tasks hand their files to these processes (once per process)
    csv_neutralise = opts.csv_neutralise
    workdir, input_dir = Path(workdir), Path(input_dir)
    if not input_dir.is_dir():
        found = "a file" if input_dir.exists() else "nothing there"
        raise FileNotFoundError(f"INPUT_DIR {input_dir}: expected a folder of images, found {found}")
    model_dir = _resolve_model(model, workdir)
    metadata = P.read_metadata(model_dir)
    class_names = list(metadata["class_names"])
    out = Path(out) if out is not None else default_output(input_dir, workdir)
    inputs = {"INPUT_DIR": input_dir}
    paths.check_run(inputs, workdir, {"--out": out})  # outputs never touch inputs (exit 2)
    if paths.workdirs_to_skip(workdir, inputs):
        logger.warning("The work folder %s lies inside INPUT_DIR; it is never scanned as input", workdir)
    run_dir = P.run_dir_for(workdir, model_dir, input_dir, out)
    model_id = P.model_identity(model_dir)
    write_json(
        run_dir / "run.json",
        {"model": model_id, "model_dir": str(model_dir), "input_dir": str(input_dir.resolve()),
         "out": str(out.resolve()), "class_names": class_names, "image_size": metadata["image_size"],
         "aspect": metadata["aspect"]},
    )
    logger.info("predicting %s with %s (classes %s) into %s", input_dir, model_dir, class_names, out)

    started = time.perf_counter()
    keys: list[str] = []
    skipped = predicted = 0
    pids: set[int] = set()
    failure: BaseException | None = None
    in_flight: deque[Any] = deque()

    def collect(future: Any) -> None:
        nonlocal predicted, failure
        try:
            result = future.result()
        except BaseException as exc:  # noqa: BLE001 - keep waiting for the others, re-raised below
            failure = failure or exc
            return
        predicted += result["rows"]
        pids.add(result["pid"])

    scan = P.scan_files(input_dir, exclude=[out, workdir])
    group_size = max(1, min(GROUP_SIZE, chunk_size))
    with _task_runner(dask_address) as runner, progress.track("predict", unit="files") as bar:
        window = _window(runner)
        # groups without a part file, sent as one task (as JSON text: Prefect does not visit every file's record)
        bundle: list[tuple[str, list[list[Any]]]] = []
        bundled = 0

        def send() -> None:
            nonlocal bundle, bundled
            while len(in_flight) >= window:
                collect(in_flight.popleft())
            if failure is None:
                in_flight.append(runner.submit(predict_groups_task, parameters={
                    "key": Path(bundle[0][0]).stem.removeprefix(P.PART_PREFIX), "model_dir": str(model_dir),
                    "input_dir": str(input_dir.resolve()), "groups": json.dumps(bundle), "batch_size": batch_size}))
            bundle, bundled = [], 0

        # part files are keyed per small content-defined group (about GROUP_SIZE files): a new
        # file re-predicts its group only; tasks still get about chunk_size files each
        for group in P.chunk_entries(scan, group_size):
            key = P.chunk_key(model_id, group)
            keys.append(key)
            bar.add_total(len(group))
            part = P.part_path(run_dir, key)
            if P.part_done(part):
                bar.advance(len(group))  # done by an earlier run
                skipped += 1
                continue
            bundle.append((str(part), [list(e) for e in group]))
            bundled += len(group)
            if bundled >= chunk_size:
                send()
            if failure is not None:
                break
        if bundle and failure is None:
            send()
        while in_flight:
            collect(in_flight.popleft())
    if failure is not None:
        raise failure
    seconds = time.perf_counter() - started

    parts = [P.part_path(run_dir, k) for k in keys]
    summary = P.assemble_csv(out, parts, class_names, top_k, csv_neutralise, unknown_label)
    drift_report = _drift(model_dir, metadata, parts, summary, out, workdir, input_dir)
    stale = P.remove_stale_parts(run_dir, keys)
    P.remove_stale_temporaries(run_dir)
    superseded = P.remove_superseded_runs(run_dir)
    summary.update(
        images_per_second=P.images_per_second(predicted, seconds),
        skipped_chunks=skipped,
        chunks=len(keys),
        predicted=predicted,
        worker_processes=len(pids),
        seconds=round(seconds, 3),
        model_dir=str(model_dir),
        run_dir=str(run_dir),
        drift=drift_report["drift"],
        drift_json=drift_report["path"],
    )
    logger.info(
        "%d rows (%d unreadable) in %s; %d of %d chunks already done, %d stale parts and %d runs of older "
        "models removed; %.1f images/s",
        summary["rows"], summary["errors"], out, skipped, len(keys), stale, len(superseded),
        summary["images_per_second"],
    )
    _publish(summary, input_dir)
    from imgflow.flows import events

    events.predictions_written(workdir, input_dir, summary)
    return summary
