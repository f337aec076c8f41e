"""Shared fixtures: tiny models (built once per session), isolated Prefect/MLflow homes, no network."""

from __future__ import annotations

import os
import tempfile

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


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(preset="tiny")


@pytest.fixture(scope="session")
def tiny(tiny_cfg):
    """Every tiny component by name, built once."""
    from fluxfill.models import COMPONENTS, load_component

    torch.manual_seed(0)
    return {name: load_component(tiny_cfg, name, "cpu") for name in COMPONENTS}
