"""The kept-alive Prefect server: ``python -m imgflow.flows.server_daemon --port N --idle-minutes M``.

:func:`imgflow.flows.server.start_early` starts this module detached (its own session,
output to ``$PREFECT_HOME/imgflow-server.log``) when ``IMGFLOW_SERVER_IDLE_MINUTES`` is
above 0. It serves the app Prefect's own temporary server serves
(``prefect.server.api.server.create_app`` in ephemeral mode, no UI, lifespan on: what
``SubprocessASGIServer._run_uvicorn_command`` launches with ``uvicorn --factory``) with
``uvicorn.Server``, records itself in ``$PREFECT_HOME/imgflow-server.json`` once it
listens, and stops by itself after M minutes in which it had no request in flight, got
no new one and no command registered in ``$PREFECT_HOME/imgflow-server-clients/`` was
alive. On the way out it removes the state file if that still names this process (a
server started later may have replaced the record: it stays).

``python -m imgflow.flows.server_daemon --stop`` stops the recorded server (SIGTERM,
after checking that the recorded pid is this module's process) and prints one line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from imgflow.flows import server as shared


class IdleClock:
    """ASGI middleware that records when the last HTTP or websocket connection started or ended."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.last = time.monotonic()
        self.active = 0  # connections in flight (a command's open events websocket counts)

    def touch(self) -> None:
        """Restart the idle clock now."""
        self.last = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last activity; 0 while a connection is in flight."""
        return 0.0 if self.active else time.monotonic() - self.last

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        self.active += 1  # one event loop: no lock needed
        self.touch()
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.touch()


def watch_idle(server: Any, clock: IdleClock, idle_s: float, alive: Callable[[], int]) -> None:
    """Set ``server.should_exit`` once ``clock`` has been idle ``idle_s`` seconds and ``alive()`` counts no client."""
    interval = min(1.0, max(0.05, idle_s / 20))
    while not server.should_exit:
        time.sleep(interval)
        if not server.started:
            continue
        if alive():
            clock.touch()
        elif clock.idle_s() >= idle_s:
            server.should_exit = True


def serve(port: int, idle_minutes: float, host: str = "127.0.0.1", lock_fd: int | None = None) -> int:
    """Run the Prefect API on ``host:port`` until idle for ``idle_minutes`` (or SIGTERM/SIGINT); return the exit code.

    ``lock_fd`` is the start lock inherited from the command that started this server
    (:func:`imgflow.flows.server.start_early`): closed once the server listens and its
    record is written, so that a command waiting for it finds it. Returns 3 (uvicorn's
    start-up failure code, as ``uvicorn`` itself exits) when the server never started,
    e.g. when the port was taken in the meantime.
    """
    for name, value in shared._SERVER_ENV.items():  # before Prefect reads its settings
        os.environ[name] = value
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again once its own
    # handler is restored: make that an exit that runs the `finally` below (the record)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import prefect
    import uvicorn
    from prefect.server.api.server import create_app

    home = shared.prefect_home()
    path = shared.state_path(home)
    clock = IdleClock(create_app(ephemeral=True, final=True))
    api_url = f"http://{host}:{port}/api"
    record = {"pid": os.getpid(), "port": port, "api_url": api_url, "prefect_version": prefect.__version__,
              "python": sys.executable, "key": shared.server_key(os.environ), "idle_minutes": idle_minutes,
              "log": str(home / shared.LOG_NAME)}

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: now a command may find it
                clock.touch()
                shared.write_state(path, {**record, "started_at": datetime.now(timezone.utc).isoformat()})
                if lock_fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(lock_fd)

    server = Server(uvicorn.Config(clock, host=host, port=port, log_level="error", lifespan="on"))
    watchdog = threading.Thread(target=watch_idle, name="imgflow-idle-watchdog", daemon=True,
                                args=(server, clock, idle_minutes * 60, lambda: shared.live_clients(home, port)))
    watchdog.start()
    print(f"{datetime.now(timezone.utc).isoformat()} imgflow server pid {os.getpid()} starting on {api_url} "
          f"(stops after {idle_minutes:g} idle minutes)", flush=True)
    try:
        server.run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 3
    finally:
        server.should_exit = True  # ends the watchdog
        recorded = shared.read_state(path)
        if recorded and recorded.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        print(f"{datetime.now(timezone.utc).isoformat()} imgflow server pid {os.getpid()} on {api_url} stopped",
              flush=True)
    return 0 if server.started else 3


def _is_this_module(pid: int, api_url: str) -> bool:
    """Whether ``pid`` is a server started from this module (never signal a recycled pid)."""
    if Path("/proc/self/cmdline").exists():
        try:
            return b"imgflow.flows.server_daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    return shared.answers(api_url, 1.0)  # no /proc (macOS): trust a server that answers at the record's URL


def stop_recorded(home: Path | None = None, timeout_s: float = 15.0) -> tuple[int, str]:
    """Stop the kept-alive server recorded under ``home``; return (exit code, the line to print).

    A record whose process is gone (or is not this module) is removed as stale.
    """
    path = shared.state_path(home)
    record = shared.read_state(path)
    if record is None:
        return 0, f"No imgflow Prefect server is recorded in {path}: nothing to stop."
    pid, url = record["pid"], record["api_url"]
    if not shared.pid_alive(pid) or not _is_this_module(pid, url):
        path.unlink(missing_ok=True)
        return 0, f"The imgflow Prefect server recorded in {path} (pid {pid}) was not running; removed the record."
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return 0, f"The imgflow Prefect server recorded in {path} (pid {pid}) had already stopped."
    except PermissionError:
        return 1, f"Cannot stop pid {pid} recorded in {path}: it belongs to another user."
    deadline = time.monotonic() + timeout_s
    while shared.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if shared.pid_alive(pid):
        return 1, (f"Sent SIGTERM to the imgflow Prefect server on {url} (pid {pid}); it is still running "
                   f"after {timeout_s:g} s.")
    return 0, f"Stopped the imgflow Prefect server on {url} (pid {pid})."


def main(argv: list[str] | None = None) -> int:
    """Command line: serve (``--port``, ``--idle-minutes``) or ``--stop``; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m imgflow.flows.server_daemon",
                                     description="Run the kept-alive imgflow Prefect server, or stop it (--stop).")
    parser.add_argument("--port", type=int, help="port to listen on (127.0.0.1)")
    parser.add_argument("--idle-minutes", type=float, default=None,
                        help=f"stop after this many minutes without requests (default: {shared.IDLE_ENV} or "
                             f"{shared.DEFAULT_IDLE_MINUTES:g})")
    parser.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # see serve()
    parser.add_argument("--stop", action="store_true",
                        help="stop the server recorded in $PREFECT_HOME/imgflow-server.json")
    args = parser.parse_args(argv)
    if args.stop:
        code, line = stop_recorded()
        print(line)
        return code
    if args.port is None:
        parser.error("--port is required (or --stop)")
    idle = shared.idle_minutes() if args.idle_minutes is None else args.idle_minutes
    if not idle > 0:
        parser.error(f"--idle-minutes {idle:g}: expected a number of minutes > 0 (the server would stop at once)")
    return serve(args.port, idle, lock_fd=args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
