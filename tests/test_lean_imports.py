"""TensorFlow and Keras come in without the optional packages imgflow's commands never use; those stay importable."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from imgflow.tasks.lean_imports import KERAS_EXTRAS, TENSORFLOW_EXTRAS, unimportable


def test_a_blocked_package_fails_to_import_inside_the_block_and_imports_after_it(tmp_path, monkeypatch):
    (tmp_path / "lean_probe_package.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with unimportable(["lean_probe_package", "os"]) as blocked:
        assert blocked == ["lean_probe_package"]  # one already imported (os) is left alone
        with pytest.raises(ImportError):
            importlib.import_module("lean_probe_package")
        importlib.import_module("os")
    lean_probe_package = importlib.import_module("lean_probe_package")

    assert lean_probe_package.VALUE == 7
    monkeypatch.delitem(sys.modules, "lean_probe_package")


def test_the_frameworks_import_without_the_extras_which_import_afterwards(tmp_path):
    # a fresh process: the test session has imported scikit-learn, pandas and matplotlib already
    code = "\n".join([
        "import sys",
        "from imgflow.tasks.lean_imports import import_frameworks",
        "import_frameworks()",
        f"print(sorted(m for m in {[*TENSORFLOW_EXTRAS, *KERAS_EXTRAS]!r} if m in sys.modules))",
        "import keras, numpy as np",
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation='softmax')])",
        "print(model.predict(np.ones((3, 4), 'float32'), verbose=0).shape)",
        "import sklearn.metrics, pandas, matplotlib.figure",
        "print(sklearn.metrics.accuracy_score([0, 1], [0, 1]), len(pandas.DataFrame({'a': [1, 2]})))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "IMGFLOW_VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["[]", "(3, 2)", "1.0 2"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_on_the_jax_backend_jax_is_not_blocked_and_keras_trains(tmp_path):
    # TensorFlow's import loads Keras: a JAX backend that cannot import JAX would be left half-imported
    code = "\n".join([
        "from imgflow.tasks.lean_imports import import_frameworks",
        "import_frameworks()",
        "import keras, numpy as np",
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation='softmax')])",
        "model.compile('sgd', 'sparse_categorical_crossentropy')",
        "history = model.fit(np.ones((8, 4), 'float32'), np.zeros(8, 'int32'), epochs=1, verbose=0)",
        "print(keras.backend.backend(), len(history.history['loss']))",
    ])
    env = {**{k: v for k, v in os.environ.items() if k != "IMGFLOW_VERBOSE"}, "KERAS_BACKEND": "jax",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "jax 1"


def test_the_keras_backend_is_read_as_keras_reads_it(tmp_path, monkeypatch):
    from imgflow.tasks.lean_imports import keras_backend

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert keras_backend() == "tensorflow"  # no keras.json yet: Keras' default
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert keras_backend() == "jax"
    (tmp_path / "keras.json").write_text("{not json")
    assert keras_backend() == ""  # unknown: nothing is blocked
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert keras_backend() == "tensorflow"
