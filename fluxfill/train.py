"""Train LoRA adapters + the semantic fusion weight on FLUX.1-Fill from the latent cache (data/latents).

Rectified-flow objective (DESIGN §3) with accelerate: mixed precision (bf16 on CUDA, fp32 on CPU), gradient
accumulation, clipping, warm-up + schedule, optional gradient checkpointing, several processes:

  fluxfill train --set train.num_processes=8       # DDP: 8 workers (GPUs; gloo on a CPU), see fluxfill.distributed
  accelerate launch --config_file accelerate/fsdp.yaml --num_processes 8 -m fluxfill.cli train   # FSDP

The global batch of one optimizer step is num_processes x batch_size x gradient_accumulation_steps samples;
which samples, and each sample's sigma and noise, depend only on (seed, step, position in the global batch),
so N processes with batch b train the model 1 process with batch N*b trains, up to float reduction order.

Outputs (DVC outs): models/lora/pytorch_lora_weights.safetensors (diffusers format, loads with
FluxFillPipeline.load_lora_weights), models/fusion.safetensors, models/mlflow_run.json, metrics/train.json,
plots/train.csv (step,loss,fusion_weight,lr).

Checkpoints (LoRA, fusion, optimizer, scheduler, RNG; accelerate's save_state) go to
checkpoints/<config hash>/checkpoint-<step> every train.checkpoint_every steps, atomically. A run restarted
with the same config resumes from its latest checkpoint and continues the same MLflow run; the data order
and the noise are functions of (seed, step), so a resumed run ends bit-identical to an uninterrupted one on
the CPU. The fingerprint holds the global batch, not its split: a run resumes with another number of processes
when the global batch stays the same, and is refused (naming what to set) when it would change. Ctrl-C writes a
checkpoint before exiting (one process); a non-finite loss stops the run, keeping the last good one.
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

from . import distributed, tracking
from .config import FluxfillError, Params
from .encode import LatentCache, settings
from .fusion import SemanticFusion
from .models import add_lora, load_component, resolve_dtype
from .objective import flow_matching_step

log = logging.getLogger(__name__)
LORA_DIR, FUSION_FILE, RUN_REF = "lora", "fusion.safetensors", "mlflow_run.json"
METRICS_FILE, PLOT_FILE = Path("metrics/train.json"), Path("plots/train.csv")
# settings that do not change the trained weights (so a restart with new values still resumes)
_NOT_IN_FINGERPRINT = {"output", "checkpoint_dir", "log_every", "sample_every", "checkpoint_every",
                       "keep_checkpoints", "num_workers",
                       # how the global batch is split over processes and micro-batches: the fingerprint has its size
                       "num_processes", "batch_size", "gradient_accumulation_steps"}


class NonFiniteLoss(FluxfillError):
    pass


def global_batch(t) -> int:
    return t.num_processes * t.batch_size * t.gradient_accumulation_steps


def config_fingerprint(params: Params, cache_meta: dict, with_batch: bool = True) -> str:
    train = {k: v for k, v in params.train.model_dump().items() if k not in _NOT_IN_FINGERPRINT}
    if with_batch:
        train["global_batch"] = global_batch(params.train)
    if params.train.lr_scheduler == "constant" and params.train.warmup_steps == 0:
        train.pop("max_steps")  # a constant schedule does not depend on the run length: extending resumes
    blob = {"model": params.model.model_dump(), "fusion": params.fusion.model_dump(), "train": train,
            "cache": {k: cache_meta.get(k) for k in ("manifest_sha256", "code_version", "preset", "panel_size")}}
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


def sample_generators(seed: int, step: int, positions: range, device) -> list[torch.Generator]:
    """One σ/noise generator per sample, seeded by (seed, optimizer step, position in the global batch)."""
    return [torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 1_000_033 + p) % (2**63))
            for p in positions]


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
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    from accelerate import Accelerator

    cache = LatentCache(params.encode.output, "train", expect={
        k: v for k, v in settings(params).items() if k in ("preset", "pretrained", "panel_size", "max_sequence_length")})
    mixed = params.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    # the schedule counts optimizer steps, however many processes share them (so a resume may change that number)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=params.train.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False, cpu=distributed.use_cpu())
    params = distributed.with_world_size(params, accelerator.num_processes)
    t = params.train
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(t.seed)
    ckpt_root = Path(t.checkpoint_dir) / config_fingerprint(params, cache.meta)
    if not _checkpoints(ckpt_root):
        _refuse_another_split(params, cache.meta)

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
                              num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    transformer, fusion, optimizer, scheduler = accelerator.prepare(transformer, fusion, optimizer, scheduler)
    if t.compile is True or (t.compile == "auto" and on_cuda):
        for block in (*accelerator.unwrap_model(transformer).transformer_blocks,
                      *accelerator.unwrap_model(transformer).single_transformer_blocks):
            block.compile()
    _register_state_hooks(accelerator)

    start, run_id, history = 0, None, []
    if ckpt := (_checkpoints(ckpt_root) or [None])[-1]:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "fluxfill_state.json").read_text())
        start, run_id, history = state["step"], state["run_id"], state["history"]
        log.info("resuming from %s (step %d, MLflow run %s)", ckpt, start, run_id)

    accum = t.gradient_accumulation_steps
    sampler = StepSampler(len(cache), t.batch_size, t.seed, start=start * accum, total=t.max_steps * accum,
                          accum=accum, world=accelerator.num_processes, rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(cache, batch_sampler=sampler, collate_fn=cache.collate,
                                         num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=t.num_workers > 0)

    tags = {"accelerate.world_size": str(accelerator.num_processes), "accelerate.mixed_precision": mixed,
            "accelerate.distributed_type": str(accelerator.distributed_type).split(".")[-1]}
    split = {"family": config_fingerprint(params, cache.meta, with_batch=False), "world_size": t.num_processes,
             "batch_size": t.batch_size, "gradient_accumulation_steps": accum, "global_batch": global_batch(t)}
    run_ctx = tracking.start_run(params, run_id=run_id, tags=tags) if main else contextlib.nullcontext()
    with run_ctx as run:
        run_id = run.info.run_id if run else None
        result = _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root,
                       start, run_id, history, stop_after, split)
        if result.steps < t.max_steps:  # stopped early on purpose (tests, budget): a checkpoint, no final outputs
            return result
        accelerator.wait_for_everyone()
        _write_outputs(params, accelerator, transformer, fusion, run, history, result)
    return result


def _refuse_another_split(params: Params, cache_meta: dict) -> None:
    """Refuse to start over when this configuration has checkpoints from another number of processes whose
    global batch differs from this run's: resuming them needs the same global batch, starting over loses them."""
    t = params.train
    family = config_fingerprint(params, cache_meta, with_batch=False)
    for path in sorted(Path(t.checkpoint_dir).glob("*/checkpoint-*/fluxfill_state.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("family") != family or state.get("world_size") == t.num_processes:
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


def _register_state_hooks(accelerator) -> None:
    """Checkpoints hold the trainable tensors (LoRA, fusion), not the frozen base; FSDP shards are gathered."""
    from safetensors.torch import load_file, save_file

    def path(folder, model) -> Path:
        return Path(folder) / (FUSION_FILE if isinstance(accelerator.unwrap_model(model), SemanticFusion)
                               else "lora.safetensors")

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


def _write_outputs(params: Params, accelerator, transformer, fusion, run, history, result: TrainResult) -> None:
    """models/ (diffusers-format LoRA, fusion, run reference), metrics, plot and the final sample grid.

    Every rank calls it (FSDP gathers the shards); the main process writes and logs.
    """
    import mlflow
    from diffusers import FluxFillPipeline
    from peft.utils import get_peft_model_state_dict

    main = accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(transformer)
    trainable = distributed.trainable_state_dict(unwrapped)
    fusion_module = _full_fusion(accelerator.unwrap_model(fusion))
    out_dir = Path(params.train.output)
    if main:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        # the adapter metadata carries lora_alpha: without it diffusers would load at scale 1, not alpha/rank
        FluxFillPipeline.save_lora_weights(
            out_dir / LORA_DIR, safe_serialization=True,
            transformer_lora_layers=get_peft_model_state_dict(unwrapped, state_dict=trainable),
            transformer_lora_adapter_metadata=unwrapped.peft_config["default"].to_dict())
        fusion_module.save(out_dir / FUSION_FILE)
        tracking.write_run_ref(out_dir / RUN_REF, run)
        _write_metrics(history, result, accelerator.device)
    _log_samples(params, accelerator, transformer, fusion, result.steps)
    if main:
        mlflow.log_artifacts(str(out_dir), "model")


def _loop(params, accelerator, transformer, fusion, optimizer, scheduler, loader, ckpt_root, start, run_id,
          history, stop_after, split: dict) -> TrainResult:
    import mlflow

    t = params.train
    device, main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes

    def checkpoint(step: int) -> None:
        tmp = ckpt_root / f".tmp-checkpoint-{step:06d}"
        if main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every rank: its RNG state (and FSDP shards); the main process the rest
        accelerator.wait_for_everyone()
        if not main:
            return
        state = {"step": step, "run_id": run_id, "history": history, **split}
        (tmp / "fluxfill_state.json").write_text(json.dumps(state))
        final = ckpt_root / f"checkpoint-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(ckpt_root)[:-t.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    fusion_module = accelerator.unwrap_model(fusion)
    sampler = loader.batch_sampler
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
            distributed.fail_point(accelerator.process_index, step + 1)
            with accelerator.accumulate(transformer, fusion):
                gens = sample_generators(t.seed, *sampler.positions(micro), device)
                out = flow_matching_step(transformer, fusion, batch, t.loss_region, generator=gens)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not optimizer.step_was_skipped:
                    scheduler.step()  # once per optimizer step (the scheduler is not tied to the optimizer)
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
            if t.sample_every and step % t.sample_every == 0 and step < t.max_steps:
                _log_samples(params, accelerator, transformer, fusion, step)
    except KeyboardInterrupt:
        if world > 1:  # the ranks stop at different points: collectives for a checkpoint could wait forever
            log.warning("interrupted at step %d: %d processes resume from the last periodic checkpoint", step, world)
            raise
        log.warning("interrupted at step %d: writing a checkpoint", step)
        checkpoint(step)
        raise
    finally:
        bar.close()
    if step < t.max_steps:
        checkpoint(step)
    return TrainResult(step, last_loss, _alpha(fusion_module), samples_per_s, run_id, start)


def _full_fusion(fusion: SemanticFusion) -> SemanticFusion:
    """``fusion``, or under FSDP a plain copy of it with the gathered tensors (an all-gather: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in fusion.parameters()):
        return fusion
    full = SemanticFusion(fusion.mode, fusion.pooled_dim, fusion.image_embed_dim)
    full.load_state_dict({n: p.full_tensor().detach() for n, p in fusion.named_parameters()})
    return full


def _alpha(fusion: SemanticFusion) -> float | None:
    a = _full_fusion(fusion).alpha
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


def _log_samples(params: Params, accelerator, transformer, fusion, step: int) -> None:
    """A sample grid [reference | source | generated | target] of validation samples, logged to MLflow.

    The main process generates it; under FSDP every rank does (the sharded model needs them all).
    """
    from accelerate.utils import DistributedType

    if not accelerator.is_main_process and accelerator.distributed_type != DistributedType.FSDP:
        return
    try:
        from .evaluate import training_sample_grid
    except ImportError:  # evaluation not installed: no grid
        return
    grid = training_sample_grid(params, accelerator.unwrap_model(transformer), accelerator.unwrap_model(fusion))
    if grid is not None and accelerator.is_main_process:
        tracking.log_image(grid, f"step_{step:06d}", folder="samples")


def _main_process_first(world: int | None):
    """Inside a launch: the main process runs the block first, the others wait (accelerate's own barrier)."""
    if world is None:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState(cpu=distributed.use_cpu()).main_process_first()


def _worker_argv(args) -> list[str]:
    """The command line each worker runs: this one, without --fresh (done once, here)."""
    argv = ["-v"] if args.verbose else []
    argv += ["train", *(["--params", args.params] if args.params else [])]
    return argv + [a for o in args.overrides for a in ("--set", o)]


def add_arguments(parser) -> None:
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this config and start over")


def run(params: Params, args) -> int:
    world = distributed.launched_world_size()
    if args.fresh:
        with _main_process_first(world):
            if distributed.is_main_process():
                shutil.rmtree(Path(params.train.checkpoint_dir), ignore_errors=True)
    try:
        if world is None and params.train.num_processes > 1:  # start the workers; each runs this command again
            distributed.launch(params.train.num_processes, _worker_argv(args))
            return 0
        if world is not None:
            distributed.stop_on_sigterm()
        try:
            result = train(params)
        except BaseException as e:
            distributed.record_failure(e)
            raise
    except KeyboardInterrupt:
        done = "a checkpoint was written" if (world or params.train.num_processes) == 1 else \
            "checkpoints are written every train.checkpoint_every steps"
        print(f"train: interrupted; {done}, run `fluxfill train` again to resume", file=sys.stderr)
        return 130
    if not distributed.is_main_process():
        return 0
    alpha = "n/a (fusion.mode none)" if result.fusion_weight is None else f"{result.fusion_weight:.4f}"
    print(f"train: {result.steps} steps, loss {result.loss:.4f}, fusion weight {alpha}, "
          f"{result.samples_per_s:.1f} samples/s, MLflow run {result.run_id}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    return 0
