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

Keep-alive (like Gradle's daemon): unless ``IMGFLOW_SERVER_IDLE_MINUTES`` is ``0``, the
server is started detached (``python -m imgflow.flows.server_daemon``), records itself
in ``$PREFECT_HOME/imgflow-server.json`` once it listens, outlives the command and stops
by itself after that many minutes (default 10) without a request and without a live
command using it. The next command finds it there (pid alive, same Prefect, Python and
server settings, ``/api/health`` answering within half a second), points
``PREFECT_API_URL`` at it and starts nothing. A command that uses a kept-alive server
registers its pid in ``$PREFECT_HOME/imgflow-server-clients/`` so that a long, quiet
command (a training run that logs nothing for minutes) never loses its server. Starting
one is serialised by ``$PREFECT_HOME/imgflow-server.lock``, which the new server holds
until it listens: a command started meanwhile waits, then uses that server.

With ``IMGFLOW_SERVER_IDLE_MINUTES=0`` the server belongs to the command: at exit it is
sent SIGTERM and not waited for: the flow run's states
were written synchronously, and Prefect's log and event workers drain in
``threading``'s exit hook, which runs before ``atexit`` handlers; the server finishes
its own shutdown after the command has returned. Only the standard library is
imported at module import time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgflow.tasks import child

_PORTS = range(8000, 9000)  # the range SubprocessASGIServer picks from
_started: dict[str, Any] = {}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy

IDLE_ENV = "IMGFLOW_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 10.0
STATE_NAME = "imgflow-server.json"
CLIENTS_NAME = "imgflow-server-clients"
LOG_NAME = "imgflow-server.log"
LOCK_NAME = "imgflow-server.lock"
_LOG_MAX_BYTES = 1 << 20
# the Prefect environment a server does not depend on: a command may differ in these
# and still use a kept-alive server (everything else PREFECT_* must match)
_CLIENT_ONLY = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_LOGGING_", "PREFECT__", "PREFECT_UI_ENABLED",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_ANALYTICS_ENABLED")
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def prefect_home() -> Path:
    """``PREFECT_HOME`` (default ``~/.prefect``) as an absolute path, without importing Prefect.

    Absolute: the servers run in it, and a relative home would point elsewhere from there.
    """
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser().absolute()


def state_path(home: Path | None = None) -> Path:
    """The file that records the kept-alive server: ``$PREFECT_HOME/imgflow-server.json``."""
    return (home or prefect_home()) / STATE_NAME


def idle_minutes() -> float:
    """``IMGFLOW_SERVER_IDLE_MINUTES`` as a number (fractions allowed); 0 turns the keep-alive off.

    An unreadable or negative value is reported on stderr and the default (10) is used:
    a setting about speed never stops a command.
    """
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_MINUTES
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        print(f"imgflow: {IDLE_ENV}={raw!r}: expected a number of minutes >= 0 (0 turns the kept-alive "
              f"Prefect server off); using {DEFAULT_IDLE_MINUTES:g}", file=sys.stderr)
        return DEFAULT_IDLE_MINUTES
    return value


def server_key(env: Mapping[str, str]) -> str:
    """A digest of the Prefect settings a server depends on (database, services...), from ``env``."""
    items = sorted((k, v) for k, v in env.items() if k.startswith("PREFECT_") and not k.startswith(_CLIENT_ONLY))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def prefect_version() -> str | None:
    """The installed Prefect's version, read from its metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefect")
    except PackageNotFoundError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def answers(api_url: str, timeout_s: float) -> bool:
    """Whether ``GET {api_url}/health`` answers 200 within ``timeout_s`` (one try)."""
    try:
        with _DIRECT.open(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def read_state(path: Path) -> dict[str, Any] | None:
    """The record in a state file, or None when it is missing or not a server record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in ("pid", "port")) \
            or not isinstance(record.get("api_url"), str):
        return None
    return record


def write_state(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a temporary name in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(record), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def usable_record(record: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a recorded server may serve this command: same Prefect, Python and server settings, pid alive.

    Does not ask the server: :func:`find_kept_alive` does that last, as it costs a request.
    """
    if not record:
        return False
    return (record.get("prefect_version") == prefect_version() and record.get("python") == sys.executable
            and record.get("key") == server_key(os.environ if env is None else env)
            and isinstance(record.get("pid"), int) and pid_alive(record["pid"]))


def find_kept_alive(home: Path | None = None, timeout_s: float = 0.5) -> dict[str, Any] | None:
    """The live kept-alive server recorded under ``home`` that answers its health check, or None.

    A command that finds one registers itself as a client before asking (the request
    also restarts the server's idle clock), so the server cannot idle out between the
    answer and the command's first flow.
    """
    home = home or prefect_home()
    record = read_state(state_path(home))
    if not usable_record(record):
        return None
    client = _register_client(home, int(record["port"]))
    if answers(record["api_url"], timeout_s):
        return {**record, "client": client}
    _unregister(client)
    return None


def _register_client(home: Path, port: int) -> Path | None:
    folder = home / CLIENTS_NAME
    path = folder / f"{port}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        return None
    return path


def _unregister(client: Path | None) -> None:
    if client is not None:
        with contextlib.suppress(OSError):
            client.unlink()


def live_clients(home: Path, port: int) -> int:
    """How many live commands use the kept-alive server on ``port``; removes the entries of dead ones."""
    count = 0
    with contextlib.suppress(OSError):
        for entry in (home / CLIENTS_NAME).iterdir():
            name_port, _, pid = entry.name.partition("-")
            if name_port != str(port) or not pid.isdigit():
                continue
            if pid_alive(int(pid)):
                count += 1
            else:
                _unregister(entry)
    return count


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active profile, or None (cheap: no Prefect import)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    if "prefect.settings" in sys.modules:  # already imported (a test harness, a notebook): ask Prefect
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    home = prefect_home()
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
    """Use the kept-alive Prefect server, or start a temporary one in the background now; return its API URL.

    Sets ``PREFECT_API_URL`` in this process's environment, so it must run before
    Prefect is imported (it does nothing when Prefect already is). Does nothing (returns
    None) when an API is configured, when ephemeral mode is off
    (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false``) or when it already ran. With
    ``IMGFLOW_SERVER_IDLE_MINUTES`` above 0 (the default) a live server recorded in
    ``$PREFECT_HOME/imgflow-server.json`` is reused, else one is started detached that
    outlives the command; with 0 the server stops when the command exits. Never raises:
    when it cannot start the server, Prefect starts its own later, as it would without imgflow.
    """
    if _started or "prefect" in sys.modules or configured_api_url():
        return None
    if os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in {"0", "false", "no"}:
        return None
    idle = idle_minutes()
    home = prefect_home()
    lock, waited = _start_lock(home) if idle > 0 else (None, False)
    try:
        if idle > 0:
            # a server that another command just started is busy with it: give it longer to answer
            found = find_kept_alive(home, timeout_s=5.0 if waited else 0.5)
            if found:
                _started.update(api_url=found["api_url"], port=found["port"], process=None, ready=True, keep=True,
                                reused=True, client=found["client"])
                os.environ["PREFECT_API_URL"] = found["api_url"]
                atexit.register(_stop)
                return found["api_url"]
        return _start(home, idle, lock)
    finally:
        if lock is not None:
            os.close(lock)  # a daemon we started holds its own copy of the lock until it listens


def _start(home: Path, idle: float, lock: int | None) -> str | None:
    """Start the server (detached when ``idle`` > 0) on a free port; set ``PREFECT_API_URL``; return it."""
    from importlib.util import find_spec

    spec = find_spec("prefect")  # finds the package folder without importing Prefect
    port = _free_port()
    if spec is None or spec.origin is None or port is None:
        return None
    try:
        if idle > 0:
            process = _launch_daemon(home, port, idle, lock)
        else:
            home.mkdir(parents=True, exist_ok=True)
            process = subprocess.Popen(
                # run in PREFECT_HOME, like the daemon, with -P: the server puts "." on sys.path
                # and the command's working folder may hold a stray uvicorn.py or numpy.py
                child.module_command("uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
                                     "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                                     "--port", str(port), "--log-level", "error", "--lifespan", "on"),
                env={**os.environ, **_SERVER_ENV, "PREFECT_HOME": str(home)}, cwd=home,
            )
    except OSError:
        return None
    url = f"http://127.0.0.1:{port}/api"
    _started.update(port=port, process=process, api_url=url, keep=idle > 0,
                    client=_register_client(home, port) if idle > 0 else None)
    os.environ["PREFECT_API_URL"] = url
    atexit.register(_stop)
    return url


def _startup_limit() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 20)


def _start_lock(home: Path) -> tuple[int | None, bool]:
    """Wait until no other command is starting a kept-alive server under ``home``.

    Returns the locked file descriptor (None: no lock) and whether it had to wait.

    A command that starts a server hands this lock to it, and the server holds it until
    it listens: a second command started meanwhile waits here, then finds and reuses
    that server instead of booting another one (two servers migrating a fresh database
    at once fail with ``duplicate column name``). Waits at most the server start-up limit,
    then goes on without the lock; no lock where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        return None, False
    try:
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None, False
    deadline = time.monotonic() + _startup_limit()
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, waited
        except OSError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None, True
            waited = True
            time.sleep(0.05)


def _launch_daemon(home: Path, port: int, idle: float, lock: int | None) -> subprocess.Popen:
    """Start ``python -m imgflow.flows.server_daemon`` in its own session, its output to the log under ``home``.

    The daemon inherits ``lock`` (the start lock) and releases it once it listens.
    """
    home.mkdir(parents=True, exist_ok=True)
    log = home / LOG_NAME
    with contextlib.suppress(OSError):
        if log.stat().st_size > _LOG_MAX_BYTES:
            os.replace(log, log.with_name(LOG_NAME + ".1"))
    # the daemon runs in PREFECT_HOME, not in the command's working directory
    env = child.environment(**_SERVER_ENV)
    with open(log, "ab") as out:
        return subprocess.Popen(
            child.module_command("imgflow.flows.server_daemon", "--port", str(port), "--idle-minutes", repr(idle),
                                 *(["--lock-fd", str(lock)] if lock is not None else [])),
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal and the command's exit leave it running
            pass_fds=() if lock is None else (lock,),
        )


def _stop(force: bool = False) -> None:
    """Let go of the server: a kept-alive one keeps running (unless ``force``), our own is sent SIGTERM.

    Never waits for it: nothing of ours is in flight.
    """
    _unregister(_started.get("client"))
    _started["client"] = None
    process = _started.get("process")
    if _started.get("keep") and not force:
        return
    if process is not None and process.poll() is None:
        process.terminate()


def _healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    process = _started["process"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if answers(url, 2.0):
            return True
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
    limit = timeout_s or _startup_limit()
    if not _healthy(_started["api_url"], limit):
        code = _started["process"].poll()
        _stop(force=True)
        state = f"exited with code {code}" if code is not None else f"did not answer within {limit:.0f} s"
        log = f" (its output is in {prefect_home() / LOG_NAME})" if _started.get("keep") else ""
        raise ServerStartError(
            f"the temporary Prefect server on {_started['api_url']} {state}{log}; start one with "
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
    the standard streams, stops the command's own temporary server without waiting (a
    kept-alive one keeps running), and exits.
    """
    import logging

    if "prefect" in sys.modules:
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):  # their "Still processing items" while draining is no news
                logging.getLogger(worker.__name__).setLevel(logging.ERROR)
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - never turn a finished command into a failure
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _stop()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))
