"""Fixed per-step cost of the training loop, tiny preset, batch 4, 128-px panels (a short step, so that a fixed cost stands out of the noise), CPU, one thread.

Side by side in one process, on the same model (tiny transformer + LoRA + fusion) and batch shape:

- bare:  ``flow_matching_step`` -> backward -> AdamW step -> zero_grad, on one fixed batch already in memory:
         the work a step cannot avoid;
- ours:  ``fluxfill.train.train``, the loop ``fluxfill train`` runs (data from the memory-mapped cache,
         ``fluxfill.step.train_step`` under accelerate, clipping, schedule, per-step metrics to MLflow,
         progress bar, per-step host work).

Each round runs ``fluxfill.train.train`` once; at every call of ``fluxfill.step.train_step`` (the function the
loop calls) one bare step runs first, on its own model. So bare and ours alternate step by step, and the
machine's load drifts equally over both. Per loop iteration, in process CPU time (all threads: torch's and
MLflow's logging thread):

    bare_k      main-thread CPU time of the bare step (one intra-op thread: it all runs on the main thread)
    ours_k      iteration k's process CPU time minus bare_k (so other threads' work counts as ours)
    overhead_k  ours_k - bare_k

A round's overhead is the median over its steps (warm-up excluded); the figure is the median over
``ROUNDS`` rounds, with the spread (min and max). Wall time is reported beside it, the same way. The
data-loader share is the time spent reading and collating batches divided by our step time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fluxfill.step as step_module
import fluxfill.train as train_module
from bench.common import params, write_result
from fluxfill.encode import LatentCache, encode
from fluxfill.fusion import SemanticFusion
from fluxfill.models import add_lora, load_component
from fluxfill.objective import flow_matching_step, model_dtype
from tests.helpers import make_prepared

SAMPLES, PANEL, BATCH, WARMUP, STEPS, ROUNDS, TARGET_MS = 16, 128, 4, 3, 30, 5, 5.0


class Bare:
    """The unavoidable work of a step, on its own model and a fixed batch; returns (main-thread CPU s, wall s)."""

    def __init__(self, p, cache):
        torch.manual_seed(0)
        self.transformer = add_lora(load_component(p.model, "transformer"), p.train.lora).train()
        item = cache[0]
        self.fusion = SemanticFusion.from_config(p.fusion, item["pooled_prompt_embeds"].shape[-1],
                                                 item["image_embeds"].shape[-1])
        self.opt = torch.optim.AdamW([*(q for q in self.transformer.parameters() if q.requires_grad),
                                      *self.fusion.parameters()], lr=p.train.learning_rate)
        self.batch, self.i = cache.collate([cache[i] for i in range(BATCH)]), 0
        self.dtype = model_dtype(self.transformer)  # looked up once, as fluxfill.step.Trainer does

    def __call__(self) -> tuple[float, float]:
        c, w = time.thread_time(), time.perf_counter()
        out = flow_matching_step(self.transformer, self.fusion, self.batch, generator=torch.Generator().manual_seed(self.i),
                                 dtype=self.dtype)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        return time.thread_time() - c, time.perf_counter() - w


def one_round(p, bare: Bare, root: Path) -> dict:
    """One run of fluxfill.train.train with a bare step before each of its steps; per-step medians."""
    marks, fetch = [], []  # (process CPU, wall, bare CPU, bare wall) at each train_step call
    real_step, real_getitem = step_module.train_step, LatentCache.__getitem__

    def paired(*args, **kwargs):
        c, w = time.process_time(), time.perf_counter()
        marks.append((c, w, *bare()))
        return real_step(*args, **kwargs)

    def timed_getitem(self, i):
        start = time.perf_counter()
        try:
            return real_getitem(self, i)
        finally:
            fetch.append(time.perf_counter() - start)

    step_module.train_step, LatentCache.__getitem__ = paired, timed_getitem
    try:
        with contextlib.chdir(root):  # train's metrics/, plots/ and .fluxfill/ land in the bench's folder
            train_module.train(p)
    finally:
        step_module.train_step, LatentCache.__getitem__ = real_step, real_getitem
    steps = list(zip(marks, marks[1:], strict=False))[WARMUP:]  # iteration k: from mark k to mark k+1
    bare_cpu = [a[2] for a, _ in steps]
    bare_wall = [a[3] for a, _ in steps]
    ours_cpu = [b[0] - a[0] - a[2] for a, b in steps]
    ours_wall = [b[1] - a[1] - a[3] for a, b in steps]
    med = statistics.median
    per_step_fetch = sum(fetch[(WARMUP + 1) * BATCH:]) / max(1, len(fetch) // BATCH - WARMUP - 1)
    return {"bare_cpu_s": med(bare_cpu), "ours_cpu_s": med(ours_cpu), "bare_wall_s": med(bare_wall),
            "ours_wall_s": med(ours_wall),
            "overhead_cpu_ms": med(1e3 * (o - b) for o, b in zip(ours_cpu, bare_cpu, strict=True)),
            "overhead_wall_ms": med(1e3 * (o - b) for o, b in zip(ours_wall, bare_wall, strict=True)),
            "data_loader_share": per_step_fetch / med(ours_wall)}


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> dict:
    # one intra-op thread: the bare step then runs on the main thread (its thread CPU time is all of it), and
    # a step does not wait for whichever core another job holds (FLUXFILL_BENCH_THREADS overrides)
    torch.set_num_threads(int(os.environ.get("FLUXFILL_BENCH_THREADS", "1")))
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        make_prepared(root / "prepared", SAMPLES, PANEL)
        p = params(root, PANEL, train={"max_steps": WARMUP + STEPS + 1, "batch_size": BATCH, "log_every": 1,
                                       "checkpoint_every": 0, "sample_every": 0},
                   eval={"num_inference_steps": 1})  # the end-of-run sample grid is not timed: keep it short
        encode(p, device="cpu")
        bare = Bare(p, LatentCache(p.encode.output, "train"))
        rounds: dict[str, list[float]] = {}
        for r in range(ROUNDS):
            shutil.rmtree(root / "checkpoints", ignore_errors=True)
            got = one_round(p, bare, root)
            for k, v in got.items():
                rounds.setdefault(k, []).append(v)
            print(f"round {r}: CPU s/step bare {got['bare_cpu_s']:.4f} ours {got['ours_cpu_s']:.4f} "
                  f"(overhead {got['overhead_cpu_ms']:+.1f} ms) | wall s/step bare {got['bare_wall_s']:.4f} "
                  f"ours {got['ours_wall_s']:.4f} (overhead {got['overhead_wall_ms']:+.1f} ms)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    figures = {"overhead_ms_per_step_cpu": _spread(rounds["overhead_cpu_ms"]),
               "overhead_ms_per_step_wall": _spread(rounds["overhead_wall_ms"]), "target_ms_per_step": TARGET_MS,
               "bare_step_cpu_s": round(med(rounds["bare_cpu_s"]), 4), "our_step_cpu_s": round(med(rounds["ours_cpu_s"]), 4),
               "bare_step_wall_s": round(med(rounds["bare_wall_s"]), 4), "our_step_wall_s": round(med(rounds["ours_wall_s"]), 4),
               "data_loader_share": round(med(rounds["data_loader_share"]), 4),
               "rounds": {k: [round(v, 5) for v in vs] for k, vs in rounds.items()},
               "batch": BATCH, "panel_size": PANEL, "steps_per_round": STEPS, "threads": torch.get_num_threads()}
    c, w = figures["overhead_ms_per_step_cpu"], figures["overhead_ms_per_step_wall"]
    print(f"training-loop overhead, median of {ROUNDS} rounds (min..max): CPU {c['median']:+.1f} ms/step "
          f"({c['min']:+.1f}..{c['max']:+.1f}), wall {w['median']:+.1f} ms/step ({w['min']:+.1f}..{w['max']:+.1f}); "
          f"target <= {TARGET_MS:.0f} ms/step | bare step {figures['bare_step_cpu_s']:.3f} s CPU | "
          f"data-loader share {figures['data_loader_share']:.2%}")
    write_result("train_overhead", figures)
    return figures


if __name__ == "__main__":
    main()
