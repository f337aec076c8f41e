"""Write the trained LoRA in the layout other FLUX tools load, with the fusion weight as a sidecar file.

Formats (--format):
  diffusers  the training file as it is (FluxFillPipeline.load_lora_weights)
  kohya      lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha   (sd-scripts, Forge, ...)
  comfyui    diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha   (ComfyUI's LoRA loaders)

kohya and comfyui use the module names of the original FLUX code (BFL): double_blocks.N.img_attn.qkv
(to_q, to_k and to_v fused into one LoRA of 3x the rank, block-diagonal up), single_blocks.N.linear1
(q, k, v and proj_mlp fused), img_in for x_embedder, final_layer.linear for proj_out, and so on. .alpha is
the training alpha (times the number of fused parts), so every tool applies the LoRA at the trained strength;
final_layer modules carry their scale folded into the weights (alpha = rank), since diffusers' converter
ignores their alpha.

The adapter on img_in (x_embedder) has 384 input features: it fits FLUX.1-Fill only.

The fusion weight cannot be expressed in these tools: it is written next to the LoRA as
<out stem>.fusion.safetensors (a copy of models/fusion.safetensors: tensors theta and proj.weight / proj.bias,
metadata "fluxfill.fusion" with mode, dims and alpha). A tool that loads only the LoRA gets the LoRA without
the reference fusion. With fusion mode none there is no sidecar. Existing files are replaced only with
--overwrite.

Examples:
  fluxfill export --format comfyui --out comfy.safetensors
  fluxfill export --format kohya --out kohya.safetensors --model models:/fluxfill-diptych@champion
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifacts import FUSION_FILE, LORA_DIR, LORA_WEIGHTS, reading, umask_mode
from .config import FluxfillError, Params

FORMATS = ("diffusers", "kohya", "comfyui")
PREFIX = {"kohya": "lora_unet_", "comfyui": "diffusion_model."}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
# diffusers module -> BFL module, or (BFL module, part, number of parts) for fused modules
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": "linear2", "norm.linear": "modulation.lin",
}
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}
FOLDED = ("final_layer.",)  # diffusers' kohya converter applies no alpha here: the scale goes into the weights


def bfl_name(module: str) -> str | tuple[str, int, int] | None:
    """The BFL module (or fused part) of a diffusers FluxTransformer2DModel module, None if it has none."""
    if m := _BLOCK.match(module):
        kind, i, rest = m.groups()
        table, block = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        target = table.get(rest)
        if target is None:
            return None
        if isinstance(target, tuple):
            return (f"{block}.{i}.{target[0]}", *target[1:])
        return f"{block}.{i}.{target}"
    return TOP.get(module)


def read_diffusers_lora(file: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float | None]:
    """``{module: (A [r, in], B [out, r])}`` of a diffusers LoRA file and its peft ``lora_alpha`` (None: absent).

    Read with diffusers' own ``lora_state_dict``; its adapter metadata keys are ``transformer.<peft key>``.
    """
    from diffusers import FluxFillPipeline

    tensors, metadata = FluxFillPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    if meta.get("alpha_pattern") or meta.get("use_rslora") or meta.get("use_dora"):
        raise FluxfillError(f"{file}: alpha_pattern, rsLoRA or DoRA adapters are not exportable to kohya/comfyui")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise FluxfillError(f"{file}: unexpected key {key!r}; expected transformer.<module>.lora_A/B.weight")
        modules.setdefault(m.group(1), {})[m.group(2)] = value
    return {k: (v["A"], v["B"]) for k, v in modules.items()}, meta.get("lora_alpha")


def _fuse(parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]], n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA for a fused module: down = cat(A_k) ``[n*r, in]``, up = block-diag(B_k) ``[sum out_k, n*r]``.

    Missing parts get zero blocks of the same rank (their weight is left unchanged). Fused single-block linear1
    parts are q, k, v (``in`` rows each) and the MLP (``4*in`` rows), as in FLUX.
    """
    a0, _, _ = next(iter(parts.values()))
    rank, width = a0.shape
    outs = [width] * 3 + [4 * width] if n == 4 else [width] * n  # FLUX: q, k, v are dim wide, the MLP 4*dim
    scales = {scale for _, _, scale in parts.values()}
    same = len(scales) == 1
    downs, ups = [], []
    for k in range(n):
        a, b, scale = parts.get(k, (torch.zeros_like(a0), a0.new_zeros(outs[k], rank), 1.0))
        downs.append(a)
        ups.append(b if same else b * scale)  # unequal scales: folded into up, alpha = rank below
    up = torch.block_diag(*ups)  # [sum out_k, n*r]
    return torch.cat(downs), up, (scales.pop() if same else 1.0) * n * rank


def to_bfl(modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
           alpha: float | None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{BFL module: (down [r, in], up [out, r], alpha)}`` of a diffusers LoRA (``{module: (A, B)}``)."""
    unknown = sorted(m for m in modules if bfl_name(m) is None)
    if unknown:
        raise FluxfillError(f"LoRA modules with no FLUX (BFL) equivalent: {unknown}")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    fused: dict[str, tuple[int, dict[int, tuple]]] = {}
    for module, (a, b) in modules.items():
        rank = a.shape[0]
        scale = (rank if alpha is None else alpha) / rank  # peft: alpha / r; no metadata: diffusers loads alpha = r
        name = bfl_name(module)
        if isinstance(name, tuple):
            target, part, n = name
            fused.setdefault(target, (n, {}))[1][part] = (a, b, scale)
            continue
        if module == "norm_out.linear":
            first, second = b.chunk(2, dim=0)  # [2D, r]: diffusers' rows are (scale, shift), BFL's (shift, scale)
            b = torch.cat([second, first], dim=0)
        out[name] = (a, b, scale * rank)
    for target, (n, parts) in fused.items():
        out[target] = _fuse(parts, n)
    for name, (down, up, a) in out.items():
        if name.startswith(FOLDED):
            out[name] = (down, up * (a / down.shape[0]), float(down.shape[0]))
    return dict(sorted(out.items()))


def layout(bfl: dict[str, tuple[torch.Tensor, torch.Tensor, float]], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``kohya`` (``lora_unet_<module_with_underscores>``) or ``comfyui`` (``diffusion_model.<module>``) file."""
    tensors = {}
    for module, (down, up, alpha) in bfl.items():
        key = PREFIX[fmt] + (module.replace(".", "_") if fmt == "kohya" else module)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def export(model_dir: Path, fmt: str, out: Path, overwrite: bool = False) -> list[Path]:
    """Write ``out`` in ``fmt`` and, unless fusion.mode is none, the fusion sidecar; returns the files written.

    An existing ``out`` or sidecar is refused unless ``overwrite``."""
    from .sampling import load_fusion

    if fmt not in FORMATS:
        raise FluxfillError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    lora = model_dir / LORA_DIR / LORA_WEIGHTS
    if not lora.exists():
        raise FluxfillError(f"{lora} not found: run `fluxfill train` (or `dvc repro train`) first")
    with reading(lora, "train", "LoRA file"):  # read in every format: a damaged file is never copied
        modules, alpha = read_diffusers_lora(lora)
    fusion = load_fusion(model_dir / FUSION_FILE)  # missing or damaged: one line naming it
    sidecar = out.with_name(out.name.removesuffix(".safetensors") + ".fusion.safetensors") if fusion.enabled else None
    existing = [str(f) for f in (out, sidecar) if f is not None and f.exists()]
    if existing and not overwrite:
        raise FluxfillError(f"{' and '.join(existing)} exist(s): pass --overwrite to replace, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        shutil.copyfile(lora, out)
    else:
        meta = {"fluxfill.format": fmt, "fluxfill.note": "FLUX.1-Fill only: img_in has 384 input features"}
        if sidecar:
            meta["fluxfill.fusion_sidecar"] = sidecar.name
        save_file(layout(to_bfl(modules, alpha), fmt), str(out), metadata=meta)
        umask_mode(out)
    if sidecar:
        shutil.copyfile(model_dir / FUSION_FILE, sidecar)
    return [out, sidecar] if sidecar else [out]


def add_arguments(parser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="the LoRA layout to write")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    parser.add_argument("--model", default=None, help="model folder (default: models/) or models:/NAME@ALIAS, "
                        "models:/NAME/VERSION, runs:/RUN_ID")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out and its sidecar")


def run(params: Params, args) -> int:
    from .edit import default_model
    from .registry import download_model, is_model_uri

    model = args.model or str(default_model(params))
    with tempfile.TemporaryDirectory(prefix="fluxfill-export-") as tmp:
        folder = download_model(model, params.tracking, Path(tmp))[0] if is_model_uri(model) else Path(model)
        written = export(folder, args.format, Path(args.out), args.overwrite)
    print(f"export: {args.format} LoRA -> {written[0]}" + (f", fusion sidecar -> {written[1]}" if len(written) > 1
                                                             else " (no fusion sidecar: fusion mode none)"))
    return 0
