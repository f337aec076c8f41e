"""Encode data/prepared into the latent cache data/latents, so training never touches the VAE or text encoders.

Two phases, each holding its models only inside its own function; the text encoders are released before the
image encoders load (peak memory = the larger phase, the text one for flux-fill-dev):

  1. text    CLIP text + T5  -> text:   prompt_embeds [T, D], pooled_prompt_embeds [P]  (flux-fill-dev: ~10 GB, T5-XXL)
  2. images  VAE             -> vae:    x_0 [N, 64], masked_latents [N, 64]             (~0.2 GB + activations)
             CLIP vision     -> vision: image_embeds [E]                                 (~0.6 GB)
     The two image encoders share one decode of each triptych PNG (decoding is the stage's main non-model work).

plus, once per geometry, mask_latents [1, N, 256], img_ids [N, 3] and txt_ids [T, 3] in ``geometry.safetensors``.

Files are safetensors shards of ``encode.shard_size`` samples per kind (``text-00000.safetensors``, ...),
written atomically (temp file, then rename) by a worker thread while the next batch encodes; another worker
decodes the next batches' triptych PNGs into model inputs ahead of the model, from the start of the text
phase. Each shard records a fingerprint of its inputs
(triptych hashes, prompts) and settings (preset, weights, panel size, dtype, code version): a shard whose
fingerprint matches is kept, so an interrupted encode resumes where it stopped and an unchanged dataset encodes nothing. The VAE
posterior is taken at its mode, so the same inputs give bit-identical files on the CPU.
``meta.json`` describes the cache; training refuses a cache built for another preset or panel size.
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import logging
import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .artifacts import CACHE_GEOMETRY, CACHE_META, MANIFEST, damaged, first_line, reading, umask_mode
from .config import FluxfillError, Params
from .data import read_manifest
from .latents import encode_diptychs, encode_prompts, encode_references, text_ids, text_pipeline, vae_pipeline
from .models import DTYPES, best_device, load_component, resolve_dtype
from .panels import Panels, panels_from_triptych
from .safety import check_outputs

log = logging.getLogger(__name__)
PHASES = ("text", "vae", "vision")
META, GEOMETRY = CACHE_META, CACHE_GEOMETRY
# what training reads from meta.json: a file without these keys was written by another version
META_KEYS = ("preset", "panel_size", "max_sequence_length", "code_version", "manifest_sha256", "shards", "samples")


def code_version() -> str:
    """fluxfill version + a hash of the code (and tiny weights) that decide the cache's content."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    # the tiny weights' record lists the sha256 of every shipped weight file
    for name in ("latents.py", "encode.py", "models.py", "panels.py", "weights/tiny/pretrain.json"):
        if (here / name).exists():
            h.update((here / name).read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def settings(params: Params) -> dict:
    """What the cache depends on besides the samples: training checks these before it starts."""
    m = params.model
    return {
        "preset": m.preset,
        "pretrained": m.pretrained if m.preset == "flux-fill-dev" else None,
        "image_encoder": m.image_encoder if m.preset == "flux-fill-dev" else None,
        "revision": m.revision,
        "panel_size": params.data.panel_size,
        "dtype": params.encode.dtype,
        "max_sequence_length": m.max_sequence_length,
        "code_version": code_version(),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def load_triptychs(prepared: Path, rows: pd.DataFrame) -> list[Panels]:
    """The panels of each row's triptych, each file checked against the sha256 the manifest records."""
    out = []
    for file, sha in zip(rows["file"], rows["sha256"], strict=True):
        path = Path(prepared) / file
        with reading(path, "prepare", "triptych"):
            data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise damaged(path, f"damaged or from another run: its sha256 is not the one {MANIFEST} records", "prepare")
        with reading(path, "prepare", "triptych"):
            out.append(panels_from_triptych(Image.open(io.BytesIO(data))))
    return out


def model_inputs(prepared: Path, rows: pd.DataFrame) -> tuple[list[Image.Image], list[Image.Image], list[Image.Image]]:
    """``(diptychs, masks, references)`` of ``rows``' triptychs: what the VAE and vision encoders take."""
    panels = load_triptychs(prepared, rows)
    return [p.diptych for p in panels], [p.mask for p in panels], [p.reference for p in panels]


@dataclass
class Shard:
    index: int
    rows: pd.DataFrame

    def name(self, phase: str) -> str:
        return f"{phase}-{self.index:05d}.safetensors"


def _fingerprint(phase: str, shard: Shard, setting: dict) -> str:
    if phase == "text":
        inputs = list(shard.rows["prompt"])
        keys = ("preset", "pretrained", "revision", "dtype", "max_sequence_length", "code_version")
    else:
        inputs = list(shard.rows["sha256"])
        keys = ("preset", "pretrained", "image_encoder", "revision", "panel_size", "dtype", "code_version")
    return _digest({"phase": phase, "ids": list(shard.rows["id"]), "inputs": inputs, **{k: setting[k] for k in keys}})


def _shard_fingerprint(path: Path) -> str | None:
    """The fingerprint ``path`` was written with; None when it is missing or unreadable (it is then encoded)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fluxfill", "{}"))
    except (OSError, ValueError, SafetensorError) as e:  # truncated or foreign file
        log.warning("%s: unreadable shard (%s); encoding it again", path, first_line(e))
        return None
    return meta.get("fingerprint") if isinstance(meta, dict) else None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Write then rename; metadata goes in one sorted JSON value (safetensors' own key order is not stable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"fluxfill": json.dumps(metadata, sort_keys=True)})
    umask_mode(tmp)  # save_file creates 0600 files: a shared data folder is readable as any other file
    os.replace(tmp, path)


def _batches(rows: pd.DataFrame, size: int):
    for start in range(0, len(rows), size):
        yield rows.iloc[start:start + size]


def _ahead(pool: ThreadPoolExecutor, fn, items, depth: int = 2):
    """``(item, fn(item))`` in order, ``fn`` running ``depth`` items ahead in ``pool``'s worker thread.

    The first ``depth`` calls start at once, so they overlap the text phase and the model loading that follow.
    PNG decoding and cropping release the GIL, so the next batches are read while the model encodes this one.
    """
    items = iter(items)
    queue = deque((item, pool.submit(fn, item)) for item in itertools.islice(items, depth))

    def results():
        while queue:
            item, future = queue.popleft()
            queue.extend((nxt, pool.submit(fn, nxt)) for nxt in itertools.islice(items, 1))
            yield item, future.result()

    return results()


class _Writer:
    """Shard files written in order by a worker thread while the next batches encode.

    ``save`` returns at once; ``flush`` waits for the pending writes and re-raises the first failure;
    ``stop_after`` raises :class:`_Stop` once that many files were handed over (tests of resume use it).
    """

    def __init__(self, out: Path, stop_after: int | None):
        self.out, self.budget, self.written = out, stop_after, []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-write")
        self._pending: list = []

    def save(self, sh: Shard, phase: str, fp: str, tensors: dict[str, torch.Tensor]) -> None:
        for future in self._pending:  # a write that failed stops the encode at the next shard
            if future.done() and future.exception():
                self.flush()
        if self.budget is not None and self.budget <= 0:
            raise _Stop
        meta = {"fingerprint": fp, "ids": list(sh.rows["id"])}
        self._pending.append(self._pool.submit(_save_atomic, tensors, self.out / sh.name(phase), meta))
        self.written.append(sh.name(phase))
        if self.budget is not None:
            self.budget -= 1

    def save_geometry(self, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        self._pending.append(self._pool.submit(_save_atomic, tensors, self.out / GEOMETRY, metadata))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown()


@dataclass
class _Job:
    """What the phases share: paths, model settings, dtypes and the shard writer."""

    params: Params
    prepared: Path
    out: Path
    device: torch.device
    dtype: torch.dtype  # compute dtype of the encoders
    store: torch.dtype  # storage dtype of the cache
    writer: _Writer

    def load(self, name: str):
        return load_component(self.params.model, name, self.device, self.dtype)


def _release(*modules: weakref.ref) -> None:
    """Check that the phase's models are gone; a reference cycle is the only thing that can still hold one."""
    if any(m() is not None for m in modules):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_text(job: _Job, todo: list[tuple[Shard, str]]) -> list[weakref.ref]:
    """Phase 1: CLIP text + T5, alive only inside this function; returns weak references to them."""
    mcfg, bs = job.params.model, job.params.encode.batch_size
    pipe = text_pipeline(*[job.load(n) for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")])
    for sh, fp in tqdm(todo, desc="encode text", unit="shard"):
        parts = [encode_prompts(pipe, list(b["prompt"]), mcfg.max_sequence_length) for b in _batches(sh.rows, bs)]
        job.writer.save(sh, "text", fp, {
            "prompt_embeds": torch.cat([p[0] for p in parts]).to(job.store),  # [S, T, D]
            "pooled_prompt_embeds": torch.cat([p[1] for p in parts]).to(job.store),  # [S, P]
        })
    return [weakref.ref(pipe.text_encoder), weakref.ref(pipe.text_encoder_2)]


def _image_batches(job: _Job, vae_todo: list[tuple[Shard, str]], vision_todo: list[tuple[Shard, str]],
                   first_rows: pd.DataFrame) -> list[tuple[Shard | None, pd.DataFrame]]:
    """The batches the images phase reads, shard by shard; only ``first_rows`` when just the geometry is missing."""
    shards = sorted({sh.index: sh for sh, _ in vae_todo + vision_todo}.values(), key=lambda sh: sh.index)
    return [(sh, b) for sh in shards for b in _batches(sh.rows, job.params.encode.batch_size)] or [(None, first_rows)]


def _encode_images(job: _Job, reads, vae_todo: list[tuple[Shard, str]],
                   vision_todo: list[tuple[Shard, str]]) -> list[weakref.ref]:
    """Phase 2: the VAE and the CLIP vision tower, which share one decode of each triptych.

    ``reads`` yields ``((shard, rows), model_inputs)`` for :func:`_image_batches`, decoded ahead by a worker.
    Writes each shard's pending ``vae`` and ``vision`` files; geometry.safetensors comes from the first batch.
    Returns weak references to the models.
    """
    pending = {"vae": {sh.index: fp for sh, fp in vae_todo}, "vision": {sh.index: fp for sh, fp in vision_todo}}
    geometry = bool(vae_todo) or not (job.out / GEOMETRY).exists()
    parts, seen = {"x_0": [], "masked_latents": [], "image_embeds": []}, 0
    vae = vae_pipeline(job.load("vae")) if geometry else None
    vision = (job.load("image_encoder"), job.load("image_processor")) if vision_todo else None
    with tqdm(total=len(pending["vae"].keys() | pending["vision"].keys()), desc="encode images", unit="shard") as bar:
        for i, ((sh, rows), (diptychs, masks, references)) in enumerate(reads):
            wanted = {ph for ph, fps in pending.items() if sh is not None and sh.index in fps}
            if "vae" in wanted or i == 0 and geometry:
                enc = encode_diptychs(vae, diptychs, masks)
                if i == 0 and geometry:  # the same for every sample: it depends on the panel size only
                    job.writer.save_geometry({"mask_latents": enc.mask_latents[:1].to(job.store),  # [1, N, 256]
                                              "img_ids": enc.img_ids.float(),  # [N, 3]
                                              "txt_ids": text_ids(job.params.model.max_sequence_length)},  # [T, 3]
                                             {"panel_size": job.params.data.panel_size})
                if "vae" in wanted:
                    parts["x_0"].append(enc.x_0)  # [b, N, 64]
                    parts["masked_latents"].append(enc.masked_latents)  # [b, N, 64]
            if "vision" in wanted:
                parts["image_embeds"].append(encode_references(*vision, references))  # [b, E]
            seen += len(rows)
            if sh is None or seen < len(sh.rows):  # not the shard's last batch
                continue
            cat = {k: torch.cat(v).to(job.store) for k, v in parts.items() if v}  # [S, ...] of the wanted kinds
            if "vae" in wanted:
                job.writer.save(sh, "vae", pending["vae"][sh.index], {k: cat[k] for k in ("x_0", "masked_latents")})
            if "vision" in wanted:
                job.writer.save(sh, "vision", pending["vision"][sh.index], {"image_embeds": cat["image_embeds"]})
            parts, seen = {k: [] for k in parts}, 0
            bar.update(1)
    return [weakref.ref(m) for m in (vae and vae.vae, vision and vision[0]) if m is not None]


def encode(params: Params, prepared: str | Path | None = None, output: str | Path | None = None,
           device: str | None = None, stop_after: int | None = None) -> dict:
    """Encode every pending shard; returns ``{"written": [...], "kept": [...], "output": path}``.

    One model family at a time: each phase loads its models inside its own function, so they are released
    when it returns, before the next family loads. ``stop_after`` stops after writing that many shard files
    (used to test resume).
    """
    prepared = Path(prepared or params.data.output)
    out = Path(output or params.encode.output)
    df = read_manifest(prepared)
    if df.empty:
        raise FluxfillError(f"{prepared / MANIFEST} lists no samples")
    panel = load_triptychs(prepared, df.head(1))[0].size
    if panel != params.data.panel_size:
        raise FluxfillError(f"{prepared} holds {panel}-px panels but data.panel_size is {params.data.panel_size}: "
                            "re-run `fluxfill prepare` or set data.panel_size")
    out.mkdir(parents=True, exist_ok=True)
    dev = best_device(device or params.encode.device)
    setting = settings(params)
    size = params.encode.shard_size
    shards = [Shard(i, df.iloc[s:s + size]) for i, s in enumerate(range(0, len(df), size))]
    kept = []

    def pending(phase):
        todo = []
        for sh in shards:
            fp = _fingerprint(phase, sh, setting)
            if _shard_fingerprint(out / sh.name(phase)) == fp:
                kept.append(sh.name(phase))
            else:
                todo.append((sh, fp))
        return todo

    text_todo, vae_todo, vision_todo = pending("text"), pending("vae"), pending("vision")
    writer = _Writer(out, stop_after)
    job = _Job(params, prepared, out, dev, resolve_dtype(params.model.dtype, dev), DTYPES[params.encode.dtype], writer)
    complete, pool = True, ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-read")
    try:
        images = vae_todo or vision_todo or not (out / GEOMETRY).exists()
        batches = _image_batches(job, vae_todo, vision_todo, df.head(1)) if images else []
        reads = _ahead(pool, lambda item: model_inputs(prepared, item[1]), batches)  # decoding starts now
        if text_todo:
            _release(*_encode_text(job, text_todo))
            writer.flush()
        if images:
            _release(*_encode_images(job, reads, vae_todo, vision_todo))
    except _Stop:
        complete = False
    finally:
        pool.shutdown(cancel_futures=True)  # joined on any exit; a read not yet started is dropped
        writer.close()  # waits for the pending writes
    if complete:
        _write_meta(params, prepared, out, df, shards, setting)
    return {"written": writer.written, "kept": kept, "output": str(out), "complete": complete}


def _write_meta(params: Params, prepared: Path, out: Path, df: pd.DataFrame, shards: list[Shard], setting: dict):
    """meta.json (rewritten only when it changes), then remove shard files no longer part of the cache."""
    meta = {
        **setting,
        "manifest_sha256": hashlib.sha256((prepared / MANIFEST).read_bytes()).hexdigest(),
        "num_samples": len(df),
        "shard_size": params.encode.shard_size,
        "shards": [{ph: sh.name(ph) for ph in PHASES} | {"ids": list(sh.rows["id"])} for sh in shards],
        "samples": [{"id": r.id, "split": r.split} for r in df.itertuples()],
    }
    meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    if not (out / META).exists() or (out / META).read_text() != meta_text:
        tmp = out / f".{META}.tmp"
        tmp.write_text(meta_text)
        os.replace(tmp, out / META)
    expected = {META, GEOMETRY} | {sh.name(ph) for sh in shards for ph in PHASES}
    own = [p for p in out.glob("*-?????.safetensors") if p.name.split("-")[0] in PHASES]  # shards, not others
    # and what an interrupted write left: temporary files, probes of the new-file mode (DVC would track them)
    left = [*out.glob(".*.safetensors.tmp"), *out.glob(f".{META}.tmp"), *out.glob(".fluxfill-*.mode-probe")]
    for stale in sorted(p for p in own if p.name not in expected) + left:
        stale.unlink()


class _Stop(Exception):
    pass


class LatentCache(torch.utils.data.Dataset):
    """The samples of one split of the latent cache, read through memory-mapped safetensors.

    ``expect`` holds settings (see :func:`settings`) the cache must have been built with; a mismatch is refused
    with a message naming each differing key. Collate with :meth:`collate` to get exactly what
    :func:`fluxfill.objective.flow_matching_step` takes.
    """

    def __init__(self, root: str | Path, split: str | None = "train", expect: dict | None = None):
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.exists():
            raise FluxfillError(f"{meta_path} not found: the latent cache is missing or incomplete; run `fluxfill encode`")
        with reading(meta_path, "encode", "cache description"):
            self.meta = json.loads(meta_path.read_text())
        if not isinstance(self.meta, dict) or any(k not in self.meta for k in META_KEYS):
            raise damaged(meta_path, f"a cache description from another version of fluxfill (keys {list(META_KEYS)} "
                                     "expected)", "encode")
        if expect:
            diff = [f"{k}: cache has {self.meta.get(k)!r}, expected {v!r}" for k, v in expect.items()
                    if self.meta.get(k) != v]
            if diff:
                raise FluxfillError(f"latent cache {self.root} was built with other settings: " + "; ".join(diff)
                                    + ". Re-run `fluxfill encode` (or `dvc repro encode`) with the current params.")
        with reading(meta_path, "encode", "cache description"):
            splits = {s["id"]: s["split"] for s in self.meta["samples"]}
            self.index = [(sh, row, sid) for sh in self.meta["shards"] for row, sid in enumerate(sh["ids"])
                          if split is None or splits[sid] == split]
            names = [(sh[phase], sh["ids"]) for sh in self.meta["shards"] for phase in PHASES]
        if not self.index:
            raise FluxfillError(f"latent cache {self.root} has no {split!r} samples")
        with reading(self.root / GEOMETRY, "encode", "cache file"):
            with safe_open(str(self.root / GEOMETRY), "pt") as f:
                self.geometry = {k: f.get_tensor(k) for k in f.keys()}
        self._files: dict[str, object] = {}
        for name, ids in names:  # open (and check) every shard now, not halfway through training
            self._check_shard(name, ids)

    def _check_shard(self, name: str, ids: list[str]) -> None:
        """Open one shard; a damaged or truncated one, or one another encode run wrote, is refused in one line."""
        path = self.root / name
        with reading(path, "encode", "cache shard"):
            f = self._file(name)
            written = json.loads((f.metadata() or {}).get("fluxfill", "{}")).get("ids")
            rows = {f.get_slice(k).get_shape()[0] for k in f.keys()}
        if written != ids or rows != {len(ids)}:
            raise damaged(path, f"a cache shard from another encode run (its samples are not the ones {META} lists)",
                          "encode")

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, name: str):
        if name not in self._files:
            self._files[name] = safe_open(str(self.root / name), "pt")
        return self._files[name]

    def __getitem__(self, i: int) -> dict:
        shard, row, sid = self.index[i]
        item = {"id": sid}
        for phase in PHASES:
            f = self._file(shard[phase])
            for key in f.keys():
                item[key] = f.get_slice(key)[row]  # one row, read from the memory map
        return item

    def __getstate__(self):  # DataLoader workers open their own maps
        return {**self.__dict__, "_files": {}}

    def collate(self, items: list[dict]) -> dict:
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "id"}
        batch["ids"] = [it["id"] for it in items]
        batch.update(self.geometry)  # mask_latents [1, N, 256], img_ids [N, 3], txt_ids [T, 3]
        return batch


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: encode.device, auto = best available)")


def run(params: Params, args) -> int:
    check_outputs(params, "encode")
    result = encode(params, device=args.device)
    print(f"encode: {len(result['written'])} shard file(s) written, {len(result['kept'])} up to date -> {result['output']}")
    return 0
