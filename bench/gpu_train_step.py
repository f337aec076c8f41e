"""Full-size GPU training-step benchmark: the step `fluxfill train` runs vs. a public-trainer reference step.

What runs
  The FLUX.1-Fill transformer of ``--preset`` (default ``flux-fill-dev-random``: the real 11.9B architecture,
  ``in_channels=384``, random weights, built directly on the GPU; nothing is downloaded), with LoRA (rank 32
  on the default targets of ``fluxfill.config.LoraConfig``) and the semantic fusion module, fed one enhanced
  diptych batch: 512x1024 pixels = 2048 image tokens, 512 text tokens (random tensors with the contract's
  shapes; the mask is the real diptych mask, 0 over the source half, 1 over the target half).

  ours       ``fluxfill.step.train_step`` on a ``fluxfill.step.Trainer`` from ``fluxfill.step.build``: the
             functions ``fluxfill train`` calls, with the same settings (frozen base in ``model.dtype``,
             LoRA and fusion in fp32, accelerate's autocast from ``train.mixed_precision``, clipping, AdamW,
             schedule; gradient checkpointing and per-block ``torch.compile`` as ``auto`` resolves them or
             as a configuration sets them). The model comes from ``fluxfill.step.load_transformer``. Each
             sample's noise comes from ``fluxfill.step.sample_generators``, as in training. No host sync
             inside the timed loop (the losses are read after it).
  reference  the training step as the public Fill trainer writes it (diffusers
             ``examples/flux-fill/train_dreambooth_lora_fluxfill_inpaint.py``, defaults of its arguments):
             eager, default attention, LoRA in bf16 (the script upcasts only for fp16), ``torch.optim.AdamW``
             with its defaults (no ``fused``), unpacked latents packed and concatenated every step, timesteps
             looked up with one ``.item()`` per sample, bf16 autocast as accelerate's
             ``mixed_precision="bf16"`` applies it, ``clip_grad_norm_`` over all transformer parameters,
             ``loss.item()`` every step, gradient checkpointing as ours. It starts from cached latents (its
             ``--cache_latents`` path) and a pre-encoded masked image (the script VAE-encodes it every step):
             no VAE time is counted, which favours the reference.

Plan, in priority order (a budget stops starting configurations, see Timing)
  1. the reference, then the headline: ours at the reference's batch with the ``auto`` settings;
  2. the 24 GB preset: ``--preset-batch`` (1) with checkpointing, bf16 and each ``--quantize`` mode
     (``model.quantize``), ``--preset-steps`` (50) steps each from the same weights, LoRA init, batch and
     noise: s/step, peak memory (target < 22 GB) and the loss curve of each mode against bf16;
  3. the matrix: ``--batch-sizes`` x ``--checkpointing`` (on, off, or N = only the first N blocks) x
     ``--compile``;
  4. candidates: ``--fp8-matmul on`` (torchao float8 matmuls for the frozen linears; needs compute
     capability >= 8.9).

Timing
  Per configuration: ``--warmup`` steps (they absorb torch.compile's compilation; their time is reported
  as compile time, never as step time), then the timed steps between two device synchronisations.
  Compiled graphs are static per batch size (``automatic_dynamic_shapes`` off), as in a training run with
  one batch size. Peak memory is ``torch.cuda.max_memory_allocated`` reset before each configuration (model
  loading excluded). A configuration that runs out of memory is recorded as ``OOM`` and the run goes on; once
  ``--budget-s`` seconds (counted from the start, model builds included) would be exceeded, the remaining
  configurations are reported ``skipped``.

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
  pass at batch 1 with the LoRA disabled, then scaled by B; the analytic formula above is printed next to
  it as a cross-check. The peak comes from a table keyed by the GPU name torch reports (H100 SXM / H200:
  989 TFLOP/s) or from ``--peak-tflops``.

Run it (from the repository root, with fluxfill installed, ``pip install -e ".[quantize]"``)
  python bench/gpu_train_step.py                            # everything, stops starting configs at --budget-s 420
  python bench/gpu_train_step.py --batch-sizes 4 --checkpointing on,12 --compile on --quantize none
  python bench/gpu_train_step.py --preset tiny --device cpu --steps 2 --batch-sizes 1   # CPU mode, seconds

Without a CUDA GPU the full-size presets print ``no CUDA GPU: skipped`` and exit 0. Results go to stdout (a
table), to ``--out`` (JSON; default ``bench/results/gpu_train_step.json`` on a GPU,
``bench/results/smoke_train_step.json`` otherwise) and to the same path with ``.log`` (what stdout showed).
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
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from fluxfill import step as fluxfill_step
from fluxfill.config import FluxfillError, LoraConfig, ModelConfig, validate
from fluxfill.fusion import SemanticFusion, build_fusion
from fluxfill.latents import text_ids, vae_pipeline
from fluxfill.models import count_parameters, load_component, stored_bytes
from fluxfill.objective import flow_matching_step
from fluxfill.panels import diptych_mask

FULL_SIZE_PRESETS = ("flux-fill-dev-random", "flux-fill-dev")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEP = f"{fluxfill_step.train_step.__module__}.{fluxfill_step.train_step.__qualname__}"  # what "ours" times
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
TARGETS = {"speedup_vs_reference": 1.3, "mfu": 0.40, "mfu_goal": 0.45, "peak_mem_gb_headline": 60.0,
           "peak_mem_gb_24gb_preset": 22.0}
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




def _checkpointing_list(text: str) -> list[bool | int | str]:
    """``on,off,12,auto`` -> [True, False, 12, "auto"]: all blocks, none, the first N blocks (selective), or as
    ``train.gradient_checkpointing: auto`` chooses from the free memory."""
    out: list[bool | int | str] = []
    for v in (v.strip().lower() for v in text.split(",") if v.strip()):
        if v in ("on", "off"):
            out.append(v == "on")
        elif v == "auto":
            out.append(v)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise argparse.ArgumentTypeError(f"{text!r}: expected on, off, auto or a number of blocks, e.g. on,off,12")
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: expected on, off or a number of blocks, e.g. on,off,12")
    return [v for _, v in dict.fromkeys((type(v), v) for v in out)]  # True and 1 are different settings


def _quantize_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    allowed = ("none", "fp8", "int8", "nf4")
    if any(v not in allowed for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return [v for v in dict.fromkeys(values) if v != "none"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_train_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-fill-dev-random", choices=["tiny", *FULL_SIZE_PRESETS],
                   help="model preset (default flux-fill-dev-random: full size, random weights, no download)")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="model.dtype of the frozen base (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="train.mixed_precision of ours (auto: bf16 on cuda, no on cpu)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4], help="matrix batch sizes (default 1,2,4)")
    p.add_argument("--checkpointing", type=_checkpointing_list, default=[True, False],
                   help="matrix gradient checkpointing: on, off, N (first N blocks) (default on,off)")
    p.add_argument("--compile", type=_on_off_list, default=None,
                   help="matrix torch.compile settings: on,off (default both on cuda, off on cpu)")
    p.add_argument("--quantize", type=_quantize_list, default=None,
                   help="24 GB preset: model.quantize modes to compare with bf16 (default int8,fp8,nf4 on cuda, "
                        "none on cpu; 'none' skips the preset)")
    p.add_argument("--preset-batch", type=int, default=1, help="24 GB preset batch size (default 1)")
    p.add_argument("--preset-steps", type=int, default=50, help="24 GB preset timed steps per mode (default 50)")
    p.add_argument("--fp8-matmul", type=_on_off, default=False,
                   help="candidate: torchao float8 matmuls for the frozen linears, headline settings (default off)")
    p.add_argument("--attention", default="default", choices=["default", "flash", "cudnn"],
                   help="SDPA backend for our step: PyTorch's choice, or force FLASH_ATTENTION")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget from start, model builds included; later configs are skipped (default 420)")
    p.add_argument("--reference", type=_on_off, default=True, help="run the public-trainer reference step (on/off)")
    p.add_argument("--reference-batch", type=int, default=None, help="reference and headline batch (default: largest)")
    p.add_argument("--reference-autocast", type=_on_off, default=True,
                   help="bf16 autocast around the reference forward, as accelerate mixed_precision=bf16 does (default on)")
    p.add_argument("--panel-size", type=int, default=512, help="panel side in pixels; the diptych is 2x wide (default 512)")
    p.add_argument("--text-tokens", type=int, default=None, help="T5 tokens per prompt (default model.max_sequence_length, 512)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping in both steps (train.max_grad_norm)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.preset_steps < 1 or args.preset_batch < 1:
        p.error("--warmup, --steps, --preset-steps and --preset-batch must be at least 1")
    if args.max_grad_norm <= 0:
        p.error("--max-grad-norm must be positive (train.max_grad_norm)")
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




# --------------------------------------------------------------------------------------------------- runner
@dataclass
class Config:
    kind: str                    # "ours" or "reference"
    batch: int
    checkpointing: bool | int | str  # int: selective, only the first N blocks; "auto": as training resolves it
    compile: bool
    group: str = "matrix"        # headline | preset_24gb | matrix | candidate
    quantize: str = "none"       # model.quantize
    fp8_matmul: bool = False
    steps: int | None = None     # timed steps (None: --steps)
    fresh: bool = False          # reload the model first: same weights and LoRA init as the other fresh rows

    @property
    def name(self) -> str:
        ck = {True: "on", False: "off"}.get(self.checkpointing, str(self.checkpointing))
        extra = (f" quantize={self.quantize}" if self.quantize != "none" else "") + (" fp8-matmul" if self.fp8_matmul else "")
        return f"{self.kind} b{self.batch} ckpt={ck} compile={'on' if self.compile else 'off'}{extra}"


def plan(args, device: torch.device) -> list[Config]:
    """Reference, headline (the ``auto`` settings at the reference batch), 24 GB preset, matrix, candidates."""
    ref_b = args.reference_batch or max(args.batch_sizes)
    comp = fluxfill_step.resolve("auto", device)
    head = Config("ours", ref_b, "auto", comp, group="headline")  # train.gradient_checkpointing: auto
    ref_ckpt = device.type == "cuda"  # the public script's --gradient_checkpointing, needed at batch 4 on 80 GB
    configs = ([Config("reference", ref_b, ref_ckpt, False, group="headline")] if args.reference else []) + [head]
    if args.quantize:
        pb = args.preset_batch
        configs += [Config("ours", pb, True, fluxfill_step.compile_setting(bench_params(args, quantize=q), device),
                           "preset_24gb", q, steps=args.preset_steps, fresh=True)
                    for q in ("none", *args.quantize)]  # compiled as training's `auto` resolves it
    matrix = [Config("ours", b, ck, co) for b in args.batch_sizes for ck in args.checkpointing for co in args.compile]
    matrix.sort(key=lambda c: (-c.batch, c.checkpointing is not True, not c.compile))
    configs += [c for c in matrix if c.name not in {x.name for x in configs}]
    if args.fp8_matmul:
        configs.append(Config("ours", ref_b, "auto", comp, "candidate", fp8_matmul=True))
    return configs


# ---------------------------------------------------------------------------------------------------- steps
def bench_params(args, cfg: Config | None = None, quantize: str = "none"):
    """The fluxfill params of a configuration: what ``fluxfill train --set ...`` would be given."""
    train = {"lora": {"rank": args.lora_rank, "alpha": args.lora_alpha}, "learning_rate": args.lr,
             "max_grad_norm": args.max_grad_norm, "mixed_precision": args.mixed_precision, "seed": args.seed}
    if cfg is not None:
        selective = isinstance(cfg.checkpointing, int) and not isinstance(cfg.checkpointing, bool)
        train.update(batch_size=cfg.batch, compile=cfg.compile,
                     gradient_checkpointing=True if selective else cfg.checkpointing)
    model = {"preset": args.preset, "dtype": args.dtype, "quantize": quantize}
    if args.text_tokens:
        model["max_sequence_length"] = args.text_tokens
    return validate({"data": {"panel_size": args.panel_size}, "model": model, "train": train})


def fp8_matmul_base(device: torch.device):
    """Candidate: the frozen linears run float8 matmuls (torchao, dynamic activation scales, per row)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise FluxfillError("fp8 matmuls need a CUDA GPU with compute capability >= 8.9 (H100, H200, L40S, "
                            f"RTX 40xx); {device} has none: run without --fp8-matmul")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def apply(transformer):
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0
                  and m.out_features % 16 == 0)
    return apply


def load_model(args, accelerator, quantize: str, fp8_matmul: bool, pooled_dim: int, embed_dim: int):
    """``fluxfill.step.load_transformer`` (the same LoRA and fusion init for every variant) + fusion."""
    params = bench_params(args, quantize=quantize)
    mixed = fluxfill_step.mixed_precision(params.train, accelerator.device)
    torch.manual_seed(args.seed)
    hook = fp8_matmul_base(accelerator.device) if fp8_matmul else None
    transformer = fluxfill_step.load_transformer(params, accelerator, fluxfill_step.weight_dtype(
        params, mixed, accelerator.device), base_hook=hook)
    fusion = build_fusion(params, pooled_dim, embed_dim).to(accelerator.device)  # fusion.mode of the defaults
    return transformer, fusion


class OurStep:
    """``fluxfill.step.train_step`` on a Trainer from ``fluxfill.step.build``; keeps each step's loss tensor."""

    def __init__(self, args, cfg: Config, accelerator, transformer, fusion, batch: dict, attention_ctx):
        params = bench_params(args, cfg)
        selective = isinstance(cfg.checkpointing, int) and not isinstance(cfg.checkpointing, bool)
        ckpt = cfg.checkpointing if selective else None  # N blocks; else train.gradient_checkpointing decides
        self.trainer = fluxfill_step.build(params, accelerator, transformer, fusion, checkpointing=ckpt)
        optimizer = self.trainer.optimizer.optimizer
        self.optimizer_kind = type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else "")
        self.batch, self.seed, self.attention_ctx, self.i, self.losses = batch, args.seed, attention_ctx, 0, []
        self.b = batch["x_0"].shape[0]
        self.checkpointing = self.trainer.checkpointing  # "auto" resolved: True, False or the first N blocks
        self.device = accelerator.device

    def __call__(self) -> torch.Tensor:
        with self.attention_ctx():
            generators = fluxfill_step.sample_generators(self.seed, self.i, range(self.b), self.device)  # as training seeds them
            loss, _ = fluxfill_step.train_step(self.trainer, self.batch, generators)
        self.i += 1
        self.losses.append(loss)
        return loss

    def close(self) -> list[float]:
        """The losses (one host sync) and the model back to its plain forward for the next configuration."""
        losses = torch.stack(self.losses).float().tolist() if self.losses else []  # [] when the first step failed
        acc = self.trainer.accelerator
        acc.unwrap_model(self.trainer.transformer, keep_fp32_wrapper=False)
        acc.free_memory()
        self.trainer = None
        return losses


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
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        # torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8), not fused
        self.optimizer = torch.optim.AdamW([{"params": self.params, "lr": lr}], lr=lr, betas=(0.9, 0.999),
                                           weight_decay=1e-4, eps=1e-8)
        self.optimizer_kind = "AdamW (default)"
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




def ensure_model(cfg: Config, ctx: dict, args) -> None:
    """Load the model variant a configuration needs (freeing the previous one first)."""
    key = (cfg.quantize, cfg.fp8_matmul)
    if ctx["model_key"] == key and not cfg.fresh:
        return
    ctx["transformer"] = ctx["fusion"] = None
    free_memory(ctx["device"])
    started = time.perf_counter()
    ctx["transformer"], ctx["fusion"] = load_model(args, ctx["accelerator"], cfg.quantize, cfg.fp8_matmul,
                                                   *ctx["fusion_dims"])
    ctx["model_key"] = key
    ctx["load_s"].append(time.perf_counter() - started)


def run_config(cfg: Config, ctx: dict, args) -> dict:
    device, inputs = ctx["device"], ctx["inputs"]
    ensure_model(cfg, ctx, args)
    transformer = ctx["transformer"]
    result = {"base_stored_gb": sum(stored_bytes(p) for p in transformer.parameters() if not p.requires_grad) / GB}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if cfg.kind == "reference":
        fluxfill_step.set_compiled(transformer, False)
        fluxfill_step.set_checkpointing(transformer, cfg.checkpointing)
        cast_training_params(transformer, ctx["dtype"])  # the public script keeps a bf16 LoRA under bf16
        step = ReferenceStep(transformer, ctx["noise_scheduler"], inputs, cfg.batch, args.lr, args.max_grad_norm,
                             autocast=args.reference_autocast)
        attention, checkpointing = "default", cfg.checkpointing
    else:
        step = OurStep(args, cfg, ctx["accelerator"], transformer, ctx["fusion"], inputs.ours(cfg.batch),
                       ctx["attention_ctx"])
        attention, checkpointing = args.attention, step.checkpointing
    try:
        warmup_s = [timed(step, 1, device)[0] for _ in range(args.warmup)]  # compilation happens here
        steps = cfg.steps or args.steps
        total, last = timed(step, steps, device)
    finally:
        losses = step.close() if cfg.kind == "ours" else None
        if cfg.kind == "reference":
            cast_training_params(transformer, torch.float32)
    s_per_step = total / steps
    useful = useful_flops(ctx["flops_per_sample"], cfg.batch)
    peak = ctx["peak_tflops"]
    result.update({
        "status": "ok", "attention": attention, "optimizer": step.optimizer_kind, "steps": steps,
        "checkpointed_blocks": {True: len(fluxfill_step.blocks(transformer)), False: 0}.get(checkpointing, checkpointing),
        "s_per_step": s_per_step, "samples_per_s": cfg.batch / s_per_step,
        "useful_tflop_per_step": useful / 1e12, "achieved_tflops": useful / s_per_step / 1e12,
        "mfu": useful / s_per_step / (peak * 1e12) if peak else None,
        "warmup_s": warmup_s,
        "compile_s": max(0.0, sum(warmup_s) - args.warmup * s_per_step) if cfg.compile else 0.0,
        "final_loss": float(last) if cfg.kind == "reference" else losses[-1],
    })
    if losses is not None:
        result["losses"] = losses  # warm-up and timed steps, in order
    cuda = device.type == "cuda"  # no device peak on CPU
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB if cuda else None
    result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB if cuda else None
    return result


def estimate_s(cfg: Config, done: list[dict], args, ctx: dict) -> float | None:
    """Rough cost of a configuration from what ran so far (None when nothing comparable ran yet)."""
    per_sample = [r["s_per_step"] / r["batch_size"] for r in done if r.get("status") == "ok"]
    compiles = [r["compile_s"] for r in done if r.get("status") == "ok" and r.get("compile")]
    if not per_sample:
        return None
    est = 1.25 * max(per_sample) * cfg.batch * (args.warmup + (cfg.steps or args.steps))
    if cfg.compile and not any(r.get("status") == "ok" and r.get("compile") and r["batch_size"] == cfg.batch
                               for r in done):
        est += max(compiles) if compiles else 90.0
    if cfg.fresh or ctx["model_key"] != (cfg.quantize, cfg.fp8_matmul):
        est += max(ctx["load_s"])
    return est


def _loss_gap(losses: list[float], base: list[float]) -> dict:
    """A quantised run's loss curve against the bf16 one (same steps, batch, noise and initial weights)."""
    n = min(len(losses), len(base))
    diff = [abs(a - b) for a, b in zip(losses[:n], base[:n], strict=True)]
    tail = max(1, n // 5)
    return {"steps": n, "mean_abs_diff": sum(diff) / n, "max_abs_diff": max(diff),
            "mean_rel_diff": sum(diff) / max(1e-12, sum(abs(b) for b in base[:n])),
            "last_fifth_mean": sum(losses[n - tail:n]) / tail, "last_fifth_mean_bf16": sum(base[n - tail:n]) / tail}


def headline(results: list[dict], args) -> dict:
    ok = lambda r: r.get("status") == "ok"  # noqa: E731
    ref = next((r for r in results if r["kind"] == "reference" and ok(r)), None)
    head = next((r for r in results if r["group"] == "headline" and r["kind"] == "ours"), None)
    out: dict = {"step": STEP, "config": head["name"] if head else None, "targets": TARGETS}
    if head:
        out.update(batch_size=head["batch_size"], checkpointing=head["checkpointing"], compile=head["compile"])
    checks = {}
    if head and ok(head):
        out.update(samples_per_s=head["samples_per_s"], s_per_step=head["s_per_step"], mfu=head["mfu"],
                   peak_mem_gb=head.get("peak_mem_gb"))
        if ref:
            out["reference_samples_per_s"] = ref["samples_per_s"]
            out["speedup_vs_reference"] = head["samples_per_s"] / ref["samples_per_s"]
            checks["speedup_vs_reference"] = out["speedup_vs_reference"] >= TARGETS["speedup_vs_reference"]
        if head["mfu"] is not None:
            checks["mfu"] = head["mfu"] >= TARGETS["mfu"]
        if head.get("peak_mem_gb") is not None:
            checks["peak_mem_gb_headline"] = head["peak_mem_gb"] < TARGETS["peak_mem_gb_headline"]
    preset = [r for r in results if r["group"] == "preset_24gb"]
    base = next((r for r in preset if r["quantize"] == "none" and ok(r)), None)
    rows = []
    for r in preset:
        row = {"quantize": r["quantize"], "status": r["status"]}
        if ok(r):
            row.update({k: r.get(k) for k in ("s_per_step", "samples_per_s", "mfu", "peak_mem_gb", "base_stored_gb")})
            if r["quantize"] != "none" and base:
                row["loss_vs_bf16"] = _loss_gap(r["losses"], base["losses"])
            if r.get("peak_mem_gb") is not None and r["quantize"] != "none":
                checks[f"peak_mem_gb_24gb_preset_{r['quantize']}"] = r["peak_mem_gb"] < TARGETS["peak_mem_gb_24gb_preset"]
        rows.append(row)
    if preset:
        out["preset_24gb"] = {"batch_size": preset[0]["batch_size"], "checkpointing": True, "modes": rows}
    out["meets"] = checks
    return out


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _verdict(h: dict, key: str) -> str:
    return "PASS" if h["meets"][key] else "FAIL"


def print_table(report: dict) -> None:
    print()
    print(f"{'config':<48} {'status':<8} {'s/step':>8} {'samples/s':>10} {'x ref':>6} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'peak GB':>8} {'compile s':>9}")
    for r in report["results"]:
        print(f"{r['name']:<48} {r['status'][:8]:<8} {_fmt(r.get('s_per_step'), '.3f'):>8} "
              f"{_fmt(r.get('samples_per_s'), '.3f'):>10} {_fmt(r.get('speedup_vs_reference'), '.2f'):>6} "
              f"{_fmt(r.get('achieved_tflops'), '.1f'):>8} "
              f"{_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f'):>6} "
              f"{_fmt(r.get('peak_mem_gb'), '.1f'):>8} {_fmt(r.get('compile_s') if r.get('compile') else None, '.1f'):>9}")
    h = report["headline"]
    print(f"\nheadline: {h.get('config') or 'n/a'}{'' if 'samples_per_s' in h else ' (not measured)'}, "
          f"timing {h['step']}")
    if "speedup_vs_reference" in h:
        print(f"  ours/reference samples/s: {h['speedup_vs_reference']:.2f}x "
              f"(target >= {TARGETS['speedup_vs_reference']}x: {_verdict(h, 'speedup_vs_reference')})")
    if h.get("mfu") is not None:
        print(f"  MFU: {100 * h['mfu']:.1f}% (target >= {100 * TARGETS['mfu']:.0f}%: {_verdict(h, 'mfu')})")
    if "peak_mem_gb_headline" in h["meets"]:
        print(f"  peak memory: {h['peak_mem_gb']:.1f} GB (target < {TARGETS['peak_mem_gb_headline']:.0f} GB: "
              f"{_verdict(h, 'peak_mem_gb_headline')})")
    for m in h.get("preset_24gb", {}).get("modes", []):
        gap = m.get("loss_vs_bf16")
        key = f"peak_mem_gb_24gb_preset_{m['quantize']}"
        print(f"  24 GB preset {m['quantize']}: {m['status']}, {_fmt(m.get('s_per_step'), '.3f')} s/step, peak "
              f"{_fmt(m.get('peak_mem_gb'), '.1f')} GB" + (f" (target < {TARGETS['peak_mem_gb_24gb_preset']:.0f} GB: "
                                                          f"{_verdict(h, key)})" if key in h["meets"] else "")
              + (f", loss vs bf16 over {gap['steps']} steps: mean |diff| {gap['mean_abs_diff']:.4f}" if gap else ""))
    if report["machine"]["device"] == "cpu":
        print("  (CPU mode: the figures check the code path, they say nothing about GPU performance)")
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
def setup(args, device: torch.device, t0: float) -> tuple[dict, dict]:
    """The accelerator, the inputs, the FLOPs per sample and the first model; returns (context, report)."""
    from accelerate import Accelerator

    mixed = fluxfill_step.mixed_precision(bench_params(args).train, device)
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    params = bench_params(args)
    dtype = fluxfill_step.weight_dtype(params, mixed, device)
    model_cfg = params.model
    text_tokens = args.text_tokens or model_cfg.max_sequence_length
    machine = machine_info(device)
    log(f"device {device}: {machine['device_name']}, torch {torch.__version__}, preset {args.preset}, {dtype}, "
        f"mixed precision {mixed}", t0)
    tcfg = load_component(model_cfg, "transformer", "meta").config
    embed_dim = image_embed_dim(args.preset)
    ctx = dict(accelerator=accelerator, device=device, dtype=dtype, model_key=None, transformer=None, fusion=None,
               fusion_dims=(tcfg.pooled_projection_dim, embed_dim), load_s=[],
               noise_scheduler=load_component(model_cfg, "scheduler"))
    ensure_model(Config("ours", 1, False, False), ctx, args)
    transformer = ctx["transformer"]
    n_params = count_parameters(transformer) - count_parameters(transformer, trainable_only=True)
    log(f"transformer loaded by {fluxfill_step.load_transformer.__module__}.load_transformer: "
        f"{n_params / 1e6:,.1f}M frozen parameters ({ctx['load_s'][-1]:.1f} s)", t0)
    inputs = build_inputs(model_cfg, tcfg, embed_dim, max(args.batch_sizes + [args.reference_batch or 1, args.preset_batch]),
                          args.panel_size, text_tokens, device, dtype, args.seed)
    if args.attention == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention_ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    else:
        attention_ctx = contextlib.nullcontext
    if device.type == "cuda" and args.attention != "cudnn":  # as fluxfill.step.build does
        torch.backends.cuda.enable_cudnn_sdp(False)

    # FLOPs of the frozen network: one batch-1 forward with the LoRA disabled
    transformer.disable_adapters()
    measured, sdpa_ops = measured_forward_flops(transformer, inputs.ours(1), attention_ctx)
    ref_sdpa_ops = sdpa_ops if args.attention == "default" else \
        measured_forward_flops(transformer, inputs.ours(1), contextlib.nullcontext)[1]
    transformer.enable_adapters()
    analytic = analytic_forward_flops(tcfg, inputs.image_tokens, inputs.text_tokens)
    rel = (measured["total"] - analytic["total"]) / analytic["total"]
    log(f"forward FLOPs/sample: measured {measured['total'] / 1e12:.3f} T (linear {measured['linear'] / 1e12:.3f}, "
        f"attention {measured['attention'] / 1e12:.3f}), analytic {analytic['total'] / 1e12:.3f} T ({100 * rel:+.2f}%); "
        f"SDPA ops: ours {sdpa_ops or ['none counted']}, reference {ref_sdpa_ops or ['none counted']}", t0)

    lora = [p for p in transformer.parameters() if p.requires_grad]
    peak_tflops = args.peak_tflops or peak_tflops_for(machine["device_name"] if device.type == "cuda" else None)
    peak_source = "--peak-tflops" if args.peak_tflops else ("table" if peak_tflops else "unknown GPU: pass --peak-tflops")
    ctx.update(inputs=inputs, attention_ctx=attention_ctx, flops_per_sample=measured, peak_tflops=peak_tflops)
    report = {
        "benchmark": "gpu_train_step", "step": STEP,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "machine": machine,
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "settings": {"mixed_precision": mixed, "base_dtype": str(dtype).removeprefix("torch."),
                     "trainable_dtype": str(lora[0].dtype).removeprefix("torch."),
                     "automatic_dynamic_shapes": False, "cudnn_sdp": device.type != "cuda" or args.attention == "cudnn"},
        "model": {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "parameters": n_params,
                  "num_layers": tcfg.num_layers, "num_single_layers": tcfg.num_single_layers,
                  "hidden": tcfg.num_attention_heads * tcfg.attention_head_dim, "in_channels": tcfg.in_channels,
                  "image_tokens": inputs.image_tokens, "text_tokens": inputs.text_tokens,
                  "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": LoraConfig().target_modules,
                           "trainable": sum(p.numel() for p in lora),
                           "dtype": str(lora[0].dtype).removeprefix("torch.")},
                  "fusion_trainable": sum(p.numel() for p in ctx["fusion"].parameters())},
        "attention": {"requested": args.attention, "sdpa_ops_ours": sdpa_ops, "sdpa_ops_reference": ref_sdpa_ops},
        "flops": {"formula": FLOP_FORMULA, "forward_per_sample_measured": measured,
                  "forward_per_sample_analytic": analytic, "measured_vs_analytic": rel,
                  "useful_per_sample": useful_flops(measured, 1), "counter": "torch.utils.flop_counter.FlopCounterMode"},
        "peak_tflops": peak_tflops, "peak_source": peak_source,
        "results": [], "headline": {},
    }
    return ctx, report


def run_plan(ctx: dict, report: dict, args, out_path: Path, t0: float) -> None:
    compile_broken: str | None = None
    device = ctx["device"]
    for cfg in plan(args, device):
        row = {"name": cfg.name, "kind": cfg.kind, "group": cfg.group, "batch_size": cfg.batch,
               "checkpointing": cfg.checkpointing, "compile": cfg.compile, "quantize": cfg.quantize,
               "fp8_matmul": cfg.fp8_matmul}
        elapsed = time.perf_counter() - t0
        est = estimate_s(cfg, report["results"], args, ctx)
        if elapsed + (est or 0.0) > args.budget_s:
            row["status"] = f"skipped (budget: {elapsed:.0f}s used, ~{est or 0:.0f}s needed, {args.budget_s:.0f}s budget)"
        elif cfg.compile and compile_broken:
            row["status"] = f"skipped (compile failed earlier: {compile_broken})"
        else:
            started = time.perf_counter()
            try:
                row.update(run_config(cfg, ctx, args))
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
                if device.type == "cuda":  # how far it got
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
            except Exception as e:  # keep measuring the other configurations
                if not isinstance(e, FluxfillError):
                    traceback.print_exc()
                first = (str(e).splitlines() or [""])[0][:300]
                row["status"] = f"error: {type(e).__name__}: {first}"
                if cfg.compile and not isinstance(e, FluxfillError):
                    compile_broken = row["status"]
            row["wall_s"] = time.perf_counter() - started
            if row["status"] != "ok" and ctx["transformer"] is not None:  # drop what the failed step left
                for p in ctx["transformer"].parameters():
                    p.grad = None
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
    if args.quantize is None:
        args.quantize = ["int8", "fp8", "nf4"] if device.type == "cuda" else []
    out_path = args.out or RESULTS_DIR / ("gpu_train_step.json" if device.type == "cuda" else "smoke_train_step.json")

    # one static graph per batch size, as a training run with one batch size compiles; room for the variants
    dynamo_config = importlib.import_module("torch._dynamo").config
    knob = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))
    dynamo_config.automatic_dynamic_shapes = False

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path.with_suffix(".log"), "w") as log_file, contextlib.redirect_stdout(_Tee(sys.stdout, log_file)):
        ctx, report = setup(args, device, t0)
        run_plan(ctx, report, args, out_path, t0)
        report["complete"] = True
        report["elapsed_s"] = time.perf_counter() - t0
        write_json(out_path, report)
        print_table(report)
        log(f"wrote {out_path} and {out_path.with_suffix('.log')}", t0)
    return 0


class _Tee:
    """stdout that also goes to the run's log file (bench/results/gpu_train_step.log beside the JSON)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:  # libraries ask before colouring their output
        return False


if __name__ == "__main__":
    sys.exit(main())
