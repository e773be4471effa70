"""Import TensorFlow and Keras without the optional packages they pull in for integrations imgflow never uses.

Where they are installed (a development environment, the ``dev`` extras), importing
TensorFlow imports JAX (for TensorFlow Lite's JAX converter) and SciPy's sparse matrices
(for the legacy ``tf.compat.v1`` Keras), and importing Keras imports
scikit-learn with SciPy's statistics (for ``keras.wrappers``' scikit-learn estimators),
pandas (DataFrames as ``fit`` input) and ``matplotlib.pyplot`` (``keras.visualization``).
On the 2-core development machine that is about 2.4 s of the ~5.7 s that
``import tensorflow, keras`` takes, paid by every command before its first flow.

:func:`import_frameworks` imports the two with those packages made unimportable for the
moment (``sys.modules[name] = None``, which TensorFlow's and Keras' optional imports
treat as "not installed") and then importable again: the code that needs them (a
plot, the demo's digits) imports them when it runs. The only lasting effect is inside
Keras and TensorFlow: in that process ``keras.wrappers``' scikit-learn estimators,
DataFrames passed to ``fit``, ``keras.visualization``, TensorFlow Lite's JAX converter
and SciPy sparse input to ``tf.compat.v1`` Keras are off, as if those packages were
missing (TensorFlow's import loads Keras too, so Keras comes in with JAX and SciPy
blocked as well; it binds them lazily and imports them when used). So only imgflow's
own command processes call it (:mod:`imgflow.flows.cli`); flows called from a user's
program import the frameworks as ever. On another Keras backend (``KERAS_BACKEND=jax``)
JAX and SciPy are not blocked.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator, Sequence

#: what TensorFlow imports, and Keras imports, only for integrations imgflow's commands do not use
TENSORFLOW_EXTRAS = ("jax", "scipy")
KERAS_EXTRAS = ("sklearn", "pandas", "matplotlib")


@contextlib.contextmanager
def unimportable(names: Sequence[str]) -> Iterator[list[str]]:
    """Make the packages ``names`` that are not imported yet fail to import (ImportError) inside the block.

    Yields:
        The names blocked; each is importable again after the block, unless something imported it meanwhile.
    """
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield blocked
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def keras_backend() -> str:
    """The backend Keras will load, read as Keras reads it (``KERAS_BACKEND``, else ``keras.json``), without importing it.

    Anything unreadable gives ``""`` (unknown).
    """
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    path = os.path.join(os.path.expanduser(home), "keras.json")
    if not os.path.exists(path):
        return "tensorflow"
    try:
        with open(path, encoding="utf-8") as handle:
            return str(json.load(handle).get("backend") or "tensorflow")
    except (OSError, ValueError, AttributeError):
        return ""


def import_frameworks() -> None:
    """Import TensorFlow (through :func:`imgflow.tasks.quiet.import_tensorflow`) and Keras, lean.

    TensorFlow's own import loads Keras too (``keras.src.optimizers``, eagerly), so JAX and
    SciPy are blocked only when Keras' backend is TensorFlow: the JAX backend imports both,
    and TensorFlow would swallow the failure and leave a half-imported Keras behind. On the
    TensorFlow backend Keras binds them lazily (``LazyModule``) and imports them on use.
    """
    if "tensorflow" in sys.modules and "keras" in sys.modules:  # a second call (start, then preload): nothing to do
        return
    from imgflow.tasks.quiet import import_tensorflow

    framework_extras = TENSORFLOW_EXTRAS if keras_backend() == "tensorflow" else ()
    with unimportable(KERAS_EXTRAS):
        with unimportable(framework_extras):
            import_tensorflow()
            importlib.import_module("tensorflow")  # import_tensorflow does not, with IMGFLOW_VERBOSE set
        if "keras" not in sys.modules:  # TensorFlow's eager Keras import failed: start Keras afresh
            for name in [name for name in sys.modules if name.startswith("keras.")]:
                del sys.modules[name]
        importlib.import_module("keras")
