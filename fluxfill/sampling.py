"""Generation with the trained LoRA + fusion weight: pipeline assembly, conditioning and sample grids.

Training (its sample grids), the evaluate stage and ``fluxfill edit`` all generate through this module, so the
diptych, the mask, the fused pooled embedding and the per-sample seeds are the same everywhere:

- :func:`load_lora` puts a trained LoRA into a ``FluxFillPipeline`` (refusing a file diffusers would scale wrong);
- :func:`fusion_encoders` loads the CLIP vision tower the fusion module needs for the references;
- :func:`conditioning` is the prompt embedding and the fused pooled embedding, as in training;
- :func:`generate` paints the target half of each sample's enhanced diptych ``[source | target]``;
- :func:`sample_grid` lays out ``reference | source | generated | target`` rows.

A trained model folder (``models/``, or a registered MLflow model version) holds::

    lora/pytorch_lora_weights.safetensors   the LoRA, diffusers layout with peft adapter metadata
    fusion.safetensors                      the fusion module (θ and W; mode and α in its metadata)
    fluxfill_model.json                     the ModelSpec: preset, base model ids, panel size, prompt, eval settings
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .artifacts import LORA_WEIGHTS, MANIFEST, damaged, reading
from .config import FluxfillError, FusionConfig, LoraConfig, ModelConfig, Params
from .encode import load_triptychs, read_manifest
from .fusion import SemanticFusion
from .latents import encode_prompts, encode_references
from .models import load_component, load_pipeline
from .objective import fused_pooled
from .panels import Panels

log = logging.getLogger(__name__)

GRID_LABELS = ("reference", "source", "generated", "target")


# -------------------------------------------------------------------------------------------- assembly
def check_lora(path: Path, lora_cfg: LoraConfig) -> Path:
    """The LoRA file in ``path``; refuses a damaged one, one trained with other ``train.lora`` settings, and one
    whose scale diffusers would get wrong.

    Without peft adapter metadata in the file, diffusers loads ``lora_alpha = rank`` (scale 1), so a LoRA trained
    with ``alpha != rank`` would be applied at the wrong strength.
    """
    import json

    from safetensors import safe_open

    file = Path(path) / LORA_WEIGHTS
    if not file.exists():
        raise FluxfillError(f"{file} not found: run `fluxfill train` (or `dvc repro train`) first")
    with reading(file, "train", "LoRA file"):
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        meta = None if raw is None else json.loads(raw)
    if meta is not None:
        saved = {"rank": meta.get("transformer.r"), "alpha": meta.get("transformer.lora_alpha"),
                 "target_modules": sorted(meta.get("transformer.target_modules") or [])}
        wanted = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "target_modules": sorted(lora_cfg.target_modules)}
        if diff := [f"train.lora.{k} {saved[k]!r} (params: {wanted[k]!r})" for k in saved if saved[k] != wanted[k]]:
            raise damaged(file, "a LoRA trained with other settings: " + ", ".join(diff), "train")
    if meta is None and lora_cfg.alpha != lora_cfg.rank:
        raise FluxfillError(
            f"{file} has no LoRA adapter metadata and train.lora.alpha ({lora_cfg.alpha}) != rank ({lora_cfg.rank}): "
            "diffusers would load it at scale 1 instead of alpha/rank. Re-save it with "
            "save_lora_weights(..., transformer_lora_adapter_metadata=<peft LoraConfig>.to_dict())"
        )
    return file


def _no_text_encoder_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


def load_lora(pipe, lora_dir: Path, lora_cfg: LoraConfig) -> None:
    """``pipe.load_lora_weights`` of the checked LoRA file in ``lora_dir`` (see :func:`check_lora`).

    The LoRA adapts the transformer only: diffusers' note that it has no text-encoder keys is dropped."""
    file = check_lora(lora_dir, lora_cfg)
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    lora_log.addFilter(_no_text_encoder_note)
    try:
        with reading(file, "train", "LoRA file"):
            pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    finally:
        lora_log.removeFilter(_no_text_encoder_note)


def load_fusion(path: Path, cfg: FusionConfig | None = None) -> SemanticFusion:
    """The trained fusion module; a damaged file, or one trained with another ``fusion.mode``, is refused."""
    if not path.exists():
        raise FluxfillError(f"{path} not found: run `fluxfill train` (or `dvc repro train`) first")
    with reading(path, "train", "fusion file"):
        fusion = SemanticFusion.load(path)
    if cfg is not None and fusion.mode != cfg.mode:
        raise damaged(path, f"a fusion module trained with fusion.mode {fusion.mode!r} (params: {cfg.mode!r})", "train")
    return fusion


def fusion_encoders(model_cfg: ModelConfig, fusion: SemanticFusion | None, device, dtype) -> dict:
    """``{"image_encoder", "image_processor"}`` for a fusion module that reads references; empty otherwise."""
    if fusion is None or not fusion.enabled:
        return {}
    return {"image_encoder": load_component(model_cfg, "image_encoder", device, dtype),
            "image_processor": load_component(model_cfg, "image_processor", device)}


# ---------------------------------------------------------------------------------------- conditioning
def conditioning(text_pipe, fusion: SemanticFusion | None, prompts: list[str], references: list[Image.Image],
                 max_sequence_length: int, image_encoder=None, image_processor=None):
    """``(prompt_embeds [B, T, D], pooled [B, P])``: the conditioning the transformer sees, as in training.

    ``pooled`` is :func:`fluxfill.objective.fused_pooled` of the pooled text embedding and the reference's image
    embedding (the same call training makes on cached tensors); with ``fusion=None`` it is the pooled text
    embedding alone (the base model). ``text_pipe`` is any ``FluxFillPipeline`` holding the text encoders.
    """
    prompt_embeds, pooled_text, _ = encode_prompts(text_pipe, prompts, max_sequence_length)  # [B, T, D], [B, P]
    if fusion is None:
        return prompt_embeds, pooled_text
    batch = {"pooled_prompt_embeds": pooled_text}
    if fusion.enabled:
        if image_encoder is None or image_processor is None:
            raise ValueError("fusion mode 'pooled' needs image_encoder and image_processor for the references")
        batch["image_embeds"] = encode_references(image_encoder, image_processor, references)  # [B, E]
    with torch.no_grad():
        return prompt_embeds, fused_pooled(fusion, batch)  # [B, P]


def generate(pipe, fusion: SemanticFusion | None, panels: Sequence[Panels], prompts: Sequence[str], *,
             num_inference_steps: int, guidance_scale: float, seed: int, max_sequence_length: int,
             batch_size: int | None = None, image_encoder=None, image_processor=None,
             desc: str = "generate", progress: bool = True) -> list[Image.Image]:
    """Paint the target half of each sample's diptych; returns the generated right panels (PIL, ``size`` square).

    Each sample's diptych and mask come from :class:`fluxfill.panels.Panels` (as in training); ``pipe`` is a
    ``FluxFillPipeline`` with text encoders, called with the image, the mask, ``prompt_embeds`` and the fused
    ``pooled_prompt_embeds`` (see :func:`conditioning`). Sample ``k`` of the list draws its noise from a CPU
    ``torch.Generator`` seeded ``seed + k``, so the result does not depend on ``batch_size`` (default: one call).
    The pipeline runs at strength 1: the target half's pixels are masked out, only the source half is seen.
    """
    if len(panels) != len(prompts):
        raise ValueError(f"{len(panels)} samples but {len(prompts)} prompts: one prompt per sample is needed")
    batch_size = batch_size or max(1, len(panels))
    out: list[Image.Image] = []
    for start in tqdm(range(0, len(panels), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = panels[start:start + batch_size]
        size = chunk[0].size
        prompt_embeds, pooled = conditioning(pipe, fusion, list(prompts[start:start + batch_size]),
                                             [p.reference for p in chunk], max_sequence_length,
                                             image_encoder, image_processor)
        dtype = pipe.vae.dtype  # the pipeline runs in prompt_embeds' dtype: it must be its VAE's
        # a transformer prepared by accelerate for mixed precision returns fp32: autocast keeps the VAE fed
        half = dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(pipe.vae.device.type, dtype=dtype, enabled=half):
            images = pipe(
                image=[p.diptych for p in chunk],
                mask_image=[p.mask for p in chunk],
                prompt_embeds=prompt_embeds.to(dtype),
                pooled_prompt_embeds=pooled.to(dtype),
                height=size,
                width=2 * size,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(chunk))],
                max_sequence_length=max_sequence_length,
                output_type="pil",
            ).images
        out += [img.crop((size, 0, 2 * size, size)) for img in images]  # the painted target half
    return out


# ----------------------------------------------------------------------------------------------- grids
def sample_grid(rows: Sequence[tuple[Image.Image, Image.Image, Image.Image, Image.Image]]) -> Image.Image:
    """Rows of ``(reference, source, generated, target)`` panels under a strip of column labels.

    ``4 * size`` wide, ``label height + len(rows) * size`` high; each label is clipped to its column.
    """
    size = rows[0][0].width
    font = ImageFont.load_default(size=max(10, size // 24))
    label_h = font.size + 6
    grid = Image.new("RGB", (4 * size, label_h + len(rows) * size), "white")
    for col, label in enumerate(GRID_LABELS):
        strip = Image.new("RGB", (size, label_h), "white")
        ImageDraw.Draw(strip).text((2, 2), label, fill="black", font=font)
        grid.paste(strip, (col * size, 0))
    for r, row in enumerate(rows):
        if len(row) != 4 or any(p.size != (size, size) for p in row):
            raise ValueError(f"grid row {r}: expected 4 panels of {size}x{size}, got {[p.size for p in row]}")
        for col, panel in enumerate(row):
            grid.paste(panel.convert("RGB"), (col * size, label_h + r * size))
    return grid


def val_samples(params: Params) -> tuple[pd.DataFrame, list[Panels]]:
    """The validation split of data/prepared (the first ``eval.max_samples``): manifest rows and their panels."""
    prepared = Path(params.data.output)
    df = read_manifest(prepared)
    val = df[df["split"] == "val"]
    if val.empty:
        raise FluxfillError(f"{prepared / MANIFEST} has no 'val' samples: set data.val_fraction > 0 "
                            "and re-run `fluxfill prepare`")
    if params.eval.max_samples:
        val = val.head(params.eval.max_samples)
    return val.reset_index(drop=True), load_triptychs(prepared, val)


def training_sample_grid(params: Params, transformer, fusion: SemanticFusion, max_rows: int = 4) -> Image.Image | None:
    """A grid of validation samples generated with the transformer being trained (its LoRA active) and fusion.

    None (with a log line) when data/prepared has no validation sample.
    """
    try:
        val, panels = val_samples(params)
    except FluxfillError as e:
        log.info("no sample grid: %s", e)
        return None
    val, panels = val.head(max_rows), panels[:max_rows]
    dev = transformer.device
    dtype = next(p.dtype for p in transformer.parameters() if not p.requires_grad)  # the frozen base's, not LoRA's
    pipe = load_pipeline(params.model, dev, dtype, components={"transformer": transformer})
    was_training = transformer.training
    transformer.eval()
    try:
        generated = generate(pipe, fusion, panels, list(val["prompt"]), num_inference_steps=params.eval.num_inference_steps,
                             guidance_scale=params.eval.guidance_scale, seed=params.eval.seed,
                             max_sequence_length=params.model.max_sequence_length, batch_size=params.eval.batch_size,
                             desc="sample grid", **fusion_encoders(params.model, fusion, dev, dtype))
    finally:
        transformer.train(was_training)
    return sample_grid([(p.reference, p.source, g, p.target) for p, g in zip(panels, generated, strict=True)])
