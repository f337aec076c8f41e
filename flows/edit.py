"""Prefect flow ``edit-batch``: a folder of images in, a folder of edited images out (`fluxfill edit`).

    prefect deployment run 'edit-batch/local' -p source=photos -p out=edited \
        -p reference=ref.jpg -p model=models:/fluxfill-diptych@champion --watch

Relative paths are taken from the repository root (where ``python -m flows.serve`` runs the flows). Bad inputs
fail the flow run before anything is written, with every problem listed, as `fluxfill edit` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fluxfill.config import PARAMS_FILE, load_params, repo_root
from fluxfill.edit import run_edit


def _in_repo(root: Path, path: str) -> str:
    return str(path if Path(path).is_absolute() else root / path)


@flow(name="edit-batch")
def edit_batch(source: str, out: str, model: str | None = None, reference: str | None = None,
               prompt: str | None = None, seed: int | None = None, steps: int | None = None,
               guidance: float | None = None, batch_size: int = 4, side_by_side: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
    """Edit every image of the folder (or glob) ``source`` into ``out`` with the model ``model``.

    model: a model folder or an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID);
      default: models/ of the repository.
    steps, guidance, seed, prompt: default to the model's evaluation settings and training prompt.
    """
    logger = get_run_logger()
    root = repo_root()
    params = load_params(root / PARAMS_FILE)
    if model and not model.startswith(("models:/", "runs:/")):
        model = _in_repo(root, model)
    editor, written = run_edit(params, [_in_repo(root, source)], _in_repo(root, reference) if reference else None,
                               _in_repo(root, out), model, side_by_side=side_by_side, overwrite=overwrite,
                               batch_size=batch_size, prompt=prompt, seed=seed, steps=steps, guidance=guidance)
    logger.info("edited %d image(s) into %s with %s", len(written), out, editor.source)
    alpha = "none (fusion mode none)" if editor.alpha is None else f"{editor.alpha:.4f}"
    create_markdown_artifact(f"# edit-batch\n\n{len(written)} image(s) from `{source}` into `{out}`\n\n"
                             f"- model: `{editor.source}`\n- fusion weight α: {alpha}\n",
                             key="edit-batch-summary", description="what was edited with which model")
    if written:
        create_table_artifact([{"output": str(p)} for p in written], key="edit-batch-outputs",
                              description="the edited images")
    return {"written": [str(p) for p in written], "model": editor.source, "alpha": editor.alpha}
