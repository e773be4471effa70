"""Decoding in worker processes: the same results as in this process, a dead worker replaced, no stray imports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks import decoding
from imgflow.tasks import prediction as P
from tests.modelfactory import make_digit_model_dir
from tests.test_prediction import _save_digits


def _files(root) -> list[str]:
    truth = _save_digits(root, 0, 9)
    Image.new("RGBA", (40, 30), (10, 200, 30, 0)).save(root / "clear.png")  # transparent: onto the background
    Image.new("RGB", (64, 48), (90, 20, 200)).save(root / "photo.jpg", quality=90)  # the plain-JPEG path
    (root / "bad.png").write_bytes(b"not an image")
    return [str(root / rel) for rel in sorted(truth)] + [str(root / n) for n in ("clear.png", "photo.jpg", "bad.png",
                                                                                 "missing.png")]


def _same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for (pixels, error, *props), (want_pixels, want_error, *want_props) in zip(got, want):
        assert error == want_error and props == want_props
        if want_pixels is None:
            assert pixels is None
        else:
            np.testing.assert_array_equal(pixels, want_pixels)


def _in_workers(count: int, paths: list, *settings) -> tuple[decoding.DecoderProcesses, list[tuple]]:
    """Decode ``paths`` with ``settings`` in ``count`` fresh workers, closed afterwards; (the workers, the results)."""
    workers = decoding.DecoderProcesses(count)
    try:
        return workers, workers.decode(paths, *settings)
    finally:
        workers.close()


@pytest.mark.parametrize("profiled", [False, True])
def test_a_worker_decodes_exactly_as_this_process(tmp_path, profiled):
    paths = _files(tmp_path)
    workers, got = _in_workers(1, paths, 16, "pad", "white", profiled)
    want = decoding.decode_files(paths, 16, "pad", "white", profiled)
    _same(got, want)
    assert got[-2][0] is None and got[-2][1].startswith("UnidentifiedImageError")
    assert got[-1][1].startswith("FileNotFoundError")
    assert got[-4][0].shape == (16, 16, 3) and (got[-4][0][8, 8] == 255).all()  # transparent -> white
    if profiled:
        assert got[-3][2]["format"] == "JPEG" and got[-4][2]["has_alpha"] == "true"
    assert workers._workers[0].process.returncode == 0  # closed: stdin ended, the loop returned


def test_a_worker_that_dies_is_replaced_and_its_files_tried_again(tmp_path, caplog):
    paths = _files(tmp_path)
    workers = decoding.DecoderProcesses(1)
    try:
        dead = workers._workers[0].process
        dead.kill()
        dead.wait()
        with caplog.at_level("WARNING", logger="imgflow.tasks.decoding"):
            got = workers.decode(paths, 12, "squash", "black", True)
        _same(got, decoding.decode_files(paths, 12, "squash", "black", True))
        assert f"decoding process {dead.pid} stopped" in caplog.text
        [fresh] = [w.process for w in workers._workers]
        assert fresh.pid != dead.pid and fresh.poll() is None
        _same(workers.decode(paths[:3], 12, "squash", "black", False),
              decoding.decode_files(paths[:3], 12, "squash", "black", False))
    finally:
        workers.close()
    assert fresh.returncode == 0


def test_a_file_that_kills_its_worker_gets_an_error_row_and_the_rest_are_decoded(tmp_path, monkeypatch):
    paths = _files(tmp_path)
    poison = str(tmp_path / "poison.jpg")
    Image.new("RGB", (8, 8)).save(poison)
    paths.insert(2, poison)
    real_decode = decoding._Worker.decode

    def dies_on_poison(worker, request):  # what a file that crashes libjpeg or Pillow does to its process
        if poison in request["paths"]:
            worker.process.kill()
            worker.process.wait()
        return real_decode(worker, request)

    monkeypatch.setattr(decoding._Worker, "decode", dies_on_poison)
    workers, got = _in_workers(2, paths, 12, "squash", "black", True)
    want = decoding.decode_files(paths, 12, "squash", "black", True)
    _same(got[:2] + got[3:], want[:2] + want[3:])
    pixels, error, props = got[2]
    assert pixels is None and error.startswith("the decoding process died on this file (decoding process")
    assert props == {"format": "unreadable", "mode": "unreadable"}
    assert len(workers._workers) == 2 and all(w.process.returncode is not None for w in workers._workers)


def test_workers_decode_under_this_processs_pillow_limits(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,200 pixels: over twice the limit, refused
    _, [(pixels, error)] = _in_workers(1, [big], 8, "squash", "black", False)
    assert pixels is None and error.startswith("DecompressionBombError")


def test_predict_files_gives_the_same_rows_with_and_without_worker_processes(tmp_path, monkeypatch):
    model_dir = make_digit_model_dir(tmp_path / "model")
    model, meta = P.load_model_cached(model_dir)
    root = tmp_path / "inbox"
    root.mkdir()
    entries = [P.FileEntry(str(Path(p).relative_to(root)), 1, 1) for p in _files(root)]
    profile_here = [{"count": 0, "properties": {}} for _ in entries]
    monkeypatch.setattr(decoding, "_started", None)  # another test may have started this process's workers
    here = P.predict_files(model, meta, root, entries, batch_size=4, profile=profile_here)
    workers = decoding.DecoderProcesses(2)
    monkeypatch.setattr(decoding, "_started", workers)
    try:
        profile_there = [{"count": 0, "properties": {}} for _ in entries]
        there = P.predict_files(model, meta, root, entries, batch_size=4, profile=profile_there)
    finally:
        workers.close()
    assert there == here and profile_there == profile_here
    assert [row[-1] == "" for row in here].count(True) == len(entries) - 2


def test_a_worker_never_imports_modules_from_the_working_folder(tmp_path, monkeypatch):
    hostile = tmp_path / "downloaded"
    hostile.mkdir()
    marker = tmp_path / "ran"
    for module in ("numpy.py", "PIL.py", "pickle.py"):
        (hostile / module).write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(9)\n")
    monkeypatch.chdir(hostile)
    _, [(pixels, error)] = _in_workers(1, [_files(tmp_path)[0]], 8, "squash", "black", False)
    assert error == "" and pixels.shape == (8, 8, 3) and not marker.exists()


@pytest.mark.parametrize("value,expected", [("0", 0), ("3", 3), (" 2 ", 2)])
def test_the_number_of_workers_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(decoding.PROCESSES_ENV, value)
    assert decoding.default_processes() == expected


def test_without_the_setting_one_worker_a_usable_cpu_and_none_on_one_cpu(monkeypatch, caplog):
    monkeypatch.setenv(decoding.PROCESSES_ENV, "many")
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the machine's; the process may use fewer
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    with caplog.at_level("WARNING", logger="imgflow.tasks.decoding"):
        assert decoding.default_processes() == 4
    assert "IMGFLOW_DECODE_PROCESSES='many' is not a number" in caplog.text
    monkeypatch.delenv(decoding.PROCESSES_ENV)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert decoding.default_processes() == 0


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return True


def test_workers_are_out_of_reach_of_ctrl_c_and_end_when_their_command_is_killed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = ("import sys, time\nfrom imgflow.tasks import decoding\nw = decoding.DecoderProcesses(1)\n"
              "w.decode([], 8, 'squash', None, False)\n"  # a round trip: the worker is in its loop
              "print(w._workers[0].process.pid, flush=True)\ntime.sleep(60)\n")
    command = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(command.stdout.readline())
        # Ctrl-C in a terminal signals the foreground process group: the command's, not the worker's
        assert os.getpgid(worker) != os.getpgid(command.pid)
        command.kill()  # SIGKILL: no atexit; the worker's stdin closes with its parent
        command.wait()
        deadline = time.monotonic() + 10
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker)
    finally:
        command.kill()
