"""Pretrain the ``tiny`` preset's weights on the CPU and write them as a diffusers repository folder.

The embedded default loads these weights (``fluxfill/weights/tiny``) through ``from_pretrained``, exactly as the
real preset loads FLUX.1-Fill-dev. They are trained from scikit-image's bundled photos, minus the demo's
validation photos (the ``val`` split of the default ``data`` settings), which stay held out for every figure:

  1. CLIP: one ``CLIPModel`` (text + vision towers, shared projection space), a short contrastive pass on photo
     crops and captions of their look (brightness, colour, warmth, contrast).
  2. The VAE: an autoencoder at 16 latent channels, 8x down, on jittered photo crops (its posterior is a point:
     the pipeline's sampling gets the mode); then ``shift_factor`` and ``scaling_factor`` are set as FLUX's are:
     latents ``(z - shift) * scale`` have mean 0 and std 1.
  3. The Fill transformer: rectified flow matching (``fluxfill.objective``) on diptychs and masks encoded with
     ``fluxfill.latents``: ``[A | edit(A)]`` with the right half masked and the edit named in the prompt
     (colour, contrast, brightness, blur, sharpening, black and white), photos with rectangles masked, and photos
     with one half masked. Its guidance embedder is zero and frozen: the tiny model is not guidance-distilled,
     so the pipeline's guidance scale has no effect on it.
  The T5 encoder keeps its seeded random weights: a fixed feature map of the prompt.

Deterministic: seeded, one intra-op thread; the same machine and torch build give the same bytes.
``--check`` retrains into a temporary folder and compares it with the shipped one (see :func:`compare`).

Examples:
  fluxfill pretrain-tiny                      # rewrite fluxfill/weights/tiny (about 23 CPU minutes)
  fluxfill pretrain-tiny --output /tmp/tiny   # write elsewhere
  fluxfill pretrain-tiny --check              # retrain into a temp folder and compare with the shipped files
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import resource
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from .config import DataConfig, FluxfillError, ModelConfig
from .data import DEMO_PHOTOS, assign_splits, read_image
from .latents import encode_diptychs, encode_prompts, text_ids, text_pipeline, vae_pipeline
from .models import TINY, TINY_DIR, build_tiny, tiny_tokenizers
from .objective import flow_matching_step
from .panels import fit_panel, to_rgb

log = logging.getLogger(__name__)

INFO_FILE = "pretrain.json"
FILL_PROMPT = "A photo with missing regions; fill them in so that they match the rest of the photo"
HALF_PROMPT = "A wide photo; paint the missing half so that it continues the scene"
SAME = "it is exactly the same"
EDITS = (SAME, "it is brighter", "it is darker", "it has more contrast", "it has less contrast",
         "it is more colourful", "it is black and white", "it is warmer", "it is cooler", "it is blurred",
         "it is sharper")
# scikit-image photos that are not demo samples; (name, demo photo of the same scene)
EXTRA_PHOTOS = (("motorcycle_right", "motorcycle_left"),)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights; the shipped folder records it in ``pretrain.json``."""

    seed: int = 0
    clip_steps: int = 300
    clip_batch: int = 64
    clip_lr: float = 5e-3
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 3e-3
    panel_sizes: tuple[int, ...] = (128,)  # the transformer's steps cycle through these panel sizes
    examples: int = 1536                    # encoded examples per panel size
    steps: int = 2000
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    text_tokens: int = ModelConfig().max_sequence_length


# ------------------------------------------------------------------------------------------------- photos
def held_out_photos() -> list[str]:
    """The demo's val photos under the default ``data`` settings: never seen by pretraining."""
    cfg = DataConfig()
    splits = assign_splits(list(DEMO_PHOTOS), cfg.val_fraction, cfg.seed)
    return sorted(name for name, split in splits.items() if split == "val")


def photo_pool() -> dict[str, np.ndarray]:
    """``name -> [H, W, 3] uint8``: scikit-image's bundled photos minus the held-out ones (and their scenes)."""
    import skimage.data

    held = set(held_out_photos())
    pool = {n: np.asarray(to_rgb(read_image(f"skimage:{n}"))[0]) for n in DEMO_PHOTOS if n not in held}
    for name, scene in EXTRA_PHOTOS:
        if scene not in held:
            pool[name] = np.asarray(Image.fromarray(skimage.data.stereo_motorcycle()[1]).convert("RGB"))
    return pool


def random_crop(rng: np.random.Generator, photo: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[h, w, 3]`` float32 in [0, 1]: a crop at a random scale and place, resized, maybe mirrored."""
    ph, pw = photo.shape[:2]
    fit = min(ph / h, pw / w)  # the largest crop of aspect h:w, in units of the output size
    # from the whole photo down to 1:1 pixels, mostly near the whole photo (as prepare's panels are)
    scale = fit * 2.0 ** -(rng.uniform() ** 2 * max(0.0, math.log2(fit)))
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.float32) / 255.0  # [h, w, 3]
    return a[:, ::-1] if rng.random() < 0.5 else a


def jitter(rng: np.random.Generator, a: np.ndarray) -> np.ndarray:
    """Colour jitter: saturation, per-channel gains, brightness, half the time a hue rotation; most scikit-image
    photos are grey, so a grey photo is coloured with a random two-colour map half the time."""
    luma = _luma(a)[..., None]  # [H, W, 1]
    if float((a.max(axis=-1) - a.min(axis=-1)).mean()) < 0.02 and rng.random() < 0.5:
        dark, light = rng.uniform(0.0, 0.5, size=3), rng.uniform(0.5, 1.0, size=3)
        a = (dark + (light - dark) * luma).astype(np.float32)  # [H, W, 3] duotone
        luma = _luma(a)[..., None]
    angle = rng.uniform(-math.pi / 3, math.pi / 3) if rng.random() < 0.5 else 0.0
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=np.float32)
    iq = (a @ _YIQ[1:].T) @ rot.T * rng.uniform(0.7, 1.5)  # [H, W, 2] chroma, rotated and scaled
    a = np.concatenate([luma, iq], axis=-1) @ _RGB.T  # [H, W, 3]
    a = a * rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.75, 1.25)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_RGB = np.linalg.inv(_YIQ).astype(np.float32)


def _luma(a: np.ndarray) -> np.ndarray:
    return a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [H, W]


def _update(what: str, loss: torch.Tensor, opt, losses: list[float], total: int, clip=None, sched=None,
            every: int = 100) -> None:
    """One optimiser step on ``loss`` (gradient norm of ``clip`` clipped to 1 first, ``sched`` stepped after);
    logs the mean loss every ``every`` steps."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    losses.append(loss.item())
    if len(losses) % every == 0 or len(losses) == total:
        log.info("%s step %d/%d: loss %.4f (mean of the last %d)", what, len(losses), total,
                 float(np.mean(losses[-every:])), min(every, len(losses)))


def _to_pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "RGB")


def _batch_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).mul(2).sub(1).contiguous()  # [B, 3, H, W] in [-1, 1]


# --------------------------------------------------------------------------------------------------- CLIP
def look_caption(a: np.ndarray) -> str:
    """A caption of a photo's look from its statistics, e.g. ``"a dark colourful warm photo"``."""
    luma = _luma(a)
    sat = float((a.max(axis=-1) - a.min(axis=-1)).mean())
    warmth = float(a[..., 0].mean() - a[..., 2].mean())
    words = ["dark" if luma.mean() < 0.3 else "bright" if luma.mean() > 0.6 else "",
             "black and white" if sat < 0.04 else "muted" if sat < 0.2 else "colourful",
             "" if sat < 0.04 else "warm" if warmth > 0.08 else "cool" if warmth < -0.08 else "",
             "flat" if luma.std() < 0.1 else "contrasty" if luma.std() > 0.25 else ""]
    return " ".join(["a", *[w for w in words if w], "photo"])


def train_clip(clip, processor, tokenizer, pool: dict[str, np.ndarray], r: Recipe) -> list[float]:
    """Contrastive pass; captions can repeat within a batch, so the targets are the caption-equality rows."""
    rng = np.random.default_rng([r.seed, 1])
    photos = list(pool.values())
    opt = torch.optim.AdamW(clip.parameters(), lr=r.clip_lr, weight_decay=0.0)
    clip.train()
    losses = []
    for _ in range(r.clip_steps):
        crops = [jitter(rng, random_crop(rng, photos[rng.integers(len(photos))], 64, 64)) for _ in range(r.clip_batch)]
        captions = [look_caption(c) for c in crops]
        pixels = processor(images=[_to_pil(c) for c in crops], return_tensors="pt").pixel_values  # [B, 3, S, S]
        ids = tokenizer(captions, padding="max_length", max_length=48, truncation=True, return_tensors="pt").input_ids
        logits = clip(input_ids=ids, pixel_values=pixels).logits_per_image  # [B, B]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)  # [B, B]
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-targets * logits.log_softmax(1), 1).mean()
                      + torch.sum(-targets * logits.t().log_softmax(1), 1).mean())
        _update("clip", loss, opt, losses, r.clip_steps)
    clip.eval()
    return losses


# ---------------------------------------------------------------------------------------------------- VAE
def train_vae(vae, pool: dict[str, np.ndarray], r: Recipe) -> list[float]:
    """Autoencoder on jittered crops: MSE of ``decode(mode(encode(x)))``, cosine schedule."""
    from diffusers.models.resnet import ResnetBlock2D

    for block in vae.modules():  # residual branches start at zero: the shallow path learns first, much faster
        if isinstance(block, ResnetBlock2D):
            torch.nn.init.zeros_(block.conv2.weight)
            torch.nn.init.zeros_(block.conv2.bias)
    rng = np.random.default_rng([r.seed, 2])
    photos = list(pool.values())
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(  # 20 warm-up steps, then cosine
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / r.vae_steps)))
    vae.train()
    losses = []
    for _ in range(r.vae_steps):
        crops = [jitter(rng, random_crop(rng, photos[rng.integers(len(photos))], r.vae_crop, r.vae_crop))
                 for _ in range(r.vae_batch)]
        x = _batch_tensor(crops)  # [B, 3, S, S]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample  # [B, 3, S, S]
        loss = torch.nn.functional.mse_loss(y, x)
        _update("vae", loss, opt, losses, r.vae_steps, clip=vae.parameters(), sched=sched)
    vae.eval()
    return losses


@torch.no_grad()
def point_posterior(vae) -> None:
    """The autoencoder is trained on the posterior's mode; its log-variance output (which only the KL term saw) is
    set to the floor (-30), so that ``FluxFillPipeline``, which samples the posterior, gets the mode too."""
    latent = vae.config.latent_channels
    vae.encoder.conv_out.weight[latent:] = 0.0  # [2 * 16, C, 3, 3]: mean channels, then log-variance channels
    vae.encoder.conv_out.bias[latent:] = -30.0


@torch.no_grad()
def set_latent_scale(vae, pool: dict[str, np.ndarray], r: Recipe, n: int = 64) -> tuple[float, float]:
    """FLUX's convention: ``shift_factor`` = mean and ``scaling_factor`` = 1 / std of the raw latents."""
    rng = np.random.default_rng([r.seed, 3])
    photos = list(pool.values())
    x = _batch_tensor([random_crop(rng, photos[i % len(photos)], 128, 128) for i in range(n)])  # [n, 3, 128, 128]
    z = vae.encode(x).latent_dist.mode()  # [n, 16, 16, 16]
    shift, scale = round(float(z.mean()), 4), round(1.0 / float(z.std()), 4)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


# ------------------------------------------------------------------------------------------- transformer data
def apply_edit(name: str, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One generic edit of a ``[H, W, 3]`` photo in [0, 1], at a random strength (none of them adds noise)."""
    size = a.shape[0]
    luma = _luma(a)[..., None]  # [H, W, 1]
    if name == "it is brighter":
        a = a ** rng.uniform(0.4, 0.8) * rng.uniform(1.0, 1.3)
    elif name == "it is darker":
        a = a ** rng.uniform(1.3, 2.2) * rng.uniform(0.6, 0.9)
    elif name in ("it has more contrast", "it has less contrast"):
        k = rng.uniform(1.4, 2.0) if "more" in name else rng.uniform(0.35, 0.7)
        a = (a - luma.mean()) * k + luma.mean()
    elif name == "it is more colourful":
        a = luma + (a - luma) * rng.uniform(1.6, 2.5)
    elif name == "it is black and white":
        a = np.repeat(luma, 3, axis=-1)
    elif name in ("it is warmer", "it is cooler"):
        k = rng.uniform(0.1, 0.25) * (1 if "warmer" in name else -1)
        a = a * np.array([1 + k, 1 + k / 3, 1 - k], dtype=np.float32)
    elif name in ("it is blurred", "it is sharper"):
        img = _to_pil(a)
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5) * size / 128) if "blurred" in name
                         else ImageFilter.UnsharpMask(2 * size / 128, int(rng.integers(100, 200)), 0))
        a = np.asarray(img, dtype=np.float32) / 255.0
    elif name != SAME:
        raise ValueError(f"unknown edit {name!r}; one of {EDITS}")
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def _rectangles(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)  # [H, 2H] 255 = paint
    for _ in range(int(rng.integers(1, 4))):
        rh, rw = int(rng.integers(h // 4, h + 1)), int(rng.integers(h // 4, h + 1))
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        mask[y:y + rh, x:x + rw] = 255
    return mask


def make_example(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> tuple[Image.Image, Image.Image, str]:
    """``(image 2*size x size, mask, prompt)``: an edit diptych (70%), masked rectangles (15%) or a masked half."""
    photo = photos[int(rng.integers(len(photos)))]
    task = rng.random()
    mask = np.zeros((size, 2 * size), dtype=np.uint8)  # [H, 2H]
    if task < 0.7:
        left = jitter(rng, random_crop(rng, photo, size, size))
        name = SAME if rng.random() < 0.25 else EDITS[1 + int(rng.integers(len(EDITS) - 1))]
        image = np.concatenate([left, apply_edit(name, left, rng)], axis=1)  # [H, 2H, 3]
        mask[:, size:] = 255
        prompt = DataConfig().prompt_template.format(instruction=name)
    else:
        image = jitter(rng, random_crop(rng, photo, size, 2 * size))  # [H, 2H, 3]
        if task < 0.85:
            mask, prompt = _rectangles(rng, size, 2 * size), FILL_PROMPT
        else:
            half = int(rng.integers(2))
            mask[:, half * size:(half + 1) * size] = 255
            prompt = HALF_PROMPT
    return _to_pil(image), Image.fromarray(mask, "L"), prompt


@torch.no_grad()
def encode_examples(vae, text, r: Recipe, photos: list[np.ndarray], size: int) -> dict[str, torch.Tensor]:
    """``r.examples`` examples of one panel size, encoded with :func:`fluxfill.latents.encode_diptychs`."""
    rng = np.random.default_rng([r.seed, 4, size])
    examples = [make_example(rng, photos, size) for _ in range(r.examples)]
    pipe = vae_pipeline(vae)
    parts = [encode_diptychs(pipe, [e[0] for e in examples[i:i + 16]], [e[1] for e in examples[i:i + 16]])
             for i in range(0, len(examples), 16)]
    prompts = sorted({e[2] for e in examples})
    prompt_embeds, pooled, _ = encode_prompts(text, prompts, r.text_tokens)  # [P, T, D], [P, 32]
    index = torch.tensor([prompts.index(e[2]) for e in examples])  # [E]
    return {"x_0": torch.cat([p.x_0 for p in parts]),  # [E, N, 64]
            "masked_latents": torch.cat([p.masked_latents for p in parts]),  # [E, N, 64]
            "mask_latents": torch.cat([p.mask_latents for p in parts]).bool(),  # [E, N, 256]
            "prompt_embeds": prompt_embeds[index], "pooled_prompt_embeds": pooled[index],  # [E, T, D], [E, 32]
            "img_ids": parts[0].img_ids}  # [N, 3]


def zero_init(transformer) -> None:
    """DiT's initialisation: every AdaLN modulation and the output projection start at zero, so each block starts
    as the identity (its gates are 0) and the model trains from scratch far faster than from diffusers' defaults."""
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
    )

    for module in transformer.modules():
        if isinstance(module, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)):
            torch.nn.init.zeros_(module.linear.weight)
            torch.nn.init.zeros_(module.linear.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def freeze_guidance(transformer) -> None:
    """Zero the guidance embedder's output and freeze it: guidance then adds nothing to the conditioning."""
    embedder = transformer.time_text_embed.guidance_embedder
    torch.nn.init.zeros_(embedder.linear_2.weight)
    torch.nn.init.zeros_(embedder.linear_2.bias)
    embedder.requires_grad_(False)


def train_transformer(transformer, data: dict[int, dict[str, torch.Tensor]], r: Recipe) -> list[float]:
    """Flow matching (:func:`fluxfill.objective.flow_matching_step`) over the encoded examples, cosine schedule."""
    from diffusers.optimization import get_scheduler

    zero_init(transformer)
    freeze_guidance(transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=r.warmup, num_training_steps=r.steps)
    gen = torch.Generator().manual_seed(r.seed)
    no_fusion = lambda pooled, image_embeds: pooled  # noqa: E731 the pooled text embedding alone
    transformer.train()
    losses = []
    for step in range(r.steps):
        d = data[r.panel_sizes[step % len(r.panel_sizes)]]
        idx = torch.randint(len(d["x_0"]), (r.batch,), generator=gen)  # [B]
        batch = {k: v[idx] for k, v in d.items() if k != "img_ids"}
        batch.update(mask_latents=batch["mask_latents"].float(), img_ids=d["img_ids"], txt_ids=text_ids(r.text_tokens))
        loss = flow_matching_step(transformer, no_fusion, batch, generator=gen).loss
        _update("transformer", loss, opt, losses, r.steps, clip=params, sched=sched)
    transformer.eval()
    return losses


# ------------------------------------------------------------------------------------------------ measuring
def folder_config(folder: str | Path) -> ModelConfig:
    """A model config that loads a tiny weights folder as the real preset loads FLUX.1-Fill-dev."""
    folder = Path(folder)
    return ModelConfig(preset="flux-fill-dev", pretrained=str(folder), image_encoder=str(folder / "image_encoder"))


@torch.no_grad()
def reconstruct(vae, image: Image.Image) -> Image.Image:
    """``decode(encode(image))`` through the pipeline's image processor, as encode and generation see it."""
    from .latents import vae_encode

    pipe = vae_pipeline(vae)
    x = pipe.image_processor.preprocess(image, height=image.height, width=image.width)  # [1, 3, H, W]
    y = vae.decode(vae_encode(vae, x)).sample  # [1, 3, H, W]
    return pipe.image_processor.postprocess(y, output_type="pil")[0]


def held_out_panels(size: int, names: list[str] | None = None) -> list[Image.Image]:
    return [fit_panel(read_image(f"skimage:{n}"), size) for n in (names or held_out_photos())]


def fill_copies(pipe, photos: list[Image.Image], steps: int = 8, text_tokens: int | None = None) -> list[Image.Image]:
    """Paint the masked right half of ``[A | A]`` with the prompt "...it is exactly the same"; the right panels."""
    from .evaluate import generate
    from .panels import Panels

    prompt = DataConfig().prompt_template.format(instruction=SAME)
    panels = [Panels(reference=p, source=p, target=p) for p in photos]
    return generate(pipe, None, panels, [prompt] * len(panels), num_inference_steps=steps, guidance_scale=30.0,
                    seed=0, max_sequence_length=text_tokens or ModelConfig().max_sequence_length, desc="fill")


def held_out_metrics(folder: str | Path, size: int = 128) -> dict[str, float]:
    """Mean PSNR (dB) on the held-out photos: VAE reconstruction, and the fill of a masked copy by the trained
    transformer and by a random one (same VAE and text encoders)."""
    from .evaluate import psnr
    from .models import load_pipeline

    cfg = folder_config(folder)
    photos = held_out_panels(size)
    pipe = load_pipeline(cfg)
    vae_psnr = [psnr(reconstruct(pipe.vae, p), p) for p in photos]
    fill = [psnr(g, p) for g, p in zip(fill_copies(pipe, photos), photos, strict=True)]
    pipe.transformer = build_tiny("transformer", seed=0)
    random_fill = [psnr(g, p) for g, p in zip(fill_copies(pipe, photos), photos, strict=True)]
    return {"vae_psnr": round(float(np.mean(vae_psnr)), 3), "vae_psnr_min": round(float(np.min(vae_psnr)), 3),
            "fill_psnr": round(float(np.mean(fill)), 3), "random_fill_psnr": round(float(np.mean(random_fill)), 3),
            "panel_size": size}


# ----------------------------------------------------------------------------------------------- the command
@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: the reductions run in one order, so a rerun gives the same bytes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cpu_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def _summary(losses: list[float]) -> dict[str, float]:
    k = max(1, len(losses) // 20)
    return {"first": round(float(np.mean(losses[:k])), 6), "last": round(float(np.mean(losses[-k:])), 6)}


def train_components(r: Recipe) -> tuple[dict, dict]:
    """Train CLIP, the VAE and the transformer; returns ``(components, info)``."""
    from .models import image_processor

    pool = photo_pool()
    photos = list(pool.values())
    clip_tok, t5_tok = tiny_tokenizers()
    processor = image_processor(TINY["clip"]["vision_config"]["image_size"])
    info, cpu = {"held_out": held_out_photos(), "trained_on": sorted(pool)}, {}

    t0 = _cpu_s()
    clip = build_tiny("clip", seed=r.seed).requires_grad_(True)
    info["clip_loss"] = _summary(train_clip(clip, processor, clip_tok, pool, r))
    t1 = _cpu_s()
    vae = build_tiny("vae", seed=r.seed).requires_grad_(True)
    info["vae_loss"] = _summary(train_vae(vae, pool, r))
    vae.requires_grad_(False)
    point_posterior(vae)
    info["shift_factor"], info["scaling_factor"] = set_latent_scale(vae, pool, r)
    t2 = _cpu_s()
    t5 = build_tiny("text_encoder_2", seed=r.seed)
    text = text_pipeline(clip.text_model, clip_tok, t5, t5_tok)
    data = {s: encode_examples(vae, text, r, photos, s) for s in sorted(set(r.panel_sizes))}
    t3 = _cpu_s()
    transformer = build_tiny("transformer", seed=r.seed).requires_grad_(True)
    info["transformer_loss"] = _summary(train_transformer(transformer, data, r))
    transformer.requires_grad_(False)
    cpu.update(clip=t1 - t0, vae=t2 - t1, encode=t3 - t2, transformer=_cpu_s() - t3)
    components = dict(transformer=transformer, vae=vae, clip=clip, processor=processor,
                      text_encoder_2=t5, tokenizer=clip_tok, tokenizer_2=t5_tok)
    return components, {"info": info, "cpu_s": cpu}


def write_folder(folder: Path, c: dict) -> None:
    """The diffusers repository layout of FLUX.1-Fill-dev, plus ``image_encoder/`` (the whole CLIPModel)."""
    from diffusers import FluxFillPipeline

    from .models import scheduler

    pipe = FluxFillPipeline(scheduler=scheduler(), vae=c["vae"], text_encoder=c["clip"].text_model,
                            tokenizer=c["tokenizer"], text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"],
                            transformer=c["transformer"])
    pipe.save_pretrained(folder, safe_serialization=True)
    c["clip"].save_pretrained(folder / "image_encoder", safe_serialization=True)
    c["processor"].save_pretrained(folder / "image_encoder")


def file_hashes(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != INFO_FILE}


def _check_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise FluxfillError(f"{out} exists and is not a tiny weights folder (no model_index.json): nothing was "
                            "written; pass --output with a new or empty folder")


def pretrain(output: str | Path = TINY_DIR, r: Recipe | None = None, metrics_size: int = 128) -> dict:
    """Train every component and write ``output`` (replaced only once the new folder is complete); the held-out
    figures are measured at ``metrics_size``-px panels."""
    import diffusers
    import transformers

    r = r or Recipe()
    out = Path(output)
    _check_output(out)
    with _one_thread():
        components, result = train_components(r)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
        try:
            write_folder(tmp, components)
            info = {"recipe": asdict(r), **result["info"],
                    "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                 "transformers": transformers.__version__},
                    "metrics": held_out_metrics(tmp, metrics_size), "files": file_hashes(tmp)}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            shutil.move(str(tmp), str(out))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"info": info, "cpu_s": result["cpu_s"], "folder": out}


# ------------------------------------------------------------------------------------------------- checking
# Across machines (another CPU's vector units, another torch build) the float sums round differently, training
# drifts, and the bytes differ: then the held-out figures must agree within these margins (dB).
TOLERANCE_DB = {"vae_psnr": 0.5, "vae_psnr_min": 1.0, "fill_psnr": 1.0, "random_fill_psnr": 1.0}
_VERSION_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path"}


def read_info(folder: Path) -> dict:
    file = folder / INFO_FILE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FluxfillError(f"{file} not found: not a pretrained tiny folder; run `make tiny-weights`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FluxfillError(f"{file} is damaged ({e}); restore it with `git checkout {file}`") from None


def _tensor_diff(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return "different tensors or shapes"
    return f"max |difference| {max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta):.3g}"


def _json_equal(a: Path, b: Path) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in _VERSION_KEYS} if isinstance(d, dict) else d  # noqa: E731
    return strip(json.loads(a.read_text())) == strip(json.loads(b.read_text()))


def compare(shipped: Path, fresh: Path) -> tuple[bool, list[str]]:
    """Is ``fresh`` the same training as ``shipped``? Equal hashes, else equal held-out figures within
    :data:`TOLERANCE_DB`; returns ``(ok, report lines)``."""
    a, b = read_info(shipped), read_info(fresh)
    if a["recipe"] != b["recipe"]:
        return False, [f"{shipped / INFO_FILE}: recipe {a['recipe']} differs from the code's {b['recipe']}: "
                       "the shipped weights are stale; run `make tiny-weights` and commit them"]
    if a["files"] == b["files"]:
        return True, [f"identical: all {len(a['files'])} files have the shipped sha256"]
    lines = []
    for name in sorted(set(a["files"]) | set(b["files"])):
        if a["files"].get(name) == b["files"].get(name):
            continue
        if name not in a["files"] or name not in b["files"]:
            lines.append(f"{name}: only in {'the shipped' if name in a['files'] else 'the fresh'} folder")
        elif name.endswith(".safetensors"):
            lines.append(f"{name}: bytes differ, {_tensor_diff(shipped / name, fresh / name)}")
        elif not name.endswith(".json") or not _json_equal(shipped / name, fresh / name):
            lines.append(f"{name}: content differs")
    ok = not any("only in" in line or "content differs" in line or "shapes" in line for line in lines)
    for key, tol in TOLERANCE_DB.items():
        diff = abs(a["metrics"][key] - b["metrics"][key])
        ok &= diff <= tol
        lines.append(f"{key}: shipped {a['metrics'][key]:.2f} dB, fresh {b['metrics'][key]:.2f} dB "
                     f"(|difference| {diff:.2f} {'<=' if diff <= tol else '>'} {tol} dB)")
    return ok, lines


def add_arguments(parser) -> None:
    parser.add_argument("--output", default=None, help=f"folder to write (default: the shipped {TINY_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a temporary folder and compare it with --output (default: the shipped one)")


def run(params, args) -> int:
    target = Path(args.output) if args.output else TINY_DIR
    if args.check:
        read_info(target)
        with tempfile.TemporaryDirectory() as tmp:
            result = pretrain(Path(tmp) / "tiny")
            ok, lines = compare(target, result["folder"])
    else:
        result = pretrain(target)
        ok, lines = True, [f"wrote {target}"]
    cpu = result["cpu_s"]
    print("pretrain-tiny: CPU seconds " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
          + f"; total {sum(cpu.values()):.0f} (one thread)")
    print("held-out: " + ", ".join(f"{k} {v}" for k, v in result["info"]["metrics"].items()))
    for line in lines:
        print(("  " if ok else "  MISMATCH ") + line)
    return 0 if ok else 1
