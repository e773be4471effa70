"""Deployments: prefect.yaml and serve.py definitions, a real worker run, "nothing to do" retraining."""

from __future__ import annotations

import csv
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from imgflow.flows.config import ConfigError
from tests.imagefactory import DIGIT_CLASSES, digit_images, make_digit_folder
from tests.modelfactory import make_champion, make_digit_model_dir

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _yaml_deployments() -> dict[str, dict]:
    spec = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    return {d["name"]: d for d in spec["deployments"]}


# ------------------------------------------------------------------ definitions, no server


def test_prefect_yaml_validates_with_prefects_own_model():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8")))
    names = [d.name for d in model.deployments]
    assert names == ["nightly-retraining", "hourly-inbox-predictions", "inbox-watcher"]
    for deployment in model.deployments:
        assert deployment.work_pool.name == "imgflow"
        assert deployment.concurrency_limit.limit == 1
        assert deployment.concurrency_limit.collision_strategy == "CANCEL_NEW"
        assert deployment.work_pool.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert len(deployment.schedules or []) == (0 if deployment.name == "inbox-watcher" else 1)


def test_yaml_entrypoints_load_and_parameters_match_the_flow_signatures():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    flows_by_deployment = {}
    for name, spec in _yaml_deployments().items():
        flow = load_flow_from_entrypoint(spec["entrypoint"], use_placeholder_flow=False)
        signature = inspect.signature(flow.fn)
        unknown = set(spec["parameters"]) - set(signature.parameters)
        assert not unknown, f"{name}: parameters {unknown} are not arguments of {flow.name}"
        required = {p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty}
        assert required <= set(spec["parameters"]), f"{name}: missing required parameters {required - set(spec['parameters'])}"
        # the values coerce to the annotated types exactly as a worker's run would do it
        validated = flow.validate_parameters(dict(spec["parameters"]))
        assert set(spec["parameters"]) <= set(validated)
        assert validated["workdir"] == Path("imgflow-work")  # a str in YAML, a Path for the flow
        for schedule in spec.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad expression
        flows_by_deployment[name] = (flow, spec)

    training_flow, training = flows_by_deployment["nightly-retraining"]
    assert training_flow.name == "scheduled-retraining"
    assert training["schedules"][0]["cron"] == "0 2 * * *"
    assert training["parameters"]["force"] is False
    assert {"data_dir", "workdir", "config_file"} <= set(training["parameters"])

    prediction_flow, prediction = flows_by_deployment["hourly-inbox-predictions"]
    assert prediction_flow.name == "batch-predict"
    assert prediction["schedules"][0]["cron"] == "0 * * * *"
    assert prediction["parameters"]["model"] == "champion"
    assert prediction["parameters"]["input_dir"] == "inbox"


def test_build_deployments_mirror_the_yaml(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.flows import load_flow_from_entrypoint

    from imgflow.flows.serve import build_deployments

    config = tmp_path / "imgflow.yaml"
    config.write_text("image_size: 32\n")
    training, prediction = build_deployments(tmp_path / "data", tmp_path / "inbox", tmp_path / "work", config)
    specs = _yaml_deployments()
    for deployment in (training, prediction):
        spec = specs[deployment.name]
        assert deployment.entrypoint == spec["entrypoint"]
        assert set(deployment.parameters) == set(spec["parameters"])
        assert deployment.schedules[0].schedule.cron == spec["schedules"][0]["cron"]
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
        assert deployment.flow_name == load_flow_from_entrypoint(deployment.entrypoint).name
    assert training.parameters["data_dir"] == str((tmp_path / "data").resolve())
    assert training.parameters["config_file"] == str(config.resolve())
    assert prediction.parameters["input_dir"] == str((tmp_path / "inbox").resolve())
    assert prediction.parameters["model"] == "champion"


def test_build_deployments_names_a_bad_cron(tmp_path):
    from imgflow.flows.serve import build_deployments

    with pytest.raises(ValueError, match=r"train_cron: expected a cron expression .* found 'every night'"):
        build_deployments(tmp_path, tmp_path, train_cron="every night")


def test_serve_script_check_prints_both_deployments(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "deployments"))
    try:
        import serve as serve_script
    finally:
        sys.path.remove(str(ROOT / "deployments"))
    assert serve_script.main(["--check", "--data-dir", str(tmp_path / "d"), "--inbox", str(tmp_path / "in"),
                              "--predict-cron", "*/15 * * * *"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("scheduled-retraining/nightly-retraining  cron '0 2 * * *'")
    assert out[1].startswith("batch-predict/hourly-inbox-predictions  cron '*/15 * * * *'")
    assert str((tmp_path / "in").resolve()) in out[1]


def test_scheduled_retraining_names_a_bad_config_file_before_any_work(tmp_path, prefect_server):
    from imgflow.flows.serve import scheduled_retraining

    config = tmp_path / "imgflow.yaml"
    config.write_text("image_size: 32\nepochz: 3\n")
    with pytest.raises(ConfigError, match=r"imgflow.yaml: unknown key 'epochz'"):
        scheduled_retraining(tmp_path / "data", workdir=tmp_path / "work", config_file=config)
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------ under the test server


def _tiny_model_dir(workdir: Path) -> Path:
    """A small digits classifier (Rescaling inside) saved per interface 4 and named champion."""
    model_dir = make_digit_model_dir(workdir / "models" / "tiny-digits", per_class=40, epochs=10, conv=False)
    make_champion(workdir, model_dir)
    return model_dir


def _prefect_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_yaml_prediction_deployment_runs_once_on_a_process_worker(tmp_path, prefect_server):
    """prefect deploy (the YAML, from the project folder), deployment run, worker --run-once: a CSV."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    project = tmp_path / "project"
    workdir = project / "imgflow-work"
    workdir.mkdir(parents=True)
    _tiny_model_dir(workdir)
    inbox = project / "inbox"
    (inbox / "nested").mkdir(parents=True)
    name_of = {digit: name for name, digit in DIGIT_CLASSES.items()}
    truth = {}
    for i, (digit, pixels) in enumerate(digit_images(DIGIT_CLASSES.values())[-30:]):  # not the training images
        rel = f"{'nested/' if i % 2 else ''}{i:02d}.png"
        Image.fromarray(pixels).save(inbox / rel)
        truth[rel] = name_of[digit]
    (inbox / "broken.png").write_bytes(b"not an image")

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    _prefect_cli(["work-pool", "create", "imgflow", "--type", "process", "--overwrite"], project, env)
    out = _prefect_cli(["deploy", "--prefect-file", str(PREFECT_YAML), "--name", "hourly-inbox-predictions"],
                       project, env)
    assert "batch-predict/hourly-inbox-predictions" in out
    flow_run = run_deployment("batch-predict/hourly-inbox-predictions", timeout=0)  # schedule it now, return
    started = time.perf_counter()
    log = _prefect_cli(["worker", "start", "--pool", "imgflow", "--run-once"], project, env, timeout=300)
    seconds = time.perf_counter() - started
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"flow run {flow_run.id} ended {state.type}: {state.message}\n{log[-3000:]}"

    csv_path = workdir / "predictions" / "inbox.csv"  # relative paths resolved in the folder of `prefect deploy`
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(truth) | {"broken.png"}
    assert rows["broken.png"]["error"] and not rows["broken.png"]["label"]
    correct = sum(rows[rel]["label"] == label for rel, label in truth.items())
    assert correct / len(truth) >= 0.8, f"{correct}/{len(truth)} correct"
    print(f"worker --run-once of the prediction deployment: {seconds:.1f} s")


@pytest.mark.slow
def test_scheduled_retraining_has_nothing_to_do_when_unchanged(tmp_path, prefect_server):
    from imgflow.flows.serve import scheduled_retraining
    from imgflow.tasks.registry import read_champion

    data = make_digit_folder(tmp_path / "data", per_class=20)
    config = tmp_path / "imgflow.yaml"
    config.write_text("image_size: 16\nepochs: 1\nbatch_size: 16\nencoding: png\nval_fraction: 0.2\n")
    workdir = tmp_path / "work"

    # the project's imgflow.yaml is read without naming it (as a deployment with config_file: null does)
    first = scheduled_retraining("data", workdir="work", project_dir=tmp_path)
    assert first["nothing_to_do"] is False and first["skipped"] is False
    assert first["config_file"] == str(config.resolve()) and first["config_source"] == "project"
    assert first["val_source"] == "defaults"
    champion_before = read_champion(workdir)
    models_before = sorted(p.name for p in (workdir / "models").iterdir())

    started = time.perf_counter()
    state = scheduled_retraining(data, workdir=workdir, config_file=config, return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_completed() and state.name == "Skipped"
    second = state.result()
    assert second["nothing_to_do"] is True and second["config_source"] == "parameter"
    assert second["run_id"] == first["run_id"]
    assert read_champion(workdir) == champion_before  # nothing promoted, nothing rewritten
    assert sorted(p.name for p in (workdir / "models").iterdir()) == models_before
    assert seconds < 60, f"nothing-to-do run took {seconds:.1f} s"
    print(f"nothing-to-do retraining run: {seconds:.1f} s")


def test_training_task_carries_the_gpu_tag():
    """`prefect concurrency-limit create gpu 1` only keeps two trainings off one GPU if the task is tagged."""
    from imgflow.flows.training import train_task

    assert "gpu" in train_task.tags


def test_gpu_tasks_keep_their_tag_only_where_the_server_limits_it(prefect_server):
    """Without a `gpu` limit the tag only costs a slot request (answered 503 by a busy SQLite server)."""
    from prefect.client.orchestration import get_client

    from imgflow.flows.gpu_slot import as_gpu_task
    from imgflow.flows.training import evaluate_task, train_task

    assert as_gpu_task(train_task).tags == set()
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=1)
        try:
            assert as_gpu_task(train_task) is train_task and "gpu" in as_gpu_task(evaluate_task).tags
        finally:
            client.delete_concurrency_limit_by_tag("gpu")
    assert "gpu" in train_task.tags  # the task itself is unchanged


def test_serve_refuses_without_a_server_url(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imgflow.flows.serve import NoServerError, serve_deployments

    with temporary_settings(updates={PREFECT_API_URL: None}):
        with pytest.raises(NoServerError, match=r"PREFECT_API_URL: expected the URL of a running Prefect server"):
            serve_deployments(tmp_path / "data", tmp_path / "inbox")
    assert not (tmp_path / "inbox").exists()  # refused before touching anything


def test_serve_names_a_missing_data_dir(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imgflow.flows.serve import serve_deployments

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(FileNotFoundError, match=r"DATA_DIR .*missing: expected a folder of class folders"):
            serve_deployments(tmp_path / "missing", tmp_path / "inbox")


def test_imgflow_serve_without_a_server_exits_2(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with a server URL
    proc = subprocess.run([sys.executable, "-m", "imgflow", "serve", str(tmp_path / "data"), "--inbox",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("imgflow: PREFECT_API_URL: expected the URL of a running Prefect server")


# ------------------------------------------------------------------ triggers, automations, project defaults

AUTOMATIONS_YAML = ROOT / "deployments" / "automations.yaml"


def test_yaml_triggers_are_the_served_triggers():
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from imgflow.flows.serve import PREDICTION_TRIGGERS, build_deployments

    spec = _yaml_deployments()["hourly-inbox-predictions"]
    assert spec["triggers"] == PREDICTION_TRIGGERS
    triggers = _initialize_deployment_triggers("hourly-inbox-predictions", spec["triggers"])  # as `prefect deploy`
    assert [t.expect for t in triggers] == [{"imgflow.model.promoted"}, {"imgflow.inbox.changed"}]
    served = build_deployments("d", "in")[1]
    assert [t.name for t in served.triggers] == ["imgflow-predict-after-promotion", "imgflow-predict-on-inbox-change"]
    assert served.triggers[1].within.total_seconds() == 120  # debounced: one run per inbox per 2 minutes


def test_automations_file_is_what_prefect_automation_create_accepts():
    from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
    from prefect.events.schemas.automations import AutomationCore, Posture

    data = yaml.safe_load(AUTOMATIONS_YAML.read_text(encoding="utf-8"))
    automations = {a["name"]: AutomationCore.model_validate(a) for a in data["automations"]}  # as the CLI does
    assert set(automations) == {"imgflow-crash-silent-runs", "imgflow-rerun-crashed-training",
                                "imgflow-notify-model-rejected", "imgflow-notify-dataset-unusable"}
    crash = automations["imgflow-crash-silent-runs"]
    assert crash.trigger.posture == Posture.Proactive
    assert crash.trigger.after == {"prefect.flow-run.heartbeat"}
    # Prefect's minimum heartbeat is 30 s and prefect.yaml sets 30: several missed beats before Crashed
    assert crash.trigger.within.total_seconds() >= 3 * 30
    (action,) = crash.actions
    assert isinstance(action, ChangeFlowRunState) and action.state.value == "CRASHED"
    rerun = automations["imgflow-rerun-crashed-training"]
    assert isinstance(rerun.actions[0], RunDeployment) and rerun.actions[0].source == "inferred"
    assert rerun.trigger.match_related.root["prefect.resource.id"] == "prefect.tag.rerun-on-crash"
    assert "rerun-on-crash" in _yaml_deployments()["nightly-retraining"]["tags"]
    for name in ("imgflow-notify-model-rejected", "imgflow-notify-dataset-unusable"):
        assert isinstance(automations[name].actions[0], SendNotification)
    assert automations["imgflow-notify-model-rejected"].trigger.expect == {"imgflow.model.rejected"}


def test_project_settings_precedence(tmp_path):
    from imgflow.flows.serve import project_settings

    assert project_settings(tmp_path, None, None) == {
        "config_file": None, "config_source": "defaults", "val_dir": None, "val_source": "defaults"}
    (tmp_path / "imgflow.yaml").write_text("epochs: 3\n")
    (tmp_path / "val").mkdir()
    found = project_settings(tmp_path, None, None)
    assert (found["config_file"], found["config_source"]) == (tmp_path.resolve() / "imgflow.yaml", "project")
    assert (found["val_dir"], found["val_source"]) == (tmp_path.resolve() / "val", "project")
    given = project_settings(tmp_path, "other.yaml", "/elsewhere/val")
    assert (given["config_file"], given["config_source"]) == (tmp_path.resolve() / "other.yaml", "parameter")
    assert given["val_dir"] == Path("/elsewhere/val")


def test_run_form_options_beat_the_project_config(tmp_path):
    from imgflow.flows.config import load_config
    from imgflow.flows.serve import TrainingOverrides, scheduled_retraining

    (tmp_path / "imgflow.yaml").write_text("epochs: 3\nimage_size: 64\n")
    overrides = TrainingOverrides(epochs=7)
    config = load_config(tmp_path / "imgflow.yaml", overrides.values())
    assert (config.train.epochs, config.preprocess.image_size) == (7, 64)
    with pytest.raises(ValueError, match="epochs"):
        TrainingOverrides(epochs=0)
    # the UI run form shows each option as its own typed field
    schema = scheduled_retraining.parameters.model_dump()
    options = schema["definitions"]["TrainingOverrides"]["properties"]
    assert {"epochs", "image_size", "batch_size", "learning_rate"} <= set(options)


def test_served_deployments_do_not_keep_a_work_pool(tmp_path):
    from imgflow.flows.serve import build_deployments

    for deployment in build_deployments(tmp_path, tmp_path, dask_address="tcp://127.0.0.1:8786"):
        assert deployment.work_pool_name is None
        # set explicitly, so applying it clears a pool an earlier `prefect deploy` attached
        assert "work_pool_name" in deployment.model_dump(mode="json", exclude_unset=True)
    training, prediction = build_deployments(tmp_path, tmp_path, dask_address="tcp://127.0.0.1:8786")
    assert prediction.parameters["dask_address"] == "tcp://127.0.0.1:8786"
    assert training.parameters["options"] == {"dask_address": "tcp://127.0.0.1:8786"}


def test_summary_artifacts_land_on_the_top_level_run(tmp_path, prefect_server):
    import json

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from imgflow.flows.serve import publish_summary

    model_dir = tmp_path / "models" / "r1"
    model_dir.mkdir(parents=True)
    (model_dir / "metadata.json").write_text(json.dumps({
        "run_id": "r1", "metrics": {"per_class_recall": {"cats": 0.5, "dogs": 1.0}},
        "evaluation": {"report_html": str(model_dir / "report.html")}}))
    result = {"run_id": "r1", "model_dir": str(model_dir), "val_accuracy": 0.75, "promoted": False,
              "reason": "rejected: worse than the champion", "healthy": True, "nothing_to_do": False,
              "findings": [{"severity": "warning", "code": "overfitting", "advice": "add data"}],
              "config_file": None, "config_source": "defaults"}

    @flow
    def top():
        from prefect.runtime import flow_run

        return flow_run.id, publish_summary(result)

    run_id, keys = top()
    assert keys == ["retraining-metrics", "retraining-decision", "retraining-findings", "retraining-files"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: json.loads(a.data) for a in artifacts}
    assert by_key["retraining-metrics"][:2] == [{"class": "cats", "recall": 0.5}, {"class": "dogs", "recall": 1.0}]
    assert by_key["retraining-decision"][0]["reason"] == "rejected: worse than the champion"
    assert by_key["retraining-findings"][0]["code"] == "overfitting"
    assert {"file": "report_html", "path": str(model_dir / "report.html")} in by_key["retraining-files"]


def test_imgflow_watch_needs_a_server_and_a_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run([sys.executable, "-m", "imgflow", "watch", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith(f"imgflow: INBOX {tmp_path / 'missing'} does not exist")
    proc = subprocess.run([sys.executable, "-m", "imgflow", "watch", str(tmp_path), "--max-polls", "1"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("imgflow: PREFECT_API_URL: expected the URL of a running Prefect server")


# ------------------------------------------------------------------ a real `prefect server start`


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_processes_using(api_url: str) -> list[int]:
    """PIDs whose environment points at this test's server (flow processes a worker started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"PREFECT_API_URL={api_url}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_real_server_promotion_event_triggers_a_prediction_run(tmp_path):
    """prefect server start + prefect deploy + automations file + worker: promoted -> batch-predict run."""
    import json
    import signal
    import urllib.request

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2")
    project = tmp_path / "proj"
    workdir = project / "imgflow-work"
    make_champion(workdir, make_digit_model_dir(workdir / "models" / "m1", per_class=30))
    (project / "inbox").mkdir()
    for i, (_, pixels) in enumerate(digit_images(DIGIT_CLASSES.values(), per_class=2)):
        Image.fromarray(pixels).save(project / "inbox" / f"img{i}.png")

    def api(path, body=None):
        request = urllib.request.Request(api_url + path, method="POST" if body is not None else "GET",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def cli(*args):
        proc = subprocess.run([PREFECT, *map(str, args)], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def events(name):
        query = {"filter": {"event": {"name": [name]}, "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 20}
        return api("/events/filter", query)["events"]

    started: list[subprocess.Popen] = []
    try:
        started.append(subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True))
        for _ in range(180):
            try:
                api("/health")
                break
            except OSError:
                time.sleep(1)
        cli("work-pool", "create", "imgflow", "--type", "process")
        cli("--no-prompt", "deploy", "--prefect-file", PREFECT_YAML, "--all")
        assert "Created 4 automation(s)" in cli("automation", "create", "--from-file", ROOT / "deployments" / "automations.yaml")
        automations = {a["name"] for a in api("/automations/filter", {})}
        assert {"imgflow-predict-after-promotion", "imgflow-predict-on-inbox-change", "imgflow-crash-silent-runs",
                "imgflow-rerun-crashed-training"} <= automations
        nightly = api("/deployments/name/scheduled-retraining/nightly-retraining")
        assert nightly["parameters"]["config_file"] is None and nightly["parameters"]["project_dir"] == "."
        started.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "imgflow"], cwd=project, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        # serve and worker never overlap: with the worker online, `imgflow serve` refuses and names it
        (project / "data").mkdir()
        for _ in range(60):
            workers = api("/work_pools/imgflow/workers/filter", {})
            if any(w["status"] == "ONLINE" for w in workers):
                break
            time.sleep(1)
        serve = subprocess.run([sys.executable, "-m", "imgflow", "serve", "data", "--inbox", "inbox"], cwd=project,
                               env=env, capture_output=True, text=True, timeout=120)
        assert serve.returncode == 2, serve.stdout + serve.stderr
        assert serve.stderr.startswith("imgflow: a worker already runs these deployments: "
                                       "scheduled-retraining/nightly-retraining on work pool 'imgflow' (worker ")
        assert serve.stdout == ""  # nothing announced, nothing served
        # a promotion, sent the way training_pipeline sends it
        code = ("from imgflow.flows import events; "
                f"events.model_decided({str(workdir)!r}, {{'run_id': 'm1', 'model_dir': {str(workdir / 'models' / 'm1')!r}, "
                "'promoted': True, 'reason': 'promoted: test', 'findings': []}); "
                "from prefect.events.worker import EventsWorker; EventsWorker.drain_all()")
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
        deadline = time.time() + 240
        while time.time() < deadline and not events("imgflow.predictions.written"):
            time.sleep(3)
        (promoted,) = events("imgflow.model.promoted")
        assert promoted["payload"]["reason"] == "promoted: test"
        written = events("imgflow.predictions.written")
        assert written, "the promotion did not cause a prediction run"
        assert written[0]["payload"]["rows"] == 6 and written[0]["payload"]["predicted"] == 6
        runs = api("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
        assert any((r.get("created_by") or {}).get("type") == "AUTOMATION" and "prediction" in r["tags"] for r in runs)
    finally:
        for proc in reversed(started):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in _own_processes_using(api_url):  # flow processes run in their own sessions
            os.kill(pid, signal.SIGKILL)


def test_serving_detaches_a_work_pool_an_earlier_deploy_attached(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from imgflow.flows.prediction import batch_predict
    from imgflow.flows.serve import PREDICTION_DEPLOYMENT, build_deployments, live_workers_serving

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="imgflow-detach-test", type="process"), overwrite=True)
    deployed = batch_predict.to_deployment(name=PREDICTION_DEPLOYMENT, work_pool_name="imgflow-detach-test",
                                           parameters={"model": "champion", "input_dir": str(tmp_path)})
    deployment_id = deployed.apply()
    name = f"batch-predict/{PREDICTION_DEPLOYMENT}"
    with get_client(sync_client=True) as client:
        assert client.read_deployment(deployment_id).work_pool_name == "imgflow-detach-test"
    assert live_workers_serving([name]) == []  # a pool, but no worker online: serving may take over
    served = build_deployments(tmp_path, tmp_path)[1]
    assert served.apply() == deployment_id
    with get_client(sync_client=True) as client:
        after = client.read_deployment(deployment_id)
    assert after.work_pool_name is None and after.work_queue_id is None
    assert after.parameters["input_dir"] == str(tmp_path.resolve())
