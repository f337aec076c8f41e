"""Run a grid of settings as DVC experiments, one MLflow child run per point under one parent run.

  fluxfill sweep --grid fusion.mode=none,fixed,learned --set data.demo_task=tint --name ablation
  fluxfill sweep --grid fusion.mode=fixed,learned --grid fusion.init=0.1,0.5     # 4 points
  fluxfill compare --parent <parent run id>                                      # the table again

--grid KEY=V1,V2,... gives one key's values (YAML, split at commas); the points are the cartesian product
of all --grid options, in order. --set KEY=VALUE applies to every point. Every point is validated before
anything runs.

Each point runs as `dvc exp run --temp -n NAME-<i> -S KEY=VALUE ...`, one after the other, in DVC's own
temporary workspace: the workspace (params.yaml, models/, metrics/) is left as it was, and each point is
kept as DVC experiment NAME-<i> (`dvc exp show`, `dvc exp apply NAME-<i>`). DVC's run cache restores what
a point shares with an earlier run (prepare and encode after the first point; every stage of a point that
ran before) instead of running it again. Tracked files are taken as they are in the workspace; untracked
source files are not seen by the experiments (`git add` them).

MLflow (tracking.experiment): a parent run NAME; each point's training run is its child (mlflow.parentRunId).
A point whose training DVC restored logs no run of its own: the sweep adds a child tagged
fluxfill.restored_from=<the run that produced those outputs>, carrying that run's metrics. The parent holds
sweep/table.csv and sweep/table.md (the params that differ, val_loss, loss, fusion_weight, eval metrics) and
sweep/curves.png (val_loss and α of every child); the child with the lowest final val_loss is tagged
fluxfill.sweep.best=true.

exit status: 0 when every point ran or was restored; 1 when a point failed (the parent run ends FAILED);
2 for an invalid setting or grid, or a --name whose experiments exist already (nothing runs).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from . import tracking
from .compare import compare_runs, format_runs
from .config import PARAMS_FILE, ConfigError, FluxfillError, Params, load_params, parse_override, repo_root

log = logging.getLogger(__name__)
BEST_TAG, POINT_TAG = "fluxfill.sweep.best", "fluxfill.sweep.point"
TAIL_LINES = 30


@dataclass
class Point:
    index: int                  # 1-based, the order of the cartesian product
    values: dict[str, Any]      # the grid's value of each key
    exp_name: str               # DVC experiment name, also the MLflow run name

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_inline(v)}" for k, v in self.values.items())

    def overrides(self, sets: list[str]) -> list[str]:
        """Everything this point sets on top of params.yaml: the shared ``sets``, its values, its run name."""
        return [*sets, *(f"{k}={_inline(v)}" for k, v in self.values.items()), f"tracking.run_name={self.exp_name}"]


@dataclass
class PointResult:
    index: int
    exp_name: str
    label: str
    status: str                 # ran | restored: what happened to the train stage
    run_id: str                 # the child run
    restored_from: str | None   # the producing run of a restored point
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inline(value: Any) -> str:
    """``value`` as one line of YAML, the form ``-S`` and ``--set`` read back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n").removesuffix("\n...")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["fusion.mode=none,fixed"]`` -> ``{"fusion.mode": ["none", "fixed"]}``; each value read as YAML."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        path, _ = parse_override(item.partition("=")[0] + "=")  # checks the key's form
        key = ".".join(path)
        if key in grid:
            raise ConfigError(f"--grid {item!r}: {key} is given twice; list all its values in one --grid")
        values = [parse_override(f"{key}={v}")[1] for v in item.partition("=")[2].split(",")]
        if not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: expected {key}=V1,V2,... with no empty value")
        grid[key] = values
    if not grid:
        raise ConfigError("no --grid given: name at least one KEY=V1,V2 (e.g. --grid fusion.mode=none,learned)")
    return grid


def plan(root: Path, grid: dict[str, list[Any]], sets: list[str], name: str) -> list[Point]:
    """The cartesian product of ``grid``, each point validated on top of params.yaml and ``sets``."""
    keys = list(grid)
    points = []
    for i, combo in enumerate(itertools.product(*grid.values()), start=1):
        raw = dict(zip(keys, combo, strict=True))
        params = load_params(root / PARAMS_FILE, [*sets, *(f"{k}={_inline(v)}" for k, v in raw.items())])
        flat = params.flat()  # the validated value: "1e-3" read as YAML is a string, the param a float
        points.append(Point(i, {k: flat.get(k, v) for k, v in raw.items()}, f"{name}-{i}"))
    return points


def default_name() -> str:
    return datetime.now().strftime("sweep-%Y%m%d-%H%M%S")


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- git / DVC
def _git(root: Path, *args: str) -> str | None:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _exp_ref(baseline: str, exp_name: str) -> str:
    from dvc.repo.experiments.refs import ExpRefInfo

    return str(ExpRefInfo(baseline, exp_name))


def check_names(root: Path, points: list[Point]) -> str:
    """The baseline commit; refuses experiment names that exist already (nothing is overwritten)."""
    baseline = _git(root, "rev-parse", "HEAD")
    if baseline is None:
        raise FluxfillError(f"{root}: fluxfill sweep runs DVC experiments, which need a git repository with a "
                            "commit (git init && git add -A && git commit)")
    taken = [p.exp_name for p in points if _git(root, "rev-parse", "--verify", "-q", _exp_ref(baseline, p.exp_name))]
    if taken:
        raise ConfigError(f"DVC experiment(s) {', '.join(taken)} exist already: choose another --name, or remove "
                          f"them with `dvc exp remove {' '.join(taken)}`")
    return baseline


def _env(point: Point, parent_id: str) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # DVC runs each stage's `fluxfill <stage>` through the shell
    env["PATH"] = os.pathsep.join([bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir)])
    env.update({tracking.PARENT_RUN_ENV: parent_id, tracking.SWEEP_POINT_ENV: json.dumps(point.values, sort_keys=True),
                "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"})
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


def run_experiment(root: Path, point: Point, sets: list[str], parent_id: str, emit: Callable[[str], None]) -> str:
    """``dvc exp run --temp`` for one point, its output passed line by line to ``emit``; ``ran`` or ``restored``."""
    overrides = point.overrides(sets)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", point.exp_name]
    cmd += [a for o in overrides for a in ("-S", o)]
    emit(f"$ dvc exp run --temp -n {point.exp_name} " + " ".join(f"-S '{o}'" for o in overrides))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    status = "restored"
    with subprocess.Popen(cmd, cwd=root, env=_env(point, parent_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                emit(line)
                status = "ran" if line.startswith("Running stage 'train'") else status
    if proc.returncode != 0:
        raise FluxfillError(f"point {point.index} ({point.label}) failed: `dvc exp run` exited with "
                            f"{proc.returncode}. Last lines:\n" + "\n".join(tail))
    return status


def _outputs_md5(root: Path, ref: str, output: str) -> str:
    """The hash ``dvc.lock`` of experiment ``ref`` records for the train output ``output``."""
    text = _git(root, "show", f"{ref}:dvc.lock")
    outs = ((yaml.safe_load(text or "") or {}).get("stages") or {}).get("train", {}).get("outs") or []
    md5 = next((o.get("md5") for o in outs if os.path.normpath(o.get("path", "")) == os.path.normpath(output)), None)
    if md5 is None:
        raise FluxfillError(f"experiment {ref}: its dvc.lock records no {output} for stage train")
    return md5


# ---------------------------------------------------------------------------------------------------- MLflow
def start_parent(params: Params, name: str, grid: dict[str, list[Any]], sets: list[str]) -> str:
    """Create the parent run ``name`` (RUNNING) with the grid and the shared settings as params."""
    import mlflow

    experiment_id = tracking.setup(params.tracking)
    tags = {**tracking.run_tags(params), "fluxfill.sweep": "parent", "mlflow.runName": name}
    tags.pop(tracking.MLFLOW_PARENT_RUN_ID, None)  # a sweep started inside another sweep is not its child
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=tags)
    mlflow.MlflowClient().log_batch(run.info.run_id, params=[
        mlflow.entities.Param("sweep.grid", json.dumps(grid)), mlflow.entities.Param("sweep.set", json.dumps(sets))])
    return run.info.run_id


def children(parent_id: str):
    """The child runs of ``parent_id``, oldest first (the points' order)."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`{tracking.MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5000)


def record_point(root: Path, sets: list[str], parent_id: str, point: Point, baseline: str, status: str,
                 seconds: float) -> PointResult:
    """Find the point's child run; for a restored point create it, carrying the producing run's metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    params = load_params(root / PARAMS_FILE, point.overrides(sets))
    md5 = _outputs_md5(root, _exp_ref(baseline, point.exp_name), params.train.output)
    own = [r for r in children(parent_id) if r.info.run_name == point.exp_name]
    if status == "ran" and own:
        return PointResult(point.index, point.exp_name, point.label, status, own[0].info.run_id, None, seconds)
    producers = tracking.producers(md5)
    if not producers:
        raise FluxfillError(f"point {point.index} ({point.label}): no MLflow run at {mlflow.get_tracking_uri()} "
                            f"wrote its models ({md5}); was it trained with another tracking URI?")
    producer = producers[0]
    tags = {tracking.MLFLOW_PARENT_RUN_ID: parent_id, tracking.RESTORED_TAG: producer.info.run_id,
            POINT_TAG: json.dumps(point.values, sort_keys=True), tracking.OUTPUTS_TAG: md5}
    tags.update({k: v for k, v in producer.data.tags.items() if k.startswith(("git.", "dvc.", "preset", "device"))})
    child = client.create_run(producer.info.experiment_id, run_name=point.exp_name, tags=tags)
    values = {**producer.data.params, **params.flat()}  # this point's settings, and what only the producer logged
    metrics = [m for key in producer.data.metrics for m in client.get_metric_history(producer.info.run_id, key)]
    client.log_batch(child.info.run_id, metrics=metrics, params=[
        mlflow.entities.Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in sorted(values.items())])
    client.set_terminated(child.info.run_id, "FINISHED")
    return PointResult(point.index, point.exp_name, point.label, "restored", child.info.run_id,
                       producer.info.run_id, seconds)


def finish(params: Params, parent_id: str, results: list[PointResult]):
    """The parent's table (CSV, markdown), curves PNG and best-child tag; ends it FINISHED. Returns the table."""
    import mlflow

    client = mlflow.MlflowClient()
    table = compare_runs(params.tracking, parent=parent_id)
    scored = table.dropna(subset=["val_loss"]) if "val_loss" in table else table.iloc[:0]
    if not scored.empty:
        best = scored.loc[scored["val_loss"].idxmin()]
        client.set_tag(best["run_id"], BEST_TAG, "true")
        client.set_tag(parent_id, "fluxfill.sweep.best_run", best["run_id"])
        client.set_tag(parent_id, "fluxfill.sweep.best_point", best["run"])
        client.log_metric(parent_id, "best_val_loss", float(best["val_loss"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "table.csv").write_text(format_runs(table, "csv"))
        (folder / "table.md").write_text(format_runs(table, "markdown"))
        curves_png([(r.exp_name + ": " + r.label, r.run_id) for r in results], folder / "curves.png")
        (folder / "points.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        client.log_artifacts(parent_id, str(folder), "sweep")
    client.set_terminated(parent_id, "FINISHED")
    return table


def curves_png(runs: list[tuple[str, str]], path: Path) -> None:
    """One PNG, two panels: val_loss and α (fusion_weight) against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(axes, ("val_loss", "fusion_weight"), ("val_loss (held out)", "fusion weight α"),
                                 strict=True):
        for i, (label, run_id) in enumerate(runs):  # one colour per run in both panels
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
            if history:
                ax.plot(*zip(*history, strict=True), marker="o", markersize=3, label=label, color=f"C{i % 10}")
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_point(root: Path, sets: list[str], parent_id: str, point: Point, baseline: str,
              emit: Callable[[str], None] = _note) -> PointResult:
    """One point: its DVC experiment, then its MLflow child run."""
    start = time.monotonic()
    status = run_experiment(root, point, sets, parent_id, emit)
    return record_point(root, sets, parent_id, point, baseline, status, round(time.monotonic() - start, 1))


def sweep(root: Path, grid: dict[str, list[Any]], sets: list[str], name: str, emit: Callable[[str], None] = _note,
          point_runner: Callable[..., PointResult] = run_point) -> tuple[str, Any, list[PointResult]]:
    """Plan, run every point (``point_runner``, e.g. a Prefect sub-flow), finish the parent: ``(parent id, table, results)``."""
    import mlflow

    points = plan(root, grid, sets, name)
    baseline = check_names(root, points)
    params = load_params(root / PARAMS_FILE, sets)
    parent_id = start_parent(params, name, grid, sets)
    emit(f"sweep {name}: {len(points)} point(s), MLflow parent run {parent_id}")
    results = []
    try:
        for point in points:
            emit(f"--- point {point.index}/{len(points)}: {point.exp_name}  {point.label}")
            results.append(point_runner(root, sets, parent_id, point, baseline, emit))
            emit(f"point {point.index}: training {results[-1].status}, MLflow run {results[-1].run_id}")
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        mlflow.MlflowClient().set_terminated(parent_id, status)
        raise
    return parent_id, finish(params, parent_id, results), results


# ------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="one key's values (repeatable: the points are the cartesian product)")
    parser.add_argument("--name", default=None, help="the parent run's name and the experiments' prefix "
                                                     "(default: sweep-<date>-<time>)")


def run(params: Params, args) -> int:
    if args.params not in (None, PARAMS_FILE):
        raise ConfigError(f"--params {args.params}: a sweep runs DVC experiments, which read {PARAMS_FILE}; "
                          "put the settings in --set instead")
    root = repo_root()
    name = args.name or default_name()
    parent_id, table, results = sweep(root, parse_grid(args.grid), list(args.overrides), name)
    restored = sum(r.status == "restored" for r in results)
    print(f"sweep {name}: {len(results)} point(s) ({restored} restored by DVC), MLflow parent run {parent_id}",
          file=sys.stderr)
    sys.stdout.write(format_runs(table, "table"))
    print(f"compare again: fluxfill compare --parent {parent_id}", file=sys.stderr)
    return 0
