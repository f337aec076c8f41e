"""Typed configuration: one section per stage, loaded from ``params.yaml`` and validated at load.

Every CLI stage, flow and benchmark reads its settings through :func:`load_params`, so an unknown
key, a wrong type or an out-of-range value fails the same way everywhere: with the file, the key
path and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PARAMS_FILE = "params.yaml"
FUSION_MODES = ("none", "fixed", "learned")
DEMO_TASKS = ("enhance", "tint")
# data.instruction when it is null: what the demo task asks for (folder and manifest data use "enhance")
TASK_INSTRUCTIONS = {
    "enhance": "it is well exposed, sharp and free of noise",
    "tint": "its colours are graded with the same look as the reference photo",
}
DEFAULT_PROMPT_TEMPLATE = (
    "A diptych with two side-by-side images of the same scene. "
    "On the right, the scene is exactly the same as on the left but {instruction}"
)


class FluxfillError(RuntimeError):
    """An error the user can act on (bad input, missing weights, stale cache): the CLI prints it, no traceback."""


class ConfigError(ValueError):
    """A params file or override that does not validate; the message names file, key and reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(Section):
    source: Literal["demo", "folder", "manifest"] = "demo"
    demo_task: Literal["enhance", "tint"] = Field(
        "enhance", description="enhance: degraded -> clean photo; tint: photo -> the colour look shown by the reference")
    path: str = Field("data/raw", description="folder root (source: folder) or CSV file (source: manifest)")
    output: str = "data/prepared"
    panel_size: int = Field(128, ge=16, le=4096)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    allow_upscale: bool = False
    instruction: str | None = Field(None, description="null: the instruction of data.demo_task")
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    @field_validator("panel_size")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        check_panel_size(v)
        return v

    @field_validator("prompt_template")
    @classmethod
    def _has_instruction(cls, v: str) -> str:
        if "{instruction}" not in v:
            raise ValueError("must contain the placeholder {instruction}")
        return v

    @property
    def task_instruction(self) -> str:
        """``instruction``, or the demo task's own when it is null."""
        return TASK_INSTRUCTIONS[self.demo_task] if self.instruction is None else self.instruction


class ModelConfig(Section):
    preset: Literal["tiny", "flux-fill-dev", "flux-fill-dev-random"] = "tiny"
    pretrained: str = Field("black-forest-labs/FLUX.1-Fill-dev", description="hub id or local folder")
    image_encoder: str = Field("openai/clip-vit-large-patch14", description="CLIP vision: hub id or folder")
    revision: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_sequence_length: int = Field(128, ge=1, le=512)
    quantize: Literal["none", "fp8", "int8", "nf4"] = Field(
        "none", description="storage of the frozen transformer's linear weights (torchao); model.dtype stays the "
        "compute dtype and the LoRA trains on top in fp32")


class EncodeConfig(Section):
    output: str = "data/latents"
    batch_size: int = Field(4, ge=1)
    shard_size: int = Field(16, ge=1, description="samples per safetensors shard")
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = [
        "x_embedder",
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "proj_mlp", "proj_out",
    ]


class TrainConfig(Section):
    output: str = "models"
    checkpoint_dir: str = "checkpoints"
    max_steps: int = Field(600, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1, description="worker processes (GPUs; CPU: gloo); global batch = "
                               "num_processes x batch_size x gradient_accumulation_steps")
    learning_rate: float = Field(2e-3, gt=0)
    fusion_learning_rate: float | None = Field(0.01, gt=0, description="None: same as learning_rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="auto: off on CPU; with CUDA only as many blocks as the free memory needs")
    loss_region: Literal["all", "target"] = "all"
    seed: int = 0
    log_every: int = Field(1, ge=1)
    val_every: int = Field(10, ge=0, description="val_loss every N steps (and at step 0 and the end); 0: never")
    val_sigmas: int = Field(4, ge=1, description="K: val_loss averages K evenly spaced noise levels per val sample")
    sample_every: int = Field(0, ge=0, description="0: only at the end")
    checkpoint_every: int = Field(20, ge=0, description="0: never")
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0)
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile of each transformer block; auto: on with CUDA for an unquantised base")
    lora: LoraConfig = LoraConfig()


class FusionConfig(Section):
    mode: Literal["none", "fixed", "learned"] = Field(
        "learned", description="none: no reference; fixed: alpha stays at init, W trained; learned: alpha and W trained")
    init: float = Field(0.1, gt=0.0, lt=1.0, description="alpha at step 0, strictly inside (0, 1)")

    @field_validator("mode", mode="before")
    @classmethod
    def _renamed(cls, v):
        if v == "pooled":
            raise ValueError("'pooled' was renamed 'learned' (alpha and W trained); "
                             "the other modes are 'fixed' (alpha frozen at fusion.init) and 'none'")
        return v


class EvalConfig(Section):
    output: str = "eval"
    num_inference_steps: int = Field(8, ge=1)
    guidance_scale: float = Field(30.0, ge=0)
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    max_samples: int | None = Field(None, ge=1)


class TrackingConfig(Section):
    experiment: str = "fluxfill"
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db")
    run_name: str | None = None
    registered_model: str | None = Field(
        "fluxfill-diptych", min_length=1,
        description="MLflow Model Registry name each finished training run registers a version under; None: none")


class Params(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    encode: EncodeConfig = EncodeConfig()
    train: TrainConfig = TrainConfig()
    fusion: FusionConfig = FusionConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    def flat(self) -> dict[str, Any]:
        """``{"train.lora.rank": 16, ...}``: what MLflow logs as params."""
        return flatten(self.model_dump())


class ModelSpec(Section):
    """What a trained model needs besides its weights to be rebuilt for generation (``fluxfill_model.json``).

    Training writes it next to the LoRA and the fusion file with the settings that produced them; a registered
    MLflow model version also carries the evaluation settings of its run (``eval``), which ``fluxfill edit`` uses
    as its defaults.
    """

    fluxfill_version: str
    model: ModelConfig
    panel_size: int = Field(ge=16, le=4096)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    instruction: str
    lora: LoraConfig
    fusion: FusionConfig
    eval: EvalConfig | None = None

    @classmethod
    def from_params(cls, params: Params, version: str, with_eval: bool = False) -> ModelSpec:
        return cls(fluxfill_version=version, model=params.model, panel_size=params.data.panel_size,
                   prompt_template=params.data.prompt_template, instruction=params.data.task_instruction,
                   lora=params.train.lora, fusion=params.fusion, eval=params.eval if with_eval else None)

    @property
    def prompt(self) -> str:
        """The training prompt: ``prompt_template`` with ``instruction``."""
        return self.prompt_template.format(instruction=self.instruction)


def check_panel_size(size: int) -> None:
    if size % 16 != 0 or size <= 0:
        raise ValueError(
            f"panel_size {size} is not a positive multiple of 16: FLUX packs 2x2 latents of an 8x VAE, "
            f"so each panel side must be divisible by 16 (try {max(16, round(size / 16) * 16)})"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.max_steps=5"`` -> (["train", "max_steps"], 5); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {item!r}: the key must name a section and a key, e.g. train.max_steps=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from e
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Set dotted keys in a nested dict; ``overrides`` is a mapping or a list of ``key=value`` strings."""
    if not overrides:
        return raw
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else [
        ([p for p in k.split(".") if p], v) for k, v in overrides.items()
    ]
    for path, value in items:
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        reason = e["msg"]
        if e["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling; see params.yaml for every key)"
        got = e.get("input")
        got_txt = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {reason}{got_txt}")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Read ``params.yaml`` (or ``path``), apply ``section.key=value`` overrides, validate."""
    p = Path(path) if path is not None else Path(PARAMS_FILE)
    raw: dict[str, Any] = {}
    if p.exists():
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, model, train, ...)")
    elif path is not None:
        raise ConfigError(f"{p}: params file not found")
    raw = apply_overrides(raw, overrides)
    keys = [o.partition("=")[0].strip() for o in overrides] if isinstance(overrides, list) else list(overrides or {})
    given = f"the overrides {', '.join(keys)}"
    return validate(raw, str(p) if not keys else f"{p} with {given}" if p.exists() else given)


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The project root: the nearest folder holding ``dvc.yaml`` or ``params.yaml``.

    Inside a DVC temporary experiment workspace (``<repo>/.dvc/tmp/exps/...``) it returns the outer
    repository, so the default MLflow database is shared rather than scattered.
    """
    here = Path(start or Path.cwd()).resolve()
    text = str(here)
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps"
    if marker in text:
        return Path(text.split(marker)[0])
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / PARAMS_FILE).exists():
            return d
    return here
