"""Shared by the benchmarks: a tiny workspace (demo-like data + latent cache), timing and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fluxfill.config import validate

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import diffusers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cores": os.cpu_count(), "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def write_result(name: str, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "figures": figures}, indent=2) + "\n")
    print(f"-> {path}")
    return path


def params(root: Path, panel: int = 512, **sections):
    raw = {"data": {"panel_size": panel, "output": str(root / "prepared")},
           "encode": {"output": str(root / "latents")},
           "train": {"output": str(root / "models"), "checkpoint_dir": str(root / "checkpoints")},
           "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return validate(raw)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
