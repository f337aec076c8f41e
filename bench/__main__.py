"""`make bench` / `python -m bench`: every CPU benchmark, then the GPU one (skipped without a GPU).

Each prints its figures and writes bench/results/<name>.json. Run on an otherwise idle machine.
"""

from __future__ import annotations

import sys

from bench import dvc_repro, encode_throughput, gpu_train_step, multiprocess, train_overhead


def main() -> int:
    for module in (encode_throughput, train_overhead, multiprocess, dvc_repro):
        print(f"== {module.__name__}")
        module.main()
    print("== bench.gpu_train_step")
    return gpu_train_step.main([])


if __name__ == "__main__":
    sys.exit(main())
