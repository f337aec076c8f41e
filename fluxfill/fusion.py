"""Semantic fusion (DESIGN §4): the learnable weight α that mixes the reference into the pooled conditioning.

    e_ref   = image_encoder(reference)               # CLIP image embedding
    pooled' = (1 - α) * pooled_text + α * W e_ref    # W trainable projection, α = sigmoid(θ), θ trainable

``pooled'`` replaces the CLIP pooled text embedding that FLUX feeds to AdaLN, in training and at inference.
``mode: none`` is the baseline: the pooled text embedding passes through and there is no α.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FusionConfig


class SemanticFusion(nn.Module):
    def __init__(self, mode: str, pooled_dim: int, image_embed_dim: int, init: float = 0.1):
        super().__init__()
        if mode not in ("none", "pooled"):
            raise ValueError(f"fusion mode {mode!r}: expected 'none' or 'pooled'")
        if not 0.0 < init < 1.0:
            raise ValueError(f"fusion init {init}: alpha at step 0 must lie strictly inside (0, 1)")
        self.mode, self.pooled_dim, self.image_embed_dim = mode, pooled_dim, image_embed_dim
        if mode == "pooled":
            # [1], not 0-d: FSDP2 shards parameters along dim 0. Files keep θ 0-d (save, _theta_from_file)
            self.theta = nn.Parameter(torch.full((1,), math.log(init / (1.0 - init))))
            self.proj = nn.Linear(image_embed_dim, pooled_dim)
        self.register_load_state_dict_pre_hook(_theta_from_file)

    @classmethod
    def from_config(cls, cfg: FusionConfig, pooled_dim: int, image_embed_dim: int) -> SemanticFusion:
        return cls(cfg.mode, pooled_dim, image_embed_dim, cfg.init)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def alpha(self) -> torch.Tensor | None:
        """α = sigmoid(θ) as a 0-d tensor (in the graph), or None for ``mode: none``."""
        return torch.sigmoid(self.theta).reshape(()) if self.enabled else None  # [1] -> []

    def forward(self, pooled_text: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, P] (+ [B, E]) -> [B, P]``: the fused pooled embedding."""
        if not self.enabled:
            return pooled_text
        if image_embeds is None:
            raise ValueError("fusion mode 'pooled' needs the reference image embedding")
        alpha = self.alpha.to(pooled_text.dtype)
        ref = self.proj(image_embeds.to(self.proj.weight.dtype)).to(pooled_text.dtype)  # [B, P]
        return (1 - alpha) * pooled_text + alpha * ref

    def save(self, path) -> None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        if "theta" in tensors:
            tensors["theta"] = tensors["theta"].reshape(())  # the file format: θ as a 0-d tensor
        meta = {"mode": self.mode, "pooled_dim": self.pooled_dim, "image_embed_dim": self.image_embed_dim}
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
            raise ValueError("not a fluxfill fusion file (no 'mode' in its metadata)")
        module = cls(meta["mode"], int(meta["pooled_dim"]), int(meta["image_embed_dim"]))
        state = {k: v for k, v in load_file(str(path)).items() if k != "_empty"}
        module.load_state_dict(state)
        return module


def _theta_from_file(module, state_dict, prefix, *args) -> None:
    """Accept θ stored 0-d (fusion files) for the [1]-shaped parameter."""
    key = prefix + "theta"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)
