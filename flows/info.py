"""``imgflow --version`` and ``imgflow info``: versions, devices, what a workdir holds.

Versions come from installed package metadata (no import); only the device list imports
TensorFlow (quietly, through :func:`imgflow.tasks.quiet.import_tensorflow`).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("imgflow", "tensorflow", "keras", "prefect")


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (``imgflow.__version__`` for a source checkout), or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        if name == "imgflow":
            import imgflow

            return imgflow.__version__
        return None


def versions() -> dict[str, str | None]:
    """``{package: version or None}`` for imgflow, TensorFlow, Keras and Prefect."""
    return {name: package_version(name) for name in PACKAGES}


def version_line() -> str:
    """``imgflow 0.1.0 (TensorFlow 2.x, Keras 3.x, Prefect 3.x)``."""
    v = versions()
    libs = ", ".join(f"{label} {v[name] or 'not installed'}"
                     for name, label in (("tensorflow", "TensorFlow"), ("keras", "Keras"), ("prefect", "Prefect")))
    return f"imgflow {v['imgflow']} ({libs})"


def devices() -> list[str]:
    """Devices TensorFlow sees, as ``CPU:0``, ``GPU:0`` (imports TensorFlow quietly)."""
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    return [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def workdir_contents(workdir: Path | str) -> dict[str, Any]:
    """What a work folder holds: champion, model runs, prediction CSVs, the log file.

    Returns:
        ``{"workdir": abs path, "exists": bool, "champion": {"model_dir", "val_accuracy",
        "run_id"} | None, "runs": [{"name", "val_accuracy", "best_epoch", "finished"}] (newest
        first), "predictions": [{"path", "rows", "modified"}] (newest first), "log": path | None}``.
    """
    from imgflow.tasks.registry import CHAMPION_FILE, MODELS_DIR

    root = Path(workdir).absolute()
    out: dict[str, Any] = {"workdir": str(root), "exists": root.is_dir(), "champion": None, "runs": [],
                           "predictions": [], "log": None}
    if not root.is_dir():
        return out
    pointer = _read(root / CHAMPION_FILE)
    if pointer.get("model_dir"):
        meta = _read(Path(pointer["model_dir"]) / "metadata.json")
        out["champion"] = {"model_dir": pointer["model_dir"], "run_id": meta.get("run_id"),
                           "val_accuracy": (meta.get("metrics") or {}).get("val_accuracy")}
    models = root / MODELS_DIR
    runs = sorted((p for p in models.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True) \
        if models.is_dir() else []
    for run in runs:
        meta = _read(run / "metadata.json")
        out["runs"].append({"name": run.name, "val_accuracy": (meta.get("metrics") or {}).get("val_accuracy"),
                            "best_epoch": meta.get("best_epoch"), "finished": (run / "model.keras").is_file()})
    predictions = root / "predictions"
    csvs = sorted(predictions.glob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True) if predictions.is_dir() else []
    for csv_path in csvs:
        with open(csv_path, "rb") as handle:
            rows = max(0, sum(1 for _ in handle) - 1)
        out["predictions"].append({"path": str(csv_path), "rows": rows, "modified": csv_path.stat().st_mtime})
    log = root / "logs" / "imgflow.log"
    out["log"] = str(log) if log.is_file() else None
    return out


def info_lines(workdir: Path | str, device_names: list[str] | None) -> list[str]:
    """The text ``imgflow info`` prints."""
    import datetime

    v = versions()
    lines = [f"{name:<11} {v[name] or 'not installed'}" for name in PACKAGES]
    if device_names is not None:
        lines.append(f"{'devices':<11} {', '.join(device_names) or 'none'}")
    contents = workdir_contents(workdir)
    lines.append(f"{'workdir':<11} {contents['workdir']}" + ("" if contents["exists"] else " (does not exist yet)"))
    champion = contents["champion"]
    if champion:
        acc = champion["val_accuracy"]
        lines.append(f"{'champion':<11} {champion['model_dir']}" + (f" (val accuracy {acc:.4f})" if acc is not None else ""))
    elif contents["exists"]:
        lines.append(f"{'champion':<11} none (no model promoted yet)")
    if contents["exists"]:
        lines.append(f"{'runs':<11} {len(contents['runs'])}")
        for run in contents["runs"][:5]:
            acc = f"val accuracy {run['val_accuracy']:.4f}" if run["val_accuracy"] is not None else "not evaluated"
            lines.append(f"  {run['name']}  {acc}" + ("" if run["finished"] else "  (unfinished)"))
        lines.append(f"{'predictions':<11} {len(contents['predictions'])}")
        for item in contents["predictions"][:3]:
            when = datetime.datetime.fromtimestamp(item["modified"]).strftime("%Y-%m-%d %H:%M")
            lines.append(f"  {item['path']}  {item['rows']} rows  {when}")
        if contents["log"]:
            lines.append(f"{'log':<11} {contents['log']}")
    return lines
