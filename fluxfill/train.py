"""Train LoRA adapters + the semantic fusion weight on FLUX.1-Fill from the latent cache (data/latents).

Rectified-flow objective (docs/design.md §3) with accelerate: mixed precision (bf16 on CUDA, fp32 on CPU), gradient
accumulation, clipping, warm-up + schedule, optional gradient checkpointing, multi-GPU via `accelerate launch`:

  accelerate launch --num_processes 8 -m fluxfill.cli train             # DDP on 8 GPUs
  accelerate launch --config_file accelerate/fsdp.yaml -m fluxfill.cli train   # FSDP (see the file)

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
(checkpoints/<fingerprint>/finished-<max_steps>.json records them). Ctrl-C writes a checkpoint before exiting;
a non-finite loss stops the run, keeping the last good one.
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

from . import safety, sources, tracking
from .artifacts import (
    CHECKPOINT_LORA,
    CHECKPOINT_STATE,
    FUSION_FILE,
    LORA_DIR,
    TRAIN_METRICS,
    TRAIN_PLOT,
    TRAIN_TIMING,
    VAL_PLOT,
    canonical,
    canonical_safetensors_header,
    damaged,
    lora_weights,
    reading,
)
from .config import FluxfillError, Params
from .encode import LatentCache, settings
from .fusion import SemanticFusion, build_fusion
from .models import add_lora, load_component, resolve_dtype
from .objective import flow_matching_step
from .registry import register_trained_model
from .sampling import training_sample_grid
from .validation import validation_loss

log = logging.getLogger(__name__)
# train.* settings that do not change the trained weights, left out of the checkpoint fingerprint (a restart with
# new values still resumes); a new setting of that kind goes here
NOT_IN_FINGERPRINT = frozenset({"output", "checkpoint_dir", "log_every", "sample_every", "checkpoint_every",
                                "keep_checkpoints", "num_workers"})
UNFINISHED = {"RUNNING", "KILLED", "FAILED"}  # MLflow run states a resumed run may continue
PLOT_COLUMNS = ("step", "loss", "fusion_weight", "fusion_cos", "fusion_ref_norm", "val_loss", "lr")


class NonFiniteLoss(FluxfillError):
    pass


def config_fingerprint(params: Params, cache_meta: dict, device_type: str, code: str | None = None) -> str:
    """What the weights at each step are a function of; checkpoints live in ``<checkpoint_dir>/<fingerprint>``.

    - every model, fusion and train setting except :data:`NOT_IN_FINGERPRINT`;
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
    if params.train.lr_scheduler == "constant":
        train.pop("max_steps")
    blob = {"model": params.model.model_dump(), "fusion": params.fusion.model_dump(), "train": train,
            "cache": cache_meta, "code": code or sources.module_digest("train"), "device": device_type}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


class StepSampler(torch.utils.data.Sampler):
    """Batches of indices as a function of (seed, micro-step): epoch e is randperm(n) seeded by seed + e.

    Starting at ``start`` micro-steps reproduces exactly the batches an uninterrupted run would see next.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, total: int | None = None):
        if n < batch_size:
            raise FluxfillError(f"train.batch_size {batch_size} exceeds the {n} training samples in the cache")
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.per_epoch = n // batch_size

    def batch(self, i: int) -> list[int]:
        epoch, k = divmod(i, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return perm[k * self.bs:(k + 1) * self.bs].tolist()

    def __iter__(self):
        i = self.start
        while self.total is None or i < self.total:
            yield self.batch(i)
            i += 1

    def __len__(self):
        return (self.total or 0) - self.start


def step_generator(seed: int, micro_step: int, rank: int, device) -> torch.Generator:
    """The noise/σ generator of one micro-step: independent of how the run was split into restarts."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + micro_step * 9_176 + rank) % (2**63))
    return g


def _optimizer(params: Params, transformer, fusion, device):
    """Groups: LoRA (train.learning_rate), W and θ (train.fusion_learning_rate); θ alone, without weight decay."""
    t = params.train
    fusion_lr = t.fusion_learning_rate or t.learning_rate
    groups = [{"name": "lora", "params": [p for p in transformer.parameters() if p.requires_grad],
               "lr": t.learning_rate, "weight_decay": t.weight_decay}]
    for name, p in fusion.named_parameters():
        if p.requires_grad:  # decay would pull θ toward α = 0.5
            decay = 0.0 if name == "theta" else t.weight_decay
            groups.append({"name": f"fusion.{name}", "params": [p], "lr": fusion_lr, "weight_decay": decay})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=device.type == "cuda")
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FluxfillError("train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise FluxfillError("train.optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
    return Prodigy(groups, weight_decay=t.weight_decay)


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
    except (OSError, ValueError, KeyError, TypeError):
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

    from accelerate import Accelerator

    t = params.train
    cache = LatentCache(params.encode.output, "train", expect={
        k: v for k, v in settings(params).items() if k in ("preset", "pretrained", "panel_size", "max_sequence_length")})
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=t.gradient_accumulation_steps)
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

    transformer, fusion, optimizer, scheduler = _build(params, accelerator, cache, mixed)
    start, history, run_id, resumed_run = 0, [], None, None
    if ckpt := resumable(ckpt_root, t.max_steps):
        state = _load_checkpoint(accelerator, ckpt)
        start, history, resumed_run = state["step"], state["history"], state.get("run_id")
        run_id = _own_run(state, t.max_steps) if main else None
        log.info("resuming from %s (step %d) %s", ckpt, start,
                 f"in MLflow run {run_id}" if run_id else f"in a new MLflow run (run {resumed_run} is finished or "
                 "was started with another train.max_steps)")

    accum = t.gradient_accumulation_steps
    sampler = StepSampler(len(cache), t.batch_size, t.seed + accelerator.process_index,
                          start=start * accum, total=t.max_steps * accum)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=cache.collate,
                                         num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=t.num_workers > 0)

    tags = {"accelerate.world_size": str(accelerator.num_processes), "accelerate.mixed_precision": mixed,
            "fluxfill.fingerprint": fingerprint}
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
        result = _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root,
                       start, run_id, history, stop_after, _val_cache(params))
        if result.steps < t.max_steps:  # stopped early on purpose (tests, budget): a checkpoint, no final outputs
            if main:
                tracking.end_run_unfinished()
            return result
        accelerator.wait_for_everyone()
        if main:
            _write_outputs(params, accelerator, transformer, fusion, run, history, result)
            record = {"outputs": _digests(_output_files(params)), "result": asdict(result)}
            _finished_record(ckpt_root, t.max_steps).parent.mkdir(parents=True, exist_ok=True)
            _finished_record(ckpt_root, t.max_steps).write_text(json.dumps(record, indent=2) + "\n")
    return result


def _build(params: Params, accelerator, cache: LatentCache, mixed: str):
    """The transformer with LoRA, the fusion module, optimizer and schedule, prepared by accelerate, with the
    checkpoint hooks that save only the trainable weights."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    t, device = params.train, accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    if params.model.dtype != "auto":
        weight_dtype = resolve_dtype(params.model.dtype, device)
    transformer = load_component(params.model, "transformer", device, weight_dtype)
    add_lora(transformer, t.lora)
    cast_training_params(transformer, torch.float32)  # trainable LoRA weights in fp32, frozen base in weight_dtype
    on_cuda = device.type == "cuda"
    if on_cuda:
        # cuDNN's SDPA backward hit an illegal memory access at FLUX shapes (H100, torch 2.11); flash is as fast
        torch.backends.cuda.enable_cudnn_sdp(False)
    if t.gradient_checkpointing is True or (t.gradient_checkpointing == "auto" and on_cuda):
        transformer.enable_gradient_checkpointing()
    item = cache[0]
    fusion = build_fusion(params, item["pooled_prompt_embeds"].shape[-1], item["image_embeds"].shape[-1]).to(device)
    transformer.train()
    optimizer = _optimizer(params, transformer, fusion, device)
    scheduler = get_scheduler("constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler, optimizer,
                              num_warmup_steps=t.warmup_steps * accelerator.num_processes,
                              num_training_steps=t.max_steps * accelerator.num_processes)
    transformer, fusion, optimizer, scheduler = accelerator.prepare(transformer, fusion, optimizer, scheduler)
    if t.compile is True or (t.compile == "auto" and on_cuda):
        for block in (*accelerator.unwrap_model(transformer).transformer_blocks,
                      *accelerator.unwrap_model(transformer).single_transformer_blocks):
            block.compile()

    def save_hook(models, weights, output_dir):  # only the trainable weights, not the frozen 12B base
        for m in models:
            m = accelerator.unwrap_model(m)
            if isinstance(m, SemanticFusion):
                m.save(Path(output_dir) / FUSION_FILE)
            else:
                save_file(get_peft_model_state_dict(m), str(Path(output_dir) / CHECKPOINT_LORA))
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if isinstance(m, SemanticFusion):
                m.load_state_dict(SemanticFusion.load(Path(input_dir) / FUSION_FILE).state_dict())
            else:
                set_peft_model_state_dict(m, load_file(str(Path(input_dir) / CHECKPOINT_LORA)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return transformer, fusion, optimizer, scheduler


def _write_outputs(params: Params, accelerator, transformer, fusion, run, history, result: TrainResult) -> None:
    """LoRA, fusion, run reference, metrics and plot of a finished run; only these files are replaced."""
    import mlflow
    from diffusers import FluxFillPipeline
    from peft.utils import get_peft_model_state_dict

    unwrapped = accelerator.unwrap_model(transformer)
    fusion_module = accelerator.unwrap_model(fusion)
    out_dir = Path(params.train.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for own in (out_dir / LORA_DIR, out_dir / FUSION_FILE):  # what this stage wrote before
        shutil.rmtree(own) if own.is_dir() else own.unlink(missing_ok=True)
    # the adapter metadata carries lora_alpha: without it diffusers would load at scale 1, not alpha/rank
    FluxFillPipeline.save_lora_weights(
        out_dir / LORA_DIR, safe_serialization=True,
        transformer_lora_layers=get_peft_model_state_dict(unwrapped),
        transformer_lora_adapter_metadata=canonical(unwrapped.peft_config["default"].to_dict()))
    canonical_safetensors_header(lora_weights(out_dir))
    fusion_module.save(out_dir / FUSION_FILE)
    tracking.write_run_ref(run, out_dir)
    _write_metrics(history, result)
    _write_timing(result, accelerator.device)
    _log_samples(params, unwrapped, fusion_module, result.steps)
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


def _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root, start, run_id,
          history, stop_after, val_cache=None) -> TrainResult:
    """Train from step ``start``; every optimizer step appends one row to ``history`` (step, loss, lr, ...).

    The step's loss, gradient norm and α stay on the device until a log step (``train.log_every``), a checkpoint
    or the end, where one host sync brings every pending step back: ``history`` (hence ``plots/train.csv``)
    does not depend on ``log_every`` or ``checkpoint_every``.
    """
    t = params.train
    device, main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if not main:
            return
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_root / f".tmp-checkpoint-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.save_state(str(tmp))
        state = {"step": step, "run_id": run_id, "max_steps": t.max_steps, "history": history}
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
        final = ckpt_root / f"checkpoint-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # keep the newest ones up to this step; later ones belong to a longer run of the same trajectory
        for old in [c for c in _checkpoints(ckpt_root) if _step(c) <= step][:-t.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    fusion_module = accelerator.unwrap_model(fusion)
    step, window_t, window_samples = start, time.perf_counter(), 0
    samples_per_s, losses, pending = 0.0, [], []
    end = t.max_steps if stop_after is None else min(t.max_steps, start + stop_after)
    micro = start * t.gradient_accumulation_steps
    bar = tqdm(total=t.max_steps, initial=start, desc="train", unit="step", disable=not main)

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
            with accelerator.accumulate(transformer, fusion):
                gen = step_generator(t.seed, micro, accelerator.process_index, device)
                out = flow_matching_step(transformer, fusion, batch, t.loss_region, generator=gen)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            losses.append(out.loss.detach())
            window_samples += batch["x_0"].shape[0] * world
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            stats = fusion_module.stat_tensors(batch["pooled_prompt_embeds"], batch.get("image_embeds"))
            pending.append(_pending_row(step, losses, grad_norm, stats, scheduler.get_last_lr()[0], device))
            losses = []
            val_step = t.val_every and (step % t.val_every == 0 or step == t.max_steps)
            if (step % t.log_every == 0 or step == end or val_step
                    or (t.checkpoint_every and step % t.checkpoint_every == 0)):
                rows = _flush(pending, accelerator, ckpt_root)  # the one host sync
                pending.clear()
                history.extend(rows)
                now = time.perf_counter()
                samples_per_s = window_samples / max(now - window_t, 1e-9)
                window_t, window_samples = now, 0
                if main:
                    _log_rows(rows, samples_per_s)
                    last = rows[-1]
                    alpha = last.get("fusion_weight", math.nan)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", alpha=f"{alpha:.4f}", sps=f"{samples_per_s:.1f}")
            if val_step:
                validate(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                checkpoint(step)
            if main and t.sample_every and step % t.sample_every == 0 and step < t.max_steps:
                _log_samples(params, accelerator.unwrap_model(transformer), fusion_module, step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: writing a checkpoint", step)
        history.extend(_flush(pending, accelerator, ckpt_root) if pending else [])
        checkpoint(step)
        raise
    finally:
        bar.close()
    if step < t.max_steps:
        checkpoint(step)
    last_loss = history[-1]["loss"] if history else float("nan")
    return TrainResult(step, last_loss, _alpha(fusion_module), samples_per_s, run_id, start)


def _pending_row(step: int, losses: list[torch.Tensor], grad_norm, stats: dict, lr: float, device) -> tuple:
    """One optimizer step's values, still on the device: (step, lr, names, [loss, grad_norm, *fusion stats])."""
    values = [torch.stack(losses).float().mean(), torch.as_tensor(grad_norm, dtype=torch.float32, device=device),
              *(v.float() for v in stats.values())]
    return step, lr, ("loss", "grad_norm", *stats), torch.stack(values)  # [2] or [5]


def _flush(pending: list[tuple], accelerator, ckpt_root: Path) -> list[dict]:
    """The pending steps as history rows, with one host sync; a non-finite loss stops the run."""
    values = torch.stack([v for *_, v in pending])  # [K, 2|5]
    losses = accelerator.reduce(values[:, 0].contiguous(), "mean")  # [K] the mean over processes
    values = torch.cat([losses[:, None], values[:, 1:]], dim=1).tolist()  # [K, 2|5] on the host: the sync
    rows = []
    for (step, lr, names, _), v in zip(pending, values, strict=True):
        if not math.isfinite(v[0]):
            raise NonFiniteLoss(f"loss is {v[0]} at step {step}; stopped. The last good checkpoint is kept "
                                f"in {ckpt_root} (try a lower train.learning_rate or train.max_grad_norm)")
        rows.append({"step": step, "lr": lr, **dict(zip(names, v, strict=True))})
    return rows


def _log_rows(rows: list[dict], samples_per_s: float) -> None:
    """Every step's loss, lr, grad_norm and α to MLflow (one batch), and the window's throughput."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, r["step"]) for r in rows for k, v in r.items() if k != "step"]
    metrics.append(Metric("samples_per_s", samples_per_s, now, rows[-1]["step"]))
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics, synchronous=False)


def _alpha(fusion: SemanticFusion) -> float | None:
    a = fusion.alpha
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


def _log_samples(params: Params, transformer, fusion, step: int) -> None:
    """A sample grid [reference | source | generated | target] of validation samples, logged to MLflow."""
    grid = training_sample_grid(params, transformer, fusion)
    if grid is not None:
        tracking.log_image(grid, f"step_{step:06d}", folder="samples")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true",
                        help="delete this configuration's checkpoints (only those) and train from step 0")


def run(params: Params, args) -> int:
    safety.check_outputs(params, "train")  # the CLI holds the training lock (fluxfill.cli.LOCKED)
    try:
        result = train(params, fresh=args.fresh)
    except KeyboardInterrupt:
        print("train: interrupted; a checkpoint was written, run `fluxfill train` again to resume", file=sys.stderr)
        return 130
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
