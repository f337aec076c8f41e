"""DVC records exactly what ran: names and paths written once, exact deps and params, byte-identical outputs.

The dependency test computes what each stage runs (the imports of `fluxfill <stage>` at any depth, and the
package data they read) and checks dvc.yaml against it; the `dvc status` tests run the real DVC in a copy of
the repository with a stand-in lock (`dvc commit` over placeholder outputs), so they need no training.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from flows.workspace import write_params
from fluxfill import artifacts
from fluxfill.cli import COMMANDS
from fluxfill.config import Params, flatten, load_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "encode", "train", "evaluate")
# what each stage reads from the stages before it: the params naming those outputs
DATA_DEPS = {"prepare": [], "encode": ["data.output"], "train": ["encode.output"],
             "evaluate": ["data.output", "train.output"]}
# the keys that change no output (log cadence, checkpoints, workers, tracking): listed by no stage
NO_OUTPUT_KEYS = {"train.log_every": 7, "train.checkpoint_every": 3, "train.keep_checkpoints": 5,
                  "train.sample_every": 2, "train.num_workers": 1, "train.checkpoint_dir": "elsewhere",
                  "tracking.experiment": "other", "tracking.run_name": "named", "tracking.tracking_uri": "sqlite:///x.db"}


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True)


def stages(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml as DVC resolves it: ``{stage: {"deps": [...], "params": [...], "outs": [...]}}``."""
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.name: {
            "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
            "params": [p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params],
            "outs": [o.def_path for o in s.outs],
        } for s in repo.index.stages}


# --------------------------------------------------------------------------------------- sources
def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if name.split(".")[0] == "fluxfill" and candidate.is_file():
            return candidate
    return None


def _imported_names(file: Path) -> set[str]:
    """Every module an Import/ImportFrom anywhere in ``file`` names (inside functions too), relative ones resolved."""
    package = file.relative_to(ROOT).parent.parts
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from . import tracking` is a module
    return names


def _data_dirs(file: Path) -> set[str]:
    """Package data folders (the shallowest folders under ``fluxfill/`` that hold files) whose path parts all
    appear as strings in ``file``: ``fluxfill/configs`` for ``... / "configs"``, ``fluxfill/weights/tiny`` for
    ``... / "weights" / "tiny"``."""
    package = ROOT / "fluxfill"
    holders = [p for p in package.rglob("*") if p.is_dir() and "__pycache__" not in p.parts
               and any(f.is_file() for f in p.iterdir())]
    folders = [p.relative_to(package).parts for p in holders if p.parent == package or p.parent not in holders]
    used = {n.value for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.Constant)}
    return {package.joinpath(*parts).relative_to(ROOT).as_posix() for parts in folders if set(parts) <= used}


def stage_sources(stage: str) -> set[str]:
    """The project files `fluxfill <stage>` runs: the CLI, the stage's module and their imports at any depth."""
    todo = [_module_file("fluxfill.cli"), _module_file(COMMANDS[stage][0])]
    seen: set[Path] = set()
    while todo:
        file = todo.pop()
        if file is None or file in seen:
            continue
        seen.add(file)
        for name in _imported_names(file):
            parts = name.split(".")
            todo += [_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]  # a.b runs a/__init__
    files = {f.relative_to(ROOT).as_posix() for f in seen}
    return files.union(*(_data_dirs(f) for f in seen))


def test_each_stage_depends_on_exactly_the_files_it_runs():
    params = load_params(ROOT / "params.yaml").model_dump()
    resolved = stages()
    assert list(resolved) == list(STAGES)
    for stage in STAGES:
        data = {str(flatten(params)[key]) for key in DATA_DEPS[stage]}
        assert set(resolved[stage]["deps"]) == stage_sources(stage) | data, stage
    # the closure follows imports inside functions: train draws its sample grids with fluxfill.evaluate
    assert "fluxfill/sampling.py" in stage_sources("train") and "fluxfill/configs" in stage_sources("encode")
    assert {"fluxfill/weights/tiny", "fluxfill/configs"} <= stage_sources("encode") & stage_sources("evaluate")
    assert {"fluxfill/models.py", "fluxfill/latents.py"} <= stage_sources("train")
    assert {"fluxfill/fusion.py", "fluxfill/models.py", "fluxfill/panels.py"} <= stage_sources("evaluate")


def test_params_are_listed_key_by_key():
    leaves = set(flatten(Params().model_dump()))
    listed = {stage: s["params"] for stage, s in stages().items()}
    for stage, keys in listed.items():
        assert len(keys) == len(set(keys)) and set(keys) <= leaves, stage  # single keys, no whole sections
        assert not any(k.endswith(".output") for k in keys)  # paths are outs and deps, not params
        assert not set(NO_OUTPUT_KEYS) & set(keys), stage
    assert set(listed["prepare"]) == {k for k in leaves if k.startswith("data.")} - {"data.output"}
    assert "train.max_steps" in listed["train"] and "train.lora.target_modules" in listed["train"]
    assert {"train.lora.rank", "train.lora.alpha", "fusion.mode"} <= set(listed["evaluate"])


# ------------------------------------------------------------------------------------------ names
def test_paths_come_from_params_and_names_from_artifacts():
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    p = load_params(ROOT / "params.yaml")
    outs = {stage: s["outs"] for stage, s in stages().items()}
    assert outs == {
        "prepare": [p.data.output], "encode": [p.encode.output],
        "train": [p.train.output, artifacts.TRAIN_METRICS, artifacts.TRAIN_PLOT, artifacts.VAL_PLOT],
        "evaluate": [f"{p.eval.output}/{artifacts.EVAL_TABLE}", artifacts.EVAL_METRICS,
                     f"{p.eval.output}/{artifacts.EVAL_SAMPLES}"],
    }
    text = (ROOT / "dvc.yaml").read_text()
    assert "metrics/" not in text and "plots/" not in text and "- models" not in text  # no path written twice
    assert artifacts.LORA_WEIGHTS == LORA_WEIGHT_NAME_SAFE  # the file diffusers' load_lora_weights looks for
    # DVC sees every name: each constant of fluxfill/artifacts.py is a literal string
    from dvc.utils.serialize import load_py

    names = {k: v for k, v in vars(artifacts).items() if k.isupper()}
    assert load_py(ROOT / "fluxfill/artifacts.py") == names


def test_changed_path_param_moves_the_outputs(repo_copy):
    repo = repo_copy
    write_params(repo / "params.yaml", {"train.output": "weights", "eval.output": "evaluation"})
    resolved = stages(repo)
    assert resolved["train"]["outs"][0] == "weights" and "weights" in resolved["evaluate"]["deps"]
    assert resolved["evaluate"]["outs"][0] == f"evaluation/{artifacts.EVAL_TABLE}"


# -------------------------------------------------------------------------------------- dvc status
def _stand_in_lock(repo: Path) -> None:
    """Placeholder outputs for every stage, then `dvc commit`: a dvc.lock as if the pipeline had run."""
    for s in stages(repo).values():
        for out in s["outs"]:
            path = repo / out
            if Path(out).suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"stand-in for {out}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(f"stand-in for {out}\n")
    dvc(repo, "commit", "--force", "--quiet")


def _status(repo: Path) -> dict:
    return json.loads(dvc(repo, "status", "--json").stdout)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [*value, "proj_out"] if "proj_out" not in value else value[:-1]
    return "x" if value is None else f"{value}x"


def test_dvc_status_stale_exactly_for_what_changes_outputs(repo_copy):
    repo = repo_copy
    _stand_in_lock(repo)
    assert _status(repo) == {}

    write_params(repo / "params.yaml", NO_OUTPUT_KEYS)  # log cadence, checkpoints, workers, tracking
    assert _status(repo) == {}

    listed = {stage: s["params"] for stage, s in stages(repo).items()}
    values = flatten(load_params(repo / "params.yaml").model_dump())
    write_params(repo / "params.yaml", {k: _changed(values[k]) for keys in listed.values() for k in keys})
    status = _status(repo)
    for stage in STAGES:
        [reasons] = status[stage]
        assert set(reasons["changed deps"]["params.yaml"]) == set(listed[stage]), stage

    subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=repo, check=True)
    assert _status(repo) == {}
    sources = sorted({f for stage in STAGES for f in stage_sources(stage)})
    for f in sources:  # a comment at the end of every source file, a newline byte after each package data file
        for file in [repo / f] if f.endswith(".py") else sorted(p for p in (repo / f).rglob("*") if p.is_file()):
            file.write_bytes(file.read_bytes() + (b"\n# touched\n" if file.suffix == ".py" else b"\n"))
    status = _status(repo)
    for stage in STAGES:
        [reasons] = status[stage]
        assert set(reasons["changed deps"]) == stage_sources(stage), stage


# ------------------------------------------------------------------------------------ determinism
SMALL = {"data.panel_size": 64, "model.max_sequence_length": 32, "encode.shard_size": 8, "train.max_steps": 4,
         "train.checkpoint_every": 0, "eval.num_inference_steps": 1, "eval.max_samples": 2}
CHAIN = ("import sys\nfrom fluxfill.cli import main\n"
         "for stage in ('prepare', 'encode', 'train', 'evaluate'):\n"
         "    if main([stage]):\n        sys.exit(f'fluxfill {stage} failed')\n")


def test_canonical_safetensors_header_sorts_metadata_and_keeps_the_tensors(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    meta = {"format": "pt", "z": "1", "lora_adapter_metadata": '{"r": 4}', "c": "é"}
    save_file(tensors, tmp_path / "w.safetensors", metadata=meta)
    size = (tmp_path / "w.safetensors").stat().st_size
    artifacts.canonical_safetensors_header(tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
    assert header.index('"c"') < header.index('"format"') < header.index('"lora_adapter_metadata"') < header.index('"z"')
    assert len(raw) == size and all(torch.equal(v, tensors[k]) for k, v in load_file(tmp_path / "w.safetensors").items())
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == meta
    assert artifacts.canonical({"t": {"b", "a"}, "n": [{"c", "a"}], "x": 1}) == {"t": ["a", "b"], "n": [["a", "c"]],
                                                                                 "x": 1}


def _files(repo: Path, outs: list[str]) -> dict[str, bytes]:
    found = {}
    for out in outs:
        path = repo / out
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                found[f.relative_to(repo).as_posix()] = f.read_bytes()
    return found


def test_two_runs_write_byte_identical_outputs_and_dvc_lock(tmp_path, copy_repo):
    """The chain twice, in two processes with other hash seeds; the second also logs, checkpoints, draws
    sample grids and tracks differently (NO_OUTPUT_KEYS). Every output and the resulting dvc.lock are the same
    bytes, and no output holds a run id."""
    procs = []
    for name, seed, extra in (("a", "1", {}), ("b", "2", NO_OUTPUT_KEYS)):
        repo = copy_repo(tmp_path / name)
        write_params(repo / "params.yaml", {**SMALL, **extra})
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
               "MLFLOW_TRACKING_URI": "" if extra else f"sqlite:///{repo}/mlflow.db"}
        log = open(tmp_path / f"{name}.log", "w")
        procs.append((repo, log, subprocess.Popen([sys.executable, "-c", CHAIN], cwd=repo, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT)))
    for repo, log, proc in procs:
        assert proc.wait(timeout=900) == 0, Path(log.name).read_text()[-3000:]
        log.close()
        dvc(repo, "commit", "--force", "--quiet")
    (a, *_), (b, *_) = procs
    assert Path(b, "elsewhere").is_dir() and Path(b, "x.db").is_file()  # b checkpointed and tracked elsewhere
    outs = [o for s in stages(a).values() for o in s["outs"]]
    files_a, files_b = _files(a, outs), _files(b, outs)
    assert len(files_a) > 30 and "models/lora/pytorch_lora_weights.safetensors" in files_a
    assert [f for f in files_a if files_a[f] != files_b.get(f)] == [] and files_a.keys() == files_b.keys()
    assert (a / "dvc.lock").read_bytes() == (b / "dvc.lock").read_bytes()
    assert json.loads(files_a["metrics/train.json"]).keys() == {"loss", "fusion_weight", "steps", "val_loss", "val_loss_start"}
    assert len(files_a["plots/train.csv"].decode().splitlines()) == 1 + 4  # one row per step in both
    for repo in (a, b):
        [ref] = (repo / artifacts.RUN_REFS).glob("*.json")
        run_id = json.loads(ref.read_text())["run_id"].encode()
        assert not [f for f, data in files_a.items() if run_id in data]
    assert yaml.safe_load((a / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"] == {
        k: v for k, v in flatten(load_params(a / "params.yaml").model_dump()).items()
        if k in stages(a)["train"]["params"]}


def test_a_stage_failing_under_dvc_repro_says_how_to_put_its_outputs_back(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: fluxfill prepare\n    params: [data.panel_size]\n"
                                       "    outs: [out]\n")
    dvc(tmp_path, "init", "--no-scm", "-q")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def repro(panel_size: int) -> tuple[subprocess.CompletedProcess, list[str]]:
        (tmp_path / "params.yaml").write_text(f"data:\n  panel_size: {panel_size}\n  output: out\n")
        run = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        return run, [line for line in run.stderr.splitlines() if line.startswith("fluxfill prepare:")]

    run, lines = repro(500)  # the first run: dvc.lock records nothing to put back, no hint
    assert run.returncode != 0 and lines == [f"fluxfill prepare: {Path('params.yaml')}: 1 invalid setting(s):"]
    run, _ = repro(16)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.csv").exists()
    run, lines = repro(500)
    assert run.returncode != 0 and not (tmp_path / "out").exists()  # DVC removed the output before the stage ran
    assert lines == [f"fluxfill prepare: {Path('params.yaml')}: 1 invalid setting(s):",
                     "fluxfill prepare: DVC removed the outputs of stage prepare before running it; "
                     "`dvc checkout prepare` puts back the ones dvc.lock records"]
    assert dvc(tmp_path, "checkout", "prepare").returncode == 0  # the hint works
    assert (tmp_path / "out" / "manifest.csv").exists()
    # the same error outside DVC: no DVC hint
    direct = subprocess.run([Path(sys.executable).parent / "fluxfill", "prepare"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert direct.returncode == 2 and "DVC removed" not in direct.stderr
