"""Held-out validation loss: the flow-matching loss on the cached val split at K fixed noise levels.

    σ_k        = (k + 0.5) / K,  k = 0 .. K-1             K evenly spaced levels in (0, 1) (train.val_sigmas)
    ε_(i, k)   ~ N(0, I), seeded by (train.seed, sample id i, k)
    val_loss   = mean over samples i and levels k of MSE(v(x_t), ε - x_0) over train.loss_region

Computed without gradients, in eval mode (no LoRA dropout). Each (sample, level) term is a function of the
weights and the sample alone and the terms are summed in float64, so the number does not depend on the batch
size (only on float32 rounding inside the model: agreement within 1e-6 relative). Training logs it at step 0,
every train.val_every steps and at the end.
"""

from __future__ import annotations

import hashlib

import torch

from .encode import LatentCache
from .latents import target_token_mask
from .objective import denoise


def val_sigmas(k: int) -> torch.Tensor:
    """``[K]``: the evenly spaced noise levels ``(k + 0.5) / K``."""
    return (torch.arange(k, dtype=torch.float64) + 0.5) / k


def val_noise(seed: int, sample_id: str, k: int, shape: torch.Size) -> torch.Tensor:
    """``shape`` standard normal noise (CPU, fp32) seeded by (seed, sample id, k): the same on any device or batch."""
    digest = hashlib.sha256(f"{seed}/{sample_id}/{k}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return torch.randn(shape, generator=gen)


@torch.no_grad()
def validation_loss(transformer, fusion, cache: LatentCache, *, seed: int, num_sigmas: int = 4,
                    loss_region: str = "all", batch_size: int = 4, device=None) -> float:
    """The mean loss over every (val sample, noise level) pair of ``cache``, in ``batch_size`` rows per forward."""
    device = torch.device(device or next(transformer.parameters()).device)
    sigmas = val_sigmas(num_sigmas)
    pairs = [(i, k) for i in range(len(cache)) for k in range(num_sigmas)]
    modes = (transformer.training, fusion.training)
    transformer.eval()
    fusion.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            items = [cache[i] for i, _ in chunk]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cache.collate(items).items()}
            noise = torch.stack([val_noise(seed, it["id"], k, it["x_0"].shape) for it, (_, k) in zip(items, chunk, strict=True)])
            sigma = sigmas[[k for _, k in chunk]].float().to(device)  # [b]
            out = denoise(transformer, fusion, batch, sigma, noise.to(device))  # noise [b, N, 64]
            err = (out.model_output.float() - out.target) ** 2  # [b, N, 64]
            if loss_region == "target":
                tokens = target_token_mask(batch["mask_latents"])[0]  # [N] the same geometry for every sample
                err = err[:, tokens]  # [b, N_target, 64]
            total += err.double().mean(dim=(1, 2)).sum().cpu()
    finally:
        transformer.train(modes[0])
        fusion.train(modes[1])
    return float(total / len(pairs))
