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
        run that trained these weights (its reference is in .fluxfill/runs/; without one, the run tagged with the
        weights' DVC hash), or to a new run when none is known.

Examples:
  fluxfill evaluate
  fluxfill evaluate --set eval.max_samples=8 --set eval.num_inference_steps=28 --device cuda
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from . import tracking
from .artifacts import EVAL_METRICS, EVAL_SAMPLES, EVAL_TABLE, FUSION_FILE, LORA_DIR
from .config import FluxfillError, Params
from .models import best_device, load_pipeline, resolve_dtype
from .safety import check_outputs
from .sampling import check_lora, fusion_encoders, generate, load_fusion, load_lora, sample_grid, val_samples

log = logging.getLogger(__name__)

PSNR_CAP = 100.0  # dB: the PSNR of identical images (infinite) is reported as this
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


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate(params: Params, device: str | None = None) -> dict:
    """Run the whole evaluation stage; returns ``{"metrics": ..., "per_sample": DataFrame, "grids": [...], "run_id"}``."""
    models = Path(params.train.output)
    check_lora(models / LORA_DIR, params.train.lora)  # before any generation
    fusion = load_fusion(models / FUSION_FILE, params.fusion)
    run_ref = tracking.training_run(models, params.tracking)  # before the long part: a damaged reference fails now
    val, panels = val_samples(params)
    prompts = list(val["prompt"])

    dev = best_device(device or "auto")
    dtype = resolve_dtype(params.model.dtype, dev)
    pipe = load_pipeline(params.model, dev, dtype)
    fusion = fusion.to(dev)
    e = params.eval
    common = dict(num_inference_steps=e.num_inference_steps, guidance_scale=e.guidance_scale, seed=e.seed,
                  max_sequence_length=params.model.max_sequence_length, batch_size=e.batch_size)
    # base first, then the LoRA goes into the same transformer: one pipeline, no unloading
    base = generate(pipe, None, panels, prompts, desc="evaluate base", **common)
    load_lora(pipe, models / LORA_DIR, params.train.lora)
    generated = generate(pipe, fusion, panels, prompts, desc="evaluate trained",
                         **fusion_encoders(params.model, fusion, dev, dtype), **common)

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
