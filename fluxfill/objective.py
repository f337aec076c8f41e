"""The training objective (docs/design.md §3): rectified flow matching on the Fill transformer.

    σ ~ sigmoid(N(0, 1)) per sample              (logit-normal, no shift)
    x_t = (1 - σ) x_0 + σ ε                     target velocity v = ε - x_0
    hidden_states = cat(x_t, x_cond)            [B, N, 64 + 320 = 384]
    loss = MSE(transformer(hidden_states, timestep=σ, guidance=1.0, pooled'), v) over all or target tokens

The transformer scales ``timestep`` and ``guidance`` by 1000 inside, as ``FluxFillPipeline`` relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel

from .latents import make_x_cond, target_token_mask

BATCH_KEYS = ("x_0", "masked_latents", "mask_latents", "prompt_embeds", "pooled_prompt_embeds", "img_ids", "txt_ids")


@dataclass
class StepOutput:
    loss: torch.Tensor | None     # [] fp32 (None from denoise)
    model_output: torch.Tensor    # [B, N, 64] velocity prediction
    target: torch.Tensor          # [B, N, 64] ε - x_0
    sigma: torch.Tensor           # [B]
    hidden_states: torch.Tensor   # [B, N, 384]
    pooled: torch.Tensor          # [B, P] fused pooled embedding fed to AdaLN


def model_dtype(transformer) -> torch.dtype:
    """The dtype of ``transformer``'s weights, through any DDP/FSDP/compile wrapper (a DDP wrapper has no .dtype)."""
    return extract_model_from_parallel(transformer).dtype


def check_batch(batch: dict) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; a training batch holds {BATCH_KEYS} (+ image_embeds for fusion)")


def sample_sigma(batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal σ in (0, 1), one per sample: ``[B]``."""
    return torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))


def sample_noise(shape: torch.Size, device, generator: torch.Generator | Sequence[torch.Generator] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """σ ``[B]`` and ε ``shape`` = ``[B, N, 64]``: from one generator for the batch, or one generator per sample.

    With one generator per sample (σ then ε drawn from each), a sample's noise does not depend on which
    batch or process it lands in: how training splits the global batch over processes leaves it unchanged.
    """
    if generator is None or isinstance(generator, torch.Generator):
        sigma = sample_sigma(shape[0], device, generator)  # [B]
        return sigma, torch.randn(shape, device=device, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} samples: give one per sample")
    sigma = torch.cat([sample_sigma(1, device, g) for g in generator])  # [B]
    noise = torch.stack([torch.randn(shape[1:], device=device, generator=g) for g in generator])  # [B, N, 64]
    return sigma, noise


def fused_pooled(fusion, batch: dict) -> torch.Tensor:
    """``[B, P]``: the pooled embedding the transformer sees (training and inference share this call)."""
    return fusion(batch["pooled_prompt_embeds"], batch.get("image_embeds"))


def flow_matching_step(transformer, fusion, batch: dict, loss_region: str = "all", guidance: float = 1.0,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       dtype: torch.dtype | None = None) -> StepOutput:
    """One training forward pass on cached tensors; returns the loss and what went in and out.

    ``transformer`` may be wrapped (DDP, FSDP, compiled); ``generator`` is one for the batch or one per sample;
    ``dtype`` is the transformer's (looked up when None: a walk over its modules, which a loop does once).
    """
    check_batch(batch)
    x_0 = batch["x_0"]  # [B, N, 64]
    sigma, noise = sample_noise(x_0.shape, x_0.device, generator)  # [B], [B, N, 64]
    out = denoise(transformer, fusion, batch, sigma, noise, guidance, dtype)
    err = (out.model_output.float() - out.target) ** 2  # [B, N, 64]
    if loss_region == "all":
        out.loss = err.mean()
    elif loss_region == "target":
        tokens = target_token_mask(batch["mask_latents"]).expand(x_0.shape[0], -1)  # [B, N]
        out.loss = err[tokens].mean()
    else:
        raise ValueError(f"loss_region {loss_region!r}: expected 'all' or 'target'")
    return out


def denoise(transformer, fusion, batch: dict, sigma: torch.Tensor, noise: torch.Tensor,
            guidance: float = 1.0, dtype: torch.dtype | None = None) -> StepOutput:
    """The velocity prediction at noise level ``sigma [B]`` with ``noise [B, N, 64]``; ``loss`` is left None."""
    check_batch(batch)
    dtype = dtype or model_dtype(transformer)
    x_0 = batch["x_0"].float()  # [B, N, 64]
    b = x_0.shape[0]
    s = sigma[:, None, None]  # [B, 1, 1]
    x_t = (1 - s) * x_0 + s * noise  # [B, N, 64]
    target = noise - x_0  # [B, N, 64]
    x_cond = make_x_cond(batch["masked_latents"], batch["mask_latents"])  # [B, N, 320]
    hidden_states = torch.cat((x_t.to(dtype), x_cond.to(dtype)), dim=2)  # [B, N, 384]
    pooled = fused_pooled(fusion, batch)  # [B, P]
    model_output = transformer(
        hidden_states=hidden_states,
        timestep=sigma.to(dtype),
        guidance=torch.full((b,), guidance, device=x_0.device, dtype=dtype),
        pooled_projections=pooled.to(dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(dtype),
        txt_ids=batch["txt_ids"],
        img_ids=batch["img_ids"],
        return_dict=False,
    )[0]  # [B, N, 64]
    return StepOutput(loss=None, model_output=model_output, target=target, sigma=sigma,
                      hidden_states=hidden_states, pooled=pooled)
