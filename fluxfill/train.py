"""Train LoRA adapters + the semantic fusion weight on FLUX.1-Fill from the latent cache (data/latents).

Rectified-flow objective (DESIGN §3) with accelerate: mixed precision (bf16 on CUDA, fp32 on CPU), gradient
accumulation, clipping, warm-up + schedule, optional gradient checkpointing, multi-GPU via `accelerate launch`:

  accelerate launch --num_processes 8 -m fluxfill.cli train             # DDP on 8 GPUs
  accelerate launch --config_file accelerate/fsdp.yaml -m fluxfill.cli train   # FSDP (see the file)

Outputs (DVC outs): models/lora/pytorch_lora_weights.safetensors (diffusers format, loads with
FluxFillPipeline.load_lora_weights), models/fusion.safetensors, models/mlflow_run.json, metrics/train.json,
plots/train.csv (step,loss,fusion_weight,lr).

Checkpoints (LoRA, fusion, optimizer, scheduler, RNG; accelerate's save_state) go to
checkpoints/<config hash>/checkpoint-<step> every train.checkpoint_every steps, atomically. A run restarted
with the same config resumes from its latest checkpoint and continues the same MLflow run; the data order
and the noise are functions of (seed, step), so a resumed run ends bit-identical to an uninterrupted one on
the CPU. Ctrl-C writes a checkpoint before exiting; a non-finite loss stops the run, keeping the last good one.
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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tracking
from .config import FluxfillError, Params
from .encode import LatentCache, settings
from .fusion import SemanticFusion
from .models import add_lora, load_component, resolve_dtype
from .objective import flow_matching_step
from .registry import register_trained_model
from .sampling import training_sample_grid

log = logging.getLogger(__name__)
LORA_DIR, FUSION_FILE, RUN_REF = "lora", "fusion.safetensors", "mlflow_run.json"
METRICS_FILE, PLOT_FILE = Path("metrics/train.json"), Path("plots/train.csv")
# settings that do not change the trained weights (so a restart with new values still resumes)
_NOT_IN_FINGERPRINT = {"output", "checkpoint_dir", "log_every", "sample_every", "checkpoint_every",
                       "keep_checkpoints", "num_workers"}


class NonFiniteLoss(FluxfillError):
    pass


def config_fingerprint(params: Params, cache_meta: dict) -> str:
    train = {k: v for k, v in params.train.model_dump().items() if k not in _NOT_IN_FINGERPRINT}
    if params.train.lr_scheduler == "constant" and params.train.warmup_steps == 0:
        train.pop("max_steps")  # a constant schedule does not depend on the run length: extending resumes
    blob = {"model": params.model.model_dump(), "fusion": params.fusion.model_dump(), "train": train,
            "cache": {k: cache_meta.get(k) for k in ("manifest_sha256", "code_version", "preset", "panel_size")}}
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
    t = params.train
    groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": t.learning_rate}]
    fusion_params = [p for p in fusion.parameters() if p.requires_grad]
    if fusion_params:
        groups.append({"params": fusion_params, "lr": t.fusion_learning_rate or t.learning_rate})
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


def _checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def train(params: Params, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training as configured; ``stop_after`` ends early after that many steps (tests)."""
    from accelerate.utils import set_seed
    from diffusers import FluxFillPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

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
    ckpt_root = Path(t.checkpoint_dir) / config_fingerprint(params, cache.meta)

    if main:  # fail fast on an unreachable tracking server, before any model is loaded
        tracking.check_reachable(tracking.tracking_uri(params.tracking))
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
    fusion = SemanticFusion.from_config(params.fusion, item["pooled_prompt_embeds"].shape[-1],
                                        item["image_embeds"].shape[-1]).to(device)
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
                save_file(get_peft_model_state_dict(m), str(Path(output_dir) / "lora.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if isinstance(m, SemanticFusion):
                m.load_state_dict(SemanticFusion.load(Path(input_dir) / FUSION_FILE).state_dict())
            else:
                set_peft_model_state_dict(m, load_file(str(Path(input_dir) / "lora.safetensors")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    start, run_id, history = 0, None, []
    if ckpt := (_checkpoints(ckpt_root) or [None])[-1]:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "fluxfill_state.json").read_text())
        start, run_id, history = state["step"], state["run_id"], state["history"]
        log.info("resuming from %s (step %d, MLflow run %s)", ckpt, start, run_id)

    accum = t.gradient_accumulation_steps
    sampler = StepSampler(len(cache), t.batch_size, t.seed + accelerator.process_index,
                          start=start * accum, total=t.max_steps * accum)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=cache.collate,
                                         num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=t.num_workers > 0)

    tags = {"accelerate.world_size": str(accelerator.num_processes), "accelerate.mixed_precision": mixed}
    run_ctx = tracking.start_run(params, run_id=run_id, tags=tags) if main else contextlib.nullcontext()
    with run_ctx as run:
        run_id = run.info.run_id if run else None
        result = _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root,
                       start, run_id, history, stop_after)
        if result.steps < t.max_steps:  # stopped early on purpose (tests, budget): a checkpoint, no final outputs
            return result
        accelerator.wait_for_everyone()
        if main:
            import mlflow

            unwrapped = accelerator.unwrap_model(transformer)
            fusion_module = accelerator.unwrap_model(fusion)
            out_dir = Path(t.output)
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            # the adapter metadata carries lora_alpha: without it diffusers would load at scale 1, not alpha/rank
            FluxFillPipeline.save_lora_weights(
                out_dir / LORA_DIR, safe_serialization=True,
                transformer_lora_layers=get_peft_model_state_dict(unwrapped),
                transformer_lora_adapter_metadata=unwrapped.peft_config["default"].to_dict())
            fusion_module.save(out_dir / FUSION_FILE)
            tracking.write_run_ref(out_dir / RUN_REF, run)
            _write_metrics(history, result, device)
            _log_samples(params, unwrapped, fusion_module, result.steps)
            register_trained_model(params, out_dir)
            mlflow.log_artifacts(str(out_dir), "model")
    return result


def _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root, start, run_id,
          history, stop_after) -> TrainResult:
    import mlflow

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
        (tmp / "fluxfill_state.json").write_text(json.dumps({"step": step, "run_id": run_id, "history": history}))
        final = ckpt_root / f"checkpoint-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(ckpt_root)[:-t.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    fusion_module = accelerator.unwrap_model(fusion)
    step, last_loss, window_t, window_samples = start, float("nan"), time.perf_counter(), 0
    samples_per_s, losses = 0.0, []
    end = t.max_steps if stop_after is None else min(t.max_steps, start + stop_after)
    micro = start * t.gradient_accumulation_steps
    bar = tqdm(total=t.max_steps, initial=start, desc="train", unit="step", disable=not main)
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
            if step % t.log_every == 0 or step == end or (t.checkpoint_every and step % t.checkpoint_every == 0):
                loss = accelerator.reduce(torch.stack(losses).mean(), "mean").item()  # the one host sync
                losses.clear()
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss} at step {step}; stopped. The last good checkpoint is kept "
                                        f"in {ckpt_root} (try a lower train.learning_rate or train.max_grad_norm)")
                last_loss = loss
                now = time.perf_counter()
                samples_per_s = window_samples / max(now - window_t, 1e-9)
                window_t, window_samples = now, 0
                alpha = _alpha(fusion_module)
                row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "samples_per_s": samples_per_s}
                if alpha is not None:
                    row["fusion_weight"] = alpha
                history.append(row)
                if main:
                    mlflow.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step, synchronous=False)
                    bar.set_postfix(loss=f"{loss:.4f}", alpha="-" if alpha is None else f"{alpha:.4f}",
                                    sps=f"{samples_per_s:.1f}")
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps:
                checkpoint(step)
            if main and t.sample_every and step % t.sample_every == 0 and step < t.max_steps:
                _log_samples(params, accelerator.unwrap_model(transformer), fusion_module, step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: writing a checkpoint", step)
        checkpoint(step)
        raise
    finally:
        bar.close()
    if step < t.max_steps:
        checkpoint(step)
    return TrainResult(step, last_loss, _alpha(fusion_module), samples_per_s, run_id, start)


def _alpha(fusion: SemanticFusion) -> float | None:
    a = fusion.alpha
    return None if a is None else float(a.detach())


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _write_metrics(history, result: TrainResult, device) -> None:
    METRICS_FILE.parent.mkdir(parents=True, exist_ok=True)
    PLOT_FILE.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"loss": result.loss, "fusion_weight": result.fusion_weight, "steps": result.steps,
               "samples_per_s": round(result.samples_per_s, 3),
               "peak_memory_mb": round(_peak_memory_mb(device), 1)}
    METRICS_FILE.write_text(json.dumps(metrics, indent=2) + "\n")
    lines = ["step,loss,fusion_weight,lr"]
    for r in history:
        fw = "" if r.get("fusion_weight") is None else f"{r['fusion_weight']:.6f}"
        lines.append(f"{r['step']},{r['loss']:.6f},{fw},{r['lr']:.6g}")
    PLOT_FILE.write_text("\n".join(lines) + "\n")


def _log_samples(params: Params, transformer, fusion, step: int) -> None:
    """A sample grid [reference | source | generated | target] of validation samples, logged to MLflow."""
    grid = training_sample_grid(params, transformer, fusion)
    if grid is not None:
        tracking.log_image(grid, f"step_{step:06d}", folder="samples")


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this config and start over")


def run(params: Params, args) -> int:
    if args.fresh:
        shutil.rmtree(Path(params.train.checkpoint_dir), ignore_errors=True)
    try:
        result = train(params)
    except KeyboardInterrupt:
        print("train: interrupted; a checkpoint was written, run `fluxfill train` again to resume", file=sys.stderr)
        return 130
    alpha = "n/a (fusion.mode none)" if result.fusion_weight is None else f"{result.fusion_weight:.4f}"
    print(f"train: {result.steps} steps, loss {result.loss:.4f}, fusion weight {alpha}, "
          f"{result.samples_per_s:.1f} samples/s, MLflow run {result.run_id}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    return 0
