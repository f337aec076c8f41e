"""Settings cannot destroy data: where a stage may write, and one training per workspace.

**The repository** is ``git rev-parse --show-toplevel`` of the working directory (inside DVC's queued
experiment workspaces, ``.dvc/tmp/exps/...``, that is the workspace itself); outside git it is
:func:`fluxfill.config.repo_root`. Each stage calls :func:`check_outputs` before it writes or deletes
anything: every path it writes (its ``*.output`` key, ``train.checkpoint_dir``, its metrics and plots
files) must lie inside the repository, must not be its root, and must neither be, contain nor lie inside
a tracked file, a project file (:data:`PROTECTED`: ``.git``, ``.dvc``, ``dvc.yaml``, ``params.yaml``, ...),
the fluxfill package, another output of any stage, or the raw data (``data.path``). A bad path is refused with a message naming the
key (exit code 1). Past the check, stages delete only files they write themselves.

:func:`training_lock` is an OS file lock (``flock``) on ``<repository>/.fluxfill/train.lock``: a second
``fluxfill train`` in the same workspace is refused at once, naming the process that holds it, as
``dvc repro`` does for itself. The kernel drops the lock when its process dies, so a crash leaves none.
The ranks of one multi-process launch are one training: a rank with ``LOCAL_RANK`` > 0 does not take it
(``accelerate launch``/``torchrun`` set it; local rank 0 does), and a process started by the holder
(``FLUXFILL_TRAIN_LOCK`` in its environment names the holder's pid) runs under its parent's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .artifacts import EVAL_METRICS, TRAIN_METRICS, TRAIN_PLOT, VAL_PLOT
from .config import FluxfillError, Params, repo_root

# project files no output may be, contain or lie in (besides tracked files); mlflow.db and mlartifacts are
# tracking.DB_FILE and tracking.ARTIFACTS_DIR, the default MLflow store
PROTECTED = (".git", ".dvc", "dvc.yaml", "dvc.lock", "params.yaml", ".fluxfill", "mlflow.db", "mlartifacts")
# files written by a stage at fixed paths
FIXED_OUTPUTS = {"train": (TRAIN_METRICS, TRAIN_PLOT, VAL_PLOT), "evaluate": (EVAL_METRICS,)}
LOCK_FILE = Path(".fluxfill") / "train.lock"
LOCK_ENV = "FLUXFILL_TRAIN_LOCK"


class UnsafePath(FluxfillError):
    """An output path that could overwrite or delete something the stage did not create."""


class TrainingRunning(FluxfillError):
    """Another training holds this workspace's lock."""


def repository(cwd: str | os.PathLike | None = None) -> Path:
    """``git rev-parse --show-toplevel`` of ``cwd``; outside git, :func:`fluxfill.config.repo_root`."""
    here = Path(cwd or os.getcwd())
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return Path(out.stdout.strip())
    return repo_root(here)


def stage_outputs(params: Params) -> dict[str, dict[str, str]]:
    """``{stage: {key: path}}``: every path each stage writes, by the params key that sets it."""
    return {
        "prepare": {"data.output": params.data.output},
        "encode": {"encode.output": params.encode.output},
        "train": {"train.output": params.train.output, "train.checkpoint_dir": params.train.checkpoint_dir,
                  **{f: f for f in FIXED_OUTPUTS["train"]}},
        "evaluate": {"eval.output": params.eval.output, **{f: f for f in FIXED_OUTPUTS["evaluate"]}},
    }


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute and normalised (``..`` removed) without resolving symlinks: a linked data folder stays inside."""
    return Path(os.path.abspath(path))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _tracked(root: Path) -> list[Path]:
    """Files git tracks in ``root`` (none outside git), as absolute paths."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [root / f for f in out.stdout.decode().split("\0") if f]


def _name(key: str, raw: str) -> str:
    """``train.output='models'`` for a params key, ``metrics/train.json`` for a fixed file."""
    return key if key == raw else f"{key}={raw!r}"


def _fix(key: str, raw: str) -> str:
    if key == raw:  # a file at a fixed path: the other key is the one to change
        return "change the other path"
    section, field = key.split(".")
    default = type(getattr(Params(), section)).model_fields[field].default
    return f"set {key} to a folder of its own inside the repository (default: {default})"


def check_outputs(params: Params, stage: str, root: Path | None = None) -> None:
    """Refuse (:class:`UnsafePath`, naming the key) any path ``stage`` writes that is not safe to write."""
    from . import sources

    root = _absolute(root or repository())
    outputs = stage_outputs(params)
    every = [(key, raw, _absolute(raw), "another output") for paths in outputs.values() for key, raw in paths.items()]
    every.append(("data.path", params.data.path, _absolute(params.data.path), "the raw data prepare reads"))
    protected = [root / p for p in PROTECTED] + [sources.PACKAGE_DIR]
    tracked = _tracked(root)
    mine = [(key, _absolute(raw), _name(key, raw), _fix(key, raw)) for key, raw in outputs[stage].items()]
    for _, path, name, fix in mine:  # first each path on its own, then against the others
        if path == root:
            raise UnsafePath(f"{name} is the repository root {root}: writing there would replace the project; {fix}")
        if root not in path.parents:
            raise UnsafePath(f"{name} ({path}) lies outside the repository {root}; {fix}")
        for p in protected:
            if _overlap(path, p):
                what = p.relative_to(root) if root in p.parents else p
                raise UnsafePath(f"{name} ({path}) overlaps {what}, which is part of the project; {fix}")
        if (hit := next((t for t in tracked if _overlap(path, t)), None)) is not None:
            raise UnsafePath(f"{name} ({path}) overlaps {hit.relative_to(root)}, a file tracked by git; {fix}")
    for key, path, name, fix in mine:
        for other_key, other_raw, other, what in every:
            if other_key != key and _overlap(path, other):
                raise UnsafePath(f"{name} ({path}) overlaps {_name(other_key, other_raw)} ({other}), {what}; {fix}")


# ------------------------------------------------------------------------------------------------ the lock
def _holder(path: Path) -> dict | None:
    """What the lock's holder wrote into it: pid, command, start time; None while it is starting up."""
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and {"pid", "command", "started"} <= set(info) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if info is None:
        return "a process that is starting up"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
    return f"pid {info['pid']} (`{info['command']}`, since {since})"


@contextlib.contextmanager
def training_lock(root: Path | None = None) -> Iterator[None]:
    """Hold this workspace's training lock for the block; :class:`TrainingRunning` if another training has it."""
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a worker rank of a launch: its local rank 0 holds the lock
        yield
        return
    path = (root or repository()) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fd = None
    if fd is None:
        holder = _holder(path)
        if holder is None or os.environ.get(LOCK_ENV) != str(holder["pid"]):
            raise TrainingRunning(
                f"another training is running in this workspace: {_describe(holder)}, holding {path}; wait for it "
                "to finish or stop it (Ctrl-C in its terminal, or kill -INT <pid>), then run `fluxfill train` again")
        yield  # started by the holder (a launcher and its ranks): the same training
        return
    previous = os.environ.get(LOCK_ENV)
    try:
        os.ftruncate(fd, 0)
        command = shlex.join(["fluxfill", *sys.argv[1:]] if Path(sys.argv[0]).name == "fluxfill" else sys.argv)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "started": time.time()}).encode())
        os.environ[LOCK_ENV] = str(os.getpid())
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = previous
        os.ftruncate(fd, 0)  # a stale description never names a process that is gone
        os.close(fd)
