"""`fluxfill sweep` and the sweep-diptych flow: real DVC experiments and real MLflow runs on the smallest config.

One repository copy for the module: `dvc repro` trains the default point (fusion.mode learned), then a sweep over
fusion.mode=none,fixed,learned trains two points and gets the third restored by DVC's run cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import _copy_repo
from test_flows import _artifacts, harness  # noqa: F401  (harness: the session's Prefect server)

from flows import workspace
from fluxfill import cli, tracking
from fluxfill.config import ConfigError
from fluxfill.sweep import parse_grid

# the smallest chain that still trains, validates and evaluates: 16-px panels, 2 steps, one val sample scored
SMALLEST = {"data.panel_size": 16, "model.max_sequence_length": 8, "encode.shard_size": 32, "train.max_steps": 2,
            "train.batch_size": 2, "train.checkpoint_every": 0, "train.val_every": 1, "eval.num_inference_steps": 1,
            "eval.max_samples": 1}
GIT = ["git", "-c", "user.name=fluxfill", "-c", "user.email=fluxfill@localhost", "-c", "commit.gpgsign=false"]


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the repo's own mlflow.db
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _run(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    repo = _copy_repo(tmp_path_factory.mktemp("sweep") / "repo")
    workspace.write_params(repo / "params.yaml", SMALLEST)
    subprocess.run(GIT + ["commit", "-qam", "smallest"], cwd=repo, check=True)
    repro = _run(repo, sys.executable, "-m", "dvc", "repro")
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    params_before = (repo / "params.yaml").read_bytes()
    sweep = _run(repo, "fluxfill", "sweep", "--grid", "fusion.mode=none,fixed,learned", "--name", "ablation")
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-5000:]
    assert (repo / "params.yaml").read_bytes() == params_before  # the points ran in DVC's temporary workspaces
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    return repo, sweep


def _parent(name: str):
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fluxfill").experiment_id],
                              f"attributes.run_name = '{name}' and tags.`fluxfill.sweep` = 'parent'")
    assert len(runs) == 1
    return runs[0]


def test_sweep_makes_one_parent_and_a_child_per_point_restored_included(swept):
    repo, sweep = swept
    client = mlflow.MlflowClient()
    parent = _parent("ablation")
    assert parent.info.status == "FINISHED" and json.loads(parent.data.params["sweep.grid"]) == {
        "fusion.mode": ["none", "fixed", "learned"]}
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"])
    assert [k.info.run_name for k in kids] == ["ablation-1", "ablation-2", "ablation-3"]
    assert [k.data.params["fusion.mode"] for k in kids] == ["none", "fixed", "learned"]
    assert all(k.info.status == "FINISHED" for k in kids)
    for k in kids:
        assert len(client.get_metric_history(k.info.run_id, "val_loss")) == 3  # steps 0, 1, 2
    none, fixed, learned = kids
    # learned is what `dvc repro` trained: DVC restored it, the child carries the producing run's metrics
    producer = tracking.read_run_ref(repo / "models", repo)["run_id"]
    assert learned.data.tags["fluxfill.restored_from"] == producer
    assert "fluxfill.restored_from" not in none.data.tags and "fluxfill.restored_from" not in fixed.data.tags
    for metric in ("val_loss", "fusion_weight", "fusion_cos", "loss", "psnr"):
        copied = [(m.step, m.value) for m in client.get_metric_history(learned.info.run_id, metric)]
        assert copied and copied == [(m.step, m.value) for m in client.get_metric_history(producer, metric)]
    assert client.get_metric_history(fixed.info.run_id, "fusion_weight")[-1].value == pytest.approx(0.1)  # frozen
    assert client.get_metric_history(none.info.run_id, "fusion_weight") == []
    assert "point 3: training restored" in sweep.stderr and "point 1: training ran" in sweep.stderr

    # the best child by final val_loss is tagged, on itself and on the parent
    finals = {k.info.run_id: k.data.metrics["val_loss"] for k in kids}
    best = min(finals, key=finals.get)
    assert client.get_run(best).data.tags["fluxfill.sweep.best"] == "true"
    assert sum(client.get_run(k).data.tags.get("fluxfill.sweep.best") == "true" for k in finals) == 1
    assert client.get_run(parent.info.run_id).data.tags["fluxfill.sweep.best_run"] == best

    # the parent holds the table (CSV, markdown) and one PNG of the curves
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="sweep"))
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "points.json", "table.csv", "table.md"]
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((folder / "table.csv").read_text())))
    assert [(r["run"], r["fusion.mode"]) for r in rows] == [("ablation-1", "none"), ("ablation-2", "fixed"),
                                                            ("ablation-3", "learned")]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([finals[k.info.run_id] for k in kids])
    assert rows[2]["restored_from"] == producer and rows[0]["restored_from"] == ""
    md = (folder / "table.md").read_text().splitlines()
    assert md[0].startswith("| run |") and "val_loss" in md[0] and len(md) == 2 + 3
    # the points are DVC experiments; the workspace is untouched (`dvc status` clean)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname:lstrip=-1)", "refs/exps"], cwd=repo,
                          capture_output=True, text=True).stdout.split()
    assert {"ablation-1", "ablation-2", "ablation-3"} <= set(refs)
    status = _run(repo, sys.executable, "-m", "dvc", "status")
    assert "up to date" in status.stdout, status.stdout


@pytest.fixture
def in_repo(swept, monkeypatch):
    """The CLI in-process, in the swept repository with its own MLflow database."""
    monkeypatch.chdir(swept[0])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return swept[0]


def test_a_points_weights_applied_to_the_workspace_find_their_training_run(swept, tmp_path):
    repo, _ = swept
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)  # its own mlflow.db: the same runs
    [point] = mlflow.MlflowClient().search_runs(
        [_parent("ablation").info.experiment_id], "attributes.run_name = 'ablation-1'")  # fusion.mode none
    shown = _run(copy, sys.executable, "-m", "dvc", "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    metrics = {exp["name"]: exp["data"]["metrics"] for rev in json.loads(shown.stdout)
               for exp in (e for branch in rev.get("experiments") or [] for e in branch["revs"])}
    assert "fusion_weight" not in metrics["ablation-1"]["metrics/train.json"]["data"]  # null: fusion mode none
    assert metrics["ablation-2"]["metrics/train.json"]["data"]["fusion_weight"] == pytest.approx(0.1)
    assert "psnr" in metrics["ablation-1"]["metrics/eval.json"]["data"]
    before = json.loads((copy / "metrics" / "train.json").read_text())
    applied = _run(copy, sys.executable, "-m", "dvc", "exp", "apply", "ablation-1")
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert "mode: none" in (copy / "params.yaml").read_text()
    after = json.loads((copy / "metrics" / "train.json").read_text())  # the point's metrics came with its weights
    assert before["fusion_weight"] is not None and after["fusion_weight"] is None
    assert {k: v for k, v in after.items() if v is not None} == metrics["ablation-1"]["metrics/train.json"]["data"]
    assert tracking.read_run_ref(copy / "models", copy) is None  # trained in DVC's temporary workspace
    summary = _run(copy, "fluxfill", "summary")
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert f"MLflow run   {point.info.run_id} (experiment 'fluxfill'" in summary.stdout


def test_compare_parent_prints_the_table(in_repo, capsys):
    parent = _parent("ablation").info.run_id
    assert cli.main(["compare", "--parent", parent, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["ablation-1", "ablation-2", "ablation-3"]
    assert all(float(r["val_loss"]) > 0 for r in rows) and "restored_from" in rows[0]
    assert cli.main(["compare", "--parent", "0" * 32]) == 1
    assert f"--parent {'0' * 32}: no such MLflow run" in capsys.readouterr().err


def test_a_taken_name_or_a_bad_grid_is_refused_before_anything_runs(in_repo, capsys):
    assert cli.main(["sweep", "--grid", "fusion.mode=none", "--name", "ablation"]) == 2
    assert "DVC experiment(s) ablation-1 exist already" in capsys.readouterr().err
    assert cli.main(["sweep", "--grid", "fusion.mode=none,pooled", "--name", "other"]) == 2
    assert "'pooled' was renamed 'learned'" in capsys.readouterr().err
    assert len(mlflow.MlflowClient().search_runs(
        [_parent("ablation").info.experiment_id], "attributes.run_name = 'other'")) == 0


def test_parse_grid():
    assert parse_grid(["fusion.mode=none,fixed", "train.max_steps=2,4"]) == {
        "fusion.mode": ["none", "fixed"], "train.max_steps": [2, 4]}
    for bad, why in ((["fusion.mode=none", "fusion.mode=fixed"], "given twice"), (["fusion.mode=none,"], "no empty"),
                     ([], "no --grid given"), (["mode=none"], "must name a section and a key")):
        with pytest.raises(ConfigError, match=why):
            parse_grid(bad)


def test_sweep_diptych_flow_runs_a_sub_flow_per_point_and_publishes_the_table(in_repo, harness, monkeypatch):  # noqa: F811
    from flows.pipeline import sweep_diptych

    monkeypatch.setenv("PYTHONPATH", str(in_repo))
    state = sweep_diptych(grid={"fusion.mode": ["none"]}, name="flow", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    ablation_none = mlflow.MlflowClient().search_runs(
        [_parent("ablation").info.experiment_id], "attributes.run_name = 'ablation-1'")[0].info.run_id
    assert [(p["exp_name"], p["status"], p["restored_from"]) for p in result["points"]] == [
        ("flow-1", "restored", ablation_none)]  # the same point as ablation-1: DVC restores it
    assert result["parent_run_id"] == _parent("flow").info.run_id
    arts = _artifacts(state.state_details.flow_run_id)
    rows = arts["sweep-table"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [(r["run"], r["fusion.mode"] if "fusion.mode" in r else "none") for r in rows] == [("flow-1", "none")]
    assert "| flow-1 |" in arts["sweep-summary"].data

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert [r.name for r in subs] == ["flow-1"]
