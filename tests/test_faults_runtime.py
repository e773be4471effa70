"""Runtime faults: exit codes and one-line messages, the workdir lock, crash-safe backups, a full disk.

Each test names the guarantee it proves (README "Guarantees"). Subprocesses only where the
behaviour needs a real process: two lock holders, a SIGKILLed holder, a file size limit.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgflow.flows.cli import app
from imgflow.tasks.errors import CheckFailed, DiskFullError, ImgflowError, LockHeld, UsageError
from imgflow.tasks.locks import lock_path, read_holder, workdir_lock

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def _api_env(**extra: str) -> dict[str, str]:
    """A child process that talks to this session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    return _env(PREFECT_API_URL=str(PREFECT_API_URL.value()), **extra)


@pytest.fixture
def flow_logging(prefect_server):
    """Prefect's log handlers bind the streams of the first flow run in the process: make
    that pytest's, not a CliRunner's (closed after invoke), when these tests run alone."""
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    assert warm_up() == 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from imgflow.flows.cli import main; main()", *args]


def _last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


# ----------------------------------------------------------------------------- error hierarchy


def test_error_classes_sit_on_the_branch_of_their_exit_code():
    from imgflow.flows.config import ConfigError
    from imgflow.tasks.dataset import DatasetError, DatasetUnusable
    from imgflow.tasks.models import ModelConfigError
    from imgflow.tasks.registry import RegistryError
    from imgflow.tasks.tfrecords import ShardSourceError

    for usage in (ConfigError, DatasetError, ModelConfigError, RegistryError, ShardSourceError, LockHeld):
        assert issubclass(usage, UsageError) and usage.exit_code == 2, usage
    for failed in (DatasetUnusable, DiskFullError):
        assert issubclass(failed, CheckFailed) and failed.exit_code == 1, failed
    # callers that catch the builtin bases keep working
    assert issubclass(DatasetError, ValueError) and issubclass(DatasetUnusable, RuntimeError)
    assert issubclass(DiskFullError, OSError) and issubclass(RegistryError, ImgflowError)


def test_retries_skip_every_imgflow_error_but_retry_other_failures():
    from imgflow.flows.retrying import retry_unless
    from imgflow.flows.training import _retry_transient

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    should_retry = retry_unless(KeyError)
    assert should_retry(None, None, State(DiskFullError("disk full"))) is False
    assert should_retry(None, None, State(LockHeld("held"))) is False
    assert should_retry(None, None, State(KeyError("k"))) is False
    assert should_retry(None, None, State(RuntimeError("worker lost"))) is True
    assert should_retry(None, None, State(OSError(5, "Input/output error"))) is True
    assert _retry_transient(None, None, State(DiskFullError("disk full"))) is False
    assert _retry_transient(None, None, State(MemoryError())) is True


# ----------------------------------------------------------------------------- CLI: one line, no traceback


def test_predict_out_that_is_a_folder_exits_2_naming_it(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    result = CliRunner().invoke(app, ["predict", "champion", str(inbox), "--workdir", str(tmp_path / "w"),
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = _last_line(result.output)
    assert line.startswith(f"imgflow: --out {out} is a folder") and "predictions.csv" in line
    assert "Traceback" not in result.output
    assert not (tmp_path / "w").exists()  # nothing was written before the check


@pytest.mark.skipif(ROOT, reason="root writes through read-only permissions")
def test_predict_out_in_a_read_only_folder_exits_2(tmp_path):
    inbox, locked = tmp_path / "inbox", tmp_path / "locked"
    inbox.mkdir()
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = CliRunner().invoke(app, ["predict", "champion", str(inbox), "--out", str(locked / "p.csv"),
                                          "--workdir", str(tmp_path / "w")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert "is not writable" in _last_line(result.output) and str(locked) in _last_line(result.output)


@pytest.mark.parametrize("command", ["validate", "train", "predict"])
def test_workdir_that_is_a_file_exits_2_naming_it(tmp_path, command):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    workdir = tmp_path / "work.txt"
    workdir.write_text("not a folder")
    args = ["predict", "champion", str(data)] if command == "predict" else [command, str(data)]
    result = CliRunner().invoke(app, [*args, "--workdir", str(workdir)])
    assert result.exit_code == 2, result.output
    assert _last_line(result.output) == (
        f"imgflow: --workdir {workdir} is a file, not a folder: give a folder (it is created when missing)"
    )
    assert workdir.read_text() == "not a folder"


def test_os_errors_and_imgflow_errors_map_to_one_line_and_an_exit_code():
    from imgflow.flows.errormap import exit_code_for, message_for

    assert exit_code_for(DiskFullError("full")) == 1
    assert exit_code_for(OSError(28, "No space left on device", "/w/x")) == 1
    assert exit_code_for(IsADirectoryError(21, "Is a directory", "/w/out")) == 2
    assert exit_code_for(ValueError("bug")) is None  # a bug keeps its traceback
    assert message_for(IsADirectoryError(21, "Is a directory", "/w/out")).startswith("/w/out is a directory")
    assert "not writable" in message_for(PermissionError(13, "Permission denied", "/ro/p.csv"))
    assert message_for(OSError(30, "Read-only file system", "/mnt/p.csv")).endswith("choose a writable path")


def test_model_with_an_unknown_custom_class_is_refused_with_one_line(tmp_path, prefect_server):
    """Safe mode cannot rebuild a class it does not know: exit 2, the path, no traceback."""
    import keras

    @keras.saving.register_keras_serializable(package="hostile")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2

    model_dir = tmp_path / "hostile-model"
    model_dir.mkdir()
    model = keras.Sequential([keras.Input((32, 32, 3)), Doubler(), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    model.save(model_dir / "model.keras")
    (model_dir / "metadata.json").write_text(json.dumps({
        "run_id": "hostile", "class_names": ["a", "b"], "image_size": 32, "aspect": "squash", "metrics": {},
    }))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(inbox / "x.png")
    # a fresh process does not know hostile>Doubler, exactly like a user's machine
    proc = subprocess.run(_cli("predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w")),
                          env=_api_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    line = _last_line(output)
    assert line.startswith(f"imgflow: MODEL {model_dir / 'model.keras'} cannot be loaded safely"), line
    assert "Doubler" in line and "safe mode" in line
    assert "Traceback" not in output

    # --debug shows where it came from
    debug = subprocess.run(_cli("--debug", "predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w")),
                           env=_api_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and _last_line(debug.stdout + debug.stderr).startswith("imgflow: MODEL")


def test_bad_option_inside_a_flow_is_one_line_and_debug_env_shows_the_traceback(tmp_path, flow_logging):
    from tests.modelfactory import make_digit_model_dir

    model_dir = make_digit_model_dir(tmp_path / "model", per_class=10, epochs=8, conv=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = ["predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w"), "--top-k", "0"]
    quiet = CliRunner().invoke(app, args)
    assert quiet.exit_code == 2, quiet.output
    assert _last_line(quiet.output) == "imgflow: options: 'predict.top_k': input should be greater than or equal to 1, found 0"
    assert "Traceback" not in quiet.output
    loud = CliRunner().invoke(app, args, env={"IMGFLOW_DEBUG": "1"})
    assert loud.exit_code == 2 and "Traceback" in loud.output and "ConfigError" in loud.output
    # the same bad value reaching the flow from Python is an OptionError, one line too
    from imgflow.flows.prediction import batch_predict
    from imgflow.tasks.errors import OptionError

    with pytest.raises(OptionError, match="top_k"):
        batch_predict(model_dir, inbox, workdir=tmp_path / "w", top_k=0)


# ----------------------------------------------------------------------------- workdir lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from imgflow.tasks.locks import workdir_lock

    workdir, release = Path(sys.argv[1]), Path(sys.argv[2])
    with workdir_lock(workdir, "imgflow train data (holder)"):
        print("held", flush=True)
        while not release.exists():
            time.sleep(0.05)
    print("released", flush=True)
    """
)

_WAITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from imgflow.tasks.locks import workdir_lock

    with workdir_lock(Path(sys.argv[1]), "imgflow predict inbox (waiter)", log=lambda m: print(m, flush=True)) as rec:
        print("acquired", rec["pid"], flush=True)
    """
)


def _start_holder(tmp_path: Path, workdir: Path) -> tuple[subprocess.Popen, Path]:
    release = tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), str(release)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder, release


def test_second_writer_waits_saying_who_holds_the_lock(tmp_path):
    workdir = tmp_path / "work"
    holder, release = _start_holder(tmp_path, workdir)
    try:
        record = read_holder(workdir)
        assert record["pid"] == holder.pid and record["command"] == "imgflow train data (holder)"
        with pytest.raises(LockHeld) as caught:
            with workdir_lock(workdir, "imgflow train data", wait=False):
                pass
        message = str(caught.value)
        assert f"pid {holder.pid} (imgflow train data (holder))" in message and record["since"] in message
        assert "--no-wait" in message

        waiter = subprocess.Popen([sys.executable, "-c", _WAITER, str(workdir)], env=_env(),
                                  stdout=subprocess.PIPE, text=True)
        first = waiter.stdout.readline().strip()
        assert first.startswith(f"waiting for the lock on {workdir}: held by pid {holder.pid}"), first
        assert waiter.poll() is None  # still waiting
        release.touch()
        out, _ = waiter.communicate(timeout=60)
        assert out.strip() == f"acquired {waiter.pid}"
        assert waiter.returncode == 0
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert read_holder(workdir) is None  # released: the record is cleared
    assert lock_path(workdir).exists()  # the lock file itself stays (deleting it would race)


def test_lock_of_a_killed_holder_is_broken_automatically(tmp_path):
    workdir = tmp_path / "work"
    holder, release = _start_holder(tmp_path, workdir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert read_holder(workdir)["pid"] == holder.pid  # its record is left behind
    messages: list[str] = []
    with workdir_lock(workdir, "imgflow train data", wait=False, log=messages.append) as record:
        assert record["pid"] == os.getpid()
    assert len(messages) == 1 and f"broke a stale lock on {workdir} left by pid {holder.pid}" in messages[0]


def test_lock_is_reentrant_within_one_process(tmp_path):
    with workdir_lock(tmp_path / "w", "outer", wait=False) as outer:
        with workdir_lock(tmp_path / "w", "inner", wait=False):
            assert read_holder(tmp_path / "w") == outer
        assert read_holder(tmp_path / "w") == outer
    assert read_holder(tmp_path / "w") is None


def test_flows_take_the_lock_so_cli_no_wait_exits_2(tmp_path, flow_logging, digits_dir):
    """The lock is taken in the flow (deployments too); --no-wait makes the CLI exit 2 at once."""
    from imgflow.flows.training import training_pipeline

    workdir = tmp_path / "work"
    holder, release = _start_holder(tmp_path, workdir)
    try:
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            training_pipeline(data_dir=digits_dir, workdir=workdir, wait_for_lock=False)
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        result = CliRunner().invoke(app, ["predict", "champion", str(inbox), "--workdir", str(workdir), "--no-wait"])
        assert result.exit_code == 2, result.output
        line = _last_line(result.output)
        assert line.startswith(f"imgflow: --workdir {workdir} is in use by another imgflow writer: pid {holder.pid}")
        train = CliRunner().invoke(app, ["train", str(digits_dir), "--workdir", str(workdir), "--no-wait"])
        assert train.exit_code == 2 and "is in use by another imgflow writer" in _last_line(train.output)
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert not (workdir / "models").exists() and not (workdir / "validation.json").exists()


# ----------------------------------------------------------------------------- backups


_FIT_SCRIPT = """
import sys
from pathlib import Path
import keras, numpy as np, tensorflow as tf
from imgflow.flows.config import TrainOptions
from imgflow.tasks import training
from imgflow.tasks.models import build_model
from imgflow.tasks.resume import enable_determinism
{extra}
enable_determinism(7, on_gpu=False)
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (48, 32, 32, 3)).astype("uint8")
y = (x[:, :16].mean(axis=(1, 2, 3)) > x[:, 16:].mean(axis=(1, 2, 3))).astype("int32")
train = tf.data.Dataset.from_tensor_slices((x[:36], y[:36])).shuffle(64, seed=1).batch(12)
val = tf.data.Dataset.from_tensor_slices((x[36:], y[36:])).batch(12)
model = build_model("default", 32, 2, architecture={{"filters": [8, 16]}}, augment=False)
result = training.fit_model(model, train, val, Path({run_dir!r}), TrainOptions(epochs={epochs},
                            early_stopping_patience=10, augment=False), [18, 18], log=print)
print("RESULT", result["epochs_run"], result["initial_epoch"])
"""


def _tiny_fit_script(run_dir: Path, epochs: int, extra: str = "") -> str:
    """A child process that fits a tiny model on 48 random images into ``run_dir``."""
    return _FIT_SCRIPT.format(run_dir=str(run_dir), epochs=epochs, extra=extra)


def test_corrupt_newest_backup_is_skipped_and_the_older_one_resumed(tmp_path):
    from imgflow.tasks import training
    from imgflow.tasks.resume import select_backup

    run_dir = tmp_path / "run"
    crash = _tiny_fit_script(run_dir, 4, extra=textwrap.dedent(
        """
        class Crash(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == 3:
                    raise SystemExit(9)
        _fit = training.fit_model
        training.fit_model = lambda *a, **k: _fit(*a, extra_callbacks=[Crash()], **k)
        """))
    first = subprocess.run([sys.executable, "-c", crash], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 9, first.stderr[-3000:]
    record = json.loads((run_dir / "backup" / "training_metadata.json").read_text())
    assert record["epoch"] == 3 and record["previous"]["epoch"] == 2
    assert sorted(p.name for p in (run_dir / "backup").glob("epoch-*")) == ["epoch-0002.weights.h5",
                                                                            "epoch-0003.weights.h5"]
    assert not list((run_dir / "backup").glob(".tmp-*")) and not list((run_dir / "checkpoints").glob(".tmp-*"))
    # the best value the checkpoint had reached is in the record
    history = training.read_history(run_dir)
    from imgflow.tasks.options import TrainOptions

    monitor = TrainOptions().monitor  # the checkpoint keeps the best epoch by the default monitor
    best = (max if monitor.endswith("accuracy") else min)(r[monitor] for r in history)
    assert record["callbacks"]["AtomicModelCheckpoint"]["best"] == pytest.approx(best)

    newest = run_dir / "backup" / "epoch-0003.weights.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short
    warnings: list[str] = []
    assert select_backup(run_dir, warnings.append)["epoch"] == 2
    assert "backup of epoch 3" in warnings[0] and "corrupt" in warnings[0]

    second = subprocess.run([sys.executable, "-c", _tiny_fit_script(run_dir, 4)], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing at epoch 3" in second.stdout + second.stderr and "corrupt" in second.stdout
    assert "RESULT 4 2" in second.stdout
    assert [int(r["epoch"]) for r in training.read_history(run_dir)] == [0, 1, 2, 3]

    # both generations corrupt: start fresh with a warning, never crash
    run_dir2 = tmp_path / "run2"
    (run_dir2 / "backup").mkdir(parents=True)
    (run_dir2 / "backup" / "epoch-0001.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 10)
    (run_dir2 / "backup" / "training_metadata.json").write_text(json.dumps(
        {"epoch": 1, "weights": "epoch-0001.weights.h5", "sha256": "0" * 64, "previous": None}))
    (run_dir2 / "history.csv").write_text("epoch,loss\n0,1.0\n")
    fresh = subprocess.run([sys.executable, "-c", _tiny_fit_script(run_dir2, 2)], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "no usable backup" in fresh.stdout and "RESULT 2 0" in fresh.stdout


def test_restored_best_value_keeps_a_worse_epoch_off_the_best_checkpoint(tmp_path):
    import keras

    from imgflow.tasks.resume import AtomicBackupAndRestore, AtomicModelCheckpoint

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    best_path = tmp_path / "checkpoints" / "best.weights.h5"
    checkpoint = AtomicModelCheckpoint(str(best_path), monitor="val_loss", save_best_only=True,
                                       save_weights_only=True)
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    backup = AtomicBackupAndRestore(tmp_path / "backup", None, [checkpoint, early], best_path)
    for callback in (checkpoint, early, backup):
        callback.set_model(model)
        callback.on_train_begin()
    for epoch, val_loss in enumerate([0.9, 0.5]):
        for callback in (checkpoint, early, backup):
            callback.on_epoch_end(epoch, {"val_loss": val_loss, "loss": 1.0})
    saved = best_path.read_bytes()
    record = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert record["epoch"] == 2 and record["callbacks"]["AtomicModelCheckpoint"]["best"] == 0.5
    assert record["callbacks"]["EarlyStopping"] == {"best": 0.5, "wait": 0, "best_epoch": 1, "stopped_epoch": 0}

    # a new process: fresh callbacks, restored from the record
    checkpoint2 = AtomicModelCheckpoint(str(best_path), monitor="val_loss", save_best_only=True,
                                        save_weights_only=True)
    early2 = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    backup2 = AtomicBackupAndRestore(tmp_path / "backup", record, [checkpoint2, early2], best_path)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)  # training moved on: worse weights
    for callback in (checkpoint2, early2, backup2):
        callback.set_model(model)
        callback.on_train_begin()
    assert checkpoint2.best == 0.5 and early2.best == 0.5 and early2.best_epoch == 1
    assert early2.best_weights is not None  # early stopping can still restore the true best
    checkpoint2.on_epoch_end(2, {"val_loss": 0.7})  # a worse epoch after the resume
    assert best_path.read_bytes() == saved
    checkpoint2.on_epoch_end(3, {"val_loss": 0.4})
    assert best_path.read_bytes() != saved and checkpoint2.best == 0.4
    assert not list(best_path.parent.glob(".tmp-*"))


def test_disk_full_during_training_is_one_line_exit_1_and_resumable(tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG (SIGXFSZ ignored)."""
    import resource

    run_dir = tmp_path / "run"
    script = _tiny_fit_script(run_dir, 3)
    wrapped = textwrap.dedent(
        """
        import sys
        from imgflow.tasks.errors import DiskFullError
        try:
            exec(compile(open(sys.argv[1]).read(), "fit", "exec"))
        except DiskFullError as exc:
            print("imgflow:", exc, file=sys.stderr)
            sys.exit(exc.exit_code)
        """
    )
    (tmp_path / "fit.py").write_text(script)
    limit = 64 * 1024  # the backup of this model (weights + Adam state) is larger

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", wrapped, str(tmp_path / "fit.py")], env=_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    line = _last_line(proc.stderr)
    assert line.startswith(f"imgflow: the disk is full writing {run_dir}"), line
    assert re.search(r"it needs about [\d.]+ [KMG]iB free", line), line
    assert "Segmentation" not in proc.stderr and "Traceback" not in proc.stderr
    # no half file is left under a real name; the next run (disk freed) starts or resumes cleanly
    assert not list(run_dir.rglob(".tmp-*"))
    again = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "RESULT 3" in again.stdout


def _limited(limit: int):
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_while_training_through_the_cli_keeps_the_champion(tmp_path, prefect_server, digits_dir):
    """`imgflow train` on a full disk: exit 1, one line with the path and the space needed, champion untouched."""
    from tests.modelfactory import make_champion, make_digit_model_dir

    workdir = tmp_path / "work"
    champion_dir = make_digit_model_dir(workdir / "models" / "old-champion", per_class=10, epochs=8, conv=False)
    make_champion(workdir, champion_dir)
    pointer = (workdir / "champion.json").read_bytes()
    # shards of 180 tiny JPEGs fit under 1 MiB; the default model's 3.4 MiB checkpoint does not
    proc = subprocess.run(_cli("train", str(digits_dir), "--workdir", str(workdir), "--epochs", "2",
                               "--image-size", "32"), env=_api_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, preexec_fn=_limited(1 << 20))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    line = _last_line(output)
    assert line.startswith("imgflow: the disk is full writing ") and str(workdir / "models") in line, output[-8000:]
    assert "it needs about" in line and "MiB free" in line and "available" in line
    assert "Traceback" not in output and "Segmentation" not in output
    assert output.count("the disk is full writing") <= 4  # logged by Prefect and printed once; never retried
    assert (workdir / "champion.json").read_bytes() == pointer
    assert not [p for p in workdir.rglob(".tmp-*")]


def test_disk_full_during_predict_is_one_line_and_no_half_csv(tmp_path, prefect_server):
    from PIL import Image

    from tests.modelfactory import make_digit_model_dir

    model_dir = make_digit_model_dir(tmp_path / "model", per_class=10, epochs=8, conv=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 6, 0, 0)).save(inbox / f"image-with-a-long-name-{i:03d}.png")
    out = tmp_path / "out" / "p.csv"
    proc = subprocess.run(_cli("predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w"),
                               "--out", str(out)), env=_api_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, preexec_fn=_limited(2048))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    line = _last_line(output)
    assert line.startswith("imgflow: the disk is full writing"), line
    assert "Traceback" not in output
    assert not out.exists()  # the CSV is written atomically: no half file


def test_yaml_python_tags_are_refused_and_never_run(tmp_path):
    """Config files are user input: only plain YAML (safe_load), a Python tag is a usage error."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = CliRunner().invoke(app, ["train", str(data), "--workdir", str(tmp_path / "w"), "--config", str(config)])
    assert result.exit_code == 2, result.output
    line = _last_line(result.output)
    assert line.startswith("imgflow: ") and str(config) in line
    assert not marker.exists() and "Traceback" not in result.output


# ----------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_two_whole_trainings_with_the_same_seed_give_the_same_weights(tmp_path, flow_logging, digits_dir):
    """The whole pipeline twice (validate, preprocess, train) into two workdirs, in one process:
    byte-identical shards (a record serialized in another process too), the same per-epoch history,
    bit-identical weights in ``model.keras`` (README "Guarantees", determinism on a CPU)."""
    import hashlib

    import keras
    import numpy as np

    from imgflow.flows.config import ImgflowConfig
    from imgflow.flows.training import training_pipeline
    from imgflow.tasks.atomic import read_json
    from imgflow.tasks.training import read_history

    config = ImgflowConfig.from_flat({"image_size": 32, "epochs": 2, "val_fraction": 0.2, "seed": 11})
    runs = [training_pipeline(digits_dir, workdir=tmp_path / name, config=config) for name in ("a", "b")]
    assert [r["skipped"] for r in runs] == [False, False]
    dirs = [Path(r["model_dir"]) for r in runs]
    assert dirs[0].name == dirs[1].name  # the run id depends on data and config only

    def shards(workdir: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in workdir.glob("tfrecords/*/*.tfrecord")}

    first_shards, second_shards = shards(tmp_path / "a"), shards(tmp_path / "b")
    assert len(first_shards) >= 2 and first_shards == second_shards
    # one process orders a protobuf map the same way every time; another process need not:
    # a record serialized in a child process has the same bytes as the one written here
    shard = next((tmp_path / "a").glob("tfrecords/*/train-00000-*.tfrecord"))
    script = textwrap.dedent(f"""
        import tensorflow as tf
        from imgflow.tasks.tfrecords import make_example
        raw = next(iter(tf.data.TFRecordDataset({str(shard)!r}))).numpy()
        feature = tf.train.Example.FromString(raw).features.feature
        text = lambda key: feature[key].bytes_list.value[0]
        number = lambda key: feature[key].int64_list.value[0]
        again = make_example(text("image/encoded"), text("image/format").decode(), number("image/height"),
                             number("image/width"), number("image/class/label"),
                             text("image/class/text").decode(), text("image/filename").decode())
        print(again == raw)
    """)
    child = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip().splitlines()[-1] == "True", child.stdout[-500:]

    histories = [read_history(d) for d in dirs]
    assert len(histories[0]) == 2
    for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [r[column] for r in histories[1]] == [r[column] for r in histories[0]], column
    models = [keras.saving.load_model(d / "model.keras", safe_mode=True) for d in dirs]
    first, second = (m.get_weights() for m in models)
    assert len(first) == len(second) > 0
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    assert read_json(dirs[0] / "train_summary.json")["deterministic"] is True
