"""Evaluation: metrics on known images, the training-identical inference path, LoRA loading, the whole stage."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FluxFillPipeline
from helpers import make_prepared
from peft.utils import get_peft_model_state_dict
from PIL import Image

from fluxfill import tracking
from fluxfill.cli import main
from fluxfill.config import FluxfillError, LoraConfig, validate
from fluxfill.data import dvc_md5
from fluxfill.encode import LatentCache, encode
from fluxfill.evaluate import PSNR_CAP, psnr, ssim
from fluxfill.fusion import SemanticFusion
from fluxfill.latents import encode_prompts
from fluxfill.models import add_lora, load_component, load_pipeline
from fluxfill.objective import flow_matching_step
from fluxfill.panels import panels_from_triptych
from fluxfill.sampling import check_lora, generate, sample_grid

PANEL = 32
MSL = 16  # T5 tokens
LORA = LoraConfig(rank=4, alpha=8)
GEN = dict(num_inference_steps=2, guidance_scale=30.0, seed=7, max_sequence_length=MSL)


def val_panels(root):
    df = pd.read_csv(root / "manifest.csv")
    df = df[df.split == "val"]
    return [panels_from_triptych(Image.open(root / f)) for f in df.file], list(df.prompt)


def lora_transformer(cfg, scale=0.05):
    """A tiny transformer with LoRA adapters whose B matrices are non-zero (a trained-looking LoRA)."""
    transformer = add_lora(load_component(cfg, "transformer"), LORA)
    g = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * scale
    return transformer


def save_lora(transformer, folder, metadata=True):
    meta = transformer.peft_config["default"].to_dict() if metadata else None
    FluxFillPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                       transformer_lora_adapter_metadata=meta)


def fusion_module(init=0.3):
    torch.manual_seed(3)
    return SemanticFusion("learned", 32, 24, init=init)


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_on_known_images():
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert psnr(grey, grey) == PSNR_CAP == 100.0
    assert ssim(Image.fromarray(grey), Image.fromarray(grey)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.round(128 + rng.normal(0, 10, grey.shape)), 0, 255).astype(np.uint8)
    assert psnr(noisy, grey) == pytest.approx(20 * math.log10(255 / 10), abs=0.3)  # 28.13 dB
    assert 0.0 < ssim(noisy, grey) < 0.5
    assert psnr(np.zeros_like(grey), np.full_like(grey, 255)) == pytest.approx(0.0)


def test_sample_grid_layout():
    rng = np.random.default_rng(0)
    rows = [tuple(Image.fromarray(rng.integers(0, 256, (PANEL, PANEL, 3), dtype=np.uint8)) for _ in range(4))
            for _ in range(2)]
    grid = sample_grid(rows)
    label_h = grid.height - 2 * PANEL
    assert grid.width == 4 * PANEL and 10 <= label_h <= 20
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            box = (c * PANEL, label_h + r * PANEL, (c + 1) * PANEL, label_h + (r + 1) * PANEL)
            assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(panel))
    strip = np.asarray(grid.crop((0, 0, 4 * PANEL, label_h)))
    assert strip.min() < 128 and strip.max() == 255  # dark text on white
    with pytest.raises(ValueError, match=r"grid row 0: expected 4 panels of 32x32"):
        sample_grid([rows[0][:3]])


# ------------------------------------------------------------------------------------------------ generation
def test_generate_uses_training_diptych_mask_and_per_sample_seeds(tmp_path, tiny, tiny_cfg, monkeypatch):
    panels, prompts = val_panels(make_prepared(tmp_path / "prepared", 4, PANEL, val=3))
    pipe = load_pipeline(tiny_cfg, components={k: tiny[k] for k in ("transformer", "vae", "text_encoder",
                                                                    "tokenizer", "text_encoder_2", "tokenizer_2")})
    calls = []
    original = FluxFillPipeline.__call__

    def record(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(FluxFillPipeline, "__call__", record)
    one_batch = generate(pipe, None, panels, prompts, batch_size=3, **GEN)
    assert len(calls) == 1
    call = calls[0]
    assert [np.asarray(im).tolist() for im in call["image"]] == [np.asarray(p.diptych).tolist() for p in panels]
    assert all(np.array_equal(np.asarray(m), np.asarray(p.mask)) for m, p in zip(call["mask_image"], panels, strict=True))
    assert (call["height"], call["width"], call["max_sequence_length"]) == (PANEL, 2 * PANEL, MSL)
    assert [g.initial_seed() for g in call["generator"]] == [7, 8, 9]
    assert list(call["prompt_embeds"].shape) == [3, MSL, 32] and list(call["pooled_prompt_embeds"].shape) == [3, 32]
    assert [im.size for im in one_batch] == [(PANEL, PANEL)] * 3

    singles = generate(pipe, None, panels, prompts, batch_size=1, **GEN)
    assert len(calls) == 4
    for a, b in zip(one_batch, singles, strict=True):  # per-sample generators: batching does not change the result
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_inference_pooled_equals_training_pooled(tmp_path, tiny, tiny_cfg):
    """The fused pooled embedding the transformer sees at inference is the one the training step computes."""
    prepared = make_prepared(tmp_path / "prepared", 4, PANEL, val=3)
    params = validate({"data": {"panel_size": PANEL, "output": str(prepared)}, "model": {"max_sequence_length": MSL},
                       "encode": {"output": str(tmp_path / "latents")}})
    encode(params, device="cpu")
    cache = LatentCache(tmp_path / "latents", "val")
    fusion = fusion_module()
    trained = flow_matching_step(tiny["transformer"], fusion, cache.collate([cache[i] for i in range(len(cache))]))

    panels, prompts = val_panels(prepared)
    pipe = load_pipeline(tiny_cfg, components={k: tiny[k] for k in ("transformer", "vae", "text_encoder",
                                                                    "tokenizer", "text_encoder_2", "tokenizer_2")})
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pooled_projections"].clone()), with_kwargs=True)
    try:
        generate(pipe, fusion, panels, prompts, image_encoder=tiny["image_encoder"],
                 image_processor=tiny["image_processor"], **GEN)
    finally:
        hook.remove()
    assert len(seen) == GEN["num_inference_steps"]
    torch.testing.assert_close(seen[0], trained.pooled)
    unfused = encode_prompts(pipe, prompts, MSL)[1]
    assert (seen[0] - unfused).abs().max() > 1e-3  # the reference really entered the conditioning


def test_lora_from_disk_matches_trained_transformer_and_changes_output(tmp_path, tiny, tiny_cfg):
    panels, prompts = val_panels(make_prepared(tmp_path / "prepared", 4, PANEL, val=3))
    panels, prompts = panels[:2], prompts[:2]
    transformer = lora_transformer(tiny_cfg)
    assert transformer.x_embedder.lora_A["default"].in_features == 384  # the Fill-only adapter
    save_lora(transformer, tmp_path / "lora")
    text = {k: tiny[k] for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}

    in_memory = generate(load_pipeline(tiny_cfg, components={**text, "transformer": transformer}), None,
                         panels, prompts, **GEN)
    pipe = load_pipeline(tiny_cfg, components=text)  # a fresh base transformer
    base = generate(pipe, None, panels, prompts, **GEN)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert pipe.transformer.x_embedder.lora_A["default_0"].in_features == 384
    loaded = generate(pipe, None, panels, prompts, **GEN)
    for m, lo, b in zip(in_memory, loaded, base, strict=True):
        m, lo, b = (np.asarray(x, dtype=int) for x in (m, lo, b))
        assert np.abs(m - lo).max() <= 1  # alpha/rank scale and the 384-input x_embedder loaded as trained
        assert np.abs(lo - b).mean() > 5  # and the LoRA changes the picture


def test_lora_without_metadata_and_alpha_not_rank_is_refused(tmp_path, tiny_cfg):
    save_lora(lora_transformer(tiny_cfg), tmp_path / "lora", metadata=False)
    with pytest.raises(FluxfillError, match=r"no LoRA adapter metadata and train.lora.alpha \(8.0\) != rank \(4\)"):
        check_lora(tmp_path / "lora", LORA)
    assert check_lora(tmp_path / "lora", LoraConfig(rank=4, alpha=4)).name == "pytorch_lora_weights.safetensors"
    with pytest.raises(FluxfillError, match=r"nowhere/pytorch_lora_weights.safetensors not found: run `fluxfill train`"):
        check_lora(tmp_path / "nowhere", LORA)


# ------------------------------------------------------------------------------------------------ the stage
def test_evaluate_stage_end_to_end(tmp_path, tiny_cfg, monkeypatch, caplog):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    prepared = make_prepared(tmp_path / "data" / "prepared", 4, PANEL, val=3)
    (tmp_path / "params.yaml").write_text(
        f"data: {{panel_size: {PANEL}}}\nmodel: {{max_sequence_length: {MSL}}}\n"
        "train: {lora: {rank: 4, alpha: 8}}\neval: {num_inference_steps: 2, batch_size: 2}\n")
    models = tmp_path / "models"
    save_lora(lora_transformer(tiny_cfg), models / "lora")
    fusion_module().save(models / "fusion.safetensors")
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("fluxfill", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_metric(run_id, "loss", 0.5)
    client.set_terminated(run_id)
    tracking.write_run_ref(client.get_run(run_id), models)

    caplog.set_level(logging.INFO, logger="fluxfill.evaluate")
    assert main(["evaluate", "--device", "cpu"]) == 0
    assert "LPIPS skipped: torchvision is not installed" in caplog.text

    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"psnr", "ssim", "identity_psnr", "identity_ssim", "base_psnr", "base_ssim", "num_samples"}
    assert metrics["num_samples"] == 3 and all(math.isfinite(v) for v in metrics.values())
    panels, _ = val_panels(prepared)
    assert metrics["identity_psnr"] == pytest.approx(np.mean([psnr(p.source, p.target) for p in panels]), abs=1e-5)
    assert metrics["identity_ssim"] == pytest.approx(np.mean([ssim(p.source, p.target) for p in panels]), abs=1e-5)

    per_sample = pd.read_csv(tmp_path / "eval" / "per_sample.csv")
    assert list(per_sample.columns) == ["id", "psnr", "ssim", "identity_psnr", "identity_ssim", "base_psnr", "base_ssim"]
    assert list(per_sample.id) == ["s000", "s001", "s002"]
    assert metrics["psnr"] == pytest.approx(per_sample.psnr.mean(), abs=1e-5)
    assert (per_sample.psnr != per_sample.base_psnr).all()  # the LoRA + fusion answer is not the base answer

    grids = sorted((tmp_path / "eval" / "samples").iterdir())
    assert [g.name for g in grids] == ["grid_000.png", "grid_001.png"]  # 3 samples in batches of 2
    g0, g1 = Image.open(grids[0]), Image.open(grids[1])
    assert g0.width == g1.width == 4 * PANEL and g0.height - g1.height == PANEL
    label_h = g1.height - PANEL
    source = np.asarray(g1.crop((PANEL, label_h, 2 * PANEL, label_h + PANEL)))
    assert np.array_equal(source, np.asarray(panels[2].source))  # row 0 of grid 1 is sample 2

    run = client.get_run(run_id)
    assert run.data.metrics["loss"] == 0.5  # the training run, not a new one
    for key in ("psnr", "ssim", "identity_psnr", "identity_ssim", "base_psnr", "base_ssim"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert run.data.tags["eval.num_inference_steps"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/grid_000.png", "eval/grid_001.png", "eval/per_sample.csv"} <= artifacts
    assert len(client.search_runs([exp])) == 1

    # no run reference here (weights from another workspace): the run tagged with their DVC hash gets the scores
    for ref in (tmp_path / ".fluxfill" / "runs").glob("*.json"):
        ref.unlink()
    tagged = client.create_run(exp, tags={tracking.OUTPUTS_TAG: dvc_md5(models)}).info.run_id
    client.set_terminated(tagged)
    assert main(["evaluate", "--device", "cpu"]) == 0
    assert client.get_run(tagged).data.metrics["psnr"] == pytest.approx(metrics["psnr"])
    assert len(client.get_metric_history(run_id, "psnr")) == 1  # the first evaluation's only
    assert len(client.search_runs([exp])) == 2  # no new run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_with_lora_and_fusion_on_cuda_bf16(tmp_path, tiny_cfg):
    """The evaluation path at the dtype the real model runs in: bf16 transformer, fp32 fusion, CPU generators."""
    panels, prompts = val_panels(make_prepared(tmp_path / "prepared", 4, PANEL, val=3))
    save_lora(lora_transformer(tiny_cfg), tmp_path / "lora")
    pipe = load_pipeline(tiny_cfg, "cuda", torch.bfloat16)
    fusion = fusion_module().to("cuda")
    encoder = load_component(tiny_cfg, "image_encoder", "cuda", torch.bfloat16)
    processor = load_component(tiny_cfg, "image_processor")
    base = generate(pipe, None, panels, prompts, **GEN)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    trained = generate(pipe, fusion, panels, prompts, image_encoder=encoder, image_processor=processor, **GEN)
    again = generate(pipe, fusion, panels, prompts, image_encoder=encoder, image_processor=processor, **GEN)
    for b, t, a in zip(base, trained, again, strict=True):
        b, t, a = (np.asarray(x, dtype=int) for x in (b, t, a))
        assert t.shape == (PANEL, PANEL, 3) and t.std() > 1  # a picture, not a constant
        assert np.abs(t - a).max() <= 1  # seeded: the same answer twice
        assert np.abs(t - b).mean() > 5


def test_train_does_not_import_the_evaluate_stage():
    """Generation lives in fluxfill.sampling: training (its sample grids) never loads the evaluate stage."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "fluxfill"

    def reachable(module: str, seen: set[str]) -> set[str]:  # fluxfill modules imported, directly or not
        seen.add(module)
        for node in ast.walk(ast.parse((package / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for name in [node.module] if node.module else [a.name for a in node.names]:
                    if name not in seen and (package / f"{name}.py").exists():
                        reachable(name, seen)
        return seen

    found = reachable("train", set())
    assert "sampling" in found and "registry" in found and "evaluate" not in found
