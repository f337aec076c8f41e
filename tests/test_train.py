"""Training: loss goes down, outputs load into FluxFillPipeline, exact resume after SIGKILL, guards, MLflow."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bench.common import make_prepared
from fluxfill.config import FluxfillError, validate
from fluxfill.data import data_version
from fluxfill.encode import encode
from fluxfill.fusion import SemanticFusion
from fluxfill.train import NonFiniteLoss, train

PANEL = 32


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_prepared(root / "prepared", 6, PANEL)
    encode(validate(raw_params(root)), device="cpu")
    return root


def raw_params(root: Path, **train) -> dict:
    return {"data": {"panel_size": PANEL, "output": str(root / "prepared")},
            "model": {"max_sequence_length": 16},
            "encode": {"output": str(root / "latents"), "shard_size": 4},
            "train": {"max_steps": 8, "batch_size": 2, "checkpoint_every": 2, "learning_rate": 2e-3,
                      "fusion_learning_rate": 0.05, **train},
            "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"}}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    # accelerate keeps one state per process; a CLI run has one, these tests run many (with other precisions)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def weights(root: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(root / "models/lora/pytorch_lora_weights.safetensors"))
    out.update({f"fusion.{k}": v for k, v in load_file(str(root / "models/fusion.safetensors")).items()})
    return out


def test_train_outputs_metrics_and_mlflow(latents, workdir):
    params = validate(raw_params(latents, max_steps=24, log_every=2, val_every=10))
    result = train(params)
    assert result.steps == 24 and 0 < result.fusion_weight < 1 and abs(result.fusion_weight - 0.1) > 1e-3
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["steps"] == 24 and metrics["fusion_weight"] == pytest.approx(result.fusion_weight)
    assert metrics["samples_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    table = list(csv.DictReader(Path("plots/train.csv").open()))
    assert list(table[0]) == ["step", "loss", "fusion_weight", "fusion_cos", "fusion_ref_norm", "val_loss", "lr"]
    assert [int(r["step"]) for r in table] == list(range(2, 25, 2))
    assert {int(r["step"]): r["val_loss"] != "" for r in table} == {s: s in (10, 20, 24) for s in range(2, 25, 2)}
    assert all(-1 <= float(r["fusion_cos"]) <= 1 and float(r["fusion_ref_norm"]) > 0 for r in table)
    val_rows = list(csv.DictReader(Path("plots/val.csv").open()))  # the DVC plot: step 0 is before training
    vals = {int(r["step"]): float(r["val_loss"]) for r in val_rows}
    assert list(val_rows[0]) == ["step", "val_loss"] and sorted(vals) == [0, 10, 20, 24]
    assert float(table[-1]["val_loss"]) == vals[24]
    assert metrics["val_loss"] == pytest.approx(vals[24], rel=1e-5) and metrics["val_loss_start"] == pytest.approx(vals[0], rel=1e-5)
    losses = [float(r["loss"]) for r in table]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # loss decreases over a short run
    ref = json.loads(Path("models/mlflow_run.json").read_text())
    assert ref["run_id"] == result.run_id
    mlflow.set_tracking_uri(ref["tracking_uri"])
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "24"
    assert run.data.tags["preset"] == "tiny" and run.data.tags["accelerate.world_size"] == "1"
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == list(range(2, 25, 2))
    alphas = client.get_metric_history(result.run_id, "fusion_weight")
    assert len(alphas) == 12 and alphas[-1].value == pytest.approx(result.fusion_weight)
    for name in ("fusion_cos", "fusion_ref_norm"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == list(range(2, 25, 2))
    history = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "val_loss"))
    assert [s for s, _ in history] == [0, 10, 20, 24] and history[-1][1] == pytest.approx(vals[24], rel=1e-5)
    assert run.data.params["fusion.init_method"] == "orthogonal"  # the tiny towers carry no text projection
    assert run.data.tags["fluxfill.models_md5"] == data_version("models")  # what DVC records for the output
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/fusion.safetensors" in artifacts and "model/lora" in artifacts


def test_lora_loads_into_fill_pipeline_and_changes_output(latents, workdir, tiny):
    from fluxfill.models import load_component, load_pipeline
    from fluxfill.shapes import synthetic_panels

    train(validate(raw_params(latents, max_steps=4)))
    lora = load_file("models/lora/pytorch_lora_weights.safetensors")
    assert lora["transformer.x_embedder.lora_A.weight"].shape[1] == 384  # Fill-only: 384 input features
    model_cfg = validate(raw_params(latents)).model
    pipe = load_pipeline(model_cfg, components={"transformer": load_component(model_cfg, "transformer")})
    p = synthetic_panels(1, PANEL)[0]

    def generate():
        return pipe(prompt="x", image=p.diptych, mask_image=p.mask, height=PANEL, width=2 * PANEL,
                    num_inference_steps=2, max_sequence_length=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    before = generate()
    pipe.load_lora_weights("models/lora")
    assert pipe.get_list_adapters()["transformer"]
    after = generate()
    assert not torch.allclose(before, after)


def test_sigkill_after_checkpoint_resumes_bit_identical(latents, workdir):
    steps = 60
    raw = raw_params(latents, max_steps=steps, checkpoint_every=2, keep_checkpoints=2)
    (workdir / "straight").mkdir()
    os.chdir(workdir / "straight")
    train(validate(raw))
    reference = weights(workdir / "straight")

    killed = workdir / "killed"
    killed.mkdir()
    os.chdir(killed)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "fluxfill.cli", "train"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not list(Path("checkpoints").glob("*/checkpoint-000004")):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its 2nd checkpoint"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not Path("models").exists(), "the run finished before it was killed"
    result = train(validate(raw))
    assert 4 <= result.resumed_from < steps
    resumed = weights(killed)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    assert mlflow.MlflowClient().get_run(result.run_id).info.status == "FINISHED"


def test_non_finite_loss_stops_with_message(latents, workdir, monkeypatch):
    import fluxfill.train as train_module

    real = train_module.flow_matching_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_module, "flow_matching_step", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5; stopped\. The last good checkpoint is kept"):
        train(validate(raw_params(latents, max_steps=8, checkpoint_every=2)))
    kept = sorted(p.name for p in Path("checkpoints").glob("*/checkpoint-*"))
    assert kept == ["checkpoint-000002", "checkpoint-000004"]
    assert not Path("models").exists()


def test_fusion_mode_none_trains_without_alpha(latents, workdir):
    raw = raw_params(latents, max_steps=4)
    raw["fusion"] = {"mode": "none"}
    result = train(validate(raw))
    assert result.fusion_weight is None
    assert SemanticFusion.load("models/fusion.safetensors").mode == "none"
    assert json.loads(Path("metrics/train.json").read_text())["fusion_weight"] is None
    rows = list(csv.DictReader(Path("plots/train.csv").open()))
    assert all(r["fusion_weight"] == r["fusion_cos"] == "" for r in rows) and rows[-1]["val_loss"]
    assert [r["step"] for r in csv.DictReader(Path("plots/val.csv").open())] == ["0", "4"]  # val_every 10: start, end
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    client = mlflow.MlflowClient()
    assert client.get_metric_history(result.run_id, "fusion_weight") == []
    assert client.get_metric_history(result.run_id, "fusion_cos") == []
    assert len(client.get_metric_history(result.run_id, "loss")) == 4


def test_cache_for_other_panel_size_is_refused(latents, workdir):
    raw = raw_params(latents)
    raw["data"]["panel_size"] = 64
    with pytest.raises(FluxfillError, match=r"panel_size: cache has 32, expected 64"):
        train(validate(raw))


def test_ctrl_c_writes_a_checkpoint(latents, workdir):
    raw = raw_params(latents, max_steps=400, checkpoint_every=50)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    log = open("train.log", "w")  # a file, not a pipe: the progress bar would fill a pipe and stall the run
    proc = subprocess.Popen([sys.executable, "-m", "fluxfill.cli", "train"], stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(Path("checkpoints").glob("*/checkpoint-000050")):
            assert proc.poll() is None and time.monotonic() < deadline, Path("train.log").read_text()[-2000:]
            time.sleep(0.02)
        time.sleep(1.0)  # a few more steps
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    err = Path("train.log").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; a checkpoint was written, run `fluxfill train` again to resume" in err
    steps = [int(p.name.split("-")[1]) for p in Path("checkpoints").glob("*/checkpoint-*")]
    assert f"interrupted at step {max(steps)}: writing a checkpoint" in err and max(steps) >= 50
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    killed_run = json.loads(next(Path("checkpoints").glob(f"*/checkpoint-{max(steps):06d}/fluxfill_state.json"))
                            .read_text())["run_id"]
    assert mlflow.MlflowClient().get_run(killed_run).info.status == "KILLED"


def test_unreachable_tracking_server_fails_before_training(latents, workdir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = raw_params(latents)
    raw["tracking"]["tracking_uri"] = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(FluxfillError, match=rf"MLflow tracking server http://127.0.0.1:{port} is unreachable"):
        train(validate(raw))
    assert time.monotonic() - start < 30 and not Path("checkpoints").exists()


def test_bf16_mixed_precision_run_ends_with_a_sample_grid(latents, workdir):
    """The CUDA default (bf16 weights, accelerate autocast whose outputs are fp32) exercised on the CPU."""
    raw = raw_params(latents, max_steps=2, mixed_precision="bf16")
    raw["model"]["dtype"] = "bf16"
    raw["eval"] = {"num_inference_steps": 1}
    result = train(validate(raw))
    lora = load_file("models/lora/pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in lora.values())  # trainable weights kept in fp32
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    grids = [a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "samples")]
    assert grids == ["samples/step_000002.png"]


def test_val_loss_is_the_same_at_any_batch_size(latents):
    from fluxfill.encode import LatentCache
    from fluxfill.models import add_lora, load_component
    from fluxfill.objective import denoise
    from fluxfill.validation import val_noise, val_sigmas, validation_loss

    params = validate(raw_params(latents))
    transformer = add_lora(load_component(params.model, "transformer"), params.train.lora).train()
    fusion = SemanticFusion("learned", 32, 24, init=0.4)
    cache = LatentCache(latents / "latents", "val")
    assert len(cache) == 1  # K = 4 levels: 4 (sample, level) pairs

    def val(batch_size, seed=0):
        return validation_loss(transformer, fusion, cache, seed=seed, num_sigmas=4, batch_size=batch_size)

    one, three, four = val(1), val(3), val(4)
    assert abs(four - one) <= 1e-6 * one and abs(three - one) <= 1e-6 * one
    assert transformer.training and fusion.training  # modes restored
    assert val(4, seed=1) != four  # the noise is seeded by the seed
    # the definition, one (sample, level) pair at a time
    item = cache.collate([cache[0]])
    by_hand = []
    with torch.no_grad():
        transformer.eval()
        for k, sigma in enumerate(val_sigmas(4).tolist()):
            noise = val_noise(0, cache[0]["id"], k, cache[0]["x_0"].shape)[None]  # [1, N, 64]
            out = denoise(transformer, fusion, item, torch.tensor([sigma]), noise)
            by_hand.append(((out.model_output - out.target) ** 2).mean().item())
    assert val_sigmas(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert one == pytest.approx(sum(by_hand) / 4, rel=1e-6)
