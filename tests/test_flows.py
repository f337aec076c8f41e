"""Prefect flows over the DVC stages: params overrides, stage order, failures, and the served deployment.

Flows run in a temporary copy of the repository (tracked files, a fresh git commit), so DVC, params.yaml
and the MLflow database of the checkout are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows import workspace
from fluxfill import artifacts
from fluxfill.config import ConfigError, load_params
from fluxfill.tracking import read_run_ref

ROOT = Path(__file__).resolve().parents[1]
# small enough for the whole chain in seconds per stage on a CPU
SMALL = {"data.panel_size": 64, "model.max_sequence_length": 32, "encode.shard_size": 8, "train.max_steps": 3,
         "train.checkpoint_every": 2, "eval.num_inference_steps": 1, "eval.max_samples": 2}


@pytest.fixture
def repo(repo_copy, monkeypatch) -> Path:
    """A repository copy as the working directory; its own code and MLflow database for the stages."""
    r = repo_copy
    monkeypatch.chdir(r)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(r), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{r}/mlflow.db")
    return r


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # slow CI machines
        yield


def _logs(flow_run_id) -> list[str]:
    """Every log line of a flow run and its sub-flow runs, oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is still queued
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(c.id for c in children)]
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


# ------------------------------------------------------------------------------------------- params
def test_overrides_are_flattened_validated_and_written_keeping_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    original = params.read_text()

    assert workspace.normalize_overrides({"train": {"max_steps": 5, "lora": {"rank": 4}}, "fusion.mode": "none"}) == {
        "train.max_steps": 5, "train.lora.rank": 4, "fusion.mode": "none"}
    with pytest.raises(ConfigError, match="must name a section and a key"):
        workspace.normalize_overrides({"max_steps": 5})
    with pytest.raises(ConfigError, match=r"train\.max_steps.*greater than or equal to 1"):
        workspace.validate_overrides(tmp_path, {"train.max_steps": 0})
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        workspace.validate_overrides(tmp_path, {"train.max_stepz": 5})

    # values equal to the file's: nothing written, byte for byte
    current = load_params(params)
    assert workspace.write_params(params, {"train.max_steps": current.train.max_steps,
                                           "train.learning_rate": current.train.learning_rate,
                                           "model.revision": None}) == {}
    assert params.read_text() == original

    changed = workspace.write_params(params, {"train.max_steps": 7, "fusion.mode": "none", "tracking.run_name": "a: b"})
    assert changed == {"train.max_steps": (current.train.max_steps, 7), "fusion.mode": ("learned", "none"),
                       "tracking.run_name": (None, "a: b")}
    p = load_params(params)
    assert (p.train.max_steps, p.fusion.mode, p.tracking.run_name) == (7, "none", "a: b")
    assert p.model_dump(exclude={"train": {"max_steps"}, "fusion": {"mode"}, "tracking": {"run_name"}}) == \
        current.model_dump(exclude={"train": {"max_steps"}, "fusion": {"mode"}, "tracking": {"run_name"}})
    # edited in place: only the three lines differ, comments stay in their column
    before, after = original.splitlines(), params.read_text().splitlines()
    assert len(before) == len(after)
    diff = {b: a for b, a in zip(before, after, strict=True) if a != b}
    assert set(diff.values()) == {"  max_steps: 7", "  mode: none                # none (no reference) | fixed (alpha stays at init, W trained) | learned (alpha and W trained)",
                                  "  run_name: 'a: b'"}

    # a list goes through ruamel's round trip: comments and `null` kept, the value replaced
    workspace.write_params(params, {"train.lora.target_modules": ["x_embedder", "attn.to_q"]})
    text = params.read_text()
    assert load_params(params).train.lora.target_modules == ["x_embedder", "attn.to_q"]
    assert "  mode: none                # none (no reference) | fixed (alpha stays at init, W trained) | learned (alpha and W trained)" in text
    assert "  tracking_uri: null        # null: $MLFLOW_TRACKING_URI" in text
    assert text.splitlines()[0].startswith("# Every knob of the pipeline")
    assert yaml.safe_load(text)["data"] == yaml.safe_load(original)["data"]


def test_dvc_set_param_writer_would_rewrite_params_yaml(tmp_path):
    """docs/design.md §7: why the flow keeps its own params writer instead of `dvc exp run -S`'s."""
    from dvc.utils.hydra import apply_overrides

    ours, dvcs = tmp_path / "ours.yaml", tmp_path / "dvc.yaml"
    for p in (ours, dvcs):
        shutil.copy(ROOT / "params.yaml", p)
    original = ours.read_text().splitlines()
    workspace.write_params(ours, {"train.max_steps": 7, "data.instruction": "yes"})
    apply_overrides(dvcs, ["++train.max_steps=7", "++data.instruction='yes'"])
    assert yaml.safe_load(ours.read_text())["data"]["instruction"] == "yes"
    assert yaml.safe_load(dvcs.read_text())["data"]["instruction"] is True  # YAML 1.2 out, PyYAML (1.1) in
    changed = [line for line, new in zip(original, ours.read_text().splitlines(), strict=True) if new != line]
    assert [line.split(":")[0] for line in changed] == ["  instruction", "  max_steps"]
    text = dvcs.read_text()
    assert "  revision: null" in original and "  revision: null" not in text and "  revision:\n" in text
    assert "  prompt_template: A diptych" in text and len(text.splitlines()) != len(original)


def test_pipeline_order_and_staleness_come_from_dvc(repo):
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    order = workspace.pipeline_stages(repo)
    assert order[:4] == ["prepare", "encode", "train", "evaluate"] and sorted(order) == sorted(stages)
    reasons = workspace.stale_reasons(repo, "prepare")
    assert reasons and "data/prepared" in reasons[-1], reasons  # no output here yet
    assert set(workspace.workspace_status(repo)) == set(stages)
    files = workspace.metrics_files(repo)
    assert files["metrics/train.json"] == "train" and files["metrics/eval.json"] == "evaluate"
    env = workspace.stage_env({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]


def test_summary_and_mlflow_address():
    from flows.pipeline import mlflow_ui_url, summary_markdown
    from flows.workspace import StageRun

    info = {"run_id": "r1", "run_name": "baseline", "experiment_id": "3", "status": "FINISHED",
            "tracking_uri": "http://mlflow:5000/"}
    assert mlflow_ui_url(info) == "http://mlflow:5000/#/experiments/3/runs/r1?workflowType=machine_learning"
    local = {**info, "tracking_uri": "sqlite:////repo/mlflow.db"}
    assert mlflow_ui_url(local) is None
    runs = [StageRun("prepare", "up to date"), StageRun("train", "ran", 12.25, ["changed deps: params.yaml"])]
    metrics = {"metrics/train.json": {"stage": "train", "values": {"loss": 0.51234, "fusion_weight": 0.6211}},
               "metrics/eval.json": {"stage": "evaluate", "values": {"psnr": 21.5, "note": "x"}}}
    md = summary_markdown(runs, {"train.max_steps": [60, 50]}, metrics, local, ["dvc.lock is up to date"])
    assert "| prepare | up to date | 0.0 | - |" in md and "| train | ran | 12.2 | changed deps: params.yaml |" in md
    assert "`train.max_steps: 50` (was `60`)" in md
    assert "final loss 0.5123, final α 0.6211" in md and "(metrics/eval.json): psnr 21.5" in md
    assert "mlflow ui --backend-store-uri sqlite:////repo/mlflow.db" in md
    assert "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning" in md
    baseline = {"metrics/train.json": {"stage": "train", "values": {"loss": 0.5, "fusion_weight": None}}}
    assert "final α none (fusion.mode none)" in summary_markdown(runs, {}, baseline, None, [], failure="boom")
    assert summary_markdown(runs, {}, {}, None, [], failure="boom").startswith("# train-diptych: failed")


def test_prefect_yaml_deployments_load_their_flows():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {}
    for d in config["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        names[f"{load_flow_from_entrypoint(str(ROOT / path) + ':' + func).name}/{d['name']}"] = d["work_pool"]["name"]
    assert names == {"train-diptych/gpu": "gpu", "sweep-diptych/gpu": "gpu", "train/gpu": "gpu", "evaluate/gpu": "gpu",
                     "edit-batch/gpu": "gpu"}


def test_serve_refuses_to_start_without_a_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main([]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_run_name_is_checked_against_dvc_experiments_or_the_skip_is_logged(repo, tmp_path, caplog):
    import logging

    from dvc.repo.experiments.refs import ExpRefInfo

    from flows.pipeline import _check_experiment_name

    logger = logging.getLogger("test.flows")
    logger.addHandler(caplog.handler)  # Prefect's logging setup leaves the root logger's capture out
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "update-ref", str(ExpRefInfo(head.strip(), "taken")), "HEAD"], cwd=repo, check=True)
    _check_experiment_name(repo, "free", logger)
    with pytest.raises(ConfigError, match=r"run_name 'taken' is already a DVC experiment of this commit"):
        _check_experiment_name(repo, "taken", logger)

    fresh = tmp_path / "fresh"  # git and DVC, no commit: DVC cannot list experiments
    fresh.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=fresh, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=fresh, check=True)
    try:
        _check_experiment_name(fresh, "taken", logger)
    finally:
        logger.removeHandler(caplog.handler)
    assert "run_name 'taken' not checked against the DVC experiments: unknown Git revision 'HEAD'" in caplog.text


def test_a_damaged_metrics_file_is_left_out_of_the_summary_with_a_warning(repo, caplog):
    import logging

    from flows.pipeline import _read_metrics

    logger = logging.getLogger("test.flows.metrics")
    logger.addHandler(caplog.handler)  # Prefect's logging setup leaves the root logger's capture out
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/train.json").write_text('{"loss": 0.5')  # cut short
    (repo / "metrics/eval.json").write_text('{"psnr": 21.5}')
    try:
        found = _read_metrics(repo, logger)
    finally:
        logger.removeHandler(caplog.handler)
    assert found == {"metrics/eval.json": {"stage": "evaluate", "values": {"psnr": 21.5}}}
    assert f"left out of the summary: {repo / 'metrics/train.json'}: not a metrics file (Expecting ',' delimiter: " \
        "line 1 column 13 (char 12)); rebuild it with `dvc repro train` (or `fluxfill train`)" in caplog.text


# -------------------------------------------------------------------------------------- failures
def test_invalid_override_is_rejected_before_anything_runs(repo, harness):
    from flows.pipeline import train_diptych

    lock = repo / "dvc.lock"
    before = (repo / "params.yaml").read_bytes(), lock.read_bytes() if lock.exists() else None
    state = train_diptych(overrides={"train.max_steps": 0, "fusion.mode": "both"}, return_state=True)
    assert state.is_failed()
    assert "train.max_steps: Input should be greater than or equal to 1 (got 0)" in state.message
    assert "fusion.mode: Input should be 'none', 'fixed' or 'learned' (got 'both')" in state.message
    assert ((repo / "params.yaml").read_bytes(), lock.read_bytes() if lock.exists() else None) == before
    assert not (repo / "data" / "prepared").exists()


def test_failing_stage_fails_the_flow_run_and_keeps_earlier_outputs(repo, harness, tmp_path):
    from flows.pipeline import prepare_data, train_diptych

    done = prepare_data(overrides={"data.panel_size": 64})
    assert done["stage"] == "prepare" and done["status"] == "ran"
    manifest = (repo / "data/prepared/manifest.csv").read_bytes()
    lock = (repo / "dvc.lock").read_bytes()
    assert yaml.safe_load(lock)["stages"]["prepare"]["params"]["params.yaml"]["data.panel_size"] == 64

    empty = tmp_path / "empty"
    empty.mkdir()
    state = train_diptych(overrides={"data.source": "folder", "data.path": str(empty)}, return_state=True)
    assert state.is_failed()
    assert "stage 'prepare' failed (exit code 255)" in state.message  # DVC's code for a failed stage
    assert "its outputs from the last successful run are restored (dvc checkout prepare)" in state.message
    logs = "\n".join(_logs(state.state_details.flow_run_id))
    assert "fluxfill prepare: error:" in logs and str(empty) in logs  # the stage's own message, streamed
    assert "Running stage 'encode'" not in logs
    # DVC kept the earlier outputs and lock; the overrides stay in params.yaml, as with `dvc exp run -S`
    assert (repo / "data/prepared/manifest.csv").read_bytes() == manifest
    assert (repo / "dvc.lock").read_bytes() == lock
    assert not (repo / "data/latents").exists()
    assert load_params(repo / "params.yaml").data.source == "folder"
    summary = _artifacts(state.state_details.flow_run_id)["train-diptych-summary"].data
    assert "| prepare | failed |" in summary and "fluxfill prepare: error:" in summary

    # back to settings DVC has seen: restored from its run cache, not executed; then nothing to do
    fixed = {"data.source": "demo", "data.path": "data/raw"}
    assert prepare_data(overrides={**fixed, "data.panel_size": 32})["status"] == "ran"
    assert prepare_data(overrides={"data.panel_size": 64})["status"] == "restored"
    assert (repo / "data/prepared/manifest.csv").read_bytes() == manifest
    assert prepare_data()["status"] == "up to date"


# ------------------------------------------------------------------------ served deployment, real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: stopped with everything it started


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for(check, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s; logs:\n" + "\n".join(p.read_text()[-3000:] for p in logs))


@pytest.mark.slow
def test_served_deployment_runs_the_chain_with_overrides(tmp_path, repo_copy):
    repo = repo_copy
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PREFECT_API_URL=api,
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # pick the run up at once (default: every 10 s)
        MLFLOW_TRACKING_URI=f"sqlite:///{repo}/mlflow.db", PYTHONPATH=str(repo),
    )
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = serve = None
    try:
        server = _start([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                         "--no-ui"], tmp_path, env, server_log)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait_for(healthy, 180, "the Prefect server did not answer /api/health", [server_log])
        serve = _start([sys.executable, "-m", "flows.serve"], repo, env, serve_log)

        def served(name: str = "train-diptych/local") -> bool:
            try:
                with urllib.request.urlopen(f"{api}/deployments/name/{name}", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait_for(served, 120, "python -m flows.serve did not create train-diptych/local", [serve_log])
        _wait_for(lambda: served("sweep-diptych/local"), 60, "python -m flows.serve did not create "
                  "sweep-diptych/local beside train-diptych/local", [serve_log])

        overrides = {**SMALL, "fusion.init": 0.3, "train.num_processes": 2}  # training: 2 gloo workers
        run = subprocess.run(
            [str(bindir / "prefect"), "deployment", "run", "train-diptych/local", "-p",
             f"overrides={json.dumps(overrides)}", "-p", "run_name=ci-served", "--watch", "--watch-timeout", "600"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=660,
        )
        out = run.stdout + run.stderr
        assert run.returncode == 0, out + "\n--- serve log ---\n" + serve_log.read_text()[-6000:]
        assert "Completed" in out

        # the overrides are in params.yaml and dvc.lock; `dvc repro` has nothing left to do
        params = load_params(repo / "params.yaml")
        assert (params.train.max_steps, params.fusion.init, params.tracking.run_name) == (3, 0.3, "ci-served")
        assert params.train.num_processes == 2
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env,
                                capture_output=True, text=True, check=True)
        assert json.loads(status.stdout) == {}
        refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.split()
        assert "ci-served" in [r.rsplit("/", 1)[-1] for r in refs]  # saved as a DVC experiment

        # a new MLflow run, named by run_name, with the override among its params and a fusion_weight history
        from mlflow.tracking import MlflowClient

        ref = read_run_ref(repo / "models", repo)
        client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
        mlrun = client.get_run(ref["run_id"])
        assert mlrun.info.run_name == "ci-served" and mlrun.info.status == "FINISHED"
        assert mlrun.data.params["train.max_steps"] == "3" and mlrun.data.params["fusion.init"] == "0.3"
        assert mlrun.data.tags["accelerate.world_size"] == "2" and mlrun.data.params["train.num_processes"] == "2"
        assert json.loads(mlrun.data.tags["fluxfill.overrides"])["fusion.init"] == 0.3
        history = client.get_metric_history(ref["run_id"], "fusion_weight")
        assert [m.step for m in history] == [1, 2, 3]
        assert all(0 < m.value < 1 for m in history)

        # the Prefect artifacts of the flow run
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):  # read them from the real server
            with get_client(sync_client=True) as pc:
                runs = pc.read_flow_runs()
            flow_run = next(r for r in runs if r.parameters.get("run_name") == "ci-served")
            assert flow_run.state.is_completed()
            version = client.get_model_version("fluxfill-diptych", "1")  # the version training registered
            assert version.run_id == ref["run_id"] and version.tags["prefect.flow_run_id"] == str(flow_run.id)
            arts = _artifacts(flow_run.id)
            assert {"train-diptych-summary", "train-diptych-metrics", "mlflow-run"} <= set(arts)
            summary = arts["train-diptych-summary"].data
            for stage in ("prepare", "encode", "train", "evaluate"):
                assert f"| {stage} | ran |" in summary
            train_metrics = json.loads((repo / "metrics/train.json").read_text())
            assert f"final α {train_metrics['fusion_weight']:.4g}" in summary
            assert "**Model version**: `fluxfill-diptych` version 1 (`models:/fluxfill-diptych/1`;" in summary
            assert "mlflow ui --backend-store-uri" in arts["mlflow-run"].data
            assert ref["run_id"] in arts["mlflow-run"].data
            rows = arts["train-diptych-metrics"].data
            rows = json.loads(rows) if isinstance(rows, str) else rows
            assert {"stage": "train", "file": "metrics/train.json", "metric": "loss",
                    "value": train_metrics["loss"]} in rows

            # the same request again: every stage is up to date, nothing runs, no new MLflow run; the workspace's
            # run references are gone (as in a clone after `dvc pull`): the run is found by the weights' hash tag
            from prefect.deployments import run_deployment

            refs = list((repo / artifacts.RUN_REFS).glob("*.json"))
            assert len(refs) == 1
            refs[0].unlink()
            again = run_deployment("train-diptych/local", parameters={"overrides": overrides}, timeout=300)
            assert again.state.is_completed(), again.state
            arts = _artifacts(again.id)
            for stage in ("prepare", "encode", "train", "evaluate"):
                assert f"| {stage} | up to date |" in arts["train-diptych-summary"].data
            assert "training did not run in this flow run: the MLflow run is the earlier one" in \
                arts["train-diptych-summary"].data
            assert ref["run_id"] in arts["mlflow-run"].data
            assert len(client.search_runs([ref["experiment_id"]])) == 1

            # fewer steps than the checkpoint the first run left (step 2): a new run of exactly 1 step, from step 0
            shorter = run_deployment("train-diptych/local", timeout=300, parameters={
                "overrides": {**overrides, "train.max_steps": 1, "tracking.run_name": None}})
            assert shorter.state.is_completed(), shorter.state
            summary = _artifacts(shorter.id)["train-diptych-summary"].data
            assert "| encode | up to date |" in summary and "| train | ran |" in summary
        assert list((repo / "checkpoints").glob("*/checkpoint-000002"))
        train_metrics = json.loads((repo / "metrics/train.json").read_text())
        assert train_metrics["steps"] == 1 and 0 < train_metrics["loss"] < 10
        new_ref = read_run_ref(repo / "models", repo)
        assert new_ref["run_id"] != ref["run_id"] and len(client.search_runs([ref["experiment_id"]])) == 2
        new_run = client.get_run(new_ref["run_id"])
        assert new_run.info.status == "FINISHED" and new_run.data.params["train.max_steps"] == "1"
        assert new_run.info.run_name.startswith("tiny-learned-1steps-")
        assert [m.step for m in client.get_metric_history(new_ref["run_id"], "loss")] == [1]
        assert [m.step for m in client.get_metric_history(ref["run_id"], "loss")] == [1, 2, 3]  # not appended to
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env,
                                capture_output=True, text=True, check=True)
        assert json.loads(status.stdout) == {}
    finally:
        _stop(serve)
        _stop(server)


# ------------------------------------------------------------------------------------------- edit-batch
def test_edit_batch_flow_edits_a_folder_and_is_served(tmp_path, monkeypatch, harness, model_dir):
    import numpy as np
    from PIL import Image

    from flows.edit import edit_batch
    from flows.serve import deployments

    assert sorted(d.flow_name for d in deployments()) == [
        "edit-batch", "encode-latents", "evaluate", "prepare-data", "sweep-diptych", "train", "train-diptych"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("eval: {num_inference_steps: 1}\n")  # the repository root
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (451, 300), "b.jpg": (30, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "photos" / name)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "ref.png")

    state = edit_batch(source="photos", out="edited", model=str(model_dir), reference="ref.png", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["written"] == [str(tmp_path / "edited" / "a.png"), str(tmp_path / "edited" / "b.png")]
    assert result["model"] == str(model_dir) and abs(result["alpha"] - 0.3) < 1e-6
    assert [Image.open(p).size for p in result["written"]] == [(451, 300), (30, 50)]
    arts = _artifacts(state.state_details.flow_run_id)
    assert "2 image(s) from `photos` into `edited`" in arts["edit-batch-summary"].data
    assert "fusion weight α: 0.3000" in arts["edit-batch-summary"].data
    rows = arts["edit-batch-outputs"].data
    assert (json.loads(rows) if isinstance(rows, str) else rows) == [{"output": p} for p in result["written"]]

    state = edit_batch(source="photos", out="edited", model=str(model_dir), return_state=True)  # outputs exist
    assert state.is_failed()
    assert "edit found 2 problem(s) (nothing written)" in state.message and "edited/a.png exists" in state.message
