"""The MLflow Model Registry: a finished training run registers a pyfunc version that edits images; promote; serve."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import make_prepared
from mlflow.exceptions import MlflowException
from PIL import Image

from flows.pipeline import mlflow_run, summary_markdown
from fluxfill import Editor, registry
from fluxfill.cli import main
from fluxfill.config import ModelSpec, validate
from fluxfill.encode import encode
from fluxfill.train import train

PANEL = 64
NAME = "fluxfill-diptych"


def b64(img: Image.Image) -> str:
    return registry.encode_image(img)


def image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def rng_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A git repository with a dvc.lock, a 2-step tiny training run started "by a Prefect flow run": its version."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("repo")
    raw = {"data": {"panel_size": PANEL}, "model": {"max_sequence_length": 16},
           "encode": {"shard_size": 8}, "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0},
           "eval": {"num_inference_steps": 1, "seed": 3}, "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    lock = {"schema": "2.0", "stages": {"prepare": {"outs": [{"path": "data/prepared", "md5": "aaa111.dir"}]},
                                        "encode": {"outs": [{"path": "data/latents", "md5": "bbb222.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "params.yaml", "dvc.lock"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    cwd, env = Path.cwd(), os.environ.get("PREFECT__FLOW_RUN_ID")
    os.chdir(root)
    os.environ["PREFECT__FLOW_RUN_ID"] = "flow-run-1234"
    try:
        make_prepared(root / "data" / "prepared", 6, PANEL, val=2)
        params = validate(raw)
        encode(params, device="cpu")
        started = time.perf_counter()
        result = train(params)
        seconds = time.perf_counter() - started
    finally:
        os.chdir(cwd)
        if env is None:
            del os.environ["PREFECT__FLOW_RUN_ID"]
        else:
            os.environ["PREFECT__FLOW_RUN_ID"] = env
        AcceleratorState._reset_state(reset_partial_state=True)
    return {"root": root, "params": params, "run_id": result.run_id, "commit": commit, "uri": raw["tracking"]["tracking_uri"],
            "seconds": seconds}


@pytest.fixture
def repo(trained, monkeypatch):
    monkeypatch.chdir(trained["root"])
    mlflow.set_tracking_uri(trained["uri"])
    return trained


def test_finished_training_registers_a_tagged_version(repo):
    spec = ModelSpec.model_validate_json((repo["root"] / "models" / "fluxfill_model.json").read_text())
    assert (spec.model.preset, spec.panel_size, spec.fusion.mode, spec.lora.rank, spec.eval) == ("tiny", 64, "learned", 16, None)
    assert spec.prompt == repo["params"].data.prompt_template.format(instruction=repo["params"].data.task_instruction)
    client = mlflow.MlflowClient()
    [version] = client.search_model_versions(f"name = '{NAME}'")
    assert (str(version.version), version.run_id) == ("1", repo["run_id"])
    assert {k: version.tags.get(k) for k in ("git.commit", "git.dirty", "dvc.data.prepared", "dvc.data.latents",
                                             "prefect.flow_run_id", "fusion.mode", "preset", "fluxfill.version")} == {
        "git.commit": repo["commit"], "git.dirty": "false", "dvc.data.prepared": "aaa111.dir", "dvc.data.latents": "bbb222.dir",
        "prefect.flow_run_id": "flow-run-1234", "fusion.mode": "learned", "preset": "tiny", "fluxfill.version": "0.1.0"}
    assert version.description == f"tiny LoRA + fusion (learned) of run {repo['run_id']}"
    # the version carries everything to rebuild the pipeline, the run's eval settings included
    folder, description = registry.download_model(f"models:/{NAME}/1", repo["params"].tracking, repo["root"] / "dl")
    assert description == f"models:/{NAME}/1 (version 1, run {repo['run_id']})"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == [
        "fluxfill_model.json", "fusion.safetensors", "lora/pytorch_lora_weights.safetensors"]
    carried = ModelSpec.model_validate_json((folder / "fluxfill_model.json").read_text())
    assert carried.eval.num_inference_steps == 1 and carried.eval.seed == 3 and carried.model == spec.model
    assert (folder / "fusion.safetensors").read_bytes() == (repo["root"] / "models" / "fusion.safetensors").read_bytes()

    # the flow's MLflow task finds the version (the summary reports it) and tags it with the flow run
    ref = {"run_id": repo["run_id"], "tracking_uri": repo["uri"]}
    info = mlflow_run.fn(ref, {"prefect.flow_run_id": "flow-run-5678"}, NAME)
    assert info["model_versions"] == [{"name": NAME, "version": "1"}]
    assert client.get_model_version(NAME, "1").tags["prefect.flow_run_id"] == "flow-run-5678"
    md = summary_markdown([], {}, {}, {**info, "experiment_id": "1"}, [])
    assert f"**Model version**: `{NAME}` version 1 (`models:/{NAME}/1`;" in md


def test_registered_model_null_registers_nothing(repo, tmp_path):
    params = validate({"tracking": {"tracking_uri": repo["uri"], "registered_model": None}})
    with mlflow.start_run():
        assert registry.register_trained_model(params, tmp_path) is None
    assert not (tmp_path / "fluxfill_model.json").exists()  # training writes the spec with the weights
    registry.write_spec(params, tmp_path)
    assert ModelSpec.model_validate_json((tmp_path / "fluxfill_model.json").read_text()).panel_size == 128
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1


def test_promote_compare_and_edit_by_alias(repo, capsys):
    assert main(["promote", repo["run_id"], "--alias", "champion"]) == 0
    assert f"{NAME}@champion -> version 1 (new alias)" in capsys.readouterr().out
    assert main(["promote", "1", "--alias", "champion"]) == 0
    assert "-> version 1 (unchanged)" in capsys.readouterr().out
    v2 = mlflow.register_model(f"runs:/{repo['run_id']}/fluxfill", NAME)  # a second version of the same run
    assert main(["promote", str(v2.version), "--alias", "champion"]) == 0
    assert "-> version 2 (was version 1)" in capsys.readouterr().out
    assert main(["promote", "7", "--alias", "champion"]) == 1
    assert f"'{NAME}' has no version 7" in capsys.readouterr().err
    assert main(["promote", "0123abc", "--alias", "x"]) == 1
    assert "run 0123abc registered no version" in capsys.readouterr().err
    assert main(["promote", "1", "--alias", "bad alias!"]) == 1  # MLflow's own rule for alias names, on one line
    assert capsys.readouterr().err == ("fluxfill promote: error: --alias 'bad alias!': Invalid alias name: 'bad alias!'. "
                                       "Names may only contain alphanumerics, underscores (_), and dashes (-).\n")

    assert main(["compare", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype=str)
    row = table[table.run_id == repo["run_id"]].iloc[0]
    assert (row["version"], row["aliases"]) == ("1,2", "champion")

    rng_image(451, 300).save("in.png")
    rng_image(50, 40, seed=1).save("ref.jpg")
    for model in (f"models:/{NAME}@champion", f"runs:/{repo['run_id']}"):
        assert main(["edit", "--source", "in.png", "--reference", "ref.jpg", "--out", "O", "--overwrite",
                     "--model", model, "--device", "cpu", "--set", "eval.seed=8"]) == 0
        edited = Image.open("O/in.png")  # the version's own eval settings, not params.yaml's
        assert edited.size == (451, 300) and edited.text["steps"] == "1" and edited.text["seed"] == "3"
        assert edited.text["model"].startswith(model) and "version 2" in edited.text["model"]
    assert main(["edit", "--source", "in.png", "--reference", "ref.jpg", "--out", "O2",
                 "--model", f"models:/{NAME}@nobody"]) == 1
    assert f"--model models:/{NAME}@nobody: not found at {repo['uri']}" in capsys.readouterr().err
    assert main(["export", "--format", "comfyui", "--out", "c.safetensors", "--model", f"models:/{NAME}@champion"]) == 0
    assert Path("c.fusion.safetensors").exists()


def test_pyfunc_model_loads_from_the_registry_and_edits(repo):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1", model_config={"device": "cpu"})
    source, reference = rng_image(451, 300, seed=4), rng_image(40, 40, seed=5)
    out = model.predict(pd.DataFrame({"source": [b64(source), b64(source)], "reference": [b64(reference)] * 2}),
                        params={"seed": 9})
    assert list(out.columns) == ["image"] and len(out) == 2
    first, second = image(out["image"][0]), image(out["image"][1])
    assert first.size == second.size == (451, 300)
    editor = Editor.from_dir(repo["root"] / "models", device="cpu", eval_cfg=repo["params"].eval)
    assert np.array_equal(np.asarray(first), np.asarray(editor(source, reference, seed=9)))
    assert np.array_equal(np.asarray(second), np.asarray(editor(source, reference, seed=10)))  # row k: seed + k
    with pytest.raises(MlflowException, match="row 0, column 'source': not a base64-encoded image"):
        model.predict(pd.DataFrame({"source": ["bm90IGFuIGltYWdl"], "reference": [b64(reference)]}))
    with pytest.raises(MlflowException, match="row 0: this model mixes a reference .* pass a reference image"):
        model.predict(pd.DataFrame({"source": [b64(source)]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_edits_a_posted_image(repo, tmp_path):
    port = _free_port()
    bindir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": repo["uri"], "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    cmd = [str(bindir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    started = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("mlflow models serve did not answer /ping in 240 s:\n" + log.read_text()[-4000:])
        body = {"dataframe_records": [{"source": b64(rng_image(451, 300)), "reference": b64(rng_image(40, 40, seed=1))}],
                "params": {"seed": 2}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        edited = image(answer["predictions"][0]["image"])
        assert edited.size == (451, 300) and edited.mode == "RGB"
        bad = {"dataframe_records": [{"source": b64(rng_image(20, 20))}]}  # no reference for a fusion model
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(bad).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=120)
        assert err.value.code == 400 and "pass a reference image" in err.value.read().decode()
        print(f"mlflow models serve: up and answered in {time.perf_counter() - started:.1f} s")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # its own process group: uvicorn and its worker too
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
