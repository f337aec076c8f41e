"""Build the triptych dataset in data/prepared (the DVC stage `prepare`).

Each sample becomes one PNG triptych [reference | source | target], 3*panel x panel pixels
(1536x512 at data.panel_size=512), listed in manifest.csv with the columns
id, split, prompt, source, target, reference, sha256, file.

Sources (data.source):
  demo      (default) real photos bundled with scikit-image, no download; photos smaller than a
            panel are upscaled. data.demo_task picks what the model learns:
              enhance  (default) the source is a seeded degradation of each photo (darker, noisy,
                       slightly soft), the target the clean photo, the reference a clean photo of
                       another scene. The reference is not needed to solve it.
              tint     the source is the clean photo, the target the same photo re-graded with a
                       colour look (one of LOOKS, seeded per sample), the reference another photo
                       with the same look. The prompt does not name the look: only the reference
                       shows it, so fusion is what can solve it.
  folder    data.path (default data/raw) holds image files matched by name (file stem = sample id):
              data/raw/source/<id>.png      the image to enhance
              data/raw/target/<id>.png      the wanted result
              data/raw/reference/<id>.png   optional; missing: another sample's target (seeded)
  manifest  data.path is a CSV file with the columns source,target[,reference,prompt,split];
            paths are relative to the CSV's folder, prompt replaces the prompt template for that
            row, split (train or val) fixes the row's split. The sample id is the source file stem.

The prompt is data.prompt_template with data.instruction (null: the demo task's own); the train/val split is seeded
(data.val_fraction, data.seed). Same inputs and params give byte-identical files.

Everything is checked before anything is written: unreadable, truncated or non-image files, missing
pairs, duplicate ids, images smaller than a panel (an error unless data.allow_upscale=true), paths
leaving the data root, an empty dataset, missing manifest columns. All problems are listed at once
and an earlier data/prepared is left as it was. Grey, palette, 16-bit and transparent images are
converted to RGB (transparency on white), each noted in the log.

Examples:
  fluxfill prepare
  fluxfill prepare --set data.source=folder --set data.path=data/raw
  fluxfill prepare --set data.source=manifest --set data.path=data/raw/pairs.csv
  fluxfill prepare --check          validate the inputs, write nothing
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .artifacts import MANIFEST, damaged, reading
from .config import DataConfig, FluxfillError
from .panels import build_panels, fit_panel, to_rgb
from .safety import check_outputs

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("id", "split", "prompt", "source", "target", "reference", "sha256", "file")
READ_COLUMNS = ("id", "split", "prompt", "file", "sha256")  # what the later stages read of the manifest
INPUT_COLUMNS = ("source", "target", "reference", "prompt", "split")
REQUIRED_COLUMNS = ("source", "target")
SPLITS = ("train", "val")
FOLDERS = ("source", "target", "reference")

# Photos shipped inside the scikit-image package (no pooch download); grey, RGBA and small ones included.
DEMO_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "logo", "moon", "motorcycle_left", "page", "retina",
    "rocket", "text",
)
DEMO_PREFIX = "skimage:"
DEGRADED = "#degraded"
LOOK_TAG = "#look="  # skimage:<name>#look=<look>: the photo re-graded with a colour look of LOOKS

# Colour looks of the tint task, on RGB in [0, 1]: x' = clip(x @ matrix.T + shadows (1 - l) + highlights l),
# l the luminance of x. Each is clearly visible and different from the others (warm, cool, split-tone, ...).
LOOKS: dict[str, dict[str, tuple]] = {
    "warm": {"matrix": ((1.10, 0.05, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.75)), "shadows": (0.04, 0.02, 0.0),
             "highlights": (0.0, 0.0, 0.0)},
    "cool": {"matrix": ((0.80, 0.0, 0.0), (0.0, 0.97, 0.03), (0.0, 0.05, 1.10)), "shadows": (0.0, 0.02, 0.06),
             "highlights": (0.0, 0.0, 0.0)},
    "teal_orange": {"matrix": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), "shadows": (-0.10, 0.06, 0.10),
                    "highlights": (0.10, 0.02, -0.12)},
    "sepia": {"matrix": ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)),
              "shadows": (0.0, 0.0, 0.0), "highlights": (0.0, 0.0, 0.0)},
    "green": {"matrix": ((0.85, 0.05, 0.0), (0.0, 1.10, 0.0), (0.0, 0.05, 0.80)), "shadows": (0.0, 0.05, 0.0),
              "highlights": (0.0, 0.0, 0.0)},
    "faded": {"matrix": ((0.60, 0.15, 0.15), (0.15, 0.60, 0.15), (0.15, 0.15, 0.60)), "shadows": (0.18, 0.16, 0.20),
              "highlights": (0.0, 0.0, 0.0)},
}
_LUMA = np.array([0.299, 0.587, 0.114])

# independent random streams, so that e.g. changing val_fraction does not change the references
_SPLIT_STREAM, _REFERENCE_STREAM, _DEGRADE_STREAM, _LOOK_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class Sample:
    """One sample before it is built. Images are file paths, or ``skimage:<name>`` for the demo."""

    id: str
    source: str
    target: str
    reference: str | None = None
    prompt: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` wrote: ``count`` triptychs (``train`` + ``val``) and the manifest in ``path``."""

    path: Path
    manifest: Path
    count: int
    train: int
    val: int


# --------------------------------------------------------------------------------------------- sources


def _demo_samples(cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    if cfg.demo_task == "tint":  # the reference (another photo, same look) is borrowed in collect()
        return [Sample(id=name, source=f"{DEMO_PREFIX}{name}", target=f"{DEMO_PREFIX}{name}{LOOK_TAG}{_pick_look(cfg, name)}")
                for name in DEMO_PHOTOS], []
    samples = [
        Sample(id=name, source=f"{DEMO_PREFIX}{name}{DEGRADED}", target=f"{DEMO_PREFIX}{name}")
        for name in DEMO_PHOTOS
    ]
    return samples, []


def _pick_look(cfg: DataConfig, sample_id: str) -> str:
    names = list(LOOKS)
    return names[int(np.random.default_rng([cfg.seed, _LOOK_STREAM, zlib.crc32(sample_id.encode())]).integers(len(names)))]


def _escapes(path: Path, root: Path) -> str | None:
    """Why ``path`` (after following symlinks) is outside ``root``, or None."""
    real = path.resolve()
    if real.is_relative_to(root.resolve()):
        return None
    return f"leads outside the data root {root} (resolves to {real}); copy the file into {root}"


def _folder_samples(cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    root = Path(cfg.path)
    layout = f"data.source=folder expects {root}/source/ and {root}/target/ (and optional {root}/reference/)"
    if not root.is_dir():
        return [], [f"{root}: folder not found; {layout}"]
    problems: list[str] = []
    found: dict[str, dict[str, str]] = {}  # kind -> id -> label, usable files only
    ids: dict[str, set[str]] = {}  # kind -> every id seen, so a rejected file does not also lose its pair
    for kind in FOLDERS:
        folder = root / kind
        found[kind], ids[kind] = {}, set()
        if not folder.is_dir():
            if kind != "reference":
                problems.append(f"{folder}: folder not found; {layout}")
            continue
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                continue
            label = f.as_posix()
            ids[kind].add(f.stem)
            if reason := _escapes(f, root):
                problems.append(f"{label}: {reason}")
            elif f.is_dir():
                problems.append(f"{label}: is a folder; {kind}/ must hold image files directly")
            elif f.stem in found[kind]:
                problems.append(
                    f"{label}: duplicate id {f.stem!r} (also {found[kind][f.stem]}); keep one file per id in {kind}/"
                )
            else:
                found[kind][f.stem] = label
    if not (root / "source").is_dir() or not (root / "target").is_dir():
        return [], problems  # without both folders, pairing reports would only repeat the missing folder
    src, tgt, ref = found["source"], found["target"], found["reference"]
    for i in sorted(src.keys() - ids["target"]):
        problems.append(f"{src[i]}: missing pair: no target/{i}.* for this source; add it or remove the source")
    for i in sorted(tgt.keys() - ids["source"]):
        problems.append(f"{tgt[i]}: missing pair: no source/{i}.* for this target; add it or remove the target")
    for i in sorted(ref.keys() - ids["source"] - ids["target"]):
        problems.append(f"{ref[i]}: no source/{i}.* or target/{i}.* for this reference; check the file name")
    samples = [Sample(id=i, source=src[i], target=tgt[i], reference=ref.get(i)) for i in sorted(src.keys() & tgt.keys())]
    return samples, problems


def _manifest_path(rel: str, root: Path) -> tuple[str | None, str | None]:
    """``(label, None)`` for a usable manifest path, ``(None, reason)`` otherwise."""
    if PurePath(rel).is_absolute() or Path(rel).is_absolute():
        return None, f"absolute path; manifest paths are relative to the CSV's folder {root}"
    if ".." in PurePath(rel.replace("\\", "/")).parts:
        return None, f"'..' leaves the data root {root}; manifest paths must stay inside the CSV's folder"
    path = root / rel
    if reason := _escapes(path, root):
        return None, reason
    if not path.exists():
        return None, "file not found"
    return path.as_posix(), None


def _manifest_samples(cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    csv_path = Path(cfg.path)
    if not csv_path.is_file():
        return [], [f"{csv_path}: manifest not found; data.source=manifest expects data.path to be a CSV file"]
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [f"{csv_path}: cannot read the manifest ({e})"]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in INPUT_COLUMNS]
    if missing or unknown:
        what = "; ".join(
            part for part in (
                f"missing column(s) {', '.join(missing)}" if missing else "",
                f"unknown column(s) {', '.join(unknown)}" if unknown else "",
            ) if part
        )
        return [], [f"{csv_path}: {what}; the header must be source,target[,reference,prompt,split]"]

    problems: list[str] = []
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        labels: dict[str, str] = {}
        for col in FOLDERS:
            rel = (row.get(col) or "").strip()
            if not rel:
                if col != "reference":
                    problems.append(f"{where}: missing pair: the {col} column is empty")
                continue
            label, reason = _manifest_path(rel, root)
            if reason:
                problems.append(f"{where}: {col} {rel}: {reason}")
            else:
                labels[col] = label
        split = (row.get("split") or "").strip() or None
        if split not in (None, *SPLITS):
            problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLITS)} (or empty for a seeded split)")
        if "source" not in labels or "target" not in labels:
            continue
        sid = Path(labels["source"]).stem
        if sid in seen:
            problems.append(
                f"{where}: duplicate id {sid!r} (the source file stem, also on line {seen[sid]}); rename one of the files"
            )
            continue
        seen[sid] = line
        prompt = (row.get("prompt") or "").strip() or None
        samples.append(Sample(sid, labels["source"], labels["target"], labels.get("reference"), prompt, split))
    return sorted(samples, key=lambda s: s.id), problems


_SOURCES = {"demo": _demo_samples, "folder": _folder_samples, "manifest": _manifest_samples}


# --------------------------------------------------------------------------------------------- images


def _demo_photo(name: str) -> Image.Image:
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    return Image.fromarray(arr)


def read_image(label: str) -> Image.Image:
    """Open a sample image: a file (fully decoded, EXIF orientation applied) or ``skimage:<name>`` (any ``#...`` ignored)."""
    if label.startswith(DEMO_PREFIX):
        return _demo_photo(label[len(DEMO_PREFIX):].split("#")[0])
    with Image.open(label) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def open_checked(label: str) -> tuple[Image.Image | None, str | None]:
    """``(image, None)`` for a readable image (see :func:`read_image`), else ``(None, "<label>: <problem and fix>")``."""
    try:
        return read_image(label), None
    except UnidentifiedImageError:
        return None, f"{label}: not an image (Pillow cannot identify it); remove it or save it as PNG/JPEG"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{label}: unreadable or truncated image ({e}); re-export or remove it"


def degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The demo's source: a slightly blurred, darkened (gain and gamma), noisy copy of an RGB panel."""
    blur = rng.uniform(0.6, 1.4) * img.width / 512
    gain, gamma, noise = rng.uniform(0.5, 0.8), rng.uniform(1.4, 2.0), rng.uniform(0.02, 0.05)
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255.0  # [H, W, 3]
    x = gain * x**gamma + rng.normal(0.0, noise, size=x.shape)
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), "RGB")


def apply_look(img: Image.Image, look: str) -> Image.Image:
    """An RGB panel re-graded with the colour look ``look`` of :data:`LOOKS` (per pixel, deterministic)."""
    if look not in LOOKS:
        raise FluxfillError(f"unknown colour look {look!r}; one of {', '.join(LOOKS)}")
    spec = {k: np.asarray(v, dtype=np.float64) for k, v in LOOKS[look].items()}
    x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0  # [H, W, 3]
    luma = (x @ _LUMA)[..., None]  # [H, W, 1]
    y = x @ spec["matrix"].T + spec["shadows"] * (1.0 - luma) + spec["highlights"] * luma  # [H, W, 3]
    return Image.fromarray(np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8), "RGB")


def look_of(label: str) -> str | None:
    """The colour look a demo label asks for (``skimage:coffee#look=warm`` -> ``warm``), else None."""
    return label.split(LOOK_TAG, 1)[1] if label.startswith(DEMO_PREFIX) and LOOK_TAG in label else None


def _check_images(samples: list[Sample], cfg: DataConfig) -> list[str]:
    """Decode every image once; return the problems, log the conversions."""
    size = cfg.panel_size
    labels = sorted({lab.split("#")[0] if lab.startswith(DEMO_PREFIX) else lab
                     for s in samples for lab in (s.target, s.source, s.reference) if lab})
    problems: list[str] = []
    for label in labels:
        img, problem = open_checked(label)
        if problem:
            problems.append(problem)
            continue
        _, note = to_rgb(img)
        if note:
            logger.info("%s: %s", label, note)
        w, h = img.size
        if min(w, h) < size:
            if label.startswith(DEMO_PREFIX) or cfg.allow_upscale:
                logger.info("%s: %dx%d upscaled to fill a %d-px panel", label, w, h, size)
            else:
                problems.append(
                    f"{label}: {w}x{h} is smaller than a {size}-px panel; use a larger image, "
                    f"a smaller data.panel_size, or data.allow_upscale=true"
                )
    return problems


# --------------------------------------------------------------------------------------------- plan


def assign_splits(ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded split: ``round(n * val_fraction)`` val ids, at least one when ``val_fraction > 0`` and n >= 2."""
    ids = sorted(ids)
    n = len(ids)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    val = {ids[i] for i in order[:n_val]}
    return {i: "val" if i in val else "train" for i in ids}


def _prompt(cfg: DataConfig) -> str:
    instruction = cfg.task_instruction
    try:
        return cfg.prompt_template.format(instruction=instruction)
    except (KeyError, IndexError, ValueError) as e:
        raise FluxfillError(
            f"data.prompt_template: cannot fill it ({e!r}); the only placeholder is {{instruction}}, "
            "write other braces as {{ and }}"
        ) from None


def collect(cfg: DataConfig) -> list[Sample]:
    """Scan ``cfg.source``, validate every file, and return the samples with split, reference and prompt set.

    Raises FluxfillError listing every problem (one ``file: reason`` line each); writes nothing.
    """
    samples, problems = _SOURCES[cfg.source](cfg)
    if not samples and not problems:
        problems.append(f"{cfg.path}: empty dataset: no samples found (see `fluxfill prepare --help` for the layout)")
    if len(samples) == 1 and samples[0].reference is None:
        s = samples[0]
        problems.append(f"{s.source}: no reference and no other sample to borrow one from; add a reference or more samples")
    problems += _check_images(samples, cfg)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise FluxfillError(
            f"prepare found {len(problems)} problem(s) with data.source={cfg.source} "
            f"(nothing written, {cfg.output} unchanged):\n{lines}"
        )

    prompt = _prompt(cfg)
    fixed = {s.id: s.split for s in samples if s.split}
    splits = assign_splits([s.id for s in samples if not s.split], cfg.val_fraction, cfg.seed) | fixed
    by_id = {s.id: s for s in samples}
    train = [i for i in sorted(by_id) if splits[i] == "train"]
    rng = np.random.default_rng([cfg.seed, _REFERENCE_STREAM])
    out = []
    for s in sorted(samples, key=lambda s: s.id):
        reference = s.reference
        if reference is None:
            # borrow another scene's target, from the train split so that no val target is seen in training;
            # with a colour look, the other scene's photo with this sample's look
            pool = [i for i in train if i != s.id] or [i for i in sorted(by_id) if i != s.id]
            reference = by_id[pool[int(rng.integers(len(pool)))]].target
            if look := look_of(s.target):
                reference = f"{reference.split('#')[0]}{LOOK_TAG}{look}"
        out.append(replace(s, reference=reference, prompt=s.prompt or prompt, split=splits[s.id]))
    return out


# --------------------------------------------------------------------------------------------- build


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no metadata chunks: same pixels, same bytes
    return buf.getvalue()


def _panel(label: str, cfg: DataConfig) -> Image.Image:
    """One square panel of a sample image, re-graded when its label asks for a colour look."""
    panel = fit_panel(read_image(label), cfg.panel_size)
    return apply_look(panel, look) if (look := look_of(label)) else panel


def _source_image(s: Sample, target: Image.Image, cfg: DataConfig) -> Image.Image:
    if s.source.endswith(DEGRADED):
        rng = np.random.default_rng([cfg.seed, _DEGRADE_STREAM, zlib.crc32(s.id.encode())])
        return degrade(target, rng)
    return _panel(s.source, cfg)


def _write(samples: list[Sample], cfg: DataConfig, folder: Path) -> None:
    rows = []
    for s in tqdm(samples, desc="prepare", unit="sample"):
        target = _panel(s.target, cfg)
        panels = build_panels(_source_image(s, target, cfg), target, _panel(s.reference, cfg), cfg.panel_size)
        data = _png(panels.triptych)
        file = _triptych_file(s)
        (folder / file).write_bytes(data)
        rows.append((s.id, s.split, s.prompt, s.source, s.target, s.reference, hashlib.sha256(data).hexdigest(), file))
    with open(folder / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames only, so ``out`` is never half-written."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _triptych_file(s: Sample) -> str:
    return f"{s.id}.png"


def _has_prepare_header(manifest: Path) -> bool:
    """``manifest`` exists and starts with the header line :func:`_write` writes."""
    try:
        with open(manifest, encoding="utf-8", newline="") as f:
            return f.readline().rstrip("\n") == ",".join(MANIFEST_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def _check_replaceable(out: Path, samples: list[Sample]) -> None:
    """``out`` is replaced whole: refuse when it holds anything but a manifest and the triptychs it lists.

    A manifest whose header is prepare's but whose rows are damaged lists nothing readable: the triptychs this
    prepare writes then count as its own, so that it can rebuild the folder over the same inputs.
    """
    if not out.exists():
        return
    known = {MANIFEST}
    try:
        known |= set(read_manifest(out)["file"])
    except FluxfillError as e:
        logger.debug("%s", e)
        if _has_prepare_header(out / MANIFEST):
            known |= set(map(_triptych_file, samples))
    foreign = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
    foreign = [name for name in foreign if name not in known]
    if foreign:
        raise FluxfillError(
            f"data.output {out} holds files `fluxfill prepare` did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}), which replacing it would delete; move them away or set "
            "data.output to a folder of its own")


def prepare(cfg: DataConfig) -> PrepareResult:
    """Validate the inputs, then write every triptych and ``manifest.csv`` to ``cfg.output`` at once.

    The old ``cfg.output`` is replaced only when it holds nothing but what an earlier prepare wrote.
    """
    samples = collect(cfg)
    out = Path(cfg.output)
    _check_replaceable(out, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write(samples, cfg, tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_val = sum(s.split == "val" for s in samples)
    return PrepareResult(path=out, manifest=out / MANIFEST, count=len(samples), train=len(samples) - n_val, val=n_val)


def read_manifest(prepared: str | os.PathLike) -> pd.DataFrame:
    """The rows of ``<prepared>/manifest.csv``; a damaged, truncated or foreign manifest is refused in one line."""
    path = Path(prepared) / MANIFEST
    if not path.exists():
        raise FluxfillError(f"{path} not found: run `fluxfill prepare` (or `dvc repro prepare`) first")
    with reading(path, "prepare", "manifest"):
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = set(READ_COLUMNS) - set(df.columns)
    if missing:
        raise damaged(path, f"a manifest from another version of fluxfill (no columns {sorted(missing)})", "prepare")
    bad = ~df["sha256"].str.fullmatch(r"[0-9a-f]{64}") | ~df["split"].isin(["train", "val"]) | (df["file"] == "")
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0]) + 2  # 1-based, after the header
        raise damaged(path, f"damaged or truncated manifest (line {line} is incomplete)", "prepare")
    return df



# --------------------------------------------------------------------------------------------- version


def dvc_md5(path: Path) -> str:
    """The hash ``dvc commit`` records for ``path`` (``<md5>.dir`` for a folder), computed by dvc-data."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    odb = HashFileDB(MemoryFileSystem(), "/fluxfill-data-version")
    _, _, obj = build(odb, str(path), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--check", action="store_true", help="validate the inputs and report; write nothing")


def run(params, args) -> int:
    cfg = params.data
    size = cfg.panel_size
    if args.check:
        samples = collect(cfg)
        n_val = sum(s.split == "val" for s in samples)
        print(f"{len(samples)} samples ok ({len(samples) - n_val} train, {n_val} val) from data.source={cfg.source}")
        return 0
    check_outputs(params, "prepare")
    result = prepare(cfg)
    print(
        f"prepared {result.count} triptychs of {3 * size}x{size} ({result.train} train, {result.val} val) "
        f"in {result.path}; manifest {result.manifest}"
    )
    return 0
