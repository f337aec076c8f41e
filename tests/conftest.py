"""Shared fixtures: tiny models (built once per session), isolated Prefect/MLflow homes, no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Isolate tools that write to the home folder or phone home, before any of them is imported.
_home = tempfile.mkdtemp(prefix="fluxfill-test-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_home, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The file-mode tests expect 0o666 & ~umask; under a 077 umask that is the 0600 safetensors writes by itself,
# and they could not fail. 022 for the whole session (subprocesses inherit it).
os.umask(0o022)

import pytest  # noqa: E402
import torch  # noqa: E402

from fluxfill.config import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _copy_repo(dest: Path) -> Path:
    """The checkout's tracked files (as they are on disk) in ``dest``, committed in a fresh git repo.

    Untracked files stay behind: a local mlflow.db, data/ or .fluxfill/ would make the copy depend on what
    ran in this checkout before.
    """
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    git = ["git", "-c", "user.name=fluxfill", "-c", "user.email=fluxfill@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session")
def copy_repo():
    """``copy_repo(dest)``: a committed copy of the repository's tracked files in ``dest``."""
    return _copy_repo


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A committed copy of the repository's tracked files in ``tmp_path/repo``."""
    return _copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(preset="tiny")


@pytest.fixture(scope="session")
def tiny(tiny_cfg):
    """Every tiny component by name, built once."""
    from fluxfill.models import COMPONENTS, load_component

    torch.manual_seed(0)
    return {name: load_component(tiny_cfg, name, "cpu") for name in COMPONENTS}


def write_model_dir(folder, panel: int = 64, fusion_mode: str = "learned", msl: int = 16, **eval_settings):
    """A trained-looking tiny model folder, as `fluxfill train` writes it: LoRA (non-zero B, alpha 8, rank 4) with
    adapter metadata, fusion file (α 0.3) and fluxfill_model.json; returns the params it was "trained" with."""
    from diffusers import FluxFillPipeline
    from peft.utils import get_peft_model_state_dict

    from fluxfill.config import validate
    from fluxfill.fusion import SemanticFusion
    from fluxfill.models import add_lora, load_component
    from fluxfill.registry import write_spec

    params = validate({"data": {"panel_size": panel}, "model": {"max_sequence_length": msl},
                       "train": {"output": str(folder), "lora": {"rank": 4, "alpha": 8}},
                       "fusion": {"mode": fusion_mode}, "eval": eval_settings})
    transformer = add_lora(load_component(params.model, "transformer"), params.train.lora)
    g = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    FluxFillPipeline.save_lora_weights(folder / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer),
                                       transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    torch.manual_seed(3)
    SemanticFusion(fusion_mode, 32, 24, init=0.3).save(folder / "fusion.safetensors")
    write_spec(params, folder)
    return params


@pytest.fixture(scope="session")
def model_factory():
    """:func:`write_model_dir`: ``model_factory(folder, fusion_mode="none", num_inference_steps=2)``."""
    return write_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """One tiny model folder (64-px panels, fusion pooled) shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("trained") / "models"
    write_model_dir(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory; accelerate's per-process state is reset afterwards (a CLI run has one state,
    the tests run many trainings, with other precisions)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
