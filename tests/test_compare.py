"""`fluxfill compare` over runs logged by the test into a throw-away sqlite store."""

from __future__ import annotations

import io
import math
import re

import mlflow
import pandas as pd
import pytest

from fluxfill import cli, tracking
from fluxfill.compare import compare_runs, format_runs, param_columns
from fluxfill.config import Params, TrackingConfig

# name, settings, loss history, fusion_weight history (None: not logged), eval metrics; oldest first
RUNS = [
    ("base", {"fusion": {"mode": "none"}}, [1.0, 0.8, 0.6], None, {"psnr": 20.5, "ssim": 0.75}),
    ("fused", {}, [0.9, 0.5, 0.4], [0.1, 0.3, 0.6211], {}),
    ("fused-lr", {"train": {"learning_rate": 5e-4}}, [0.7, 0.45, 0.35], [0.1, 0.2, 0.55], {"psnr": 22.25, "ssim": 0.8125}),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Three runs in experiment "cmp" and two runs with identical params in experiment "same"."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    for name, settings, losses, weights, evals in RUNS:
        params = Params.model_validate({**settings, "tracking": {"tracking_uri": uri, "experiment": "cmp"}})
        with tracking.start_run(params, run_name=name):
            for step, loss in enumerate(losses):
                mlflow.log_metric("loss", loss, step=step)
                if weights:
                    mlflow.log_metric("fusion_weight", weights[step], step=step)
            mlflow.log_metric("val_loss", losses[-1] + 0.05, step=len(losses))
            if evals:
                mlflow.log_metrics(evals, step=len(losses))
    for name in ("again-1", "again-2"):
        params = Params.model_validate({"tracking": {"tracking_uri": uri, "experiment": "same"}})
        with tracking.start_run(params, run_name=name):
            mlflow.log_metric("loss", 0.25)
    return uri


@pytest.fixture
def env(store, tmp_path, monkeypatch):
    """The CLI in an empty folder (default params) with MLFLOW_TRACKING_URI pointing at the store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


def compare(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["compare", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_one_row_per_run_with_only_differing_params(store):
    table = compare_runs(TrackingConfig(tracking_uri=store, experiment="cmp"))
    assert table["run"].tolist() == ["fused-lr", "fused", "base"]  # newest first
    assert param_columns(table) == ["fusion.mode", "train.learning_rate"]
    assert table["fusion.mode"].tolist() == ["learned", "learned", "none"]
    assert table["train.learning_rate"].tolist() == ["0.0005", "0.002", "0.002"]
    assert table["loss"].tolist() == [0.35, 0.4, 0.6]  # the value at the last step
    assert table["val_loss"].tolist() == pytest.approx([0.4, 0.45, 0.65])
    assert table["fusion_weight"].tolist()[:2] == [0.55, 0.6211] and math.isnan(table["fusion_weight"][2])
    assert list(table.columns) == [
        "run", "started", "status", "fusion.mode", "train.learning_rate", "loss", "val_loss", "fusion_weight",
        "psnr", "ssim", "run_id",
    ]
    assert (table["status"] == "FINISHED").all()
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", s) for s in table["started"])


def test_csv_reads_back_exactly(env, capsys):
    rc, out, err = compare(capsys, "--experiment", "cmp", "--format", "csv")
    assert rc == 0
    assert f"experiment 'cmp' at {env}: 3 run(s), newest first" in err
    df = pd.read_csv(io.StringIO(out))
    assert df["run"].tolist() == ["fused-lr", "fused", "base"]
    assert df["train.learning_rate"].tolist() == [0.0005, 0.002, 0.002]
    assert df["fusion_weight"].tolist()[:2] == [0.55, 0.6211] and math.isnan(df["fusion_weight"][2])
    assert df["psnr"].tolist()[0] == 22.25 and math.isnan(df["psnr"][1]) and df["psnr"][2] == 20.5
    assert df["ssim"].tolist()[0] == 0.8125
    ids = {r.info.run_name: r.info.run_id for r in mlflow.search_runs(experiment_names=["cmp"], output_format="list")}
    assert df["run_id"].tolist() == [ids["fused-lr"], ids["fused"], ids["base"]]


def test_markdown_and_table_are_rounded_and_blank_when_missing(env, capsys):
    rc, out, _ = compare(capsys, "--experiment", "cmp", "--format", "markdown")
    assert rc == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    header, rule, body = rows[0], rows[1], rows[2:]
    assert header == ["run", "started", "status", "fusion.mode", "train.learning_rate", "loss", "val_loss",
                      "fusion_weight", "psnr", "ssim", "run_id"]
    assert set(rule) == {"---"}
    assert [dict(zip(header, r, strict=True))["fusion_weight"] for r in body] == ["0.55", "0.6211", ""]
    assert [dict(zip(header, r, strict=True))["psnr"] for r in body] == ["22.25", "", "20.5"]
    assert all(len(dict(zip(header, r, strict=True))["run_id"]) == 8 for r in body)

    rc, out, _ = compare(capsys, "--experiment", "cmp")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 4
    assert lines[0].split() == header
    assert lines[1].split()[0] == "fused-lr" and "train.max_steps" not in out


def test_last_and_filter(env, capsys):
    def names(*argv):
        rc, out, _ = compare(capsys, "--experiment", "cmp", "--format", "csv", *argv)
        assert rc == 0
        return pd.read_csv(io.StringIO(out))["run"].tolist()

    assert names("--last", "2") == ["fused-lr", "fused"]
    assert names("--filter", "params.`fusion.mode` = 'none'") == ["base"]
    assert names("--filter", "metrics.loss < 0.5") == ["fused-lr", "fused"]
    assert names("--filter", "metrics.loss < 0.5", "--last", "1") == ["fused-lr"]
    assert names("--filter", "metrics.psnr > 21 and attributes.status = 'FINISHED'") == ["fused-lr"]


def test_identical_params_are_reported(env, capsys):
    rc, out, err = compare(capsys, "--experiment", "same", "--format", "csv")
    assert rc == 0
    assert "all 2 runs have the same params" in err
    assert pd.read_csv(io.StringIO(out)).columns.tolist() == ["run", "started", "status", "loss", "val_loss",
                                                                   "fusion_weight", "run_id"]


def test_experiment_defaults_to_params(env, capsys, tmp_path):
    (tmp_path / "params.yaml").write_text("tracking:\n  experiment: same\n")
    rc, out, _ = compare(capsys, "--format", "csv")
    assert rc == 0 and pd.read_csv(io.StringIO(out))["run"].tolist() == ["again-2", "again-1"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--experiment", "nope"], "no runs in experiment 'nope' at {uri} (no such experiment); run `dvc repro` or "
                               "`fluxfill train` first"),
    (["--experiment", "cmp", "--filter", "metrics.loss < 0"], "no runs in experiment 'cmp' at {uri} match --filter "
                                                             "'metrics.loss < 0'"),
    (["--experiment", "cmp", "--filter", "loss <"], "--filter 'loss <' is not a valid MLflow search expression: "),
])
def test_no_runs_exit_1_with_a_message(env, capsys, argv, message):
    rc, out, err = compare(capsys, *argv)
    assert (rc, out) == (1, "")
    assert err.startswith(f"fluxfill compare: error: {message.format(uri=env)}")


def test_missing_database_is_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    rc, out, err = compare(capsys)
    assert (rc, out) == (1, "")
    assert f"there is no MLflow database {tmp_path}/mlflow.db; run `dvc repro`" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_last_must_be_positive(env, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--last", "0"])
    assert exit_.value.code == 2
    assert "must be at least 1 (got 0)" in capsys.readouterr().err


def test_format_rejects_unknown():
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        format_runs(pd.DataFrame({"run_id": []}), "xml")

