"""fluxfill.step: the one training step that fluxfill train and the GPU benchmark call, and its settings."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import fluxfill.models as models_module
import fluxfill.step as step_module
from fluxfill.config import LoraConfig, ModelConfig, TrainConfig, validate
from fluxfill.encode import encode
from fluxfill.models import add_lora, load_component
from fluxfill.train import train
from tests.helpers import make_prepared

PANEL = 32


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_prepared(root / "prepared", 5, PANEL)
    encode(validate(raw_params(root)), device="cpu")
    return root


def raw_params(root, model=None, **train) -> dict:
    return {"data": {"panel_size": PANEL, "output": str(root / "prepared")},
            "model": {"max_sequence_length": 16, **(model or {})},
            "encode": {"output": str(root / "latents"), "shard_size": 4},
            "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0, **train},
            "eval": {"num_inference_steps": 1},
            "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"}}


def test_train_runs_every_micro_step_through_train_step(latents, workdir, monkeypatch):
    real, calls = step_module.train_step, []

    def counted(trainer, batch, generator):
        loss, grad_norm = real(trainer, batch, generator)
        calls.append((batch["x_0"].shape[0], grad_norm is not None, loss.requires_grad))
        return loss, grad_norm

    monkeypatch.setattr(step_module, "train_step", counted)
    result = train(validate(raw_params(latents, max_steps=3, gradient_accumulation_steps=2)))
    assert result.steps == 3
    # 2 micro-steps per step; the gradient norm comes back when the weights change, the loss detached
    assert calls == [(2, False, False), (2, True, False)] * 3


def test_quantised_training_quantises_once_and_saves_a_fp32_lora(latents, workdir, monkeypatch):
    real, calls = models_module.quantize_base, []
    monkeypatch.setattr(models_module, "quantize_base", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    result = train(validate(raw_params(latents, model={"quantize": "int8"})))
    assert result.steps == 2 and result.loss == result.loss  # finite
    assert calls == ["int8"]  # once per process, the end-of-run sample grid included
    lora = load_file("models/lora/pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert lora["transformer.x_embedder.lora_A.weight"].shape == (16, 384)


class TwoRanks:
    """Two processes' accelerators, played by threads: a barrier is accelerate's wait_for_everyone."""

    num_processes = 2

    def __init__(self, rank: int, barrier: threading.Barrier):
        self.process_index, self._barrier = rank, barrier

    def wait_for_everyone(self):
        self._barrier.wait(timeout=10)


def test_processes_load_one_at_a_time_in_rank_order():
    barrier, events, results = threading.Barrier(2), [], {}

    def load(rank):
        events.append(("start", rank))
        time.sleep(0.05)  # long enough for the other thread to start too if nothing held it back
        events.append(("end", rank))
        return f"model of rank {rank}"

    def process(rank):
        results[rank] = step_module.one_process_at_a_time(TwoRanks(rank, barrier), lambda: load(rank))

    threads = [threading.Thread(target=process, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert results == {0: "model of rank 0", 1: "model of rank 1"}


@pytest.mark.parametrize(("setting", "runs"), [(False, [1] * 6), (True, [2] * 6), (2, [2, 2, 1, 1, 1, 1])])
def test_checkpointing_recomputes_the_chosen_blocks(setting, runs):
    """Forward calls per block over one forward + backward: a checkpointed block runs again in the backward."""
    transformer = add_lora(load_component(ModelConfig(), "transformer"), LoraConfig(rank=2, alpha=2)).train()
    step_module.set_checkpointing(transformer, setting)
    counts = [0] * 6  # tiny: 2 double-stream + 4 single-stream blocks
    for i, block in enumerate(step_module.blocks(transformer)):  # (the recomputation runs no forward hooks)
        def counted(*args, forward=block.forward, i=i, **kwargs):
            counts[i] += 1
            return forward(*args, **kwargs)

        block.forward = counted
    n, t = 8, 4
    out = transformer(hidden_states=torch.randn(1, n, 384), encoder_hidden_states=torch.randn(1, t, 32),
                      pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([1.0]), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(t, 3),
                      return_dict=False)[0]
    out.square().mean().backward()
    assert counts == runs


def test_compile_switches_each_block_and_back():
    transformer = load_component(ModelConfig(), "transformer")
    step_module.set_compiled(transformer, True)
    compiled = [b._compiled_call_impl for b in step_module.blocks(transformer)]
    assert len(compiled) == 6 and all(c is not None for c in compiled)
    step_module.set_compiled(transformer, True)  # already compiled: kept
    assert [b._compiled_call_impl for b in step_module.blocks(transformer)] == compiled
    step_module.set_compiled(transformer, False)
    assert all(b._compiled_call_impl is None for b in step_module.blocks(transformer))


@pytest.mark.parametrize(("mixed", "dtype", "device", "expect"), [
    ("auto", "auto", "cpu", ("no", torch.float32)), ("auto", "auto", "cuda", ("bf16", torch.bfloat16)),
    ("bf16", "auto", "cpu", ("bf16", torch.bfloat16)), ("no", "bf16", "cpu", ("no", torch.bfloat16)),
    ("fp16", "fp32", "cuda", ("fp16", torch.float32))])
def test_precision_policy(mixed, dtype, device, expect):
    params = validate({"model": {"dtype": dtype}, "train": {"mixed_precision": mixed}})
    got = step_module.mixed_precision(params.train, torch.device(device))
    assert (got, step_module.weight_dtype(params, got, torch.device(device))) == expect
    assert step_module.resolve("auto", torch.device(device)) is (device == "cuda")
    assert step_module.resolve(True, torch.device("cpu")) is True and TrainConfig().compile == "auto"


def test_build_keeps_the_dtype_policy_and_prepares_for_accelerate(workdir, monkeypatch):
    from accelerate import Accelerator
    from fluxfill import objective
    from fluxfill.fusion import SemanticFusion

    params = validate({"model": {"dtype": "bf16"}, "train": {"lora": {"rank": 4, "alpha": 4}, "compile": False,
                                                             "fusion_learning_rate": 0.05, "weight_decay": 0.01}})
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    transformer = step_module.load_transformer(params, accelerator, torch.bfloat16)
    fusion = SemanticFusion("learned", 32, 24)
    trainer = step_module.build(params, accelerator, transformer, fusion)
    assert trainer.transformer.training and trainer.transformer.dtype == torch.bfloat16
    assert trainer.dtype == torch.bfloat16  # the inputs' cast, looked up once: a step walks no module tree for it
    monkeypatch.setattr(objective, "extract_model_from_parallel", lambda m: pytest.fail("dtype looked up in a step"))
    lora = [p for p in transformer.parameters() if p.requires_grad]
    assert {p.dtype for p in lora} == {torch.float32} and {p.dtype for p in trainer.trainable} == {torch.float32}
    assert len(trainer.trainable) == len(lora) + 2  # + the fusion's θ and W (no bias)
    groups = trainer.optimizer.param_groups
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("lora", 0.002, 0.01), ("fusion.theta", 0.05, 0.0), ("fusion.proj.weight", 0.05, 0.01)]
    g = torch.Generator().manual_seed(0)
    n, t = 8, 16
    batch = dict(x_0=torch.randn(2, n, 64, generator=g), masked_latents=torch.randn(2, n, 64, generator=g),
                 mask_latents=torch.rand(1, n, 256, generator=g), prompt_embeds=torch.randn(2, t, 32, generator=g),
                 pooled_prompt_embeds=torch.randn(2, 32, generator=g), image_embeds=torch.randn(2, 24, generator=g),
                 img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(t, 3))
    before = [p.detach().clone() for p in lora]
    loss, grad_norm = step_module.train_step(trainer, batch, torch.Generator().manual_seed(1))
    # accelerate's autocast hands back fp32 outputs: the loss is fp32 with a bf16 base; the LoRA moved
    assert loss.dtype == torch.float32 and not loss.requires_grad and float(grad_norm) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, lora, strict=True))


def test_auto_checkpointing_keeps_activations_within_the_free_memory():
    """``auto`` on CUDA: the fewest checkpointed blocks whose un-checkpointed neighbours fit 45% of free memory."""
    params = validate({"data": {"panel_size": 512}, "model": {"max_sequence_length": 512}})
    assert step_module.tokens_per_sample(params) == 2 * 32 * 32 + 512 == 2560
    per_block = 38 * 4 * 2560 * 3072  # bytes at batch 4, FLUX.1 hidden size: 1.195 GB
    # an H100 after loading the bf16 base: 59 GB free -> 22 blocks keep activations (26.3 GB), 35 recompute
    assert step_module.checkpointed_blocks(59e9, 4, 2560, 3072, 57) == 35
    assert 22 * per_block <= 0.45 * 59e9 < 23 * per_block
    assert step_module.checkpointed_blocks(1e9, 4, 2560, 3072, 57) == 57  # nothing fits: every block
    assert step_module.checkpointed_blocks(1e12, 4, 2560, 3072, 57) == 0  # everything fits: none
    assert step_module.checkpointed_blocks(59e9, 1, 2560, 3072, 57) == 0  # batch 1 fits without (21.8 GB)


def test_auto_checkpointing_is_off_on_the_cpu_and_explicit_settings_stand():
    transformer = load_component(ModelConfig(), "transformer")
    cpu = torch.device("cpu")
    for setting, expect in (("auto", False), (True, True), (False, False)):
        params = validate({"train": {"gradient_checkpointing": setting}})
        assert step_module.checkpointing_setting(params, transformer, cpu) is expect


@pytest.mark.parametrize(("compile_", "quantize", "device", "expect"), [
    ("auto", "none", "cuda", True), ("auto", "int8", "cuda", False), ("auto", "none", "cpu", False),
    (True, "int8", "cuda", True), (False, "none", "cuda", False)])
def test_auto_compile_is_off_for_a_quantised_base(compile_, quantize, device, expect):
    params = validate({"model": {"quantize": quantize}, "train": {"compile": compile_}})
    assert step_module.compile_setting(params, torch.device(device)) is expect
