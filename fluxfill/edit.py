"""Apply a trained LoRA + fusion weight to your own photos: `fluxfill edit` and the Python API behind it.

Each source is placed whole on a square panel of the model's panel size (scaled so its longer side fits, the
border filled by repeating the edge pixels), the enhanced diptych [source | target] and its mask are built by
the same code as training (fluxfill.panels), FluxFillPipeline paints the target half with the LoRA and the
fused pooled embedding of prompt and reference, and the painted region is scaled back: the edited PNG covers
the whole source at the source's size and aspect ratio. Source k of a run uses the seed --seed + k.

--source takes files, folders (their image files) and quoted globs ("photos/*.jpg"). Every input is checked
before anything runs, as `fluxfill prepare` does: unreadable, truncated or non-image files, missing files,
globs matching nothing, two sources writing the same output, outputs that already exist (--overwrite replaces
them, a source is never overwritten). All problems are listed at once, and nothing is written. Grey, 16-bit,
palette and transparent images are converted to RGB (transparency on white); EXIF orientation is applied.

--model is a model folder (default: models/ of this repository, written by `fluxfill train`) or a registered
MLflow model: models:/NAME@ALIAS, models:/NAME/VERSION, or runs:/RUN_ID (the version that run registered).
--steps, --guidance and --seed default to the model's evaluation settings (a registered version's own, else
the eval section of params.yaml), --prompt to its training prompt.

Writes <out>/<source stem>.png with the settings in PNG text chunks (prompt, seed, steps, guidance,
fusion_mode, alpha, model, panel_size, fluxfill_version, source, reference), and with --side-by-side also
<out>/<source stem>.side-by-side.png: [reference | source | edited] at the source's height.

Python:
  from fluxfill import Editor
  ed = Editor.load("models")                  # or "models:/fluxfill-diptych@champion"
  out = ed(Image.open("in.jpg"), Image.open("ref.jpg"))    # a PIL image, the size of the source

Examples:
  fluxfill edit --source in.png --reference ref.jpg --out edited
  fluxfill edit --source photos/ "more/*.jpg" --reference ref.jpg --batch-size 4 --side-by-side
  fluxfill edit --source in.png --reference ref.jpg --model models:/fluxfill-diptych@champion --steps 28
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from . import __version__
from .artifacts import FUSION_FILE, LORA_DIR, SPEC_FILE
from .config import EvalConfig, FluxfillError, ModelSpec, Params, load_params, repo_root
from .data import open_checked, read_image
from .fusion import SemanticFusion
from .models import best_device, load_pipeline, resolve_dtype
from .panels import Panels, concat, fit_panel, to_rgb
from .sampling import fusion_encoders, generate, load_fusion, load_lora

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SIDE_BY_SIDE = ".side-by-side.png"


def letterbox(img: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The whole image on a ``size`` x ``size`` RGB panel and the box it occupies there.

    Scaled (Lanczos) so that its longer side is ``size``, centred; the border repeats the edge pixels, so the
    model sees no artificial frame. Nothing is cropped.
    """
    img, _ = to_rgb(img)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (size - nw) // 2, (size - nh) // 2
    pixels = np.pad(np.asarray(img), ((top, size - nh - top), (left, size - nw - left), (0, 0)), mode="edge")  # [S, S, 3]
    return Image.fromarray(pixels, "RGB"), (left, top, left + nw, top + nh)


def read_spec(folder: Path) -> ModelSpec:
    file = folder / SPEC_FILE
    if not file.exists():
        raise FluxfillError(f"{file} not found: {folder} is not a trained model folder; run `fluxfill train` "
                            "(or `dvc repro train`), or pass --model models:/<name>@<alias>")
    try:
        return ModelSpec.model_validate_json(file.read_text())
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise FluxfillError(f"{file}: not a valid fluxfill model spec ({first}); re-run `fluxfill train`") from e


def _check_reference(fusion: SemanticFusion, reference) -> None:
    """Refuse a missing reference for a model whose fusion mixes one in."""
    if fusion.enabled and reference is None:
        alpha = float(fusion.alpha.detach())
        raise FluxfillError(f"this model mixes a reference into the conditioning (α = {alpha:.4f}): "
                            "pass a reference image (--reference PATH)")


class Editor:
    """A loaded model (pipeline + LoRA + fusion) that edits PIL images; ``fluxfill edit`` is a loop around it."""

    def __init__(self, spec: ModelSpec, pipe, fusion: SemanticFusion, encoders: dict, source: str,
                 defaults: EvalConfig):
        self.spec, self.pipe, self.fusion, self.encoders = spec, pipe, fusion, encoders
        self.source, self.defaults = source, defaults

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, device: str | None = None, eval_cfg: EvalConfig | None = None,
                 source: str | None = None, reference: bool | None = None) -> Editor:
        """Load the model folder ``folder`` (LoRA, fusion file, ``fluxfill_model.json``) on ``device``.

        Generation defaults: the spec's own eval settings, else ``eval_cfg``, else :class:`EvalConfig`'s.
        ``reference=False`` (no reference will be given) refuses a model that needs one before the pipeline loads.
        """
        folder = Path(folder)
        spec = read_spec(folder)
        fusion_file = folder / FUSION_FILE
        if not fusion_file.exists():
            raise FluxfillError(f"{fusion_file} not found: {folder} is not a complete model folder; re-run `fluxfill train`")
        fusion = load_fusion(fusion_file)
        if fusion.mode != spec.fusion.mode:
            raise FluxfillError(f"{fusion_file} holds fusion mode {fusion.mode!r} but {folder / SPEC_FILE} says "
                                f"{spec.fusion.mode!r}: the folder mixes two runs; re-run `fluxfill train`")
        if reference is False:
            _check_reference(fusion, None)
        dev = best_device(device or "auto")
        dtype = resolve_dtype(spec.model.dtype, dev)
        pipe = load_pipeline(spec.model, dev, dtype)
        load_lora(pipe, folder / LORA_DIR, spec.lora)
        fusion = fusion.to(dev)
        encoders = fusion_encoders(spec.model, fusion, dev, dtype)
        return cls(spec, pipe, fusion, encoders, source or str(folder), spec.eval or eval_cfg or EvalConfig())

    @classmethod
    def load(cls, model: str | os.PathLike = "models", device: str | None = None, params: Params | None = None,
             reference: bool | None = None) -> Editor:
        """A model folder, or a registered model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID``.

        ``params`` (default: ./params.yaml, if any) gives the MLflow tracking store and, for a folder, the
        generation defaults (its eval section). ``reference``: as in :meth:`from_dir`.
        """
        from .registry import download_model, is_model_uri

        params = params or load_params()
        if not is_model_uri(str(model)):
            return cls.from_dir(model, device, params.eval, reference=reference)
        with tempfile.TemporaryDirectory(prefix="fluxfill-model-") as tmp:
            folder, source = download_model(str(model), params.tracking, Path(tmp))
            return cls.from_dir(folder, device, params.eval, source=source, reference=reference)

    @property
    def alpha(self) -> float | None:
        """The trained fusion weight α, None for ``fusion.mode: none``."""
        a = self.fusion.alpha
        return None if a is None else float(a.detach())

    def settings(self, prompt: str | None = None, seed: int | None = None, steps: int | None = None,
                 guidance: float | None = None) -> dict:
        """The generation settings after defaults: ``{"prompt", "seed", "steps", "guidance"}``."""
        d = self.defaults
        return {"prompt": self.spec.prompt if prompt is None else prompt, "seed": d.seed if seed is None else seed,
                "steps": d.num_inference_steps if steps is None else steps,
                "guidance": d.guidance_scale if guidance is None else guidance}

    def png_text(self, settings: dict) -> dict[str, str]:
        """The PNG text chunks of an edited image made with ``settings`` (see :meth:`settings`)."""
        return {"prompt": settings["prompt"], "seed": str(settings["seed"]), "steps": str(settings["steps"]),
                "guidance": f"{settings['guidance']:g}", "fusion_mode": self.spec.fusion.mode,
                "alpha": "none" if self.alpha is None else f"{self.alpha:.6f}", "model": self.source,
                "panel_size": str(self.spec.panel_size), "fluxfill_version": __version__}

    def reference_panel(self, reference: Image.Image | None) -> Image.Image | None:
        """The reference as the fusion sees it (a square panel, as in training); None when it is not used."""
        if not self.fusion.enabled:
            if reference is not None:
                log.info("the model has fusion mode 'none': the reference is not used")
            return None
        _check_reference(self.fusion, reference)
        return fit_panel(reference, self.spec.panel_size)

    def edit(self, sources: Sequence[Image.Image], reference: Image.Image | None = None, *,
             prompt: str | None = None, seed: int | None = None, steps: int | None = None,
             guidance: float | None = None, batch_size: int | None = None) -> list[Image.Image]:
        """Edited RGB images, each the size of its source; source ``k`` uses the seed ``seed + k``."""
        s = self.settings(prompt, seed, steps, guidance)
        size = self.spec.panel_size
        ref = self.reference_panel(reference)
        boxed = [letterbox(src, size) for src in sources]
        panels = [Panels(reference=ref or panel, source=panel, target=panel) for panel, _ in boxed]  # target: masked
        painted = generate(self.pipe, self.fusion, panels, [s["prompt"]] * len(panels), num_inference_steps=s["steps"],
                           guidance_scale=s["guidance"], seed=s["seed"], batch_size=batch_size,
                           max_sequence_length=self.spec.model.max_sequence_length, progress=False, **self.encoders)
        return [img.crop(box).resize(src.size, Image.Resampling.LANCZOS)
                for img, (_, box), src in zip(painted, boxed, sources, strict=True)]

    def __call__(self, source: Image.Image | Sequence[Image.Image], reference: Image.Image | None = None, **kwargs):
        """One PIL image in, one edited PIL image out (a list in, a list out); keywords as :meth:`edit`."""
        if isinstance(source, Image.Image):
            return self.edit([source], reference, **kwargs)[0]
        return self.edit(list(source), reference, **kwargs)


# --------------------------------------------------------------------------------------------- files
@dataclass
class EditPlan:
    sources: list[Path]
    outputs: list[Path]
    reference: Path | None


def expand_sources(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their image files, sorted) and globs -> ``(files, problems)``, each file once."""
    files: list[Path] = []
    problems: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                problems.append(f"{item}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: no file matches this pattern")
            files += found
        else:
            problems.append(f"{item}: file not found")
    unique = list(dict.fromkeys(f.resolve() for f in files))
    return [Path(os.path.relpath(f)) if f.is_relative_to(Path.cwd()) else f for f in unique], problems


def _output_problems(sources: list[Path], out: Path, side_by_side: bool, overwrite: bool) -> tuple[list[Path], list[str]]:
    problems: list[str] = []
    outputs, owner = [], {}
    inputs = {s.resolve() for s in sources}
    for src in sources:
        target = out / f"{src.stem}.png"
        outputs.append(target)
        for f in (target, out / f"{src.stem}{SIDE_BY_SIDE}") if side_by_side else (target,):
            if f.resolve() in inputs:
                problems.append(f"{src}: its output {f} would overwrite a source; choose another --out")
            elif f in owner:
                problems.append(f"{src}: its output {f} is also the output of {owner[f]}; rename one of them")
            elif f.exists() and not overwrite:
                problems.append(f"{src}: {f} exists; pass --overwrite to replace it, or choose another --out")
            owner.setdefault(f, src)
    return outputs, problems


def plan_edit(sources: Sequence[str], reference: str | None, out: str | os.PathLike, side_by_side: bool = False,
              overwrite: bool = False) -> EditPlan:
    """Check every input and output before anything runs; FluxfillError lists every problem (nothing written)."""
    files, problems = expand_sources(sources)
    ref = Path(reference) if reference else None
    for label in [str(f) for f in files] + ([str(ref)] if ref else []):
        if not Path(label).is_file():
            problems.append(f"{label}: file not found")
            continue
        img, problem = open_checked(label)
        if problem:
            problems.append(problem)
        elif note := to_rgb(img)[1]:
            log.info("%s: %s", label, note)
    outputs, out_problems = _output_problems(files, Path(out), side_by_side, overwrite)
    problems += out_problems
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise FluxfillError(f"edit found {len(problems)} problem(s) (nothing written):\n{lines}")
    return EditPlan(files, outputs, ref)


def save_png(img: Image.Image, path: Path, text: dict[str, str]) -> None:
    """Write ``img`` as PNG with ``text`` chunks, atomically (a temporary file renamed into place)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def strip(reference: Image.Image | None, source: Image.Image, edited: Image.Image) -> Image.Image:
    """``[reference | source | edited]`` at the source's height (the reference as the model saw it, square)."""
    h = source.height
    panels = [reference.resize((h, h), Image.Resampling.LANCZOS)] if reference is not None else []
    return concat([*panels, to_rgb(source)[0], edited])


def edit_files(editor: Editor, plan: EditPlan, *, prompt: str | None = None, seed: int | None = None,
               steps: int | None = None, guidance: float | None = None, batch_size: int = 1,
               side_by_side: bool = False) -> list[Path]:
    """Edit the planned files in batches (a progress bar per image); each output is written when its batch is done."""
    s = editor.settings(prompt, seed, steps, guidance)
    reference = read_image(str(plan.reference)) if plan.reference else None
    ref_panel = editor.reference_panel(reference)
    for folder in {o.parent for o in plan.outputs}:
        folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tqdm(total=len(plan.sources), desc="edit", unit="image") as bar:
        for start in range(0, len(plan.sources), batch_size):
            files = plan.sources[start:start + batch_size]
            images = [read_image(str(f)) for f in files]
            edited = editor.edit(images, reference, **{**s, "seed": s["seed"] + start})
            targets = plan.outputs[start:start + batch_size]
            for k, (src_file, src, out, target) in enumerate(zip(files, images, edited, targets, strict=True)):
                text = editor.png_text({**s, "seed": s["seed"] + start + k})
                text |= {"source": str(src_file), "reference": str(plan.reference or "")}
                save_png(out, target, text)
                written.append(target)
                if side_by_side:
                    save_png(strip(ref_panel, src, out), target.with_name(target.stem + SIDE_BY_SIDE), text)
            bar.update(len(files))
    return written


def default_model(params: Params) -> Path:
    """``models/`` (train.output) of the current repository."""
    return repo_root() / params.train.output


def run_edit(params: Params, sources: Sequence[str], reference: str | None = None, out: str = "edited",
             model: str | None = None, device: str | None = None, side_by_side: bool = False,
             overwrite: bool = False, batch_size: int = 1, **settings) -> tuple[Editor, list[Path]]:
    """Plan (check everything), load the model, edit: what `fluxfill edit` and the edit-batch flow do."""
    plan = plan_edit(sources, reference, out, side_by_side, overwrite)
    editor = Editor.load(model or default_model(params), device, params, reference=plan.reference is not None)
    return editor, edit_files(editor, plan, batch_size=batch_size, side_by_side=side_by_side, **settings)


def _positive(text: str) -> int:
    import argparse

    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def add_arguments(parser) -> None:
    parser.add_argument("--source", nargs="+", required=True, metavar="PATH", help="image files, folders or quoted globs")
    parser.add_argument("--reference", default=None, metavar="PATH", help="the reference image (the wanted look)")
    parser.add_argument("--prompt", default=None, help="default: the model's training prompt")
    parser.add_argument("--model", default=None, help="model folder (default: models/) or models:/NAME@ALIAS, "
                        "models:/NAME/VERSION, runs:/RUN_ID")
    parser.add_argument("--out", default="edited", metavar="DIR", help="output folder (default: edited)")
    parser.add_argument("--steps", type=_positive, default=None, help="inference steps (default: the model's eval setting)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's eval setting)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first source (default: the model's eval seed)")
    parser.add_argument("--batch-size", type=_positive, default=1, help="sources per pipeline call (default 1)")
    parser.add_argument("--side-by-side", action="store_true", help="also write [reference | source | edited] strips")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never a source)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")


def run(params: Params, args) -> int:
    editor, written = run_edit(params, args.source, args.reference, args.out, args.model, args.device,
                               args.side_by_side, args.overwrite, args.batch_size, prompt=args.prompt,
                               seed=args.seed, steps=args.steps, guidance=args.guidance)
    alpha = "fusion none" if editor.alpha is None else f"α {editor.alpha:.4f}"
    print(f"edit: {len(written)} image(s) -> {Path(args.out)}/ (model {editor.source}, {alpha})")
    return 0

