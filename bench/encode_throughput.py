"""Encode throughput of the latent-cache stage on the tiny preset, and the stage's own overhead.

For batch sizes 1, 4 and 8 it encodes the same 16 samples (512-px panels, shards of 8) from scratch and
reports samples/s and the ratio of the whole stage's wall time to the model calls measured alone:

- stage:        ``fluxfill.encode.encode`` from an empty cache (loading, PNG decoding, hashing, shard writes,
                model calls; what ``fluxfill encode`` runs);
- model calls:  the same ``encode_prompts`` / ``encode_diptychs`` / ``encode_references`` calls on the same
                batches, models already loaded and images already decoded in memory, nothing else running.

1.0 would be a stage whose I/O is entirely hidden behind the model calls. The model runs on one intra-op
thread (``FLUXFILL_BENCH_THREADS`` overrides), as the training-overhead bench does: on a GPU the model calls
leave the host's cores to the reader and writer threads, and on a small CPU machine one thread leaves them a
core; with every core in torch's pool the figure measures the threads taking turns on the same cores rather
than I/O hidden behind compute. ``fluxfill encode`` itself uses torch's default thread count. On the shared
2-core machine, two model-call runs in a row differ by up to ±5 % with one thread and ±20 % with two.

Stage and model-call runs alternate for ``ROUNDS`` rounds, each run first in every other round (the machine is
shared and noisy): the ratio is the median of the rounds' ratios (each pairs runs a few seconds apart), with
their spread; times are medians over rounds.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import params, write_result
from fluxfill import encode as encode_module
from fluxfill.latents import encode_diptychs, encode_prompts, encode_references, text_pipeline, vae_pipeline
from fluxfill.models import load_component
from tests.helpers import make_prepared

SAMPLES, PANEL, SHARD, ROUNDS, TARGET = 16, 512, 8, 7, 1.10


def batches(p, prepared: Path) -> list:
    """The stage's batches, shard by shard: rows of the manifest."""
    df = encode_module.read_manifest(prepared)
    shards = [df.iloc[s:s + p.encode.shard_size] for s in range(0, len(df), p.encode.shard_size)]
    return [b for sh in shards for b in encode_module._batches(sh, p.encode.batch_size)]


def model_calls_alone(p, prepared: Path) -> float:
    """Seconds inside the three families' encode calls on pre-decoded inputs (loading and decoding not timed)."""
    rows = batches(p, prepared)
    m = p.model
    inputs = [encode_module.model_inputs(prepared, b) for b in rows]
    text = text_pipeline(*[load_component(m, n) for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")])
    start = time.perf_counter()
    for b in rows:
        encode_prompts(text, list(b["prompt"]), m.max_sequence_length)
    total = time.perf_counter() - start
    del text
    vae = vae_pipeline(load_component(m, "vae"))
    start = time.perf_counter()
    for diptychs, masks, _ in inputs:
        encode_diptychs(vae, diptychs, masks)
    total += time.perf_counter() - start
    del vae
    encoder, processor = load_component(m, "image_encoder"), load_component(m, "image_processor")
    start = time.perf_counter()
    for _, _, references in inputs:
        encode_references(encoder, processor, references)
    return total + time.perf_counter() - start


def stage(p, root: Path) -> float:
    shutil.rmtree(root / "latents", ignore_errors=True)
    start = time.perf_counter()
    result = encode_module.encode(p, device="cpu")
    wall = time.perf_counter() - start
    assert result["complete"] and len(result["written"]) == 3 * SAMPLES // SHARD
    return wall


def main() -> dict:
    torch.set_num_threads(int(os.environ.get("FLUXFILL_BENCH_THREADS", "1")))
    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    figures = {}
    try:
        make_prepared(root / "prepared", SAMPLES, PANEL)
        stage(params(root, PANEL, encode={"batch_size": 1, "shard_size": SHARD}), root)  # warm-up: imports, tokenizers, caches
        for bs in (1, 4, 8):
            p = params(root, PANEL, encode={"batch_size": bs, "shard_size": SHARD})
            stages, alone = [], []
            for r in range(ROUNDS):  # which of the two runs first alternates, so a drift in load cancels
                if r % 2:
                    alone.append(model_calls_alone(p, root / "prepared"))
                stages.append(stage(p, root))
                if not r % 2:
                    alone.append(model_calls_alone(p, root / "prepared"))
            wall, inside = statistics.median(stages), statistics.median(alone)
            ratios = [s / a for s, a in zip(stages, alone, strict=True)]
            ratio = statistics.median(ratios)
            figures[f"batch_{bs}"] = {"samples_per_s": round(SAMPLES / wall, 3), "stage_s": round(wall, 3),
                                      "model_calls_alone_s": round(inside, 3),
                                      "stage_over_model_calls": round(ratio, 3),
                                      "stage_over_model_calls_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                                      "rounds": {"stage_s": [round(s, 3) for s in stages],
                                                 "model_calls_alone_s": [round(s, 3) for s in alone]}}
            print(f"encode batch {bs}: {SAMPLES / wall:6.2f} samples/s  stage {wall:6.2f} s  model calls alone "
                  f"{inside:6.2f} s  stage/model-calls {ratio:.3f} ({min(ratios):.3f}..{max(ratios):.3f}, "
                  f"median of {ROUNDS} rounds; target <= {TARGET})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures["target_stage_over_model_calls"] = TARGET
    figures["threads"] = torch.get_num_threads()
    write_result("encode_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
