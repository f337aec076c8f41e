"""2-process / 1-process training step time on the CPU (gloo), tiny preset, the same global batch.

Side by side, alternating for ROUNDS rounds: `fluxfill train` with train.num_processes=1 and batch 4, and with
train.num_processes=2 and batch 2 per process (the same samples, gradients averaged over gloo), on the same
latent cache, with the machine's cores shared out (1 process: all of them; 2 processes: half each).
The step time is the median over the steps after WARMUP of global batch / samples_per_s, which training logs
to MLflow every step; start-up (imports, model loading, the launcher) is excluded and reported apart.
A ratio above 1 is the overhead of the distributed path on this machine.
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

from bench.common import make_prepared, params, write_result
from fluxfill.encode import encode

SAMPLES, PANEL, GLOBAL_BATCH, WARMUP, STEPS, ROUNDS = 16, 256, 4, 2, 8, 2


def run(root: Path, processes: int) -> tuple[float, float]:
    """One training run; (median s/step after warm-up, total wall seconds)."""
    work = root / f"run-{processes}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    raw = {"data": {"panel_size": PANEL, "output": str(root / "prepared")},
           "encode": {"output": str(root / "latents")},
           "train": {"max_steps": WARMUP + STEPS, "batch_size": GLOBAL_BATCH // processes, "num_processes": processes,
                     "log_every": 1, "checkpoint_every": 0},
           "eval": {"num_inference_steps": 1},
           "tracking": {"tracking_uri": f"sqlite:///{work}/mlflow.db"}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if processes == 1:  # the launcher gives each of N processes cores / N threads
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fluxfill.cli", "train"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(raw["tracking"]["tracking_uri"])
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(client.get_metric_history(found.info.run_id, "samples_per_s"), key=lambda m: m.step)
    return statistics.median(GLOBAL_BATCH / m.value for m in history[WARMUP:]), wall


def main() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-multiprocess-"))
    try:
        make_prepared(root / "prepared", SAMPLES, PANEL)
        encode(params(root, PANEL), device="cpu")
        one, two, one_wall, two_wall = [], [], [], []
        for r in range(ROUNDS):
            for steps, walls, processes in ((one, one_wall, 1), (two, two_wall, 2)):
                step, wall = run(root, processes)
                steps.append(step)
                walls.append(wall)
            print(f"round {r}: s/step 1 process {one[-1]:.3f}, 2 processes {two[-1]:.3f} | "
                  f"whole run {one_wall[-1]:.1f} s, {two_wall[-1]:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    ratio = med(two) / med(one)
    figures = {"step_s_1_process": round(med(one), 4), "step_s_2_processes": round(med(two), 4),
               "ratio_2_over_1": round(ratio, 4), "run_s_1_process": round(med(one_wall), 1),
               "run_s_2_processes": round(med(two_wall), 1), "rounds": {"one": one, "two": two},
               "global_batch": GLOBAL_BATCH, "panel_size": PANEL, "cores": os.cpu_count()}
    print(f"step time, global batch {GLOBAL_BATCH} at {PANEL} px: 1 process {med(one):.3f} s, 2 processes "
          f"{med(two):.3f} s, ratio 2/1 {ratio:.3f} | whole runs {med(one_wall):.1f} s vs {med(two_wall):.1f} s")
    write_result("multiprocess", figures)
    return figures


if __name__ == "__main__":
    main()
