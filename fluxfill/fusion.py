"""Semantic fusion (docs/fusion.md): the weight α that mixes the reference into the pooled conditioning.

    p       = pooled_text                          # [B, P] CLIP pooled text embedding (FLUX's AdaLN input)
    e_ref   = image_encoder(reference)             # [B, E] CLIP image embedding
    r       = W e_ref                              # [B, P] the reference in the pooled-text space
    r_hat   = r * |p| / |r|        (per sample)    # same norm as p: α alone sets the mix
    pooled' = (1 - α) p + α r_hat                  # α = sigmoid(θ): the reference's share of the conditioning

``pooled'`` replaces the CLIP pooled text embedding that FLUX feeds to AdaLN, in training and at inference.
W starts at the pseudo-inverse of CLIP's text projection when the image encoder's checkpoint carries it
(``r`` is then "the pooled text that would describe the reference"), otherwise orthogonal.

Modes: ``none`` (the pooled text passes through; no reference, no α), ``fixed`` (α stays at ``fusion.init``,
W is trained), ``learned`` (α and W are trained).
"""

from __future__ import annotations

import json
import logging
import math

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FUSION_MODES, FluxfillError, FusionConfig, Params

log = logging.getLogger(__name__)
NORM_EPS = 1e-6  # a zero ‖r‖ (or ‖p‖) must not divide by zero


class SemanticFusion(nn.Module):
    def __init__(self, mode: str, pooled_dim: int, image_embed_dim: int, init: float = 0.1,
                 text_projection: torch.Tensor | None = None):
        """``text_projection``: CLIP's ``[E, P]`` text projection weight; W starts at its pseudo-inverse."""
        super().__init__()
        if mode not in FUSION_MODES:
            hint = " (renamed: 'pooled' is now 'learned')" if mode == "pooled" else ""
            raise ValueError(f"fusion mode {mode!r}: expected one of {', '.join(FUSION_MODES)}{hint}")
        if not 0.0 < init < 1.0:
            raise ValueError(f"fusion init {init}: alpha at step 0 must lie strictly inside (0, 1)")
        self.mode, self.pooled_dim, self.image_embed_dim = mode, pooled_dim, image_embed_dim
        self.init_method = "none"
        if self.enabled:
            # [1], not 0-d: FSDP2 shards parameters along dim 0. Files keep θ 0-d (save, _theta_from_file)
            self.theta = nn.Parameter(torch.full((1,), math.log(init / (1.0 - init))), requires_grad=mode == "learned")
            self.proj = nn.Linear(image_embed_dim, pooled_dim, bias=False)  # W: [P, E]
            self.init_method = self._init_proj(text_projection)
        self.register_load_state_dict_pre_hook(_theta_from_file)

    def _init_proj(self, text_projection: torch.Tensor | None) -> str:
        with torch.no_grad():
            if text_projection is not None:
                expected = (self.image_embed_dim, self.pooled_dim)
                if tuple(text_projection.shape) != expected:
                    raise ValueError(f"text projection is {list(text_projection.shape)}, expected {list(expected)} "
                                     "([image embedding, pooled text] of the same CLIP model)")
                self.proj.weight.copy_(torch.linalg.pinv(text_projection.double()).float())  # [P, E]
                return "pinv"
            nn.init.orthogonal_(self.proj.weight)
            return "orthogonal"

    @classmethod
    def from_config(cls, cfg: FusionConfig, pooled_dim: int, image_embed_dim: int,
                    text_projection: torch.Tensor | None = None) -> SemanticFusion:
        return cls(cfg.mode, pooled_dim, image_embed_dim, cfg.init, text_projection)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def alpha(self) -> torch.Tensor | None:
        """α = sigmoid(θ) as a 0-d tensor (in the graph), or None for ``mode: none``."""
        return torch.sigmoid(self.theta).reshape(()) if self.enabled else None  # [1] -> []

    def reference(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``[B, E] -> [B, P]``: r = W e_ref, before norm matching."""
        return self.proj(image_embeds.to(self.proj.weight.dtype))

    def forward(self, pooled_text: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, P] (+ [B, E]) -> [B, P]``: the fused pooled embedding."""
        if not self.enabled:
            return pooled_text
        if image_embeds is None:
            raise ValueError(f"fusion mode {self.mode!r} needs the reference image embedding")
        p = pooled_text.float()  # [B, P]
        r = self.reference(image_embeds).float()  # [B, P]
        scale = p.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # [B, 1]
        alpha = self.alpha.float()
        return ((1 - alpha) * p + alpha * (r * scale)).to(pooled_text.dtype)

    @torch.no_grad()
    def stat_tensors(self, pooled_text: torch.Tensor, image_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``fusion_weight`` α, ``fusion_cos`` cos(p, r), ``fusion_ref_norm`` ‖r‖/‖p‖ (batch means) as 0-d tensors
        on the device, so that logging them needs no host sync; {} for mode none."""
        if not self.enabled or image_embeds is None:
            return {}
        p = pooled_text.float()  # [B, P]
        r = self.reference(image_embeds).float()  # [B, P]
        ratio = r.norm(dim=-1) / p.norm(dim=-1).clamp_min(NORM_EPS)  # [B]
        return {"fusion_weight": self.alpha.detach().float(),
                "fusion_cos": nn.functional.cosine_similarity(p, r).mean(), "fusion_ref_norm": ratio.mean()}

    def stats(self, pooled_text: torch.Tensor, image_embeds: torch.Tensor | None) -> dict[str, float]:
        """:meth:`stat_tensors` as floats."""
        return {k: float(v) for k, v in self.stat_tensors(pooled_text, image_embeds).items()}

    def save(self, path) -> None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        if "theta" in tensors:
            tensors["theta"] = tensors["theta"].reshape(())  # the file format: θ as a 0-d tensor
        meta = {"mode": self.mode, "pooled_dim": self.pooled_dim, "image_embed_dim": self.image_embed_dim,
                "init_method": self.init_method}
        if self.enabled:
            meta["alpha"] = round(float(self.alpha.detach()), 6)
        # one sorted JSON value: safetensors does not keep metadata key order, and files should be reproducible
        save_file(tensors or {"_empty": torch.zeros(0)}, str(path), metadata={"fluxfill.fusion": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path) -> SemanticFusion:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fluxfill.fusion", "{}"))
        if "mode" not in meta:
            raise FluxfillError(f"{path}: not a fluxfill fusion file (no 'mode' in its metadata)")
        if meta["mode"] not in FUSION_MODES:
            raise FluxfillError(f"{path}: fusion mode {meta['mode']!r} comes from an older fluxfill (its W has a bias "
                                "and no norm matching); retrain with `fluxfill train` (fusion.mode learned)")
        module = cls(meta["mode"], int(meta["pooled_dim"]), int(meta["image_embed_dim"]))
        module.init_method = meta.get("init_method", module.init_method)
        state = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
        module.load_state_dict(state)
        return module


def _theta_from_file(module, state_dict, prefix, *args) -> None:
    """Accept θ stored 0-d (fusion files) for the [1]-shaped parameter."""
    key = prefix + "theta"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def build_fusion(params: Params, pooled_dim: int, image_embed_dim: int) -> SemanticFusion:
    """The fusion module of ``params.fusion``; W from the pinv of CLIP's text projection when the image encoder's
    checkpoint carries one of matching shape, else orthogonal (``init_method`` says which)."""
    from .models import clip_text_projection, image_encoder_checkpoint

    projection = None
    source = image_encoder_checkpoint(params.model)
    if params.fusion.mode != "none" and source is not None:
        projection = clip_text_projection(source)
        expected = [image_embed_dim, pooled_dim]
        if projection is None:
            log.warning("fusion: %s carries no CLIP text projection here; W starts orthogonal", source)
        elif list(projection.shape) != expected:
            log.warning("fusion: the text projection of %s is %s, not [image embedding, pooled text] = %s; "
                        "W starts orthogonal", source, list(projection.shape), expected)
            projection = None
    return SemanticFusion.from_config(params.fusion, pooled_dim, image_embed_dim, projection)
