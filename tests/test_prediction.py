"""Batch prediction: scan, chunk identity, CSV completeness, resume after SIGKILL, new files, Dask."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks import prediction as P
from tests.imagefactory import DIGIT_CLASSES, digit_images
from tests.modelfactory import CLASS_NAMES, make_digit_model_dir
ODD_NAMES = ["a,b.png", 'say "hi".png', "=SUM(A1).png", "ünïcödé 数字.png", "semi;colon's.png"]
BROKEN = {
    "broken/garbage.png": b"this is not an image at all",
    "broken/truncated.png": None,  # filled with the first bytes of a real PNG
    "notes.txt": b"hello",
}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny digits classifier (Rescaling inside) saved as a model directory (interface 4)."""
    return make_digit_model_dir(tmp_path_factory.mktemp("models") / "digits-test")


def _save_digits(root: Path, start: int, count: int, prefix: str = "") -> dict[str, str]:
    """Write real digits as nested PNGs; return {relative path: true class name}."""
    name_of = {digit: name for name, digit in DIGIT_CLASSES.items()}
    truth: dict[str, str] = {}
    samples = digit_images(DIGIT_CLASSES.values(), per_class=60)[start : start + count]
    for i, (digit, pixels) in enumerate(samples):
        rel = f"batch{(start + i) % 3}/sub{(start + i) % 2}/{prefix}img_{start + i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / rel)
        truth[rel] = name_of[digit]
    return truth


@pytest.fixture
def inbox(tmp_path) -> tuple[Path, dict[str, str], set[str]]:
    """Nested digits, odd names, broken files: (folder, {rel: true class}, {rel of broken files})."""
    root = tmp_path / "inbox"
    truth = _save_digits(root, 0, 40)
    samples = digit_images(DIGIT_CLASSES.values(), per_class=60)[100:]
    name_of = {digit: name for name, digit in DIGIT_CLASSES.items()}
    for name, (digit, pixels) in zip(ODD_NAMES, samples):
        Image.fromarray(pixels).save(root / name, format="PNG")
        truth[name] = name_of[digit]
    real_png = (root / ODD_NAMES[0]).read_bytes()
    for rel, content in BROKEN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content if content is not None else real_png[:60])
    (root / ".DS_Store").write_bytes(b"\0\0")  # hidden: not listed
    return root, truth, set(BROKEN)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows, with the spreadsheet-safe ``'`` taken off paths (``=SUM(A1).png``)."""
    from imgflow.tasks.csvcells import restore_cell

    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [{**row, "path": restore_cell(row["path"])} for row in reader]
        return list(reader.fieldnames or []), rows


def _check_rows(rows: list[dict[str, str]], truth: dict[str, str], broken: set[str]) -> float:
    """Every file exactly once, errors exactly for the broken ones; return accuracy on the rest."""
    from imgflow.tasks.csvcells import restore_cell

    for row in rows:  # the CSV neutralises a leading "=" (=SUM(A1).png) by default
        row["path"] = restore_cell(row["path"])
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert set(paths) == set(truth) | broken
    correct = 0
    for row in rows:
        if row["path"] in broken:
            assert row["error"] and row["label"] == "" and row["confidence"] == ""
            assert row["novelty"] == "" and row["unknown"] == ""
            continue
        assert row["error"] == ""
        probs = [float(row[f"prob_{name}"]) for name in CLASS_NAMES]
        assert abs(sum(probs) - 1.0) < 1e-6
        assert row["label"] == CLASS_NAMES[int(np.argmax(probs))]
        assert float(row["confidence"]) == pytest.approx(max(probs))
        correct += row["label"] == truth[row["path"]]
    return correct / len(truth)


def _flow_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


# ------------------------------------------------------------ pure functions


def test_scan_is_sorted_recursive_and_keeps_symlinks_inside(tmp_path):
    root = tmp_path / "in"
    for rel in ["b/2.png", "b/10.png", "a.png", "c/d/e.png", ".hidden.png", "b/.tmp-x.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * len(rel))
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"s")
    os.symlink(outside, root / "leak.png")
    os.symlink(root / "a.png", root / "alias.png")
    os.symlink(root / "c", root / "loop")  # a linked folder is never descended
    os.symlink(root / "gone.png", root / "dangling.png")

    entries = list(P.scan_files(root))
    assert [e.rel for e in entries] == [
        "a.png", "alias.png", "b/10.png", "b/2.png", "c/d/e.png", "dangling.png", "leak.png",
    ]
    by_rel = {e.rel: e for e in entries}
    assert by_rel["leak.png"].error == "symlink leads outside INPUT_DIR; not followed"
    assert by_rel["dangling.png"].error == "broken symlink"
    assert by_rel["alias.png"].error == "" and by_rel["alias.png"].size == len("a.png")
    assert by_rel["b/10.png"].size == len("b/10.png")
    assert list(P.scan_files(root, exclude=[root / "b"]))[2].rel == "c/d/e.png"
    with pytest.raises(NotADirectoryError, match="INPUT_DIR"):
        list(P.scan_files(tmp_path / "missing"))


def test_new_files_change_only_their_own_chunk():
    files = [P.FileEntry(f"f{i:05d}.jpg", 100, 1) for i in range(3000)]
    before = [P.chunk_key("m", c) for c in P.chunk_entries(files, 64)]
    chunks = list(P.chunk_entries(files, 64))
    assert sum(len(c) for c in chunks) == 3000
    assert all(len(c) <= 128 for c in chunks) and all(len(c) >= 32 for c in chunks[:-1])
    assert 25 < len(chunks) < 80  # about 3000 / 64 on average
    grown = sorted(files + [P.FileEntry("f01500a.jpg", 5, 2), P.FileEntry("zzz.jpg", 5, 2)])
    after = [P.chunk_key("m", c) for c in P.chunk_entries(grown, 64)]
    assert len(set(after) - set(before)) <= 3  # the chunk of each new file (rarely its neighbour)
    assert len(set(before) & set(after)) >= len(before) - 3
    touched = [P.FileEntry(e.rel, e.size, 99) if e.rel == "f00007.jpg" else e for e in files]
    assert len(set(P.chunk_key("m", c) for c in P.chunk_entries(touched, 64)) - set(before)) == 1
    assert P.chunk_key("other-model", chunks[0]) != before[0]


def test_to_probabilities_renormalises_or_applies_softmax():
    from imgflow.tasks.inference import to_probabilities

    probs = to_probabilities(np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], atol=1e-7)
    logits = to_probabilities(np.array([[2.0, 0.0, -1.0]]))
    expected = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    np.testing.assert_allclose(logits[0], expected)
    assert P.csv_header(["a", "b"], top_k=5) == [
        "path", "label", "confidence", "novelty", "unknown", "prob_a", "prob_b", "top1_label", "top1_prob", "top2_label", "top2_prob",
        "error",
    ]


def test_part_files_round_trip_and_stale_cleanup(tmp_path):
    rows = [["a,b.png", "one", "0.9", "1.5", "false", "0.9", "0.05", "0.05", ""],
            ['q"x.png', "", "", "", "", "", "", "", "OSError: bad"]]
    part = P.write_part(P.part_path(tmp_path, "k1"), CLASS_NAMES, rows)
    assert list(P.read_part(part, CLASS_NAMES)) == rows
    with pytest.raises(ValueError, match="expected header"):
        list(P.read_part(part, ["cat", "dog"]))
    P.write_part(P.part_path(tmp_path, "k2"), CLASS_NAMES, [])
    old, fresh = tmp_path / ".tmp-part-k3.csv.abc.csv", tmp_path / ".tmp-part-k4.csv.def.csv"
    old.write_text("half")
    fresh.write_text("half")
    os.utime(old, (1_000_000, 1_000_000))
    assert P.remove_stale_temporaries(tmp_path) == 1 and fresh.exists() and not old.exists()
    assert P.remove_stale_parts(tmp_path, keep=["k1"]) == 1
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-k1.csv"]
    summary = P.assemble_csv(tmp_path / "out.csv", [part], CLASS_NAMES, top_k=1)
    assert summary == {"csv": str(tmp_path / "out.csv"), "rows": 2, "errors": 1, "label_counts": {"one": 1},
                       "unknown": 0, "scored": 1, "predicted_counts": {"one": 1}}
    header, read = _read_csv(tmp_path / "out.csv")
    assert header[-3:] == ["top1_label", "top1_prob", "error"]
    assert read[0]["top1_label"] == "one" and read[1]["top1_label"] == "" and read[1]["error"] == "OSError: bad"


def test_predict_files_rows_in_order_with_errors(model_dir, tmp_path):
    model, meta = P.load_model_cached(model_dir)
    assert P.load_model_cached(model_dir)[0] is model  # loaded once per process
    truth = _save_digits(tmp_path, 0, 7)
    (tmp_path / "bad.png").write_bytes(b"nope")
    entries = [P.FileEntry(rel, 1, 1) for rel in sorted(truth)] + [P.FileEntry("bad.png", 4, 1)]
    entries.insert(3, P.FileEntry("link.png", 0, 0, "broken symlink"))
    rows = P.predict_files(model, meta, tmp_path, entries, batch_size=3, workers=2)
    assert [r[0] for r in rows] == [e.rel for e in entries]
    assert rows[3][-1] == "broken symlink" and rows[3][1] == ""
    assert rows[-1][-1].startswith("UnidentifiedImageError") and rows[-1][1] == ""
    good = [r for r in rows if not r[-1]]
    assert len(good) == 7
    assert sum(r[1] == truth[r[0]] for r in good) >= 6


def test_short_last_batch_is_padded_to_an_eighth_of_a_batch_traced_twice_and_unchanged(model_dir, tmp_path, monkeypatch):
    import keras

    from imgflow.tasks import inference

    model, meta = P._load_model_dir(model_dir)  # a fresh model: its own predict function
    truth = _save_digits(tmp_path, 0, 37)
    entries = [P.FileEntry(rel, 1, 1) for rel in sorted(truth)]
    calls: list[int] = []
    real_run_batch = inference.run_batch
    monkeypatch.setattr(P, "run_batch", lambda model, x, *args: calls.append(len(x)) or real_run_batch(model, x, *args))
    rows = P.predict_files(model, meta, tmp_path, entries[:21], batch_size=16, workers=2)
    assert calls == [16, 6]  # 21 files: a whole batch, then 5 files padded to 6 (a multiple of 16 // 8), not to 16
    again = P.predict_files(model, meta, tmp_path, entries[21:], batch_size=16, workers=2)
    assert calls[2:] == [16]  # 16 files: one whole batch
    P.predict_files(model, meta, tmp_path, entries[:19], batch_size=16, workers=2)
    assert calls[3:] == [16, 4]
    P.predict_files(model, meta, tmp_path, entries[:3], batch_size=16, workers=2)
    assert calls[5:] == [4]  # a list shorter than a batch: a power of two
    # a second trace with a free batch size, then none: not one per chunk's last batch
    assert model.predict_function.experimental_get_tracing_count() == 2
    from imgflow.tasks.tfrecords import load_image

    x = np.stack([load_image(tmp_path / e.rel, meta["image_size"], meta["aspect"]) for e in entries]).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    first = len(P.LEADING_COLUMNS)  # path, label, confidence, novelty, unknown, then prob_<class>...
    got = np.array([[float(c) for c in row[first:first + len(meta["class_names"])]] for row in rows + again])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r[1] for r in rows + again] == [meta["class_names"][i] for i in expected.argmax(axis=1)]


# ------------------------------------------------------------------- the flow


def test_batch_predict_every_file_once_and_rerun_is_identical(prefect_server, model_dir, inbox, tmp_path):
    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    workdir = tmp_path / "work"
    result = batch_predict(model=str(model_dir), input_dir=root, workdir=workdir, batch_size=16, top_k=2, chunk_size=8,
                           csv_neutralise=False)
    out = workdir / "predictions" / "inbox.csv"
    assert result["csv"] == str(out)
    header, rows = _read_csv(out)
    assert header == [
        "path", "label", "confidence", "novelty", "unknown", "prob_one", "prob_seven", "prob_zero",
        "top1_label", "top1_prob", "top2_label", "top2_prob", "error",
    ]
    accuracy = _check_rows(rows, truth, broken)
    assert accuracy >= 0.9
    assert result["rows"] == len(truth) + len(broken) == 48
    assert result["errors"] == len(broken)
    assert sum(result["label_counts"].values()) == len(truth)
    assert list(result["label_counts"]) == [n for n in CLASS_NAMES if n in result["label_counts"]]
    assert result["predicted"] == 48 and result["skipped_chunks"] == 0 and result["chunks"] >= 3
    assert result["images_per_second"] > 0
    for row in rows:
        if not row["error"]:
            assert row["top1_label"] == row["label"] and float(row["top1_prob"]) >= float(row["top2_prob"])
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert errors["notes.txt"].startswith("UnidentifiedImageError")
    # the raw bytes survive pandas too (quoting of commas, quotes, '=' and non-ASCII)
    import pandas as pd

    from imgflow.tasks.csvcells import restore_cell

    frame = pd.read_csv(out, keep_default_na=False)
    assert {restore_cell(p) for p in frame["path"]} == set(truth) | broken

    before = out.read_bytes()
    again = batch_predict(model=str(model_dir), input_dir=root, workdir=workdir, batch_size=16, top_k=2, chunk_size=8,
                           csv_neutralise=False)
    assert again["skipped_chunks"] == again["chunks"] == result["chunks"]
    assert again["predicted"] == 0 and again["images_per_second"] == 0.0
    assert out.read_bytes() == before


def test_new_files_are_predicted_on_the_next_run(prefect_server, model_dir, inbox, tmp_path):
    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    out = tmp_path / "results" / "preds.csv"
    first = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, chunk_size=8)
    assert first["rows"] == 48
    truth.update(_save_digits(root, 150, 6, prefix="new_"))
    second = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, chunk_size=8)
    _, rows = _read_csv(out)
    assert _check_rows(rows, truth, broken) >= 0.9
    assert second["rows"] == 54
    assert second["skipped_chunks"] >= 1
    assert 6 <= second["predicted"] < 54  # only chunks holding new files ran again
    parts = list(Path(second["run_dir"]).glob("part-*.csv"))
    assert len(parts) == second["chunks"]  # parts of replaced chunks are gone


def test_resume_after_sigkill_between_chunks(prefect_server, model_dir, inbox, tmp_path):
    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    workdir = tmp_path / "work"
    script = textwrap.dedent(
        f"""
        import os, signal
        import imgflow.tasks.prediction as P
        written = 0
        original = P.write_part
        def write_then_die(*args, **kwargs):
            global written
            path = original(*args, **kwargs)
            written += 1
            if written == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        P.write_part = write_then_die
        from imgflow.flows.prediction import batch_predict
        batch_predict(model={str(model_dir)!r}, input_dir={str(root)!r}, workdir={str(workdir)!r}, chunk_size=6)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_flow_env(), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    out = workdir / "predictions" / "inbox.csv"
    assert not out.exists()
    run_dirs = list((workdir / "predictions" / "runs").iterdir())
    assert len(run_dirs) == 1
    done = len(list(run_dirs[0].glob("part-*.csv")))
    assert done >= 2

    result = batch_predict(model=str(model_dir), input_dir=root, workdir=workdir, chunk_size=6)
    assert result["skipped_chunks"] == done
    assert result["predicted"] < 48
    _, rows = _read_csv(out)
    assert len(rows) == 48
    assert _check_rows(rows, truth, broken) >= 0.9


def test_dask_fan_out_matches_local_run(prefect_server, model_dir, inbox, tmp_path):
    from distributed import LocalCluster

    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    local = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "local", chunk_size=8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        fanned = batch_predict(
            model=str(model_dir), input_dir=root, workdir=tmp_path / "dask", chunk_size=8,
            dask_address=cluster.scheduler_address,
        )
    assert fanned["worker_processes"] == 2
    assert fanned["rows"] == local["rows"] == 48 and fanned["label_counts"] == local["label_counts"]
    _, local_rows = _read_csv(Path(local["csv"]))
    _, dask_rows = _read_csv(Path(fanned["csv"]))
    assert [r["path"] for r in dask_rows] == [r["path"] for r in local_rows]
    for a, b in zip(local_rows, dask_rows):
        assert a["label"] == b["label"]
        assert float(a["confidence"] or 0) == pytest.approx(float(b["confidence"] or 0), abs=1e-5)
    assert _check_rows(dask_rows, truth, broken) >= 0.9


def test_bad_inputs_name_what_is_wrong(prefect_server, model_dir, tmp_path):
    from imgflow.flows.prediction import batch_predict

    with pytest.raises(FileNotFoundError, match="INPUT_DIR .*expected a folder of images, found nothing there"):
        batch_predict(model=str(model_dir), input_dir=tmp_path / "missing", workdir=tmp_path)
    (tmp_path / "in").mkdir()
    with pytest.raises(FileNotFoundError, match="champion"):
        batch_predict(model="champion", input_dir=tmp_path / "in", workdir=tmp_path / "empty-work")
    with pytest.raises(ValueError, match="batch_size"):
        batch_predict(model=str(model_dir), input_dir=tmp_path / "in", workdir=tmp_path, batch_size=0)


def test_champion_and_a_folder_holding_only_the_workdir(prefect_server, model_dir, tmp_path):
    from imgflow.flows.prediction import batch_predict

    inbox = tmp_path / "inbox"
    workdir = inbox / "work"  # the workdir (and so the CSV and part files) inside INPUT_DIR: never listed
    workdir.mkdir(parents=True)
    (workdir / "champion.json").write_text(json.dumps({"run_id": "digits-test", "model_dir": str(model_dir)}))
    result = batch_predict(model="champion", input_dir=inbox, workdir=workdir)
    assert result["rows"] == 0 and result["chunks"] == 0
    assert result["model_dir"] == str(Path(model_dir).resolve())
    assert result["csv"] == str(workdir / "predictions" / "inbox.csv")
    header, rows = _read_csv(Path(result["csv"]))
    assert header == ["path", "label", "confidence", "novelty", "unknown", "prob_one", "prob_seven", "prob_zero",
                      "error"] and rows == []
    again = batch_predict(model="champion", input_dir=inbox, workdir=workdir)
    assert again["rows"] == 0


def test_a_new_model_predicts_everything_again_and_drops_the_old_parts(prefect_server, model_dir, inbox, tmp_path):
    import shutil

    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    out = tmp_path / "preds.csv"
    first = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, chunk_size=16)
    other = shutil.copytree(model_dir, tmp_path / "newer-model")
    second = batch_predict(model=str(other), input_dir=root, workdir=tmp_path / "w", out=out, chunk_size=16)
    assert second["run_dir"] != first["run_dir"] and not Path(first["run_dir"]).exists()
    assert second["skipped_chunks"] == 0 and second["predicted"] == 48
    elsewhere = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", chunk_size=16)
    assert Path(second["run_dir"]).exists()  # another output file: not superseded
    _, rows = _read_csv(Path(elsewhere["csv"]))
    assert _check_rows(rows, truth, broken) >= 0.9


def test_cli_predict_prints_the_summary_and_exits_2_on_a_missing_model(prefect_server, model_dir, inbox, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    # Prefect's log handlers bind the streams of the first flow run in the process; let that
    # be pytest's, not the CliRunner's (closed after invoke), when this test runs alone
    (tmp_path / "empty").mkdir()
    batch_predict(model=str(model_dir), input_dir=tmp_path / "empty", workdir=tmp_path / "warm")
    out = tmp_path / "cli.csv"
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(model_dir), str(root), "--workdir", str(tmp_path / "w"),
                                 "--out", str(out), "--top-k", "2", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert "48 rows, 3 unreadable files" in result.output and str(out) in result.output
    header, rows = _read_csv(out)
    assert "top2_label" in header and len(rows) == 48
    missing = runner.invoke(app, ["predict", str(tmp_path / "no-model"), str(root), "--workdir", str(tmp_path / "w")])
    assert missing.exit_code == 2


def test_scan_gives_fifos_and_loops_an_error_row_and_non_utf8_names_a_text_path(tmp_path):
    from imgflow.tasks import scan

    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.png").write_bytes(b"x")
    os.mkfifo(root / "pipe.png")
    os.symlink("self.png", root / "self.png")
    (Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9.png"))).write_bytes(b"yy")
    entries = {e.rel: e for e in P.scan_files(root)}
    assert sorted(entries) == ["caf\\xe9.png", "ok.png", "pipe.png", "self.png"]
    assert entries["pipe.png"].error == "not a regular file (FIFO, socket or device); never opened"
    assert entries["self.png"].error == "symlink loop; not followed"
    assert entries["caf\\xe9.png"].error == "" and entries["caf\\xe9.png"].size == 2
    assert os.fsencode(scan.decode_path("caf\\xe9.png")) == b"caf\xe9.png"
    rows = P.predict_files(None, {"class_names": ["a", "b"], "image_size": 8, "aspect": "squash"}, root,
                           [entries["pipe.png"], entries["self.png"]])
    assert [r[0] for r in rows] == ["pipe.png", "self.png"] and all(r[-1] for r in rows)


def test_a_part_file_left_empty_is_predicted_again(prefect_server, model_dir, inbox, tmp_path):
    from imgflow.flows.prediction import batch_predict

    root, truth, broken = inbox
    out = tmp_path / "preds.csv"
    first = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, csv_neutralise=False)
    parts = sorted(Path(first["run_dir"]).glob("part-*.csv"))
    assert first["chunks"] == len(parts) >= 1
    parts[0].write_bytes(b"")  # what a power cut may leave of a part file written without fsync
    second = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, csv_neutralise=False)
    assert second["skipped_chunks"] == second["chunks"] - 1 and second["predicted"] >= 1
    _, rows = _read_csv(out)
    assert len(rows) == first["rows"] == 48 and _check_rows(rows, truth, broken) >= 0.9


def test_one_new_file_re_predicts_its_small_group_not_its_chunk(prefect_server, model_dir, inbox, tmp_path, monkeypatch):
    from imgflow.flows import prediction
    from imgflow.flows.prediction import batch_predict

    GROUP_SIZE = 8  # the default (32) would put these 48 files into one or two groups
    monkeypatch.setattr(prediction, "GROUP_SIZE", GROUP_SIZE)
    root, truth, broken = inbox
    out = tmp_path / "preds.csv"
    # the default chunk_size (1024) puts all 48 files into one task; part files stay small groups
    first = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, csv_neutralise=False)
    assert first["predicted"] == 48 and first["chunks"] >= 48 // (2 * GROUP_SIZE)
    truth.update(_save_digits(root, 150, 1, prefix="new_"))
    second = batch_predict(model=str(model_dir), input_dir=root, workdir=tmp_path / "w", out=out, csv_neutralise=False)
    assert second["rows"] == 49
    assert 1 <= second["predicted"] <= 2 * GROUP_SIZE + 1  # its group (rarely also the next), not all 49
    assert second["skipped_chunks"] >= second["chunks"] // 2  # most part files are reused
    _, rows = _read_csv(out)
    assert _check_rows(rows, truth, broken) >= 0.9
