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
