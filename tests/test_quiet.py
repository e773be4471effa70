"""TensorFlow start-up noise is filtered from stderr; real lines are kept."""

import os
import subprocess
import sys

from imgflow.tasks.quiet import filter_noise

CAPTURED = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795932851.836054   19516 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
I0000 00:00:1795932851.853681   19516 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1795932885.860812   19516 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
W0000 00:00:1795932885.9 19516 some_op.cc:12] Out of memory while allocating 4.0GiB
"""


def test_filter_noise_keeps_only_real_lines():
    assert filter_noise(CAPTURED) == "W0000 00:00:1795932885.9 19516 some_op.cc:12] Out of memory while allocating 4.0GiB\n"
    assert filter_noise("") == ""


def test_import_tensorflow_prints_no_start_up_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "IMGFLOW_VERBOSE")}
    code = ("from imgflow.tasks.quiet import import_tensorflow; import_tensorflow(); "
            "import sys, tensorflow as tf; print(int(tf.constant(2) * 3)); print('real warning', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "6"
    assert proc.stderr.strip() == "real warning"
