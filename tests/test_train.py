"""Training: loss goes down, outputs load into FluxFillPipeline, exact resume after SIGKILL, guards, MLflow."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from helpers import make_prepared
from safetensors.torch import load_file

from fluxfill import tracking
from fluxfill.config import FluxfillError, validate
from fluxfill.data import dvc_md5
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


def weights(root: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(root / "models/lora/pytorch_lora_weights.safetensors"))
    out.update({f"fusion.{k}": v for k, v in load_file(str(root / "models/fusion.safetensors")).items()})
    return out


def test_train_outputs_metrics_and_mlflow(latents, workdir):
    params = validate(raw_params(latents, max_steps=24, log_every=2, val_every=10))
    result = train(params)
    assert result.steps == 24 and 0 < result.fusion_weight < 1 and abs(result.fusion_weight - 0.1) > 1e-3
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics == {"loss": result.loss, "fusion_weight": result.fusion_weight, "steps": 24,  # no timings
                       "val_loss": metrics["val_loss"], "val_loss_start": metrics["val_loss_start"]}
    timing = json.loads(Path(".fluxfill/train_timing.json").read_text())  # they go to an untracked file
    assert timing["samples_per_s"] > 0 and timing["peak_memory_mb"] > 0 and timing["run_id"] == result.run_id
    table = list(csv.DictReader(Path("plots/train.csv").open()))
    assert list(table[0]) == ["step", "loss", "fusion_weight", "fusion_cos", "fusion_ref_norm", "val_loss", "lr"]
    assert [int(r["step"]) for r in table] == list(range(1, 25))  # one row per step, log_every 2
    assert {int(r["step"]): r["val_loss"] != "" for r in table} == {s: s in (10, 20, 24) for s in range(1, 25)}
    assert all(-1 <= float(r["fusion_cos"]) <= 1 and float(r["fusion_ref_norm"]) > 0 for r in table)
    val_rows = list(csv.DictReader(Path("plots/val.csv").open()))  # the DVC plot: step 0 is before training
    vals = {int(r["step"]): float(r["val_loss"]) for r in val_rows}
    assert list(val_rows[0]) == ["step", "val_loss"] and sorted(vals) == [0, 10, 20, 24]
    assert float(table[-1]["val_loss"]) == vals[24]
    assert metrics["val_loss"] == pytest.approx(vals[24], rel=1e-5) and metrics["val_loss_start"] == pytest.approx(vals[0], rel=1e-5)
    losses = [float(r["loss"]) for r in table]
    assert losses[-1] == pytest.approx(result.loss, rel=1e-5)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # loss decreases over a short run
    ref = tracking.read_run_ref("models")
    assert ref["run_id"] == result.run_id and [p.name for p in Path("models").rglob("*.json")] == ["fluxfill_model.json"]
    mlflow.set_tracking_uri(ref["tracking_uri"])
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "24"
    assert run.data.tags["preset"] == "tiny" and run.data.tags["accelerate.world_size"] == "1"
    loss_history = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in loss_history] == list(range(1, 25))  # every step, sent in batches of log_every
    assert [m.value for m in loss_history] == pytest.approx(losses, rel=1e-5)
    alphas = client.get_metric_history(result.run_id, "fusion_weight")
    assert len(alphas) == 24 and alphas[-1].value == pytest.approx(result.fusion_weight)
    assert [m.step for m in client.get_metric_history(result.run_id, "samples_per_s")] == list(range(2, 25, 2))
    assert run.data.metrics["peak_memory_mb"] == timing["peak_memory_mb"]
    for name in ("fusion_cos", "fusion_ref_norm"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == list(range(1, 25))
    history = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "val_loss"))
    assert [s for s, _ in history] == [0, 10, 20, 24] and history[-1][1] == pytest.approx(vals[24], rel=1e-5)
    assert run.data.tags["fluxfill.models_md5"] == dvc_md5(Path("models"))  # what DVC records for the output
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/fusion.safetensors" in artifacts and "model/lora" in artifacts
    umask = os.umask(0)
    os.umask(umask)
    for f in ("models/lora/pytorch_lora_weights.safetensors", "models/fusion.safetensors", "models/fluxfill_model.json"):
        assert stat.S_IMODE(Path(f).stat().st_mode) == 0o666 & ~umask, f  # readable as any new file (not 0600)
    assert sorted(p.name for p in Path("models").rglob("*")) == [
        "fluxfill_model.json", "fusion.safetensors", "lora", "pytorch_lora_weights.safetensors"]  # no probe left


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
    import fluxfill.step as train_module  # the step function fluxfill train calls

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


def test_ctrl_c_writes_a_checkpoint_and_a_second_training_is_refused(latents, workdir):
    raw = raw_params(latents, max_steps=100_000, checkpoint_every=50)
    # so many steps that the run is still going when Ctrl-C arrives, however fast the machine
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    log = open("train.log", "w")  # a file, not a pipe: the progress bar would fill a pipe and stall the run
    proc = subprocess.Popen([sys.executable, "-m", "fluxfill.cli", "train"], stdout=log, stderr=log,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(Path("checkpoints").glob("*/checkpoint-000050")):
            assert proc.poll() is None and time.monotonic() < deadline, Path("train.log").read_text()[-2000:]
            time.sleep(0.02)
        # a second `fluxfill train` in the same workspace is refused at once (before its heavy imports)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "fluxfill.cli", "train"], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1 and time.monotonic() - started < 10, second.stderr
        assert second.stderr.startswith("fluxfill train: error: another training is running in this workspace: "
                                        f"pid {proc.pid} (`"), second.stderr
        assert proc.poll() is None  # the first one goes on
        time.sleep(1.0)  # a few more steps
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    err = Path("train.log").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; a checkpoint was written, run the same command (same --set and --params) again to resume" in err
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


# --- resume only when exact -----------------------------------------------------------------------

NAME = r"tiny-learned-{steps}steps-{fp}-[a-z2-9]{{4}}"


def _runs(raw) -> list:
    mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
    exp = mlflow.get_experiment_by_name(raw["tracking"]["experiment"])
    return mlflow.MlflowClient().search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_config_fingerprint_covers_what_the_weights_depend_on():
    from fluxfill.train import config_fingerprint

    meta, code = {"manifest_sha256": "a", "code_version": "0.1+x"}, "c0de"

    def fp(meta=meta, code=code, device="cpu", **train):
        return config_fingerprint(validate({"train": train}), meta, device, code)

    base = fp()
    assert fp(max_steps=7) == base and fp(max_steps=7, warmup_steps=2) == fp(max_steps=40, warmup_steps=2)
    assert fp(lr_scheduler="linear", max_steps=7) != fp(lr_scheduler="linear", max_steps=40)  # decays over max_steps
    assert fp(log_every=5, checkpoint_every=3, keep_checkpoints=9, sample_every=2, num_workers=2,
              output="elsewhere", checkpoint_dir="ckpt") == base
    for changed in (fp(learning_rate=0.5), fp(seed=1), fp(batch_size=3), fp(lora={"rank": 4}),
                    fp(meta={**meta, "manifest_sha256": "b"}), fp(code="edited"), fp(device="cuda")):
        assert changed != base
    assert config_fingerprint(validate({"fusion": {"mode": "none"}}), meta, "cpu", code) != base
    # the global batch, not its split over processes and micro-batches (default batch 4)
    assert fp(num_processes=2, batch_size=2) == fp(batch_size=2, gradient_accumulation_steps=2) == base
    assert fp(num_processes=2) != base


def own_experiment(raw: dict, name: str) -> dict:
    """The test's own MLflow experiment (the module's database is shared) and one-step sample grids."""
    return {**raw, "tracking": {**raw["tracking"], "experiment": name}, "eval": {"num_inference_steps": 1}}


def test_the_step_code_is_every_package_file_training_imports(tmp_path):
    from fluxfill import sources

    names = {p.relative_to(sources.PACKAGE_DIR).as_posix() for p in sources.imported_files("train")}
    assert {"train.py", "objective.py", "fusion.py", "models.py", "latents.py", "encode.py", "config.py",
            "__init__.py", "configs/flux-fill-dev-transformer.json"} <= names
    assert "sampling.py" in names and "evaluate.py" not in names  # the sample grids come from sampling, not the stage
    assert not {"cli.py", "compare.py", "summary.py"} & names  # not imported by training
    # found from the imports: a new module imported by one of them joins
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("from .objective import step\n\ndef f():\n    import fluxfill.extra\n")
    (pkg / "objective.py").write_text("from . import config\n")
    (pkg / "config.py").write_text("")
    (pkg / "extra.py").write_text("")
    (pkg / "unused.py").write_text("")
    assert [p.name for p in sources.imported_files("train", pkg)] == [
        "__init__.py", "config.py", "extra.py", "objective.py", "train.py"]
    before = sources.module_digest("train", pkg)
    (pkg / "unused.py").write_text("# edited\n")
    assert sources.module_digest("train", pkg) == before
    (pkg / "extra.py").write_text("# edited\n")
    assert sources.module_digest("train", pkg) != before


def test_shorter_run_after_longer_run_is_a_new_run_of_exactly_its_steps(latents, workdir):
    raw = own_experiment(raw_params(latents, max_steps=8, checkpoint_every=2, keep_checkpoints=2), "shorter")
    long = train(validate(raw))
    [fingerprint] = [p.name for p in Path("checkpoints").iterdir()]
    assert sorted(p.name for p in Path("checkpoints", fingerprint).glob("checkpoint-*")) == [
        "checkpoint-000004", "checkpoint-000006"]

    Path("models/notes.txt").write_text("mine")
    short = train(validate({**raw, "train": {**raw["train"], "max_steps": 3}}))  # no checkpoint <= 3: from step 0
    assert Path("models/notes.txt").read_text() == "mine"  # train replaces only what it writes
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert (short.steps, short.resumed_from, metrics["steps"]) == (3, 0, 3)
    assert metrics["loss"] == pytest.approx(short.loss) and 0 < metrics["loss"] < 10
    assert short.run_id != long.run_id

    five = train(validate({**raw, "train": {**raw["train"], "max_steps": 5}}))  # resumes the 8-step run's step 4
    assert (five.steps, five.resumed_from) == (5, 4)
    Path("straight").mkdir()
    os.chdir("straight")
    straight = train(validate({**raw, "train": {**raw["train"], "max_steps": 5}}))
    assert straight.resumed_from == 0
    resumed, reference = weights(workdir), weights(workdir / "straight")
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k  # the checkpoint was exactly what this run would write

    runs = {r.info.run_id: r for r in _runs(raw)}
    assert len(runs) == 4 and {long.run_id, short.run_id, five.run_id} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert [runs[r.run_id].data.params["train.max_steps"] for r in (long, short, five)] == ["8", "3", "5"]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(long.run_id, "loss")] == list(range(1, 9))  # not appended to
    assert [m.step for m in client.get_metric_history(short.run_id, "loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(five.run_id, "loss")] == [1, 2, 3, 4, 5]  # 1-4: the checkpoint's
    tags = runs[five.run_id].data.tags
    assert (tags["fluxfill.resumed_from_step"], tags["fluxfill.resumed_from_run"]) == ("4", long.run_id)
    names = [r.info.run_name for r in runs.values()]
    assert len(set(names)) == 4
    for r, steps in ((long, 8), (short, 3), (five, 5)):
        assert re.fullmatch(NAME.format(steps=steps, fp=fingerprint[:6]), runs[r.run_id].info.run_name)


def test_a_checkpoint_continues_only_its_own_unfinished_mlflow_run(latents):
    from fluxfill import tracking
    from fluxfill.train import _own_run

    raw = own_experiment(raw_params(latents), "own run")
    client = mlflow.MlflowClient()
    experiment = tracking.setup(validate(raw).tracking)
    for status, then, now, continued in [("RUNNING", 8, 8, True), ("KILLED", 8, 8, True), ("FAILED", 8, 8, True),
                                         ("FINISHED", 8, 8, False), ("KILLED", 40, 8, False)]:
        run_id = client.create_run(experiment).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        assert _own_run({"run_id": run_id, "max_steps": then}, now) == (run_id if continued else None), status
    assert _own_run({"run_id": "0" * 32, "max_steps": 8}, 8) is None


def test_finished_config_is_a_no_op_and_code_edits_or_fresh_start_over(latents, workdir, monkeypatch, capsys):
    import shutil

    import fluxfill.sources as sources
    from fluxfill.cli import main

    raw = own_experiment(raw_params(latents, max_steps=4, checkpoint_every=2), "no-op")
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train"]) == 0
    first = tracking.read_run_ref("models")["run_id"]
    outputs = {p: p.read_bytes() for p in [*Path("models").rglob("*"), *Path("metrics").glob("*")] if p.is_file()}

    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert f"train: nothing to do: this configuration already finished 4 steps in MLflow run {first}" in out
    assert {p: p.read_bytes() for p in outputs} == outputs and len(_runs(raw)) == 1

    # an edited step module (a copy of the package with a comment appended to objective.py): a fresh start
    copy = workdir / "pkg"
    shutil.copytree(sources.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "objective.py", "a") as f:
        f.write("# edited\n")
    monkeypatch.setattr(sources, "PACKAGE_DIR", copy)
    edited = train(validate(raw))
    assert not edited.skipped and edited.resumed_from == 0 and edited.run_id != first
    dirs = sorted(p.name for p in Path("checkpoints").iterdir())
    assert len(dirs) == 2 and len(_runs(raw)) == 2

    # --fresh removes only this fingerprint's checkpoints: not the other one's, nor anything else there
    Path("checkpoints/notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in Path("checkpoints").rglob("*") if p.is_file()}
    assert train(validate(raw)).skipped  # the edited code's run finished and its outputs are in place
    again = train(validate(raw), fresh=True)
    assert not again.skipped and again.resumed_from == 0 and len(_runs(raw)) == 3
    this = mlflow.MlflowClient().get_run(again.run_id).data.tags["fluxfill.fingerprint"]
    assert this == mlflow.MlflowClient().get_run(edited.run_id).data.tags["fluxfill.fingerprint"] and this in dirs
    untouched = {p: b for p, b in before.items() if this not in p.parts}
    assert len(untouched) > 3 and all(p.read_bytes() == b for p, b in untouched.items())
    assert Path("checkpoints/notes.txt").read_text() == "mine"


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


def test_damaged_finished_record_is_reported_and_trains_again(tmp_path, caplog):
    from fluxfill.train import already_trained

    record = tmp_path / "finished-000004.json"
    record.write_text('{"outputs": ')  # cut short
    with caplog.at_level("WARNING", logger="fluxfill.train"):
        assert already_trained(validate({"train": {"max_steps": 4}}), tmp_path) is None
    assert f"{record}: unreadable record of a finished run (JSONDecodeError:" in caplog.text
    assert caplog.text.rstrip().endswith("training again")
