"""bench/gpu_train_step.py: the CPU smoke run of its whole code path, its FLOP formula, its failure handling."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxFillPipeline

from fluxfill.config import ModelConfig
from fluxfill.models import load_component

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_train_step.py"
SMALL = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-sizes", "1",
         "--panel-size", "128", "--text-tokens", "16"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    """The CPU smoke command at 256-px panels and 64 text tokens (seconds), with a peak so that MFU is computed."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    rc = bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--batch-sizes", "1",
                     "--panel-size", "256", "--text-tokens", "64", "--peak-tflops", "1", "--out", str(out)])
    return rc, json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_reports_every_figure(smoke):
    rc, report = smoke
    assert rc == 0 and report["complete"] is True
    assert {"device_name", "torch", "diffusers", "peft", "cuda"} <= set(report["machine"])
    model = report["model"]
    assert (model["image_tokens"], model["text_tokens"], model["in_channels"]) == (512, 64, 384)
    assert model["lora"]["rank"] == 32 and model["lora"]["trainable"] > 0 and model["fusion_trainable"] == 24 * 32 + 1  # W (no bias) and θ
    assert [r["name"] for r in report["results"]] == [
        "reference b1 ckpt=on compile=off", "ours b1 ckpt=on compile=off", "ours b1 ckpt=off compile=off"]
    for r in report["results"]:
        assert r["status"] == "ok", r
        for key in ("s_per_step", "samples_per_s", "useful_tflop_per_step", "achieved_tflops", "mfu", "final_loss"):
            assert _positive(r[key]), (r["name"], key, r[key])
        assert r["samples_per_s"] == pytest.approx(1 / r["s_per_step"])
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)  # --peak-tflops 1
        assert len(r["warmup_s"]) == 2 and r["peak_mem_gb"] is None  # no device peak on CPU
    assert [r["optimizer"] for r in report["results"]] == ["default", "fused", "fused"]
    head = report["headline"]
    ours, ref = report["results"][1], report["results"][0]
    assert head["config"] == ours["name"]
    assert head["speedup_vs_reference"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])
    assert set(head["meets"]) == {"speedup_vs_reference", "mfu"}
    assert report["peak_tflops"] == 1.0 and report["peak_source"] == "--peak-tflops"


def test_smoke_flops_measured_equal_analytic(smoke):
    flops = smoke[1]["flops"]
    measured, analytic = flops["forward_per_sample_measured"], flops["forward_per_sample_analytic"]
    assert measured["linear"] == analytic["linear"] and measured["attention"] == analytic["attention"]
    # tiny: 6 layers (2 double-stream + 4 single-stream) x 4 S^2 D, S = 512 + 64, D = 3 heads x 32
    assert analytic["attention"] == 6 * 4 * 576 ** 2 * 96
    assert flops["useful_per_sample"] == 2 * measured["linear"] + 3 * measured["attention"]
    assert smoke[1]["attention"]["sdpa_ops_ours"] == ["_scaled_dot_product_flash_attention_for_cpu"]


def test_analytic_flops_full_size_match_parameter_count(bench):
    """2 * weights * tokens over every Linear of the 11.9B architecture (meta device), as each sees tokens."""
    transformer = load_component(ModelConfig(preset="flux-fill-dev-random"), "transformer", "meta")
    n, t = 2048, 512
    linear = 0
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith(("time_text_embed", "norm_out")) or ".norm" in name:
            tokens = 1  # per-sample projections and AdaLN modulations
        elif name in ("x_embedder", "proj_out"):
            tokens = n
        elif name == "context_embedder" or any(k in name for k in ("add_", "to_add_out", "ff_context")):
            tokens = t
        elif name.startswith("single_transformer_blocks"):
            tokens = n + t
        else:
            tokens = n  # image stream of the double blocks
        linear += 2 * module.weight.numel() * tokens
    analytic = bench.analytic_forward_flops(transformer.config, n, t)
    assert analytic["linear"] == linear
    assert analytic["attention"] == 57 * 4 * 2560 ** 2 * 3072
    assert 37e12 < analytic["total"] < 38e12  # per sample, forward only


def test_reference_mask_packing_matches_pipeline(bench):
    cfg = ModelConfig(preset="tiny")
    tcfg = load_component(cfg, "transformer", "meta").config
    inputs = bench.build_inputs(cfg, tcfg, 24, 2, 128, 8, torch.device("cpu"), torch.float32, 0)
    b, c, h, w = inputs.vae_latents.shape
    assert (b, c, h, w) == (2, 16, 16, 32) and inputs.img_ids.shape == (h * w // 4, 3)
    f = inputs.vae_scale_factor
    mask = FluxFillPipeline._pack_latents(bench.reference_mask(inputs.pixel_mask, b, h, w, f), b, f * f, h, w)
    assert mask.shape == (2, 128, 256)
    assert torch.equal(mask, inputs.mask_latents.expand(b, -1, -1))
    assert inputs.mask_latents[0, :, :].mean(-1).reshape(h // 2, w // 2).tolist() == [[0.0] * 8 + [1.0] * 8] * 8


def test_oom_is_recorded_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    real = bench.run_config

    def run_config(cfg, ctx, args):
        if cfg.kind == "ours" and cfg.checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfg, ctx, args)

    monkeypatch.setattr(bench, "run_config", run_config)
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["name"], r["status"]) for r in report["results"]] == [
        ("reference b1 ckpt=on compile=off", "ok"), ("ours b1 ckpt=on compile=off", "OOM"),
        ("ours b1 ckpt=off compile=off", "ok")]
    assert "speedup_vs_reference" not in report["headline"]  # no like-for-like config of ours succeeded


def test_budget_skips_the_rest(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--budget-s", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and len(report["results"]) == 3
    assert all(r["status"].startswith("skipped (budget") for r in report["results"])
    assert "headline: n/a" in capsys.readouterr().out


def test_full_size_without_cuda_is_skipped(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert bench.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out == "no CUDA GPU: skipped\n"
    assert not out.exists()


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                            ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                            ("Tesla T4", None)])
def test_peak_by_gpu_name(bench, name, peak):
    assert bench.peak_tflops_for(name) == peak
