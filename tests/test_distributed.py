"""Multi-process training on the CPU (gloo): N processes x batch b train the model of 1 process x batch N*b.

The 2-process runs go through `fluxfill train` with train.num_processes=2, i.e. accelerate's launcher (torchrun)
and real gloo collectives; 64-px panels, 4 steps.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import make_prepared
from safetensors.torch import load_file, save_file

from fluxfill import tracking
from fluxfill.artifacts import TRAIN_PLOT, VAL_PLOT
from fluxfill.config import FluxfillError, LoraConfig, validate
from fluxfill.distributed import (
    WorkerStopped,
    load_trainable_state_dict,
    stop_on_sigterm,
    trainable_state_dict,
    with_world_size,
)
from fluxfill.encode import LatentCache, encode
from fluxfill.objective import flow_matching_step, sample_noise
from fluxfill.step import sample_generators
from fluxfill.train import StepSampler, train

PANEL, STEPS = 64, 4
TOLERANCE = {"lora": 1e-3, "fusion": 1e-4}  # per tensor |a - b| / |b|, a 2-process against a 1-process run


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield  # accelerate keeps one state per process; these tests train in-process more than once
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_prepared(root / "prepared", 9, PANEL)  # 8 training samples: a global batch of 4 -> 2 steps per epoch
    encode(validate(raw_params(root)), device="cpu")
    return root


def raw_params(root: Path, db: Path | None = None, **train) -> dict:
    return {"data": {"panel_size": PANEL, "output": str(root / "prepared")},
            "model": {"max_sequence_length": 16},
            "encode": {"output": str(root / "latents"), "shard_size": 4},
            "train": {"max_steps": STEPS, "batch_size": 2, "checkpoint_every": 2, "learning_rate": 2e-3,
                      "fusion_learning_rate": 0.05, "gradient_checkpointing": True, **train},
            "eval": {"num_inference_steps": 1},
            "tracking": {"tracking_uri": f"sqlite:///{db or root / 'mlflow.db'}"}}


def fluxfill_train(workdir: Path, raw: dict, *args: str, env: dict | None = None,
                   launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """`fluxfill train <args>` in ``workdir`` with ``raw`` as its params.yaml, as a user runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    return subprocess.run([*launcher, "-m", "fluxfill.cli", "train", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(root: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(root / "models/lora/pytorch_lora_weights.safetensors"))
    out.update({f"fusion.{k}": v for k, v in load_file(str(root / "models/fusion.safetensors")).items()})
    return out


def relative_errors(a: dict, b: dict) -> dict[str, float]:
    """The largest per-tensor |a - b| / |b| over the LoRA tensors and over the fusion tensors."""
    assert a.keys() == b.keys()
    worst = {"lora": 0.0, "fusion": 0.0}
    for k in b:
        kind = "fusion" if k.startswith("fusion.") else "lora"
        worst[kind] = max(worst[kind], float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)))
    return worst


def test_global_batch_and_noise_depend_only_on_step_and_position():
    one = StepSampler(10, 4, seed=3, accum=1)
    two = [StepSampler(10, 2, seed=3, world=2, rank=r) for r in (0, 1)]
    accum = StepSampler(10, 2, seed=3, accum=2)
    for step in range(5):  # 2 steps per epoch: crosses epoch boundaries
        expected = one.batch(step)
        assert two[0].batch(step) + two[1].batch(step) == expected
        assert accum.batch(2 * step) + accum.batch(2 * step + 1) == expected
        assert len(set(expected)) == 4
        assert two[1].positions(step) == (step, range(2, 4)) and accum.positions(2 * step + 1) == (step, range(2, 4))
    assert not set(one.batch(0)) & set(one.batch(1))  # one epoch: disjoint global batches
    with pytest.raises(FluxfillError, match=r"global batch of 12 \(train.num_processes 3 x batch_size 2 x "
                                            r"gradient_accumulation_steps 2\) exceeds the 10 training samples"):
        StepSampler(10, 2, seed=0, accum=2, world=3)
    # each sample's sigma and noise come from its own (seed, step, position): the same in any split of the batch
    whole = sample_noise(torch.Size([4, 8, 64]), "cpu", sample_generators(5, 7, range(4), "cpu"))
    halves = [sample_noise(torch.Size([2, 8, 64]), "cpu", sample_generators(5, 7, range(2 * r, 2 * r + 2), "cpu"))
              for r in (0, 1)]
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves])) and torch.equal(whole[1], torch.cat([h[1] for h in halves]))
    other_step = sample_noise(torch.Size([4, 8, 64]), "cpu", sample_generators(5, 8, range(4), "cpu"))
    assert not torch.equal(whole[1], other_step[1])


def test_world_size_comes_from_the_launcher():
    params = validate({})
    assert with_world_size(params, 8).train.num_processes == 8 and params.train.num_processes == 1
    two = validate({"train": {"num_processes": 2}})
    assert with_world_size(two, 2) is two
    with pytest.raises(FluxfillError, match=r"train.num_processes is 2 but this process is one of 4 started by a "
                                            r"launcher: set train.num_processes=4"):
        with_world_size(two, 4)


def test_the_launchers_stop_signal_leaves_a_failing_worker_to_end_its_run_failed(tmp_path, monkeypatch):
    """torchrun's SIGTERM can reach a worker already failing (its collective broke when the other rank exited)
    while it writes FAILED to MLflow: that write must finish. A worker still training is stopped by it."""
    params = validate(raw_params(tmp_path))
    real = mlflow.MlflowClient.set_terminated

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the next bytecode, in the middle of ending the run
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", signalled)
    previous = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    try:
        with pytest.raises(RuntimeError, match="Connection closed by peer"), tracking.start_run(params) as run:
            raise RuntimeError("[gloo] Connection closed by peer")
        assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
        with pytest.raises(WorkerStopped, match="another rank failed"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the handler raises first
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def two_processes(latents, tmp_path_factory):
    """`fluxfill train --set train.num_processes=2 --fresh`, batch 2 per process; its folder and timing."""
    work = tmp_path_factory.mktemp("two")
    start = time.monotonic()
    run = fluxfill_train(work, raw_params(latents, work / "mlflow.db"), "--set", "train.num_processes=2", "--fresh")
    assert run.returncode == 0, run.stderr[-4000:]
    return work, time.monotonic() - start, run


def test_two_processes_train_the_model_of_one_with_the_doubled_batch(latents, two_processes, tmp_path, monkeypatch):
    work, seconds, run = two_processes
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1  # only the main process logs
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["accelerate.world_size"] == "2"
    assert runs[0].data.tags["accelerate.distributed_type"] == "MULTI_CPU"  # gloo, not 2 single-process runs
    assert runs[0].data.params["train.num_processes"] == "2"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.stdout.count("train: 4 steps") == 1  # one summary line, from the main process
    assert "INFO accelerate" not in run.stdout + run.stderr  # no line per file a checkpoint saves, on any rank
    ckpt = next(work.glob("checkpoints/*/checkpoint-000002"))  # every rank took part: RNG states of both
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((ckpt / "fluxfill_state.json").read_text())["global_batch"] == 4

    monkeypatch.chdir(tmp_path)
    train(validate(raw_params(latents, tmp_path / "mlflow.db", batch_size=4, gradient_checkpointing=False)))
    errors = relative_errors(weights(work), weights(tmp_path))
    # the logged curves too: loss and fusion statistics are means over the global batch, whatever its split
    two, one = (list(csv.DictReader((root / TRAIN_PLOT).open())) for root in (work, tmp_path))
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["1", "2", "3", "4"]
    for a, b in zip(two, one, strict=True):
        for column in ("loss", "fusion_weight", "fusion_cos", "fusion_ref_norm"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-4, abs=1e-5), (a["step"], column)
    two, one = (list(csv.DictReader((root / VAL_PLOT).open())) for root in (work, tmp_path))  # every rank: all of val
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) >= 2
    assert all(float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4) for a, b in zip(two, one, strict=True))
    print(f"\n2 processes x batch 2 vs 1 process x batch 4, {STEPS} steps: max |a-b|/|b| LoRA {errors['lora']:.2e}, "
          f"fusion {errors['fusion']:.2e}; the 2-process run took {seconds:.1f} s")
    assert errors["lora"] <= TOLERANCE["lora"] and errors["fusion"] <= TOLERANCE["fusion"]


def test_failing_rank_stops_all_and_resume_is_exact_or_keeps_the_global_batch(latents, two_processes, tmp_path,
                                                                              monkeypatch):
    reference = weights(two_processes[0])
    work = tmp_path / "failed"
    raw = raw_params(latents, work / "mlflow.db", num_processes=2)
    start = time.monotonic()
    run = fluxfill_train(work, raw, env={"FLUXFILL_FAIL_AT": "1:3"})  # rank 1 raises when it starts step 3
    assert run.returncode == 1 and time.monotonic() - start < 300, run.stderr[-4000:]
    assert run.stderr.strip().splitlines()[-1] == ("fluxfill train: error: rank 1 of 2 failed: RuntimeError: failure "
                                                   "injected by FLUXFILL_FAIL_AT=1:3 on rank 1 at step 3")
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    (failed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert failed.info.status == "FAILED" and not (work / "models").exists(), run.stderr[-4000:]
    assert [p.name for p in work.glob("checkpoints/*/checkpoint-*")] == ["checkpoint-000002"]

    # another world size with another global batch: refused, saying what to set
    monkeypatch.chdir(work)
    with pytest.raises(FluxfillError, match=r"checkpoint-000002 holds step 2 of this configuration at global batch 4 "
                                            r"\(2 processes x batch_size 2 x gradient_accumulation_steps 1\); 1 x 2 x 1 "
                                            r"= 2 would start another run. To continue it with 1 process set "
                                            r"train.batch_size=4; to train at global batch 2 instead, start over"):
        train(validate(raw_params(latents, work / "mlflow.db")))
    # ... or, as it says, --fresh starts over at the new global batch, leaving that checkpoint where it is
    assert train(validate(raw_params(latents, work / "mlflow.db")), stop_after=1, fresh=True).steps == 1
    assert len(list(work.glob("checkpoints/*/checkpoint-000002"))) == 1

    # another world size keeping the global batch: continues (a copy, so that both resumes start from step 2)
    other = tmp_path / "one-process"
    shutil.copytree(work, other)
    monkeypatch.chdir(other)
    result = train(validate(raw_params(latents, other / "mlflow.db", batch_size=4)))
    assert result.resumed_from == 2 and result.run_id == failed.info.run_id
    errors = relative_errors(weights(other), reference)
    assert errors["lora"] <= TOLERANCE["lora"] and errors["fusion"] <= TOLERANCE["fusion"], errors

    # the same world size: exact; started by hand with accelerate's launcher (detected: no second launch)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    run = fluxfill_train(work, raw, launcher=(accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                                              "--main_process_port", "0"))
    assert run.returncode == 0 and "(resumed from step 2)" in run.stdout, run.stderr[-4000:]
    resumed = weights(work)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert mlflow.MlflowClient().get_run(failed.info.run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------ FSDP
def _sharded_step(rank: int, world: int, cache_dir: str, out: str) -> None:
    """One training step of the tiny transformer + LoRA + fusion, FSDP2-sharded over ``world`` gloo processes
    (unsharded for 1); rank 0 writes the trainable tensors, then checks they round-trip into a new sharded model."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    cache = LatentCache(cache_dir, "train")
    transformer, fusion = _sharded_model(cache, world, seed=0)
    if world > 1:
        params = [*transformer.parameters(), *fusion.parameters()]
        assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
    optimizer = torch.optim.AdamW([p for m in (transformer, fusion) for p in m.parameters() if p.requires_grad], lr=1e-2)
    positions = range(rank * 4 // world, (rank + 1) * 4 // world)  # this rank's share of a global batch of 4
    batch = cache.collate([cache[i] for i in positions])
    flow_matching_step(transformer, fusion, batch, generator=sample_generators(0, 0, positions, "cpu")).loss.backward()
    optimizer.step()
    saved = {**trainable_state_dict(transformer), **{f"fusion.{k}": v for k, v in trainable_state_dict(fusion).items()}}
    path = Path(out) / f"trainable-{world}.safetensors"
    if rank == 0:
        save_file(saved, str(path))
    if world > 1:
        dist.barrier()
        fresh_t, fresh_f = _sharded_model(cache, world, seed=1)
        state = load_file(str(path))
        load_trainable_state_dict(fresh_t, {k: v for k, v in state.items() if not k.startswith("fusion.")}, path)
        load_trainable_state_dict(fresh_f, {k[7:]: v for k, v in state.items() if k.startswith("fusion.")}, path)
        again = {**trainable_state_dict(fresh_t), **{f"fusion.{k}": v for k, v in trainable_state_dict(fresh_f).items()}}
        if rank == 0:
            assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
        dist.destroy_process_group()


def _sharded_model(cache, world: int, seed: int):
    from torch.distributed.fsdp import fully_shard

    from fluxfill.config import ModelConfig
    from fluxfill.fusion import SemanticFusion
    from fluxfill.models import add_lora, load_component

    torch.manual_seed(seed)
    transformer = add_lora(load_component(ModelConfig(preset="tiny"), "transformer"), LoraConfig(rank=4))
    with torch.no_grad():  # LoRA B starts at zero: give every trainable tensor a value
        for p in transformer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    fusion = SemanticFusion("learned", cache[0]["pooled_prompt_embeds"].shape[-1], cache[0]["image_embeds"].shape[-1])
    if world > 1:
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            fully_shard(block)
        fully_shard(transformer)
        fully_shard(fusion)
    return transformer, fusion


def test_fully_shard_lora_and_fusion_save_like_an_unsharded_run(latents, tmp_path):
    import torch.multiprocessing as mp

    cache_dir = str(latents / "latents")
    torch.manual_seed(0)
    _sharded_step(0, 1, cache_dir, str(tmp_path))
    mp.spawn(_sharded_step, args=(2, cache_dir, str(tmp_path)), nprocs=2)
    sharded, plain = (load_file(str(tmp_path / f"trainable-{w}.safetensors")) for w in (2, 1))
    assert sharded.keys() == plain.keys() and any(k.endswith("lora_B.default.weight") for k in plain)
    assert {"fusion.theta", "fusion.proj.weight"} <= plain.keys()
    errors = relative_errors(sharded, plain)
    # Adam's first step divides by |g|: on the pretrained tiny model some LoRA gradients (the context stream's
    # feed-forward) are sums of cancelling terms, and their reduction order shows (measured: 1.1e-4 relative)
    assert errors["lora"] <= 1e-3 and errors["fusion"] <= 1e-5, errors


def test_fsdp_config_is_what_accelerate_launch_runs(tiny):
    """accelerate/fsdp.yaml through accelerate's own launcher code: FSDP2 over the Flux blocks, sharded checkpoints."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.dataclasses import get_module_class_from_name
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    config = Path(__file__).resolve().parents[1] / "accelerate/fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2",
                                               "-m", "fluxfill.cli", "train"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 2 and args.mixed_precision == "bf16"
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT and not plugin.cpu_ram_efficient_loading
    for name in plugin.transformer_cls_names_to_wrap:  # the classes FSDP wraps exist in the Fill transformer
        assert get_module_class_from_name(tiny["transformer"], name) is not None, name
    assert sorted(plugin.transformer_cls_names_to_wrap) == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
