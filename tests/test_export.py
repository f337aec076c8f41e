"""`fluxfill export`: kohya and ComfyUI layouts read back through diffusers' own converters give the same weights."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat

import pytest
import torch
from diffusers import FluxFillPipeline, FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from fluxfill.cli import main
from fluxfill.config import ModelConfig
from fluxfill.export import export
from fluxfill.fusion import SemanticFusion
from fluxfill.models import load_component

# every module the export maps, in the tiny preset (1 double, 1 single block) ...
TINY_TARGETS = (
    r"x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\.\w+\.linear_[12]"
    r"|transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)"
    r"|norm1(_context)?\.linear)"
    r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)"
)
# ... except the single block's fused linear1 (q, k, v, proj_mlp): diffusers' converter splits it at FLUX's own
# sizes (3072, 3072, 3072, 12288), so that part is checked on one full-width single block
WIDE_TARGETS = r"x_embedder|single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_mlp)"
WIDE = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=0, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(16, 56, 56))


def tiny_transformer():
    return load_component(ModelConfig(preset="tiny"), "transformer").requires_grad_(False)


def wide_transformer(targets: list[str]):
    """One full-width FLUX single block on the meta device; only the target modules get (zero) weights."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**WIDE)
    for name in targets:
        transformer.get_submodule(name).to_empty(device="cpu").requires_grad_(False).weight.zero_()
        transformer.get_submodule(name).bias.zero_()
    return transformer


def model_folder(root, transformer, targets: str, rank=4, alpha=8.0):
    """A models/ folder with a LoRA (random A and B, alpha != rank) on ``targets`` and a pooled fusion file."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    FluxFillPipeline.save_lora_weights(root / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer),
                                       transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    SemanticFusion("learned", 32, 24, init=0.3).save(root / "fusion.safetensors")
    return sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
                   for k in load_file(str(root / "lora" / "pytorch_lora_weights.safetensors"))})


def merged(transformer, file, metadata_from=None) -> dict[str, torch.Tensor]:
    """Merged weights after diffusers' ``lora_state_dict`` + ``load_lora_into_transformer`` + ``fuse_lora``.

    Keys the converter leaves without the ``transformer.`` prefix (x_embedder, proj_out, norm_out.linear) are
    re-prefixed; the transformer's weights are put back afterwards.
    """
    if metadata_from:
        state, metadata = FluxFillPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    else:
        state, metadata = FluxFillPipeline.lora_state_dict(str(file)), None
    state = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in state.items()}
    before = {k: v.clone() for k, v in transformer.state_dict().items() if not k.startswith("meta")
              and v.device.type != "meta"}
    FluxFillPipeline.load_lora_into_transformer(state, None, transformer, metadata=metadata)
    transformer.fuse_lora()
    out = {name: m.weight.detach().clone() for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    transformer.unload_lora()
    transformer.load_state_dict(before, strict=False, assign=False)
    return out


def check_round_trip(tmp_path, transformer, targets: str):
    folder = tmp_path / "models"
    modules = model_folder(folder, transformer, targets)
    transformer.unload_lora()
    base = {m: transformer.get_submodule(m).weight.detach().clone() for m in modules}
    reference = merged(transformer, folder / "lora", metadata_from=True)
    assert sorted(reference) == modules and "x_embedder" in modules
    for fmt in ("kohya", "comfyui"):
        written = export(folder, fmt, tmp_path / f"{fmt}.safetensors")
        assert [p.name for p in written] == [f"{fmt}.safetensors", f"{fmt}.fusion.safetensors"]
        got = merged(transformer, written[0])
        assert sorted(got) == modules, fmt
        for m in modules:
            assert (reference[m] - base[m]).abs().max() > 1e-3, m  # the LoRA changes the weight
            err, size = (got[m] - reference[m]).abs().max().item(), reference[m].abs().max().item()
            assert err <= 1e-6 + 1e-5 * size, (fmt, m, err)  # float tolerance (the scale is split differently)
    return modules


def test_kohya_and_comfyui_round_trip_through_diffusers_converters(tmp_path):
    modules = check_round_trip(tmp_path, tiny_transformer(), TINY_TARGETS)
    # 10 outside the blocks, 14 in each of the 2 double-stream blocks, 2 in each of the 4 single-stream ones
    assert len(modules) == 10 + 2 * 14 + 4 * 2
    assert {"proj_out", "norm_out.linear", "time_text_embed.guidance_embedder.linear_1"} <= set(modules)
    keys = load_file(str(tmp_path / "kohya.safetensors")).keys()
    assert {"lora_unet_img_in.lora_down.weight", "lora_unet_img_in.lora_up.weight", "lora_unet_img_in.alpha",
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_final_layer_linear.alpha",
            "lora_unet_single_blocks_0_linear2.lora_up.weight"} <= set(keys)
    comfy = load_file(str(tmp_path / "comfyui.safetensors"))
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert comfy["diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight"].shape == (12, 96)  # 3 x rank 4, the tiny inner width 96
    assert comfy["diffusion_model.double_blocks.0.txt_attn.qkv.alpha"].item() == 24.0  # 3 x alpha 8
    assert comfy["diffusion_model.img_in.lora_down.weight"].shape == (4, 384)  # the Fill-only input width
    assert comfy["diffusion_model.img_in.alpha"].item() == 8.0  # the trained alpha
    assert comfy["diffusion_model.final_layer.linear.alpha"].item() == 4.0  # scale folded into the weights


def test_fused_single_block_linear1_round_trips_at_flux_width(tmp_path):
    transformer = wide_transformer(["x_embedder", "single_transformer_blocks.0.attn.to_q",
                                    "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v",
                                    "single_transformer_blocks.0.proj_mlp"])
    modules = check_round_trip(tmp_path, transformer, WIDE_TARGETS)
    assert len(modules) == 5
    comfy = load_file(str(tmp_path / "comfyui.safetensors"))
    assert comfy["diffusion_model.single_blocks.0.linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    assert comfy["diffusion_model.single_blocks.0.linear1.alpha"].item() == 32.0  # 4 parts x alpha 8


def test_stock_load_lora_weights_silently_drops_img_in(tmp_path):
    """diffusers 0.42's FluxFillPipeline.load_lora_weights on a kohya/ComfyUI file leaves x_embedder without LoRA."""
    transformer = tiny_transformer()
    model_folder(tmp_path / "models", transformer, TINY_TARGETS)
    transformer.unload_lora()
    pipe = FluxFillPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
    for fmt in ("kohya", "comfyui"):
        file = export(tmp_path / "models", fmt, tmp_path / f"{fmt}.safetensors")[0]
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = diffusers_logging.get_logger("diffusers")
        logger.addHandler(handler)
        try:
            pipe.load_lora_weights(str(file), adapter_name=fmt)
        finally:
            logger.removeHandler(handler)
        assert hasattr(transformer.transformer_blocks[0].attn.to_q, "lora_A")  # the block modules are loaded
        for dropped in ("x_embedder", "proj_out", "norm_out.linear"):
            assert not hasattr(transformer.get_submodule(dropped), "lora_A"), (fmt, dropped)
        warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert not any("x_embedder" in w or "img_in" in w for w in warnings), warnings  # silently
        pipe.unload_lora_weights()


def test_cli_export_formats_and_fusion_sidecar(tmp_path, model_dir, model_factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--format", "comfyui", "--out", "comfy.safetensors", "--model", str(model_dir)]) == 0
    assert "export: comfyui LoRA -> comfy.safetensors, fusion sidecar -> comfy.fusion.safetensors" in capsys.readouterr().out
    comfy = load_file("comfy.safetensors")
    assert all(k.startswith("diffusion_model.") for k in comfy) and "diffusion_model.img_in.lora_down.weight" in comfy
    with safe_open("comfy.safetensors", "pt") as f:
        assert f.metadata()["fluxfill.fusion_sidecar"] == "comfy.fusion.safetensors"
    sidecar = SemanticFusion.load(tmp_path / "comfy.fusion.safetensors")
    assert sidecar.mode == "learned" and float(sidecar.alpha.detach()) == pytest.approx(0.3)
    assert (tmp_path / "comfy.fusion.safetensors").read_bytes() == (model_dir / "fusion.safetensors").read_bytes()

    assert main(["export", "--format", "diffusers", "--out", "d/lora.safetensors", "--model", str(model_dir)]) == 0
    assert "export: diffusers LoRA -> d/lora.safetensors, fusion sidecar -> d/lora.fusion.safetensors" in \
        capsys.readouterr().out
    lora = model_dir / "lora" / "pytorch_lora_weights.safetensors"
    assert (tmp_path / "d" / "lora.safetensors").read_bytes() == lora.read_bytes()
    assert (tmp_path / "d" / "lora.fusion.safetensors").read_bytes() == (model_dir / "fusion.safetensors").read_bytes()

    model_factory(tmp_path / "baseline", fusion_mode="none")
    assert main(["export", "--format", "kohya", "--out", "k.safetensors", "--model", "baseline"]) == 0
    assert "(no fusion sidecar: fusion mode none)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("k*")) == ["k.safetensors"]
    assert main(["export", "--format", "kohya", "--out", "k.safetensors", "--model", "nowhere"]) == 1
    assert "nowhere/lora/pytorch_lora_weights.safetensors not found" in capsys.readouterr().err
    # files the user can share: the umask's mode, as for any new file
    umask = os.umask(0)
    os.umask(umask)
    for f in ("comfy.safetensors", "comfy.fusion.safetensors", "k.safetensors", "d/lora.safetensors"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~umask, f

    # an existing file is replaced only with --overwrite
    (tmp_path / "comfy.fusion.safetensors").write_bytes(b"mine")
    before = (tmp_path / "comfy.safetensors").read_bytes()
    assert main(["export", "--format", "comfyui", "--out", "comfy.safetensors", "--model", str(model_dir)]) == 1
    assert capsys.readouterr().err.strip() == ("fluxfill export: error: comfy.safetensors and comfy.fusion.safetensors "
                                               "exist(s): pass --overwrite to replace, or choose another --out")
    assert (tmp_path / "comfy.fusion.safetensors").read_bytes() == b"mine"
    assert (tmp_path / "comfy.safetensors").read_bytes() == before
    assert main(["export", "--format", "comfyui", "--out", "comfy.safetensors", "--model", str(model_dir),
                 "--overwrite"]) == 0
    assert (tmp_path / "comfy.fusion.safetensors").read_bytes() == (model_dir / "fusion.safetensors").read_bytes()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
@pytest.mark.parametrize(("file", "how", "message"), [
    ("lora/pytorch_lora_weights.safetensors", "truncate", r"damaged or truncated LoRA file \(.+\); rebuild it with "),
    ("fusion.safetensors", "truncate", r"damaged or truncated fusion file \(.+\); rebuild it with "),
    ("fusion.safetensors", "delete", r" not found: run `fluxfill train`"),
])
def test_a_damaged_or_missing_model_file_is_one_line_and_nothing_is_written(tmp_path, model_dir, monkeypatch, capsys,
                                                                            fmt, file, how, message):
    folder = tmp_path / "models"
    shutil.copytree(model_dir, folder)
    target = folder / file
    if how == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--format", fmt, "--out", "out/x.safetensors", "--model", "models"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(rf"fluxfill export: error: models/{re.escape(file)}:? ?{message}",
                                                   err), err
    assert not (tmp_path / "out").exists()
