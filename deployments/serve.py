"""Serve imgflow's two deployments from one process: no work pool, no worker.

The same deployments as ``deployments/prefect.yaml`` (nightly retraining, hourly
inbox predictions with the champion model), run by this process until Ctrl-C::

    prefect server start                      # another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py --data-dir data --inbox inbox --workdir imgflow-work \\
        [--config imgflow.yaml] [--train-cron "0 2 * * *"] [--predict-cron "0 * * * *"] \\
        [--dask-address tcp://scheduler:8786]

Trigger a run now from another terminal::

    prefect deployment run 'scheduled-retraining/nightly-retraining'
    prefect deployment run 'batch-predict/hourly-inbox-predictions'
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# let `python deployments/serve.py` work from a source checkout without installing imgflow
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "flows" / "serve.py").is_file() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from imgflow.flows.serve import (  # noqa: E402
    DEFAULT_PREDICT_CRON,
    DEFAULT_TIMEZONE,
    DEFAULT_TRAIN_CRON,
    build_deployments,
    serve_deployments,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of this script."""
    parser = argparse.ArgumentParser(description="Serve imgflow's nightly retraining and hourly prediction deployments.")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="training class folders (default: data)")
    parser.add_argument("--inbox", type=Path, default=Path("inbox"), help="folder classified every hour (default: inbox)")
    parser.add_argument("--workdir", type=Path, default=Path("imgflow-work"), help="imgflow work folder")
    parser.add_argument("--config", type=Path, default=None, help="flat YAML config for retraining")
    parser.add_argument("--val-dir", type=Path, default=None, help="separate validation class folders")
    parser.add_argument("--train-cron", default=DEFAULT_TRAIN_CRON, help=f"retraining schedule (default: {DEFAULT_TRAIN_CRON!r})")
    parser.add_argument("--predict-cron", default=DEFAULT_PREDICT_CRON, help=f"prediction schedule (default: {DEFAULT_PREDICT_CRON!r})")
    parser.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="time zone of the cron expressions")
    parser.add_argument("--limit", type=int, default=2, help="flow runs executed at once by this process")
    parser.add_argument("--dask-address", default=None, help="Dask scheduler for preprocessing and prediction chunks")
    parser.add_argument("--check", action="store_true", help="build the deployments, print them and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (or, with ``--check``, print the deployments and exit)."""
    args = parse_args(argv)
    if args.check:
        for deployment in build_deployments(
            args.data_dir, args.inbox, args.workdir, args.config, args.val_dir,
            args.train_cron, args.predict_cron, args.timezone, dask_address=args.dask_address,
        ):
            cron = deployment.schedules[0].schedule.cron
            print(f"{deployment.flow_name}/{deployment.name}  cron {cron!r}  {deployment.parameters}")
        return 0
    serve_deployments(
        args.data_dir, args.inbox, args.workdir, args.config, args.val_dir,
        args.train_cron, args.predict_cron, args.timezone, limit=args.limit, dask_address=args.dask_address,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
