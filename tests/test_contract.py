"""The diptych tensor contract of docs/design.md §2, on the tiny preset and on the full-size architecture (meta)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux import pipeline_flux_fill
from PIL import Image

from fluxfill.cli import main
from fluxfill.config import FusionConfig, ModelConfig, load_params
from fluxfill.fusion import SemanticFusion
from fluxfill.latents import (
    check_diptychs,
    encode_diptychs,
    encode_prompts,
    encode_references,
    target_token_mask,
    text_pipeline,
    unpack,
    vae_pipeline,
)
from fluxfill.models import load_component, load_pipeline
from fluxfill.objective import flow_matching_step
from fluxfill.panels import build_panels, diptych_mask
from fluxfill.shapes import contract_shapes, synthetic_panels

DESIGN_TABLE = {
    "enhanced_diptych": [4, 3, 512, 1024],
    "mask_diptych": [4, 1, 512, 1024],
    "vae_latents": [4, 16, 64, 128],
    "x_0": [4, 2048, 64],
    "masked_latents": [4, 2048, 64],
    "mask_latents": [4, 2048, 256],
    "x_cond": [4, 2048, 320],
    "hidden_states": [4, 2048, 384],
    "img_ids": [2048, 3],
    "model_output": [4, 2048, 64],
}


def test_design_table_tiny_batch4_512():
    shapes = contract_shapes(ModelConfig(preset="tiny"), FusionConfig(init=0.3), batch=4, panel_size=512)
    for name, expected in DESIGN_TABLE.items():
        assert shapes[name] == expected, name
    assert shapes["fusion_weight"] == pytest.approx(0.3, abs=1e-4)


def test_other_batch_and_panel_size():
    shapes = contract_shapes(ModelConfig(preset="tiny"), FusionConfig(), batch=3, panel_size=256)
    assert shapes["x_0"] == [3, 512, 64]
    assert shapes["x_cond"] == [3, 512, 320]
    assert shapes["hidden_states"] == [3, 512, 384]
    assert shapes["img_ids"] == [512, 3]
    assert shapes["model_output"] == [3, 512, 64]
    assert shapes["vae_latents"] == [3, 16, 32, 64]


def test_full_size_transformer_on_meta():
    cfg = ModelConfig(preset="flux-fill-dev-random")
    transformer = load_component(cfg, "transformer", "meta")
    assert sum(p.numel() for p in transformer.parameters()) == 11_902_391_360
    assert transformer.config.in_channels == 384 and transformer.config.out_channels == 64
    out = transformer(
        hidden_states=torch.empty(4, 2048, 384, device="meta"),
        timestep=torch.empty(4, device="meta"),
        guidance=torch.empty(4, device="meta"),
        pooled_projections=torch.empty(4, 768, device="meta"),
        encoder_hidden_states=torch.empty(4, 512, 4096, device="meta"),
        txt_ids=torch.empty(512, 3, device="meta"),
        img_ids=torch.empty(2048, 3, device="meta"),
        return_dict=False,
    )[0]
    assert list(out.shape) == [4, 2048, 64]


def test_parity_with_flux_fill_pipeline(tiny, monkeypatch):
    """x_0, x_cond and img_ids equal what FluxFillPipeline computes from the same PIL diptych and mask."""
    panels = synthetic_panels(2, 64, seed=3)
    diptychs, masks = [p.diptych for p in panels], [p.mask for p in panels]
    ours = encode_diptychs(vae_pipeline(tiny["vae"]), diptychs, masks)

    # The pipeline's own path, with its VAE posterior taken at the mode as our cache does.
    monkeypatch.setattr(pipeline_flux_fill, "retrieve_latents",
                        functools.partial(pipeline_flux_fill.retrieve_latents, sample_mode="argmax"))
    pipe = load_pipeline(ModelConfig(preset="tiny"), components={k: tiny[k] for k in (
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")})
    image = pipe.image_processor.preprocess(diptychs, height=64, width=128)
    mask = pipe.mask_processor.preprocess(masks, height=64, width=128)
    mask_lat, masked_lat = pipe.prepare_mask_latents(
        mask, image * (1 - mask), 2, 16, 1, 64, 128, torch.float32, torch.device("cpu"), None)
    x_cond_ref = torch.cat((masked_lat, mask_lat), dim=-1)
    z = pipe._encode_vae_image(image, generator=None)
    x_0_ref = pipe._pack_latents(z, 2, 16, 8, 16)
    img_ids_ref = pipe._prepare_latent_image_ids(2, 4, 8, torch.device("cpu"), torch.float32)

    for ref, got in ((x_0_ref, ours.x_0), (x_cond_ref, ours.x_cond), (img_ids_ref, ours.img_ids)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref)
    # what the pipeline feeds its transformer at inference: captured from a real call
    seen = {}
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=kw["hidden_states"], img_ids=kw["img_ids"]), with_kwargs=True)
    pipe(prompt=["a", "b"], image=diptychs, mask_image=masks, height=64, width=128, num_inference_steps=1,
         output_type="latent", max_sequence_length=16)
    hook.remove()
    torch.testing.assert_close(seen["hidden"][..., 64:], ours.x_cond)
    torch.testing.assert_close(seen["img_ids"], ours.img_ids)
    assert seen["hidden"].shape[-1] == tiny["transformer"].config.in_channels == 384


def test_unpack_inverts_pack(tiny):
    panels = synthetic_panels(1, 32)
    enc = encode_diptychs(vae_pipeline(tiny["vae"]), [panels[0].diptych], [panels[0].mask])
    torch.testing.assert_close(unpack(enc.x_0, 32), enc.vae_latents)


def test_mask_polarity_pixels_and_latents(tiny):
    mask = np.asarray(diptych_mask(64))
    assert mask.shape == (64, 128)
    assert (mask[:, :64] == 0).all() and (mask[:, 64:] == 255).all()
    panels = synthetic_panels(1, 64)
    enc = encode_diptychs(vae_pipeline(tiny["vae"]), [panels[0].diptych], [panels[0].mask])
    assert enc.mask[0, 0, :, :64].eq(0).all() and enc.mask[0, 0, :, 64:].eq(1).all()
    # packed tokens: 4 rows x 8 columns, row-major; columns 0-3 are source, 4-7 target
    grid = enc.mask_latents[0].reshape(4, 8, 256)
    assert grid[:, :4].eq(0).all() and grid[:, 4:].eq(1).all()
    assert target_token_mask(enc.mask_latents)[0].reshape(4, 8)[:, 4:].all()
    # masked latents: diffusers' VAE code (posterior mode) of diptych * (1 - mask), shifted, scaled and packed,
    # computed here from the PIL images without fluxfill's encoder
    vae = tiny["vae"]
    pixels = np.asarray(panels[0].diptych, dtype=np.float32) / 127.5 - 1  # [64, 128, 3] in [-1, 1]
    keep = 1 - np.asarray(panels[0].mask, dtype=np.float32)[..., None] / 255  # [64, 128, 1] 1 over the source
    blanked = torch.from_numpy(pixels * keep).permute(2, 0, 1)[None]  # [1, 3, 64, 128]
    with torch.no_grad():
        z = vae.encode(blanked).latent_dist.mode()  # [1, 16, 8, 16]
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    expected = z.reshape(1, 16, 4, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 32, 64)  # [1, N, 16*2*2]
    torch.testing.assert_close(enc.masked_latents, expected, rtol=1e-3, atol=2e-4)  # batched vs single VAE call
    # and its target half differs from the unmasked diptych's code there: the blanking reached the VAE
    target = target_token_mask(enc.mask_latents)[0]  # [32]
    assert (enc.masked_latents[0, target] - enc.x_0[0, target]).abs().max() > 1e-2


def test_bad_panel_size_and_mask_mismatch_messages(tiny):
    with pytest.raises(ValueError, match=r"panel_size 500 is not a positive multiple of 16"):
        build_panels(Image.new("RGB", (600, 600)), Image.new("RGB", (600, 600)), Image.new("RGB", (600, 600)), 500)
    with pytest.raises(Exception, match=r"data.panel_size: .*500 is not a positive multiple of 16"):
        load_params(overrides=["data.panel_size=500"])
    p = synthetic_panels(1, 64)[0]
    with pytest.raises(ValueError, match=r"mask 0 is 64x32 but its diptych is 128x64"):
        check_diptychs([p.diptych], [p.mask.resize((64, 32))])
    with pytest.raises(ValueError, match=r"not a positive multiple of 16"):
        check_diptychs([Image.new("RGB", (40, 20))], [Image.new("L", (40, 20))])


def test_tiny_tokenizers_distinguish_prompts(tiny):
    text = text_pipeline(tiny["text_encoder"], tiny["tokenizer"], tiny["text_encoder_2"], tiny["tokenizer_2"])
    emb, pooled, ids = encode_prompts(text, ["a bright photo", "a dark photo"], 32)
    assert list(emb.shape) == [2, 32, 32] and list(pooled.shape) == [2, 32] and list(ids.shape) == [32, 3]
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(pooled[0], pooled[1])


def test_training_steps_lower_loss_and_move_alpha(tiny_cfg, tiny):
    torch.manual_seed(0)
    transformer = load_component(tiny_cfg, "transformer").requires_grad_(True).train()
    panels = synthetic_panels(2, 32, seed=1)
    enc = encode_diptychs(vae_pipeline(tiny["vae"]), [p.diptych for p in panels], [p.mask for p in panels])
    text = text_pipeline(tiny["text_encoder"], tiny["tokenizer"], tiny["text_encoder_2"], tiny["tokenizer_2"])
    emb, pooled, ids = encode_prompts(text, ["p0", "p1"], 16)
    image_embeds = encode_references(tiny["image_encoder"], tiny["image_processor"], [p.reference for p in panels])
    batch = dict(x_0=enc.x_0, masked_latents=enc.masked_latents, mask_latents=enc.mask_latents,
                 prompt_embeds=emb, pooled_prompt_embeds=pooled, image_embeds=image_embeds,
                 img_ids=enc.img_ids, txt_ids=ids)
    fusion = SemanticFusion("learned", 32, image_embeds.shape[-1], init=0.25)
    # the pretrained transformer at a fine-tuning rate, the fusion module (new) at a faster one
    opt = torch.optim.AdamW([{"params": transformer.parameters(), "lr": 3e-4}, {"params": fusion.parameters()}], lr=3e-3)

    def loss_at_fixed_noise():
        with torch.no_grad():
            return flow_matching_step(transformer, fusion, batch, generator=torch.Generator().manual_seed(7)).loss.item()

    before = loss_at_fixed_noise()
    for step in range(30):
        out = flow_matching_step(transformer, fusion, batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        assert fusion.theta.grad is not None and fusion.proj.weight.grad.abs().sum() > 0
        opt.step()
    after = loss_at_fixed_noise()
    assert after < 0.8 * before, (before, after)
    assert abs(fusion.alpha.item() - 0.25) > 1e-3 and 0 < fusion.alpha.item() < 1


def test_fusion_modes_and_roundtrip(tmp_path):
    f = SemanticFusion("learned", 8, 6, init=0.6211)
    assert f.alpha.item() == pytest.approx(0.6211, abs=1e-6)
    pooled, e = torch.randn(3, 8), torch.randn(3, 6)
    r = f.proj(e)
    expected = (1 - 0.6211) * pooled + 0.6211 * r * pooled.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)
    torch.testing.assert_close(f(pooled, e), expected, atol=1e-5, rtol=1e-5)
    f.save(tmp_path / "fusion.safetensors")
    g = SemanticFusion.load(tmp_path / "fusion.safetensors")
    torch.testing.assert_close(g(pooled, e), f(pooled, e))
    none = SemanticFusion("none", 8, 6)
    assert none.alpha is None and torch.equal(none(pooled), pooled) and not list(none.parameters())
    none.save(tmp_path / "none.safetensors")
    assert SemanticFusion.load(tmp_path / "none.safetensors").mode == "none"
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        SemanticFusion("learned", 8, 6, init=1.0)


def test_loss_region_target_uses_only_target_tokens(tiny_cfg, tiny):
    panels = synthetic_panels(1, 32)
    enc = encode_diptychs(vae_pipeline(tiny["vae"]), [panels[0].diptych], [panels[0].mask])
    batch = dict(x_0=enc.x_0, masked_latents=enc.masked_latents, mask_latents=enc.mask_latents,
                 prompt_embeds=torch.zeros(1, 4, 32), pooled_prompt_embeds=torch.zeros(1, 32),
                 img_ids=enc.img_ids, txt_ids=torch.zeros(4, 3))
    fusion = SemanticFusion("none", 32, 24)
    out = flow_matching_step(tiny["transformer"], fusion, batch, loss_region="target",
                             generator=torch.Generator().manual_seed(0))
    tokens = target_token_mask(enc.mask_latents)[0]
    expected = ((out.model_output[0, tokens] - out.target[0, tokens]) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert tokens.sum().item() == tokens.numel() // 2


def test_cli_shapes_prints_design_table(capsys):
    assert main(["shapes", "--batch", "3", "--panel-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "x_0: [3, 512, 64]" in out and "x_cond: [3, 512, 320]" in out
    assert "hidden_states: [3, 512, 384]" in out and "img_ids: [512, 3]" in out
    assert "model_output: [3, 512, 64]" in out and "fusion_weight (alpha): 0.1" in out


def test_cli_shapes_full_size_meta(capsys):
    assert main(["shapes", "--preset", "flux-fill-dev-random", "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert "hidden_states: [4, 2048, 384]" in out and "model_output: [4, 2048, 64]" in out
    # model.max_sequence_length: 128 T5 tokens by default
    assert "prompt_embeds: [4, 128, 4096]" in out and "pooled_prompt_embeds: [4, 768]" in out


def test_cli_shapes_rejects_bad_panel_size(capsys):
    assert main(["shapes", "--panel-size", "100"]) == 2
    assert "panel_size 100 is not a positive multiple of 16" in capsys.readouterr().out


def test_pretrained_preset_missing_weights_names_the_path(tmp_path):
    from fluxfill.config import FluxfillError

    cfg = ModelConfig(preset="flux-fill-dev", pretrained=str(tmp_path / "FLUX.1-Fill-dev"))
    with pytest.raises(FluxfillError, match=r"cannot load vae .*FLUX.1-Fill-dev.*huggingface-cli download"):
        load_component(cfg, "vae")
    hub = ModelConfig(preset="flux-fill-dev")  # HF_HUB_OFFLINE=1 in tests: no download is attempted
    with pytest.raises(FluxfillError, match=r"cannot load transformer .*hub id 'black-forest-labs/FLUX.1-Fill-dev'"):
        load_component(hub, "transformer")


def test_a_damaged_shard_keeps_its_cause_and_gets_no_download_advice(tmp_path):
    """Weights that are there but do not load: the message names the shard, the error is chained."""
    from fluxfill.config import FluxfillError

    load_component(ModelConfig(), "vae").save_pretrained(tmp_path / "vae")
    shard = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated download
    cfg = ModelConfig(preset="flux-fill-dev", pretrained=str(tmp_path))
    with pytest.raises(FluxfillError) as err:
        load_component(cfg, "vae")
    msg = str(err.value)
    assert msg.startswith(f"cannot load vae of preset 'flux-fill-dev' from local folder {tmp_path} (subfolder 'vae'): "
                          f"OSError: Unable to load weights from checkpoint file for '{shard}'")
    assert "The files are there but do not load: check model.dtype (auto)" in msg
    assert "Download the weights on a machine with network" not in msg
    assert isinstance(err.value.__cause__, OSError) and str(shard) in str(err.value.__cause__)
