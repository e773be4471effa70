"""tasks/tfrecords.py without Prefect: image loading, split, shards, manifest, input pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.flows.config import PreprocessOptions
from imgflow.tasks import tfrecords
from imgflow.tasks.dataset import validate_dataset
from tests.imagefactory import make_class_folder

OPTS = PreprocessOptions(image_size=32, val_fraction=0.2)


def _preprocess(data_dir: Path, work: Path, options: PreprocessOptions = OPTS, workers: int = 2, val_dir=None) -> dict:
    report = validate_dataset(data_dir, val_dir)
    return tfrecords.preprocess(report, options, work / "tfrecords", workers=workers)


def _all_records(manifest_path: str, split: str) -> list[dict]:
    manifest = json.loads(Path(manifest_path).read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        records = tfrecords.read_records(Path(manifest_path).parent / shard["file"])
        assert len(records) == shard["records"]
        out.extend(records)
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- load_image


def test_load_image_aspect_modes(tmp_path):
    # a 64x32 image: left half red, right half blue
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)

    squash = tfrecords.load_image(path, 16, "squash")
    crop = tfrecords.load_image(path, 16, "crop")
    pad = tfrecords.load_image(path, 16, "pad")
    for image in (squash, crop, pad):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    # squash keeps both halves side by side
    assert squash[8, 0].tolist() == [255, 0, 0] and squash[8, 15].tolist() == [0, 0, 255]
    # crop keeps the centre 32x32: the middle columns, half red, half blue
    assert crop[8, 0].tolist() == [255, 0, 0] and crop[8, 15].tolist() == [0, 0, 255]
    # pad: 16x8 content centred vertically, black bars above and below
    assert pad[0, 8].tolist() == [0, 0, 0] and pad[15, 8].tolist() == [0, 0, 0]
    assert pad[8, 0].tolist() == [255, 0, 0] and pad[8, 15].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="aspect must be one of squash, crop, pad, got 'stretch'"):
        tfrecords.load_image(path, 16, "stretch")


def test_load_image_applies_exif_orientation_and_converts_modes(tmp_path):
    # stored 40 wide x 20 high, top-left red; EXIF orientation 6 = rotate 90 clockwise to view
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:10, :20] = (250, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image = tfrecords.load_image(path, 20, "pad")
    # viewed upright it is 20 wide x 40 high: pad puts black bars left and right,
    # and the red quarter is now top-right
    assert image[:, :3].max() < 20 and image[:, -3:].max() < 20
    assert image[2, 12, 0] > 200 and image[2, 7, 0] < 60

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(grey)
    assert tfrecords.load_image(grey, 8)[0, 0].tolist() == [77, 77, 77]

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(rgba)
    assert tfrecords.load_image(rgba, 8, background=None)[0, 0].tolist() == [10, 20, 30]  # alpha dropped

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, quality=100)  # pure red
    red = tfrecords.load_image(cmyk, 8)[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    deep = tmp_path / "sixteen.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(deep)
    assert tfrecords.load_image(deep, 8)[0, 0].tolist() == [255, 255, 255]


def test_large_jpeg_uses_reduced_decode_and_matches_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((256, 256), Image.Resampling.BICUBIC))
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    fast = tfrecords.load_image(path, 64).astype(int)
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 3.0


# --------------------------------------------------------------------------- split


def _files(counts: dict[str, int]) -> list[list[str]]:
    return [[f"{c}/{c}_{i:04d}.png", c] for c, n in counts.items() for i in range(n)]


def test_split_is_stratified_deterministic_and_stable():
    files = _files({"a": 200, "b": 100, "c": 2, "d": 1})
    split = tfrecords.assign_splits(files, 0.2, seed=7)
    assert split == tfrecords.assign_splits(list(reversed(files)), 0.2, seed=7)
    val = Counter(c for _, c in split["val"])
    train = Counter(c for _, c in split["train"])
    assert 25 <= val["a"] <= 55 and 10 <= val["b"] <= 30  # about 20 % of each class
    assert val["c"] == 1 and train["c"] == 1  # a 2-image class still gets 1 val image
    assert val["d"] == 0 and train["d"] == 1  # a 1-image class stays in train
    assert len(split["train"]) + len(split["val"]) == len(files)

    # adding unrelated files (new class, new files in other classes) moves no existing file
    grown = files + _files({"e": 50}) + [[f"a/new_{i}.png", "a"] for i in range(40)]
    grown_split = tfrecords.assign_splits(grown, 0.2, seed=7)
    old_val = {p for p, _ in split["val"]}
    new_val = {p for p, _ in grown_split["val"]}
    assert {p for p, _ in files if p in new_val} == old_val

    other_seed = tfrecords.assign_splits(files, 0.2, seed=8)
    assert {p for p, _ in other_seed["val"]} != old_val
    assert tfrecords.assign_splits(files, 0.0, seed=7)["val"] == []
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        tfrecords.assign_splits(files, 1.0, seed=7)


def test_class_order_matches_keras(tmp_path):
    import keras

    names = {"Zebra": 2, "apple": 2, "_under": 2, "10": 2, "9": 2, "B": 2}
    data = make_class_folder(tmp_path / "data", names, size=16)
    keras_ds = keras.utils.image_dataset_from_directory(data, image_size=(16, 16), batch_size=4, verbose=False)
    result = _preprocess(data, tmp_path / "work", PreprocessOptions(image_size=16))
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["class_names"] == keras_ds.class_names == ["10", "9", "B", "Zebra", "_under", "apple"]


# --------------------------------------------------------------------------- shards


def test_round_trip_pixels_labels_and_manifest(tmp_path, digits_dir):
    result = _preprocess(digits_dir, tmp_path / "work")
    assert result["cached"] is False
    assert result["counts"]["train"] + result["counts"]["val"] == 180
    manifest_path = Path(result["manifest"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["class_names"] == ["one", "seven", "zero"]
    # encoding auto: 180 records of 32 px fit the raw budget many times over
    assert manifest["image_size"] == 32 and manifest["encoding"] == "raw" and manifest["aspect"] == "squash"
    assert manifest["data_dir"] == str(digits_dir.resolve()) and manifest["val_dir"] is None
    assert len(manifest["fingerprint"]) == 64 and manifest["code_version"].endswith("+fmt1")
    assert manifest_path.parent.name == manifest["fingerprint"][:16]
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert sum(s["records"] for s in info["shards"]) == info["count"] == sum(info["per_class"].values())
        assert [s["file"] for s in info["shards"]] == [
            f"{split}-{i:05d}-of-{len(info['shards']):05d}.tfrecord" for i in range(len(info["shards"]))
        ]
    assert manifest["splits"]["val"]["count"] == result["counts"]["val"]
    for name in ("one", "seven", "zero"):
        assert 5 <= manifest["splits"]["val"]["per_class"][name] <= 20  # ~20 % of 60

    records = _all_records(result["manifest"], "train") + _all_records(result["manifest"], "val")
    assert sorted(r["filename"] for r in records) == sorted(
        p.relative_to(digits_dir).as_posix() for p in digits_dir.rglob("*.png")
    )
    for record in records:
        assert record["filename"].split("/")[0] == record["class"]
        assert manifest["class_names"][record["label"]] == record["class"]
        assert record["image"].shape == (32, 32, 3) and (record["height"], record["width"]) == (32, 32)
        original = np.asarray(Image.open(digits_dir / record["filename"]).convert("RGB")).astype(int)
        assert np.array_equal(record["image"].astype(int), original)  # raw: lossless
    # shards mix the classes (hash write order), so interleaving few shards still shuffles well
    first = tfrecords.read_records(manifest_path.parent / manifest["splits"]["train"]["shards"][0]["file"])
    assert len({r["class"] for r in first[:20]}) == 3


def test_encoding_auto_is_raw_within_the_budget_and_jpeg_beyond():
    budget_images = tfrecords.RAW_MAX_BYTES // (128 * 128 * 3)
    assert tfrecords.resolve_encoding("auto", 13_000, 128) == "raw"  # the seed scale: 640 MB
    assert tfrecords.resolve_encoding("auto", budget_images, 128) == "raw"
    assert tfrecords.resolve_encoding("auto", budget_images + 1, 128) == "jpeg"
    assert tfrecords.resolve_encoding("png", 10, 32) == "png"  # an explicit choice is kept


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_lossless_encodings_are_exact(tmp_path, encoding):
    data = make_class_folder(tmp_path / "data", {"a": 4, "b": 4}, size=24)
    options = PreprocessOptions(image_size=16, encoding=encoding, aspect="crop", val_fraction=0.0)
    result = _preprocess(data, tmp_path / "work", options)
    assert result["counts"] == {"train": 8, "val": 0}
    for record in _all_records(result["manifest"], "train"):
        assert record["format"] == encoding
        expected = tfrecords.load_image(data / record["filename"], 16, "crop")
        assert np.array_equal(record["image"], expected)


def test_rejected_files_never_reach_a_shard(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 6, "b": 6}, size=16)
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "b" / "empty.jpg").write_bytes(b"")
    (data / "b" / "notes.txt").write_text("not an image")
    report = validate_dataset(data)
    result = tfrecords.preprocess(report, OPTS, tmp_path / "work" / "tfrecords", workers=2)
    names = {r["filename"] for split in ("train", "val") for r in _all_records(result["manifest"], split)}
    assert len(names) == 12
    assert not {"a/broken.png", "b/empty.jpg", "b/notes.txt"} & names


def test_val_dir_gives_the_val_split(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 5, "b": 5}, size=16)
    val = make_class_folder(tmp_path / "val", {"a": 2, "b": 3}, size=16, seed=9)
    result = _preprocess(data, tmp_path / "work", OPTS, val_dir=val)
    assert result["counts"] == {"train": 10, "val": 5}
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["val_dir"] == str(val.resolve())
    assert manifest["splits"]["val"]["per_class"] == {"a": 2, "b": 3}
    assert sorted(r["filename"] for r in _all_records(result["manifest"], "val")) == sorted(
        p.relative_to(val).as_posix() for p in val.rglob("*.png")
    )


def test_shard_count_follows_size_and_workers():
    opts = PreprocessOptions(image_size=128, shard_size_mb=1, encoding="jpeg")
    assert tfrecords.shard_count(0, opts, 8) == 0
    assert tfrecords.shard_count(3, opts, 8) == 3  # never an empty shard
    assert tfrecords.shard_count(100, opts, 4) == 4  # one per worker
    assert tfrecords.shard_count(1000, opts, 2) == 10  # ~10 KB a record -> ~1 MB shards
    raw = PreprocessOptions(image_size=128, shard_size_mb=1, encoding="raw")
    assert tfrecords.shard_count(1000, raw, 2) == 48


# --------------------------------------------------------------------------- caching


def test_a_rerun_with_another_worker_count_reports_the_shards_the_manifest_lists(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=16)
    work = tmp_path / "work"
    first = _preprocess(data, work, workers=3)  # more workers, more shards
    manifest = json.loads(Path(first["manifest"]).read_text())
    listed = sum(len(split["shards"]) for split in manifest["splits"].values())
    report = validate_dataset(data)
    one_worker_plan = tfrecords.plan_shard_files(tfrecords.plan_shards(report, OPTS, work / "tfrecords", 1))
    assert first["shards"] == listed == 5 and len(one_worker_plan) == 2

    again = _preprocess(data, work, workers=1)
    assert again == {**first, "cached": True}
    assert tfrecords.reusable_shards(report, OPTS, work / "tfrecords")["shards"] == 5
    assert tfrecords.listed_shard_files(first["manifest"]) == [
        s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]


def test_rerun_is_cached_and_changes_rebuild(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=16)
    work = tmp_path / "work"
    first = _preprocess(data, work)
    folder = Path(first["manifest"]).parent
    before = _mtimes(folder)

    again = _preprocess(data, work)
    assert again == {**first, "cached": True}
    assert _mtimes(folder) == before  # nothing rewritten, plan.json included

    option_change = _preprocess(data, work, PreprocessOptions(image_size=24, val_fraction=0.2))
    assert option_change["cached"] is False and option_change["manifest"] != first["manifest"]

    target = data / "a" / "a_000.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    touched = _preprocess(data, work)
    assert touched["cached"] is False and touched["manifest"] != first["manifest"]

    make_class_folder(data, {"b": 9}, size=16, seed=5)  # overwrites b_000..b_007, adds b_008
    added = _preprocess(data, work)
    assert added["cached"] is False and added["counts"]["train"] + added["counts"]["val"] == 17
    assert _mtimes(folder) == before  # the old result is left as it was


def test_deleted_shard_rebuilds(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=16)
    first = _preprocess(data, tmp_path / "work")
    manifest = json.loads(Path(first["manifest"]).read_text())
    victim = Path(first["manifest"]).parent / manifest["splits"]["train"]["shards"][0]["file"]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="shard named by .* is missing"):
        tfrecords.make_dataset(first["manifest"], "train", 4, training=False)
    second = _preprocess(data, tmp_path / "work")
    assert second["cached"] is False and victim.exists()
    assert second["manifest"] == first["manifest"]


# --------------------------------------------------------------------------- crash safety


def test_failed_shard_leaves_no_manifest_and_resume_keeps_done_shards(tmp_path, monkeypatch):
    data = make_class_folder(tmp_path / "data", {"a": 8, "b": 8}, size=16)
    report = validate_dataset(data)
    options = PreprocessOptions(image_size=16, val_fraction=0.0)
    plan = tfrecords.plan_shards(report, options, tmp_path / "tfrecords", workers=2)
    failing = plan["splits"]["train"]["shards"][1]["items"][3][0]
    real_load = tfrecords.load_image

    def flaky(path, size, aspect="squash", background="black"):
        if Path(path).as_posix().endswith(failing):
            raise OSError("simulated read error")
        return real_load(path, size, aspect, background)

    monkeypatch.setattr(tfrecords, "load_image", flaky)
    with pytest.raises(tfrecords.ShardSourceError, match=f"{failing}: validation accepted it.*simulated read error"):
        tfrecords.preprocess(report, options, tmp_path / "tfrecords", workers=2)
    folder = Path(plan["out_dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json", "train-00000-of-00002.tfrecord"]
    done_mtime = (folder / "train-00000-of-00002.tfrecord").stat().st_mtime_ns

    monkeypatch.setattr(tfrecords, "load_image", real_load)
    result = tfrecords.preprocess(report, options, tmp_path / "tfrecords", workers=2)
    assert result["cached"] is False and result["counts"]["train"] == 16
    assert (folder / "train-00000-of-00002.tfrecord").stat().st_mtime_ns == done_mtime  # resumed, not rewritten
    assert len(_all_records(result["manifest"], "train")) == 16


def test_killed_writer_leaves_no_manifest(tmp_path):
    """SIGKILL in the middle of a shard: only complete shards have final names, no manifest."""
    data = make_class_folder(tmp_path / "data", {"a": 10, "b": 10}, size=16)
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(validate_dataset(data)))
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from imgflow.flows.config import PreprocessOptions
        from imgflow.tasks import tfrecords
        report = json.loads(Path({str(report_path)!r}).read_text())
        real, seen = tfrecords.load_image, []
        def dying(path, size, aspect="squash", background="black"):
            seen.append(path)
            if len(seen) == 14:  # inside the second train shard (10 records each)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, size, aspect, background)
        tfrecords.load_image = dying
        tfrecords.preprocess(report, PreprocessOptions(image_size=16, val_fraction=0.0), Path({str(tmp_path / "tfrecords")!r}), workers=2)
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    folder = next((tmp_path / "tfrecords").iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert "manifest.json" not in names
    assert "train-00000-of-00002.tfrecord" in names and "train-00001-of-00002.tfrecord" not in names
    assert any(n.startswith(".tmp-train-00001-of-00002") for n in names)  # the half shard, never mistaken
    with pytest.raises(FileNotFoundError, match="no TFRecord manifest here"):
        tfrecords.make_dataset(folder / "manifest.json", "train", 4, training=False)

    result = tfrecords.preprocess(
        json.loads(report_path.read_text()), PreprocessOptions(image_size=16, val_fraction=0.0), tmp_path / "tfrecords", workers=2
    )
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    assert len(_all_records(result["manifest"], "train")) == 20


# --------------------------------------------------------------------------- make_dataset


def test_make_dataset_batches_orders_and_shuffles(tmp_path, digits_dir):
    result = _preprocess(digits_dir, tmp_path / "work")
    manifest = json.loads(Path(result["manifest"]).read_text())
    n_train = manifest["splits"]["train"]["count"]

    ds = tfrecords.make_dataset(result["manifest"], "train", 16, training=False, include_filenames=True)
    images, labels, names = next(iter(ds))
    assert images.dtype.name == "uint8" and tuple(images.shape) == (16, 32, 32, 3)
    assert labels.dtype.name == "int32" and tuple(labels.shape) == (16,)
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]

    def order(dataset):
        return [n.decode() for _, _, batch in dataset for n in batch.numpy()]

    first = order(ds)
    assert len(first) == n_train and first == order(ds)  # deterministic, repeatable
    by_name = {r["filename"]: r["label"] for r in _all_records(result["manifest"], "train")}
    for _, labels, batch in ds:
        assert [by_name[n.decode()] for n in batch.numpy()] == labels.numpy().tolist()

    train = tfrecords.make_dataset(result["manifest"], "train", 16, training=True, seed=1, include_filenames=True)
    epoch1, epoch2 = order(train), order(train)
    assert sorted(epoch1) == sorted(first) == sorted(epoch2)
    assert epoch1 != first and epoch1 != epoch2  # shuffled, and reshuffled every epoch

    # the same pixels with and without the in-memory cache
    uncached = tfrecords.make_dataset(result["manifest"], "val", 64, training=False, cache_budget_mb=0)
    cached = tfrecords.make_dataset(result["manifest"], "val", 64, training=False)
    a = np.concatenate([x.numpy() for x, _ in uncached])
    b = np.concatenate([x.numpy() for x, _ in cached])
    assert a.shape[0] == manifest["splits"]["val"]["count"] and np.array_equal(a, b)
    # tf.data's autotune thread made each epoch's iterator destruction wait up to ~2 s
    assert all(d.options().autotune.enabled is False for d in (ds, train, uncached, cached))


def test_make_dataset_errors_name_the_problem(tmp_path):
    data = make_class_folder(tmp_path / "data", {"a": 4, "b": 4}, size=16)
    result = _preprocess(data, tmp_path / "work", PreprocessOptions(image_size=16, val_fraction=0.0))
    with pytest.raises(ValueError, match="split 'val' has no records .*--val-fraction"):
        tfrecords.make_dataset(result["manifest"], "val", 4, training=False)
    with pytest.raises(ValueError, match="split must be one of train, val, got 'test'"):
        tfrecords.make_dataset(result["manifest"], "test", 4, training=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        tfrecords.make_dataset(result["manifest"], "train", 0, training=False)


def test_split_warnings_name_a_class_left_without_training_or_validation_images():
    from imgflow.tasks.tfrecords import split_warnings

    assert split_warnings({"train": {"a": 5, "b": 3}, "val": {"a": 1, "b": 1}}) == []
    warnings = split_warnings({"train": {"a": 5, "b": 0}, "val": {"a": 0, "b": 1}})
    assert len(warnings) == 2
    assert warnings[0].startswith("class(es) b got no train image after the split: the model never sees it")
    assert warnings[1].startswith("class(es) a got no val image after the split: its accuracy cannot be measured")
