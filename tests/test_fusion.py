"""Scale-free fusion: norm matching, the α = 0 limit, W from CLIP's text projection, θ's optimizer group, modes."""

from __future__ import annotations

import pytest
import torch

from fluxfill.config import ConfigError, validate
from fluxfill.fusion import SemanticFusion, build_fusion
from fluxfill.models import TINY_DIR, clip_text_projection, image_encoder_checkpoint


def test_reference_is_rescaled_to_the_pooled_norm_per_sample():
    torch.manual_seed(0)
    f = SemanticFusion("learned", 8, 6, init=0.5)
    with torch.no_grad():
        f.proj.weight.mul_(37.0)  # W's scale must not matter
    p = torch.randn(4, 8) * torch.tensor([[0.1], [1.0], [5.0], [40.0]])  # [4, 8], very different norms
    e = torch.randn(4, 6)
    with torch.no_grad():
        f.theta.fill_(1e4)  # α = 1: the output is r̂ alone
        r_hat = f(p, e)
    torch.testing.assert_close(r_hat.norm(dim=1), p.norm(dim=1), rtol=1e-5, atol=0)
    r = f.reference(e)
    torch.testing.assert_close(r_hat, r * p.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    stats = f.stats(p, e)
    assert stats["fusion_weight"] == 1.0
    assert stats["fusion_cos"] == pytest.approx(float(torch.nn.functional.cosine_similarity(p, r.detach()).mean()), abs=1e-6)
    assert stats["fusion_ref_norm"] == pytest.approx(float((r.detach().norm(dim=1) / p.norm(dim=1)).mean()), rel=1e-5)
    assert SemanticFusion("none", 8, 6).stats(p, e) == {}


def test_alpha_zero_gives_exactly_the_pooled_text():
    torch.manual_seed(1)
    f = SemanticFusion("learned", 8, 6)
    p, e = torch.randn(3, 8), torch.randn(3, 6)
    with torch.no_grad():
        f.theta.fill_(-1e4)  # sigmoid underflows to 0
        assert f.alpha.item() == 0.0
        assert torch.equal(f(p, e), p)
        f.theta.fill_(-8.0)  # small α: pooled' moves away from p by ~α
        gap = (f(p, e) - p).norm(dim=1) / p.norm(dim=1)
    assert (gap > 0).all() and (gap < 3 * f.alpha.item()).all()


def _tiny_clip(projection_dim=12, text_hidden=16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": text_hidden, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 16, "vocab_size": 64},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
                                    "projection_dim": projection_dim},  # what a vision tower loaded from it builds
                     projection_dim=projection_dim)
    return CLIPModel(cfg).eval()


def test_pinv_init_reproduces_the_image_embedding_through_the_text_projection(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    clip = _tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    projection = clip_text_projection(str(tmp_path / "clip"))  # [E, P] = [12, 16]
    assert torch.equal(projection, clip.text_projection.weight.detach())
    params = validate({"model": {"preset": "flux-fill-dev", "image_encoder": str(tmp_path / "clip")}})
    assert image_encoder_checkpoint(params.model) == str(tmp_path / "clip")
    fusion = build_fusion(params, pooled_dim=16, image_embed_dim=12)
    assert fusion.init_method == "pinv"
    with torch.no_grad():
        pixels = torch.randn(3, 3, 16, 16)
        e_ref = clip.get_image_features(pixel_values=pixels)  # [3, 12] the image embedding
        e_ref = e_ref if torch.is_tensor(e_ref) else e_ref.pooler_output
        r = fusion.reference(e_ref)  # [3, 16] in the pooled-text space
        torch.testing.assert_close(clip.text_projection(r), e_ref, rtol=1e-4, atol=1e-5)

    # a vision-only checkpoint has no text projection: orthogonal W, and the init says so
    CLIPVisionModelWithProjection(clip.config.vision_config).save_pretrained(tmp_path / "vision")
    assert clip_text_projection(str(tmp_path / "vision")) is None
    params = validate({"model": {"preset": "flux-fill-dev", "image_encoder": str(tmp_path / "vision")}})
    fusion = build_fusion(params, pooled_dim=16, image_embed_dim=12)
    assert fusion.init_method == "orthogonal"
    w = fusion.proj.weight.detach()  # [16, 12]: orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(12), rtol=0, atol=1e-5)
    # the tiny preset's image encoder is a whole CLIPModel shipped in the package: pinv of its text projection
    assert image_encoder_checkpoint(validate({}).model) == str(TINY_DIR / "image_encoder")
    assert build_fusion(validate({}), 32, 24).init_method == "pinv"
    assert build_fusion(validate({"model": {"preset": "flux-fill-dev-random"}}), 32, 24).init_method == "orthogonal"


def test_theta_has_its_own_group_without_weight_decay():
    from fluxfill.step import make_optimizer

    transformer = torch.nn.Linear(4, 4)
    for mode, trained in (("learned", {"fusion.theta", "fusion.proj.weight"}), ("fixed", {"fusion.proj.weight"})):
        params = validate({"fusion": {"mode": mode}, "train": {"weight_decay": 0.05, "learning_rate": 1e-3,
                                                               "fusion_learning_rate": 0.02}})
        fusion = build_fusion(params, 8, 6)
        opt = make_optimizer(params, transformer, fusion, torch.device("cpu"))
        groups = {g["name"]: g for g in opt.param_groups}
        assert set(groups) == {"lora"} | trained
        assert groups["lora"]["weight_decay"] == 0.05 and groups["lora"]["lr"] == 1e-3
        assert groups["fusion.proj.weight"]["params"] == [fusion.proj.weight]
        assert groups["fusion.proj.weight"]["weight_decay"] == 0.05 and groups["fusion.proj.weight"]["lr"] == 0.02
        if mode == "learned":
            assert groups["fusion.theta"]["params"] == [fusion.theta]
            assert groups["fusion.theta"]["weight_decay"] == 0.0 and groups["fusion.theta"]["lr"] == 0.02
        else:
            assert not fusion.theta.requires_grad


def test_fixed_keeps_alpha_learned_moves_it():
    torch.manual_seed(0)
    p, e = torch.randn(4, 8), torch.randn(4, 6)
    target = torch.randn(4, 8)
    for mode in ("fixed", "learned"):
        f = SemanticFusion(mode, 8, 6, init=0.3)
        w0 = f.proj.weight.detach().clone()
        opt = torch.optim.AdamW([q for q in f.parameters() if q.requires_grad], lr=0.05, weight_decay=0.1)
        for _ in range(5):
            opt.zero_grad()
            ((f(p, e) - target) ** 2).mean().backward()
            opt.step()
        assert not torch.equal(f.proj.weight, w0)
        if mode == "fixed":
            assert f.alpha.item() == pytest.approx(0.3, abs=1e-7)
        else:
            assert abs(f.alpha.item() - 0.3) > 1e-3


def test_old_mode_pooled_names_learned(tmp_path):
    with pytest.raises(ConfigError, match=r"fusion\.mode: .*'pooled' was renamed 'learned'"):
        validate({"fusion": {"mode": "pooled"}})
    with pytest.raises(ValueError, match=r"'pooled' is now 'learned'"):
        SemanticFusion("pooled", 8, 6)
    assert validate({}).fusion.mode == "learned"


def test_the_vision_tower_loads_quietly_from_a_whole_clip_checkpoint_but_reports_missing_weights(tmp_path):
    import logging

    from safetensors.torch import load_file, save_file

    from fluxfill.models import load_component

    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")  # where transformers logs its load report
    logger.addHandler(handler)
    try:
        clip = _tiny_clip()
        clip.save_pretrained(tmp_path / "clip")
        params = validate({"model": {"preset": "flux-fill-dev", "image_encoder": str(tmp_path / "clip")}})
        tower = load_component(params.model, "image_encoder")
        assert torch.equal(tower.visual_projection.weight, clip.visual_projection.weight)
        assert reports == []  # the text tower's weights are expected extras
        weights = load_file(tmp_path / "clip" / "model.safetensors")
        del weights["vision_model.encoder.layers.0.mlp.fc1.weight"]
        save_file(weights, tmp_path / "clip" / "model.safetensors", metadata={"format": "pt"})
        load_component(params.model, "image_encoder")
    finally:
        logger.removeHandler(handler)
    assert len(reports) == 1 and "LOAD REPORT" in reports[0] and "MISSING" in reports[0]
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in reports[0] and "text_model" not in reports[0]
