"""The DVC workspace the flows drive: params overrides, stage order, staleness, stage runs.

No Prefect here: the flows in :mod:`flows.pipeline` wrap these functions in tasks. Everything runs
against one repository root (the folder holding ``dvc.yaml``); stages run as ``dvc repro
--single-item <stage>`` subprocesses, exactly what ``dvc repro`` would run, so ``dvc.lock`` stays
true and a ``dvc repro`` afterwards has nothing to do.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fluxfill.config import PARAMS_FILE, ConfigError, Params, apply_overrides, flatten, load_params

TAIL_LINES = 30  # lines of a failed stage's output repeated in the error


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message holds the command, exit code and the output's tail."""


@dataclass
class StageRun:
    """What happened to one stage: ``ran``, ``restored`` (from DVC's run cache) or ``up to date``."""

    stage: str
    status: str
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- params
def normalize_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"train": {"max_steps": 5}}`` or ``{"train.max_steps": 5}`` -> ``{"train.max_steps": 5}``.

    Nested mappings are flattened to dotted keys, so an override never replaces a whole section.
    """
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides must be a mapping of dotted keys to values, e.g. {{\"train.max_steps\": 50}}; got {overrides!r}"
        )
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        key = str(key).strip()
        if isinstance(value, Mapping) and value:
            flat.update({f"{key}.{k}": v for k, v in flatten(dict(value)).items()})
        else:
            flat[key] = value
    for key in flat:
        if len([p for p in key.split(".") if p]) < 2:
            raise ConfigError(f"override {key!r}: the key must name a section and a key, e.g. train.max_steps")
    return flat


def validate_overrides(root: Path, overrides: Mapping[str, Any] | None) -> tuple[Params, dict[str, Any]]:
    """Validate ``overrides`` on top of ``<root>/params.yaml`` with the typed config; nothing is written.

    Returns the validated params and the flattened overrides; raises :class:`ConfigError` naming the key.
    """
    flat = normalize_overrides(overrides)
    return load_params(root / PARAMS_FILE, flat), flat


def _yaml():
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        pass

    # keep `null` spelled out, as params.yaml writes it (ruamel's round trip would write nothing)
    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yaml = YAML()  # round trip: comments, key order and quoting survive
    yaml.Representer = Representer
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold long strings such as data.prompt_template
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _inline(value: Any) -> str | None:
    """``value`` as YAML on one line (``64``, ``none``, ``null``, ``'a: b'``, ``[a, b]``), None if it needs more."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").rstrip("\n")
    return None if "\n" in text else text


def _replace_value(line: str, col: int, text: str) -> str | None:
    """``line`` with the one-line scalar starting at ``col`` replaced by ``text``, its comment kept in place."""
    rest = line[col:]
    if not rest.strip() or rest[0] in "[{|>&*!":  # collections, block scalars, anchors: not handled here
        return None
    if rest[0] in "'\"":
        close = rest.find(rest[0], 1)
        while rest[0] == "'" and close != -1 and rest[close + 1:close + 2] == "'":  # '' escapes a quote
            close = rest.find("'", close + 2)
        if close == -1 or (rest[0] == '"' and "\\" in rest[:close]):
            return None
        tail = rest[close + 1:]
    else:
        m = re.search(r"\s#", rest)
        tail = rest[m.start():] if m else ""
    if not tail.strip():
        return line[:col] + text
    comment = len(rest) - len(tail.lstrip())  # the comment's column, relative to col
    return line[:col] + text + " " * max(1, comment - len(text)) + tail.lstrip()


def write_params(path: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted ``overrides`` in the params file, keeping its comments; returns ``{key: (old, new)}``.

    Keys whose value is already the same are left alone; the file is rewritten only if something changed.
    A changed one-line value is replaced in place, so the rest of the file stays byte for byte (a
    ``git diff`` shows just the overrides); anything else (new keys, multi-line values) goes through
    ruamel.yaml's round trip, which keeps comments but may re-flow long lists.
    Validate first (:func:`validate_overrides`): this function writes what it is given.
    """
    from ruamel.yaml.comments import CommentedMap

    rt = _yaml()
    original = path.read_text() if path.exists() else ""
    data = rt.load(original) if original.strip() else None
    data = CommentedMap() if data is None else data
    lines = original.splitlines(keepends=True)
    changed: dict[str, tuple[Any, Any]] = {}
    in_place = True
    missing = object()
    for key, value in normalize_overrides(overrides).items():
        *sections, name = [p for p in key.split(".") if p]
        node = data
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = CommentedMap()
            node = node[part]
        old = node.get(name, missing)
        if old is not missing and old == value and isinstance(old, type(value)):  # 1 -> true is a change
            continue
        changed[key] = (None if old is missing else old, value)
        edited = None
        if old is not missing and not isinstance(old, dict | list) and (text := _inline(value)) is not None:
            (key_line, _), (line_no, col) = node.lc.key(name), node.lc.value(name)
            if key_line == line_no < len(lines):
                edited = _replace_value(lines[line_no].rstrip("\r\n"), col, text)
        if edited is None:
            in_place = False
        else:
            lines[line_no] = edited + lines[line_no][len(lines[line_no].rstrip("\r\n")):]
        node[name] = value
    if not changed:
        return changed
    text = "".join(lines)
    expected = apply_overrides(yaml.safe_load(original) or {}, dict(normalize_overrides(overrides)))
    if not in_place or yaml.safe_load(text) != expected:  # the in-place edit must mean what was asked
        stream = io.StringIO()
        rt.dump(data, stream)
        text = stream.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return changed


# ------------------------------------------------------------------------------------------ DVC
def pipeline_stages(root: Path) -> list[str]:
    """The stages of ``dvc.yaml`` that run a command, in the order ``dvc repro`` runs them."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with Repo(str(root)) as repo:
        order = plan_repro(get_active_graph(repo.index.graph))
        return [s.addressing for s in order if getattr(s, "cmd", None)]


def _describe(reason: Any) -> str:
    if isinstance(reason, str):
        return reason
    parts = []
    for kind, what in reason.items():
        if isinstance(what, dict):
            items = []
            for name, state in what.items():
                items.append(f"{name} ({', '.join(state)})" if isinstance(state, dict) else f"{name} ({state})")
            parts.append(f"{kind}: {', '.join(items)}")
        else:
            parts.append(f"{kind}: {what}")
    return "; ".join(parts)


def stale_reasons(root: Path, stage: str) -> list[str]:
    """Why ``stage`` is out of date (what ``dvc status <stage>`` says); empty when it is up to date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[stage])
    return [_describe(r) for r in status.get(stage, [])]


def workspace_status(root: Path) -> dict[str, list[str]]:
    """``dvc status`` of every stage: ``{stage: [reasons]}``, empty when everything is up to date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status()
    return {stage: [_describe(r) for r in reasons] for stage, reasons in status.items()}


def stage_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for stage subprocesses: this interpreter's bin folder first on PATH.

    DVC runs each stage's ``cmd`` (``fluxfill <stage>``) through the shell, so the venv's console
    scripts must be found even when the serving process was started without activating the venv.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir])
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the log as they are printed
    env.setdefault("TQDM_MININTERVAL", "10")  # progress bars: one log line per 10 s, not per step
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_stage(root: Path, stage: str, emit: Callable[[str], None] = print) -> StageRun:
    """Run ``dvc repro --single-item <stage>`` in ``root``, passing each output line to ``emit``.

    Raises :class:`StageFailed` with the tail of the output when the stage exits non-zero, after putting
    back the outputs of the last successful run (:func:`restore_outputs`); ``dvc.lock`` is left as it was.
    """
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    status = "up to date"
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1, start_new_session=True,  # own group: stopped as a whole
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            emit(line)
            if line.startswith(f"Running stage '{stage}'"):
                status = "ran"
            elif line.startswith(f"Stage '{stage}' is cached"):
                status = "restored"
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (flow run cancelled): stop the stage and its children
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - start
    if rc != 0:
        raise StageFailed(
            f"stage {stage!r} failed (exit code {rc}) after {seconds:.1f} s: `dvc repro --single-item {stage}` "
            f"in {root}; {restore_outputs(root, stage)}. Last lines:\n" + "\n".join(tail)
        )
    return StageRun(stage, status, round(seconds, 2))


def restore_outputs(root: Path, stage: str) -> str:
    """Put back the outputs ``dvc.lock`` records for ``stage`` (``dvc checkout --force <stage>``); says what it did.

    DVC deletes a stage's outputs before running its command, so a failed run would otherwise leave
    none; the last good ones, metrics and plots included, are in DVC's cache.
    """
    proc = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", stage], cwd=root, env=stage_env(),
                          capture_output=True, text=True, errors="replace")
    if proc.returncode == 0:
        return f"its outputs from the last successful run are restored (dvc checkout {stage})"
    why = " ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip())
    return f"its earlier outputs could not be restored: `dvc checkout {stage}` says {why or proc.returncode!r}"


def save_experiment(root: Path, name: str) -> str:
    """``dvc exp save -n <name>``: record the workspace (params, dvc.lock, metrics) as a DVC experiment.

    Returns DVC's message; raises :class:`StageFailed` with it when DVC refuses (e.g. the name exists).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "save", "-n", name], cwd=root, env=stage_env(),
        capture_output=True, text=True, errors="replace",
    )
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise StageFailed(f"`dvc exp save -n {name}` failed (exit code {proc.returncode}): {out}")
    return out


# -------------------------------------------------------------------------------------- outputs
def metrics_files(root: Path) -> dict[str, str]:
    """The metrics files declared in ``dvc.yaml``: ``{path relative to root: stage}``, in pipeline order."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        base = Path(repo.root_dir)
        return {Path(o.fs_path).relative_to(base).as_posix(): s.addressing
                for s in repo.index.stages for o in s.outs if o.metric}
