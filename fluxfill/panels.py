"""Panels: the one place that builds the triptych, the enhanced diptych and the diptych mask.

The dataset (``prepare``), the latent cache (``encode``), training samples and evaluation all call
:func:`build_panels` / :func:`panels_from_triptych`, so the geometry and the mask polarity cannot drift.

- triptych ``[reference | source | target]``, ``3*size`` x ``size``
- enhanced diptych ``[source | target]``, ``2*size`` x ``size``
- diptych mask, mode ``L``: 0 over the source half (keep), 255 over the target half (paint)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import check_panel_size


@dataclass(frozen=True)
class Panels:
    reference: Image.Image
    source: Image.Image
    target: Image.Image

    @property
    def size(self) -> int:
        return self.source.width

    @property
    def triptych(self) -> Image.Image:
        return concat([self.reference, self.source, self.target])

    @property
    def diptych(self) -> Image.Image:
        return concat([self.source, self.target])

    @property
    def mask(self) -> Image.Image:
        return diptych_mask(self.size)


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB; returns the image and a note saying what was converted (or None).

    Alpha is composited on white; 16-bit greys are scaled to 8 bits rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return img.convert("RGB"), f"{mode} (16-bit) scaled to 8-bit RGB"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img, "palette converted to RGB"
        mode = "P+alpha"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} alpha composited on white"
    return img.convert("RGB"), f"{mode} converted to RGB"


def fit_panel(img: Image.Image, size: int) -> Image.Image:
    """Deterministic resize (shorter side to ``size``, Lanczos) and centre crop to ``size`` x ``size`` RGB."""
    check_panel_size(size)
    img, _ = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def concat(panels: list[Image.Image]) -> Image.Image:
    h = panels[0].height
    if any(p.height != h for p in panels):
        raise ValueError(f"panels differ in height: {[p.size for p in panels]}")
    out = Image.new("RGB", (sum(p.width for p in panels), h))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    return out


def diptych_mask(size: int) -> Image.Image:
    """``[0 | 255]`` mask of a ``2*size`` x ``size`` diptych: keep the source, paint the target."""
    check_panel_size(size)
    arr = np.zeros((size, 2 * size), dtype=np.uint8)  # [H, 2H]
    arr[:, size:] = 255
    return Image.fromarray(arr, "L")


def build_panels(source: Image.Image, target: Image.Image, reference: Image.Image, size: int) -> Panels:
    """Fit the three images to square panels of side ``size``."""
    return Panels(reference=fit_panel(reference, size), source=fit_panel(source, size), target=fit_panel(target, size))


def panels_from_triptych(triptych: Image.Image) -> Panels:
    """Split a stored ``[reference | source | target]`` triptych back into its panels."""
    w, h = triptych.size
    if w != 3 * h:
        raise ValueError(f"triptych is {w}x{h}; a triptych is 3 square panels wide (expected {3 * h}x{h})")
    check_panel_size(h)
    triptych, _ = to_rgb(triptych)
    crop = [triptych.crop((i * h, 0, (i + 1) * h, h)) for i in range(3)]
    return Panels(reference=crop[0], source=crop[1], target=crop[2])
