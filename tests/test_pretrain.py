"""The shipped tiny weights: a diffusers repository, trained without the held-out photos, and good at what they do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxfill.cli import main
from fluxfill.config import ModelConfig
from fluxfill.evaluate import psnr
from fluxfill.models import TINY_DIR, build_tiny, load_component, load_pipeline
from fluxfill.pretrain import (
    INFO_FILE,
    Recipe,
    compare,
    file_hashes,
    fill_copies,
    held_out_panels,
    held_out_photos,
    photo_pool,
    pretrain,
    reconstruct,
)

MB = 1024 * 1024


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((TINY_DIR / INFO_FILE).read_text())


def test_shipped_folder_is_a_diffusers_repository(info):
    from diffusers import FluxFillPipeline

    files = {f.relative_to(TINY_DIR).as_posix(): f.stat().st_size for f in TINY_DIR.rglob("*") if f.is_file()}
    weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    assert sorted(weights) == ["image_encoder/model.safetensors", "text_encoder/model.safetensors",
                               "text_encoder_2/model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                               "vae/diffusion_pytorch_model.safetensors"]
    assert max(weights.values()) < 8 * MB and sum(files.values()) < 12 * MB
    assert file_hashes(TINY_DIR) == info["files"]  # the files are the ones the recorded training wrote
    pipe = FluxFillPipeline.from_pretrained(TINY_DIR)
    assert pipe.transformer.config.in_channels == 384 and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor == info["shift_factor"] and pipe.vae.config.scaling_factor == info["scaling_factor"]


def test_tiny_preset_loads_the_shipped_weights():
    cfg = ModelConfig(preset="tiny")
    shipped = load_component(cfg, "transformer")
    state = shipped.state_dict()
    random = build_tiny("transformer").state_dict()
    assert state.keys() == random.keys()
    assert not torch.equal(state["x_embedder.weight"], random["x_embedder.weight"])
    # the guidance embedder is zero: the tiny model is not guidance-distilled, guidance changes nothing
    assert not shipped.time_text_embed.guidance_embedder.linear_2.weight.any()


def test_clip_text_and_vision_come_from_one_clip_model():
    from transformers import CLIPModel

    cfg = ModelConfig(preset="tiny")
    clip = CLIPModel.from_pretrained(TINY_DIR / "image_encoder")
    text = load_component(cfg, "text_encoder")
    for k, v in text.state_dict().items():
        assert torch.equal(v, clip.text_model.state_dict()[k]), k
    assert clip.text_projection.weight.shape == (24, text.config.hidden_size)
    encoder, processor = load_component(cfg, "image_encoder"), load_component(cfg, "image_processor")
    pixels = processor(images=held_out_panels(64, ["astronaut"]), return_tensors="pt").pixel_values  # [1, 3, 32, 32]
    with torch.no_grad():
        assert torch.allclose(encoder(pixel_values=pixels).image_embeds, clip.get_image_features(pixel_values=pixels).pooler_output)


def test_held_out_photos_are_not_trained_on(info):
    held = held_out_photos()
    assert held == ["astronaut", "hubble_deep_field", "moon", "retina"]  # the demo's val split at data.seed 0
    assert info["held_out"] == held and info["trained_on"] == sorted(photo_pool())
    assert not set(held) & set(info["trained_on"])


def test_shipped_vae_reconstructs_held_out_photos(info):
    vae = load_component(ModelConfig(preset="tiny"), "vae")
    photos = held_out_panels(128)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # a point posterior: FluxFillPipeline samples it and gets the mode
        assert float(vae.encode(x).latent_dist.std.max()) < 1e-6
    scores = [psnr(reconstruct(vae, p), p) for p in photos]
    assert np.mean(scores) >= 24.0
    assert np.mean(scores) == pytest.approx(info["metrics"]["vae_psnr"], abs=1e-3)


def test_shipped_transformer_fills_a_masked_copy_better_than_a_random_one():
    pipe = load_pipeline(ModelConfig(preset="tiny"))
    photos = held_out_panels(128, ["astronaut"])
    trained = psnr(fill_copies(pipe, photos)[0], photos[0])
    pipe.transformer = build_tiny("transformer")
    random = psnr(fill_copies(pipe, photos)[0], photos[0])
    assert trained >= 16.0 and trained >= random + 6.0  # measured: 17.34 vs 9.70 dB (the VAE alone: 18.73 dB)


def test_pretraining_is_deterministic_and_check_compares(tmp_path):
    r = Recipe(clip_steps=2, clip_batch=4, vae_steps=2, vae_batch=2, examples=4, steps=2, batch=2, warmup=1)
    a = pretrain(tmp_path / "a", r, metrics_size=32)["folder"]
    b = pretrain(tmp_path / "b", r, metrics_size=32)["folder"]
    ok, lines = compare(a, b)
    assert ok and lines == [f"identical: all {len(file_hashes(a))} files have the shipped sha256"]
    # a different build: other bytes, same figures within tolerance -> ok; figures off -> not ok
    vae = b / "vae/diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(vae))
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 1e-3
    save_file(tensors, str(vae))
    info = json.loads((b / INFO_FILE).read_text())
    info["files"] = file_hashes(b)
    (b / INFO_FILE).write_text(json.dumps(info))
    ok, lines = compare(a, b)
    assert ok and lines[0] == "vae/diffusion_pytorch_model.safetensors: bytes differ, max |difference| 0.001"
    info["metrics"]["vae_psnr"] += 0.6
    (b / INFO_FILE).write_text(json.dumps(info))
    ok, lines = compare(a, b)
    assert not ok and any(line.startswith("vae_psnr: ") and line.endswith("> 0.5 dB)") for line in lines)
    info["recipe"]["steps"] = 3
    (b / INFO_FILE).write_text(json.dumps(info))
    ok, lines = compare(a, b)
    assert not ok and "the shipped weights are stale" in lines[0]


def test_cli_refuses_a_foreign_output_folder_and_a_missing_reference(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["pretrain-tiny", "--output", str(foreign)]) == 1
    err = capsys.readouterr().err
    assert f"{foreign} exists and is not a tiny weights folder" in err and "Traceback" not in err
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain-tiny", "--check", "--output", str(empty)]) == 1
    assert f"{empty / INFO_FILE} not found" in capsys.readouterr().err


def test_missing_tiny_weights_name_the_fix(tmp_path, monkeypatch):
    import fluxfill.models as models
    from fluxfill.config import FluxfillError

    copy = tmp_path / "fluxfill" / "weights" / "tiny"
    shutil.copytree(TINY_DIR, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(models, "TINY_DIR", copy)
    with pytest.raises(FluxfillError, match=r"cannot load vae of preset 'tiny' .*`make tiny-weights`"):
        load_component(ModelConfig(preset="tiny"), "vae")


def test_damaged_info_file_is_one_line(tmp_path, capsys):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / INFO_FILE).write_text("{not json")
    assert main(["pretrain-tiny", "--check", "--output", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{folder / INFO_FILE} is damaged" in err and len(err.strip().splitlines()) == 1


def test_demo_chain_trained_model_beats_base(tmp_path, monkeypatch):
    """`make run` in-process with the default params but 50 training steps (the default's 600 take minutes): the
    trained LoRA + fusion beat the base model by >= 1 dB on the val split (measured: 16.74 vs 14.41 dB)."""
    from accelerate.state import AcceleratorState

    from fluxfill.config import load_params
    from fluxfill.data import prepare
    from fluxfill.encode import encode
    from fluxfill.evaluate import evaluate
    from fluxfill.train import train

    repo_params = Path(__file__).parents[1] / "params.yaml"
    monkeypatch.chdir(tmp_path)
    params = load_params(repo_params, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "train.max_steps=50"])
    prepare(params.data)
    encode(params, device="cpu")
    try:
        train(params)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    m = evaluate(params, device="cpu")["metrics"]
    assert m["num_samples"] == 4 and m["psnr"] >= m["base_psnr"] + 1.0


def test_readme_states_the_shipped_figures(info):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    m = info["metrics"]
    assert f"| VAE reconstruction `decode(encode(x))` | 18.73 | 22.08 | 32.72 | 24.67 | **{m['vae_psnr']:.2f}** |" in readme
    assert f"shipped transformer | 17.34 | 20.26 | 31.13 | 22.26 | **{m['fill_psnr']:.2f}** |" in readme
    assert f"random transformer (same VAE and text encoders) | 9.70 | 7.52 | 16.76 | 10.45 | {m['random_fill_psnr']:.2f} |" in readme
    assert m["vae_psnr_min"] == 18.729 and m["panel_size"] == 128
    assert (Path(__file__).parents[1] / "docs" / "tiny_grid.png").stat().st_size < 300 * 1024
