"""Fault injection: hostile and careless input trees against validate, evaluate and predict.

One tree holds every trap the folder walker's policy covers (imgflow.tasks.scan): a
symlink to a file outside the root, a class folder symlinked outside the root (to a
folder holding ``/etc/passwd``-like text, an image and a FIFO that would block any
reader), symlink loops, a FIFO, a non-UTF-8 file name, hidden files and a nested
folder. Every command must finish, read nothing outside its root and say what it
skipped. Then: outputs never touch inputs (issue 12 §3, §10) and the smaller
validation findings (§12).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from imgflow.flows.cli import app
from imgflow.tasks import paths, scan
from imgflow.tasks.dataset import inspect_image, validate_dataset
from tests.imagefactory import make_digit_folder, solid_image
from tests.modelfactory import make_digit_model_dir

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]
runner = CliRunner()
PASSWD = "root:x:0:0:root:/root:/bin/bash\n"
RAW_NAME = b"caf\xe9-\xff.png"  # Latin-1 e-acute and a stray byte: not UTF-8
RAW_TEXT = "caf\\xe9-\\xff.png"  # its text form in every output (imgflow.tasks.scan.encode_path)


def build_hostile(tmp: Path, per_class: int = 8) -> dict[str, Path]:
    """DATA_DIR with digits one/zero (real folders) and seven (a link outside), and every trap."""
    data = make_digit_folder(tmp / "data", per_class=per_class)
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "passwd").write_text(PASSWD)
    shutil.copy(data / "seven" / "seven_0000.png", outside / "secret.png")
    os.mkfifo(outside / "pipe")  # anything that opens it blocks: the test would time out
    shutil.rmtree(data / "seven")
    os.symlink(outside, data / "seven")  # a class folder symlinked outside the root
    zero, one = data / "zero", data / "one"
    os.symlink(outside / "secret.png", zero / "leak.png")  # a file outside
    os.symlink(outside / "passwd", zero / "passwd.png")
    os.symlink(outside / "pipe", one / "pipe_link.png")  # a FIFO outside
    os.symlink("self.png", zero / "self.png")  # loops on itself
    os.symlink("loop_b.png", one / "loop_a.png")
    os.symlink("loop_a.png", one / "loop_b.png")
    os.mkfifo(zero / "fifo.png")  # a FIFO inside
    os.symlink("gone.png", one / "dangling.png")
    shutil.copy(one / "one_0000.png", os.fsencode(one) + b"/" + RAW_NAME)  # a non-UTF-8 name
    (zero / "nested").mkdir()
    shutil.copy(zero / "zero_0000.png", zero / "nested" / "deep.png")  # a nested folder counts for zero
    (zero / ".hidden.png").write_bytes(b"x")
    os.symlink(one / "one_0001.png", one / "inside_alias.png")  # a link inside the root: used
    return {"data": data, "outside": outside}


@pytest.fixture
def hostile(tmp_path) -> dict[str, Path]:
    return build_hostile(tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_digit_model_dir(tmp_path_factory.mktemp("model") / "digits", per_class=40, epochs=8)


def all_text(folder: Path) -> str:
    """Every readable output file under ``folder``, as one string (for 'never leaked' checks)."""
    chunks = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            chunks.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


def codes(report: dict, fragment: str) -> set[tuple[str, str]]:
    return {(p["code"], p["severity"]) for p in report["problems"] if fragment in p["path"]}


# ----------------------------------------------------------------- the walker itself


def test_text_form_of_paths_round_trips_raw_bytes():
    name = os.fsdecode(b"cls/" + RAW_NAME)
    text = scan.encode_path(name)
    assert text == "cls/" + RAW_TEXT
    text.encode("utf-8")  # valid UTF-8, so JSON, CSV and Markdown can hold it
    assert os.fsencode(scan.decode_path(text)) == b"cls/" + RAW_NAME
    for plain in ["a/b.png", "été/ünï.png", "=1+1.jpg", ""]:
        assert scan.encode_path(plain) == plain and scan.decode_path(plain) == plain
    tricky = "a\\xff\\\\b.png"  # a real backslash followed by 'xff': not a stray byte
    assert scan.encode_path(tricky) == "a\\\\xff\\\\\\\\b.png"
    assert scan.decode_path(scan.encode_path(tricky)) == tricky
    assert scan.printable(os.fsdecode(b"bad \xff name")) == "bad \\xff name"


def test_walk_classifies_every_trap_and_never_follows_out(hostile):
    data = hostile["data"]
    found = {e.rel: e for e in scan.walk(data)}
    kinds = {rel: e.kind for rel, e in found.items()}
    assert kinds["seven"] == scan.OUTSIDE
    assert kinds["zero/leak.png"] == kinds["zero/passwd.png"] == kinds["one/pipe_link.png"] == scan.OUTSIDE
    assert kinds["zero/self.png"] == kinds["one/loop_a.png"] == kinds["one/loop_b.png"] == scan.LOOP
    assert kinds["zero/fifo.png"] == scan.SPECIAL
    assert kinds["one/dangling.png"] == scan.BROKEN
    assert kinds["zero/.hidden.png"] == scan.HIDDEN
    assert kinds["zero/nested"] == scan.FOLDER and kinds["zero/nested/deep.png"] == scan.FILE
    assert kinds["one/inside_alias.png"] == scan.FILE and found["one/inside_alias.png"].link
    raw = os.fsdecode(b"one/" + RAW_NAME)
    assert kinds[raw] == scan.FILE and found[raw].undecodable
    assert not any(rel.startswith("seven/") for rel in found)  # the linked class folder is never listed
    # depth first, sorted per folder: a folder's content comes right after it
    rels = list(found)
    assert rels.index("zero/nested/deep.png") == rels.index("zero/nested") + 1
    # exclude by identity: a folder skipped wherever it is
    skipped = {e.rel: e.kind for e in scan.walk(data, exclude=scan.file_ids([data / "zero" / "nested"]))}
    assert skipped["zero/nested"] == scan.EXCLUDED and "zero/nested/deep.png" not in skipped


# ----------------------------------------------------------------- validate


def test_validate_reports_every_trap_and_reads_nothing_outside(hostile, tmp_path):
    data = hostile["data"]
    report = validate_dataset(data)
    assert report["class_names"] == ["one", "zero"]  # 'seven' leads outside: not a class
    assert ("symlink_outside_root", "error") in codes(report, "seven")
    assert ("symlink_outside_root", "error") in codes(report, "zero/leak.png")
    assert ("symlink_outside_root", "error") in codes(report, "one/pipe_link.png")
    assert ("symlink_loop", "warning") in codes(report, "zero/self.png")
    assert ("symlink_loop", "warning") in codes(report, "one/loop_a.png")
    assert ("special_file", "warning") in codes(report, "zero/fifo.png")
    assert ("nested_folder", "warning") in codes(report, "zero/nested")
    assert ("non_utf8_name", "warning") in codes(report, RAW_TEXT)
    used = {rel for rel, _ in report["files"]["train"]}
    assert "one/" + RAW_TEXT in used and "zero/nested/deep.png" in used and "one/inside_alias.png" in used
    assert report["classes"] == {"one": 10, "zero": 9}  # 8 + non-UTF-8 + alias; 8 + nested
    text = json.dumps(report)
    assert "secret.png" not in text and "root:x:0:0" not in text and "seven/" not in text


def test_cli_validate_hostile_tree_writes_utf8_reports(prefect_server, hostile, tmp_path):
    report = tmp_path / "out" / "report.json"
    result = runner.invoke(app, ["validate", str(hostile["data"]), "--report", str(report),
                                 "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "symlink_outside_root" in result.output and "Traceback" not in result.output
    loaded = json.loads(report.read_text(encoding="utf-8"))  # strict UTF-8: no surrogates written
    assert any(p["code"] == "non_utf8_name" for p in loaded["problems"])
    summary = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert RAW_TEXT in summary and "symlink_loop" in summary
    assert "root:x:0:0" not in all_text(tmp_path / "out")


def test_preprocess_reads_non_utf8_names_through_the_report(hostile, tmp_path):
    from imgflow.tasks.options import PreprocessOptions
    from imgflow.tasks.tfrecords import preprocess, read_records, shard_paths

    report = validate_dataset(hostile["data"])
    result = preprocess(report, PreprocessOptions(image_size=16, val_fraction=0.0), tmp_path / "tfrecords")
    names = {r["filename"] for shard in shard_paths(result["manifest"], "train") for r in read_records(shard)}
    assert "one/" + RAW_TEXT in names and len(names) == 19


# ----------------------------------------------------------------- evaluate


def test_cli_evaluate_hostile_tree_reads_nothing_outside(prefect_server, hostile, model_dir, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(model_dir), str(hostile["data"]), "--out", str(out),
                                 "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["count"] == 18  # one (8 + alias) and zero (8 + nested); nothing from 'seven'
    skipped = {s["path"]: s["reason"] for s in metrics["skipped"]["files"]}
    assert "outside the root" in skipped["seven"] and "outside the root" in skipped["zero/leak.png"]
    assert "loop" in skipped["zero/self.png"] and "never opened" in skipped["zero/fifo.png"]
    assert "UTF-8" in skipped["one/" + RAW_TEXT]
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        paths_listed = {row["path"] for row in csv.DictReader(handle)}
    assert len(paths_listed) == 18 and not any(p.startswith("seven/") for p in paths_listed)
    outputs = all_text(out)
    assert "root:x:0:0" not in outputs and "secret.png" not in outputs


# ----------------------------------------------------------------- predict


def test_cli_predict_hostile_inbox_one_row_per_file_found(prefect_server, hostile, model_dir, tmp_path):
    out = tmp_path / "pred" / "inbox.csv"
    result = runner.invoke(app, ["predict", str(model_dir), str(hostile["data"]), "--out", str(out),
                                 "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as handle:  # strict UTF-8
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert rows["seven"]["error"] == "symlink leads outside INPUT_DIR; not followed"
    assert rows["zero/leak.png"]["error"] == "symlink leads outside INPUT_DIR; not followed"
    assert rows["one/pipe_link.png"]["error"] == "symlink leads outside INPUT_DIR; not followed"
    assert rows["zero/self.png"]["error"] == "symlink loop; not followed"
    assert rows["zero/fifo.png"]["error"].startswith("not a regular file")
    assert rows["one/" + RAW_TEXT]["label"] == "one" and rows["one/" + RAW_TEXT]["error"] == ""
    assert rows["zero/nested/deep.png"]["label"] == "zero"
    assert not any(p.startswith("seven/") for p in rows) and "zero/.hidden.png" not in rows
    assert "root:x:0:0" not in out.read_text(encoding="utf-8")


# ----------------------------------------------------------------- outputs never touch inputs


def one_line_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("imgflow: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("argv", [
    ["validate", "{data}", "--report", "{data}/zero/zero_0000.png"],
    ["validate", "{data}", "--workdir", "{data}"],
    ["train", "{data}", "--workdir", "{data}"],
    ["preprocess", "{data}", "--workdir", "{data}"],
    ["evaluate", "{model}", "{data}", "--out", "{data}/zero"],
    ["predict", "{model}", "{data}", "--out", "{data}/zero/zero_0000.png"],
    ["predict", "{model}", "{data}", "--workdir", "{data}"],
])
def test_outputs_onto_or_inside_inputs_exit_2_and_touch_nothing(tmp_path, argv):
    data = make_digit_folder(tmp_path / "data", per_class=3)
    image = data / "zero" / "zero_0000.png"
    before = image.read_bytes()
    args = [a.format(data=data, model=tmp_path / "model") for a in argv]
    result = runner.invoke(app, args)
    one_line_usage_error(result, str(data))
    assert image.read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["one", "seven", "zero"]


def test_val_dir_equal_to_data_dir_is_named_as_such(tmp_path):
    data = make_digit_folder(tmp_path / "data", per_class=3)
    result = runner.invoke(app, ["validate", str(data), "--val-dir", str(data)])
    one_line_usage_error(result, "--val-dir", "is DATA_DIR")
    inside = runner.invoke(app, ["train", str(data), "--val-dir", str(data / "zero")])
    one_line_usage_error(inside, "is inside DATA_DIR")
    with pytest.raises(paths.PathConflict, match="is DATA_DIR"):
        validate_dataset(data, data)


def test_path_rules():
    check = paths.check_output_outside_inputs
    check("/work/out.csv", {"INPUT_DIR": "/work/in"}, "--out")
    with pytest.raises(paths.PathConflict, match="--out /work/in/a.csv is inside INPUT_DIR /work/in"):
        check("/work/in/a.csv", {"INPUT_DIR": "/work/in"}, "--out")
    with pytest.raises(paths.PathConflict, match="is INPUT_DIR"):
        check("/work/in", {"INPUT_DIR": "/work/in"}, "--out")
    check("/work/in2/a.csv", {"INPUT_DIR": "/work/in"}, "--out")  # a prefix is not a parent
    check("/data/imgflow-work/v.json", {"DATA_DIR": "/data"}, "--report", workdir="/data/imgflow-work")
    assert paths.workdirs_to_skip("/data/imgflow-work", {"DATA_DIR": "/data"}) == [Path("/data/imgflow-work")]
    assert paths.workdirs_to_skip("/elsewhere", {"DATA_DIR": "/data"}) == []
    assert paths.summary_path("r/x.json") == Path("r/x.md")
    assert paths.summary_path("r/x.md") == Path("r/x.summary.md")


def test_output_through_a_symlink_into_the_input_is_refused(tmp_path):
    data = make_digit_folder(tmp_path / "data", per_class=3)
    os.symlink(data / "zero", tmp_path / "innocent")
    result = runner.invoke(app, ["validate", str(data), "--report", str(tmp_path / "innocent" / "r.json")])
    one_line_usage_error(result, "is inside DATA_DIR")
    assert not (data / "zero" / "r.json").exists()


def test_workdir_inside_data_dir_is_never_scanned_as_data(prefect_server, tmp_path, monkeypatch):
    from imgflow.flows.validation import validate_flow

    data = make_digit_folder(tmp_path / "data", per_class=4)
    workdir = data / "imgflow-work"
    first = validate_flow(data_dir=data, workdir=workdir)
    assert (workdir / "validation.json").is_file() and first["classes"] == {"one": 4, "seven": 4, "zero": 4}
    (workdir / "plots").mkdir()
    solid_image(32).save(workdir / "plots" / "curve.png")  # what evaluation leaves there
    second = validate_flow(data_dir=data, workdir=workdir)
    report = json.loads((workdir / "validation.json").read_text())
    assert second["classes"] == {"one": 4, "seven": 4, "zero": 4} and "imgflow-work" not in report["class_names"]
    assert ("workdir_skipped", "warning") in codes(report, "imgflow-work")
    monkeypatch.chdir(data)  # `imgflow validate .` with the default ./imgflow-work
    result = runner.invoke(app, ["validate", "."])
    assert result.exit_code == 0, result.output


def test_report_named_md_keeps_json_and_summary_apart(prefect_server, tmp_path):
    data = make_digit_folder(tmp_path / "data", per_class=3)
    report = tmp_path / "x.md"
    result = runner.invoke(app, ["validate", str(data), "--report", str(report), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["usable"] is True
    assert (tmp_path / "x.summary.md").read_text().startswith("# Dataset validation")
    assert str(tmp_path / "x.summary.md") in result.output
    again = runner.invoke(app, ["validate", str(data), "--report", str(report), "--workdir", str(tmp_path / "w")])
    assert again.exit_code == 0, again.output  # the report reads back: no JSONDecodeError


# ----------------------------------------------------------------- smaller validation findings (§12)


def jpeg_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    solid_image(size, seed=3).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.3, 0.5, 0.9, -2])
def test_truncated_jpeg_is_truncated_not_corrupt(tmp_path, keep):
    data = jpeg_bytes()
    cut = data[:-2] if keep == -2 else data[: int(len(data) * keep)]  # -2: only the end marker is missing
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    assert inspect_image(path).error_code == "truncated"


def test_corrupt_jpeg_is_still_corrupt(tmp_path):
    data = bytearray(jpeg_bytes())
    start = data.index(b"\xff\xda") + 20  # inside the scan data: damage, not a cut
    data[start:start + 200] = b"\xff\x00" * 100
    data[start + 50:start + 52] = b"\xff\xd0"  # a stray restart marker
    path = tmp_path / "bad.jpg"
    path.write_bytes(bytes(data))
    info = inspect_image(path)
    assert info.error_code in (None, "corrupt")  # libjpeg may recover; a full file is never 'truncated'
    assert info.error_code != "truncated"


def test_8000px_image_is_large_image_from_its_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (8000, 8000), 128).save(path)
    info = inspect_image(path)
    assert info.error_code is None and (info.width, info.height) == (8000, 8000)
    assert [code for code, _ in info.warnings] == ["large_image"]
    assert "8000x8000" in info.warnings[0][1]
    big_jpeg = tmp_path / "big.jpg"
    Image.new("L", (8000, 8000), 128).save(big_jpeg, quality=50)
    assert [code for code, _ in inspect_image(big_jpeg).warnings] == ["large_image"]


def test_decompression_bomb_is_reported_not_raised(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (2000, 2000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 4 M pixels is over twice the limit
    assert inspect_image(path).error_code == "decompression_bomb"


def test_extension_mismatch_names_png_and_single_image_class_is_warned(tmp_path):
    data = make_digit_folder(tmp_path / "data", per_class=4)
    shutil.move(data / "zero" / "zero_0000.png", data / "zero" / "zero_0000.jpg")
    for extra in list((data / "seven").iterdir())[1:]:
        extra.unlink()
    report = validate_dataset(data)
    mismatch = [p for p in report["problems"] if p["code"] == "extension_mismatch"]
    assert len(mismatch) == 1 and mismatch[0]["message"].endswith("rename to .png")
    single = [p for p in report["problems"] if p["code"] == "too_few_images"]
    assert [p["path"] for p in single] == [str(data / "seven")] and single[0]["severity"] == "warning"
    assert report["usable"] is True and report["classes"]["seven"] == 1

