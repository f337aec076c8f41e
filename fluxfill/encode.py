"""Encode data/prepared into the latent cache data/latents, so training never touches the VAE or text encoders.

Three phases, one model family loaded at a time and freed after use (peak memory = the largest of them):

  1. text    CLIP text + T5  -> prompt_embeds [T, D], pooled_prompt_embeds [P]   (flux-fill-dev: ~10 GB, T5-XXL)
  2. vae     VAE             -> x_0 [N, 64], masked_latents [N, 64]              (~0.2 GB + activations)
  3. vision  CLIP vision     -> image_embeds [E]                                  (~0.6 GB)

plus, once per geometry, mask_latents [1, N, 256], img_ids [N, 3] and txt_ids [T, 3] in ``geometry.safetensors``.

Files are safetensors shards of ``encode.shard_size`` samples per phase (``text-00000.safetensors``, ...),
written atomically (temp file, then rename). Each shard records a fingerprint of its inputs (triptych hashes,
prompts) and settings (preset, weights, panel size, dtype, code version): a shard whose fingerprint matches
is kept, so an interrupted encode resumes where it stopped and an unchanged dataset encodes nothing. The VAE
posterior is taken at its mode, so the same inputs give bit-identical files on the CPU.
``meta.json`` describes the cache; training refuses a cache built for another preset or panel size.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .config import FluxfillError, Params
from .latents import encode_diptychs, encode_prompts, encode_references, text_ids, text_pipeline, vae_pipeline
from .models import DTYPES, best_device, load_component, resolve_dtype
from .panels import panels_from_triptych

log = logging.getLogger(__name__)
PHASES = ("text", "vae", "vision")
META = "meta.json"
GEOMETRY = "geometry.safetensors"
MANIFEST = "manifest.csv"


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


def read_manifest(prepared: Path) -> pd.DataFrame:
    path = prepared / MANIFEST
    if not path.exists():
        raise FluxfillError(f"{path} not found: run `fluxfill prepare` (or `dvc repro prepare`) first")
    df = pd.read_csv(path, keep_default_na=False)
    missing = {"id", "split", "prompt", "file", "sha256"} - set(df.columns)
    if missing:
        raise FluxfillError(f"{path}: missing columns {sorted(missing)}; re-run `fluxfill prepare`")
    return df


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
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("fluxfill", "{}")).get("fingerprint")
    except Exception:  # truncated or foreign file: re-encode it
        return None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Write then rename; metadata goes in one sorted JSON value (safetensors' own key order is not stable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"fluxfill": json.dumps(metadata, sort_keys=True)})
    os.replace(tmp, path)


def _free(*modules) -> None:
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batches(rows: pd.DataFrame, size: int):
    for start in range(0, len(rows), size):
        yield rows.iloc[start:start + size]


def _load_panels(prepared: Path, rows: pd.DataFrame):
    return [panels_from_triptych(Image.open(prepared / f)) for f in rows["file"]]


def encode(params: Params, prepared: str | Path | None = None, output: str | Path | None = None,
           device: str | None = None, stop_after: int | None = None) -> dict:
    """Encode every pending shard; returns ``{"written": [...], "kept": [...], "output": path}``.

    ``stop_after`` stops after writing that many shard files (used to test resume).
    """
    prepared = Path(prepared or params.data.output)
    out = Path(output or params.encode.output)
    df = read_manifest(prepared)
    if df.empty:
        raise FluxfillError(f"{prepared / MANIFEST} lists no samples")
    sizes = {Image.open(prepared / f).size for f in df["file"].head(1)}
    panel = next(iter(sizes))[1]
    if panel != params.data.panel_size:
        raise FluxfillError(f"{prepared} holds {panel}-px panels but data.panel_size is {params.data.panel_size}: "
                            "re-run `fluxfill prepare` or set data.panel_size")
    out.mkdir(parents=True, exist_ok=True)
    dev = best_device(device or params.encode.device)
    compute_dtype = resolve_dtype(params.model.dtype, dev)
    store = DTYPES[params.encode.dtype]
    setting = settings(params)
    size = params.encode.shard_size
    shards = [Shard(i, df.iloc[s:s + size]) for i, s in enumerate(range(0, len(df), size))]
    written, kept = [], []
    budget = [stop_after]

    def pending(phase):
        todo = []
        for sh in shards:
            fp = _fingerprint(phase, sh, setting)
            if _shard_fingerprint(out / sh.name(phase)) == fp:
                kept.append(sh.name(phase))
            else:
                todo.append((sh, fp))
        return todo

    def save(sh, phase, fp, tensors):
        if budget[0] is not None and budget[0] <= 0:
            raise _Stop
        _save_atomic(tensors, out / sh.name(phase), {"fingerprint": fp, "ids": list(sh.rows["id"])})
        written.append(sh.name(phase))
        if budget[0] is not None:
            budget[0] -= 1

    bs = params.encode.batch_size
    mcfg = params.model
    try:
        todo = pending("text")
        if todo:
            comps = [load_component(mcfg, n, dev, compute_dtype) for n in
                     ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
            pipe = text_pipeline(*comps)
            for sh, fp in tqdm(todo, desc="encode text", unit="shard"):
                parts = [encode_prompts(pipe, list(b["prompt"]), mcfg.max_sequence_length) for b in _batches(sh.rows, bs)]
                save(sh, "text", fp, {
                    "prompt_embeds": torch.cat([p[0] for p in parts]).to(store),  # [S, T, D]
                    "pooled_prompt_embeds": torch.cat([p[1] for p in parts]).to(store),  # [S, P]
                })
            _free(pipe, comps)
        todo = pending("vae")
        geometry = out / GEOMETRY
        if todo or not geometry.exists():
            pipe = vae_pipeline(load_component(mcfg, "vae", dev, compute_dtype))
            for sh, fp in tqdm(todo, desc="encode vae", unit="shard"):
                x0, masked = [], []
                for b in _batches(sh.rows, bs):
                    panels = _load_panels(prepared, b)
                    enc = encode_diptychs(pipe, [p.diptych for p in panels], [p.mask for p in panels])
                    x0.append(enc.x_0)
                    masked.append(enc.masked_latents)
                save(sh, "vae", fp, {"x_0": torch.cat(x0).to(store), "masked_latents": torch.cat(masked).to(store)})
            if not geometry.exists() or todo:
                panels = _load_panels(prepared, df.head(1))
                enc = encode_diptychs(pipe, [panels[0].diptych], [panels[0].mask])
                _save_atomic({"mask_latents": enc.mask_latents[:1].to(store),  # [1, N, 256]
                              "img_ids": enc.img_ids.float(),  # [N, 3]
                              "txt_ids": text_ids(mcfg.max_sequence_length)},  # [T, 3]
                             geometry, {"panel_size": panel})
            _free(pipe)
        todo = pending("vision")
        if todo:
            encoder = load_component(mcfg, "image_encoder", dev, compute_dtype)
            processor = load_component(mcfg, "image_processor", dev)
            for sh, fp in tqdm(todo, desc="encode vision", unit="shard"):
                embeds = [encode_references(encoder, processor, [p.reference for p in _load_panels(prepared, b)])
                          for b in _batches(sh.rows, bs)]
                save(sh, "vision", fp, {"image_embeds": torch.cat(embeds).to(store)})  # [S, E]
            _free(encoder)
    except _Stop:
        return {"written": written, "kept": kept, "output": str(out), "complete": False}

    meta = {
        **setting,
        "manifest_sha256": hashlib.sha256((prepared / MANIFEST).read_bytes()).hexdigest(),
        "num_samples": len(df),
        "shard_size": size,
        "shards": [{ph: sh.name(ph) for ph in PHASES} | {"ids": list(sh.rows["id"])} for sh in shards],
        "samples": [{"id": r.id, "split": r.split} for r in df.itertuples()],
    }
    meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    if not (out / META).exists() or (out / META).read_text() != meta_text:
        tmp = out / f".{META}.tmp"
        tmp.write_text(meta_text)
        os.replace(tmp, out / META)
    expected = {META, GEOMETRY} | {sh.name(ph) for sh in shards for ph in PHASES}
    for stale in sorted(p for p in out.glob("*.safetensors") if p.name not in expected):
        stale.unlink()
    return {"written": written, "kept": kept, "output": str(out), "complete": True}


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
        self.meta = json.loads(meta_path.read_text())
        if expect:
            diff = [f"{k}: cache has {self.meta.get(k)!r}, expected {v!r}" for k, v in expect.items()
                    if self.meta.get(k) != v]
            if diff:
                raise FluxfillError(f"latent cache {self.root} was built with other settings: " + "; ".join(diff)
                                    + ". Re-run `fluxfill encode` (or `dvc repro encode`) with the current params.")
        splits = {s["id"]: s["split"] for s in self.meta["samples"]}
        self.index = [(sh, row, sid) for sh in self.meta["shards"] for row, sid in enumerate(sh["ids"])
                      if split is None or splits[sid] == split]
        if not self.index:
            raise FluxfillError(f"latent cache {self.root} has no {split!r} samples")
        with safe_open(str(self.root / GEOMETRY), "pt") as f:
            self.geometry = {k: f.get_tensor(k) for k in f.keys()}
        self._files: dict[str, object] = {}

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
    result = encode(params, device=args.device)
    print(f"encode: {len(result['written'])} shard file(s) written, {len(result['kept'])} up to date -> {result['output']}")
    return 0
