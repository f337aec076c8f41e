"""Serve the flows as deployments ``<flow>/local`` against the Prefect server in PREFECT_API_URL.

    prefect server start --host 127.0.0.1                 # in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                  # long-running; Ctrl-C stops it
    prefect deployment run 'train-diptych/local' -p overrides='{"train.max_steps": 20}' --watch
    prefect deployment run 'sweep-diptych/local' -p grid='{"fusion.mode": ["none", "fixed", "learned"]}' --watch

Deployments: train-diptych/local, sweep-diptych/local (a grid as DVC experiments, one sub-flow per point),
one per stage (prepare-data/local, encode-latents/local, train/local, evaluate/local) and edit-batch/local (a
folder of images in, edited images out). Runs execute in this process's machine, in the repository root, one at
a time (--limit 1: one GPU). For remote GPU machines use a work pool instead (prefect.yaml).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _repository() -> Path | None:
    """The repository to run in: the one around the current directory, else the one holding this package."""
    from fluxfill.config import repo_root

    for root in (repo_root(), Path(__file__).resolve().parents[1]):
        if (root / "dvc.yaml").exists():
            return root
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="local", help="deployment name (default: local)")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once in this process (default: 1)")
    args = parser.parse_args(argv)

    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print(
            "python -m flows.serve: PREFECT_API_URL is not set; without a server the deployments would vanish "
            "with this process. Start one with `prefect server start --host 127.0.0.1` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`.",
            file=sys.stderr,
        )
        return 2
    root = _repository()
    if root is None:
        print(f"python -m flows.serve: no dvc.yaml in {Path.cwd()} or above: run it in the fluxfill repository",
              file=sys.stderr)
        return 2
    os.chdir(root)  # flow runs inherit the working directory: the repository the stages belong to
    from prefect import serve

    serve(*deployments(args.name), limit=args.limit)
    return 0


def deployments(name: str = "local") -> list:
    """The served deployments: train-diptych, sweep-diptych, one per stage, edit-batch."""
    from .edit import edit_batch
    from .pipeline import STAGE_FLOWS, sweep_diptych, train_diptych

    flows = (train_diptych, sweep_diptych, *STAGE_FLOWS.values(), edit_batch)
    return [f.to_deployment(name=name, tags=["fluxfill"]) for f in flows]


if __name__ == "__main__":
    sys.exit(main())
