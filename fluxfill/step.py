"""The training step: one code path for `fluxfill train`, its multi-process runs and the GPU benchmark.

:func:`load_transformer` loads the frozen base (stored as ``model.quantize`` says, the processes taking turns on
the host) and attaches the LoRA in fp32; :func:`build` applies the memory and speed settings (gradient
checkpointing, ``torch.compile`` per block, attention kernels), creates the optimizer and schedule and hands
everything to ``accelerate``; :func:`train_step` runs one micro-step. Whoever calls them gets the same policy:

- frozen base in ``model.dtype`` (auto: the mixed-precision dtype), LoRA and fusion weights in fp32;
- the forward under accelerate's autocast (``train.mixed_precision``, auto: bf16 on CUDA), outputs in fp32;
- loss (docs/design.md §3) -> backward -> clip to ``train.max_grad_norm`` -> AdamW (fused on CUDA) -> schedule
  (once per optimizer step) -> ``zero_grad(set_to_none=True)``, inside ``accelerator.accumulate``; no host sync.

``bench/gpu_train_step.py`` times :func:`train_step` on a :class:`Trainer` from :func:`build`: the benchmark
measures the step users run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import FluxfillError, Params, TrainConfig
from .models import add_lora, load_component, resolve_dtype
from .objective import flow_matching_step, model_dtype


def mixed_precision(t: TrainConfig, device: torch.device) -> str:
    """``train.mixed_precision`` resolved: auto is bf16 on CUDA, no elsewhere."""
    if t.mixed_precision != "auto":
        return t.mixed_precision
    return "bf16" if device.type == "cuda" else "no"


def weight_dtype(params: Params, mixed: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``model.dtype``, or with auto the mixed-precision dtype (fp32 without one)."""
    if params.model.dtype != "auto":
        return resolve_dtype(params.model.dtype, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)


def resolve(setting: bool | str, device: torch.device) -> bool:
    """An ``auto`` / bool switch: auto is on with CUDA."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_setting(params: Params, device: torch.device) -> bool:
    """``train.compile`` resolved: ``auto`` is on with CUDA for a bf16/fp16/fp32 base and off for a quantised one
    (torch 2.11's compiler refused torchao's int8 weights in the backward pass on the H100: output aliasing
    with tensor-subclass inputs)."""
    if params.train.compile != "auto":
        return bool(params.train.compile)
    return device.type == "cuda" and params.model.quantize == "none"


# Activations one transformer block keeps for its backward pass, in bytes per sample, token and hidden unit, at
# FLUX.1 shapes in bf16 (eager): 38 on the H100 (bench/results/gpu_train_step*.json: batch 2 peak without
# checkpointing minus the peak with it, over 57 blocks, 2560 tokens, hidden 3072). A checkpointed block keeps
# only its inputs.
ACTIVATION_BYTES = 38
ACTIVATION_SHARE = 0.45  # of the memory free after loading that ``auto`` lets un-checkpointed blocks hold


def tokens_per_sample(params: Params) -> int:
    """Image tokens of one diptych (2 panels, 16 px a token after the VAE and 2x2 packing) + text tokens."""
    side = params.data.panel_size // 16
    return 2 * side * side + params.model.max_sequence_length  # 2 * 32 * 32 + 512 = 2560 at 512 px


def checkpointed_blocks(free_bytes: float, batch_size: int, tokens: int, hidden: int, n_blocks: int) -> int:
    """How many blocks ``auto`` checkpoints: the fewest that keep the others' activations within
    ACTIVATION_SHARE of ``free_bytes`` (0: none, ``n_blocks``: all)."""
    per_block = ACTIVATION_BYTES * batch_size * tokens * hidden
    keep = int(ACTIVATION_SHARE * free_bytes // per_block)
    return max(0, n_blocks - keep)


def checkpointing_setting(params: Params, transformer, device: torch.device) -> bool | int:
    """``train.gradient_checkpointing`` resolved: True / False as given; ``auto`` is off on the CPU and, with
    CUDA, checkpoints only as many blocks as the free memory needs at this batch size (:func:`checkpointed_blocks`)."""
    setting = params.train.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    cfg = transformer.config
    n = checkpointed_blocks(free, params.train.batch_size, tokens_per_sample(params),
                            cfg.num_attention_heads * cfg.attention_head_dim, len(blocks(transformer)))
    return n if 0 < n < len(blocks(transformer)) else n > 0


def one_process_at_a_time(accelerator, fn):
    """``fn()`` in each process in turn: the host holds one process's full-precision copy at a time."""
    result = None
    for turn in range(accelerator.num_processes):
        if accelerator.process_index == turn:
            result = fn()
        accelerator.wait_for_everyone()
    return result


def load_transformer(params: Params, accelerator, dtype: torch.dtype, base_hook=None):
    """The transformer on the accelerator's device: the base frozen in ``dtype`` (quantised as ``model.quantize``
    says, once per process, the processes taking turns) plus the trainable LoRA in fp32.

    ``base_hook(transformer)`` changes the frozen base before the LoRA is attached (the GPU benchmark's fp8
    matmul candidate uses it).
    """
    from diffusers.training_utils import cast_training_params

    def load():
        transformer = load_component(params.model, "transformer", accelerator.device, dtype)
        if base_hook is not None:
            base_hook(transformer)
        add_lora(transformer, params.train.lora)
        cast_training_params(transformer, torch.float32)  # trainable LoRA in fp32, frozen base in dtype
        return transformer

    return load() if params.model.quantize == "none" else one_process_at_a_time(accelerator, load)


def blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def set_checkpointing(transformer, on: bool | int) -> None:
    """Gradient checkpointing of every block (True), none (False) or the first ``on`` blocks (selective).

    Through diffusers' own hook: the transformer hands each block to the checkpointing function, which
    recomputes the chosen blocks in the backward pass and runs the others as usual.
    """
    if on is False or on == 0:
        transformer.disable_gradient_checkpointing()
        return
    chosen = {id(b) for b in blocks(transformer)[: None if on is True else on]}

    def checkpoint(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(checkpoint)


def set_compiled(transformer, on: bool) -> None:
    """``torch.compile`` of each transformer block on its own (regional), or back to eager."""
    for block in blocks(transformer):
        if not on:
            block._compiled_call_impl = None  # what Module.compile sets; cleared, the block runs eagerly
        elif block._compiled_call_impl is None:
            block.compile()


def make_optimizer(params: Params, transformer, fusion, device: torch.device):
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
        except ImportError as e:
            raise FluxfillError("train.optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, weight_decay=t.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError as e:
        raise FluxfillError("train.optimizer prodigy needs prodigyopt: pip install prodigyopt") from e
    return Prodigy(groups, weight_decay=t.weight_decay)


def sample_generators(seed: int, step: int, positions: range, device) -> list[torch.Generator]:
    """One σ/noise generator per sample, seeded by (seed, optimizer step, position in the global batch)."""
    return [torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 1_000_033 + p) % (2**63))
            for p in positions]


@dataclass
class Trainer:
    """What one step needs, prepared by accelerate (the models' forward runs under its autocast)."""

    accelerator: object
    transformer: torch.nn.Module
    fusion: torch.nn.Module
    optimizer: object
    scheduler: object
    trainable: list[torch.nn.Parameter]  # clipped together
    max_grad_norm: float
    loss_region: str
    checkpointing: bool | int  # every block, none, or the first N
    dtype: torch.dtype  # the base's weight dtype: the inputs' cast, looked up once


def build(params: Params, accelerator, transformer, fusion, checkpointing: bool | int | None = None) -> Trainer:
    """Optimizer, schedule, accelerate, checkpointing and compilation as ``params.train`` says.

    ``checkpointing`` overrides ``train.gradient_checkpointing`` (an int: selective, the first N blocks); the
    memory check of ``auto`` runs here, after the base is loaded.
    """
    from diffusers.optimization import get_scheduler

    t, device = params.train, accelerator.device
    if device.type == "cuda":
        # cuDNN's SDPA backward hit an illegal memory access at FLUX shapes (H100, torch 2.11); flash is as fast
        torch.backends.cuda.enable_cudnn_sdp(False)
    checkpointing = checkpointing_setting(params, transformer, device) if checkpointing is None else checkpointing
    set_checkpointing(transformer, checkpointing)
    transformer.train()
    optimizer = make_optimizer(params, transformer, fusion, device)
    # the schedule counts optimizer steps, however many processes share them (train_step steps it once each)
    scheduler = get_scheduler("constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler, optimizer,
                              num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    transformer, fusion, optimizer, scheduler = accelerator.prepare(transformer, fusion, optimizer, scheduler)
    set_compiled(accelerator.unwrap_model(transformer), compile_setting(params, device))
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Trainer(accelerator, transformer, fusion, optimizer, scheduler, trainable, t.max_grad_norm, t.loss_region,
                   checkpointing, model_dtype(transformer))


def train_step(trainer: Trainer, batch: dict,
               generators: torch.Generator | Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-step on a batch already on the device (``generators``: σ and noise, one per sample or one for
    the batch); returns the detached loss and, when this micro-step ends an accumulation window (the weights
    change), the gradient norm before clipping (else None)."""
    acc, grad_norm = trainer.accelerator, None
    with acc.accumulate(trainer.transformer, trainer.fusion):
        loss = flow_matching_step(trainer.transformer, trainer.fusion, batch, trainer.loss_region,
                                  generator=generators, dtype=trainer.dtype).loss
        acc.backward(loss)
        if acc.sync_gradients:
            grad_norm = acc.clip_grad_norm_(trainer.trainable, trainer.max_grad_norm)
        trainer.optimizer.step()
        if acc.sync_gradients and not trainer.optimizer.step_was_skipped:
            trainer.scheduler.step()  # once per optimizer step (the scheduler is not tied to the optimizer)
        trainer.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm
