"""Training-loop overhead and data-loader share, tiny preset, batch 4, 512-px panels, CPU.

Side by side in one run, on the same model (tiny transformer + LoRA + fusion) and batch shape:

- bare:  flow_matching_step -> backward -> AdamW step, on one fixed batch already in memory;
- ours:  `fluxfill.train.train` (data from the memory-mapped cache, accelerate, clipping, schedule, per-step
         MLflow logging of loss / fusion_weight / lr / grad_norm / samples_per_s, progress bar).

Per-step time is the median interval between consecutive forward passes (setup and final export excluded),
in process CPU time (all threads: torch's and MLflow's logging thread), which other jobs on a shared machine
disturb far less than wall time; wall time is reported beside it.
bare and ours alternate for 3 rounds (this machine is shared and noisy) and the ratio is of the medians
over rounds. The data-loader share is the
time spent reading and collating batches divided by our step time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fluxfill.train as train_module
from bench.common import params, write_result
from fluxfill.encode import LatentCache, encode
from fluxfill.fusion import SemanticFusion
from fluxfill.models import add_lora, load_component
from fluxfill.objective import flow_matching_step
from tests.helpers import make_prepared

SAMPLES, PANEL, BATCH, WARMUP, STEPS, ROUNDS = 16, 512, 4, 2, 8, 3


def bare_loop(p, cache) -> float:
    torch.manual_seed(0)
    transformer = add_lora(load_component(p.model, "transformer"), p.train.lora).train()
    item = cache[0]
    fusion = SemanticFusion.from_config(p.fusion, item["pooled_prompt_embeds"].shape[-1], item["image_embeds"].shape[-1])
    opt = torch.optim.AdamW([*(q for q in transformer.parameters() if q.requires_grad), *fusion.parameters()],
                            lr=p.train.learning_rate)
    batch = cache.collate([cache[i] for i in range(BATCH)])
    cpu, wall = [], []
    for step in range(WARMUP + STEPS):
        c, w = time.process_time(), time.perf_counter()
        out = flow_matching_step(transformer, fusion, batch, generator=torch.Generator().manual_seed(step))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu[WARMUP:]), statistics.median(wall[WARMUP:])


def our_loop(p) -> tuple[float, float, float]:
    stamps, walls, fetch = [], [], []
    real_step, real_getitem = train_module.flow_matching_step, LatentCache.__getitem__

    def stamped(*args, **kwargs):
        stamps.append(time.process_time())
        walls.append(time.perf_counter())
        return real_step(*args, **kwargs)

    def timed_getitem(self, i):
        start = time.perf_counter()
        try:
            return real_getitem(self, i)
        finally:
            fetch.append(time.perf_counter() - start)

    train_module.flow_matching_step, LatentCache.__getitem__ = stamped, timed_getitem
    try:
        train_module.train(p)
    finally:
        train_module.flow_matching_step, LatentCache.__getitem__ = real_step, real_getitem
    def median_interval(ts):
        return statistics.median([b - a for a, b in zip(ts, ts[1:], strict=False)][WARMUP:])

    step_wall = median_interval(walls)
    per_step_fetch = sum(fetch[(WARMUP + 1) * BATCH:]) / max(1, len(fetch) // BATCH - WARMUP - 1)
    return median_interval(stamps), step_wall, per_step_fetch / step_wall


def main() -> dict:
    # one intra-op thread: with two, a step waits for whichever core another job holds, and the noise
    # swamps a few-percent overhead (FLUXFILL_BENCH_THREADS overrides)
    torch.set_num_threads(int(os.environ.get("FLUXFILL_BENCH_THREADS", "1")))
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        make_prepared(root / "prepared", SAMPLES, PANEL)
        p = params(root, PANEL, train={"max_steps": WARMUP + STEPS + 1, "batch_size": BATCH, "log_every": 1,
                                       "checkpoint_every": 0, "sample_every": 0})
        encode(p, device="cpu")
        cache = LatentCache(p.encode.output, "train")
        bares, ours, bare_walls, our_walls, shares = [], [], [], [], []
        for r in range(ROUNDS):
            cpu, wall = bare_loop(p, cache)
            bares.append(cpu)
            bare_walls.append(wall)
            shutil.rmtree(root / "checkpoints", ignore_errors=True)
            cpu, wall, share = our_loop(p)
            ours.append(cpu)
            our_walls.append(wall)
            shares.append(share)
            print(f"round {r}: CPU s/step bare {bares[-1]:.3f} ours {ours[-1]:.3f} | "
                  f"wall s/step bare {bare_walls[-1]:.3f} ours {our_walls[-1]:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    bare, our, share = med(bares), med(ours), med(shares)
    wall_ratio = med(our_walls) / med(bare_walls)
    figures = {"bare_step_cpu_s": round(bare, 4), "our_step_cpu_s": round(our, 4),
               "overhead_ratio": round(our / bare, 4), "target_ratio": 1.05,
               "bare_step_wall_s": round(med(bare_walls), 4), "our_step_wall_s": round(med(our_walls), 4),
               "overhead_ratio_wall": round(wall_ratio, 4), "data_loader_share": round(share, 4),
               "rounds": {"bare_cpu": bares, "ours_cpu": ours, "bare_wall": bare_walls, "ours_wall": our_walls},
               "batch": BATCH, "panel_size": PANEL, "threads": torch.get_num_threads()}
    print(f"CPU time per step: bare {bare:.3f} s, ours {our:.3f} s, ratio {our / bare:.3f} (target <= 1.05) | "
          f"wall-time ratio {wall_ratio:.3f} | data-loader share {share:.2%}")
    write_result("train_overhead", figures)
    return figures


if __name__ == "__main__":
    main()
