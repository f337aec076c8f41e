"""Full-size GPU training-step benchmark: fluxfill's LoRA + fusion step vs. a public-trainer reference step.

What runs
  The FLUX.1-Fill transformer of ``--preset`` (default ``flux-fill-dev-random``: the real 11.9B architecture,
  ``in_channels=384``, random weights, built directly on the GPU in bf16; nothing is downloaded), with LoRA
  (rank 32 on the default targets of ``fluxfill.config.LoraConfig``) and the semantic fusion module, fed one
  enhanced diptych batch: 512x1024 pixels = 2048 image tokens, 512 text tokens (random tensors with the
  contract's shapes; the mask is the real diptych mask, 0 over the source half, 1 over the target half).

  ours       ``fluxfill.objective.flow_matching_step`` + backward + grad clipping + fused AdamW over LoRA and
             fusion parameters + constant LR schedule + ``zero_grad(set_to_none=True)``; no host sync inside
             the timed loop (one ``.item()`` after it). Matrix: batch sizes x gradient checkpointing x
             ``torch.compile`` (regional: each transformer block compiled on its own, ``dynamic=False``).
  reference  the training step as the public Fill trainer writes it (diffusers
             ``examples/flux-fill/train_dreambooth_lora_fluxfill_inpaint.py``, defaults of its arguments):
             eager, default attention, ``torch.optim.AdamW`` with its defaults (no ``fused``), unpacked
             latents packed and concatenated every step, timesteps looked up with one ``.item()`` per
             sample, bf16 autocast as accelerate's ``mixed_precision="bf16"`` applies it, ``clip_grad_norm_``
             over all transformer parameters, ``loss.item()`` every step, gradient checkpointing as ours.
             It starts from cached latents (its ``--cache_latents`` path) and a pre-encoded masked image
             (the script VAE-encodes it every step): no VAE time is counted, which favours the reference.

Timing
  Per configuration: ``--warmup`` steps (they absorb torch.compile's compilation; their time is reported
  as compile time, never as step time), then ``--steps`` timed steps between two device synchronisations.
  Peak memory is ``torch.cuda.max_memory_allocated`` reset before each configuration. A configuration that
  runs out of memory is recorded as ``OOM`` and the run goes on; once ``--budget-s`` seconds (counted from
  the start, model build included) would be exceeded, the remaining configurations are reported ``skipped``.

FLOPs and MFU
  Useful work per step counts the forward pass and the *input-gradient* backward pass of the frozen network;
  frozen weights need no weight-gradient matmuls, LoRA and fusion FLOPs (~2 %) are not counted, and the
  forward recomputed by gradient checkpointing is not useful work::

      F_lin(B)  = B * sum over linear layers of 2 * in * out * (tokens the layer sees)
                = B * [ 2*N*C_in*D + 2*T*C_txt*D + 2*N*D*C_out          (x / context embedders, proj_out)
                        + (L_double + L_single) * 24 * D^2 * (N + T)    (12 D^2 weights per token per block)
                        + per-sample AdaLN / time / guidance / pooled projections ]
      F_attn(B) = B * (L_double + L_single) * 4 * S^2 * D              (QK^T and AV, S = N + T, D = heads * head_dim)
      useful    = 2 * F_lin + 3 * F_attn    (linear: forward + grad-input; attention: forward + dQ, dK, dV)
                ~ 2 * forward FLOPs
      MFU       = useful / (seconds per step * peak dense bf16 FLOP/s)

  ``F_lin`` and ``F_attn`` are measured with ``torch.utils.flop_counter.FlopCounterMode`` on one forward
  pass at batch 1 before LoRA is attached, then scaled by B; the analytic formula above is printed next to
  it as a cross-check. The peak comes from a table keyed by the GPU name torch reports (H100 SXM / H200:
  989 TFLOP/s) or from ``--peak-tflops``.

Run it (from the repository root, with fluxfill installed, ``pip install -e .``, or ``PYTHONPATH=.``)
  python bench/gpu_train_step.py                            # full matrix, stops starting configs at --budget-s 420
  python bench/gpu_train_step.py --batch-sizes 4 --checkpointing on --compile on,off
  python bench/gpu_train_step.py --preset tiny --device cpu --steps 2 --batch-sizes 1   # CPU smoke, seconds

Without a CUDA GPU the full-size presets print ``no CUDA GPU: skipped`` and exit 0. Results go to stdout (a
table) and to ``--out`` (JSON; default ``bench/results/gpu_train_step.json`` on a GPU,
``bench/results/smoke_train_step.json`` otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxFillPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from fluxfill.config import LoraConfig, ModelConfig
from fluxfill.fusion import SemanticFusion
from fluxfill.latents import text_ids, vae_pipeline
from fluxfill.models import add_lora, count_parameters, load_component, resolve_dtype
from fluxfill.objective import flow_matching_step
from fluxfill.panels import diptych_mask

FULL_SIZE_PRESETS = ("flux-fill-dev-random", "flux-fill-dev")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched as substrings of torch.cuda.get_device_name();
# the most specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),   # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
TARGETS = {"speedup_vs_reference": 1.3, "mfu": 0.45, "peak_mem_gb_with_checkpointing": 60.0}
FLOP_FORMULA = (
    "useful FLOPs/step = 2*F_lin + 3*F_attn (forward + input-gradient backward of the frozen network; "
    "no weight-gradient matmuls, LoRA/fusion FLOPs and checkpoint recomputation not counted); "
    "F_lin = B*sum(2*in*out*tokens) over linear layers, F_attn = B*(L_double+L_single)*4*S^2*D, "
    "S = image+text tokens, D = heads*head_dim; MFU = useful / (s_per_step * peak)"
)
GB = 1e9


def log(msg: str, t0: float | None = None) -> None:
    prefix = f"[{time.perf_counter() - t0:6.1f}s] " if t0 is not None else ""
    print(prefix + msg, flush=True)


# ----------------------------------------------------------------------------------------------- arguments
def _on_off_list(text: str) -> list[bool]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of on/off, e.g. on,off")
    return [v == "on" for v in dict.fromkeys(values)]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,2,4")
    return list(dict.fromkeys(values))


def _on_off(text: str) -> bool:
    return _on_off_list(text)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-fill-dev-random", choices=["tiny", *FULL_SIZE_PRESETS],
                   help="model preset (default flux-fill-dev-random: full size, random weights, no download)")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="transformer dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4], help="comma list (default 1,2,4)")
    p.add_argument("--checkpointing", type=_on_off_list, default=[True, False],
                   help="gradient checkpointing settings to run: on,off (default both)")
    p.add_argument("--compile", type=_on_off_list, default=None,
                   help="torch.compile settings to run: on,off (default both on cuda, off on cpu)")
    p.add_argument("--attention", default="default", choices=["default", "flash", "cudnn"],
                   help="SDPA backend for our step: PyTorch's choice, or force FLASH_ATTENTION")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget from start, model build included; later configs are skipped (default 420)")
    p.add_argument("--reference", type=_on_off, default=True, help="run the public-trainer reference step (on/off)")
    p.add_argument("--reference-batch", type=int, default=None, help="reference batch size (default: largest batch)")
    p.add_argument("--reference-checkpointing", type=_on_off, default=True,
                   help="gradient checkpointing of the reference step (default on)")
    p.add_argument("--reference-autocast", type=_on_off, default=True,
                   help="bf16 autocast around the reference forward, as accelerate mixed_precision=bf16 does (default on)")
    p.add_argument("--panel-size", type=int, default=512, help="panel side in pixels; the diptych is 2x wide (default 512)")
    p.add_argument("--text-tokens", type=int, default=None, help="T5 tokens per prompt (default model.max_sequence_length, 512)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping in both steps; 0 disables ours")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """One batch at the largest batch size; ``ours(b)`` / ``reference(b)`` slice the first ``b`` samples."""

    vae_latents: torch.Tensor      # [B, C, h, w]     cached VAE latents (shifted, scaled), unpacked
    masked_latents: torch.Tensor   # [B, C, h, w]     VAE latents of the masked diptych, unpacked
    pixel_mask: torch.Tensor       # [1, 1, H, 2H]    0 source half, 1 target half
    mask_latents: torch.Tensor     # [1, N, 4*f^2]    the pipeline's packed mask (shared geometry)
    img_ids: torch.Tensor          # [N, 3]
    prompt_embeds: torch.Tensor    # [B, T, joint_attention_dim]
    pooled: torch.Tensor           # [B, pooled_projection_dim]
    image_embeds: torch.Tensor     # [B, image_embed_dim]
    txt_ids: torch.Tensor          # [T, 3]
    vae_scale_factor: int

    @property
    def image_tokens(self) -> int:
        return self.img_ids.shape[0]

    @property
    def text_tokens(self) -> int:
        return self.txt_ids.shape[0]

    def ours(self, b: int) -> dict:
        """The cached training batch ``flow_matching_step`` consumes (latents packed once, at encode time)."""
        _, c, h, w = self.vae_latents.shape
        return dict(
            x_0=FluxFillPipeline._pack_latents(self.vae_latents[:b], b, c, h, w),  # [b, N, 4C]
            masked_latents=FluxFillPipeline._pack_latents(self.masked_latents[:b], b, c, h, w),  # [b, N, 4C]
            mask_latents=self.mask_latents,  # [1, N, 4f^2] expanded inside make_x_cond
            prompt_embeds=self.prompt_embeds[:b], pooled_prompt_embeds=self.pooled[:b],
            image_embeds=self.image_embeds[:b], img_ids=self.img_ids, txt_ids=self.txt_ids,
        )


def build_inputs(preset_cfg, transformer_config, image_embed_dim: int, batch: int, panel_size: int,
                 text_tokens: int, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    """Random tensors with the contract's shapes; mask latents and ids from diffusers' own Fill functions.

    The VAE is built on the meta device: only its config (latent channels, scale factor, shift/scale) is read.
    """
    vae = load_component(preset_cfg, "vae", "meta")
    pipe = vae_pipeline(vae)
    f, c = pipe.vae_scale_factor, vae.config.latent_channels
    height, width = panel_size, 2 * panel_size
    h, w = 2 * (height // (f * 2)), 2 * (width // (f * 2))  # latent grid, even for 2x2 packing
    expected = 4 * c + 4 * c + 4 * f * f  # x_t + masked latents + mask, packed 2x2
    if transformer_config.in_channels != expected:
        raise ValueError(f"transformer in_channels {transformer_config.in_channels} but the VAE gives "
                         f"{4 * c} + {4 * c} + {4 * f * f} = {expected}: not a Fill transformer / VAE pair")
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    pixel_mask = pipe.mask_processor.preprocess(diptych_mask(panel_size), height=height, width=width)  # [1, 1, H, 2H]
    # prepare_mask_latents packs the 8x8 pixel mask of each latent pixel, exactly as FluxFillPipeline does
    mask_latents, _ = pipe.prepare_mask_latents(pixel_mask, torch.zeros(1, c, h, w), 1, c, 1, height, width,
                                                torch.float32, torch.device("cpu"), None)  # [1, N, 4f^2]
    img_ids = FluxFillPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)  # [N, 3]
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return Inputs(
        vae_latents=to(rand(batch, c, h, w)), masked_latents=to(rand(batch, c, h, w)),
        pixel_mask=to(pixel_mask), mask_latents=to(mask_latents), img_ids=to(img_ids),
        prompt_embeds=to(rand(batch, text_tokens, transformer_config.joint_attention_dim)),
        pooled=to(rand(batch, transformer_config.pooled_projection_dim)),
        image_embeds=to(rand(batch, image_embed_dim)),
        txt_ids=text_ids(text_tokens, device=device, dtype=dtype), vae_scale_factor=f,
    )


def image_embed_dim(preset: str) -> int:
    """CLIP vision projection size of the preset (read from its config on the meta device)."""
    # flux-fill-dev pairs FLUX with CLIP-L vision, whose config the random preset ships
    source = "tiny" if preset == "tiny" else "flux-fill-dev-random"
    return load_component(ModelConfig(preset=source), "image_encoder", "meta").config.projection_dim


# ---------------------------------------------------------------------------------------------------- FLOPs
def analytic_forward_flops(config, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """Forward FLOPs of ``FluxTransformer2DModel`` at batch 1, from its config (see the module docstring)."""
    d = config.num_attention_heads * config.attention_head_dim
    n, t = image_tokens, text_tokens
    s = n + t
    layers = config.num_layers + config.num_single_layers
    mlp = 4  # FLUX's MLP ratio (FeedForward mult / single-block mlp_ratio), not part of the config
    per_token_block = (4 + 2 * mlp) * d * d  # q, k, v, out + MLP in/out: 12 D^2 weights, each token stream
    single_token_block = (3 + mlp + 1 + mlp) * d * d  # q, k, v + proj_mlp (D->4D) + proj_out (5D->D): 12 D^2
    linear = 2 * (
        n * config.in_channels * d                       # x_embedder
        + t * config.joint_attention_dim * d             # context_embedder
        + n * d * config.patch_size ** 2 * config.out_channels  # proj_out
        + config.num_layers * per_token_block * s        # double blocks: image and text streams
        + config.num_single_layers * single_token_block * s
        # per-sample projections: timestep (+ guidance) 256->D->D, pooled P->D->D, AdaLN modulations
        + (2 if config.guidance_embeds else 1) * (256 * d + d * d)
        + config.pooled_projection_dim * d + d * d
        + config.num_layers * 2 * 6 * d * d + config.num_single_layers * 3 * d * d + 2 * d * d
    )
    attention = layers * 4 * s * s * d  # QK^T and AV over the joint sequence
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def _attention_ops() -> set:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward", "bmm", "baddbmm")
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


@torch.no_grad()
def measured_forward_flops(transformer, batch1: dict, attention_ctx) -> tuple[dict[str, float], list[str]]:
    """FLOPs of one batch-1 forward with FlopCounterMode, split linear / attention, and the SDPA ops that ran."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)  # the formula PyTorch uses for CUDA SDPA

    cpu_sdpa_flops._get_raw = True  # takes tensors, as FlopCounterMode's custom_mapping expects of raw formulas
    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops} \
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") else {}
    no_fusion = SemanticFusion("none", transformer.config.pooled_projection_dim, 1)  # fusion FLOPs not counted
    with attention_ctx(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        flow_matching_step(transformer, no_fusion, batch1)
    counts = counter.get_flop_counts().get("Global", {})
    attn_ops = _attention_ops()
    attention = sum(v for op, v in counts.items() if op in attn_ops)
    linear = sum(v for op, v in counts.items() if op not in attn_ops)
    sdpa = sorted(str(op).split(".")[-1] for op in counts if "attention" in str(op))
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}, sdpa


def useful_flops(per_sample: dict[str, float], batch: int) -> float:
    return batch * (2 * per_sample["linear"] + 3 * per_sample["attention"])


def peak_tflops_for(name: str | None) -> float | None:
    if not name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


# ---------------------------------------------------------------------------------------------------- steps
def set_compiled(blocks: list[torch.nn.Module], compiled: dict[int, object], on: bool) -> None:
    """Regional torch.compile: each block compiled on its own; toggled off/on without recompiling.

    ``Module.compile`` stores the compiled call in ``_compiled_call_impl``; clearing it makes the block eager
    again, restoring it reuses the compiled code (dynamo caches per code object, so all blocks of one class
    share their graphs).
    """
    for i, b in enumerate(blocks):
        if on:
            if i in compiled:
                b._compiled_call_impl = compiled[i]
            else:
                b.compile(dynamic=False)
                compiled[i] = b._compiled_call_impl
        else:
            b._compiled_call_impl = None


def make_optimizer(params: list, lr: float, fused: bool):
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True), "fused"
        except (RuntimeError, ValueError):  # a device/dtype fused AdamW does not support
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True), "foreach (fused unsupported)"
    # the public trainer: torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8), no fused
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8), "default"


class OurStep:
    """flow_matching_step + backward + clip + fused AdamW + LR schedule + zero_grad; returns the loss tensor."""

    def __init__(self, transformer, fusion, batch: dict, params: list, lr: float, max_grad_norm: float, attention_ctx):
        self.transformer, self.fusion, self.batch, self.params = transformer, fusion, batch, params
        self.optimizer, self.optimizer_kind = make_optimizer(params, lr, fused=True)
        self.scheduler = get_scheduler("constant", self.optimizer)
        self.max_grad_norm, self.attention_ctx = max_grad_norm, attention_ctx

    def __call__(self) -> torch.Tensor:
        with self.attention_ctx():
            loss = flow_matching_step(self.transformer, self.fusion, self.batch).loss
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)  # foreach, no host sync
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def reference_mask(pixel_mask: torch.Tensor, b: int, h: int, w: int, f: int) -> torch.Tensor:
    """``[B|1, 1, 8h, 8w] -> [B, 4f^2, h, w]`` as the public Fill trainer reshapes the pixel mask each step."""
    mask = pixel_mask.expand(b, -1, -1, -1)[:, 0, :, :]  # [B, f*h, f*w]
    mask = mask.reshape(b, h, f, w, f)  # [B, h, f, w, f]
    mask = mask.permute(0, 2, 4, 1, 3)  # [B, f, f, h, w]
    return mask.reshape(b, f * f, h, w)  # [B, f^2, h, w]


class ReferenceStep:
    """The public Fill trainer's step (diffusers examples/flux-fill), from cached latents; returns loss.item()."""

    def __init__(self, transformer, scheduler, inputs: Inputs, b: int, lr: float, max_grad_norm: float,
                 autocast: bool, guidance: float = 1.0):
        self.transformer, self.noise_scheduler, self.b = transformer, scheduler, b
        self.model_input = inputs.vae_latents[:b]       # [b, C, h, w]  their latents_cache[step].sample()
        self.masked_image = inputs.masked_latents[:b]   # [b, C, h, w]  their vae.encode(masked_images), not timed
        self.pixel_mask = inputs.pixel_mask.expand(b, -1, -1, -1)  # [b, 1, H, 2H] their batch["masks"]
        self.prompt_embeds, self.pooled, self.txt_ids = inputs.prompt_embeds[:b], inputs.pooled[:b], inputs.txt_ids
        self.f, self.guidance_scale = inputs.vae_scale_factor, guidance
        self.max_grad_norm = max_grad_norm or 1.0  # the public script always clips (its default: 1.0)
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_kind = make_optimizer([{"params": self.params, "lr": lr}], lr, fused=False)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        device = self.model_input.device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def get_sigmas(self, timesteps, n_dim=4, dtype=torch.float32):
        device = self.model_input.device
        sigmas = self.noise_scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = self.noise_scheduler.timesteps.to(device)
        timesteps = timesteps.to(device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]  # one sync per sample
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def __call__(self) -> float:
        model_input, transformer, f = self.model_input, self.transformer, self.f
        b, c, h, w = model_input.shape
        dtype, device = model_input.dtype, model_input.device
        mask = reference_mask(self.pixel_mask, b, h, w, f)  # [b, f^2, h, w]
        latent_image_ids = FluxFillPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)  # [N, 3]
        noise = torch.randn_like(model_input)  # [b, C, h, w]
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * self.noise_scheduler.config.num_train_timesteps).long()
        timesteps = self.noise_scheduler.timesteps[indices].to(device=device)
        sigmas = self.get_sigmas(timesteps, n_dim=model_input.ndim, dtype=dtype)  # [b, 1, 1, 1]
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise  # [b, C, h, w]
        packed_noisy = FluxFillPipeline._pack_latents(noisy_model_input, b, c, h, w)  # [b, N, 4C]
        guidance = torch.tensor([self.guidance_scale], device=device).expand(b)
        masked_packed = FluxFillPipeline._pack_latents(self.masked_image, b, c, h, w)  # [b, N, 4C]
        mask_packed = FluxFillPipeline._pack_latents(mask, b, f * f, h, w)  # [b, N, 4f^2]
        masked_image_latents = torch.cat((masked_packed, mask_packed), dim=-1)  # [b, N, 4C + 4f^2]
        transformer_input = torch.cat((packed_noisy, masked_image_latents), dim=2)  # [b, N, in_channels]
        with self.autocast:
            model_pred = transformer(hidden_states=transformer_input, timestep=timesteps / 1000, guidance=guidance,
                                     pooled_projections=self.pooled, encoder_hidden_states=self.prompt_embeds,
                                     txt_ids=self.txt_ids, img_ids=latent_image_ids, return_dict=False)[0]
        model_pred = model_pred.float()  # accelerate's convert_outputs_to_fp32
        model_pred = FluxFillPipeline._unpack_latents(model_pred, height=h * f, width=w * f,
                                                      vae_scale_factor=f)  # [b, C, h, w]
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return loss.detach().item()  # logged every step


# --------------------------------------------------------------------------------------------------- runner
@dataclass
class Config:
    kind: str  # "ours" or "reference"
    batch: int
    checkpointing: bool
    compile: bool

    @property
    def name(self) -> str:
        return (f"{self.kind} b{self.batch} ckpt={'on' if self.checkpointing else 'off'} "
                f"compile={'on' if self.compile else 'off'}")


def plan(args) -> list[Config]:
    """Reference first, then ours: the reference's batch and checkpointing (headline) first, eager before compiled."""
    ref_b = args.reference_batch or max(args.batch_sizes)
    configs = [Config("reference", ref_b, args.reference_checkpointing, False)] if args.reference else []
    ours = [Config("ours", b, ck, co) for b in args.batch_sizes for ck in args.checkpointing for co in args.compile]
    ours.sort(key=lambda c: (not (c.batch == ref_b and c.checkpointing == args.reference_checkpointing),
                             -c.batch, not c.checkpointing, c.compile))
    return configs + ours


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(step, n: int, device: torch.device) -> tuple[float, object]:
    """Run ``step`` n times between two device syncs; returns (seconds, last result)."""
    sync(device)
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = step()
    sync(device)
    return time.perf_counter() - t0, out


def run_config(cfg: Config, ctx: dict, args) -> dict:
    transformer, device = ctx["transformer"], ctx["device"]
    inputs: Inputs = ctx["inputs"]
    set_compiled(ctx["blocks"], ctx["compiled"], cfg.compile)
    if cfg.checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if cfg.kind == "reference":
        step = ReferenceStep(transformer, ctx["noise_scheduler"], inputs, cfg.batch, args.lr, args.max_grad_norm,
                             autocast=args.reference_autocast)
        attention = "default"
    else:
        step = OurStep(transformer, ctx["fusion"], inputs.ours(cfg.batch), ctx["params"], args.lr,
                       args.max_grad_norm, ctx["attention_ctx"])
        attention = args.attention
    warmup_s = []
    for _ in range(args.warmup):  # compilation happens here (first forward and first backward)
        dt, _ = timed(step, 1, device)
        warmup_s.append(dt)
    total, last = timed(step, args.steps, device)
    loss = float(last) if cfg.kind == "reference" else last.item()  # ours: the only host sync, after timing
    s_per_step = total / args.steps
    useful = useful_flops(ctx["flops_per_sample"], cfg.batch)
    peak = ctx["peak_tflops"]
    result = {
        "status": "ok", "attention": attention, "optimizer": step.optimizer_kind,
        "s_per_step": s_per_step, "samples_per_s": cfg.batch / s_per_step,
        "useful_tflop_per_step": useful / 1e12, "achieved_tflops": useful / s_per_step / 1e12,
        "mfu": useful / s_per_step / (peak * 1e12) if peak else None,
        "warmup_s": warmup_s,
        "compile_s": max(0.0, sum(warmup_s) - args.warmup * s_per_step) if cfg.compile else 0.0,
        "final_loss": loss,
    }
    cuda = device.type == "cuda"  # no device peak on CPU
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB if cuda else None
    result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB if cuda else None
    del step
    return result


def estimate_s(cfg: Config, done: list[dict], args, compiled_batches: set) -> float | None:
    """Rough cost of a configuration from what ran so far (None when nothing comparable ran yet)."""
    per_sample = [r["s_per_step"] / r["batch_size"] for r in done if r.get("status") == "ok"]
    compiles = [r["compile_s"] for r in done if r.get("status") == "ok" and r.get("compile")]
    if not per_sample:
        return None
    est = 1.25 * max(per_sample) * cfg.batch * (args.warmup + args.steps)
    if cfg.compile and cfg.batch not in compiled_batches:
        est += max(compiles) if compiles else 90.0
    return est


def headline(results: list[dict], args) -> dict:
    ref_b = args.reference_batch or max(args.batch_sizes)
    ok = lambda r: r.get("status") == "ok"  # noqa: E731
    ref = next((r for r in results if r["kind"] == "reference" and ok(r)), None)
    same = [r for r in results if r["kind"] == "ours" and ok(r) and r["batch_size"] == ref_b
            and r["checkpointing"] == args.reference_checkpointing]
    best = max(same, key=lambda r: r["samples_per_s"], default=None)
    out: dict = {"batch_size": ref_b, "checkpointing": args.reference_checkpointing,
                 "config": best["name"] if best else None, "targets": TARGETS}
    if best is None:
        return out
    out["samples_per_s"] = best["samples_per_s"]
    out["mfu"] = best["mfu"]
    out["peak_mem_gb"] = best.get("peak_mem_gb")
    if ref:
        out["reference_samples_per_s"] = ref["samples_per_s"]
        out["speedup_vs_reference"] = best["samples_per_s"] / ref["samples_per_s"]
    checks = {}
    if "speedup_vs_reference" in out:
        checks["speedup_vs_reference"] = out["speedup_vs_reference"] >= TARGETS["speedup_vs_reference"]
    if out["mfu"] is not None:
        checks["mfu"] = out["mfu"] >= TARGETS["mfu"]
    if out["peak_mem_gb"] is not None and args.reference_checkpointing:
        checks["peak_mem_gb_with_checkpointing"] = out["peak_mem_gb"] < TARGETS["peak_mem_gb_with_checkpointing"]
    out["meets"] = checks
    return out


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def print_table(report: dict) -> None:
    print()
    print(f"{'config':<38} {'status':<8} {'s/step':>8} {'samples/s':>10} {'x ref':>6} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'peak GB':>8} {'compile s':>9}")
    for r in report["results"]:
        print(f"{r['name']:<38} {r['status'][:8]:<8} {_fmt(r.get('s_per_step'), '.3f'):>8} "
              f"{_fmt(r.get('samples_per_s'), '.3f'):>10} {_fmt(r.get('speedup_vs_reference'), '.2f'):>6} "
              f"{_fmt(r.get('achieved_tflops'), '.1f'):>8} "
              f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f'):>6} "
              f"{_fmt(r.get('peak_mem_gb'), '.1f'):>8} {_fmt(r.get('compile_s') if r.get('compile') else None, '.1f'):>9}")
    h = report["headline"]
    print(f"\nheadline: {h.get('config') or 'n/a'} vs reference b{h['batch_size']} "
          f"ckpt={'on' if h['checkpointing'] else 'off'}")
    if "speedup_vs_reference" in h:
        print(f"  ours/reference samples/s: {h['speedup_vs_reference']:.2f}x "
              f"(target >= {TARGETS['speedup_vs_reference']}x: {'PASS' if h['meets']['speedup_vs_reference'] else 'FAIL'})")
    if h.get("mfu") is not None:
        print(f"  MFU: {100 * h['mfu']:.1f}% (target >= {100 * TARGETS['mfu']:.0f}%: "
              f"{'PASS' if h['meets']['mfu'] else 'FAIL'})")
    if "peak_mem_gb_with_checkpointing" in h.get("meets", {}):
        print(f"  peak memory: {h['peak_mem_gb']:.1f} GB (target < {TARGETS['peak_mem_gb_with_checkpointing']:.0f} GB "
              f"with checkpointing: {'PASS' if h['meets']['peak_mem_gb_with_checkpointing'] else 'FAIL'})")
    if report["machine"]["device"] == "cpu":
        print("  (CPU smoke run: the figures check the code path, they say nothing about GPU performance)")
    print(f"FLOPs: {report['flops']['formula']}")
    print(f"peak: {_fmt(report['peak_tflops'], '.0f', 'unknown')} TFLOP/s ({report['peak_source']}); "
          f"device: {report['machine']['device_name']}")


def machine_info(device: torch.device) -> dict:
    import diffusers
    import peft

    info = {"device": str(device), "device_name": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), gpu_memory_gb=props.total_memory / GB,
                    cudnn=torch.backends.cudnn.version(), compute_capability=f"{props.major}.{props.minor}")
    return info


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    if args.preset in FULL_SIZE_PRESETS and (device.type != "cuda" or not cuda):
        print("no CUDA GPU: skipped")
        return 0
    if device.type == "cuda" and not cuda:
        print(f"--device {args.device}: no CUDA GPU is visible to torch")
        return 2
    if args.compile is None:
        args.compile = [True, False] if device.type == "cuda" else [False]
    out_path = args.out or RESULTS_DIR / ("gpu_train_step.json" if device.type == "cuda" else "smoke_train_step.json")

    # one static graph per batch size and block class; leave room for the matrix's variants
    dynamo_config = importlib.import_module("torch._dynamo").config
    knob = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))

    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype, device)
    model_cfg = ModelConfig(preset=args.preset)
    text_tokens = args.text_tokens or model_cfg.max_sequence_length
    machine = machine_info(device)
    log(f"device {device}: {machine['device_name']}, torch {torch.__version__}, preset {args.preset}, {dtype}", t0)

    transformer = load_component(model_cfg, "transformer", device, dtype)
    n_params = count_parameters(transformer)
    log(f"transformer built: {n_params / 1e6:,.1f}M parameters", t0)
    tcfg = transformer.config
    embed_dim = image_embed_dim(args.preset)
    inputs = build_inputs(model_cfg, tcfg, embed_dim, max(args.batch_sizes + [args.reference_batch or 1]),
                          args.panel_size, text_tokens, device, dtype, args.seed)

    if device.type == "cuda" and args.attention != "cudnn":
        # cuDNN's SDPA backward hit an illegal memory access at these shapes (H100, torch 2.11): keep PyTorch's
        # flash / memory-efficient kernels, for ours and the reference alike
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.attention == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention_ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    else:
        attention_ctx = contextlib.nullcontext

    # FLOPs of the frozen network: one batch-1 forward before LoRA is attached
    measured, sdpa_ops = measured_forward_flops(transformer, inputs.ours(1), attention_ctx)
    ref_sdpa_ops = sdpa_ops if args.attention == "default" else \
        measured_forward_flops(transformer, inputs.ours(1), contextlib.nullcontext)[1]
    analytic = analytic_forward_flops(tcfg, inputs.image_tokens, inputs.text_tokens)
    rel = (measured["total"] - analytic["total"]) / analytic["total"]
    log(f"forward FLOPs/sample: measured {measured['total'] / 1e12:.3f} T (linear {measured['linear'] / 1e12:.3f}, "
        f"attention {measured['attention'] / 1e12:.3f}), analytic {analytic['total'] / 1e12:.3f} T ({100 * rel:+.2f}%); "
        f"SDPA ops: ours {sdpa_ops or ['none counted']}, reference {ref_sdpa_ops or ['none counted']}", t0)

    add_lora(transformer, LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha))
    transformer.train()  # as trainers do (FLUX has no dropout: no numerical effect)
    fusion = SemanticFusion("learned", tcfg.pooled_projection_dim, embed_dim).to(device)
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    params = lora_params + list(fusion.parameters())
    peak_tflops = args.peak_tflops or peak_tflops_for(machine["device_name"] if device.type == "cuda" else None)
    peak_source = "--peak-tflops" if args.peak_tflops else ("table" if peak_tflops else "unknown GPU: pass --peak-tflops")
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    ctx = dict(transformer=transformer, device=device, inputs=inputs, fusion=fusion, params=params, blocks=blocks,
               compiled={}, attention_ctx=attention_ctx, flops_per_sample=measured, peak_tflops=peak_tflops,
               noise_scheduler=load_component(model_cfg, "scheduler"))

    report = {
        "benchmark": "gpu_train_step", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "machine": machine,
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "parameters": n_params,
                  "num_layers": tcfg.num_layers, "num_single_layers": tcfg.num_single_layers,
                  "hidden": tcfg.num_attention_heads * tcfg.attention_head_dim, "in_channels": tcfg.in_channels,
                  "image_tokens": inputs.image_tokens, "text_tokens": inputs.text_tokens,
                  "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": LoraConfig().target_modules,
                           "trainable": sum(p.numel() for p in lora_params),
                           "dtype": str(lora_params[0].dtype).removeprefix("torch.")},
                  "fusion_trainable": sum(p.numel() for p in fusion.parameters())},
        "attention": {"requested": args.attention, "sdpa_ops_ours": sdpa_ops, "sdpa_ops_reference": ref_sdpa_ops},
        "flops": {"formula": FLOP_FORMULA, "forward_per_sample_measured": measured,
                  "forward_per_sample_analytic": analytic, "measured_vs_analytic": rel,
                  "useful_per_sample": useful_flops(measured, 1), "counter": "torch.utils.flop_counter.FlopCounterMode"},
        "peak_tflops": peak_tflops, "peak_source": peak_source,
        "results": [], "headline": {},
    }
    compiled_batches: set[int] = set()
    compile_broken: str | None = None
    for cfg in plan(args):
        row = {"name": cfg.name, "kind": cfg.kind, "batch_size": cfg.batch, "checkpointing": cfg.checkpointing,
               "compile": cfg.compile}
        elapsed = time.perf_counter() - t0
        est = estimate_s(cfg, report["results"], args, compiled_batches)
        if elapsed + (est or 0.0) > args.budget_s:
            row["status"] = f"skipped (budget: {elapsed:.0f}s used, ~{est or 0:.0f}s needed, {args.budget_s:.0f}s budget)"
        elif cfg.compile and compile_broken:
            row["status"] = f"skipped (compile failed earlier: {compile_broken})"
        else:
            started = time.perf_counter()
            oom = False
            try:
                row.update(run_config(cfg, ctx, args))
                if cfg.compile:
                    compiled_batches.add(cfg.batch)
            except torch.cuda.OutOfMemoryError:
                oom = True
                row["status"] = "OOM"
                if device.type == "cuda":  # how far it got
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
            except Exception as e:  # keep measuring the other configurations
                traceback.print_exc()
                first = (str(e).splitlines() or [""])[0][:200]
                row["status"] = f"error: {type(e).__name__}: {first}"
                if cfg.compile:
                    compile_broken = row["status"]
            row["wall_s"] = time.perf_counter() - started
            if oom or row["status"] != "ok":  # drop what the failed step left (grads, activations, cache)
                for p in params:
                    p.grad = None
                free_memory(device)
        report["results"].append(row)
        ref = next((r for r in report["results"] if r["kind"] == "reference" and r["status"] == "ok"), None)
        if ref and cfg.kind == "ours" and row["status"] == "ok":
            row["speedup_vs_reference"] = row["samples_per_s"] / ref["samples_per_s"]
        log(f"{cfg.name}: {row['status']}" + (
            f", {row['s_per_step']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
            f"MFU {_fmt(None if row['mfu'] is None else 100 * row['mfu'], '.1f')}%, "
            f"peak {_fmt(row.get('peak_mem_gb'), '.1f')} GB" if row["status"] == "ok" else ""), t0)
        report["headline"] = headline(report["results"], args)
        report["elapsed_s"] = time.perf_counter() - t0
        write_json(out_path, report)
        free_memory(device)

    report["complete"] = True
    report["elapsed_s"] = time.perf_counter() - t0
    write_json(out_path, report)
    print_table(report)
    log(f"wrote {out_path}", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
