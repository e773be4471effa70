"""Shared fixtures: one Prefect test server per session (per pytest-xdist worker), a private PREFECT_HOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before Prefect is imported anywhere: keep its database, caches and results out of ~/.prefect.
_PREFECT_HOME = tempfile.mkdtemp(prefix="imgflow-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# No kept-alive Prefect server outliving a test: every CLI child stops its server at exit.
# A test that exercises the keep-alive sets IMGFLOW_SERVER_IDLE_MINUTES in its child's env.
os.environ["IMGFLOW_SERVER_IDLE_MINUTES"] = "0"
# CLI children start their own temporary server: on a loaded 2-core machine booting one in
# a fresh PREFECT_HOME has taken over 20 s (Prefect's default limit), as the session's own
# harness is given 120 s below. No test here measures how fast a server starts.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from tests.imagefactory import make_class_folder, make_digit_folder  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (it costs ~10 s to start)."""
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.testing.utilities import prefect_test_harness

    if not PROCESS_LOGGING_CONFIG:
        # Prefect's console handlers keep the sys.stderr of the moment they are made: made
        # inside a CliRunner invocation (the first command of a session run alone), they
        # write to its closed stream when the harness logs its shutdown
        setup_logging()
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Real handwritten digits 0, 1, 7 as 32 px PNG class folders (60 a class). Read-only."""
    return make_digit_folder(tmp_path_factory.mktemp("digits") / "data", per_class=60)


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    """Three classes of 12 noisy 32 px PNGs, writable by the test."""
    return make_class_folder(tmp_path / "data", {"cats": 12, "dogs": 12, "birds": 12})
