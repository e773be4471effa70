"""The Prefect API a command talks to: a running server, or a temporary one started early.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary ("ephemeral") server the first
time a flow needs its client (``prefect.client.orchestration.get_client`` ->
``prefect.server.api.server.SubprocessASGIServer.start``): a ``uvicorn`` subprocess that
imports the whole Prefect server, opens the database and answers ``/api/health``, while
the command's own process waits, after it has itself imported ``prefect.server`` (FastAPI,
SQLAlchemy, docket: seconds) only to launch it.

:func:`start_early` launches the same subprocess (the command line and environment of
``SubprocessASGIServer._run_uvicorn_command``) as the very first thing the CLI does,
before Prefect, TensorFlow or Keras are imported, and points ``PREFECT_API_URL`` at it.
The server boots on another core while the command imports its libraries; Prefect sees
a configured API, so it neither starts a second server nor imports ``prefect.server``.
:func:`wait_ready` waits for its health check before the first flow runs.

With ``PREFECT_API_URL`` already set (in the environment or the active Prefect profile),
nothing is started: that server is used, as Prefect does.

At exit the temporary server is sent SIGTERM and not waited for: the flow run's states
were written synchronously, and Prefect's log and event workers drain in
``threading``'s exit hook, which runs before ``atexit`` handlers; the server finishes
its own shutdown after the command has returned. Only the standard library is
imported at module import time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

_PORTS = range(8000, 9000)  # the range SubprocessASGIServer picks from
_started: dict[str, Any] = {}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active profile, or None (cheap: no Prefect import)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    if "prefect.settings" in sys.modules:  # already imported (a test harness, a notebook): ask Prefect
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        import tomllib

        data = tomllib.loads(profiles.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    value = (data.get("profiles") or {}).get(active, {}).get("PREFECT_API_URL")
    return str(value) if value else None


def _free_port() -> int | None:
    for _ in range(10):
        port = random.choice(_PORTS)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return None


def start_early() -> str | None:
    """Start the temporary Prefect server in the background now; return its API URL (None: not started).

    Sets ``PREFECT_API_URL`` in this process's environment, so it must run before
    Prefect is imported (it does nothing when Prefect already is). Does nothing when an
    API is configured, when ephemeral mode is off (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false``)
    or when it already ran. Never raises: when it cannot start the server, Prefect
    starts its own later, as it would without imgflow.
    """
    if _started or "prefect" in sys.modules or configured_api_url():
        return None
    if os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in {"0", "false", "no"}:
        return None
    from importlib.util import find_spec

    spec = find_spec("prefect")  # finds the package folder without importing Prefect
    port = _free_port()
    if spec is None or spec.origin is None or port is None:
        return None
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env,
        )
    except OSError:
        return None
    url = f"http://127.0.0.1:{port}/api"
    _started.update(port=port, process=process, api_url=url)
    os.environ["PREFECT_API_URL"] = url
    atexit.register(_stop)
    return url


def _stop() -> None:
    """Ask the temporary server to stop; do not wait for it (nothing of ours is in flight)."""
    process = _started.get("process")
    if process is not None and process.poll() is None:
        process.terminate()


def _healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    process = _started["process"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with _DIRECT.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class ServerStartError(RuntimeError):
    """The temporary Prefect server started by :func:`start_early` did not come up."""


def wait_ready(timeout_s: float | None = None) -> str | None:
    """Wait until the early server answers its health check; return its API URL (None: none started).

    Call it before the first flow runs. The limit is ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
    (default 20 s), as for Prefect's own temporary server.

    Raises:
        ServerStartError: the server exited or did not answer in time; the message says
            how to use a running server instead.
    """
    if not _started:
        return None
    if _started.get("ready"):
        return _started["api_url"]
    limit = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 20)
    if not _healthy(_started["api_url"], limit):
        code = _started["process"].poll()
        _stop()
        state = f"exited with code {code}" if code is not None else f"did not answer within {limit:.0f} s"
        raise ServerStartError(
            f"the temporary Prefect server on {_started['api_url']} {state}; start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        )
    _started["ready"] = True
    return _started["api_url"]


def exit_now(code: int | None) -> None:
    """End the process once Prefect's logs and events are sent, skipping the interpreter's teardown.

    Tearing down a process that imported TensorFlow, Keras and Prefect (module
    finalizers, thread joins, waiting for the temporary server) takes seconds and saves
    nothing: every output was already renamed into place. This drains Prefect's log and
    event workers the way ``prefect.testing.utilities.prefect_test_harness`` does, flushes
    the standard streams, stops the temporary server without waiting, and exits.
    """
    if "prefect" in sys.modules:
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - never turn a finished command into a failure
            pass
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _stop()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))
