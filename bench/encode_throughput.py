"""Encode throughput of the latent-cache stage on the tiny preset, and the stage's own overhead.

For batch sizes 1, 4 and 8 it encodes the same 16 samples (512-px panels) from scratch and reports
samples/s, and the ratio of the whole stage's wall time to the time spent inside the VAE / text / vision
encoder calls (1.0 would be a stage with no overhead at all: loading, PNG decoding, shard writing...).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.common import params, write_result
from fluxfill import encode as encode_module
from tests.helpers import make_prepared

SAMPLES, PANEL = 16, 512


def timed(fn, bucket: list):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)
    return wrapper


def main() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    make_prepared(root / "prepared", SAMPLES, PANEL)
    figures = {}
    calls: list[float] = []
    originals = {n: getattr(encode_module, n) for n in ("encode_prompts", "encode_diptychs", "encode_references")}
    for n, fn in originals.items():
        setattr(encode_module, n, timed(fn, calls))
    try:
        encode_module.encode(params(root, PANEL, encode={"batch_size": 1}), device="cpu")  # warm-up: imports, caches
        for bs in (1, 4, 8):
            shutil.rmtree(root / "latents", ignore_errors=True)
            calls.clear()
            p = params(root, PANEL, encode={"batch_size": bs, "shard_size": 8})
            start = time.perf_counter()
            encode_module.encode(p, device="cpu")
            wall = time.perf_counter() - start
            inside = sum(calls)
            figures[f"batch_{bs}"] = {"samples_per_s": round(SAMPLES / wall, 3), "stage_s": round(wall, 3),
                                      "model_calls_s": round(inside, 3), "stage_over_model_calls": round(wall / inside, 3)}
            print(f"encode batch {bs}: {SAMPLES / wall:6.2f} samples/s  stage {wall:6.2f} s  "
                  f"model calls {inside:6.2f} s  stage/model-calls {wall / inside:.3f}")
    finally:
        for n, fn in originals.items():
            setattr(encode_module, n, fn)
        shutil.rmtree(root, ignore_errors=True)
    write_result("encode_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
