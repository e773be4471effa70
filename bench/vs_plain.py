"""imgflow against the script a user would write instead, whole processes, side by side.

For each scenario, the imgflow command and the plain script (``bench/plain_*.py``) run
as separate processes, alternating (imgflow, plain, imgflow, plain, ...) for
``--rounds`` rounds, so load from other processes hits both alike; each prints the
median wall time of each side, their ratio (imgflow / plain: below 1 imgflow is
faster) and the peak RSS of each side's main process (``os.wait4``).

Scenarios (``--only`` picks some; default all but predict-50000 and train):

* ``predict-5000`` / ``predict-50000``: ``imgflow predict MODEL INBOX`` into a fresh
  workdir and CSV each round (no resume) vs ``plain_predict.py`` (Keras folder loader,
  ``model.predict``, pandas CSV). JPEGs of ``--source-size`` px, model at ``--image-size``.
* ``validate-noop``: ``imgflow validate`` with an unchanged report (reused) vs
  ``plain_validate.py`` (decode every file; it has no cache).
* ``validate-cold``: ``imgflow validate`` into a fresh workdir vs ``plain_validate.py``.
* ``preprocess-cold`` / ``preprocess-unchanged``: ``imgflow preprocess`` into a fresh
  workdir / the same one again vs ``plain_preprocess.py`` (Pillow + TFRecordWriter).
* ``train``: ``imgflow train TRAIN --val-dir VAL`` (defaults, ``--epochs``) into a fresh
  workdir vs ``plain_keras.py`` (the TensorFlow tutorial CNN) on ``--train-folder``'s
  ``train``/``val`` (a ``bench/recipe.py`` dataset, themes by default: give
  ``--image-size 48``), and each side's fixed cost: wall minus the time inside ``fit``
  (imgflow's ``fit_seconds`` in ``metadata.json``, the script's epoch times). imgflow's
  includes validation, preprocessing, evaluation, the report and promotion; the row
  ``fixed - evaluation`` also leaves out ``evaluation_seconds`` (issue 17's measure).

Run: python bench/vs_plain.py [--rounds 3] [--only predict-5000,validate-noop]

At the seed scale (13,000 JPEGs of 256 px, made by ``bench/preprocess.py``, shards at 128 px)::

    python bench/vs_plain.py --only preprocess-cold,preprocess-unchanged --rounds 2 \
        --dataset bench/_data/seed-13000-1400-256/train --image-size 128

Data and the model are generated once under ``bench/_data`` (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(REPO))
PY = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SCENARIOS = ["predict-5000", "validate-noop", "validate-cold", "preprocess-cold", "preprocess-unchanged", "predict-50000",
             "train"]
DEFAULT_SCENARIOS = [name for name in SCENARIOS if name not in ("predict-50000", "train")]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process; raise with its output when it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def imgflow(*args: str) -> list[str]:
    return [PY, "-m", "imgflow", *args]


def plain(name: str, *args: str) -> list[str]:
    return [PY, str(ROOT / f"plain_{name}.py"), *args]


def build_dataset(root: Path, per_class: int, size: int) -> Path:
    """Three class folders of distinct noisy JPEGs (``tests/imagefactory.py``), made once."""
    from tests.imagefactory import make_class_folder

    marker = root.parent / f".{root.name}.complete"  # beside, not inside: no root_file warning
    if not marker.exists():
        make_class_folder(root, {"birds": per_class, "cats": per_class, "dogs": per_class}, size=size, fmt="jpg")
        marker.write_text("ok")
    return root


def scenario(name: str, data: Path, scratch: Path, args: argparse.Namespace):
    """(imgflow command factory, plain command factory, setup) for one scenario; factories take the round."""
    from predict import build_inbox, build_model_dir

    if name == "train":
        folder, size, epochs = args.train_folder, str(args.image_size), str(args.epochs)
        if not (folder / "train").is_dir():
            raise SystemExit(f"{folder}/train: build it first with python bench/recipe.py --datasets {folder.name}")
        return (lambda r: imgflow("train", str(folder / "train"), "--val-dir", str(folder / "val"), "--workdir",
                                  str(scratch / f"w{r}"), "--image-size", size, "--epochs", epochs, "--seed", "0"),
                lambda r: plain("keras", str(folder / "train"), str(folder / "val"), "--image-size", size, "--epochs",
                                epochs, "--seed", "0", "--out", str(scratch / f"plain{r}.json")), None)
    if name.startswith("predict-"):
        count = int(name.split("-")[1])
        inbox = build_inbox(data / f"inbox-{count}-{args.source_size}", count, args.source_size)
        model = data / f"model-{args.image_size}"
        if not (model / "metadata.json").exists():
            subprocess.run([PY, "-c", f"import sys; sys.path[:0]=[{str(ROOT)!r},{str(REPO)!r}]; from predict import "
                            f"build_model_dir; from pathlib import Path; build_model_dir(Path({str(model)!r}), "
                            f"{args.image_size})"], check=True)
        return (lambda r: imgflow("predict", str(model), str(inbox), "--workdir", str(scratch / f"w{r}"),
                                  "--out", str(scratch / f"imgflow{r}.csv")),
                lambda r: plain("predict", str(model), str(inbox), str(scratch / f"plain{r}.csv")), None)
    dataset = args.dataset or build_dataset(data / f"classes-{args.per_class}-{args.source_size}", args.per_class,
                                            args.source_size)
    if name.startswith("validate-"):
        fixed = scratch / "validate-fixed"
        setup = (lambda: run(imgflow("validate", str(dataset), "--workdir", str(fixed)), os.environ.copy())) \
            if name == "validate-noop" else None
        workdir = (lambda r: fixed) if name == "validate-noop" else (lambda r: scratch / f"w{r}")
        return (lambda r: imgflow("validate", str(dataset), "--workdir", str(workdir(r))),
                lambda r: plain("validate", str(dataset)), setup)
    fixed = scratch / "preprocess-fixed"
    size = str(args.image_size)
    setup = (lambda: run(imgflow("preprocess", str(dataset), "--workdir", str(fixed), "--image-size", size),
                         os.environ.copy())) if name == "preprocess-unchanged" else None
    workdir = (lambda r: fixed) if name == "preprocess-unchanged" else (lambda r: scratch / f"w{r}")
    return (lambda r: imgflow("preprocess", str(dataset), "--workdir", str(workdir(r)), "--image-size", size),
            lambda r: plain("preprocess", str(dataset), str(scratch / f"plain{r}"), "--image-size", size), setup)


def fit_and_evaluation_seconds(name: str, side: str, scratch: Path, r: int) -> tuple[float, float] | None:
    """Seconds a train round spent inside ``fit`` and in evaluation (None for other scenarios).

    The plain script has no evaluation step: its evaluation seconds are 0.
    """
    if name != "train":
        return None
    import json

    if side == "plain":
        return sum(json.loads((scratch / f"plain{r}.json").read_text())["epoch_seconds"]), 0.0
    meta = sorted((scratch / f"w{r}").glob("models/*/metadata.json"))[-1]
    metrics = json.loads(meta.read_text())["metrics"]
    return float(metrics["fit_seconds"]), float(metrics.get("evaluation_seconds") or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--source-size", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=32, help="model input / shard image size")
    parser.add_argument("--per-class", type=int, default=30, help="images per class for validate/preprocess")
    parser.add_argument("--data", type=Path, default=ROOT / "_data" / "vs_plain")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="an existing class folder for validate/preprocess instead of the generated one "
                             "(e.g. the seed-scale train folder of bench/preprocess.py)")
    parser.add_argument("--train-folder", type=Path, default=ROOT / "_data" / "recipe" / "themes",
                        help="train scenario: a folder with train/ and val/ class folders (bench/recipe.py builds them)")
    parser.add_argument("--epochs", type=int, default=10, help="train scenario: epochs")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    args.data.mkdir(parents=True, exist_ok=True)
    print(f"{'scenario':<22} {'imgflow s':>10} {'plain s':>9} {'ratio':>7} {'imgflow MiB':>12} {'plain MiB':>10}  rounds")
    for name in [n for n in args.only.split(",") if n]:
        if name not in SCENARIOS:
            parser.error(f"--only: unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        scratch = Path(tempfile.mkdtemp(prefix=f"vs-plain-{name}-", dir=args.data))
        try:
            ours, theirs, setup = scenario(name, args.data, scratch, args)
            if setup:
                setup()
            times: dict[str, list[float]] = {"imgflow": [], "plain": []}
            rss: dict[str, list[float]] = {"imgflow": [], "plain": []}
            fixed: dict[str, list[float]] = {"imgflow": [], "plain": []}
            unevaluated: dict[str, list[float]] = {"imgflow": [], "plain": []}  # fixed minus evaluation
            for r in range(args.rounds):
                for side, factory in (("imgflow", ours), ("plain", theirs)):
                    wall, peak = run(factory(r), env)
                    times[side].append(wall)
                    rss[side].append(peak)
                    spent = fit_and_evaluation_seconds(name, side, scratch, r)
                    if spent is not None:
                        fixed[side].append(wall - spent[0])
                        unevaluated[side].append(wall - spent[0] - spent[1])
            a, b = statistics.median(times["imgflow"]), statistics.median(times["plain"])
            print(f"{name:<22} {a:>10.2f} {b:>9.2f} {a / b:>6.2f}x {max(rss['imgflow']):>12.0f} "
                  f"{max(rss['plain']):>10.0f}  imgflow {[round(t, 1) for t in times['imgflow']]} "
                  f"plain {[round(t, 1) for t in times['plain']]}", flush=True)
            for label, spent_outside in (("  fixed (wall - fit)", fixed), ("  fixed - evaluation", unevaluated)):
                if spent_outside["imgflow"]:
                    print(f"{label:<22} {statistics.median(spent_outside['imgflow']):>10.2f} "
                          f"{statistics.median(spent_outside['plain']):>9.2f}  imgflow "
                          f"{[round(t, 1) for t in spent_outside['imgflow']]} "
                          f"plain {[round(t, 1) for t in spent_outside['plain']]}", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
