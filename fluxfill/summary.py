"""Print where to look after a run: the MLflow run and how to open it, the metrics, the sample grids.

Reads what the stages left in the workspace (the reference to the MLflow run that trained the weights in
train.output, metrics/*.json, eval/samples/); without a reference, it looks the run up in MLflow by the
weights' DVC hash. It changes nothing. `make run` ends with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.exceptions import MlflowException

from .artifacts import EVAL_METRICS, EVAL_SAMPLES, TRAIN_METRICS, damaged, first_line
from .config import FluxfillError, Params
from .tracking import read_run_ref, run_by_outputs, sqlite_path, ui_url


def read_metrics(path: Path, stage: str) -> dict:
    """A stage's metrics file as a dict, {} when it does not exist; a damaged one is refused (one line)."""
    if not path.exists():
        return {}
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise damaged(path, f"not a metrics file ({e})", stage) from None
    if not isinstance(values, dict):
        raise damaged(path, "not a metrics file (a JSON object is expected)", stage)
    return values


def summary_lines(params: Params) -> list[str]:
    lines = []
    ref = read_run_ref(params.train.output)
    if ref is None:
        try:
            ref = run_by_outputs(params.train.output, params.tracking)
        except (FluxfillError, MlflowException) as e:  # the files below still tell
            lines.append(f"MLflow not searched for the run of these weights: {first_line(e)}")
    db = ref and sqlite_path(ref["tracking_uri"])
    if db and not db.exists():
        lines.append(f"MLflow run   {ref['run_id']} trained these weights, but its database {db} is gone: "
                     "`dvc repro --force train` trains them again in a new run")
    elif ref:
        uri = ref["tracking_uri"]
        page = ui_url("http://127.0.0.1:5000" if db else uri, ref["experiment_id"], ref["run_id"])
        ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1   # then {page}" if db else page
        experiment = ref.get("experiment_name", params.tracking.experiment)
        lines += [f"MLflow run   {ref['run_id']} (experiment {experiment!r} at {uri})",
                  f"open it      {ui}",
                  "compare      fluxfill compare    (or select runs in the MLflow UI -> Compare)"]
    elif not lines:
        lines.append(f"no MLflow run known for the weights in {params.train.output}/ (none trained yet, or trained "
                     "with another tracking URI): run `dvc repro` (or `make run`)")
    train, evals = read_metrics(Path(TRAIN_METRICS), "train"), read_metrics(Path(EVAL_METRICS), "evaluate")
    if train or evals:
        lines.append("metrics      (dvc metrics show)")
        for name, value in {**train, **evals}.items():
            text = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            lines.append(f"  {name:<16} {text}")
    grids = sorted(Path(params.eval.output, EVAL_SAMPLES).glob("*.png"))
    if grids:
        lines.append(f"sample grids ({len(grids)}; rows: reference | source | generated | target)")
        lines += [f"  {g}" for g in grids]
    return lines


def add_arguments(parser) -> None:
    pass


def run(params: Params, args) -> int:
    print("\n".join(summary_lines(params)))
    return 0
