"""Compare MLflow runs side by side: one row per run, newest first.

Each row shows the run's name, start time (local), status, the params that DIFFER between the
listed runs (params all runs share are left out), the final `loss`, `val_loss` and `fusion_weight`
(blank when a run did not log it, e.g. fusion_weight with fusion.mode none), the evaluation metrics
when present (psnr, ssim, identity_*, base_*), the version of tracking.registered_model the run
registered and that version's aliases (when some listed run has one; `fluxfill promote` sets aliases),
and the run id.

With --parent RUN_ID (a `fluxfill sweep` parent run): its child runs, one per point in the sweep's
order, with a restored_from column (the run whose outputs DVC restored for that point, else blank).

examples:
  fluxfill compare                                     # last 10 runs of tracking.experiment
  fluxfill compare --last 3 --format markdown
  fluxfill compare --filter "params.`fusion.mode` = 'none'"
  fluxfill compare --filter "metrics.loss < 0.5 and attributes.status = 'FINISHED'"
  fluxfill compare --format csv > runs.csv             # exact values, full run ids
  fluxfill compare --parent 3f2a... --format csv       # the points of a sweep

--filter takes an MLflow search expression over params.`key`, metrics.name, tags.`key` and
attributes (status, run_name, start_time); put backticks around keys that contain dots.
table and markdown round numbers to 4 significant digits and shorten run ids; csv keeps them exact.
Notes (which store, how many runs) go to stderr, the table to stdout.

exit status: 0 with a table; 1 when the experiment has no run (or none matches --filter), or the
--parent run does not exist or has no child.

The same runs in the MLflow UI (default local store):
  mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1
then open http://127.0.0.1:5000, pick the experiment, tick the runs and press "Compare".
With a tracking server (MLFLOW_TRACKING_URI), open the server's address instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from . import registry, tracking
from .config import FluxfillError, Params, TrackingConfig

TRAIN_METRICS = ("loss", "val_loss", "fusion_weight")
EVAL_METRICS = ("psnr", "ssim", "identity_psnr", "identity_ssim", "base_psnr", "base_ssim")
REGISTRY_COLUMNS = ("version", "aliases")
FIXED_COLUMNS = ("run", "started", "status", *TRAIN_METRICS, *EVAL_METRICS, *REGISTRY_COLUMNS, "restored_from",
                 "run_id")
NOT_COMPARED = {"params.tracking.run_name"}  # the run column already shows it
FORMATS = ("table", "csv", "markdown")


def compare_runs(cfg: TrackingConfig, last: int = 10, filter_string: str = "", parent: str | None = None) -> pd.DataFrame:
    """The last ``last`` runs of ``cfg.experiment`` matching ``filter_string``, newest first; with ``parent``,
    every child run of that run, oldest first (a sweep's points in order).

    Columns: run, started, status, one per differing param (``fusion.mode``), loss, val_loss, fusion_weight,
    the eval metrics some run logged, version and aliases (when some run registered a version of
    ``cfg.registered_model``; several versions of one run are joined by ``,``), restored_from (with
    ``parent``), run_id. Metric values are the last logged (highest step).
    Raises FluxfillError when there is no run to show; creates nothing in the store.
    """
    uri = tracking.tracking_uri(cfg)
    db = tracking.sqlite_path(uri)
    hint = "run `dvc repro` or `fluxfill train` first"
    if db is not None and not db.exists():
        raise FluxfillError(f"no runs in experiment {cfg.experiment!r}: there is no MLflow database {db}; {hint}")
    tracking.connect(cfg)
    found = _children(uri, parent, filter_string) if parent else _latest(cfg, uri, last, filter_string, hint)
    params = found[[c for c in found.columns if c.startswith("params.") and c not in NOT_COMPARED]].fillna("")
    differing = sorted(c for c in params.columns if params[c].nunique() > 1)
    table = pd.DataFrame({
        "run": found.get("tags.mlflow.runName", pd.Series("", index=found.index)).fillna(""),
        "started": [datetime.fromtimestamp(t.timestamp()).strftime("%Y-%m-%d %H:%M") for t in found["start_time"]],
        "status": found["status"],
    })
    for c in differing:
        table[c.removeprefix("params.")] = params[c]
    for m in TRAIN_METRICS:
        table[m] = found.get(f"metrics.{m}", math.nan)
    for m in EVAL_METRICS:
        if f"metrics.{m}" in found:
            table[m] = found[f"metrics.{m}"]
    if parent:
        restored = found.get(f"tags.{tracking.RESTORED_TAG}", pd.Series("", index=found.index))
        table["restored_from"] = restored.fillna("")
    versions = registry.versions_by_run(cfg)
    if any(r in versions for r in found["run_id"]):
        table["version"] = [",".join(v for v, _ in versions.get(r, [])) for r in found["run_id"]]
        table["aliases"] = [",".join(a for _, aliases in versions.get(r, []) for a in aliases) for r in found["run_id"]]
    table["run_id"] = found["run_id"]
    return table.reset_index(drop=True)


def _search(experiment_ids: list[str], filter_string: str, **kwargs) -> pd.DataFrame:
    try:
        return mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, **kwargs)
    except MlflowException as e:
        raise FluxfillError(f"--filter {filter_string!r} is not a valid MLflow search expression: {e.message}") from None


def _latest(cfg: TrackingConfig, uri: str, last: int, filter_string: str, hint: str) -> pd.DataFrame:
    exp = mlflow.MlflowClient().get_experiment_by_name(cfg.experiment)
    if exp is None:
        raise FluxfillError(f"no runs in experiment {cfg.experiment!r} at {uri} (no such experiment); {hint}")
    found = _search([exp.experiment_id], filter_string or "", max_results=last, order_by=["attributes.start_time DESC"])
    if found.empty:
        where = f"no runs in experiment {cfg.experiment!r} at {uri}"
        raise FluxfillError(f"{where} match --filter {filter_string!r}" if filter_string else f"{where}; {hint}")
    return found


def _children(uri: str, parent: str, filter_string: str) -> pd.DataFrame:
    run = tracking.find_run(parent)
    if run is None:
        raise FluxfillError(f"--parent {parent}: no such MLflow run at {uri}; `fluxfill sweep` prints its parent run id")
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'" + (f" and {filter_string}" if filter_string else "")
    found = _search([run.info.experiment_id], query, max_results=5000, order_by=["attributes.start_time ASC"])
    if found.empty:
        raise FluxfillError(f"--parent {parent} ({run.info.run_name}) has no child runs"
                            + (f" matching --filter {filter_string!r}" if filter_string else ""))
    return found


def param_columns(table: pd.DataFrame) -> list[str]:
    """The differing params shown in a :func:`compare_runs` table."""
    return [c for c in table.columns if c not in FIXED_COLUMNS]


def _human(table: pd.DataFrame) -> pd.DataFrame:
    out = table.astype(object)
    for c in out.columns:
        if pd.api.types.is_float_dtype(table[c]):
            out[c] = ["" if pd.isna(v) else f"{v:.4g}" for v in table[c]]
    out["run_id"] = table["run_id"].str[:8]
    return out.fillna("")


def _markdown(table: pd.DataFrame) -> str:
    def row(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(table.columns), row("---" for _ in table.columns)]
    lines += [row(r) for r in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def format_runs(table: pd.DataFrame, fmt: str = "table") -> str:
    """Render a :func:`compare_runs` table as ``table`` (aligned text), ``markdown`` or ``csv`` (exact)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return _markdown(_human(table))
    if fmt == "table":
        return _human(table).to_string(index=False) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    parser.add_argument("--last", type=_positive_int, default=10, metavar="N", help="show the N newest runs (default 10)")
    parser.add_argument("--filter", default="", metavar="EXPR", help="MLflow search expression, e.g. \"metrics.loss < 0.5\"")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--parent", default=None, metavar="RUN_ID",
                        help="the child runs of this run (a `fluxfill sweep` parent), in the sweep's order")


def run(params: Params, args: argparse.Namespace) -> int:
    cfg = params.tracking
    if args.experiment:
        cfg = cfg.model_copy(update={"experiment": args.experiment})
    table = compare_runs(cfg, args.last, args.filter, parent=args.parent)
    what = f"children of run {args.parent}, in order" if args.parent else f"experiment {cfg.experiment!r}"
    order = "" if args.parent else ", newest first"
    print(f"{what} at {tracking.tracking_uri(cfg)}: {len(table)} run(s){order}", file=sys.stderr)
    if len(table) > 1 and not param_columns(table):
        print(f"all {len(table)} runs have the same params", file=sys.stderr)
    sys.stdout.write(format_runs(table, args.format))
    return 0
