"""Prefect flows over the DVC stages: one flow per stage, and ``train-diptych`` chaining them all.

``train-diptych(overrides, run_name)``:

1. validates ``overrides`` (``{"train.max_steps": 50, "fusion.mode": "none"}``) with the typed
   config on top of ``params.yaml``, before anything runs; ``run_name`` becomes
   ``tracking.run_name``, the MLflow run's name;
2. writes them into the workspace's ``params.yaml`` (comments and other lines kept), the values
   ``dvc exp run -S`` would set: the file then says what ran, ``dvc params diff`` shows the change, and
   the values stay for later runs (``git checkout params.yaml`` returns to the committed ones);
   docs/design.md §7 says why not with ``dvc exp run`` itself;
3. asks DVC, stage by stage in ``dvc repro``'s order, whether the stage is stale, and runs the stale
   ones with ``dvc repro --single-item <stage>`` (each a sub-flow, its output streamed into the
   Prefect log); a stage restored from DVC's run cache does not execute and logs no new MLflow run;
4. leaves ``dvc.lock`` up to date (checked with ``dvc status``), so ``dvc repro`` has nothing to do;
5. with a ``run_name``, records the workspace as DVC experiment ``run_name`` (``dvc exp show``);
6. publishes Prefect artifacts: a summary (with the model version training registered), a table of the
   metrics, the MLflow run's address.

Stages are not retried: a failed training is a result to read, not a glitch. Calls to MLflow are.
Flows work in the repository found from the current directory (``python -m flows.serve`` moves there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from fluxfill import sweep
from fluxfill.compare import format_runs
from fluxfill.config import PARAMS_FILE, ConfigError, FluxfillError, flatten, load_params, repo_root
from fluxfill.summary import read_metrics
from fluxfill.tracking import training_run, ui_url

from . import workspace
from .workspace import StageFailed, StageRun


# ------------------------------------------------------------------------------------------ tasks
@task(name="apply-overrides", cache_policy=NO_CACHE)
def apply_overrides(root: Path, overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """Validate ``overrides`` with the typed config, then write them into params.yaml; ``{key: [old, new]}``."""
    logger = get_run_logger()
    params, flat = workspace.validate_overrides(root, overrides)
    changed = workspace.write_params(root / PARAMS_FILE, flat)
    if load_params(root / PARAMS_FILE) != params:  # the file must now say exactly what was validated
        raise ConfigError(f"{root / PARAMS_FILE}: writing the overrides {flat} did not give the validated params")
    for key, (old, new) in changed.items():
        logger.info("params.yaml: %s = %r (was %r)", key, new, old)
    if flat and not changed:
        logger.info("params.yaml already holds the overrides %s", flat)
    return {k: [old, new] for k, (old, new) in changed.items()}


@task(name="dvc-status", cache_policy=NO_CACHE)
def stage_status(root: Path, stage: str) -> list[str]:
    """Why DVC considers ``stage`` stale; empty when it is up to date."""
    return workspace.stale_reasons(root, stage)


@task(name="dvc-repro", task_run_name="dvc-repro-{stage}", cache_policy=NO_CACHE, retries=0)
def repro(root: Path, stage: str) -> StageRun:
    """``dvc repro --single-item <stage>``, its output streamed line by line into the run log. Never retried."""
    logger = get_run_logger()
    logger.info("$ dvc repro --single-item %s   (in %s)", stage, root)

    def emit(line: str) -> None:
        if line.startswith("ERROR") or ": error:" in line or line.startswith("Traceback"):
            logger.error(line)
        else:
            logger.info(line)

    run = workspace.run_stage(root, stage, emit)
    logger.info("stage %s: %s in %.1f s", stage, run.status, run.seconds)
    return run


@task(name="dvc-exp-save", cache_policy=NO_CACHE)
def exp_save(root: Path, name: str) -> str:
    """``dvc exp save -n <name>``: the workspace (params, dvc.lock, metrics) as a DVC experiment."""
    return workspace.save_experiment(root, name)


@task(name="mlflow-run", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def mlflow_run(ref: dict[str, str], tags: dict[str, str] | None = None,
               registered_model: str | None = None) -> dict[str, Any]:
    """Look up the MLflow run in ``ref`` (name, status, the model versions it registered); tag it and them. Retried."""
    from mlflow.tracking import MlflowClient

    from fluxfill.registry import run_versions

    client = MlflowClient(tracking_uri=ref["tracking_uri"])
    run = client.get_run(ref["run_id"])
    versions = run_versions(client, registered_model, run.info.run_id) if registered_model else []
    for key, value in (tags or {}).items():
        client.set_tag(run.info.run_id, key, value)
        for v in versions:
            client.set_model_version_tag(v.name, v.version, key, value)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "tracking_uri": ref["tracking_uri"],
        "model_versions": [{"name": v.name, "version": str(v.version)} for v in versions],
    }


# ---------------------------------------------------------------------------------- stage flows
def _stage_flow(stage: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    root = repo_root()
    if overrides:
        apply_overrides(root, overrides)
    return repro(root, stage).to_dict()


@flow(name="prepare-data")
def prepare_data(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DVC stage ``prepare``: the triptych dataset in data/prepared."""
    return _stage_flow("prepare", overrides)


@flow(name="encode-latents")
def encode_latents(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DVC stage ``encode``: the latent cache in data/latents."""
    return _stage_flow("encode", overrides)


@flow(name="train")
def train(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DVC stage ``train``: LoRA + fusion weight in train.output, the training metrics, an MLflow run."""
    return _stage_flow("train", overrides)


@flow(name="evaluate")
def evaluate(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DVC stage ``evaluate``: the evaluation metrics and sample panels in eval.output."""
    return _stage_flow("evaluate", overrides)


STAGE_FLOWS = {"prepare": prepare_data, "encode": encode_latents, "train": train, "evaluate": evaluate}


# ------------------------------------------------------------------------------------ artifacts
def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in flatten(values).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def mlflow_ui_url(info: dict[str, Any]) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a server, else None."""
    uri = info["tracking_uri"]
    if not uri.startswith(("http://", "https://")):
        return None
    return ui_url(uri, info["experiment_id"], info["run_id"])


def _mlflow_ui_hint(info: dict[str, Any]) -> str:
    """How to see a run kept in a local database (sqlite, files): there is no URL until ``mlflow ui`` runs."""
    return (f"`mlflow ui --backend-store-uri {info['tracking_uri']} --host 127.0.0.1`, then open "
            + ui_url("http://127.0.0.1:5000", info["experiment_id"], info["run_id"]))


def summary_markdown(
    runs: list[StageRun], changed: dict[str, list[Any]], metrics: dict[str, dict[str, Any]],
    mlflow_info: dict[str, Any] | None, notes: list[str], failure: str | None = None,
) -> str:
    """The run's summary: stages run or skipped, overrides, final loss and α, evaluation metrics, MLflow run."""
    lines = [f"# train-diptych: {'failed' if failure else 'completed'}", "",
             "| stage | result | seconds | why it ran |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.stage} | {r.status} | {r.seconds:.1f} | {'; '.join(r.reasons) or '-'} |" for r in runs]
    if failure:
        lines += ["", "**Error**", "", "```", failure.strip(), "```"]
    lines += ["", "**Overrides written to params.yaml**: " + (", ".join(
        f"`{k}: {json.dumps(new)}` (was `{json.dumps(old)}`)" for k, (old, new) in changed.items()) or "none")]
    for path, m in metrics.items():
        values = _numbers(m["values"])
        if m["stage"] == "train":
            alpha = values.get("fusion_weight")
            lines.append(f"\n**Training** ({path}): final loss {_fmt(values.get('loss'))}, final α "
                         + (_fmt(alpha) if alpha is not None else "none (fusion.mode none)"))
        else:
            lines.append(f"\n**{m['stage']}** ({path}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
    if mlflow_info:
        url = mlflow_ui_url(mlflow_info)
        lines.append(f"\n**MLflow**: run `{mlflow_info['run_name']}` (`{mlflow_info['run_id']}`, "
                     f"{mlflow_info['status']}): " + (f"[open]({url})" if url else _mlflow_ui_hint(mlflow_info)))
        for v in mlflow_info.get("model_versions", []):
            uri = f"models:/{v['name']}/{v['version']}"
            lines.append(f"\n**Model version**: `{v['name']}` version {v['version']} (`{uri}`; "
                         f"`fluxfill promote {v['version']} --alias champion`, `fluxfill edit --model {uri}`)")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def publish(
    runs: list[StageRun], changed: dict[str, list[Any]], metrics: dict[str, dict[str, Any]],
    mlflow_info: dict[str, Any] | None, notes: list[str], failure: str | None = None,
) -> None:
    """The run's Prefect artifacts: ``train-diptych-summary``, ``train-diptych-metrics``, ``mlflow-run``."""
    create_markdown_artifact(summary_markdown(runs, changed, metrics, mlflow_info, notes, failure),
                             key="train-diptych-summary", description="stages run or skipped, results, links")
    rows = [{"stage": m["stage"], "file": path, "metric": k, "value": v}
            for path, m in metrics.items() for k, v in _numbers(m["values"]).items()]
    if rows:
        create_table_artifact(rows, key="train-diptych-metrics", description="the metrics files of dvc.yaml")
    if mlflow_info:
        desc = f"MLflow run {mlflow_info['run_name']} ({mlflow_info['run_id']})"
        if url := mlflow_ui_url(mlflow_info):
            create_link_artifact(url, link_text=mlflow_info["run_name"] or mlflow_info["run_id"],
                                 key="mlflow-run", description=desc)
        else:  # a link artifact needs a URL
            create_markdown_artifact(f"MLflow run `{mlflow_info['run_name']}` (`{mlflow_info['run_id']}`) "
                                     f"is in `{mlflow_info['tracking_uri']}`: {_mlflow_ui_hint(mlflow_info)}",
                                     key="mlflow-run", description=desc)


# ---------------------------------------------------------------------------------- train-diptych
def _read_metrics(root: Path, logger) -> dict[str, dict[str, Any]]:
    """``{path: {"stage": ..., "values": {...}}}`` for each metrics file of dvc.yaml that exists.

    A damaged one is left out of the summary, with a warning that names it.
    """
    found = {}
    for path, stage in workspace.metrics_files(root).items():
        if not (root / path).exists():
            continue
        try:
            found[path] = {"stage": stage, "values": read_metrics(root / path, stage)}
        except FluxfillError as e:
            logger.warning("left out of the summary: %s", e)
    return found


def _check_experiment_name(root: Path, name: str, logger) -> None:
    """Refuse a ``run_name`` that is already a DVC experiment of HEAD, before anything runs."""
    from dvc.repo import Repo
    from dvc.scm import SCMError

    try:
        with Repo(str(root)) as repo:
            names = {n for exps in repo.experiments.ls().values() for n, _ in exps}
    except SCMError as e:  # no git, or no commit yet: `dvc exp save` says so at the end
        logger.warning("run_name %r not checked against the DVC experiments: %s", name, e)
        return
    if name in names:
        raise ConfigError(
            f"run_name {name!r} is already a DVC experiment of this commit (`dvc exp show`): choose another "
            "run_name, remove it with `dvc exp remove " + name + "`, or pass save_experiment=false"
        )


@flow(name="train-diptych")
def train_diptych(
    overrides: dict[str, Any] | None = None, run_name: str | None = None, save_experiment: bool = True,
) -> dict[str, Any]:
    """Run the stale DVC stages (prepare -> encode -> train -> evaluate) with validated param overrides.

    overrides: dotted keys of params.yaml, e.g. {"train.max_steps": 50, "fusion.mode": "none"}; written
      into params.yaml (comments kept) before the stages run.
    run_name: the MLflow run's name (tracking.run_name) and, with save_experiment, the DVC experiment's.
    save_experiment: record the finished workspace with `dvc exp save -n <run_name>`.
    """
    logger = get_run_logger()
    root = repo_root()
    flat = workspace.normalize_overrides(overrides)
    if run_name:
        flat["tracking.run_name"] = run_name
        if save_experiment:
            _check_experiment_name(root, run_name, logger)
    stages = workspace.pipeline_stages(root)  # a broken dvc.yaml fails here, before params.yaml changes
    changed = apply_overrides(root, flat)
    params = load_params(root / PARAMS_FILE)
    logger.info("pipeline (dvc repro order): %s", " -> ".join(stages))
    runs: list[StageRun] = []
    notes: list[str] = []
    try:
        for stage in stages:
            reasons = stage_status(root, stage)
            if not reasons:
                logger.info("stage %s: up to date, skipped", stage)
                runs.append(StageRun(stage, "up to date"))
                continue
            logger.info("stage %s is stale: %s", stage, "; ".join(reasons))
            stage_flow = STAGE_FLOWS.get(stage)
            run = StageRun(**stage_flow()) if stage_flow else repro(root, stage)
            run.reasons = reasons
            runs.append(run)
    except Exception as e:
        failed = next((s for s in stages if s not in {r.stage for r in runs}), "?")
        runs.append(StageRun(failed, "failed"))
        try:
            publish(runs, changed, _read_metrics(root, logger), None, notes, failure=str(e))
        except Exception as publish_error:  # the stage's error is the one to report
            logger.warning("could not publish the summary artifact: %s", publish_error)
        raise

    left = workspace.workspace_status(root)
    if left:
        notes.append(f"dvc status still reports: {left}")
        logger.warning("dvc status after the run is not clean: %s", left)
    else:
        notes.append("dvc.lock is up to date: `dvc repro` has nothing to do")

    mlflow_info = _link_mlflow_run(root, params, runs, flat, notes, logger)

    if run_name and save_experiment:
        try:
            logger.info(exp_save(root, run_name))
            notes.append(f"saved as DVC experiment `{run_name}` (`dvc exp show`, `dvc exp apply {run_name}`)")
        except StageFailed as e:
            notes.append(f"not saved as a DVC experiment: {e}")
            logger.warning("%s", e)

    metrics = _read_metrics(root, logger)
    publish(runs, changed, metrics, mlflow_info, notes)
    return {"stages": [r.to_dict() for r in runs], "overrides": changed, "metrics": metrics, "mlflow": mlflow_info}


def _link_mlflow_run(root: Path, params, runs: list[StageRun], flat: dict[str, Any], notes: list[str],
                     logger) -> dict[str, Any] | None:
    """The MLflow run that trained the workspace's weights (:func:`mlflow_run`), tagged with this flow run when it
    trained them; None, with a note, when it is unknown or unreachable (the stages' results stand)."""
    try:
        ref = training_run(root / params.train.output, params.tracking, root)
    except Exception as e:
        notes.append(f"the MLflow run of the weights in {params.train.output}/ was not looked up: {e}")
        logger.warning("MLflow run not looked up: %s", e)
        return None
    if not ref:
        notes.append(f"no MLflow run is known for the weights in {params.train.output}/: no MLflow run to link")
        return None
    trained = any(r.stage == "train" and r.status == "ran" for r in runs)
    if not trained:
        notes.append("training did not run in this flow run: the MLflow run is the earlier one")
    try:  # an earlier run keeps its own tags
        return mlflow_run(ref, _prefect_tags(flat) if trained else None, params.tracking.registered_model)
    except Exception as e:  # retried already
        notes.append(f"MLflow run {ref['run_id']} not reachable at {ref['tracking_uri']}: {e}")
        logger.warning("MLflow run %s not reachable: %s", ref["run_id"], e)
        return None


def _prefect_tags(flat: dict[str, Any]) -> dict[str, str]:
    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            "fluxfill.overrides": json.dumps(flat, sort_keys=True)}
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = flow_run.ui_url
    return tags


# ---------------------------------------------------------------------------------------------- sweep-diptych
@flow(name="sweep-point", flow_run_name="{exp_name}")
def sweep_point(root: str, sets: list[str], parent_id: str, index: int, values: dict[str, Any], exp_name: str,
                baseline: str) -> dict[str, Any]:
    """One point of a sweep: ``dvc exp run --temp`` (output streamed into the log), then its MLflow child run."""
    logger = get_run_logger()
    point = sweep.Point(index, values, exp_name)
    return sweep.run_point(Path(root), sets, parent_id, point, baseline, logger.info).to_dict()


def _point_subflow(root: Path, sets: list[str], parent_id: str, point: sweep.Point, baseline: str,
                   emit) -> sweep.PointResult:
    return sweep.PointResult(**sweep_point(str(root), sets, parent_id, point.index, point.values, point.exp_name,
                                           baseline))


@flow(name="sweep-diptych")
def sweep_diptych(grid: dict[str, list[Any]], overrides: dict[str, Any] | None = None,
                  name: str | None = None) -> dict[str, Any]:
    """`fluxfill sweep` as a flow: the cartesian product of ``grid`` as DVC experiments, one sub-flow per point.

    grid: dotted keys to lists of values, e.g. {"fusion.mode": ["none", "fixed", "learned"]}.
    overrides: settings for every point, e.g. {"data.demo_task": "tint"} (not written to params.yaml).
    name: the MLflow parent run's name and the DVC experiments' prefix (default: sweep-<date>-<time>).
    Publishes the comparison table (artifacts sweep-table and sweep-summary).
    """
    logger = get_run_logger()
    root = repo_root()
    sets = [f"{k}={sweep._inline(v)}" for k, v in workspace.normalize_overrides(overrides).items()]
    name = name or sweep.default_name()
    grid = {str(k): list(v) if isinstance(v, list | tuple) else [v] for k, v in (grid or {}).items()}
    if not grid:
        raise ConfigError("grid is empty: give at least one key and its values, e.g. {\"fusion.mode\": [\"none\", \"learned\"]}")
    parent_id, table, results = sweep.sweep(root, grid, sets, name, logger.info, _point_subflow)
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}  # NaN is not JSON
            for r in table.to_dict("records")]
    create_table_artifact(rows, key="sweep-table", description=f"sweep {name}: one row per point (MLflow {parent_id})")
    restored = sum(r.status == "restored" for r in results)
    create_markdown_artifact(
        f"# sweep {name}\n\n{len(results)} point(s), {restored} restored by DVC; MLflow parent run `{parent_id}` "
        f"(`fluxfill compare --parent {parent_id}`)\n\n" + format_runs(table, "markdown"),
        key="sweep-summary", description="the comparison table, as in the parent run's sweep/table.md")
    return {"parent_run_id": parent_id, "points": [r.to_dict() for r in results], "table": rows}
