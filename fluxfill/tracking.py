"""MLflow tracking: where runs go, which tags link them to code and data, and the run hand-off file.

Where runs go (:func:`tracking_uri`): ``tracking.tracking_uri`` in params.yaml, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts``
(absolute paths built from the repo root, so runs started inside DVC's temporary experiment
workspaces land in the same database). Browse them with
``mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1``.

A stage that learns or measures does::

    with tracking.start_run(params) as run:          # checks the server, creates the experiment once
        mlflow.log_metrics({"loss": loss}, step=step)
        tracking.log_image(grid, f"step_{step:06d}")  # -> artifact samples/step_000020.png
        tracking.write_run_ref(run, params.train.output)  # once the weights are written

and a later stage logs into the run that trained the weights it finds::

    tracking.setup(params.tracking)
    ref = tracking.read_run_ref(params.train.output)
    run_id = ref["run_id"] if ref and tracking.find_run(ref["run_id"]) else None
    with tracking.start_run(params, run_id=run_id): ...

The run reference is not part of the weights (a DVC out holds no run id: two identical runs write identical
bytes). It lives in ``.fluxfill/runs/<digest of the weights>.json`` (git-ignored, per workspace), so weights
that DVC restores from its cache find the run that trained them. Weights trained in another workspace (a sweep
point's, after ``dvc exp apply``) have no reference here: :func:`training_run` then finds their run by its
``fluxfill.models_md5`` tag, the weights' DVC hash.

MLflow's fluent API keeps one active run per thread and is not thread-safe: log from the main
process (rank 0) only. Call :func:`setup` once before starting parallel processes so that they do
not race to create the experiment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import mlflow
import yaml
from mlflow.entities import LifecycleStage, Run, RunStatus
from mlflow.environment_variables import MLFLOW_RUN_ID, MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.file_utils import path_to_local_sqlite_uri
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from . import __version__
from .artifacts import RUN_REFS, damaged, first_line
from .config import FluxfillError, Params, TrackingConfig, repo_root

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
RUN_REF_FORMAT = 1  # the version of the run reference's layout
ARTIFACTS_DIR = "mlartifacts"
REACH_TIMEOUT_S = 5.0
# The experiment tag from which MLflow's UI takes an experiment's kind (model training or GenAI) when its workflow
# switch is off. In MLflow 3.17's UI the switch is on: the kind follows the switch (GenAI unless changed, kept in
# the browser), which the ``workflowType`` query parameter of :func:`ui_url` sets.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"
NAME_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o, 1/l
PARENT_RUN_ENV = "FLUXFILL_PARENT_RUN_ID"  # set by `fluxfill sweep`: a new run becomes a child of this run
SWEEP_POINT_ENV = "FLUXFILL_SWEEP_POINT"  # set by `fluxfill sweep`: the point's overrides (JSON), as a tag
OUTPUTS_TAG = "fluxfill.models_md5"  # the DVC hash of the models/ a training run wrote (finds a restored run's producer)
RESTORED_TAG = "fluxfill.restored_from"  # on a sweep's child run whose outputs DVC restored: the producing run


def tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``.

    A relative sqlite path (``sqlite:///runs.db``) is taken relative to the repo root, never to the
    cwd, which under ``dvc exp run`` is a temporary workspace that DVC deletes afterwards.
    """
    uri = cfg.tracking_uri or MLFLOW_TRACKING_URI.get()
    if not uri:
        return path_to_local_sqlite_uri(repo_root() / DB_FILE)  # absolute: sqlite:////abs/mlflow.db
    if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        return path_to_local_sqlite_uri(repo_root() / unquote(path)) + sep + query
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (a relative path is resolved against the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):].split("?")[0])).absolute()


def check_reachable(uri: str) -> None:
    """Fail fast, before any training, when the tracking store cannot be used.

    http(s): one request to the MLflow REST API (no retries, short timeout). sqlite: the database's
    folder must exist (it is created) and be writable. Other schemes are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        endpoint = "/api/2.0/mlflow/experiments/search"
        try:
            resp = http_request(
                get_default_host_creds(uri), endpoint, "GET",
                max_retries=0, timeout=REACH_TIMEOUT_S, params={"max_results": 1},
            )
        except Exception as e:
            # MLflow wraps the requests error in one long line: keep its cause, e.g. "[Errno 111] Connection refused"
            text = str(e)
            errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
            reason = errno.group(0) if errno else (
                f"no answer within {REACH_TIMEOUT_S:g} s" if "timeout" in text.lower() else text
            )
            port = urlparse(uri).port or 5000
            raise FluxfillError(
                f"MLflow tracking server {uri} is unreachable: {reason}; start it with "
                f"`mlflow server --host 127.0.0.1 --port {port} --backend-store-uri sqlite:///$PWD/mlflow.db` "
                "or use the local sqlite database (tracking.tracking_uri and MLFLOW_TRACKING_URI both unset)"
            ) from e
        if resp.status_code != 200:
            raise FluxfillError(
                f"MLflow tracking server {uri} answered HTTP {resp.status_code} to {endpoint}: "
                f"{resp.text[:200].strip()!r}; check that the URI points at an MLflow server and, if it "
                "needs a login, set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            )
        return
    db = sqlite_path(uri)
    if db is None:
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FluxfillError(f"cannot create the folder of the MLflow database {db}: {e}") from None
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise FluxfillError(
            f"the MLflow database {db} is not writable; fix the permissions or point "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
        )


def connect(cfg: TrackingConfig) -> str:
    """Resolve the tracking URI, check it, make it MLflow's current one; returns it."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def setup(cfg: TrackingConfig) -> str:
    """Connect (:func:`connect`) and create the experiment ``cfg.experiment`` if missing; returns its id.

    Race-safe: a process that loses the race to create it uses the one the winner made. With a
    sqlite store the experiment's artifacts go to ``mlartifacts/<experiment>`` next to the database.
    """
    uri = connect(cfg)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        db = sqlite_path(uri)
        location = None
        if db is not None:
            folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.experiment)
            location = (db.parent / ARTIFACTS_DIR / folder).as_uri()
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            exp = client.get_experiment_by_name(cfg.experiment)
    if exp.lifecycle_stage == LifecycleStage.DELETED:
        raise FluxfillError(
            f"MLflow experiment {cfg.experiment!r} (id {exp.experiment_id}) at {uri} is deleted: restore it "
            f"with `mlflow experiments restore --experiment-id {exp.experiment_id}` or set tracking.experiment "
            "to another name"
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version; a kind someone chose stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of a run (or an experiment) at ``base``, in the model-training view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/{page}?{UI_WORKFLOW}"


def default_run_name(params: Params, *parts: str) -> str:
    """``tiny-learned-<parts>-k7q2``: preset, fusion mode, ``parts`` (training passes its steps and fingerprint)
    and 4 random characters, drawn until no run of the experiment has the name (call :func:`setup` first).

    The characters come from the OS (``secrets``), not from Python's ``random``, which training seeds: MLflow's
    own generated names come from ``random`` and so repeated run after run.
    """
    import secrets

    stem = "-".join([params.model.preset, params.fusion.mode, *parts])
    exp = mlflow.MlflowClient().get_experiment_by_name(params.tracking.experiment)
    for _ in range(20):
        name = f"{stem}-{''.join(secrets.choice(NAME_ALPHABET) for _ in range(4))}"
        if exp is None or not mlflow.MlflowClient().search_runs(
                [exp.experiment_id], filter_string=f"attributes.run_name = '{name}'", max_results=1):
            return name
    raise FluxfillError(f"no unused run name {stem}-xxxx after 20 draws in experiment {params.tracking.experiment!r}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.info("no git tag on the run: `git %s` failed (%s)", " ".join(args), first_line(e))
        return None
    return out.stdout.strip()


def dvc_out_hash(path: str | os.PathLike, lock: str | os.PathLike = "dvc.lock") -> str | None:
    """The md5 DVC recorded in ``lock`` for the stage output ``path`` (``"ab12...dir"`` for a folder).

    None when the lock file, the output or its hash is missing, or the file does not parse.
    """
    try:
        data = yaml.safe_load(Path(lock).read_text())
    except FileNotFoundError:
        log.info("no dvc.data tag for %s: %s does not exist yet (`dvc repro` writes it)", path, lock)
        return None
    except (OSError, yaml.YAMLError) as e:
        log.warning("no dvc.data tag for %s: %s is not readable (%s)", path, lock, first_line(e))
        return None
    stages = data.get("stages") if isinstance(data, dict) else None
    want = os.path.normpath(path)
    for stage in (stages or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and os.path.normpath(str(out.get("path", ""))) == want:
                return out.get("md5")
    return None


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def run_tags(params: Params) -> dict[str, str]:
    """Tags linking a run to the code (git, in the cwd) and the data (``dvc.lock`` in the cwd).

    ``git.commit``, ``git.dirty`` (tracked files modified), ``dvc.data.prepared``, ``dvc.data.latents``,
    ``preset``, ``device``, ``fluxfill.version``; a tag whose source is missing is left out. Under
    ``fluxfill sweep`` also ``mlflow.parentRunId`` and ``fluxfill.sweep.point`` (from the environment).
    """
    tags = {"preset": params.model.preset, "device": _device(), "fluxfill.version": __version__}
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags[MLFLOW_PARENT_RUN_ID] = parent
    if point := os.environ.get(SWEEP_POINT_ENV):
        tags["fluxfill.sweep.point"] = point
    if commit := _git("rev-parse", "HEAD"):
        tags["git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git.dirty"] = str(bool(status)).lower()
    for name, path in (("prepared", params.data.output), ("latents", params.encode.output)):
        if md5 := dvc_out_hash(path):
            tags[f"dvc.data.{name}"] = md5
    return tags


def _param_values(params: Params) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.flat().items()}


@contextlib.contextmanager
def start_run(
    params: Params,
    run_name: str | None = None,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run in ``params.tracking.experiment``, or resume ``run_id`` (or ``$MLFLOW_RUN_ID``).

    A fresh run gets :func:`run_tags` (``tags`` added on top), the name ``run_name``, else
    ``params.tracking.run_name``, else :func:`default_run_name` (never MLflow's) and every setting of ``params`` as a
    flattened param (``train.lora.rank``). A resumed run gets only the params and tags it lacks;
    params whose value changed are reported in a warning (MLflow params cannot change). The run
    ends FINISHED, KILLED on Ctrl-C, FAILED when the block raises anything else.
    """
    experiment_id = setup(params.tracking)
    run_id = run_id or MLFLOW_RUN_ID.get()
    all_tags = {**run_tags(params), **(tags or {})}
    if run_id is None:
        name = run_name or params.tracking.run_name or default_run_name(params)
        how = {"experiment_id": experiment_id, "run_name": name, "tags": all_tags}
    elif find_run(run_id) is None:
        raise FluxfillError(
            f"MLflow run {run_id} does not exist at {mlflow.get_tracking_uri()}; was it logged to another "
            "tracking server (check MLFLOW_TRACKING_URI and tracking.tracking_uri)?"
        )
    else:
        how = {"run_id": run_id}
    with mlflow.start_run(nested=nested, **how) as run:
        values = _param_values(params)
        logged = run.data.params  # empty for a fresh run
        changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
        if changed:
            log.warning(
                "MLflow run %s keeps its logged params; these differ now and are not logged again: %s",
                run.info.run_id, ", ".join(f"{k}={logged[k]!r}->{values[k]!r}" for k in changed),
            )
        if new_params := {k: v for k, v in values.items() if k not in logged}:
            mlflow.log_params(new_params)
        if new_tags := {k: v for k, v in all_tags.items() if k not in run.data.tags}:
            mlflow.set_tags(new_tags)
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))  # MLflow would mark it FAILED
            raise


class MetricBuffer:
    """Per-step rows ``{"step": 3, "loss": ..., ...}`` for the active run, sent to MLflow in batches.

    Each logging call costs milliseconds of CPU (entities, queue, a database transaction) even when
    asynchronous; a loop that logs every step would pay it every step. :meth:`add` only records the values
    (with their step and time); they go out in one ``log_batch`` every ``every_s`` seconds (in MLflow's
    background thread) and at :meth:`flush` (synchronous: at checkpoints and at the end of a run).
    """

    MAX_PER_CALL = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, every_s: float = 30.0):
        self.every_s, self._pending, self._sent = every_s, [], time.monotonic()

    def add(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(r["step"])) for r in rows for k, v in r.items()
                          if k != "step" and v is not None]
        if time.monotonic() - self._sent >= self.every_s:
            self.flush(synchronous=False)

    def flush(self, synchronous: bool = True) -> None:
        pending, self._pending, self._sent = self._pending, [], time.monotonic()
        if not pending:
            return
        client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
        for start in range(0, len(pending), self.MAX_PER_CALL):
            client.log_batch(run_id, metrics=pending[start:start + self.MAX_PER_CALL], synchronous=synchronous)


def log_history(rows: list[dict[str, Any]]) -> None:
    """Log per-step rows (a checkpoint's history) to the active run at once."""
    buffer = MetricBuffer()
    buffer.add(rows)
    buffer.flush()


def end_run_unfinished() -> None:
    """End the active run as KILLED: stopped before its last step, to be continued by the next start."""
    mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))


def tag_outputs(out_dir: str | os.PathLike) -> str:
    """Tag the active run with the DVC hash of ``out_dir`` (what ``dvc.lock`` will record); returns the hash."""
    from .data import dvc_md5

    md5 = dvc_md5(Path(out_dir))
    mlflow.set_tag(OUTPUTS_TAG, md5)
    return md5


def producers(outputs_md5: str) -> list[Run]:
    """The training runs at the current tracking URI that wrote outputs with DVC hash ``outputs_md5``, newest first.

    A sweep's child for a restored point carries the same tag and is left out: it trained nothing.
    """
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{OUTPUTS_TAG}` = '{outputs_md5}'",
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if RESTORED_TAG not in r.data.tags]


def run_by_outputs(train_output: str | os.PathLike, cfg: TrackingConfig) -> dict[str, str] | None:
    """The newest training run at ``cfg``'s tracking URI tagged with the DVC hash of the weights in ``train_output``
    (weights that `dvc exp apply`, `dvc checkout` or `dvc pull` brought from a run of another workspace), as
    ``{"run_id", "experiment_id", "experiment_name", "tracking_uri"}``; None when no run there wrote them. A sqlite
    store that does not exist yet is not created. An unreachable store raises :class:`FluxfillError`."""
    if models_digest(train_output) is None:
        return None
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from .data import dvc_md5

    connect(cfg)
    found = producers(dvc_md5(Path(train_output)))
    if not found:
        return None
    info = found[0].info
    return {"run_id": info.run_id, "experiment_id": info.experiment_id, "tracking_uri": uri,
            "experiment_name": mlflow.MlflowClient().get_experiment(info.experiment_id).name}


def training_run(train_output: str | os.PathLike, cfg: TrackingConfig, root: str | os.PathLike = "."
                 ) -> dict[str, str] | None:
    """The MLflow run that trained the weights in ``train_output``: the workspace's run reference
    (:func:`read_run_ref`) when there is one, else :func:`run_by_outputs`."""
    return read_run_ref(train_output, root) or run_by_outputs(train_output, cfg)


def find_run(run_id: str) -> Run | None:
    """The run ``run_id`` at the current tracking URI (call :func:`setup` first), None if absent or deleted."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return None if run.info.lifecycle_stage == LifecycleStage.DELETED else run


def log_image(image: Image, name: str, folder: str = "samples") -> str:
    """Log a PIL image to the active run as ``<folder>/<name>.png``; returns that artifact path.

    ``name`` and ``folder`` are flattened to ``[A-Za-z0-9_.-]`` (a ``/`` in a name would otherwise
    make nested or unreadable artifacts), e.g. ``"val/step 20"`` -> ``samples/val_step_20.png``.
    """
    def safe(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.") or "image"

    if mlflow.active_run() is None:
        raise RuntimeError("tracking.log_image needs an active run: call it inside `with tracking.start_run(...)`")
    stem = safe(name.removesuffix(".png"))
    artifact = f"{safe(folder)}/{stem}.png"
    mlflow.log_image(image, artifact_file=artifact)
    return artifact


def models_digest(train_output: str | os.PathLike) -> str | None:
    """sha256 over the relative names and contents of the files in ``train_output``; None when it holds none."""
    root = Path(train_output)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def run_ref_path(train_output: str | os.PathLike, root: str | os.PathLike = ".") -> Path | None:
    """Where the reference to the run that trained the weights in ``train_output`` lives; None without weights."""
    digest = models_digest(train_output)
    return None if digest is None else Path(root, RUN_REFS, f"{digest[:16]}.json")


def write_run_ref(run: mlflow.ActiveRun | Run, train_output: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """Record ``run`` as the run that trained the weights now in ``train_output``; returns the reference file."""
    p = run_ref_path(train_output, root)
    if p is None:
        raise FluxfillError(f"{train_output} holds no files: write the weights before the run reference")
    ref = {"format": RUN_REF_FORMAT, "models": models_digest(train_output), "run_id": run.info.run_id,
           "experiment_id": run.info.experiment_id, "tracking_uri": mlflow.get_tracking_uri()}
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(ref, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)
    return p


def read_run_ref(train_output: str | os.PathLike, root: str | os.PathLike = ".") -> dict[str, Any] | None:
    """The reference :func:`write_run_ref` wrote for the weights now in ``train_output``; None when there is none.

    A damaged file, one from another version of fluxfill or one naming other weights is refused (one line).
    """
    p = run_ref_path(train_output, root)
    if p is None or not p.exists():
        return None
    fix = f"delete it (`rm {p}`): the run is then looked up in MLflow by the weights' DVC hash"
    try:
        ref = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise damaged(p, f"not a readable MLflow run reference ({e})", fix=fix) from None
    if not isinstance(ref, dict) or ref.get("format") != RUN_REF_FORMAT or not all(
            isinstance(ref.get(k), str) for k in ("run_id", "experiment_id", "tracking_uri", "models")):
        raise damaged(p, f"an MLflow run reference from another version of fluxfill (format {RUN_REF_FORMAT} "
                         "with run_id, experiment_id, tracking_uri and models expected)", fix=fix)
    if ref["models"] != models_digest(train_output):
        raise damaged(p, f"an MLflow run reference for other weights than those in {train_output}", fix=fix)
    return ref
