"""The MLflow Model Registry: every finished training run is a version; aliases say which one to use.

At the end of a finished training run, :func:`register_trained_model` writes ``fluxfill_model.json`` next to the
LoRA and the fusion file (what is needed to rebuild the pipeline: preset, base model ids, panel size, prompt
template, LoRA settings, fusion mode), logs the three as an MLflow pyfunc model (``FluxfillModel``, which also
carries the run's evaluation settings) and registers it as a new version of ``tracking.registered_model``
(default ``fluxfill-diptych``), tagged with the git commit, the DVC data hashes and, when a Prefect flow run
started the training, its id. ``tracking.registered_model: null`` registers nothing.

Use a version:
  fluxfill edit --model models:/fluxfill-diptych@champion --source in.png --reference ref.jpg
  mlflow.pyfunc.load_model("models:/fluxfill-diptych@champion").predict(pd.DataFrame({"source": [b64], ...}))
  mlflow models serve -m models:/fluxfill-diptych@champion --env-manager local -h 127.0.0.1 -p 5001

`fluxfill promote TARGET --alias ALIAS` points ALIAS (e.g. champion) at a version. TARGET is the version
number or the id of the training run that registered it. `fluxfill compare` shows each run's version and
aliases.

Examples:
  fluxfill promote 3 --alias champion
  fluxfill promote 0f3c2a9d81e44b6c9d3b0e0a5d1c7e21 --alias champion
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

from . import __version__, tracking
from .artifacts import SPEC_FILE
from .config import FluxfillError, ModelSpec, Params, TrackingConfig

log = logging.getLogger(__name__)

PYFUNC_NAME = "fluxfill"  # the logged model's name in its run: runs:/<run id>/fluxfill
MODEL_ARTIFACT = "model"  # the pyfunc artifact holding the model folder
VERSION_TAGS = ("git.commit", "git.dirty", "dvc.data.prepared", "dvc.data.latents", "preset", "fluxfill.version")
REQUIREMENTS = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "pillow", "pandas", "mlflow")


# ---------------------------------------------------------------------------------------------- pyfunc
def _image(text: str, column: str, row: int):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (ValueError, OSError, UnidentifiedImageError) as e:
        raise MlflowException.invalid_parameter_value(
            f"row {row}, column {column!r}: not a base64-encoded image ({e})") from e


def encode_image(img) -> str:
    """A PIL image as base64 PNG text (what the pyfunc model takes and returns)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class FluxfillModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of :class:`fluxfill.edit.Editor`.

    Input: a DataFrame with the columns ``source`` (base64 image), ``reference`` (base64 image, needed unless the
    fusion mode is none) and ``prompt`` (optional, default: the training prompt). Params: ``seed``, ``steps``,
    ``guidance`` (default: the run's eval settings); row k uses the seed ``seed + k``. Output: a DataFrame with
    ``image``, the edited image as base64 PNG, the size of its source.
    """

    def load_context(self, context):
        from .edit import Editor

        config = context.model_config or {}
        self.editor = Editor.from_dir(context.artifacts[MODEL_ARTIFACT], device=config.get("device"),
                                      source=config.get("source", "mlflow pyfunc"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        rows = pd.DataFrame(model_input).to_dict("records")
        seed = params.get("seed")
        seed = self.editor.defaults.seed if seed is None else int(seed)
        out = []
        for k, row in enumerate(rows):
            source = _image(row.get("source"), "source", k)
            ref = row.get("reference")
            reference = _image(ref, "reference", k) if isinstance(ref, str) and ref else None
            prompt = row.get("prompt") if isinstance(row.get("prompt"), str) and row.get("prompt") else None
            try:
                edited = self.editor(source, reference, prompt=prompt, seed=seed + k, steps=params.get("steps"),
                                     guidance=params.get("guidance"))
            except FluxfillError as e:  # the request's fault (e.g. no reference): HTTP 400 when served
                raise MlflowException.invalid_parameter_value(f"row {k}: {e}") from e
            out.append(encode_image(edited))
        return pd.DataFrame({"image": out})


def signature(spec: ModelSpec):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    e = spec.eval
    return ModelSignature(
        inputs=Schema([ColSpec("string", "source"), ColSpec("string", "reference", required=False),
                       ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("seed", "long", e.seed), ParamSpec("steps", "long", e.num_inference_steps),
                            ParamSpec("guidance", "double", e.guidance_scale)]),
    )


def requirements() -> list[str]:
    """The installed versions of what the pyfunc model imports (used by non-local MLflow environments)."""
    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


# ---------------------------------------------------------------------------------------- registering
def write_spec(params: Params, folder: Path, with_eval: bool = False) -> ModelSpec:
    spec = ModelSpec.from_params(params, __version__, with_eval=with_eval)
    (folder / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")
    return spec


def version_tags(params: Params) -> dict[str, str]:
    """Tags of a new version: git commit, DVC data hashes, preset, fluxfill version, the Prefect flow run if any."""
    tags = {k: v for k, v in tracking.run_tags(params).items() if k in VERSION_TAGS}
    tags["fusion.mode"] = params.fusion.mode
    if flow_run := os.environ.get("PREFECT__FLOW_RUN_ID"):  # set by Prefect in a deployment's flow run process
        tags["prefect.flow_run_id"] = flow_run
    return tags


def register_trained_model(params: Params, out_dir: Path):
    """Register the active run's model (LoRA, fusion file and spec in ``out_dir``); returns the version.

    Call at the end of a finished training run, inside its MLflow run, after ``out_dir`` is written.
    Returns None (nothing registered) when ``tracking.registered_model`` is null.
    """
    from .artifacts import FUSION_FILE, LORA_DIR

    name = params.tracking.registered_model
    run = mlflow.active_run()
    if not name or run is None:
        log.info("no model version registered (tracking.registered_model is %r)", name)
        return None
    with tempfile.TemporaryDirectory(prefix="fluxfill-register-") as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        shutil.copytree(out_dir / LORA_DIR, folder / LORA_DIR)
        shutil.copy2(out_dir / FUSION_FILE, folder / FUSION_FILE)
        spec = write_spec(params, folder, with_eval=True)
        with warnings.catch_warnings():  # an input example would make MLflow load and run the model here
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(name=PYFUNC_NAME, python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                                           artifacts={MODEL_ARTIFACT: str(folder)}, signature=signature(spec),
                                           pip_requirements=requirements())
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags(params))
    mlflow.MlflowClient().update_model_version(
        name, mv.version, description=f"{spec.model.preset} LoRA + fusion ({spec.fusion.mode}) of run {run.info.run_id}")
    log.info("registered %s version %s (run %s)", name, mv.version, run.info.run_id)
    return mv


# ------------------------------------------------------------------------------------------- resolving
def is_model_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/"))


def _not_found(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def run_versions(client, name: str, run_id: str) -> list:
    """The versions of ``name`` registered from ``run_id``, newest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def resolve(uri: str, cfg: TrackingConfig) -> tuple[str, str]:
    """``(model URI to download, description)`` of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID``."""
    client = mlflow.MlflowClient()
    hint = "`fluxfill compare` lists the runs with their versions and aliases"
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            if path:
                return uri, uri
            if cfg.registered_model and (versions := run_versions(client, cfg.registered_model, run_id)):
                v = versions[0]
                return f"models:/{v.name}/{v.version}", f"{uri} ({v.name} version {v.version})"
            return f"runs:/{run_id}/{PYFUNC_NAME}", uri
        name, _, rest = uri[len("models:/"):].partition("/")
        if "@" in name:
            name, _, alias = name.partition("@")
            v = client.get_model_version_by_alias(name, alias)
        else:
            v = client.get_model_version(name, rest)
        return f"models:/{v.name}/{v.version}", f"{uri} (version {v.version}, run {v.run_id})"
    except MlflowException as e:
        if _not_found(e) or "not found" in str(e).lower():
            raise FluxfillError(f"--model {uri}: not found at {mlflow.get_tracking_uri()} ({e.message}); {hint}") from e
        raise


def download_model(uri: str, cfg: TrackingConfig, dest: Path) -> tuple[Path, str]:
    """Download the model folder of a registered version or run into ``dest``; ``(folder, description)``."""
    from mlflow.models import Model

    tracking.connect(cfg)
    model_uri, description = resolve(uri, cfg)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    except MlflowException as e:
        raise FluxfillError(f"--model {uri}: cannot download {model_uri} ({e.message})") from e
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if MODEL_ARTIFACT not in artifacts:
        raise FluxfillError(f"--model {uri}: {model_uri} is not a fluxfill model (no {MODEL_ARTIFACT!r} artifact)")
    return local / artifacts[MODEL_ARTIFACT]["path"], description


# ------------------------------------------------------------------------------------------ promoting
def versions_by_run(cfg: TrackingConfig) -> dict[str, list[tuple[str, list[str]]]]:
    """``{run_id: [(version, [aliases]), ...]}`` of ``cfg.registered_model``; empty when it does not exist."""
    if not cfg.registered_model:
        return {}
    client = mlflow.MlflowClient()
    try:
        aliases = client.get_registered_model(cfg.registered_model).aliases  # {alias: version}; search omits them
    except MlflowException as e:
        if _not_found(e):
            return {}
        raise
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for v in client.search_model_versions(f"name = '{cfg.registered_model}'"):
        named = sorted(a for a, ver in aliases.items() if str(ver) == str(v.version))
        out.setdefault(v.run_id, []).append((str(v.version), named))
    return {k: sorted(v, key=lambda x: int(x[0])) for k, v in out.items()}


def promote(cfg: TrackingConfig, target: str, alias: str) -> tuple[str, str | None]:
    """Point ``alias`` at version ``target`` (a number) or at the version run ``target`` registered.

    Returns ``(version, the version the alias pointed at before or None)``.
    """
    name = cfg.registered_model
    if not name:
        raise FluxfillError("tracking.registered_model is null: there is no registered model to promote in")
    tracking.connect(cfg)
    client = mlflow.MlflowClient()
    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if _not_found(e) or "not found" in str(e).lower():
            before = None
        elif e.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE):  # MLflow's own check of the alias name
            raise FluxfillError(f"--alias {alias!r}: {e.message}") from None
        else:
            raise
    try:
        if target.isdigit():
            ver = str(client.get_model_version(name, target).version)
        else:
            versions = run_versions(client, name, target)
            if not versions:
                raise FluxfillError(f"run {target} registered no version of {name!r}: a run registers one when its "
                                    "training finishes; `fluxfill compare` lists the runs with versions")
            ver = str(versions[0].version)
        client.set_registered_model_alias(name, alias, ver)
    except MlflowException as e:
        if _not_found(e) or "not found" in str(e).lower():
            raise FluxfillError(f"{name!r} has no version {target} at {mlflow.get_tracking_uri()}; "
                                "`fluxfill compare` lists the runs with versions") from e
        raise
    return ver, before


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="VERSION|RUN_ID", help="a version number, or the run that registered it")
    parser.add_argument("--alias", required=True, help="the alias to set, e.g. champion")


def run(params: Params, args) -> int:
    ver, before = promote(params.tracking, args.target, args.alias)
    name = params.tracking.registered_model
    was = "new alias" if before is None else ("unchanged" if before == ver else f"was version {before}")
    print(f"{name}@{args.alias} -> version {ver} ({was}); use it with --model models:/{name}@{args.alias}")
    return 0
