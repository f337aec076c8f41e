"""Shared by the benchmarks: a tiny workspace (demo-like data + latent cache), timing and result files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fluxfill.config import validate
from fluxfill.panels import build_panels

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


def make_prepared(root: Path, n: int, panel: int, seed: int = 0, val: int = 1) -> Path:
    """A data/prepared folder like `fluxfill prepare` writes: triptych PNGs + manifest.csv of random images.

    The first ``val`` samples are the validation split. Benchmarks and tests share it.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        imgs = [Image.fromarray(rng.integers(0, 256, (panel, panel, 3), dtype=np.uint8)) for _ in range(3)]
        name = f"s{i:03d}.png"
        build_panels(imgs[1], imgs[2], imgs[0], panel).triptych.save(root / name)
        rows.append(dict(id=f"s{i:03d}", split="val" if i < val else "train", prompt=f"make sample {i} bright",
                         source="", target="", reference="", file=name,
                         sha256=hashlib.sha256((root / name).read_bytes()).hexdigest()))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


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
