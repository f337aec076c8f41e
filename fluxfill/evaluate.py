"""Generate the validation panels with the trained LoRA + fusion weight and score them against the targets.

For each validation sample of data/prepared (manifest split "val", the first eval.max_samples of them),
FLUX.1-Fill paints the target half of the enhanced diptych [source | target] (the same diptych and mask as
training), conditioned on the prompt and the fused pooled embedding of prompt and reference; the right panel
of the result is the answer. Sample k uses the seed eval.seed + k, so results do not depend on batching.

Scores, averaged over the samples (PSNR in dB on RGB uint8, capped at 100 dB since identical images give
infinity; SSIM on RGB uint8, 1 = identical):

  psnr, ssim                      the trained model: LoRA + fusion weight
  identity_psnr, identity_ssim    the source panel as the answer: does the model beat doing nothing?
  base_psnr, base_ssim            the same pipeline without LoRA and fusion (pooled text only): does training help?

LPIPS is added (lpips, identity_lpips, base_lpips) only when torchvision and its pretrained AlexNet weights
are already on this machine; otherwise a note says why it was skipped. Nothing is downloaded.

Reads   models/lora/pytorch_lora_weights.safetensors, models/fusion.safetensors, data/prepared (val split)
Writes  metrics/eval.json, eval/per_sample.csv, eval/samples/grid_000.png ... (one grid per batch of
        eval.batch_size: reference | source | generated | target), and logs the scores and grids to the MLflow
        run that trained these weights (its reference is in .fluxfill/runs/), or to a new run when none is known.

Examples:
  fluxfill evaluate
  fluxfill evaluate --set eval.max_samples=8 --set eval.num_inference_steps=28 --device cuda
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm.auto import tqdm

from . import tracking
from .artifacts import (
    EVAL_METRICS,
    EVAL_SAMPLES,
    EVAL_TABLE,
    LORA_DIR,
    LORA_WEIGHTS,
    MANIFEST,
    damaged,
    fusion_file,
    reading,
)
from .config import FluxfillError, FusionConfig, LoraConfig, Params
from .encode import load_triptychs, read_manifest
from .fusion import SemanticFusion
from .latents import encode_prompts, encode_references
from .models import best_device, load_component, load_pipeline, resolve_dtype
from .objective import fused_pooled
from .panels import Panels
from .safety import check_outputs

log = logging.getLogger(__name__)

PSNR_CAP = 100.0  # dB: the PSNR of identical images (infinite) is reported as this
GRID_LABELS = ("reference", "source", "generated", "target")
SYSTEMS = {"": "generated", "identity_": "source", "base_": "base"}  # metric prefix -> which answer is scored


# ------------------------------------------------------------------------------------------------- metrics
def _pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)  # [H, W, 3]


def psnr(answer, target) -> float:
    """PSNR in dB of two RGB uint8 images (PIL or ``[H, W, 3]`` arrays), capped at :data:`PSNR_CAP`."""
    a, t = _pixels(answer), _pixels(target)
    if np.array_equal(a, t):
        return PSNR_CAP
    return min(PSNR_CAP, float(peak_signal_noise_ratio(t, a, data_range=255)))


def ssim(answer, target) -> float:
    """SSIM of two RGB uint8 images (mean over channels, 7x7 window), 1.0 for identical images."""
    return float(structural_similarity(_pixels(target), _pixels(answer), data_range=255, channel_axis=-1))


def lpips_scorer():
    """``(scorer, None)`` when LPIPS (AlexNet) can run without a download, else ``(None, reason)``."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "torchvision is not installed"
    from torchvision.models import AlexNet_Weights

    weights = Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.DEFAULT.url).name
    if not weights.exists():
        return None, f"the pretrained AlexNet weights are not in {weights}"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()

    def score(answer, target) -> float:
        to_tensor = lambda img: torch.from_numpy(_pixels(img)).permute(2, 0, 1)[None].float() / 255  # noqa: E731 [1, 3, H, W]
        with torch.no_grad():
            return float(metric(to_tensor(answer), to_tensor(target)))

    return score, None


def scores(answer, target, lpips=None) -> dict[str, float]:
    """``{"psnr", "ssim"[, "lpips"]}`` of one answer panel against its target panel."""
    out = {"psnr": psnr(answer, target), "ssim": ssim(answer, target)}
    if lpips is not None:
        out["lpips"] = lpips(answer, target)
    return out


# ------------------------------------------------------------------------------------------------ generation
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
            raise ValueError(f"fusion mode {fusion.mode!r} needs image_encoder and image_processor for the references")
        batch["image_embeds"] = encode_references(image_encoder, image_processor, references)  # [B, E]
    with torch.no_grad():
        return prompt_embeds, fused_pooled(fusion, batch)  # [B, P]


def generate(pipe, fusion: SemanticFusion | None, panels: Sequence[Panels], prompts: Sequence[str], *,
             num_inference_steps: int, guidance_scale: float, seed: int, max_sequence_length: int,
             batch_size: int | None = None, image_encoder=None, image_processor=None,
             desc: str = "generate") -> list[Image.Image]:
    """Paint the target half of each sample's diptych; returns the generated right panels (PIL, ``size`` square).

    Each sample's diptych and mask come from :class:`fluxfill.panels.Panels` (as in training); ``pipe`` is a
    ``FluxFillPipeline`` with text encoders, called with the image, the mask, ``prompt_embeds`` and the fused
    ``pooled_prompt_embeds`` (see :func:`conditioning`). Sample ``k`` of the list draws its noise from a CPU
    ``torch.Generator`` seeded ``seed + k``, so the result does not depend on ``batch_size`` (default: one call).
    """
    if len(panels) != len(prompts):
        raise ValueError(f"{len(panels)} samples but {len(prompts)} prompts: one prompt per sample is needed")
    batch_size = batch_size or max(1, len(panels))
    out: list[Image.Image] = []
    for start in tqdm(range(0, len(panels), batch_size), desc=desc, unit="batch"):
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


# -------------------------------------------------------------------------------------------------- loading
def check_lora(path: Path, lora_cfg: LoraConfig) -> Path:
    """The LoRA file in ``path``; refuses a damaged one, one trained with other ``train.lora`` settings, and one
    whose scale diffusers would get wrong.

    Without peft adapter metadata in the file, diffusers loads ``lora_alpha = rank`` (scale 1), so a LoRA trained
    with ``alpha != rank`` would be applied at the wrong strength.
    """
    from safetensors import safe_open

    file = path / LORA_WEIGHTS
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


def load_fusion(path: Path, cfg: FusionConfig) -> SemanticFusion:
    """The trained fusion module; a damaged file, or one trained with another ``fusion.mode``, is refused."""
    if not path.exists():
        raise FluxfillError(f"{path} not found: run `fluxfill train` (or `dvc repro train`) first")
    with reading(path, "train", "fusion file"):
        fusion = SemanticFusion.load(path)
    if fusion.mode != cfg.mode:
        raise damaged(path, f"a fusion module trained with fusion.mode {fusion.mode!r} (params: {cfg.mode!r})", "train")
    return fusion


def _val_samples(params: Params) -> tuple[pd.DataFrame, list[Panels]]:
    prepared = Path(params.data.output)
    df = read_manifest(prepared)
    val = df[df["split"] == "val"]
    if val.empty:
        raise FluxfillError(f"{prepared / MANIFEST} has no 'val' samples: set data.val_fraction > 0 "
                            "and re-run `fluxfill prepare`")
    if params.eval.max_samples:
        val = val.head(params.eval.max_samples)
    return val.reset_index(drop=True), load_triptychs(prepared, val)


# --------------------------------------------------------------------------------------------------- MLflow
def _log_to_mlflow(params: Params, metrics: dict, grids: list[Image.Image], per_sample: Path,
                   run_ref: dict | None) -> str:
    """Log scores, grids and the per-sample table to the training run (``run_ref``) or a new run; returns its id."""
    import mlflow

    tracking.setup(params.tracking)
    run_id = run_ref["run_id"] if run_ref and tracking.find_run(run_ref["run_id"]) else None
    if run_ref and run_id is None:
        log.warning("training run %s is not at %s (it was logged to %s): logging to a new run",
                    run_ref["run_id"], mlflow.get_tracking_uri(), run_ref.get("tracking_uri"))
    with tracking.start_run(params, run_id=run_id) as run:
        mlflow.set_tags({f"eval.{k}": str(v) for k, v in params.eval.model_dump().items()})
        mlflow.log_metrics(metrics)
        for i, grid in enumerate(grids):
            tracking.log_image(grid, f"grid_{i:03d}", folder="eval")
        mlflow.log_artifact(str(per_sample), artifact_path="eval")
        return run.info.run_id


def training_sample_grid(params: Params, transformer, fusion: SemanticFusion, max_rows: int = 4) -> Image.Image | None:
    """A grid of validation samples generated with the transformer being trained (its LoRA active) and fusion."""
    try:
        val, panels = _val_samples(params)
    except FluxfillError:
        return None
    val, panels = val.head(max_rows), panels[:max_rows]
    dev = transformer.device
    dtype = next(p.dtype for p in transformer.parameters() if not p.requires_grad)  # the frozen base's, not LoRA's
    pipe = load_pipeline(params.model, dev, dtype, components={"transformer": transformer})
    extra = {}
    if fusion.enabled:
        extra = {"image_encoder": load_component(params.model, "image_encoder", dev, dtype),
                 "image_processor": load_component(params.model, "image_processor", dev)}
    was_training = transformer.training
    transformer.eval()
    try:
        generated = generate(pipe, fusion, panels, list(val["prompt"]), num_inference_steps=params.eval.num_inference_steps,
                             guidance_scale=params.eval.guidance_scale, seed=params.eval.seed,
                             max_sequence_length=params.model.max_sequence_length,
                             batch_size=params.eval.batch_size, desc="sample grid", **extra)
    finally:
        transformer.train(was_training)
    return sample_grid([(p.reference, p.source, g, p.target) for p, g in zip(panels, generated, strict=True)])


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(params: Params, device: str | None = None) -> dict:
    """Run the whole evaluation stage; returns ``{"metrics": ..., "per_sample": DataFrame, "grids": [...], "run_id"}``."""
    models = Path(params.train.output)
    lora_file = check_lora(models / LORA_DIR, params.train.lora)
    fusion = load_fusion(fusion_file(models), params.fusion)
    run_ref = tracking.read_run_ref(models)  # before the long part: a damaged reference fails now
    val, panels = _val_samples(params)
    prompts = list(val["prompt"])

    dev = best_device(device or "auto")
    dtype = resolve_dtype(params.model.dtype, dev)
    pipe = load_pipeline(params.model, dev, dtype)
    fusion = fusion.to(dev)
    image_encoder = image_processor = None
    if fusion.enabled:
        image_encoder = load_component(params.model, "image_encoder", dev, dtype)
        image_processor = load_component(params.model, "image_processor", dev)
    e = params.eval
    common = dict(num_inference_steps=e.num_inference_steps, guidance_scale=e.guidance_scale, seed=e.seed,
                  max_sequence_length=params.model.max_sequence_length, batch_size=e.batch_size)
    # base first, then the LoRA goes into the same transformer: one pipeline, no unloading
    base = generate(pipe, None, panels, prompts, desc="evaluate base", **common)
    with reading(lora_file, "train", "LoRA file"):
        pipe.load_lora_weights(str(lora_file.parent))
    generated = generate(pipe, fusion, panels, prompts, image_encoder=image_encoder,
                         image_processor=image_processor, desc="evaluate trained", **common)

    lpips, why = lpips_scorer()
    if lpips is None:
        log.info("LPIPS skipped: %s; scoring PSNR and SSIM only", why)
    rows = []
    for sid, p, gen, b in zip(val["id"], panels, generated, base, strict=True):
        answers = {"generated": gen, "source": p.source, "base": b}
        row = {"id": sid}
        for prefix, which in SYSTEMS.items():
            row.update({prefix + k: v for k, v in scores(answers[which], p.target, lpips).items()})
        rows.append(row)
    per_sample = pd.DataFrame(rows)
    metrics = {k: round(float(per_sample[k].mean()), 6) for k in per_sample.columns if k != "id"}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise FluxfillError(f"non-finite scores {bad}: the generated panels are broken (check model.dtype)")
    metrics["num_samples"] = len(per_sample)

    out = Path(e.output)
    samples = out / EVAL_SAMPLES
    samples.mkdir(parents=True, exist_ok=True)
    for stale in samples.glob("grid_*.png"):
        stale.unlink()
    grids = []
    for i, start in enumerate(range(0, len(panels), e.batch_size)):
        chunk = range(start, min(start + e.batch_size, len(panels)))
        grid = sample_grid([(panels[k].reference, panels[k].source, generated[k], panels[k].target) for k in chunk])
        grid.save(samples / f"grid_{i:03d}.png")
        grids.append(grid)
    per_sample_file = out / EVAL_TABLE
    per_sample.to_csv(per_sample_file, index=False, float_format="%.6f")
    metrics_file = Path(EVAL_METRICS)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")

    run_id = _log_to_mlflow(params, metrics, grids, per_sample_file, run_ref)
    return {"metrics": metrics, "per_sample": per_sample, "grids": grids, "run_id": run_id}


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")


def run(params: Params, args) -> int:
    check_outputs(params, "evaluate")
    result = evaluate(params, device=args.device)
    m = result["metrics"]
    print(f"evaluate: {m['num_samples']} val samples | trained psnr {m['psnr']:.2f} dB ssim {m['ssim']:.4f} | "
          f"identity psnr {m['identity_psnr']:.2f} ssim {m['identity_ssim']:.4f} | "
          f"base psnr {m['base_psnr']:.2f} ssim {m['base_ssim']:.4f}")
    print(f"  -> {EVAL_METRICS}, {Path(params.eval.output) / EVAL_SAMPLES}, MLflow run {result['run_id']}")
    return 0
