"""2-process / 1-process training step time on the CPU (gloo), tiny preset: the overhead of the distributed path.

Side by side, alternating for ROUNDS rounds, `fluxfill train` on the same latent cache with one intra-op
thread per process (more threads per process on a shared machine measure OpenMP oversubscription, not
training):

- 1 process,  batch 4                    the reference;
- 2 processes, batch 2 each (global 4)   the same samples, gradients averaged over gloo: ratio 2/1 < 1 is the
                                         speed-up of a second core;
- 1 process,  batch 2                    the work of one of the 2 processes: ratio 2-process / this > 1 is
                                         what the distributed path (all-reduce, synchronisation) adds.

The step time is the median over the steps after WARMUP of batch / samples_per_s, which training logs to MLflow
every step; start-up (imports, model loading, the launcher) is excluded and reported apart.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import yaml

from bench.common import params, write_result
from fluxfill.encode import encode
from tests.helpers import make_prepared

SAMPLES, PANEL, WARMUP, STEPS, ROUNDS = 16, 256, 2, 6, 2
CASES = {"1x4": (1, 4), "2x2": (2, 2), "1x2": (1, 2)}  # name: (processes, batch per process)


def run(root: Path, name: str, processes: int, batch: int) -> tuple[float, float]:
    """One training run in a new folder; (median s/step after warm-up, whole-run wall seconds)."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))  # a new database each time (MLflow caches stores)
    raw = {"data": {"panel_size": PANEL, "output": str(root / "prepared")},
           "encode": {"output": str(root / "latents")},
           "train": {"max_steps": WARMUP + STEPS, "batch_size": batch, "num_processes": processes,
                     "log_every": 1, "checkpoint_every": 0},
           "eval": {"num_inference_steps": 1},
           "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fluxfill.cli", "train"], cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(raw["tracking"]["tracking_uri"])
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(client.get_metric_history(found.info.run_id, "samples_per_s"), key=lambda m: m.step)
    assert len(history) == WARMUP + STEPS, history
    return statistics.median(processes * batch / m.value for m in history[WARMUP:]), wall


def main() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-multiprocess-"))
    step_s = {name: [] for name in CASES}
    run_s = {name: [] for name in CASES}
    try:
        make_prepared(root / "prepared", SAMPLES, PANEL)
        encode(params(root, PANEL), device="cpu")
        for r in range(ROUNDS):
            for name, (processes, batch) in CASES.items():
                step, wall = run(root, name, processes, batch)
                step_s[name].append(step)
                run_s[name].append(wall)
            print(f"round {r}: s/step " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in step_s.items())
                  + " | whole run s " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in run_s.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in step_s.items()}
    same_batch, same_work = med["2x2"] / med["1x4"], med["2x2"] / med["1x2"]
    figures = {"step_s": {n: round(v, 4) for n, v in med.items()},
               "ratio_2_over_1_same_global_batch": round(same_batch, 4),
               "ratio_2_over_1_same_batch_per_process": round(same_work, 4),
               "run_s": {n: round(statistics.median(v), 1) for n, v in run_s.items()},
               "rounds": step_s, "panel_size": PANEL, "threads_per_process": 1, "cores": os.cpu_count()}
    print(f"s/step at {PANEL} px, 1 thread per process: 1x4 {med['1x4']:.3f}, 2x2 {med['2x2']:.3f}, "
          f"1x2 {med['1x2']:.3f} | 2-process / 1-process: {same_batch:.3f} at the same global batch 4, "
          f"{same_work:.3f} at the same batch 2 per process (the distributed path's overhead)")
    write_result("multiprocess", figures)
    return figures


if __name__ == "__main__":
    main()
