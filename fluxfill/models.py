"""Model presets: the FLUX.1-Fill components, built or loaded one at a time.

- ``tiny``: the real classes (FluxTransformer2DModel with ``in_channels=384``, AutoencoderKL with 16 latent
  channels, CLIP/T5 text encoders with real tokenizer objects, CLIP text and vision towers of one CLIPModel) from
  small configs, with weights pretrained by ``fluxfill pretrain-tiny`` and shipped in ``fluxfill/weights/tiny``,
  a folder laid out like a diffusers repository and loaded through the same ``from_pretrained`` calls as the real
  model. CPU.
- ``flux-fill-dev``: ``black-forest-labs/FLUX.1-Fill-dev`` + a CLIP vision tower, by hub id or local folder
  (``HF_HUB_OFFLINE=1`` is respected; nothing is downloaded on a machine without network).
- ``flux-fill-dev-random``: the full-size architecture from configs shipped in ``fluxfill/configs``,
  random weights; on the ``meta`` device for shape checks, or on a GPU for benchmarks.

Components are loaded by name (:func:`load_component`) so a stage can hold one at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import string
import warnings
from functools import cache
from pathlib import Path

import torch

from .artifacts import first_line
from .config import FluxfillError, ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
              "image_encoder", "image_processor", "scheduler")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

TINY_DIR = Path(__file__).parent / "weights" / "tiny"
# The tiny architectures (what `fluxfill pretrain-tiny` trains): the same classes as FLUX.1-Fill-dev, and every
# size that matters to the contract (384 in, 64 out, 16 latent channels, 8x VAE) is the real one.
TINY = {
    "transformer": dict(patch_size=1, in_channels=384, out_channels=64, num_layers=2, num_single_layers=4,
                        attention_head_dim=32, num_attention_heads=3, joint_attention_dim=32,
                        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14)),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=0, norm_num_groups=1, mid_block_add_attention=False,
                scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False),
    "text_encoder_2": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    # one CLIPModel: its text tower is FLUX's CLIP text encoder (pooled output, 32 = the transformer's pooled
    # projection dim), its vision tower + visual projection the reference encoder, both projected to one space
    # (projection_dim also in each tower's config, as openai/clip-vit-large-patch14 has it, so that a tower loads
    # alone with its projection)
    "clip": dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                  projection_dim=24),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8, projection_dim=24),
                 projection_dim=24),
}
TINY_CLIP_MAX_LENGTH = 256


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def best_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- tokenizers
@cache
def tiny_tokenizers(clip_max_length: int = TINY_CLIP_MAX_LENGTH):
    """Real CLIP and T5 tokenizer objects with small in-code vocabularies (byte-level BPE / character Unigram).

    Different prompts give different ids; no file or network is needed.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, T5Tokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab.setdefault(ch + suffix, len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=clip_max_length)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [("\u2581" + ch, -3.0), (ch, -4.0)]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


# ----------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build(name: str, cfg: dict, device: torch.device, dtype: torch.dtype, seed: int | None):
    """Instantiate one component from a config dict, random weights (seeded when ``seed`` is given)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "model_type"}
    builders = {
        "transformer": lambda: FluxTransformer2DModel.from_config(cfg),
        "vae": lambda: AutoencoderKL.from_config(cfg),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(**cfg)),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)),
        "clip": lambda: CLIPModel(CLIPConfig(**cfg)),
    }
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork, _default_dtype(dtype if dtype.is_floating_point else torch.float32), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        module = builders[name]()
    return module.eval().requires_grad_(False)


def build_tiny(name: str, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny architecture with seeded random weights: ``transformer``, ``vae``, ``text_encoder_2`` or ``clip``
    (a ``CLIPModel``: FLUX's CLIP text encoder is its ``text_model``, the reference encoder its vision tower)."""
    clip_tok, t5_tok = tiny_tokenizers()
    config = json.loads(json.dumps(TINY[name]))  # a deep copy
    if name == "clip":
        config["text_config"]["vocab_size"] = len(clip_tok)
    if name == "text_encoder_2":
        config["vocab_size"] = len(t5_tok)
    return _build(name, config, torch.device(device), dtype, seed)


def _shipped_configs() -> dict[str, dict]:
    configs = json.loads((CONFIG_DIR / "flux-fill-dev-text-encoders.json").read_text())
    for name in ("transformer", "vae"):
        configs[name] = json.loads((CONFIG_DIR / f"flux-fill-dev-{name}.json").read_text())
    return configs


def scheduler():
    """FLUX.1-Fill-dev's scheduler, from its config shipped in ``fluxfill/configs``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = json.loads((CONFIG_DIR / "flux-fill-dev-scheduler.json").read_text())
    return FlowMatchEulerDiscreteScheduler.from_config(cfg)


def _clip_image_processor_class():
    """transformers >= 5 splits PIL and torchvision processors; the PIL one needs no torchvision."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as cls
    return cls


def image_processor(size: int):
    """A CLIP image processor for ``size``-px square inputs."""
    return _clip_image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _sources(cfg: ModelConfig) -> tuple[str, str, str | None]:
    """``(pipeline folder or hub id, image encoder folder or hub id, revision)`` of a pretrained preset."""
    if cfg.preset == "tiny":
        return str(TINY_DIR), str(TINY_DIR / "image_encoder"), None
    return cfg.pretrained, cfg.image_encoder, cfg.revision


def _load_error(cfg: ModelConfig, name: str, source: str, subfolder: str | None, e: BaseException) -> str:
    """Why ``name`` did not load (the error's first line) and the fix: the tiny weights ship with fluxfill;
    weights that are not there need a download; weights that are there but fail (a damaged shard, a dtype or
    version mismatch) need checking, not a download."""
    local = Path(source).expanduser()
    where = (f"local folder {local}" if local.exists() else f"hub id {source!r}") + (
        f" (subfolder {subfolder!r})" if subfolder else "")
    head = f"cannot load {name} of preset {cfg.preset!r} from {where}: {type(e).__name__}: {first_line(e).rstrip('.')}. "
    if cfg.preset == "tiny":
        return head + (f"The tiny weights ship with fluxfill: restore them with `git checkout -- "
                       f"{TINY_DIR.relative_to(TINY_DIR.parents[2])}` or rebuild them with `make tiny-weights`.")
    if local.exists() or isinstance(e, ValueError):
        return head + (f"The files are there but do not load: check model.dtype ({cfg.dtype}) and the diffusers/"
                       "transformers versions, or replace damaged files with a fresh download of the weights.")
    return head + ("Download the weights on a machine with network (`huggingface-cli download "
                   f"{source}`) and point model.pretrained / model.image_encoder at the folder, or set HF_HOME to "
                   "a cache that holds them (HF_HUB_OFFLINE=1 stops all network access).")


@cache
def _vision_tower(cls):
    """``cls`` loading quietly from a whole ``CLIPModel`` checkpoint (openai/clip-vit-large-patch14, the tiny
    ``image_encoder`` folder): the text tower's weights there are expected extras, not a load report to print.
    Missing vision weights are still reported."""
    ignore = {r"^text_model\.", r"^text_projection\.", r"^logit_scale$"}
    return type(cls.__name__, (cls,), {"_keys_to_ignore_on_load_unexpected": ignore, "__module__": cls.__module__})


def _load_pretrained(cfg: ModelConfig, name: str, device: torch.device, dtype: torch.dtype):
    """Load one component of a diffusers FLUX.1-Fill folder (hub id or local) or of the CLIP vision tower."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
        T5EncoderModel,
        T5TokenizerFast,
    )

    pretrained, image_encoder, revision = _sources(cfg)
    loaders = {
        "transformer": (FluxTransformer2DModel, pretrained, "transformer"),
        "vae": (AutoencoderKL, pretrained, "vae"),
        "text_encoder": (CLIPTextModel, pretrained, "text_encoder"),
        "text_encoder_2": (T5EncoderModel, pretrained, "text_encoder_2"),
        "tokenizer": (CLIPTokenizer, pretrained, "tokenizer"),
        "tokenizer_2": (T5TokenizerFast, pretrained, "tokenizer_2"),
        "scheduler": (FlowMatchEulerDiscreteScheduler, pretrained, "scheduler"),
        "image_encoder": (_vision_tower(CLIPVisionModelWithProjection), image_encoder, None),
        "image_processor": (_clip_image_processor_class(), image_encoder, None),
    }
    cls, source, subfolder = loaders[name]
    kwargs = {"revision": revision} if revision and source == pretrained else {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if name in ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        kwargs["torch_dtype"] = dtype
    try:
        obj = cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise FluxfillError(_load_error(cfg, name, source, subfolder, e)) from e
    if isinstance(obj, torch.nn.Module):
        obj = obj.to(device).eval().requires_grad_(False)
    return obj


def load_component(cfg: ModelConfig, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """One component of the preset in ``cfg``, on ``device`` (weights frozen, eval mode).

    The transformer is stored as ``model.quantize`` says: with quantisation on a GPU it is loaded on the host
    and each linear layer reaches the GPU already quantised, so the GPU never holds the full-precision base.
    """
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; one of {COMPONENTS}")
    device = torch.device(device)
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    if name == "transformer" and cfg.quantize != "none" and device.type != "meta":
        transformer = _load(cfg, name, torch.device("cpu"), dtype)
        quantize_base(transformer, cfg.quantize, device)
        return transformer.to(device)
    return _load(cfg, name, device, dtype)


def _load(cfg: ModelConfig, name: str, device: torch.device, dtype: torch.dtype):
    if cfg.preset in ("tiny", "flux-fill-dev"):
        return _load_pretrained(cfg, name, device, dtype)
    # flux-fill-dev-random: the full architecture, random weights (seeded off meta)
    if name == "scheduler":
        return scheduler()
    configs = _shipped_configs()
    if name in ("tokenizer", "tokenizer_2"):
        return tiny_tokenizers(configs["text_encoder"]["max_position_embeddings"])[0 if name == "tokenizer" else 1]
    if name == "image_processor":
        return image_processor(configs["image_encoder"]["image_size"])
    return _build(name, configs[name], device, dtype, seed=None if device.type == "meta" else 0)


def image_encoder_checkpoint(cfg: ModelConfig) -> str | None:
    """The checkpoint (hub id or folder) the preset's CLIP image encoder loads from; None when built in code.

    The fusion module reads CLIP's text projection from it (:func:`clip_text_projection`). The tiny preset's is
    the whole tiny ``CLIPModel`` (``fluxfill/weights/tiny/image_encoder``), so it carries one.
    """
    return _sources(cfg)[1] if cfg.preset in ("tiny", "flux-fill-dev") else None


def clip_text_projection(source: str) -> torch.Tensor | None:
    """CLIP's text projection ``[E, P]`` (``text_projection.weight``) from the checkpoint ``source``.

    ``source`` is a hub id (found in the local Hugging Face cache; HF_HUB_OFFLINE is respected) or a folder
    written by ``CLIPModel.save_pretrained``. None when the checkpoint carries no text projection (a vision-only
    checkpoint) or holds no weights file here.
    """
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, cached_file

    key = "text_projection.weight"
    opts = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    file = cached_file(source, SAFE_WEIGHTS_NAME, **opts)
    if file is None and (index := cached_file(source, SAFE_WEIGHTS_INDEX_NAME, **opts)):
        shard = json.loads(Path(index).read_text())["weight_map"].get(key)
        if shard is None:
            return None
        file = cached_file(source, shard, **opts)
    if file is not None:
        with safe_open(file, "pt") as f:
            return f.get_tensor(key).float() if key in f.keys() else None
    if file := cached_file(source, WEIGHTS_NAME, **opts):
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return state[key].float() if key in state else None
    return None


# ----------------------------------------------------------------------------------------------- quantisation
NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's block size); the scales themselves in blocks of up to 256


def _torchao(mode: str):
    """``torchao.quantization``, imported quietly (on a CPU it logs that its CUDA kernels did not load)."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao.quantization as ao
    except ImportError as e:  # not installed, or installed but built for another torch: the cause says which
        raise FluxfillError(f"model.quantize {mode} needs torchao ({first_line(e)}): pip install 'fluxfill[quantize]' "
                            "(or set model.quantize: none)") from e
    finally:
        quiet.setLevel(level)
    return ao


def quantize_base(module: torch.nn.Module, mode: str, device: str | torch.device | None = None) -> int:
    """Store the frozen ``nn.Linear`` weights of ``module`` quantised with torchao, in place; returns how many.

    ``int8``: int8 weights with one scale per output row; ``fp8``: float8 e4m3 weights, one scale per row;
    ``nf4``: 4-bit NormalFloat in blocks of 64 (QLoRA's format). Weight-only: each matmul runs in the compute
    dtype. ``fp8`` leaves a layer with an all-zero output row (the tiny model's frozen guidance embedder) as is.
    Called before the LoRA is attached (peft then wraps the quantised layers). ``device``: each layer moves there
    just before it is quantised.
    """
    if mode == "none":
        return 0
    if any("lora_" in name for name, _ in module.named_modules()):
        raise ValueError("quantize_base: quantise the frozen base before attaching the LoRA")
    ao = _torchao(mode)

    def eligible(m: torch.nn.Module, _fqn: str = "") -> bool:
        if not isinstance(m, torch.nn.Linear):
            return False
        if mode == "fp8":  # torchao's float8 scales a row of zeros by 0 and returns NaN: such a layer stays as is
            return not bool((m.weight == 0).all(dim=1).any())
        return mode != "nf4" or m.weight.numel() % NF4_BLOCK == 0

    layers = [m for m in module.modules() if eligible(m)]
    try:
        if mode == "nf4":
            for m in layers:
                w = m.weight.detach().to(device or m.weight.device).contiguous()
                scaler_block = math.gcd(256, w.numel() // NF4_BLOCK)  # the scales are quantised in blocks too
                m.weight = torch.nn.Parameter(ao.to_nf4(w, NF4_BLOCK, scaler_block), requires_grad=False)
                if m.bias is not None and device is not None:
                    m.to(device)
        else:
            config = ao.Int8WeightOnlyConfig() if mode == "int8" else ao.Float8WeightOnlyConfig()
            ao.quantize_(module, config, filter_fn=eligible, device=device)
    except (RuntimeError, NotImplementedError, AssertionError, ImportError) as e:
        where = f" on {torch.device(device).type}" if device is not None else ""
        raise FluxfillError(f"model.quantize {mode}{where} failed in torchao: {first_line(e)}. "
                            "Try another model.quantize (int8 runs on any device) or none.") from e
    return len(layers)


def stored_bytes(module_or_tensor) -> int:
    """Bytes the parameters and buffers occupy as stored (a quantised weight counts its data and scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def size(t: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(t):
            return sum(size(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    if isinstance(module_or_tensor, torch.Tensor):
        return size(module_or_tensor)
    return sum(size(t) for t in (*module_or_tensor.parameters(), *module_or_tensor.buffers()))


def load_pipeline(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  components: dict | None = None):
    """A ``FluxFillPipeline`` of the preset; ``components`` passes already loaded parts (e.g. a LoRA transformer)."""
    from diffusers import FluxFillPipeline

    parts = dict(components or {})
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        if name not in parts:
            parts[name] = load_component(cfg, name, device, dtype)
    pipe = FluxFillPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def add_lora(transformer, cfg, adapter_name: str = "default"):
    """Attach trainable LoRA adapters (peft, through diffusers' ``add_adapter``); everything else stays frozen.

    ``cfg`` is a :class:`fluxfill.config.LoraConfig`. Targets are matched as module-name suffixes; a target that
    matches nothing is an error, so a typo cannot silently train nothing.
    """
    from peft import LoraConfig as PeftLoraConfig

    names = [n for n, _ in transformer.named_modules()]
    unmatched = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise FluxfillError(f"train.lora.target_modules {unmatched} match no module of the transformer")
    transformer.requires_grad_(False)
    with warnings.catch_warnings():  # on a quantised base: peft warns that merging is unsupported (never merged)
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        transformer.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               init_lora_weights="gaussian", target_modules=list(cfg.target_modules)),
                                adapter_name=adapter_name)
    return transformer
