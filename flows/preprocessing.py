"""The preprocessing stage as Prefect tasks and a flow: validated folder -> TFRecord shards.

``preprocess_flow`` validates first (and refuses unusable data), plans the shards, writes
them with one mapped task per shard (on the flow's thread pool, one thread per core, or,
with ``dask_address``, in a ``write-shards`` subflow on that Dask cluster through
``prefect_dask.DaskTaskRunner``), then writes ``manifest.json``.

Caching has two layers, both keyed by the plan's fingerprint (relative path, size and
mtime of every usable file + the options that shape the shards + the code version):

* the plan task finds a complete manifest for that fingerprint and the flow returns at
  once: no shard is opened, nothing is rewritten (this survives a fresh Prefect home);
* each shard task has a Prefect cache key (fingerprint + shard name + the task's source),
  and a shard already renamed into place is kept, so a crashed run resumes where it died.

Nothing heavy is imported at module import time: TensorFlow comes in when the flow runs
(``imgflow.tasks.tfrecords`` itself plans and checks the cache without it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from imgflow.flows.config import DEFAULT_WORKDIR, ImgflowConfig, PreprocessOptions
from imgflow.flows.retrying import retry_unless


def _shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Fingerprint (data + options + code version), output folder and shard name.

    The same data, options and code give the same shard; the folder keeps two workdirs
    over the same data from answering for each other.
    """
    out_dir = Path(parameters["plan_path"]).parent.resolve()
    return f"tfrecord-shard-{parameters['fingerprint']}-{hashlib.sha256(str(out_dir).encode()).hexdigest()[:16]}-{parameters['shard_file']}"


SHARD_CACHE_POLICY = CachePolicy.from_cache_key_fn(_shard_cache_key) + TASK_SOURCE


def worker_count(options: PreprocessOptions) -> int:
    """Parallel writers: threads of the Dask cluster at ``dask_address``, else this machine's cores."""
    if options.dask_address:
        from distributed import Client

        try:
            with Client(options.dask_address, timeout="20s", set_as_default=False) as client:
                return max(1, sum(client.nthreads().values()))
        except OSError as exc:
            raise OSError(f"dask_address {options.dask_address!r}: cannot reach a Dask scheduler there: {exc}") from exc
    return os.cpu_count() or 1


def task_runner(options: PreprocessOptions, workers: int):
    """A Dask task runner on ``dask_address`` when set, else a thread pool of ``workers`` threads.

    Threads suffice locally: Pillow releases the GIL while it decodes, resizes and encodes,
    and TensorFlow while it writes, so the shard tasks run truly in parallel.
    """
    if options.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=options.dask_address)
    return ThreadPoolTaskRunner(max_workers=workers)


@task(name="plan-shards", cache_policy=NO_CACHE, timeout_seconds=1800)
def plan_task(report_path: Path, options: PreprocessOptions, out_root: Path, workers: int) -> dict[str, Any]:
    """Split, fingerprint and plan the shards; report whether a complete manifest already exists."""
    from imgflow.tasks import atomic, tfrecords

    plan = tfrecords.plan_shards(atomic.read_json(report_path), options, out_root, workers)
    done = tfrecords.complete_manifest(plan)
    files = tfrecords.listed_shard_files(done) if done is not None else tfrecords.plan_shard_files(plan)
    summary = {
        "fingerprint": plan["fingerprint"],
        "manifest": plan["manifest"],
        "out_dir": plan["out_dir"],
        "plan_path": str(Path(plan["out_dir"]) / tfrecords.PLAN_NAME),
        "cached": done is not None,
        "counts": {split: plan["splits"][split]["count"] for split in tfrecords.SPLITS},
        "per_class": {split: plan["splits"][split]["per_class"] for split in tfrecords.SPLITS},
        "shard_files": files,
    }
    if done is None:
        # Only a run that will write touches the folder: a cached run rewrites nothing.
        tfrecords.remove_temporaries(plan["out_dir"])
        tfrecords.write_plan(plan)
    return summary


@task(
    name="write-shard",
    cache_policy=SHARD_CACHE_POLICY,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless(ValueError, KeyError),
)
def write_shard_task(plan_path: str, fingerprint: str, shard_file: str) -> dict[str, Any]:
    """Decode, resize and encode one shard's images into a TFRecord file."""
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # a Dask worker runs only this task: keep its TensorFlow start-up quiet too
    from imgflow.tasks import atomic, tfrecords

    plan = atomic.read_json(plan_path)
    if plan["fingerprint"] != fingerprint:
        raise ValueError(f"{plan_path}: plan is for fingerprint {plan['fingerprint']}, expected {fingerprint}")
    return tfrecords.write_shard(plan, shard_file)


def _write_shards(plan_path: str, fingerprint: str, shard_files: list[str]) -> list[dict[str, Any]]:
    """Map one shard task per shard on the current flow's task runner; wait for all."""
    futures = write_shard_task.map(unmapped(plan_path), unmapped(fingerprint), shard_files)
    results = [future.result() for future in futures]
    # A Prefect cache hit for a shard whose file was deleted since: write it again.
    out_dir = Path(plan_path).parent
    missing = [r["file"] for r in results if not (out_dir / r["file"]).exists()]
    if missing:
        again = write_shard_task.with_options(refresh_cache=True).map(unmapped(plan_path), unmapped(fingerprint), missing)
        redone = {r["file"]: r for r in (future.result() for future in again)}
        results = [redone.get(r["file"], r) for r in results]
    return results


@flow(name="write-shards")
def write_shards_flow(plan_path: str, fingerprint: str, shard_files: list[str]) -> list[dict[str, Any]]:
    """Write every shard with one mapped task each, on this flow's task runner (Dask, for a cluster)."""
    return _write_shards(plan_path, fingerprint, shard_files)


@task(name="write-manifest", cache_policy=NO_CACHE, timeout_seconds=600)
def manifest_task(plan_path: str, results: list[dict[str, Any]]) -> str:
    """Check the shards and write manifest.json last."""
    from imgflow.tasks import atomic, tfrecords

    return str(tfrecords.write_manifest(atomic.read_json(plan_path), results))


def _publish_artifact(plan_summary: dict[str, Any], cached: bool) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [
        {"class": name, "train": plan_summary["per_class"]["train"].get(name, 0), "val": plan_summary["per_class"]["val"].get(name, 0)}
        for name in plan_summary["per_class"]["train"]
    ]
    create_table_artifact(
        key="preprocess-splits",
        table=rows,
        description=f"{'Reused' if cached else 'Wrote'} {len(plan_summary['shard_files'])} TFRecord shards: {plan_summary['manifest']}",
    )


def _reusable_validation(data_dir: Path, val_dir: Path | None, workdir: Path, config: ImgflowConfig) -> dict[str, Any] | None:
    """The summary of ``<workdir>/validation.json`` when these files, options and code give it again, else None."""
    from imgflow.tasks import paths
    from imgflow.tasks.validation_reuse import report_path_for, reusable_summary, validated_ahead

    if validated_ahead(report_path_for(workdir)):
        return None  # this command's first validation: its subflow runs (artifacts, events) and reuses it
    inputs = {"DATA_DIR": Path(data_dir), "VAL_DIR": Path(val_dir) if val_dir else None}
    paths.check_run(inputs, workdir, {})  # what validate_flow checks first, outputs never inside inputs
    summary = reusable_summary(Path(data_dir), inputs["VAL_DIR"], workdir, config.validation)
    if summary is not None:
        get_run_logger().info("Reusing %s: the files, options and code are unchanged", summary["report_path"])
    return summary


# Local default: one thread per core. A Dask cluster gets its own subflow (write_shards_flow).
@flow(name="preprocess", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1))
def preprocess_flow(
    data_dir: Path,
    val_dir: Path | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    config: ImgflowConfig | None = None,
) -> dict[str, Any]:
    """Validate DATA_DIR (and VAL_DIR), then write TFRecord shards and ``manifest.json``.

    Shards go in ``<workdir>/tfrecords/<fingerprint[:16]>/``. Unchanged data and options
    reuse the existing shards without touching them.

    Returns:
        ``{"manifest": str, "cached": bool, "counts": {"train": n, "val": n}, "shards": int,
        "validation": <validate_flow summary>}``.

    Raises:
        imgflow.tasks.dataset.DatasetUnusable: validation found the data unusable (the report says why).
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    from imgflow.flows.validation import validate_flow
    from imgflow.tasks.dataset import DatasetUnusable

    config = config or ImgflowConfig()
    options = config.preprocess
    # absolute: the plan and shard paths must mean the same on a Dask worker with another cwd
    workdir = Path(workdir).absolute()
    # an unchanged report is reused without a validation subflow run (its bookkeeping
    # was most of an unchanged re-run's time); otherwise validate as usual
    validation = _reusable_validation(data_dir, val_dir, workdir, config) or validate_flow(
        data_dir, val_dir, workdir, options=config.validation)
    if not validation["usable"]:
        raise DatasetUnusable(
            f"{data_dir}: validation found the data unusable ({validation['errors']} errors); "
            f"nothing was preprocessed. See {validation['report_path']}"
        )
    logger = get_run_logger()
    workers = worker_count(options)
    from imgflow.tasks.tfrecords import TFRECORDS_DIR, split_warnings

    plan = plan_task(Path(validation["report_path"]), options, workdir / TFRECORDS_DIR, workers)

    for warning in split_warnings(plan["per_class"]):
        logger.warning(warning)
    result = {
        "manifest": plan["manifest"],
        "cached": plan["cached"],
        "counts": plan["counts"],
        "shards": len(plan["shard_files"]),
        "validation": validation,
    }
    if plan["cached"]:
        logger.info("Data and options unchanged: reusing %d shards in %s", result["shards"], plan["out_dir"])
    else:
        logger.info("Writing %d shards (%d train, %d val images) with %d workers%s to %s",
                    result["shards"], plan["counts"]["train"], plan["counts"]["val"], workers,
                    f" on Dask at {options.dask_address}" if options.dask_address else "", plan["out_dir"])
        args = (plan["plan_path"], plan["fingerprint"], plan["shard_files"])
        if options.dask_address:
            shards = write_shards_flow.with_options(task_runner=task_runner(options, workers))(*args)
        else:
            # mapped on this flow's own thread pool: a subflow would add ~1.5 s of run bookkeeping
            from imgflow.tasks import progress

            with progress.track("shards", total=plan["counts"]["train"] + plan["counts"]["val"], unit="images"):
                shards = _write_shards(*args)
        result["manifest"] = manifest_task(plan["plan_path"], shards)
    _publish_artifact(plan, plan["cached"])
    return result
