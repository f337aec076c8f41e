"""Test helpers that the benchmarks share (benchmarks import from here, never the other way round)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fluxfill.panels import build_panels


def make_prepared(root: Path, n: int, panel: int, seed: int = 0, val: int = 1) -> Path:
    """A data/prepared folder like `fluxfill prepare` writes: triptych PNGs + manifest.csv of random images.

    The first ``val`` samples are the validation split. Tests and benchmarks share it.
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
