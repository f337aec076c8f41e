"""Train LoRA adapters + the semantic fusion weight on FLUX.1-Fill from the latent cache (data/latents).

Rectified-flow objective (docs/design.md §3) with accelerate: mixed precision (bf16 on CUDA, fp32 on CPU), gradient
accumulation, clipping, warm-up + schedule, optional gradient checkpointing, several processes:

  fluxfill train --set train.num_processes=8       # DDP: 8 workers (GPUs; gloo on a CPU), see fluxfill.distributed
  accelerate launch --config_file accelerate/fsdp.yaml --num_processes 8 -m fluxfill.cli train   # FSDP

The global batch of one optimizer step is num_processes x batch_size x gradient_accumulation_steps samples;
which samples, and each sample's sigma and noise, depend only on (seed, step, position in the global batch),
so N processes with batch b train the model 1 process with batch N*b trains, up to float reduction order.

Outputs (DVC outs, byte-identical for identical runs): models/lora/pytorch_lora_weights.safetensors (diffusers
format, loads with FluxFillPipeline.load_lora_weights), models/fusion.safetensors, metrics/train.json (final loss,
fusion weight, steps, val_loss), plots/train.csv (step,loss,fusion_weight,fusion_cos,fusion_ref_norm,val_loss,lr:
one row per step, whatever train.log_every), plots/val.csv (step,val_loss; the DVC plot, step 0 included).
Timings and memory go to MLflow and to .fluxfill/train_timing.json; the MLflow run to .fluxfill/runs/ (not outs).

The held-out val_loss (fluxfill.validation) is computed at step 0, every train.val_every steps and at the end.

Checkpoints (LoRA, fusion, optimizer, scheduler, RNG; accelerate's save_state) go to
checkpoints/<fingerprint>/checkpoint-<step> every train.checkpoint_every steps, atomically. A run resumes only
a checkpoint it would have written itself (:func:`config_fingerprint`, :func:`resumable`); the data order and
the noise are functions of (seed, step), so a resumed run ends bit-identical to an uninterrupted one on the
CPU. It continues the checkpoint's MLflow run only when that run is unfinished and had the same max_steps,
else it starts a new one; a configuration that finished, with its outputs in place, is not trained again
(checkpoints/<fingerprint>/finished-<max_steps>.json records them). The fingerprint holds the global batch, not
its split: a run resumes with another number of processes when the global batch stays the same, and is refused
(naming what to set) when it would change. Ctrl-C writes a checkpoint before exiting (one process); a non-finite
loss stops the run, keeping the last good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, safety, sources, tracking
from . import step as steps
from .artifacts import (
    CHECKPOINT_LORA,
    CHECKPOINT_STATE,
    FUSION_FILE,
    LORA_DIR,
    SPEC_FILE,
    TRAIN_METRICS,
    TRAIN_PLOT,
    TRAIN_TIMING,
    VAL_PLOT,
    canonical,
    canonical_safetensors_header,
    damaged,
    lora_weights,
    reading,
    umask_mode,
)
from .config import FluxfillError, Params
from .encode import LatentCache, settings
from .fusion import SemanticFusion, build_fusion
from .registry import register_trained_model, write_spec
from .sampling import training_sample_grid
from .validation import validation_loss

log = logging.getLogger(__name__)
# train.* settings that do not change the trained weights, left out of the checkpoint fingerprint (a restart with
# new values still resumes); a new setting of that kind goes here
NOT_IN_FINGERPRINT = frozenset({"output", "checkpoint_dir", "log_every", "sample_every", "checkpoint_every",
                                "keep_checkpoints", "num_workers",
                                # how the global batch is split over processes and micro-batches: the
                                # fingerprint holds its size (global_batch), the same weights for any split
                                "num_processes", "batch_size", "gradient_accumulation_steps"})
UNFINISHED = {"RUNNING", "KILLED", "FAILED"}  # MLflow run states a resumed run may continue
PLOT_COLUMNS = ("step", "loss", "fusion_weight", "fusion_cos", "fusion_ref_norm", "val_loss", "lr")


class NonFiniteLoss(FluxfillError):
    pass


def global_batch(t) -> int:
    """Samples per optimizer step: num_processes x batch_size x gradient_accumulation_steps."""
    return t.num_processes * t.batch_size * t.gradient_accumulation_steps


def config_fingerprint(params: Params, cache_meta: dict, device_type: str, code: str | None = None,
                       with_batch: bool = True) -> str:
    """What the weights at each step are a function of; checkpoints live in ``<checkpoint_dir>/<fingerprint>``.

    - every model, fusion and train setting except :data:`NOT_IN_FINGERPRINT`, and the global batch (without it
      with ``with_batch=False``: the configuration whatever its batch, to find checkpoints of another split);
    - the latent cache (its whole ``meta.json``: settings, code version, manifest hash, samples);
    - the code: :func:`fluxfill.sources.module_digest` of this module, i.e. every fluxfill file training imports;
    - the device kind, which resolves the ``auto`` settings (precision, compile).

    ``train.max_steps`` is left out only with the constant schedule (with or without warm-up): its learning
    rate at step s does not depend on the run length, so the weights at step s are the same for every
    max_steps >= s, and a checkpoint at step s is exactly what a run of any max_steps >= s would have written
    (:func:`resumable` checks the step). A decaying schedule (linear, cosine) sets the learning rate of every
    step from max_steps, so there max_steps is part of the fingerprint.
    """
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_IN_FINGERPRINT}
    if with_batch:
        train["global_batch"] = global_batch(params.train)
    if params.train.lr_scheduler == "constant":
        train.pop("max_steps")
    blob = {"model": params.model.model_dump(), "fusion": params.fusion.model_dump(), "train": train,
            "cache": cache_meta, "code": code or sources.module_digest("train"), "device": device_type}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches of indices, a function of (seed, step, position in the global batch) only.

    Optimizer step s trains on the global batch perm[k*G:(k+1)*G], G = world x batch_size x accum, with
    (e, k) = divmod(s, n // G) and perm = randperm(n) seeded by seed + e. Micro-step j of step s on rank r takes
    the positions j*world*b + r*b ... + b-1 of it. Starting at ``start`` micro-steps reproduces exactly the
    batches an uninterrupted run would see next, with any split of the same global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, total: int | None = None,
                 accum: int = 1, world: int = 1, rank: int = 0):
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.accum, self.world, self.rank = accum, world, rank
        self.global_batch = world * batch_size * accum
        if n < self.global_batch:
            raise FluxfillError(f"the global batch of {self.global_batch} (train.num_processes {world} x batch_size "
                                f"{batch_size} x gradient_accumulation_steps {accum}) exceeds the {n} training "
                                "samples in the cache")
        self.per_epoch = n // self.global_batch

    def positions(self, i: int) -> tuple[int, range]:
        """(optimizer step, positions in its global batch) of micro-step ``i`` on this rank."""
        step, j = divmod(i, self.accum)
        first = (j * self.world + self.rank) * self.bs
        return step, range(first, first + self.bs)

    def batch(self, i: int) -> list[int]:
        step, pos = self.positions(i)
        epoch, k = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return perm[k * self.global_batch:(k + 1) * self.global_batch][pos.start:pos.stop].tolist()

    def __iter__(self):
        i = self.start
        while self.total is None or i < self.total:
            yield self.batch(i)
            i += 1

    def __len__(self):
        return (self.total or 0) - self.start


@dataclass
class TrainResult:
    steps: int
    loss: float
    fusion_weight: float | None
    samples_per_s: float
    run_id: str | None
    resumed_from: int
    skipped: bool = False  # nothing ran: this configuration had finished and its outputs were in place


def _checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("checkpoint-*"), key=_step) if root.exists() else []


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def resumable(ckpt_root: Path, max_steps: int) -> Path | None:
    """The latest checkpoint of this fingerprint at a step <= ``max_steps``: the weights this run would have there.

    A checkpoint past ``max_steps`` belongs to a longer run of the same trajectory (constant schedule) and is
    kept for it.
    """
    usable = [c for c in _checkpoints(ckpt_root) if _step(c) <= max_steps]
    return usable[-1] if usable else None


def remove_checkpoints(ckpt_root: Path) -> list[Path]:
    """``--fresh``: delete this fingerprint's checkpoints and finished records, nothing else; returns them."""
    gone = [*_checkpoints(ckpt_root), *ckpt_root.glob(".tmp-checkpoint-*"), *ckpt_root.glob("finished-*.json")]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    with contextlib.suppress(OSError):
        ckpt_root.rmdir()  # only when nothing else is left in it
    return gone


def _output_files(params: Params) -> list[Path]:
    """Every file a finished run writes, in the order the finished record lists them."""
    out = Path(params.train.output)
    lora = sorted(f for f in (out / LORA_DIR).rglob("*") if f.is_file()) if (out / LORA_DIR).is_dir() else []
    return [*lora, out / FUSION_FILE, Path(TRAIN_METRICS), Path(TRAIN_PLOT)]


def _digests(files: list[Path]) -> dict[str, str] | None:
    if not all(f.is_file() for f in files):
        return None
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _finished_record(ckpt_root: Path, max_steps: int) -> Path:
    return ckpt_root / f"finished-{max_steps:06d}.json"


def already_trained(params: Params, ckpt_root: Path) -> TrainResult | None:
    """The result of the finished run of this configuration when its outputs are still in place, byte for byte."""
    record_file = _finished_record(ckpt_root, params.train.max_steps)
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        outputs, result = record["outputs"], record["result"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable record of a finished run (%s: %s); training again", record_file,
                    type(e).__name__, e)
        return None
    if _digests(_output_files(params)) != outputs:
        return None
    return TrainResult(**{**result, "skipped": True})


def _own_run(state: dict, max_steps: int) -> str | None:
    """The checkpoint's MLflow run, if this run may continue it: same max_steps and not FINISHED (or gone)."""
    run = tracking.find_run(state["run_id"]) if state.get("run_id") else None
    if run is None or state.get("max_steps") != max_steps or run.info.status not in UNFINISHED:
        return None
    return run.info.run_id


def train(params: Params, stop_after: int | None = None, fresh: bool = False) -> TrainResult:
    """Run (or resume) training as configured; ``stop_after`` ends early after that many steps (tests).

    ``fresh`` deletes this configuration's checkpoints first. When this configuration finished before and its
    outputs are unchanged, nothing runs: the result says ``skipped``.
    """
    import mlflow
    from accelerate.utils import set_seed

    cache = LatentCache(params.encode.output, "train", expect={
        k: v for k, v in settings(params).items() if k in ("preset", "pretrained", "panel_size", "max_sequence_length")})
    accelerator, mixed = _accelerator(params)
    params = distributed.with_world_size(params, accelerator.num_processes)
    t = params.train
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(t.seed)
    fingerprint = config_fingerprint(params, cache.meta, device.type)
    ckpt_root = Path(t.checkpoint_dir) / fingerprint
    if main:  # fail fast on an unreachable tracking server, before anything is deleted or loaded
        tracking.setup(params.tracking)
    if fresh and main:
        for gone in remove_checkpoints(ckpt_root):
            log.info("--fresh: removed %s", gone)
    accelerator.wait_for_everyone()
    if (done := already_trained(params, ckpt_root)) is not None:
        return done
    if not fresh and resumable(ckpt_root, t.max_steps) is None:
        _refuse_another_split(params, cache.meta, device.type)

    trainer = _build(params, accelerator, cache, mixed)
    transformer, fusion = trainer.transformer, trainer.fusion
    start, history, run_id, resumed_run = 0, [], None, None
    if ckpt := resumable(ckpt_root, t.max_steps):
        state = _load_checkpoint(accelerator, ckpt)
        start, history, resumed_run = state["step"], state["history"], state.get("run_id")
        run_id = _own_run(state, t.max_steps) if main else None
        log.info("resuming from %s (step %d) %s", ckpt, start,
                 f"in MLflow run {run_id}" if run_id else f"in a new MLflow run (run {resumed_run} is finished or "
                 "was started with another train.max_steps)")

    accum = t.gradient_accumulation_steps
    sampler = StepSampler(len(cache), t.batch_size, t.seed, start=start * accum, total=t.max_steps * accum,
                          accum=accum, world=accelerator.num_processes, rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=cache.collate,
                                         num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=t.num_workers > 0)

    tags = {"accelerate.world_size": str(accelerator.num_processes), "accelerate.mixed_precision": mixed,
            "accelerate.distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "fluxfill.fingerprint": fingerprint}
    split = {"family": config_fingerprint(params, cache.meta, device.type, with_batch=False),
             "world_size": t.num_processes, "batch_size": t.batch_size, "gradient_accumulation_steps": accum,
             "global_batch": global_batch(t)}
    if start and run_id is None:
        tags |= {"fluxfill.resumed_from_step": str(start), "fluxfill.resumed_from_run": str(resumed_run)}
    new_run = main and run_id is None
    name = params.tracking.run_name or (
        tracking.default_run_name(params, f"{t.max_steps}steps", fingerprint[:6]) if new_run else None)
    run_ctx = tracking.start_run(params, run_name=name, run_id=run_id, tags=tags) if main else contextlib.nullcontext()
    with run_ctx as run:
        run_id = run.info.run_id if run else None
        if new_run and history:  # a new run from a checkpoint: the steps before it, so its curves are whole
            tracking.log_history(history)
        if main:
            mlflow.log_param("fusion.init_method", accelerator.unwrap_model(fusion).init_method)
        result = _loop(params, trainer, loader, ckpt_root, start, run_id, history, stop_after, split,
                       _val_cache(params))
        if result.steps < t.max_steps:  # stopped early on purpose (tests, budget): a checkpoint, no final outputs
            if main:
                tracking.end_run_unfinished()
            return result
        accelerator.wait_for_everyone()
        _write_outputs(params, accelerator, transformer, fusion, run, history, result)  # every rank: FSDP gathers
        if main:
            _record_finished(params, ckpt_root, result)
    return result


def _accelerator(params: Params):
    """The Accelerator of this run and its mixed precision (``auto``: bf16 on CUDA, none on the CPU)."""
    from accelerate import Accelerator

    mixed = params.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # the schedule counts optimizer steps, however many processes share them (so a resume may change that number)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=params.train.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False, cpu=distributed.use_cpu())
    return accelerator, mixed


def _record_finished(params: Params, ckpt_root: Path, result: TrainResult) -> None:
    """``finished-<max_steps>.json``: the digests of the outputs, so an unchanged rerun is a no-op."""
    record = {"outputs": _digests(_output_files(params)), "result": asdict(result)}
    _finished_record(ckpt_root, params.train.max_steps).parent.mkdir(parents=True, exist_ok=True)
    _finished_record(ckpt_root, params.train.max_steps).write_text(json.dumps(record, indent=2) + "\n")


def _build(params: Params, accelerator, cache: LatentCache, mixed: str) -> steps.Trainer:
    """The transformer with LoRA and the fusion module, ready to train (:mod:`fluxfill.step`: the benchmark times the same step), with the checkpoint
    hooks that save only the trainable weights."""
    device = accelerator.device
    transformer = steps.load_transformer(params, accelerator, steps.weight_dtype(params, mixed, device))
    item = cache[0]
    fusion = build_fusion(params, item["pooled_prompt_embeds"].shape[-1], item["image_embeds"].shape[-1]).to(device)
    trainer = steps.build(params, accelerator, transformer, fusion)
    _register_state_hooks(accelerator)
    return trainer


def _register_state_hooks(accelerator) -> None:
    """Checkpoints hold the trainable tensors (LoRA, fusion), not the frozen base; FSDP shards are gathered."""
    from safetensors.torch import load_file, save_file

    def path(folder, model) -> Path:
        return Path(folder) / (FUSION_FILE if isinstance(accelerator.unwrap_model(model), SemanticFusion)
                               else CHECKPOINT_LORA)

    def save_hook(models, weights, output_dir):
        for m in models:
            state = distributed.trainable_state_dict(m)  # every rank (FSDP gathers), the main process writes
            if accelerator.is_main_process:
                save_file(state, str(path(output_dir, m)))
        weights.clear()

    def load_hook(models, input_dir):  # under FSDP accelerate loads the models itself and passes none here
        while models:
            m = models.pop()
            distributed.load_trainable_state_dict(m, load_file(str(path(input_dir, m))), path(input_dir, m))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _refuse_another_split(params: Params, cache_meta: dict, device_type: str) -> None:
    """Refuse to start over when this configuration has checkpoints from another number of processes whose
    global batch differs from this run's: resuming them needs the same global batch (``--fresh`` starts over)."""
    t = params.train
    family = config_fingerprint(params, cache_meta, device_type, with_batch=False)
    for path in sorted(Path(t.checkpoint_dir).glob(f"*/checkpoint-*/{CHECKPOINT_STATE}")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable checkpoint state (%s), not compared with this run", path, e)
            continue
        if not isinstance(state, dict) or state.get("family") != family or state.get("world_size") == t.num_processes:
            continue
        g, n, a = state["global_batch"], t.num_processes, t.gradient_accumulation_steps
        keep = (f"train.batch_size={g // (n * a)}" if g % (n * a) == 0 else
                f"train.gradient_accumulation_steps={g // (n * t.batch_size)}" if g % (n * t.batch_size) == 0 else
                f"train.num_processes={state['world_size']}")
        raise FluxfillError(
            f"{path.parent} holds step {state['step']} of this configuration at global batch {g} "
            f"({state['world_size']} processes x batch_size {state['batch_size']} x gradient_accumulation_steps "
            f"{state['gradient_accumulation_steps']}); {n} x {t.batch_size} x {a} = {global_batch(t)} would start "
            f"another run. To continue it with {n} process{'es' if n > 1 else ''} set {keep}; to train at global "
            f"batch {global_batch(t)} instead, start over with --fresh")


def _write_outputs(params: Params, accelerator, transformer, fusion, run, history, result: TrainResult) -> None:
    """LoRA, fusion, run reference, metrics and plot of a finished run; only these files are replaced.

    Every rank calls it (FSDP gathers the shards and generates the sample grid on all ranks); the main process
    writes and logs.
    """
    import mlflow
    from diffusers import FluxFillPipeline
    from peft.utils import get_peft_model_state_dict

    unwrapped = accelerator.unwrap_model(transformer)
    trainable = distributed.trainable_state_dict(unwrapped)
    fusion_module = _full_fusion(accelerator.unwrap_model(fusion))
    out_dir = Path(params.train.output)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for own in (out_dir / LORA_DIR, out_dir / FUSION_FILE, out_dir / SPEC_FILE):  # what this stage wrote before
            shutil.rmtree(own) if own.is_dir() else own.unlink(missing_ok=True)
        # the adapter metadata carries lora_alpha: without it diffusers would load at scale 1, not alpha/rank
        FluxFillPipeline.save_lora_weights(
            out_dir / LORA_DIR, safe_serialization=True,
            transformer_lora_layers=get_peft_model_state_dict(unwrapped, state_dict=trainable),
            transformer_lora_adapter_metadata=canonical(unwrapped.peft_config["default"].to_dict()))
        canonical_safetensors_header(lora_weights(out_dir))
        fusion_module.save(out_dir / FUSION_FILE)
        for weights in (lora_weights(out_dir), out_dir / FUSION_FILE):
            umask_mode(weights)  # readable as any new file is: the folder is meant to be shared
        write_spec(params, out_dir)  # the folder is complete: its digest keys the run reference
        tracking.write_run_ref(run, out_dir)
        _write_metrics(history, result)
        _write_timing(result, accelerator.device)
    _log_samples(params, accelerator, transformer, fusion, result.steps)
    if accelerator.is_main_process:
        mlflow.log_artifacts(str(out_dir), "model")
        tracking.tag_outputs(out_dir)
        register_trained_model(params, out_dir)



def _val_cache(params: Params) -> LatentCache | None:
    """The cache's val split, or None (val_loss off, or no val samples: a warning says so)."""
    if not params.train.val_every:
        return None
    try:
        return LatentCache(params.encode.output, "val")
    except FluxfillError as e:
        log.warning("no val_loss: %s (set data.val_fraction > 0 and re-run prepare and encode)", e)
        return None


def _validate(params: Params, accelerator, transformer, fusion, val_cache, step: int, history: list) -> None:
    """val_loss at ``step`` on every process (identical work: sharded models need every rank); logged by rank 0."""
    t = params.train
    with accelerator.autocast():
        value = validation_loss(transformer, fusion, val_cache, seed=t.seed, num_sigmas=t.val_sigmas,
                                loss_region=t.loss_region, batch_size=t.batch_size, device=accelerator.device)
    row = next((r for r in history if r["step"] == step), None)
    if row is None:
        history.append(row := {"step": step})
        history.sort(key=lambda r: r["step"])
    row["val_loss"] = value
    if accelerator.is_main_process:
        import mlflow

        mlflow.log_metric("val_loss", value, step=step, synchronous=False)


def _save_checkpoint(accelerator, ckpt_root: Path, state: dict, keep: int) -> None:
    """``accelerator.save_state`` into ``checkpoint-<step>`` atomically, with ``state``; every rank takes part."""
    step, main = state["step"], accelerator.is_main_process
    tmp = ckpt_root / f".tmp-checkpoint-{step:06d}"
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: its RNG state (and FSDP shards); the main process the rest
    accelerator.wait_for_everyone()
    if not main:
        return
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
    final = ckpt_root / f"checkpoint-{step:06d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # keep the newest ones up to this step; later ones belong to a longer run of the same trajectory
    for old in [c for c in _checkpoints(ckpt_root) if _step(c) <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _loop(params, trainer: steps.Trainer, loader, ckpt_root, start, run_id, history, stop_after, split: dict,
          val_cache=None) -> TrainResult:
    """Train from step ``start``; every optimizer step appends one row to ``history`` (step, loss, lr, ...).

    Each step's values stay on the device until a log, checkpoint or validation step brings them all back in
    one host sync, so ``history`` (hence ``plots/train.csv``) does not depend on ``log_every``."""
    t, accelerator, transformer, fusion = params.train, trainer.accelerator, trainer.transformer, trainer.fusion
    device, main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    metrics = tracking.MetricBuffer()  # the main process's per-step rows, to MLflow in batches

    def checkpoint(step: int) -> None:
        metrics.flush()  # the run's curves reach the checkpoint's step
        state = {"step": step, "run_id": run_id, "max_steps": t.max_steps, "history": history, **split}
        _save_checkpoint(accelerator, ckpt_root, state, t.keep_checkpoints)

    fusion_module, sampler = accelerator.unwrap_model(fusion), loader.batch_sampler
    step, window_t, window_samples = start, time.perf_counter(), 0
    samples_per_s, losses, pending, grad_norm = 0.0, [], [], None
    end = t.max_steps if stop_after is None else min(t.max_steps, start + stop_after)
    micro = start * t.gradient_accumulation_steps
    bar = tqdm(total=t.max_steps, initial=start, desc="train", unit="step", disable=not main,
               mininterval=1.0)  # a redraw costs ~0.2 ms: at most one a second, not one every short step

    def validate(at: int) -> None:
        nonlocal window_t
        if val_cache is not None:
            began = time.perf_counter()
            _validate(params, accelerator, transformer, fusion, val_cache, at, history)
            window_t += time.perf_counter() - began  # samples_per_s counts training time only

    if start == 0:
        validate(0)
    try:
        for batch in loader:
            if step >= end:
                break
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            distributed.fail_point(accelerator.process_index, step + 1)
            gens = steps.sample_generators(t.seed, *sampler.positions(micro), device)
            loss, norm = steps.train_step(trainer, batch, gens)
            grad_norm = grad_norm if norm is None else norm
            micro += 1
            losses.append(loss)
            window_samples += batch["x_0"].shape[0] * world
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            stats = _full_fusion(fusion_module).stat_tensors(batch["pooled_prompt_embeds"], batch.get("image_embeds"))
            pending.append(_pending_row(step, losses, grad_norm, stats, trainer.scheduler.get_last_lr()[0], device))
            losses = []
            val_step = t.val_every and (step % t.val_every == 0 or step == t.max_steps)
            if (step % t.log_every == 0 or step == end or val_step
                    or (t.checkpoint_every and step % t.checkpoint_every == 0)):
                history.extend(rows := _flush(pending, accelerator, ckpt_root))  # the one host sync
                pending.clear()
                now = time.perf_counter()
                samples_per_s, window_t, window_samples = window_samples / max(now - window_t, 1e-9), now, 0
                if main:
                    _report(rows, samples_per_s, bar, metrics)
            if val_step:
                validate(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                checkpoint(step)
            if t.sample_every and step % t.sample_every == 0 and step < t.max_steps:
                _log_samples(params, accelerator, transformer, fusion, step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: %s", step, "writing a checkpoint" if world == 1 else
                    f"{world} processes resume from the last periodic checkpoint")
        if world == 1:  # several ranks stop at different points: collectives for a checkpoint could wait forever
            history.extend(_flush(pending, accelerator, ckpt_root) if pending else [])
            checkpoint(step)
        raise
    finally:
        bar.close()
        metrics.flush()
    if step < t.max_steps:
        checkpoint(step)
    last_loss = history[-1]["loss"] if history else float("nan")
    return TrainResult(step, last_loss, _alpha(fusion_module), samples_per_s, run_id, start)


def _report(rows: list[dict], samples_per_s: float, bar, metrics: tracking.MetricBuffer) -> None:
    """The log window's rows (every step's loss, lr, grad_norm, α) and its throughput to MLflow and the bar."""
    last = rows[-1]
    metrics.add([*rows[:-1], {**last, "samples_per_s": samples_per_s}])
    alpha = last.get("fusion_weight", math.nan)
    # drawn with the bar's next redraw (at most one a second)
    bar.set_postfix(loss=f"{last['loss']:.4f}", alpha=f"{alpha:.4f}", sps=f"{samples_per_s:.1f}", refresh=False)


def _pending_row(step: int, losses: list[torch.Tensor], grad_norm, stats: dict, lr: float, device) -> tuple:
    """One optimizer step's values, still on the device: (step, lr, names, [loss, grad_norm, *fusion stats])."""
    values = [torch.stack(losses).float().mean(), torch.as_tensor(grad_norm, dtype=torch.float32, device=device),
              *(v.float() for v in stats.values())]
    return step, lr, ("loss", "grad_norm", *stats), torch.stack(values)  # [2] or [5]


def _flush(pending: list[tuple], accelerator, ckpt_root: Path) -> list[dict]:
    """The pending steps as history rows, with one host sync; a non-finite loss stops the run."""
    values = torch.stack([v for *_, v in pending])  # [K, 2|5]
    # the mean over processes: loss and fusion stats of the global batch (grad_norm and α agree on every rank)
    values = accelerator.reduce(values.contiguous(), "mean").tolist()  # [K, 2|5] on the host: the sync
    rows = []
    for (step, lr, names, _), v in zip(pending, values, strict=True):
        if not math.isfinite(v[0]):
            raise NonFiniteLoss(f"loss is {v[0]} at step {step}; stopped. The last good checkpoint is kept "
                                f"in {ckpt_root} (try a lower train.learning_rate or train.max_grad_norm)")
        rows.append({"step": step, "lr": lr, **dict(zip(names, v, strict=True))})
    return rows


def _full_fusion(fusion: SemanticFusion) -> SemanticFusion:
    """``fusion``, or under FSDP a plain copy of it with the gathered tensors (an all-gather: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in fusion.parameters()):
        return fusion
    full = SemanticFusion(fusion.mode, fusion.pooled_dim, fusion.image_embed_dim)
    full.load_state_dict({n: p.full_tensor().detach() for n, p in fusion.named_parameters()})
    full.init_method = fusion.init_method
    return full.to(fusion.theta.device)


def _alpha(fusion: SemanticFusion) -> float | None:
    a = _full_fusion(fusion).alpha
    return None if a is None else float(a.detach())


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _write_metrics(history: list[dict], result: TrainResult) -> None:
    """The DVC metrics and plots of the run: values only, no timings, so identical runs write identical bytes."""
    for f in (TRAIN_METRICS, TRAIN_PLOT, VAL_PLOT):
        Path(f).parent.mkdir(parents=True, exist_ok=True)
    vals = [r["val_loss"] for r in history if "val_loss" in r]
    metrics = {"loss": result.loss, "fusion_weight": result.fusion_weight, "steps": result.steps,
               "val_loss": vals[-1] if vals else None, "val_loss_start": vals[0] if vals else None}
    Path(TRAIN_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    _write_csv(Path(TRAIN_PLOT), PLOT_COLUMNS, [r for r in history if "loss" in r])  # one row per step
    _write_csv(Path(VAL_PLOT), ("step", "val_loss"), [r for r in history if "val_loss" in r])  # step 0 included


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A blank cell: not measured at this step (val_loss between validations, fusion with mode none)."""
    lines = [",".join(columns)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) if c == "step" else f"{r[c]:.6g}" for c in columns)
              for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _write_timing(result: TrainResult, device) -> None:
    """Throughput and peak memory: to MLflow and to a git-ignored file, never into a DVC out."""
    import mlflow

    timing = {"steps": result.steps, "samples_per_s": round(result.samples_per_s, 3),
              "peak_memory_mb": round(_peak_memory_mb(device), 1), "run_id": result.run_id}
    mlflow.log_metric("peak_memory_mb", timing["peak_memory_mb"])
    Path(TRAIN_TIMING).parent.mkdir(parents=True, exist_ok=True)
    Path(TRAIN_TIMING).write_text(json.dumps(timing, indent=2) + "\n")


def _load_checkpoint(accelerator, ckpt: Path) -> dict:
    """Restore ``ckpt``; returns its state (step, run_id, max_steps, history). A damaged one is refused in one line."""
    fix = f"delete the checkpoint (`rm -r {ckpt}`) to resume from the one before it, or start over with " \
          "`fluxfill train --fresh`"
    state_file = ckpt / CHECKPOINT_STATE
    with reading(state_file, what="checkpoint state", fix=fix):
        state = json.loads(state_file.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
            state.get("history"), list) or "run_id" not in state:
        raise damaged(state_file, "a checkpoint state from another version of fluxfill (step, run_id and "
                                  "history expected)", fix=fix)
    with reading(ckpt, what="checkpoint", fix=fix):
        accelerator.load_state(str(ckpt))
    return state


def _log_samples(params: Params, accelerator, transformer, fusion, step: int) -> None:
    """A sample grid [reference | source | generated | target] of validation samples, logged to MLflow.

    The main process generates it; under FSDP every rank does (the sharded model needs them all).
    """
    from accelerate.utils import DistributedType

    if not accelerator.is_main_process and accelerator.distributed_type != DistributedType.FSDP:
        return
    grid = training_sample_grid(params, accelerator.unwrap_model(transformer), accelerator.unwrap_model(fusion))
    if grid is not None and accelerator.is_main_process:
        tracking.log_image(grid, f"step_{step:06d}", folder="samples")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true",
                        help="delete this configuration's checkpoints (only those) and train from step 0")


def _worker_argv(args) -> list[str]:
    """The command line each worker runs: this one (--fresh included: the main worker applies it)."""
    argv = ["-v"] if args.verbose else []
    argv += ["train", *(["--params", args.params] if args.params else []), *(["--fresh"] if args.fresh else [])]
    return argv + [a for o in args.overrides for a in ("--set", o)]


def run(params: Params, args) -> int:
    safety.check_outputs(params, "train")  # the CLI holds the training lock (fluxfill.cli.LOCKED)
    world = distributed.launched_world_size()
    try:
        if world is None and params.train.num_processes > 1:  # start the workers; each runs this command
            distributed.launch(params.train.num_processes, _worker_argv(args))
            return 0
        if world is not None:
            distributed.stop_on_sigterm()
        try:
            result = train(params, fresh=args.fresh)
        except BaseException as e:
            distributed.record_failure(e)
            raise
    except KeyboardInterrupt:
        done = "a checkpoint was written" if (world or params.train.num_processes) == 1 else \
            "checkpoints are written every train.checkpoint_every steps"
        print(f"train: interrupted; {done}, run the same command (same --set and --params) again to resume", file=sys.stderr)
        return 130
    if not distributed.is_main_process():
        return 0
    if result.skipped:
        print(f"train: nothing to do: this configuration already finished {result.steps} steps in MLflow run "
              f"{result.run_id}, and {params.train.output}/, {TRAIN_METRICS} and {TRAIN_PLOT} still hold its outputs; "
              "`fluxfill train --fresh` trains it again")
        return 0
    alpha = "n/a (fusion.mode none)" if result.fusion_weight is None else f"{result.fusion_weight:.4f}"
    print(f"train: {result.steps} steps, loss {result.loss:.4f}, fusion weight {alpha}, "
          f"{result.samples_per_s:.1f} samples/s, MLflow run {result.run_id}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    return 0
