"""Print the dimension flow of the diptych contract, computed by running it (never from constants).

Builds a batch of synthetic diptychs at --panel-size, encodes them with the preset's VAE, text encoders and
CLIP vision tower, fuses the pooled embedding and runs one training forward pass of the Fill transformer.
Each line is ``name: [d0, d1, ...]``. With --preset flux-fill-dev-random --device meta the full-size
12B architecture runs on the meta device: shapes only, no weights, no download.

Examples:
  fluxfill shapes                                   # the docs/design.md §2 table: batch 4, 512-px panels
  fluxfill shapes --batch 3 --panel-size 256
  fluxfill shapes --preset flux-fill-dev-random --device meta
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import FusionConfig, ModelConfig, check_panel_size
from .fusion import SemanticFusion
from .latents import encode_diptychs, encode_prompts, encode_references, text_pipeline, vae_pipeline
from .models import load_component
from .objective import flow_matching_step
from .panels import build_panels


def synthetic_panels(batch: int, panel_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        imgs = [Image.fromarray(rng.integers(0, 256, (panel_size, panel_size, 3), dtype=np.uint8)) for _ in range(3)]
        out.append(build_panels(*imgs, size=panel_size))
    return out


@torch.no_grad()
def contract_shapes(model_cfg: ModelConfig, fusion_cfg: FusionConfig, batch: int = 4, panel_size: int = 512,
                    device: str = "cpu") -> dict[str, list[int] | float | None]:
    """Run encode + fusion + one forward pass and return every tensor's shape, plus α."""
    check_panel_size(panel_size)
    if device == "meta" and model_cfg.preset == "flux-fill-dev":
        raise ValueError("--device meta builds random architectures: use --preset flux-fill-dev-random or tiny")
    panels = synthetic_panels(batch, panel_size)
    load = lambda name: load_component(model_cfg, name, device)  # noqa: E731
    enc = encode_diptychs(vae_pipeline(load("vae")), [p.diptych for p in panels], [p.mask for p in panels])
    text = text_pipeline(load("text_encoder"), load("tokenizer"), load("text_encoder_2"), load("tokenizer_2"))
    prompts = [f"A diptych, sample {i}" for i in range(batch)]
    prompt_embeds, pooled, txt_ids = encode_prompts(text, prompts, model_cfg.max_sequence_length)
    image_embeds = encode_references(load("image_encoder"), load("image_processor"), [p.reference for p in panels])
    transformer = load("transformer")
    fusion = SemanticFusion.from_config(fusion_cfg, pooled.shape[-1], image_embeds.shape[-1])
    alpha = fusion.alpha  # at step 0, read before a move to the meta device
    fusion = fusion.to(device)
    batch_tensors = dict(x_0=enc.x_0, masked_latents=enc.masked_latents, mask_latents=enc.mask_latents,
                         prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, image_embeds=image_embeds,
                         img_ids=enc.img_ids, txt_ids=txt_ids)
    step = flow_matching_step(transformer, fusion, batch_tensors)
    shape = lambda t: list(t.shape)  # noqa: E731
    return {
        "enhanced_diptych": shape(enc.pixels),
        "mask_diptych": shape(enc.mask),
        "vae_latents": shape(enc.vae_latents),
        "x_0": shape(enc.x_0),
        "masked_latents": shape(enc.masked_latents),
        "mask_latents": shape(enc.mask_latents),
        "x_cond": shape(enc.x_cond),
        "img_ids": shape(enc.img_ids),
        "prompt_embeds": shape(prompt_embeds),
        "pooled_prompt_embeds": shape(pooled),
        "txt_ids": shape(txt_ids),
        "image_embeds": shape(image_embeds),
        "fused_pooled": shape(step.pooled),
        "hidden_states": shape(step.hidden_states),
        "model_output": shape(step.model_output),
        "fusion_weight": None if alpha is None else round(float(alpha), 4),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default=None, choices=["tiny", "flux-fill-dev", "flux-fill-dev-random"],
                        help="model preset (default: model.preset of params.yaml, i.e. tiny)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--panel-size", type=int, default=512, help="panel side in pixels, a multiple of 16 (default 512)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or meta (flux-fill-dev-random only)")


def run(params, args) -> int:
    model_cfg = params.model.model_copy(update={"preset": args.preset} if args.preset else {})
    try:
        shapes = contract_shapes(model_cfg, params.fusion, args.batch, args.panel_size, args.device)
    except ValueError as e:
        print(f"fluxfill shapes: {e}")
        return 2
    print(f"# preset {model_cfg.preset}, batch {args.batch}, panel {args.panel_size}px, device {args.device}")
    for name, value in shapes.items():
        if name == "fusion_weight":
            print(f"fusion_weight (alpha): {'n/a (fusion.mode none)' if value is None else value}")
        else:
            print(f"{name}: [{', '.join(map(str, value))}]")
    return 0
