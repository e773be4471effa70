"""Keep TensorFlow's native start-up chatter out of the user's terminal, keep real warnings.

TensorFlow's C++ runtime writes its start-up lines (``absl::InitializeLog``, oneDNN,
"Could not find cuda drivers", ``failed call to cuInit``, CPU-feature hints) straight
to file descriptor 2 before any Python logging is configured, so neither
``TF_CPP_MIN_LOG_LEVEL`` nor a logging filter removes them. :func:`import_tensorflow`
imports TensorFlow and initialises its devices once with descriptor 2 pointed at a
temporary file, then writes back every captured line that is not known start-up
noise: a real warning or error still reaches the terminal.

Call it before the first ``import tensorflow``/``import keras`` of a process (the CLI
and each flow do); it does nothing when TensorFlow is already imported or when
``IMGFLOW_VERBOSE`` is set.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# Lines TensorFlow/absl/XLA print on every start-up; anything else is replayed.
START_UP_NOISE = re.compile(
    r"absl::InitializeLog"
    r"|oneDNN custom operations are on"
    r"|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|cuda_diagnostics\.cc"
    r"|Could not find cuda drivers|failed call to cuInit|kernel driver does not appear to be running"
    r"|cpu_feature_guard\.cc|This TensorFlow binary is optimized|To enable the following instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning"
)

VERBOSE_ENV = "IMGFLOW_VERBOSE"


def is_noise(line: str) -> bool:
    """True for a TensorFlow start-up line that says nothing the user can act on."""
    return bool(START_UP_NOISE.search(line))


def filter_noise(text: str) -> str:
    """``text`` without its start-up noise lines (other lines kept, in order)."""
    kept = [line for line in text.splitlines(keepends=True) if line.strip() and not is_noise(line)]
    return "".join(kept)


def import_tensorflow() -> None:
    """Import TensorFlow and list its devices with start-up noise filtered from stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get(VERBOSE_ENV):
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a detached daemon): nothing to keep clean
        import tensorflow  # noqa: F401

        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe prints on first use
        finally:  # restore and replay even when the import fails: its reason is real
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            remainder = filter_noise(sink.read().decode("utf-8", errors="replace"))
            if remainder:
                sys.stderr.write(remainder)
                sys.stderr.flush()
