"""imgflow installs as one namespaced package: a user's own ``tasks.py`` or ``flows/`` never collides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.imagefactory import make_class_folder


def _user_project(root: Path) -> Path:
    """A Celery/invoke-style ``tasks.py`` and a Prefect-style ``flows/`` package, as users have them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.py").write_text("WHO = 'the user tasks.py'\n")
    (root / "flows").mkdir()
    (root / "flows" / "__init__.py").write_text("WHO = 'the user flows package'\n")
    return root


def test_nothing_named_flows_or_tasks_is_installed_at_top_level(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print(u.find_spec('tasks'), u.find_spec('flows'), u.find_spec('imgflow') is not None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "None", "True"]


def test_python_api_beside_a_user_tasks_py_and_flows_package(tmp_path):
    project = _user_project(tmp_path / "project")
    code = (
        "import tasks, flows\n"
        "from imgflow.flows.prediction import batch_predict\n"
        "from imgflow.tasks.options import PredictOptions\n"
        "import imgflow.flows.training, imgflow.tasks.registry\n"
        "print(tasks.WHO); print(flows.WHO); print(batch_predict.name); print(PredictOptions().batch_size)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["the user tasks.py", "the user flows package", "batch-predict", "256"]


@pytest.mark.slow
def test_cli_beside_a_user_tasks_py_and_flows_package(tmp_path):
    project = _user_project(tmp_path / "project")
    data = make_class_folder(tmp_path / "data", {"cats": 6, "dogs": 6})
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    usage = subprocess.run([sys.executable, "-m", "imgflow", "--help"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "validate" in usage.stdout, usage.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "imgflow", "validate", str(data), "--workdir", str(tmp_path / "w")],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = tmp_path / "w" / "validation.json"
    assert report.is_file() and '"usable": true' in report.read_text()
