"""Multi-process training: ``train.num_processes`` workers started by accelerate's own launcher.

    fluxfill train                        train.num_processes = N > 1, not inside a launch
      └─ accelerate launch --multi_gpu --num_processes N -m fluxfill.cli train <the same arguments>
           └─ torchrun: N workers, each a `fluxfill train` with WORLD_SIZE=N set: NCCL on GPUs,
              gloo on a CPU-only machine (ACCELERATE_USE_CPU=1)

A process already inside a launch (``accelerate launch``, ``torchrun``) trains in that world and never
launches again. When a worker fails, torchrun stops the others (SIGTERM, which a worker
turns into an exception so that its MLflow run ends FAILED); the worker records its error in torchelastic's
error file and the launching process reports the failing rank's message and exits 1.

Under FSDP only the trainable tensors (LoRA, fusion) are gathered for checkpoints and outputs
(:func:`trainable_state_dict`, called by every rank); plain and DDP-wrapped modules need no communication.

Test hook, used only by tests/test_distributed.py: ``FLUXFILL_FAIL_AT=<rank>:<step>`` makes that rank raise
when it starts that optimizer step (1-based).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

import torch

from .config import FluxfillError, Params

FAIL_ENV = "FLUXFILL_FAIL_AT"


class WorkerStopped(FluxfillError):
    """This worker was stopped by the launcher because another rank failed."""


def launched_world_size() -> int | None:
    """The world size of the launch this process belongs to, None outside one.

    WORLD_SIZE is set by torchrun (and so by ``accelerate launch --multi_gpu``); a single process started by
    ``accelerate launch`` has only accelerate's own variables (ACCELERATE_DYNAMO_BACKEND: set by its launchers).
    """
    if value := os.environ.get("WORLD_SIZE"):
        return int(value)
    return 1 if "ACCELERATE_DYNAMO_BACKEND" in os.environ else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def use_cpu() -> bool:
    """Train on the CPU with gloo: inside a launch on a machine without CUDA (accelerate would else see 1 process)."""
    return launched_world_size() is not None and not torch.cuda.is_available()


def with_world_size(params: Params, world: int) -> Params:
    """``params`` with train.num_processes = ``world``, the processes actually training; refuses a conflict.

    A launch by hand (``accelerate launch --num_processes 8``) with the default train.num_processes 1 trains
    with 8; any other value must match, since it sets the global batch.
    """
    t = params.train
    if t.num_processes not in (1, world):
        raise FluxfillError(
            f"train.num_processes is {t.num_processes} but this process is one of {world} started by a launcher: "
            f"set train.num_processes={world}, or run `fluxfill train` without a launcher (it starts "
            f"{t.num_processes} workers itself)")
    if t.num_processes == world:
        return params
    params = params.model_copy(deep=True)
    params.train.num_processes = world
    return params


def launch(num_processes: int, argv: Sequence[str]) -> None:
    """Run ``python -m fluxfill.cli <argv>`` in ``num_processes`` workers through accelerate's launcher; wait.

    Raises :class:`FluxfillError` with the failing rank's message when a worker fails, KeyboardInterrupt on Ctrl-C.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    env = {}
    if torch.cuda.is_available():
        if num_processes > torch.cuda.device_count():
            raise FluxfillError(f"train.num_processes {num_processes} exceeds the {torch.cuda.device_count()} "
                                "GPUs of this machine: one process per GPU")
    else:  # gloo; the cores shared out between the workers unless OMP_NUM_THREADS says otherwise
        env = {"ACCELERATE_USE_CPU": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // num_processes))}
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fluxfill.cli", *argv])
    try:
        with patch_environment(**env):
            launch_command(args)
    except ChildFailedError as e:
        raise FluxfillError(failure_message(e, num_processes)) from None
    except SignalException:
        raise KeyboardInterrupt from None


def failure_message(err, world: int) -> str:
    """The first failing rank's own message, from torchrun's ChildFailedError.

    Ranks that recorded an error come first, the earliest error file first: a rank that fails makes the
    collectives of the others fail only once it has exited, after it wrote its error file.
    """
    def first(item):
        rank, f = item
        written = os.path.getmtime(f.error_file) if os.path.isfile(f.error_file) else float("inf")
        return not isinstance(f.message, dict), written, f.timestamp, rank

    rank, failure = min(err.failures.items(), key=first)
    if isinstance(failure.message, dict):
        message = failure.message.get("message", "?").removeprefix(f"{FluxfillError.__name__}: ")
    else:
        message = f"exit code {failure.exitcode}" + (f" ({failure.message})" if failure.exitcode < 0 else "")
    return f"rank {rank} of {world} failed: {message}"


def record_failure(error: BaseException) -> None:
    """In a worker: write ``error`` to torchelastic's error file, for the launching process to report.

    A worker stopped because another rank failed records nothing: the other rank's error is the one to report.
    """
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and not isinstance(error, WorkerStopped | KeyboardInterrupt):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)


def stop_on_sigterm() -> None:
    """In a worker: the launcher's SIGTERM (another rank failed) raises :class:`WorkerStopped` (runs end FAILED).

    A worker already unwinding from an error (its collective failed when the other rank exited) ignores the
    signal: raising again inside its cleanup would cut short the write that ends its MLflow run FAILED.
    """
    def stopped(signum, frame):
        if sys.exc_info()[1] is None:
            raise WorkerStopped("stopped by the launcher: another rank failed")

    signal.signal(signal.SIGTERM, stopped)


def fail_point(rank: int, step: int) -> None:
    """The test hook: raise on ``rank`` at ``step`` when FLUXFILL_FAIL_AT=<rank>:<step> (see the module doc)."""
    if os.environ.get(FAIL_ENV) == f"{rank}:{step}":
        raise RuntimeError(f"failure injected by {FAIL_ENV}={rank}:{step} on rank {rank} at step {step}")


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` (LoRA, fusion; names as in ``named_parameters``), full, on the CPU.

    FSDP shards are gathered: every rank must call it; the main process gets the tensors, the others an empty
    dict. Plain and DDP-wrapped modules need no communication and every process gets the tensors.
    """
    from accelerate.utils import extract_model_from_parallel
    from torch.distributed.tensor import DTensor

    module = extract_model_from_parallel(module)
    if any(isinstance(p, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(module, options=options)
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load :func:`trainable_state_dict`'s tensors into ``module`` (sharded or not); ``source`` names the file."""
    from accelerate.utils import extract_model_from_parallel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = extract_model_from_parallel(module)
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise FluxfillError(f"{source}: does not hold this model's trainable tensors (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); it was written by another configuration or version: "
                            "start over with `fluxfill train --fresh`")
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))

