"""model.quantize: the frozen transformer stored quantised (torchao), the LoRA trained on top, on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxfill.config import ConfigError, FluxfillError, LoraConfig, ModelConfig, validate
from fluxfill.fusion import SemanticFusion
from fluxfill.models import add_lora, load_component, quantize_base, stored_bytes
from fluxfill.objective import flow_matching_step

N, T = 32, 8
# mode: (torchao weight class, stored bytes of the linear layers / fp32 at most, output error at most)
MODES = {"int8": ("Int8Tensor", 0.30, 0.02), "fp8": ("Float8Tensor", 0.30, 0.08), "nf4": ("NF4Tensor", 0.16, 0.25)}


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(x_0=torch.randn(2, N, 64, generator=g), masked_latents=torch.randn(2, N, 64, generator=g),
                mask_latents=torch.rand(1, N, 256, generator=g), prompt_embeds=torch.randn(2, T, 32, generator=g),
                pooled_prompt_embeds=torch.randn(2, 32, generator=g), image_embeds=torch.randn(2, 24, generator=g),
                img_ids=torch.zeros(N, 3), txt_ids=torch.zeros(T, 3))


def linears(module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def output(transformer) -> torch.Tensor:
    none = SemanticFusion("none", 32, 24)
    return flow_matching_step(transformer, none, batch(), generator=torch.Generator().manual_seed(1)).model_output


@pytest.fixture(scope="module")
def full_precision():
    transformer = load_component(ModelConfig(), "transformer")
    return transformer, output(transformer)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_quantised_base_is_smaller_close_and_trains_a_fp32_lora(mode, full_precision):
    base, expected = full_precision
    cls, max_bytes, max_err = MODES[mode]
    transformer = load_component(ModelConfig(quantize=mode), "transformer")
    zero_row = [m for m in linears(transformer) if type(m.weight).__name__ != cls]
    assert {type(m.weight).__name__ for m in linears(transformer)} - {"Parameter"} == {cls}
    # every linear of the tiny model; fp8 keeps the one with zero rows (the frozen guidance embedder's output)
    assert zero_row == ([transformer.time_text_embed.guidance_embedder.linear_2] if mode == "fp8" else [])
    ratio = sum(stored_bytes(m) for m in linears(transformer)) / sum(stored_bytes(m) for m in linears(base))
    assert ratio < max_bytes, ratio
    got = output(transformer)
    err = ((got - expected).norm() / expected.norm()).item()
    assert 0 < err < max_err, err  # quantised (not bit-equal), and still the same network

    add_lora(transformer, LoraConfig(rank=4, alpha=4))
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    fusion = SemanticFusion("learned", 32, 24)
    flow_matching_step(transformer, fusion, batch()).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)


def test_bf16_compute_dtype_is_kept():
    transformer = load_component(ModelConfig(quantize="int8", dtype="bf16"), "transformer")
    assert transformer.dtype == torch.bfloat16
    assert {type(m.weight).__name__ for m in linears(transformer)} == {"Int8Tensor"}
    got, plain = output(transformer), output(load_component(ModelConfig(dtype="bf16"), "transformer"))
    assert got.dtype == torch.bfloat16
    err = ((got.float() - plain.float()).norm() / plain.float().norm()).item()
    assert 0 < err < MODES["int8"][2], err  # the bf16 network, quantised: close to it, not bit-equal


def test_quantising_after_the_lora_is_refused():
    transformer = add_lora(load_component(ModelConfig(), "transformer"), LoraConfig(rank=2, alpha=2))
    with pytest.raises(ValueError, match="quantise the frozen base before attaching the LoRA"):
        quantize_base(transformer, "int8")


def test_none_leaves_the_weights_alone(full_precision):
    transformer = load_component(ModelConfig(), "transformer")
    assert quantize_base(transformer, "none") == 0
    assert {type(m.weight) for m in linears(transformer)} == {torch.nn.Parameter}
    base, expected = full_precision
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in transformer.state_dict().items())
    assert torch.equal(output(transformer), expected)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if not installed
    with pytest.raises(FluxfillError, match=r"^model.quantize int8 needs torchao \(import of torchao.quantization "
                                            r"halted; None in sys.modules\): pip install 'fluxfill\[quantize\]'") as err:
        load_component(ModelConfig(quantize="int8"), "transformer")
    assert isinstance(err.value.__cause__, ImportError)  # an installed but broken torchao shows its own error


def test_a_torchao_failure_names_the_setting(monkeypatch):
    import torchao.quantization as ao

    def unsupported(*args, **kwargs):
        raise NotImplementedError("Float8 weights need a CUDA device with compute capability >= 8.9\nmore")

    monkeypatch.setattr(ao, "quantize_", unsupported)
    with pytest.raises(FluxfillError, match=r"^model.quantize fp8 on cpu failed in torchao: Float8 weights need a "
                                            r"CUDA device with compute capability >= 8.9\. Try another") as err:
        load_component(ModelConfig(quantize="fp8"), "transformer")
    assert isinstance(err.value.__cause__, NotImplementedError) and str(err.value.__cause__).endswith("\nmore")


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.quantize: Input should be 'none', 'fp8', 'int8' or 'nf4'"):
        validate({"model": {"quantize": "int4"}})


def test_changing_quantize_does_not_make_the_encode_stage_stale():
    """dvc.yaml lists every model key the encode stage depends on, and not model.quantize (transformer only)."""
    from pathlib import Path

    import yaml

    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    listed = set(stages["encode"]["params"])
    assert {f"model.{k}" for k in ModelConfig.model_fields} - listed == {"model.quantize"}
    assert "model" not in listed and "model.quantize" in stages["train"]["params"]
