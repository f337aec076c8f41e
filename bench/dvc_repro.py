"""End to end: `dvc repro` of the embedded default from scratch in a fresh clone, then a no-op `dvc repro`.

Targets: from scratch under 5 minutes on a 2-core CPU; the no-op under 5 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    clone = root / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{clone}/mlflow.db"}
        scratch = timed(["dvc", "repro"], clone, env)
        noop = timed(["dvc", "repro"], clone, env)
        status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True).stdout.strip()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {"from_scratch_s": round(scratch, 1), "noop_s": round(noop, 2), "target_from_scratch_s": 300,
               "target_noop_s": 5, "status_after": status}
    print(f"dvc repro from scratch {scratch:.1f} s (target < 300) | no-op {noop:.2f} s (target < 5) | "
          f"dvc status: {status}")
    write_result("dvc_repro", figures)
    return figures


if __name__ == "__main__":
    main()
