"""The Prefect API a command talks to: a running server, or a temporary one started early.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary ("ephemeral") server the first
time a flow needs its client (``prefect.client.orchestration.get_client`` →
``prefect.server.api.server.SubprocessASGIServer.start``): a ``uvicorn`` subprocess that
imports the whole Prefect server, opens the database and answers ``/api/health``. Paid
after imgflow's own imports, that start-up is seconds on the critical path of every command.

:func:`start_early` launches the same subprocess (same command line, same environment
variables as ``SubprocessASGIServer._run_uvicorn_command``) before the CLI imports
TensorFlow, Keras or Prefect, so the server boots on another core while they load and
while the first local work runs. :func:`adopt` then hands it to Prefect as the
process's ``SubprocessASGIServer`` instance (the ``None`` key, the one ``get_client``
uses), after waiting for its health check, so Prefect never starts a second one.

With ``PREFECT_API_URL`` set (in the environment or the active Prefect profile), nothing
is started: the running server is used, as Prefect does.

At exit the temporary server is sent SIGTERM and not waited for: by then the flow run's
states, logs and events have been sent (Prefect's log and event workers drain first, see
:func:`adopt`), and the server finishes its own shutdown after the command has returned.
Only the standard library is imported at module import time.
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


def start_early() -> int | None:
    """Start the temporary Prefect server in the background now; return its port (None: not started).

    Does nothing when an API is configured (``PREFECT_API_URL``), when ephemeral mode is
    switched off (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false``), or when one was
    already started by this process. Never raises: on any failure Prefect starts its
    own server later, as it would without imgflow.
    """
    if _started or configured_api_url():
        return None
    if os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in {"0", "false", "no"}:
        return None
    port = _free_port()
    if port is None:
        return None
    from importlib.util import find_spec

    spec = find_spec("prefect")  # finds the package folder without importing Prefect
    if spec is None or spec.origin is None:
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
    _started.update(port=port, process=process)
    atexit.register(_stop)
    return port


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


def register() -> bool:
    """Make the early server Prefect's temporary server for this process; True when it did.

    Imports ``prefect.server.api.server`` and installs, under the ``None`` key that
    ``get_client`` looks up, a ``SubprocessASGIServer`` whose ``start`` waits for the
    early server's health check instead of launching another process (when the early
    server died or did not answer within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
    it starts one the usual way). Call it after :func:`start_early`, before the first flow
    runs; it returns at once (the waiting happens when Prefect first needs the API).
    """
    if not _started or _started.get("registered"):
        return bool(_started.get("registered"))
    from prefect.server.api.server import SubprocessASGIServer

    class EarlyServer(SubprocessASGIServer):
        """The server :func:`start_early` launched, started for real only if it failed."""

        def start(self, timeout: int | None = None) -> None:
            if self.running:
                return
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            limit = float(timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
            if _started.get("process") is not None and _healthy(self.api_url, limit):
                self.running = True
                return
            _stop()
            self.port, self.server_process = None, None
            super().start(timeout)

        def stop(self) -> None:
            _stop()
            self.server_process, self.running = None, False
            if SubprocessASGIServer._instances.get(None) is self:
                del SubprocessASGIServer._instances[None]

    if None in SubprocessASGIServer._instances:  # a server is already set up (a test harness): use it
        _stop()
        return False
    server = EarlyServer(None)
    server.port, server.server_process = _started["port"], _started["process"]
    _started["registered"] = True
    return True
