"""Fixed per-step cost of the training loop, tiny preset, batch 4, 128-px panels (a short step, so that a fixed cost stands out of the noise), CPU, one thread.

Side by side in one process, on the same model (tiny transformer + LoRA + fusion) and batch shape:

- bare:  ``flow_matching_step`` -> backward -> AdamW step -> zero_grad, on one fixed batch already in memory
         and the trainer's own transformer and fusion (see :class:`Bare`): the work a step cannot avoid;
- ours:  ``fluxfill.train.train``, the loop ``fluxfill train`` runs (data from the memory-mapped cache,
         ``fluxfill.step.train_step`` under accelerate, clipping, schedule, per-step metrics to MLflow,
         progress bar, per-step host work).

Each round runs ``fluxfill.train.train`` once; at every call of ``fluxfill.step.train_step`` (the function the
loop calls) one bare step runs first, on the same weights. So bare and ours alternate step by step, and the
machine's load drifts equally over both. Per loop iteration, in process CPU time (all threads: torch's and
MLflow's logging thread):

    bare_k      main-thread CPU time of the bare step (one intra-op thread: it all runs on the main thread)
    ours_k      iteration k's process CPU time minus bare_k (so other threads' work counts as ours)
    overhead_k  ours_k - bare_k

A round's overhead is the median over its steps (warm-up excluded); the figure is the median over
``ROUNDS`` rounds, with the spread (min and max). Wall time is reported beside it, the same way. The
data-loader share is the time spent reading and collating batches divided by our step time.

Where the overhead goes: the loop's per-step functions (``SECTIONS``) are timed where they run, in main-thread
CPU time per loop iteration (median over steps, then over rounds); ``rest of the loop`` is the iteration's
process CPU time minus the bare step, ``train_step`` and those functions.
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
import tqdm.std

import fluxfill.step as step_module
import fluxfill.train as train_module
from bench.common import params, write_result
from fluxfill.encode import LatentCache, encode
from fluxfill.fusion import SemanticFusion
from fluxfill.objective import flow_matching_step
from fluxfill.step import make_optimizer
from tests.helpers import make_prepared

SAMPLES, PANEL, BATCH, WARMUP, STEPS, ROUNDS, TARGET_MS = 16, 128, 4, 3, 30, 5, 5.0


class Bare:
    """The unavoidable work of a step, on a fixed batch and the trainer's own model: its transformer and fusion
    (unwrapped) with an AdamW of their own, built as ``fluxfill.step.make_optimizer`` builds the trainer's.
    Two model instances step up to 2 ms apart on this machine (memory placement), so the bare step shares the
    trainer's weights, rebound at the first step of each round. Clipping to ``train.max_grad_norm`` and the
    schedule are not in it: they count as the loop's cost. Returns (main-thread CPU s, wall s)."""

    def __init__(self, p, cache):
        self.p, self.trainer = p, None
        self.batch = cache.collate([cache[i] for i in range(BATCH)])

    def bind(self, trainer) -> None:
        if trainer is self.trainer:
            return
        acc = trainer.accelerator
        assert acc.gradient_accumulation_steps == 1, "the bare step's zero_grad would drop accumulated gradients"
        self.transformer, self.fusion = acc.unwrap_model(trainer.transformer), acc.unwrap_model(trainer.fusion)
        self.opt = make_optimizer(self.p, self.transformer, self.fusion, torch.device("cpu"))
        self.trainer, self.dtype, self.region, self.i = trainer, trainer.dtype, trainer.loss_region, 0

    def __call__(self) -> tuple[float, float]:
        c, w = time.thread_time(), time.perf_counter()
        out = flow_matching_step(self.transformer, self.fusion, self.batch, self.region,
                                 generator=torch.Generator().manual_seed(self.i), dtype=self.dtype)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        return time.thread_time() - c, time.perf_counter() - w


# the loop's per-step host work, by function: (owner, attribute, label)
SECTIONS = ((LatentCache, "__getitem__", "cache reads"), (LatentCache, "collate", "collate"),
            (step_module, "sample_generators", "noise generators"), (SemanticFusion, "stat_tensors", "fusion statistics"),
            (train_module, "_pending_row", "metrics rows"), (train_module, "_flush", "host sync"),
            (train_module, "_report", "MLflow buffer and bar text"), (tqdm.std.tqdm, "update", "progress bar"))


@contextlib.contextmanager
def timed(spent: dict[str, float], fetch: list[float]):
    """Patch each of ``SECTIONS`` to add its main-thread CPU time to ``spent[label]`` (cache reads' wall time
    also to ``fetch``); ``fluxfill.step.train_step``'s goes to ``spent["train_step"]`` by the caller."""
    def wrap(fn, label):
        def run(*args, **kwargs):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.thread_time() - c
                if label == "cache reads":
                    fetch.append(time.perf_counter() - w)
        return run

    real = [(owner, name, getattr(owner, name)) for owner, name, _ in SECTIONS]
    for (owner, name, fn), (_, _, label) in zip(real, SECTIONS, strict=True):
        setattr(owner, name, wrap(fn, label))
    try:
        yield
    finally:
        for owner, name, fn in real:
            setattr(owner, name, fn)


def one_round(p, bare: Bare, root: Path) -> dict:
    """One run of fluxfill.train.train with a bare step before each of its steps; per-step medians."""
    marks, fetch = [], []  # (process CPU, wall, bare CPU, bare wall, CPU by section so far) at each train_step call
    spent: dict[str, float] = dict.fromkeys(["train_step", *(label for *_, label in SECTIONS)], 0.0)
    real_step = step_module.train_step

    def paired(trainer, *args, **kwargs):
        bare.bind(trainer)
        c, w = time.process_time(), time.perf_counter()
        marks.append((c, w, *bare(), dict(spent)))
        start = time.thread_time()
        try:
            return real_step(trainer, *args, **kwargs)
        finally:
            spent["train_step"] += time.thread_time() - start

    step_module.train_step = paired
    try:
        with contextlib.chdir(root), timed(spent, fetch):  # train's metrics/, plots/ and .fluxfill/ land in the bench's folder
            train_module.train(p)
    finally:
        step_module.train_step = real_step
    steps = list(zip(marks, marks[1:], strict=False))[WARMUP:]  # iteration k: from mark k to mark k+1
    bare_cpu = [a[2] for a, _ in steps]
    bare_wall = [a[3] for a, _ in steps]
    ours_cpu = [b[0] - a[0] - a[2] for a, b in steps]
    ours_wall = [b[1] - a[1] - a[3] for a, b in steps]
    med = statistics.median
    per_step_fetch = sum(fetch[(WARMUP + 1) * BATCH:]) / max(1, len(fetch) // BATCH - WARMUP - 1)
    sections = {label: [b[4][label] - a[4][label] for a, b in steps] for label in spent}
    rest = [o - sum(v[k] for v in sections.values()) for k, o in enumerate(ours_cpu)]
    where = {f"{label}_ms": 1e3 * med(v) for label, v in sections.items() if label != "train_step"}
    return {"bare_cpu_s": med(bare_cpu), "ours_cpu_s": med(ours_cpu), "bare_wall_s": med(bare_wall),
            "ours_wall_s": med(ours_wall),
            "overhead_cpu_ms": med(1e3 * (o - b) for o, b in zip(ours_cpu, bare_cpu, strict=True)),
            "overhead_wall_ms": med(1e3 * (o - b) for o, b in zip(ours_wall, bare_wall, strict=True)),
            "data_loader_share": per_step_fetch / med(ours_wall),
            "train_step_minus_bare_ms": med(1e3 * (t - b) for t, b in zip(sections["train_step"], bare_cpu, strict=True)),
            **where, "rest of the loop_ms": 1e3 * med(rest)}


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
               "where_ms_per_step": {k.removesuffix("_ms"): round(med(v), 3) for k, v in rounds.items() if k.endswith("_ms")
                                     and not k.startswith("overhead")},
               "rounds": {k: [round(v, 5) for v in vs] for k, vs in rounds.items()},
               "batch": BATCH, "panel_size": PANEL, "steps_per_round": STEPS, "threads": torch.get_num_threads()}
    c, w = figures["overhead_ms_per_step_cpu"], figures["overhead_ms_per_step_wall"]
    print(f"training-loop overhead, median of {ROUNDS} rounds (min..max): CPU {c['median']:+.1f} ms/step "
          f"({c['min']:+.1f}..{c['max']:+.1f}), wall {w['median']:+.1f} ms/step ({w['min']:+.1f}..{w['max']:+.1f}); "
          f"target <= {TARGET_MS:.0f} ms/step | bare step {figures['bare_step_cpu_s']:.3f} s CPU | "
          f"data-loader share {figures['data_loader_share']:.2%}")
    print("where it goes, ms/step (median of rounds): " + ", ".join(f"{k} {v:+.2f}"
                                                                   for k, v in figures["where_ms_per_step"].items()))
    write_result("train_overhead", figures)
    return figures


if __name__ == "__main__":
    main()
