"""The early temporary Prefect server and the commands' fixed cost (imgflow.flows.server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgflow.flows import server

REPO = Path(__file__).resolve().parents[1]

# run the command in a child and report, at exit, whether heavy libraries were imported
# (the TensorFlow commands leave through server.exit_now, which skips atexit)
PROBE = (
    "import atexit, sys\n"
    "report = lambda: print('IMPORTED', 'tensorflow' in sys.modules, 'keras' in sys.modules, "
    "'prefect' in sys.modules, 'prefect.server.api.server' in sys.modules)\n"
    "atexit.register(report)\n"
    "from imgflow.flows import server\n"
    "exit_now = server.exit_now\n"
    "server.exit_now = lambda code: (report(), exit_now(code))\n"
    "from imgflow.flows.cli import main\n"
    "sys.argv = ['imgflow'] + sys.argv[1:]\n"
    "main()\n"
)


def run_cli(home: Path, *args: str, cwd: Path = REPO, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # no empty PYTHONPATH entry: it would mean the working folder
    env.update(PREFECT_HOME=str(home), PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2", PREFECT_LOGGING_LEVEL="INFO",
               **extra_env)
    # -P: like the `imgflow` console script, the command does not import from its working folder
    return subprocess.run([sys.executable, "-P", "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_configured_api_url_reads_the_environment_then_the_active_profile(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "prefect.settings", raising=False)  # answer without asking Prefect
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert server.configured_api_url() is None  # no profiles file
    (tmp_path / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n[profiles.local]\n'
    )
    assert server.configured_api_url() == "http://10.0.0.5:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert server.configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert server.configured_api_url() == "http://127.0.0.1:4200/api"


def test_start_early_does_nothing_once_prefect_is_imported_or_an_api_is_set(monkeypatch):
    import prefect  # noqa: F401 - settings are already read: too late to point them anywhere

    assert server.start_early() is None
    assert server.wait_ready() is None  # nothing started, nothing to wait for


def test_command_flows_run_without_heartbeats_unless_the_frequency_is_configured(monkeypatch):
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings, get_current_settings, temporary_settings

    from imgflow.flows import cli

    # a fresh stack and settings as a new process reads them: in-process commands of earlier
    # tests may have switched heartbeats off for the session already
    monkeypatch.setattr(cli, "_PROCESS_SETTINGS", contextlib.ExitStack())
    with SettingsContext(profile=SettingsContext.get().profile, settings=Settings()):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}):  # the user's setting wins
            cli.skip_unconfigured_heartbeats()
            assert get_current_settings().flows.heartbeat_frequency == 45
        assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default, set by no one
        cli.skip_unconfigured_heartbeats()
        try:
            assert get_current_settings().flows.heartbeat_frequency is None  # no thread to join at each flow's end
        finally:
            cli._PROCESS_SETTINGS.close()
        assert get_current_settings().flows.heartbeat_frequency == 180


def test_validate_runs_on_the_early_server_then_reuses_the_report_without_prefect(shapes_dir, tmp_path):
    home, workdir = tmp_path / "prefect-home", tmp_path / "work"
    home.mkdir()
    cold = run_cli(home, "validate", str(shapes_dir), "--workdir", str(workdir))
    assert cold.returncode == 0, cold.stdout
    assert "Scanned 36 files: 36 usable" in cold.stdout
    assert "Starting temporary server" not in cold.stdout  # Prefect used ours, started no second one
    # the flow ran on that server: Prefect's run lines go to the workdir's log, not the terminal
    assert "Finished in state Completed()" in (workdir / "logs" / "imgflow.log").read_text()
    assert "IMPORTED False False True False" in cold.stdout  # no TensorFlow, no prefect.server here
    again = run_cli(home, "validate", str(shapes_dir), "--workdir", str(workdir))
    assert again.returncode == 0, again.stdout
    assert f"Reusing {workdir / 'validation.json'}: the files, options and code are unchanged" in again.stdout
    assert "Scanned 36 files: 36 usable" in again.stdout
    assert "IMPORTED False False False False" in again.stdout  # nothing to orchestrate: no Prefect at all


def test_preprocess_answers_an_unchanged_rerun_from_the_manifest_without_prefect(shapes_dir, tmp_path):
    home, workdir = tmp_path / "prefect-home", tmp_path / "work"
    home.mkdir()
    cold = run_cli(home, "preprocess", str(shapes_dir), "--workdir", str(workdir), "--image-size", "16")
    assert cold.returncode == 0, cold.stdout
    assert "IMPORTED True True True False" in cold.stdout  # the flow ran, on the early server
    # a child validated during the imports; the flow's validation step reused its report
    assert f"Validated {shapes_dir} while TensorFlow was imported" in (workdir / "logs" / "imgflow.log").read_text()
    manifest = next((workdir / "tfrecords").glob("*/manifest.json"))
    shards = sorted(p.name for p in manifest.parent.glob("*.tfrecord"))
    mtimes = {p: p.stat().st_mtime_ns for p in manifest.parent.iterdir()}
    again = run_cli(home, "preprocess", str(shapes_dir), "--workdir", str(workdir), "--image-size", "16")
    assert again.returncode == 0, again.stdout
    assert f"Reusing {manifest}: the files, options and code are unchanged" in again.stdout
    assert f"Reused cached {len(shards)} shards: 33 train, 3 val images." in again.stdout
    assert "IMPORTED False False False False" in again.stdout  # no TensorFlow, no Prefect
    assert {p: p.stat().st_mtime_ns for p in manifest.parent.iterdir()} == mtimes  # nothing rewritten
    other = run_cli(home, "preprocess", str(shapes_dir), "--workdir", str(workdir), "--image-size", "24")
    assert other.returncode == 0, other.stdout
    assert "Reusing" not in other.stdout.replace(f"Reusing {workdir / 'validation.json'}", "")
    assert "Wrote " in other.stdout and "IMPORTED True True True False" in other.stdout  # new option: new shards


# --- the kept-alive server (imgflow.flows.server_daemon) ---------------------------------

# what the CLI does around its flows: start_early() first, wait_ready() before the first flow, exit_now()
START = (
    "from imgflow.flows import server\n"
    "url = server.start_early()\n"
    "server.wait_ready()\n"
    "process = server._started.get('process')\n"
    "print('SERVER', url, bool(server._started.get('reused')), process.pid if process else None, flush=True)\n"
    "server.exit_now(0)\n"
)


def child_env(home: Path, idle: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), IMGFLOW_SERVER_IDLE_MINUTES=idle,
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def start_in_child(home: Path, idle: str) -> tuple[str, bool, int | None]:
    """Run START in a child process; return (API URL, reused, pid of the server it started)."""
    done = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=180,
                          env=child_env(home, idle), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("SERVER "))
    _, url, reused, pid = line.split()
    return url, reused == "True", None if pid == "None" else int(pid)


def servers_of(home: Path) -> list[int]:
    """Live server processes (the daemon or plain uvicorn) whose PREFECT_HOME is ``home``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ and {b"uvicorn", b"imgflow.flows.server_daemon"} & set(args) \
                and server.pid_alive(int(proc.name)):
            found.append(int(proc.name))
    return sorted(found)


def wait_until(condition, limit_s: float = 60.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture
def keepalive_home(tmp_path):
    """A private PREFECT_HOME; every server started with it is stopped afterwards."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    yield home
    pids = servers_of(home)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not servers_of(home), 20):
        for pid in servers_of(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_command(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgflow.flows.server_daemon", "--stop"], capture_output=True,
                          text=True, timeout=60, env=child_env(home, "10"), cwd=REPO)


def test_a_kept_alive_server_is_reused_by_the_next_command_and_stops_on_request(keepalive_home):
    home = keepalive_home
    url, reused, pid = start_in_child(home, "0.5")
    assert not reused and pid is not None
    record = json.loads((home / "imgflow-server.json").read_text())
    assert record["pid"] == pid and record["api_url"] == url == f"http://127.0.0.1:{record['port']}/api"
    assert record["idle_minutes"] == 0.5 and record["python"] == sys.executable
    assert servers_of(home) == [pid]  # it outlived the command that started it
    again_url, again_reused, again_pid = start_in_child(home, "0.5")
    assert (again_url, again_reused, again_pid) == (url, True, None)
    assert servers_of(home) == [pid]  # no second server
    assert list((home / "imgflow-server-clients").iterdir()) == []  # both commands let go at exit
    stopped = stop_command(home)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"Stopped the imgflow Prefect server on {url} (pid {pid})."
    assert servers_of(home) == []
    assert not (home / "imgflow-server.json").exists()  # the server removed its own record
    nothing = stop_command(home)
    record_path = home / "imgflow-server.json"
    assert nothing.stdout.strip() == f"No imgflow Prefect server is recorded in {record_path}: nothing to stop."


def test_an_idle_kept_alive_server_stops_by_itself_and_removes_its_record(keepalive_home):
    url, _, pid = start_in_child(keepalive_home, "0.05")  # 3 s
    assert wait_until(lambda: not server.pid_alive(pid), 90), "the server did not stop after 3 idle seconds"
    assert not (keepalive_home / "imgflow-server.json").exists()
    log = (keepalive_home / "imgflow-server.log").read_text()
    assert f"imgflow server pid {pid} starting on {url} (stops after 0.05 idle minutes)" in log
    assert f"imgflow server pid {pid} on {url} stopped" in log


def test_a_stale_record_is_ignored_and_replaced(keepalive_home):
    with contextlib.closing(socket.socket()) as sock:  # a port where nothing answers
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    stale = {"pid": os.getpid(), "port": dead_port, "api_url": f"http://127.0.0.1:{dead_port}/api",
             "prefect_version": server.prefect_version(), "python": sys.executable,
             "key": server.server_key(child_env(keepalive_home, "0.5"))}
    (keepalive_home / "imgflow-server.json").write_text(json.dumps(stale))
    url, reused, pid = start_in_child(keepalive_home, "0.5")
    assert not reused and url != stale["api_url"]  # the live pid did not make it usable: nothing answered
    record = json.loads((keepalive_home / "imgflow-server.json").read_text())
    assert (record["pid"], record["api_url"]) == (pid, url)
    assert servers_of(keepalive_home) == [pid]


def test_two_commands_starting_at_once_share_one_server(keepalive_home):
    # without the start lock the second server's database migration fails on a fresh PREFECT_HOME
    children = [subprocess.Popen([sys.executable, "-c", START], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=child_env(keepalive_home, "0.5"), cwd=REPO) for _ in range(2)]
    results = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, out + err
        results.append(next(line for line in out.splitlines() if line.startswith("SERVER ")).split())
    record = json.loads((keepalive_home / "imgflow-server.json").read_text())
    log = (keepalive_home / "imgflow-server.log").read_text()
    assert {result[1] for result in results} == {record["api_url"]}, log  # one waited for the other's server
    assert sorted(result[2] for result in results) == ["False", "True"]  # one started it, one reused it
    assert servers_of(keepalive_home) == [record["pid"]]


def test_idle_zero_keeps_a_server_per_command_and_leaves_nothing_behind(keepalive_home):
    url, reused, pid = start_in_child(keepalive_home, "0")
    assert not reused and pid is not None
    assert wait_until(lambda: not server.pid_alive(pid), 30), "the per-command server outlived its command"
    assert servers_of(keepalive_home) == []
    assert not (keepalive_home / "imgflow-server.json").exists()
    assert not (keepalive_home / "imgflow-server-clients").exists()


def test_validate_commands_share_one_kept_alive_server(shapes_dir, keepalive_home, tmp_path):
    first = run_cli(keepalive_home, "validate", str(shapes_dir), "--workdir", str(tmp_path / "w1"),
                    IMGFLOW_SERVER_IDLE_MINUTES="0.5")
    assert first.returncode == 0, first.stdout
    pid = json.loads((keepalive_home / "imgflow-server.json").read_text())["pid"]
    assert servers_of(keepalive_home) == [pid]  # the command exited, its server did not
    second = run_cli(keepalive_home, "validate", str(shapes_dir), "--workdir", str(tmp_path / "w2"),
                     IMGFLOW_SERVER_IDLE_MINUTES="0.5")  # another workdir: no report to reuse, the flow runs
    assert second.returncode == 0, second.stdout
    assert "Scanned 36 files: 36 usable" in second.stdout
    assert "Finished in state Completed()" in (tmp_path / "w2" / "logs" / "imgflow.log").read_text()
    assert servers_of(keepalive_home) == [pid]  # on the same server


def test_a_record_is_usable_only_with_the_same_prefect_python_settings_and_a_live_pid(monkeypatch):
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////tmp/a.db")
    good = {"pid": os.getpid(), "port": 8123, "api_url": "http://127.0.0.1:8123/api",
            "prefect_version": server.prefect_version(), "python": sys.executable, "key": server.server_key(os.environ)}
    assert server.usable_record(good)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not server.usable_record({**good, "pid": dead.pid})
    assert not server.usable_record({**good, "prefect_version": "2.0.0"})
    assert not server.usable_record({**good, "python": "/usr/bin/python2"})
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")  # client-side only: still the same server
    assert server.usable_record(good)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////tmp/b.db")  # another database
    assert not server.usable_record(good)
    assert not server.usable_record(None)


def test_stop_removes_a_record_whose_process_is_gone(tmp_path):
    from imgflow.flows.server_daemon import stop_recorded

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    server.write_state(tmp_path / "imgflow-server.json", {"pid": gone.pid, "port": 8124,
                                                          "api_url": "http://127.0.0.1:8124/api"})
    code, line = stop_recorded(tmp_path)
    assert code == 0
    assert line == (f"The imgflow Prefect server recorded in {tmp_path / 'imgflow-server.json'} (pid {gone.pid}) "
                    "was not running; removed the record.")
    assert list(tmp_path.iterdir()) == []  # no record, no temporary file left


def test_idle_minutes_reads_fractions_and_reports_a_bad_value(monkeypatch, capsys):
    monkeypatch.delenv("IMGFLOW_SERVER_IDLE_MINUTES", raising=False)
    assert server.idle_minutes() == 10.0
    for raw, value in (("0", 0.0), ("0.05", 0.05), (" 30 ", 30.0)):
        monkeypatch.setenv("IMGFLOW_SERVER_IDLE_MINUTES", raw)
        assert server.idle_minutes() == value
    for raw in ("ten", "-1", "nan"):
        monkeypatch.setenv("IMGFLOW_SERVER_IDLE_MINUTES", raw)
        assert server.idle_minutes() == 10.0
        message = capsys.readouterr().err
        assert f"imgflow: IMGFLOW_SERVER_IDLE_MINUTES={raw!r}: expected a number of minutes >= 0" in message


def test_the_idle_clock_counts_requests_in_flight_and_the_watchdog_waits_for_live_clients():
    import asyncio

    from imgflow.flows.server_daemon import IdleClock, watch_idle

    seen = []

    async def app(scope, receive, send):
        seen.append(clock.active)

    clock = IdleClock(app)
    clock.last -= 100  # long idle
    asyncio.run(clock({"type": "http"}, None, None))
    assert seen == [1] and clock.active == 0 and clock.idle_s() < 5  # the request restarted the clock
    asyncio.run(clock({"type": "lifespan"}, None, None))
    assert seen == [1, 0]  # lifespan events are not requests

    class FakeServer:
        started, should_exit = True, False

    calls = []

    def alive() -> int:  # one live client for the first three looks, then none
        calls.append(1)
        return 1 if len(calls) <= 3 else 0

    fake, idle_clock = FakeServer(), IdleClock(app)
    watch_idle(fake, idle_clock, 0.2, alive)  # returns once it decided to stop
    assert fake.should_exit and len(calls) > 3  # not while the client lived


def test_a_command_run_from_a_folder_with_stray_modules_never_imports_them(shapes_dir, tmp_path):
    # the server started for one command (IMGFLOW_SERVER_IDLE_MINUTES=0 here) and the
    # validation child are `python -m` processes: they must not import from the working folder
    hostile, marker, home = tmp_path / "downloaded", tmp_path / "ran", tmp_path / "prefect-home"
    hostile.mkdir()
    home.mkdir()
    for name in ("uvicorn.py", "numpy.py"):
        (hostile / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\nraise SystemExit(9)\n")
    workdir = tmp_path / "work"
    cold = run_cli(home, "preprocess", str(shapes_dir), "--workdir", str(workdir), "--image-size", "16", cwd=hostile)
    assert cold.returncode == 0, cold.stdout
    assert not marker.exists(), marker.read_text()
    assert f"Validated {shapes_dir} while TensorFlow was imported" in (workdir / "logs" / "imgflow.log").read_text()
