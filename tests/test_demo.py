"""Demo data: real digits as PNG/JPEG class folders plus a held-out inbox with its labels."""

from __future__ import annotations

import csv

from PIL import Image

from imgflow.flows.demo import build_demo_data, inbox_accuracy


def test_demo_data_holds_out_an_unlabelled_inbox(tmp_path):
    info = build_demo_data(tmp_path / "demo", holdout_per_class=5)
    data_dir, inbox = tmp_path / "demo" / "digits", tmp_path / "demo" / "inbox"
    assert sorted(p.name for p in data_dir.iterdir()) == ["one", "seven", "zero"]
    # scikit-learn has 178 zeros, 182 ones and 179 sevens
    assert info["train_counts"] == {"zero": 173, "one": 177, "seven": 174}
    assert info["inbox_count"] == 15 and len(list(inbox.iterdir())) == 15
    suffixes = {p.suffix for p in data_dir.rglob("*.*")}
    assert suffixes == {".png", ".jpg"}
    sample = next(data_dir.glob("zero/*.jpg"))
    with Image.open(sample) as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    with open(info["inbox_labels"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and {r["label"] for r in rows} == {"zero", "one", "seven"}
    assert all((inbox / r["path"]).is_file() for r in rows)
    # no held-out image is also in the training folders
    train_ids = {p.stem.split("_")[1] for p in data_dir.rglob("*.*")}
    assert not train_ids & {r["path"][4:8] for r in rows}
    # a second build reuses the files and gives the same split
    again = build_demo_data(tmp_path / "demo", holdout_per_class=5)
    assert again == info


def test_inbox_accuracy_joins_predictions_to_labels(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,one\nb.png,zero\nc.png,seven\nd.png,one\n")
    predictions = tmp_path / "pred.csv"
    predictions.write_text("path,label,confidence,error\na.png,one,0.9,\nb.png,one,0.6,\nc.png,seven,0.8,\nd.png,,,unreadable\n")
    assert inbox_accuracy(predictions, labels) == 0.5
