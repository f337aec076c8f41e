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
         "--panel-size", "128", "--text-tokens", "16", "--checkpointing", "on"]


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """The benchmark makes an Accelerator (one state per process): leave none behind for other modules."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


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
    assert report["step"] == "fluxfill.step.train_step"
    assert report["settings"] == {"mixed_precision": "no", "base_dtype": "float32", "trainable_dtype": "float32",
                                  "automatic_dynamic_shapes": False, "cudnn_sdp": True}
    model = report["model"]
    assert (model["image_tokens"], model["text_tokens"], model["in_channels"]) == (512, 64, 384)
    assert model["lora"]["rank"] == 32 and model["lora"]["trainable"] > 0 and model["fusion_trainable"] == 24 * 32 + 1  # W (no bias) and θ
    assert model["lora"]["dtype"] == "float32"  # fp32 LoRA, as fluxfill train keeps it
    # the headline is ours with train's `auto` settings: on the CPU no checkpointing and no compile
    assert [(r["name"], r["group"]) for r in report["results"]] == [
        ("reference b1 ckpt=off compile=off", "headline"), ("ours b1 ckpt=auto compile=off", "headline"),
        ("ours b1 ckpt=on compile=off", "matrix"), ("ours b1 ckpt=off compile=off", "matrix")]
    for r in report["results"]:
        assert r["status"] == "ok", r
        for key in ("s_per_step", "samples_per_s", "useful_tflop_per_step", "achieved_tflops", "mfu", "final_loss"):
            assert _positive(r[key]), (r["name"], key, r[key])
        assert r["samples_per_s"] == pytest.approx(1 / r["s_per_step"])
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)  # --peak-tflops 1
        assert len(r["warmup_s"]) == 2 and r["peak_mem_gb"] is None  # no device peak on CPU
    assert [r["optimizer"] for r in report["results"]] == ["AdamW (default)", "AdamW", "AdamW", "AdamW"]
    assert [r["checkpointed_blocks"] for r in report["results"]] == [0, 0, 6, 0]  # tiny: 2 double + 4 single blocks
    ours = report["results"][1]
    assert len(ours["losses"]) == 2 + 2 and ours["final_loss"] == ours["losses"][-1]
    head = report["headline"]
    ref = report["results"][0]
    assert head["config"] == ours["name"] and head["step"] == "fluxfill.step.train_step"
    assert head["speedup_vs_reference"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])
    assert set(head["meets"]) == {"speedup_vs_reference", "mfu"}
    assert report["peak_tflops"] == 1.0 and report["peak_source"] == "--peak-tflops"
    log = Path(report["plan"]["out"]).with_suffix(".log").read_text()  # what stdout showed
    assert "headline: ours b1 ckpt=auto compile=off, timing fluxfill.step.train_step" in log
    assert log.splitlines()[-1].endswith(f"wrote {report['plan']['out']} and {Path(report['plan']['out']).with_suffix('.log')}")


def test_ours_times_the_step_fluxfill_train_calls(bench, monkeypatch, tmp_path):
    """Every timed and warm-up step of ours goes through fluxfill.step.train_step, the function train's loop calls."""
    import fluxfill.step as step_module

    real, calls = step_module.train_step, []

    def counted(trainer, batch, generator):
        calls.append((type(trainer).__name__, batch["x_0"].shape[0]))
        return real(trainer, batch, generator)

    monkeypatch.setattr(step_module, "train_step", counted)
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--steps", "3", "--out", str(out)]) == 0
    assert calls == [("Trainer", 1)] * (2 * (1 + 3))  # two configurations of ours, 1 warm-up + 3 timed each


def test_24gb_preset_compares_quantised_losses_from_the_same_start(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--quantize", "int8", "--preset-steps", "4", "--reference", "off",
                               "--checkpointing", "on,2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["ours b1 ckpt=auto compile=off", "ours b1 ckpt=on compile=off",
                          "ours b1 ckpt=on compile=off quantize=int8", "ours b1 ckpt=2 compile=off"]
    bf16, int8 = rows["ours b1 ckpt=on compile=off"], rows["ours b1 ckpt=on compile=off quantize=int8"]
    assert bf16["group"] == int8["group"] == "preset_24gb" and len(bf16["losses"]) == len(int8["losses"]) == 5
    # a fresh load: the same weights, LoRA init, batch and noise as the headline's first step (checkpointing
    # changes no value); the int8 base is close to it but not equal
    assert bf16["losses"][0] == rows["ours b1 ckpt=auto compile=off"]["losses"][0]
    assert int8["losses"][0] != bf16["losses"][0] and int8["losses"][0] == pytest.approx(bf16["losses"][0], rel=0.05)
    assert int8["base_stored_gb"] < 0.5 * bf16["base_stored_gb"]
    modes = report["headline"]["preset_24gb"]["modes"]
    assert [m["quantize"] for m in modes] == ["none", "int8"] and "loss_vs_bf16" not in modes[0]
    gap = modes[1]["loss_vs_bf16"]
    assert gap["steps"] == 5 and 0 < gap["mean_abs_diff"] <= gap["max_abs_diff"] and gap["mean_rel_diff"] < 0.05
    assert "24 GB preset int8: ok" in capsys.readouterr().out


def test_fp8_matmul_candidate_needs_a_recent_gpu(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--fp8-matmul", "on", "--reference", "off", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][-1]
    assert row["name"] == "ours b1 ckpt=auto compile=off fp8-matmul" and row["group"] == "candidate"
    assert row["status"] == ("error: FluxfillError: fp8 matmuls need a CUDA GPU with compute capability >= 8.9 "
                             "(H100, H200, L40S, RTX 40xx); cpu has none: run without --fp8-matmul")


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
        if cfg.kind == "ours" and cfg.group == "headline":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(cfg, ctx, args)

    monkeypatch.setattr(bench, "run_config", run_config)
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["name"], r["status"]) for r in report["results"]] == [
        ("reference b1 ckpt=off compile=off", "ok"), ("ours b1 ckpt=auto compile=off", "OOM"),
        ("ours b1 ckpt=on compile=off", "ok")]
    assert "speedup_vs_reference" not in report["headline"] and report["headline"]["meets"] == {}


def test_budget_skips_the_rest(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(SMALL + ["--budget-s", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and len(report["results"]) == 3
    assert all(r["status"].startswith("skipped (budget") for r in report["results"])
    assert "headline: ours b1 ckpt=auto compile=off (not measured), timing fluxfill.step.train_step" in capsys.readouterr().out


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
