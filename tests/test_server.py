"""The early temporary Prefect server and the commands' fixed cost (imgflow.flows.server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imgflow.flows import server

REPO = Path(__file__).resolve().parents[1]

# run the command in a child and report, at exit, whether heavy libraries were imported
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('IMPORTED', 'tensorflow' in sys.modules, 'keras' in sys.modules, "
    "'prefect' in sys.modules, 'prefect.server.api.server' in sys.modules))\n"
    "from imgflow.flows.cli import main\n"
    "sys.argv = ['imgflow'] + sys.argv[1:]\n"
    "main()\n"
)


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2", PREFECT_LOGGING_LEVEL="INFO")
    return subprocess.run([sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, env=env, cwd=REPO)


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
