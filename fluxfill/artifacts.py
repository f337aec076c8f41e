"""The name of every file a stage writes or reads back, in one place.

The stages, the flows and ``dvc.yaml`` all take their names from here: ``dvc.yaml`` loads the plain string
constants below as DVC template variables (``vars: [fluxfill/artifacts.py]``, then ``${TRAIN_METRICS}``) and
the folders from ``params.yaml`` (``${train.output}``), so a name or a path is written exactly once. DVC reads
only literal top-level assignments of this file: keep the names plain strings.

Outputs are byte-deterministic (no timings, run ids or dates; :func:`canonical` and
:func:`canonical_safetensors_header` remove the hash orders that Python sets and safetensors bring in).

A file that an earlier stage or run wrote can be damaged, truncated or from another version of fluxfill;
:func:`damaged` is the one message for all of them: the file, what is wrong, and the command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .config import FluxfillError

# ---------------------------------------------------------------------------------------- DVC outs
MANIFEST = "manifest.csv"                          # in data.output: one row per triptych
CACHE_META = "meta.json"                           # in encode.output: what the latent cache holds
CACHE_GEOMETRY = "geometry.safetensors"            # in encode.output: mask latents and position ids
LORA_DIR = "lora"                                  # in train.output: the diffusers LoRA folder
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # in LORA_DIR: diffusers' LORA_WEIGHT_NAME_SAFE
FUSION_FILE = "fusion.safetensors"                 # in train.output: the fusion module
SPEC_FILE = "fluxfill_model.json"                  # in train.output: what rebuilds the pipeline (ModelSpec)
TRAIN_METRICS = "metrics/train.json"               # final loss, fusion weight, steps
TRAIN_PLOT = "plots/train.csv"                     # one row per optimizer step
VAL_PLOT = "plots/val.csv"                         # val_loss at step 0, every train.val_every steps and the end
EVAL_METRICS = "metrics/eval.json"
EVAL_TABLE = "per_sample.csv"                      # in eval.output
EVAL_SAMPLES = "samples"                           # in eval.output: grid_000.png, ...

# ------------------------------------------------------------- per workspace, git-ignored, not DVC outs
LOCAL_DIR = ".fluxfill"
RUN_REFS = ".fluxfill/runs"                        # <models digest>.json: the MLflow run that trained them
TRAIN_TIMING = ".fluxfill/train_timing.json"       # samples/s and peak memory of the last training run
CHECKPOINT_STATE = "fluxfill_state.json"           # in each checkpoint: step, MLflow run, history
CHECKPOINT_LORA = "lora.safetensors"               # in each checkpoint: the LoRA weights (peft state dict)


def rebuild(stage: str) -> str:
    """The commands that rebuild the outputs of ``stage``."""
    return f"`dvc repro {stage}` (or `fluxfill {stage}`)"


def lora_weights(train_output: str | Path) -> Path:
    return Path(train_output, LORA_DIR, LORA_WEIGHTS)


def fusion_file(train_output: str | Path) -> Path:
    return Path(train_output, FUSION_FILE)


def first_line(error: BaseException | str) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


def damaged(path: str | Path, why: BaseException | str, stage: str | None = None, fix: str | None = None
            ) -> FluxfillError:
    """``<path>: <why>; rebuild it with `dvc repro <stage>` (or `fluxfill <stage>`)``, on one line.

    ``fix`` replaces the rebuild hint when the remedy is not a stage (a checkpoint, the run reference).
    """
    hint = fix or f"rebuild it with {rebuild(stage)}"
    return FluxfillError(f"{path}: {first_line(why)}; {hint}")


@contextlib.contextmanager
def reading(path: str | Path, stage: str | None = None, what: str = "file", fix: str | None = None
            ) -> Iterator[None]:
    """Turn any failure to parse ``path`` inside the block into :func:`damaged`'s one-line message."""
    try:
        yield
    except FluxfillError:
        raise
    except FileNotFoundError:
        raise damaged(path, f"{what} not found", stage, fix) from None
    except Exception as e:  # safetensors, pickle, JSON, CSV and image decoders each raise their own kinds
        raise damaged(path, f"damaged or truncated {what} ({first_line(e)})", stage, fix) from None


# -------------------------------------------------------------------------------------- deterministic bytes
def canonical(value):
    """``value`` with every set turned into a sorted list (peft keeps ``target_modules`` in a hash-ordered set)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def umask_mode(path: Path) -> None:
    """Give ``path`` the mode any new file gets (0o666 less the umask): safetensors' ``save_file`` creates 0600
    files, which another user (a shared model folder, ComfyUI run by someone else) cannot read."""
    os.chmod(path, _new_file_mode(Path(path).parent.resolve()))


@functools.cache
def _new_file_mode(folder: Path) -> int:
    """The mode a new file in ``folder`` gets, from one probe file per folder and process (reading the umask
    means setting it, which is not safe while other threads create files)."""
    probe = folder / f".fluxfill-{os.getpid()}.mode-probe"
    probe.touch()
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()


def canonical_safetensors_header(path: Path) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file in place.

    safetensors writes its metadata from a hash map, so a file with two keys (diffusers adds ``format``) changes
    its bytes from one process to the next. Sorting keeps the header's length: the data offsets stay valid.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False)
        padded = text.encode().ljust(n, b" ")
        if len(padded) != n:
            raise RuntimeError(f"{path}: re-serialised safetensors header is {len(padded)} bytes, not {n}")
        f.seek(8)
        f.write(padded)
