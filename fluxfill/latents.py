"""The diptych tensor contract (docs/design.md §2), computed with diffusers' own ``FluxFillPipeline`` functions.

From a PIL enhanced diptych ``[source | target]`` and its mask, through the pipeline's image and mask
processors, its VAE shift/scale, ``_pack_latents``, ``prepare_mask_latents`` and
``_prepare_latent_image_ids``:

    enhanced_diptych  [B, 3, H, 2H]        pixels in [-1, 1]
    mask_diptych      [B, 1, H, 2H]        0 = keep (source), 1 = paint (target)
    vae_latents       [B, 16, H/8, H/4]    (z - shift_factor) * scaling_factor
    x_0               [B, N, 64]           N = (H/16) * (2H/16)
    masked_latents    [B, N, 64]           VAE(diptych * (1 - mask)), packed
    mask_latents      [B, N, 256]          8x8 pixel mask per latent pixel x 2x2 packing
    x_cond            [B, N, 320]          cat(masked_latents, mask_latents)
    img_ids           [N, 3]               (0, row, col)

The VAE posterior is taken at its mode (``retrieve_latents(..., sample_mode="argmax")``): the cache is then
deterministic, independent of batch composition and RNG, and FLUX's posterior std is negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import retrieve_latents
from PIL import Image

from .config import check_panel_size


@dataclass
class DiptychLatents:
    pixels: torch.Tensor          # [B, 3, H, 2H] enhanced diptych in [-1, 1]
    mask: torch.Tensor            # [B, 1, H, 2H] 0 source, 1 target
    vae_latents: torch.Tensor     # [B, 16, H/8, 2H/8] shifted and scaled
    x_0: torch.Tensor             # [B, N, 64] packed
    masked_latents: torch.Tensor  # [B, N, 64] packed
    mask_latents: torch.Tensor    # [B, N, 256] packed
    img_ids: torch.Tensor         # [N, 3]

    @property
    def x_cond(self) -> torch.Tensor:
        return make_x_cond(self.masked_latents, self.mask_latents)


def make_x_cond(masked_latents: torch.Tensor, mask_latents: torch.Tensor) -> torch.Tensor:
    """``[B, N, 64] + [B|1, N, 256] -> [B, N, 320]``: the Fill conditioning, as ``FluxFillPipeline`` builds it."""
    if mask_latents.shape[0] != masked_latents.shape[0]:
        mask_latents = mask_latents.expand(masked_latents.shape[0], -1, -1)  # [B, N, 256] shared geometry
    return torch.cat((masked_latents, mask_latents.to(masked_latents.dtype)), dim=-1)  # [B, N, 320]


def vae_pipeline(vae) -> FluxFillPipeline:
    """A ``FluxFillPipeline`` holding only the VAE: its processors and latent functions, nothing else loaded."""
    return FluxFillPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=None)


def check_diptychs(diptychs: list[Image.Image], masks: list[Image.Image]) -> tuple[int, int]:
    """All diptychs ``2H x H`` with ``H`` a multiple of 16, each mask the same size; returns ``(H, 2H)``."""
    if len(diptychs) != len(masks) or not diptychs:
        raise ValueError(f"{len(diptychs)} diptychs but {len(masks)} masks: one mask per diptych is needed")
    w, h = diptychs[0].size
    for i, (d, m) in enumerate(zip(diptychs, masks, strict=True)):
        if d.size != (w, h):
            raise ValueError(f"diptych {i} is {d.size[0]}x{d.size[1]} but diptych 0 is {w}x{h}: a batch shares one size")
        if m.size != d.size:
            raise ValueError(
                f"mask {i} is {m.size[0]}x{m.size[1]} but its diptych is {d.size[0]}x{d.size[1]}: "
                "the mask must cover the diptych pixel for pixel"
            )
    if w != 2 * h:
        raise ValueError(f"diptych is {w}x{h}; an enhanced diptych is two square panels side by side ({2 * h}x{h})")
    check_panel_size(h)
    return h, w


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents at the posterior mode, ``[B, 3, H, W] -> [B, 16, H/8, W/8]`` (not shifted/scaled)."""
    return retrieve_latents(vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)), sample_mode="argmax")


@torch.no_grad()
def encode_diptychs(pipe: FluxFillPipeline, diptychs: list[Image.Image], masks: list[Image.Image],
                    dtype: torch.dtype | None = None) -> DiptychLatents:
    """Encode PIL diptychs and masks into the packed tensors the Fill transformer consumes."""
    height, width = check_diptychs(diptychs, masks)
    vae = pipe.vae
    device, dtype = vae.device, dtype or vae.dtype
    b, c = len(diptychs), vae.config.latent_channels
    pixels = pipe.image_processor.preprocess(diptychs, height=height, width=width)  # [B, 3, H, 2H] in [-1, 1]
    mask = pipe.mask_processor.preprocess(masks, height=height, width=width)  # [B, 1, H, 2H] in {0, 1}
    masked_pixels = pixels * (1 - mask)  # [B, 3, H, 2H] target half blanked to 0
    z = vae_encode(vae, torch.cat([pixels, masked_pixels]))  # [2B, 16, H/8, 2H/8] one VAE call for both
    z_image, z_masked = z[:b], z[b:]
    vae_latents = (z_image - vae.config.shift_factor) * vae.config.scaling_factor  # [B, 16, h, w]
    lh, lw = vae_latents.shape[-2:]
    x_0 = FluxFillPipeline._pack_latents(vae_latents, b, c, lh, lw).to(dtype)  # [B, N, 64]
    # the pipeline takes already-encoded latents when their channel count is the VAE's, and shifts/scales them
    mask_latents, masked_latents = pipe.prepare_mask_latents(
        mask.to(device), z_masked, b, c, 1, height, width, dtype, device, None
    )  # [B, N, 256], [B, N, 64]
    img_ids = FluxFillPipeline._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype)  # [N, 3]
    return DiptychLatents(pixels=pixels, mask=mask, vae_latents=vae_latents.to(dtype), x_0=x_0,
                          masked_latents=masked_latents, mask_latents=mask_latents, img_ids=img_ids)


def unpack(x: torch.Tensor, panel_size: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """``[B, N, 64] -> [B, 16, H/8, 2H/8]``: the inverse of ``_pack_latents`` for a diptych of ``panel_size``."""
    return FluxFillPipeline._unpack_latents(x, panel_size, 2 * panel_size, vae_scale_factor)


def target_token_mask(mask_latents: torch.Tensor) -> torch.Tensor:
    """``[B|1, N, 256] -> [B|1, N]`` bool: the tokens whose pixels lie in the painted (target) half."""
    return mask_latents.float().mean(dim=-1) > 0.5


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[T, 3]`` zeros: FLUX's text position ids, as ``FluxFillPipeline.encode_prompt`` returns them."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- conditioning
def text_pipeline(text_encoder, tokenizer, text_encoder_2, tokenizer_2) -> FluxFillPipeline:
    """A ``FluxFillPipeline`` holding only the text encoders, for its ``encode_prompt``."""
    return FluxFillPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=None)


@torch.no_grad()
def encode_prompts(pipe: FluxFillPipeline, prompts: list[str], max_sequence_length: int):
    """``prompts -> (prompt_embeds [B, T, D], pooled_prompt_embeds [B, P], txt_ids [T, 3])`` via the pipeline."""
    device = pipe.text_encoder_2.device
    return pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length)


@torch.no_grad()
def encode_references(image_encoder, image_processor, images: list[Image.Image]) -> torch.Tensor:
    """``references -> image_embeds [B, E]``: the CLIP vision embedding the fusion module projects."""
    pixel_values = image_processor(images=images, return_tensors="pt").pixel_values  # [B, 3, S, S]
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).image_embeds  # [B, E]
