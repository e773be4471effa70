"""Benchmark: `imgflow train` with its defaults vs the plain Keras script, on real images (issue 13).

Three real class-folder datasets, built offline from installed packages into
``bench/_data/recipe/<name>/{train,val}/<class>/*.png`` (one fixed split, so both
contenders get exactly the same training and validation files):

- ``digits``: scikit-learn's handwritten digits, all 10 classes, 8x8 upscaled to 32 px
  grey PNGs (1,797 images).
- ``tuxpaint``: the stamp categories of Debian ``tuxpaint-stamps-default`` (photos and
  drawings, RGBA/LA/palette PNGs with transparency; ``*_mirror.png`` copies left out;
  categories with at least 35 stamps, at most 120 a class).
- ``icons``: the category folders of Debian ``mate-icon-theme`` at 48x48 (actions,
  apps, devices, mimetypes, status; symlinks left out so an icon appears once).
- ``themes``: the same five categories across four Debian icon themes at 48 px (mate,
  faenza, moka, faba), at most 300 a class: black under the transparent pixels in one
  theme, white in another, in different proportions per class.

``themes`` also has an inbox, ``bench/_data/recipe/themes/inbox/<class>/``: the same five
categories of a fifth theme neither contender trains on (``gnome-icon-theme``, 48 px; files
byte-identical to a training or validation image left out). After training, imgflow runs
``imgflow predict MODEL INBOX`` and the plain script ``model.predict`` on it; the table
reports the accuracy of the predicted labels.

Nothing is installed by this script; it needs
``apt-get install -y tuxpaint-stamps-default mate-icon-theme faenza-icon-theme moka-icon-theme gnome-icon-theme``
(moka brings faba; without gnome-icon-theme there is no inbox) and scikit-learn.

For every dataset and seed it runs, alternating which goes first, the whole
``python -m imgflow train TRAIN --val-dir VAL`` command (defaults; same image size,
epochs and batch size) and ``bench/plain_keras.py``, each as its own process, and prints
a table: validation accuracy mean ± sd, the lowest per-class recall, the median wall time
of the whole command, the median seconds per epoch, and the ratios imgflow / plain::

    python bench/recipe.py [--datasets digits,tuxpaint,icons,themes] [--seeds 0,1,2] [--epochs 10]
                           [--imgflow-config FILE.yaml] [--contenders imgflow,plain] [--plain-background black]
                           [--log runs.jsonl]

``--imgflow-config`` passes a config file to ``imgflow train`` (to measure a candidate
recipe against the defaults). ``--plain-background black`` gives the plain script copies of
the images composited onto black, the pixels imgflow's loader gives by default (the
script's decoder keeps whatever colour is stored under transparent pixels). Every run is
appended to ``--log`` as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "bench" / "_data" / "recipe"
TUXPAINT = Path("/usr/share/tuxpaint/stamps")
MATE = Path("/usr/share/icons/mate/48x48")
# 48 px category folders of four Debian icon themes (mate, faenza, moka, faba)
ICON_THEMES = {
    "mate-icon-theme": "/usr/share/icons/mate/48x48/{cls}",
    "faenza-icon-theme": "/usr/share/icons/Faenza/{cls}/48",
    "moka-icon-theme": "/usr/share/icons/Moka/48x48/{cls}",
    "faba-icon-theme": "/usr/share/icons/Faba/48x48/{cls}",
}
THEMES_MAX_PER_CLASS = 300
# the inbox of a dataset: class folders of images neither contender trains or validates on
INBOX_SOURCES = {"themes": ("gnome-icon-theme", "/usr/share/icons/gnome/48x48/{cls}")}
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "status")
IMAGE_SIZES = {"digits": 32, "tuxpaint": 48, "icons": 48, "themes": 48}
VAL_FRACTION = 0.25
SPLIT_SEED = 0


# ----------------------------------------------------------------------------- datasets


def _usable(files: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Drop files Pillow cannot decode and byte-identical copies (all copies, whatever their class).

    Both contenders then see exactly the same files: imgflow's validation would otherwise
    exclude them from its split (corrupt files, train/val leaks, label conflicts) while the
    plain script trains and scores on them.
    """
    import hashlib

    from PIL import Image

    owners: dict[str, list[tuple[str, Path]]] = {}
    for cls, paths in files.items():
        for path in paths:
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError):
                continue
            owners.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append((cls, path))
    kept: dict[str, list[Path]] = {cls: [] for cls in files}
    for copies in owners.values():
        if len(copies) == 1:
            kept[copies[0][0]].append(copies[0][1])
    return kept


def _split_copy(name: str, files: dict[str, list[Path]]) -> Path:
    """Write a fixed stratified split of ``files`` (class -> source files) as train/ and val/ folders."""
    files = _usable(files)
    target = DATA_ROOT / name
    tmp = DATA_ROOT / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(SPLIT_SEED)
    for cls, paths in sorted(files.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        n_val = max(1, round(len(paths) * VAL_FRACTION))
        for split, chunk in (("val", paths[:n_val]), ("train", paths[n_val:])):
            folder = tmp / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, src in enumerate(chunk):
                shutil.copyfile(src, folder / f"{i:04d}_{src.name}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def build_digits() -> Path:
    """scikit-learn digits, 10 classes, as 32 px grey PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = DATA_ROOT / ".digits-src"
    shutil.rmtree(src, ignore_errors=True)
    files: dict[str, list[Path]] = {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = src / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), "L").resize((32, 32), Image.BILINEAR)
        path = folder / f"digit_{i:04d}.png"
        grey.save(path)
        files.setdefault(str(label), []).append(path)
    out = _split_copy("digits", files)
    shutil.rmtree(src, ignore_errors=True)
    return out


def build_tuxpaint(min_count: int = 35, max_count: int = 120) -> Path:
    """Tux Paint stamp categories (PNG stamps with transparency, mirrored copies left out)."""
    if not TUXPAINT.is_dir():
        raise SystemExit(f"{TUXPAINT} not found: apt-get install -y tuxpaint-stamps-default")
    files: dict[str, list[Path]] = {}
    rng = random.Random(SPLIT_SEED)
    for category in sorted(p for p in TUXPAINT.iterdir() if p.is_dir()):
        pngs = sorted(p for p in category.rglob("*.png") if p.is_file() and not p.stem.endswith("_mirror"))
        if len(pngs) >= min_count:
            files[category.name] = sorted(rng.sample(pngs, min(max_count, len(pngs))))
    return _split_copy("tuxpaint", files)


def build_icons() -> Path:
    """MATE icon theme categories at 48x48 (real files only: a symlink is another name for one icon)."""
    if not MATE.is_dir():
        raise SystemExit(f"{MATE} not found: apt-get install -y mate-icon-theme")
    files = {c: sorted(p for p in (MATE / c).glob("*.png") if p.is_file() and not p.is_symlink()) for c in ICON_CLASSES}
    return _split_copy("icons", files)


def build_themes() -> Path:
    """The same five categories across four icon themes at 48 px (real files only, at most 300 a class).

    The themes store different colours under transparent pixels (black in mate, white in
    faenza), in different proportions per class: the false cue of real mixed folders.
    """
    rng = random.Random(SPLIT_SEED)
    files: dict[str, list[Path]] = {}
    for cls in ICON_CLASSES:
        found = []
        for package, pattern in ICON_THEMES.items():
            folder = Path(pattern.format(cls=cls))
            if not folder.is_dir():
                raise SystemExit(f"{folder} not found: apt-get install -y {package}")
            found += sorted(p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink())
        files[cls] = sorted(rng.sample(found, min(THEMES_MAX_PER_CLASS, len(found))))
    return _split_copy("themes", files)


BUILDERS = {"digits": build_digits, "tuxpaint": build_tuxpaint, "icons": build_icons, "themes": build_themes}


def build_inbox(name: str) -> Path | None:
    """``DATA_ROOT/name/inbox/<class>/``: the inbox source's real files, none byte-identical to a train/val image.

    Returns None (no inbox) when the dataset has no inbox source or its package is not installed.
    """
    import hashlib

    if name not in INBOX_SOURCES:
        return None
    package, pattern = INBOX_SOURCES[name]
    folder = DATA_ROOT / name
    sources = {cls: Path(pattern.format(cls=cls)) for cls in sorted(p.name for p in (folder / "train").iterdir())}
    if not all(src.is_dir() for src in sources.values()):
        print(f"no inbox for {name}: apt-get install -y {package}", file=sys.stderr)
        return None
    seen = {hashlib.sha256(p.read_bytes()).hexdigest() for split in ("train", "val") for p in (folder / split).rglob("*.png")}
    files = {cls: [p for p in sorted(src.glob("*.png")) if p.is_file() and not p.is_symlink()
                   and hashlib.sha256(p.read_bytes()).hexdigest() not in seen] for cls, src in sources.items()}
    files = _usable(files)
    if not any(files.values()):
        print(f"no inbox for {name}: no usable file in {package}", file=sys.stderr)
        return None
    remove_composited_copies(name)  # made without this inbox
    tmp, target = DATA_ROOT / f".{name}-inbox.tmp", folder / "inbox"
    shutil.rmtree(tmp, ignore_errors=True)
    for cls, paths in files.items():
        (tmp / cls).mkdir(parents=True, exist_ok=True)
        for src in paths:
            shutil.copyfile(src, tmp / cls / src.name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def remove_composited_copies(name: str) -> None:
    """Delete the :func:`composited_copy` folders of dataset ``name`` (stale once its files change)."""
    for copy in DATA_ROOT.glob(f"{name}-*"):
        shutil.rmtree(copy)


def composited_copy(folder: Path, background: str = "black") -> Path:
    """A copy of ``folder`` (train/, val/, inbox/) with every image composited onto ``background``, as RGB PNGs.

    For ``--plain-background``: the plain script then trains on the pixels imgflow's
    loader gives (transparency composited onto one colour) instead of the colours its
    decoder keeps under transparent pixels, which separates the recipe's effect from the
    handling of transparency.
    """
    from PIL import Image

    from imgflow.tasks.images import to_rgb  # imgflow's own compositing: the same pixels

    target = folder.parent / f"{folder.name}-{background}"
    if (target / "val").is_dir():
        return target
    tmp = folder.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for src in sorted(folder.rglob("*.png")):
        out = tmp / src.relative_to(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            to_rgb(img, background).save(out)
    tmp.rename(target)
    return target


def dataset(name: str, rebuild: bool = False) -> Path:
    """The dataset folder (train/ and val/, and inbox/ where the dataset has one), built once."""
    folder = DATA_ROOT / name
    if rebuild or not (folder / "val").is_dir():
        remove_composited_copies(name)  # made from the old files
        BUILDERS[name]()
    if name in INBOX_SOURCES and (rebuild or not (folder / "inbox").is_dir()):
        build_inbox(name)
    return folder


# ----------------------------------------------------------------------------- contenders


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # on a loaded machine the temporary server takes longer than Prefect's default 20 s to answer
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_plain(folder: Path, size: int, epochs: int, batch: int, seed: int, scratch: Path) -> dict:
    """bench/plain_keras.py as its own process; its figures and the whole command's wall time."""
    out = scratch / f"plain-{seed}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "plain_keras.py"), str(folder / "train"), str(folder / "val"),
           "--image-size", str(size), "--epochs", str(epochs), "--batch-size", str(batch), "--seed", str(seed),
           "--out", str(out)]
    inbox = folder / "inbox"
    if inbox.is_dir():
        cmd += ["--inbox", str(inbox)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"plain script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"val_accuracy": result["val_accuracy"], "min_recall": min(v for v in result["per_class_recall"].values() if v is not None),
            "wall": wall - result.get("inbox_seconds", 0.0), "epoch_seconds": statistics.median(result["epoch_seconds"]),
            "epochs_run": result["epochs_run"],
            **({"inbox_accuracy": result["inbox_accuracy"]} if "inbox_accuracy" in result else {})}


def run_imgflow(folder: Path, size: int, epochs: int, batch: int, seed: int, scratch: Path, config: Path | None) -> dict:
    """The whole `imgflow train` command (validate, preprocess, train, evaluate, promote) as its own process."""
    workdir = scratch / f"imgflow-{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgflow", "train", str(folder / "train"), "--val-dir", str(folder / "val"),
           "--workdir", str(workdir), "--image-size", str(size), "--epochs", str(epochs),
           "--batch-size", str(batch), "--seed", str(seed)]
    if config is not None:
        cmd += ["--config", str(config)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=scratch)
    wall = time.perf_counter() - started
    metas = sorted(workdir.glob("models/*/metadata.json"))
    if proc.returncode not in (0, 1) or not metas:
        raise SystemExit(f"imgflow train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    meta = json.loads(metas[-1].read_text())
    metrics = meta["metrics"]
    import csv

    with open(metas[-1].parent / "history.csv", newline="") as fh:
        seconds = [float(row["seconds"]) for row in csv.DictReader(fh)]
    result = {"val_accuracy": metrics["val_accuracy"],
              "min_recall": min(v for v in metrics["per_class_recall"].values() if v is not None),
              "wall": wall, "epoch_seconds": statistics.median(seconds), "epochs_run": len(seconds),
              "best_epoch": metrics.get("best_epoch"), "summary": meta.get("outcome") or ""}
    if (folder / "inbox").is_dir():
        result["inbox_accuracy"] = imgflow_inbox_accuracy(metas[-1].parent, folder / "inbox", workdir)
    return result


def imgflow_inbox_accuracy(model_dir: Path, inbox: Path, workdir: Path) -> float:
    """``imgflow predict MODEL_DIR INBOX``; the share of files whose predicted label is their folder's class."""
    import csv

    out = workdir / "inbox.csv"
    cmd = [sys.executable, "-m", "imgflow", "predict", str(model_dir), str(inbox), "--workdir", str(workdir),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"imgflow predict failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    expected = sum(1 for _ in inbox.rglob("*.png"))
    if not rows or len(rows) != expected:
        raise SystemExit(f"{out}: {len(rows)} rows for {expected} inbox files")
    return sum(1 for r in rows if not r["error"] and r["label"] == r["path"].split("/")[0]) / len(rows)


# ----------------------------------------------------------------------------- table


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,tuxpaint,icons,themes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="override every dataset's image size")
    parser.add_argument("--imgflow-config", type=Path, default=None)
    parser.add_argument("--contenders", default="imgflow,plain")
    parser.add_argument("--plain-background", choices=("black", "white"), default=None,
                        help="the plain script reads copies with transparency composited onto this colour")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the dataset folders")
    parser.add_argument("--log", type=Path, default=None, help="append each run as a JSON line")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the table of the runs in this --log file (several invocations merged), run nothing")
    args = parser.parse_args()
    if args.table_from is not None:
        runs_by_dataset: dict[str, dict[str, list[dict]]] = {}
        for line in args.table_from.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            who = r["contender"]
            if who == "plain" and r.get("plain_background"):
                who = f"plain on {r['plain_background']}"  # another input than the raw files: its own row
            runs_by_dataset.setdefault(r["dataset"], {"imgflow": [], "plain": []}).setdefault(who, []).append(r)
        rows = []
        every = [r for d in runs_by_dataset.values() for rs in d.values() for r in rs]
        for name, runs in runs_by_dataset.items():
            folder = DATA_ROOT / name
            size = next(r["image_size"] for rs in runs.values() for r in rs)
            rows.append((name, sum(1 for _ in (folder / "train").rglob("*.png")),
                         sum(1 for _ in (folder / "val").rglob("*.png")), size, runs))
        seeds = ",".join(map(str, sorted({r["seed"] for r in every})))
        print_table(rows, every[0]["epochs"] if every else 0, args.batch_size, seeds,
                    sorted({who for _, _, _, _, runs in rows for who in runs}))
        return
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        parser.error(f"--datasets: unknown {', '.join(unknown)}; expected any of {', '.join(BUILDERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    contenders = [c.strip() for c in args.contenders.split(",")]
    config = args.imgflow_config.resolve() if args.imgflow_config else None

    rows = []
    for name in names:
        folder = dataset(name, args.rebuild)
        size = args.image_size or IMAGE_SIZES[name]
        n_train = sum(1 for _ in (folder / "train").rglob("*.png"))
        n_val = sum(1 for _ in (folder / "val").rglob("*.png"))
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        with tempfile.TemporaryDirectory(prefix=f"recipe-{name}-") as tmp:
            scratch = Path(tmp)
            for i, seed in enumerate(seeds):
                order = contenders if i % 2 == 0 else contenders[::-1]  # alternate who runs first
                for who in order:
                    if who == "plain":
                        plain_folder = composited_copy(folder, args.plain_background) if args.plain_background else folder
                        r = run_plain(plain_folder, size, args.epochs, args.batch_size, seed, scratch)
                    else:
                        r = run_imgflow(folder, size, args.epochs, args.batch_size, seed, scratch, config)
                    r.update(dataset=name, contender=who, seed=seed, image_size=size, epochs=args.epochs)
                    runs[who].append(r)
                    print(json.dumps(r), flush=True)
                    if args.log:
                        with open(args.log, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps({**r, "config": str(config) if config else None,
                                                 "plain_background": args.plain_background}) + "\n")
        rows.append((name, n_train, n_val, size, runs))

    print_table(rows, args.epochs, args.batch_size, args.seeds, contenders)
    if args.plain_background:
        print(f"(plain: the script read copies of the images composited onto {args.plain_background})")


def print_table(rows: list, epochs: int, batch_size: int, seeds: str, contenders: list[str]) -> None:
    """Print the markdown tables: per contender, then imgflow against plain."""
    print(f"\n{epochs} epochs, batch {batch_size}, seeds {seeds}, {os.cpu_count()} CPUs "
          f"(shared: read the ratios); wall and s/epoch are medians")
    print("| dataset (train/val, px) | contender | val accuracy | min class recall | inbox accuracy | wall s | s/epoch "
          "| epochs run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, n_train, n_val, size, runs in rows:
        for who, rs in runs.items():
            if not rs:
                continue
            inbox = [r["inbox_accuracy"] for r in rs if "inbox_accuracy" in r]
            print(f"| {name} ({n_train}/{n_val}, {size}) | {who} | {_mean_sd([r['val_accuracy'] for r in rs])} | "
                  f"{statistics.mean(r['min_recall'] for r in rs):.3f} | {_mean_sd(inbox) if inbox else '-'} | "
                  f"{statistics.median(r['wall'] for r in rs):.1f} | {statistics.median(r['epoch_seconds'] for r in rs):.2f} | "
                  f"{statistics.median(r['epochs_run'] for r in rs):.0f} |")
    if set(contenders) >= {"imgflow", "plain"}:
        print("\n| dataset | accuracy gain (points) | val errors vs plain | inbox gain (points) | wall ratio | s/epoch ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, _, _, _, runs in rows:
            ours, plain = runs["imgflow"], runs["plain"]
            if not ours or not plain:
                continue
            acc_o = statistics.mean(r["val_accuracy"] for r in ours)
            acc_p = statistics.mean(r["val_accuracy"] for r in plain)
            errors = (1 - acc_o) / (1 - acc_p) if acc_p < 1 else float("nan")
            wall = statistics.median(r["wall"] for r in ours) / statistics.median(r["wall"] for r in plain)
            epoch = statistics.median(r["epoch_seconds"] for r in ours) / statistics.median(r["epoch_seconds"] for r in plain)
            inbox_o = [r["inbox_accuracy"] for r in ours if "inbox_accuracy" in r]
            inbox_p = [r["inbox_accuracy"] for r in plain if "inbox_accuracy" in r]
            inbox = (f"{100 * (statistics.mean(inbox_o) - statistics.mean(inbox_p)):+.1f}"
                     if inbox_o and inbox_p else "-")
            print(f"| {name} | {100 * (acc_o - acc_p):+.1f} | {errors:.2f}x | {inbox} | {wall:.2f}x | {epoch:.2f}x |")


if __name__ == "__main__":
    main()
