"""fluxfill.tracking against a throw-away sqlite MLflow store."""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from fluxfill import tracking
from fluxfill.config import FluxfillError, Params, TrackingConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_params(store: str, experiment: str = "tests", **sections) -> Params:
    return Params.model_validate({"tracking": {"tracking_uri": store, "experiment": experiment}, **sections})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- where runs go ----------------------------------------------------------------------------

def test_default_uri_is_absolute_sqlite_under_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path.resolve() / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(repo / "sub")
    uri = tracking.tracking_uri(TrackingConfig())
    assert uri == f"sqlite:///{repo}/mlflow.db"  # sqlite:////abs/...: four slashes, an absolute path
    assert tracking.sqlite_path(uri) == repo / "mlflow.db"

    # a DVC temporary experiment workspace (it has its own params.yaml) maps to the outer repo
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    (workspace / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(workspace)
    assert tracking.tracking_uri(TrackingConfig()) == uri


def test_uri_precedence_config_then_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(TrackingConfig()) == "http://127.0.0.1:5999"
    assert tracking.tracking_uri(TrackingConfig(tracking_uri="sqlite:////x/y.db")) == "sqlite:////x/y.db"


def test_relative_sqlite_uri_is_relative_to_the_repo_root(tmp_path, monkeypatch):
    repo = tmp_path.resolve()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/m.db?timeout=20")
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{repo}/runs/m.db?timeout=20"


def test_sqlite_path_of_relative_and_absolute_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.sqlite_path("sqlite:///mlflow.db") == tmp_path / "mlflow.db"
    assert tracking.sqlite_path("sqlite:////a/b%20c/m.db?timeout=20") == Path("/a/b c/m.db")
    assert tracking.sqlite_path("http://host:5000") is None


# --- reachability -----------------------------------------------------------------------------

def test_unreachable_server_fails_fast_with_advice():
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(FluxfillError) as err:
        tracking.setup(TrackingConfig(tracking_uri=uri))
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert re.match(rf"MLflow tracking server {uri} is unreachable: \[Errno \d+\] Connection refused; ", msg)
    assert f"mlflow server --host 127.0.0.1 --port {uri.rsplit(':', 1)[1]} " in msg
    assert msg.endswith("or use the local sqlite database (tracking.tracking_uri and MLFLOW_TRACKING_URI both unset)")
    assert "Connection refused" in str(err.value.__cause__)  # MLflow's own error stays chained


def test_silent_server_times_out(monkeypatch):
    monkeypatch.setattr(tracking, "REACH_TIMEOUT_S", 0.3)
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(FluxfillError, match=f"{uri} is unreachable: no answer within 0.3 s; "):
            tracking.check_reachable(uri)
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize(("status", "error"), [(200, None), (404, "answered HTTP 404")])
def test_server_answer_is_checked(status, error):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"experiments": []}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if error is None:
            tracking.check_reachable(uri)
        else:
            with pytest.raises(FluxfillError, match=error):
                tracking.check_reachable(uri)
    finally:
        server.shutdown()
    assert seen == ["/api/2.0/mlflow/experiments/search?max_results=1"]


def test_sqlite_folder_is_created_or_reported(tmp_path):
    tracking.check_reachable(f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(FluxfillError, match=r"cannot create the folder of the MLflow database .*file/db/mlflow.db"):
        tracking.check_reachable(f"sqlite:///{tmp_path}/file/db/mlflow.db")


# --- experiment -------------------------------------------------------------------------------

def test_setup_creates_the_experiment_once_with_local_artifacts(store, monkeypatch):
    cfg = TrackingConfig(tracking_uri=store, experiment="setup once")
    first = tracking.setup(cfg)
    assert tracking.setup(cfg) == first
    assert mlflow.get_tracking_uri() == store
    exp = mlflow.get_experiment(first)
    assert exp.name == "setup once"
    assert exp.artifact_location == (tracking.sqlite_path(store).parent / "mlartifacts" / "setup_once").as_uri()

    # another process created it between our lookup and our create: use theirs
    real = mlflow.MlflowClient.get_experiment_by_name
    calls = []

    def racy(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", racy)
    assert tracking.setup(cfg) == first
    assert len(calls) == 2


def test_experiment_opens_in_the_model_training_view(store):
    made = mlflow.get_experiment(tracking.setup(TrackingConfig(tracking_uri=store, experiment="kind new")))
    assert made.tags["mlflow.experimentKind"] == "custom_model_development"
    client = mlflow.MlflowClient()
    older = client.create_experiment("kind older")  # made before fluxfill set the kind
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    tracking.setup(TrackingConfig(tracking_uri=store, experiment="kind older"))
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("kind chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.setup(TrackingConfig(tracking_uri=store, experiment="kind chosen"))
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"  # kept
    # MLflow 3.17's UI takes the view from the page address
    assert tracking.ui_url("http://127.0.0.1:5000/", "3", "r1") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning"
    assert tracking.ui_url("http://h:5000", "3") == "http://h:5000/#/experiments/3?workflowType=machine_learning"


def test_deleted_experiment_is_reported(store):
    cfg = TrackingConfig(tracking_uri=store, experiment="gone")
    mlflow.delete_experiment(tracking.setup(cfg))
    with pytest.raises(FluxfillError, match=r"'gone' .* is deleted: restore it with `mlflow experiments restore"):
        tracking.setup(cfg)


# --- tags ---------------------------------------------------------------------------------------

DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: fluxfill prepare
    outs:
    - path: data/prepared
      hash: md5
      md5: 1f2e3d4c5b6a79881f2e3d4c5b6a7988.dir
      size: 1234
      nfiles: 10
  encode:
    cmd: fluxfill encode
    deps:
    - path: data/prepared
      hash: md5
      md5: 1f2e3d4c5b6a79881f2e3d4c5b6a7988.dir
    outs:
    - path: ./data/latents/
      hash: md5
      md5: aaaabbbbccccddddeeeeffff00001111.dir
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_run_tags_link_git_commit_and_dvc_data(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    git(tmp_path, "add", "dvc.lock")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "lock")
    monkeypatch.chdir(tmp_path)

    tags = tracking.run_tags(Params())
    device = tags.pop("device")
    assert device in ("cpu", "mps") or device.startswith("cuda (")
    assert tags == {
        "git.commit": git(tmp_path, "rev-parse", "HEAD"),
        "git.dirty": "false",
        "dvc.data.prepared": "1f2e3d4c5b6a79881f2e3d4c5b6a7988.dir",
        "dvc.data.latents": "aaaabbbbccccddddeeeeffff00001111.dir",
        "preset": "tiny",
        "fluxfill.version": "0.1.0",
    }
    (tmp_path / "dvc.lock").write_text(DVC_LOCK + "\n")
    assert tracking.run_tags(Params())["git.dirty"] == "true"


def test_run_tags_without_git_or_dvc_lock(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with caplog.at_level(logging.INFO, logger="fluxfill.tracking"):
        assert set(tracking.run_tags(Params())) == {"preset", "device", "fluxfill.version"}
    assert "no git tag on the run: `git rev-parse HEAD` failed (Command '['git', 'rev-parse', 'HEAD']' returned " \
        "non-zero exit status 128" in caplog.text
    assert "no dvc.data tag for data/prepared: dvc.lock does not exist yet (`dvc repro` writes it)" in caplog.text


def test_dvc_out_hash(tmp_path, caplog):
    lock = tmp_path / "dvc.lock"
    lock.write_text(DVC_LOCK)
    assert tracking.dvc_out_hash("data/latents", lock) == "aaaabbbbccccddddeeeeffff00001111.dir"
    assert tracking.dvc_out_hash("./data/prepared/", lock) == "1f2e3d4c5b6a79881f2e3d4c5b6a7988.dir"
    assert tracking.dvc_out_hash("models", lock) is None
    assert tracking.dvc_out_hash("data/latents", tmp_path / "missing.lock") is None
    lock.write_text("stages: [unclosed")
    with caplog.at_level(logging.WARNING, logger="fluxfill.tracking"):
        assert tracking.dvc_out_hash("data/latents", lock) is None
    assert f"no dvc.data tag for data/latents: {lock} is not readable (while parsing a flow sequence)" in caplog.text


# --- runs ---------------------------------------------------------------------------------------

def test_start_run_logs_flat_params_tags_metrics_and_resumes(store, caplog):
    params = make_params(store, train={"lora": {"rank": 8}})
    with tracking.start_run(params, run_name="first", tags={"device": "cuda (test)"}) as run:
        mlflow.log_metric("loss", 0.5, step=1)
    run_id = run.info.run_id

    logged = tracking.find_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "first"
    assert logged.data.params == {k: str(v) for k, v in params.flat().items()}
    assert logged.data.params["train.lora.rank"] == "8"
    assert logged.data.params["eval.max_samples"] == "None"
    assert logged.data.params["train.lora.target_modules"].startswith("['x_embedder', 'attn.to_q'")
    assert logged.data.tags["device"] == "cuda (test)"
    assert logged.data.tags["preset"] == "tiny"
    assert mlflow.get_experiment(logged.info.experiment_id).name == "tests"

    # evaluation resumes the run; a changed setting cannot overwrite the logged param
    later = make_params(store, train={"lora": {"rank": 8}}, eval={"num_inference_steps": 4})
    with caplog.at_level(logging.WARNING, logger="fluxfill.tracking"):
        with tracking.start_run(later, run_id=run_id) as resumed:
            mlflow.log_metric("psnr", 21.5)
    assert resumed.info.run_id == run_id
    logged = tracking.find_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["eval.num_inference_steps"] == "8"
    assert logged.data.metrics == {"loss": 0.5, "psnr": 21.5}
    assert "eval.num_inference_steps='8'->'4'" in caplog.text


def test_default_run_names_say_what_ran_and_never_repeat(store, monkeypatch):
    import random
    import secrets

    params = make_params(store, experiment="names", fusion={"mode": "none"})
    tracking.setup(params.tracking)
    names = []
    for _ in range(3):
        random.seed(0)  # training seeds Python's random: MLflow's own names then came out the same every run
        with tracking.start_run(params) as run:
            pass
        names.append(tracking.find_run(run.info.run_id).info.run_name)
    assert len(set(names)) == 3 and all(re.fullmatch(r"tiny-none-[a-z2-9]{4}", n) for n in names), names
    assert re.fullmatch(r"tiny-none-40steps-3f2a9c-[a-z2-9]{4}", tracking.default_run_name(params, "40steps", "3f2a9c"))

    # a drawn name that a run of the experiment already has is drawn again
    draws = iter(names[0].split("-")[-1] + "zzzz")
    monkeypatch.setattr(secrets, "choice", lambda alphabet: next(draws))
    assert tracking.default_run_name(params) == "tiny-none-zzzz"
    # an explicit name still wins
    mine = Params.model_validate({"tracking": {"tracking_uri": store, "experiment": "names", "run_name": "mine"}})
    with tracking.start_run(mine) as run:
        pass
    assert tracking.find_run(run.info.run_id).info.run_name == "mine"


def test_failed_or_interrupted_block_marks_the_run(store):
    with pytest.raises(RuntimeError, match="boom"), tracking.start_run(make_params(store)) as run:
        raise RuntimeError("boom")
    assert tracking.find_run(run.info.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracking.start_run(make_params(store)) as run:
        raise KeyboardInterrupt
    assert tracking.find_run(run.info.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_resuming_an_unknown_run_is_an_error(store):
    missing = "0" * 32
    assert tracking.find_run(missing) is None
    with pytest.raises(FluxfillError, match=f"MLflow run {missing} does not exist at {store}"):
        with tracking.start_run(make_params(store), run_id=missing):
            pass


def test_log_image_writes_a_flat_readable_artifact(store):
    image = Image.new("RGB", (24, 8), (10, 20, 30))
    with tracking.start_run(make_params(store)) as run:
        assert tracking.log_image(image, "val/step 20") == "samples/val_step_20.png"
        assert tracking.log_image(image, "grid.png", folder="eval") == "eval/grid.png"
    client = mlflow.MlflowClient()
    assert [f.path for f in client.list_artifacts(run.info.run_id, "samples")] == ["samples/val_step_20.png"]
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="samples/val_step_20.png")
    back = Image.open(local)
    assert back.size == (24, 8) and back.getpixel((3, 3)) == (10, 20, 30)
    # the artifacts are local files next to the database
    assert run.info.artifact_uri.startswith((tracking.sqlite_path(store).parent / "mlartifacts").as_uri())

    with pytest.raises(RuntimeError, match="needs an active run"):
        tracking.log_image(image, "orphan")


def test_run_ref_round_trip(store, tmp_path):
    with tracking.start_run(make_params(store)) as run:
        pass
    models = tmp_path / "models"
    assert tracking.read_run_ref(models, tmp_path) is None  # no weights, no reference
    (models / "lora").mkdir(parents=True)
    (models / "lora" / "w.safetensors").write_bytes(b"weights")
    ref_file = tracking.write_run_ref(run, models, tmp_path)
    digest = tracking.models_digest(models)
    assert ref_file == tmp_path / ".fluxfill" / "runs" / f"{digest[:16]}.json"
    assert json.loads(ref_file.read_text()) == {
        "format": 1, "models": digest, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
        "tracking_uri": store,
    }
    assert tracking.read_run_ref(models, tmp_path)["run_id"] == run.info.run_id
    assert not list(models.rglob("*.json"))  # the weights folder (a DVC out) holds no run id
    (models / "lora" / "w.safetensors").write_bytes(b"other weights")  # e.g. restored from DVC's cache
    assert tracking.read_run_ref(models, tmp_path) is None
    (models / "lora" / "w.safetensors").write_bytes(b"weights")
    ref_file.write_text("{not json")
    with pytest.raises(FluxfillError, match=rf"^{ref_file}: not a readable MLflow run reference .*; delete it "
                                            rf"\(`rm {ref_file}`\): the run is then looked up in MLflow by the "
                                            "weights' DVC hash$"):
        tracking.read_run_ref(models, tmp_path)
    ref_file.write_text('{"run_id": "abc"}')  # the layout of an older version
    with pytest.raises(FluxfillError, match="an MLflow run reference from another version of fluxfill"):
        tracking.read_run_ref(models, tmp_path)


def test_summary_points_at_the_run_in_the_model_training_view(store, tmp_path, monkeypatch):
    from fluxfill.summary import summary_lines

    monkeypatch.chdir(tmp_path)
    params = make_params(store, train={"output": "models"})
    with tracking.start_run(params) as run:
        pass
    (tmp_path / "models" / "lora").mkdir(parents=True)
    (tmp_path / "models" / "lora" / "w.safetensors").write_bytes(b"weights")
    tracking.write_run_ref(run, tmp_path / "models", tmp_path)
    lines = summary_lines(params)
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"open it      mlflow ui --backend-store-uri {store} --host 127.0.0.1   # then {page}" in lines


def test_metric_buffer_sends_rows_in_batches(store, monkeypatch):
    """Rows wait in the buffer until ``every_s`` has passed or a flush; every step's value then reaches MLflow."""
    client, calls = mlflow.MlflowClient, []
    real = client.log_batch

    def spy(self, run_id, metrics=(), **kw):
        calls.append((len(metrics), kw.get("synchronous")))
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(client, "log_batch", spy)
    with tracking.start_run(make_params(store)) as run:
        calls.clear()  # start_run's own params and tags
        buffer = tracking.MetricBuffer(every_s=3600)
        for step in range(1, 6):
            buffer.add([{"step": step, "loss": 1.0 / step, "fusion_weight": None}])  # None: not logged
        assert calls == []  # nothing sent yet
        buffer.flush()
        assert calls == [(5, True)]
        buffer.flush()  # nothing pending: no call
        assert calls == [(5, True)]
        soon = tracking.MetricBuffer(every_s=0)
        soon.add([{"step": 6, "loss": 0.1}])  # due at once: sent in the background
        assert calls[-1] == (1, False)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 6)] + [(6, 0.1)]
