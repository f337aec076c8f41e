"""Every file a stage reads back from an earlier stage or run can be damaged, truncated or from another version.

Each case ends the command with exit code 1 and one line naming the file and the command that rebuilds it,
no traceback. A tiny workspace is built once (prepare, encode, train) and copied for each case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import make_prepared

from fluxfill import artifacts
from fluxfill.cli import main
from fluxfill.config import validate
from fluxfill.encode import encode
from fluxfill.train import train

PANEL = 32
RAW = {"data": {"panel_size": PANEL}, "model": {"max_sequence_length": 16}, "encode": {"shard_size": 2},
       "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "lora": {"rank": 4, "alpha": 4}},
       "eval": {"num_inference_steps": 1}, "tracking": {"tracking_uri": "sqlite:///mlflow.db"}}
REBUILD = {stage: f"rebuild it with {artifacts.rebuild(stage)}" for stage in ("prepare", "encode", "train")}
CHECKPOINT_FIX = "to resume from the one before it, or start over with `fluxfill train --fresh`"


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """``partial``: prepared, encoded, trained 1 of 2 steps (a checkpoint); ``done``: trained to the end."""
    root = tmp_path_factory.mktemp("damaged")
    ws = root / "done"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(RAW))
    cwd = Path.cwd()
    try:
        os.chdir(ws)
        make_prepared(Path("data/prepared"), 6, PANEL, val=2)
        params = validate(RAW)
        encode(params, device="cpu")
        train(params, stop_after=1)
        _reset_accelerate()
        shutil.copytree(ws, root / "partial")
        train(params)
        _reset_accelerate()
    finally:
        os.chdir(cwd)
    return {"done": ws, "partial": root / "partial"}


def run_broken(workspaces, tmp_path, monkeypatch, capsys, which: str, argv: list[str], damage) -> str:
    """Copy a workspace, damage it, run ``fluxfill <argv>``; assert exit code 1 and no traceback; the message."""
    ws = tmp_path / "ws"
    shutil.copytree(workspaces[which], ws)
    monkeypatch.chdir(ws)
    damage(ws)
    capsys.readouterr()
    try:
        rc = main(argv)
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def latest_checkpoint(ws: Path) -> Path:
    return sorted(ws.glob("checkpoints/*/checkpoint-*"))[-1].relative_to(ws)


def expect(line: str, command: str, path: str | Path, why: str, hint: str) -> None:
    pattern = rf"fluxfill {command}: error: {re.escape(str(path))}: {why}; {re.escape(hint)}"
    assert re.fullmatch(pattern, line), f"{line!r}\n does not match\n{pattern!r}"


# -------------------------------------------------------------------------------------------- prepare outputs
def test_truncated_manifest(workspaces, tmp_path, monkeypatch, capsys):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["encode"],
                      lambda ws: truncate(ws / "data/prepared/manifest.csv"))
    expect(line, "encode", "data/prepared/manifest.csv", r"damaged or truncated manifest \(line \d+ is incomplete\)",
           REBUILD["prepare"])


def test_manifest_from_another_version(workspaces, tmp_path, monkeypatch, capsys):
    def drop_column(ws):
        path = ws / "data/prepared/manifest.csv"
        pd.read_csv(path).drop(columns="sha256").to_csv(path, index=False)
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["evaluate"], drop_column)
    expect(line, "evaluate", "data/prepared/manifest.csv",
           re.escape("a manifest from another version of fluxfill (no columns ['sha256'])"), REBUILD["prepare"])


@pytest.mark.parametrize("command", ["encode", "evaluate"])
def test_damaged_triptych(workspaces, tmp_path, monkeypatch, capsys, command):
    def flip(ws):
        path = ws / "data/prepared/s000.png"  # the first sample, in the val split
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", [command], flip)
    expect(line, command, "data/prepared/s000.png",
           re.escape("damaged or from another run: its sha256 is not the one manifest.csv records"),
           REBUILD["prepare"])


# --------------------------------------------------------------------------------------------- the latent cache
def test_damaged_cache_description(workspaces, tmp_path, monkeypatch, capsys):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["train"],
                      lambda ws: truncate(ws / "data/latents/meta.json"))
    expect(line, "train", "data/latents/meta.json", r"damaged or truncated cache description \(.+\)",
           REBUILD["encode"])


def test_cache_description_from_another_version(workspaces, tmp_path, monkeypatch, capsys):
    def old(ws):
        path = ws / "data/latents/meta.json"
        meta = json.loads(path.read_text())
        del meta["shards"]
        path.write_text(json.dumps(meta))
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["train"], old)
    expect(line, "train", "data/latents/meta.json", r"a cache description from another version of fluxfill .*",
           REBUILD["encode"])


@pytest.mark.parametrize("name", ["vae-00001.safetensors", "geometry.safetensors"])
def test_truncated_cache_file(workspaces, tmp_path, monkeypatch, capsys, name):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["train"],
                      lambda ws: truncate(ws / "data/latents" / name))
    expect(line, "train", f"data/latents/{name}", r"damaged or truncated cache (shard|file) \(.+\)",
           REBUILD["encode"])


def test_cache_shard_from_another_encode_run(workspaces, tmp_path, monkeypatch, capsys):
    def swap(ws):
        a, b = ws / "data/latents/text-00000.safetensors", ws / "data/latents/text-00001.safetensors"
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["train"], swap)
    expect(line, "train", "data/latents/text-00000.safetensors",
           re.escape("a cache shard from another encode run (its samples are not the ones meta.json lists)"),
           REBUILD["encode"])


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", [artifacts.CHECKPOINT_LORA, "optimizer.bin", artifacts.CHECKPOINT_STATE])
def test_damaged_checkpoint(workspaces, tmp_path, monkeypatch, capsys, name):
    ckpt = latest_checkpoint(workspaces["partial"])
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "partial", ["train"],
                      lambda ws: truncate(ws / ckpt / name))
    where = ckpt / name if name == artifacts.CHECKPOINT_STATE else ckpt
    what = "checkpoint state" if name == artifacts.CHECKPOINT_STATE else "checkpoint"
    expect(line, "train", where, rf"damaged or truncated {what} \(.+\)",
           f"delete the checkpoint (`rm -r {ckpt}`) {CHECKPOINT_FIX}")


def test_checkpoint_state_from_another_version(workspaces, tmp_path, monkeypatch, capsys):
    ckpt = latest_checkpoint(workspaces["partial"])
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "partial", ["train"],
                      lambda ws: (ws / ckpt / artifacts.CHECKPOINT_STATE).write_text('{"step": 1}'))
    expect(line, "train", ckpt / artifacts.CHECKPOINT_STATE,
           re.escape("a checkpoint state from another version of fluxfill (step, run_id and history expected)"),
           f"delete the checkpoint (`rm -r {ckpt}`) {CHECKPOINT_FIX}")


# ------------------------------------------------------------------------------------------ trained weights
@pytest.mark.parametrize("path", ["models/lora/pytorch_lora_weights.safetensors", "models/fusion.safetensors"])
def test_truncated_weights(workspaces, tmp_path, monkeypatch, capsys, path):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["evaluate"], lambda ws: truncate(ws / path))
    what = "LoRA file" if "lora" in path else "fusion file"
    expect(line, "evaluate", path, rf"damaged or truncated {what} \(.+\)", REBUILD["train"])


def test_weights_trained_with_other_settings(workspaces, tmp_path, monkeypatch, capsys):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done",
                      ["evaluate", "--set", "train.lora.rank=8"], lambda ws: None)
    expect(line, "evaluate", "models/lora/pytorch_lora_weights.safetensors",
           re.escape("a LoRA trained with other settings: train.lora.rank 4 (params: 8)"), REBUILD["train"])
    line = run_broken(workspaces, tmp_path / "2", monkeypatch, capsys, "done",
                      ["evaluate", "--set", "fusion.mode=none"], lambda ws: None)
    expect(line, "evaluate", "models/fusion.safetensors",
           re.escape("a fusion module trained with fusion.mode 'learned' (params: 'none')"), REBUILD["train"])


# ------------------------------------------------------------------------- the run reference and the metrics
@pytest.mark.parametrize("command", ["evaluate", "summary"])
@pytest.mark.parametrize("content", ["{not json", '{"run_id": "abc"}'])
def test_damaged_run_reference(workspaces, tmp_path, monkeypatch, capsys, command, content):
    [ref] = (workspaces["done"] / artifacts.RUN_REFS).glob("*.json")
    ref = ref.relative_to(workspaces["done"])
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", [command],
                      lambda ws: (ws / ref).write_text(content))
    why = ("not a readable MLflow run reference .*" if content.startswith("{not")
           else "an MLflow run reference from another version of fluxfill .*")
    expect(line, command, ref, why,
           f"delete it (`rm {ref}`): the run is then looked up in MLflow by the weights' DVC hash")


def test_damaged_metrics_file(workspaces, tmp_path, monkeypatch, capsys):
    line = run_broken(workspaces, tmp_path, monkeypatch, capsys, "done", ["summary"],
                      lambda ws: truncate(ws / artifacts.TRAIN_METRICS))
    expect(line, "summary", artifacts.TRAIN_METRICS, r"not a metrics file \(.+\)", REBUILD["train"])


def test_summary_names_the_run_that_trained_the_weights(workspaces, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(workspaces["done"], ws)
    monkeypatch.chdir(ws)
    [ref] = (ws / artifacts.RUN_REFS).glob("*.json")
    saved = ref.read_text()
    run_id = json.loads(saved)["run_id"]
    capsys.readouterr()
    assert main(["summary"]) == 0
    assert f"MLflow run   {run_id} (experiment 'fluxfill'" in capsys.readouterr().out
    ref.write_text("{not json")
    assert main(["summary"]) == 1 and f"rm {ref.relative_to(ws)}" in capsys.readouterr().err
    ref.unlink()  # the fix the message gives: the run is found by its tag, the weights' DVC hash
    assert main(["summary"]) == 0
    assert f"MLflow run   {run_id} (experiment 'fluxfill'" in capsys.readouterr().out
    assert main(["summary", "--set", "tracking.experiment=other"]) == 0  # the run's own experiment is named
    assert f"MLflow run   {run_id} (experiment 'fluxfill'" in capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["summary", "--set", f"tracking.tracking_uri={dead}"]) == 0  # no server: the files still tell
    out = capsys.readouterr().out
    assert out.startswith(f"MLflow not searched for the run of these weights: MLflow tracking server {dead} is "
                          "unreachable: [Errno 111] Connection refused")
    assert "no MLflow run known" not in out and "  steps            2" in out
    db = ws / "gone.db"  # e.g. after `make clean` of an older version, which left .fluxfill/ in place
    ref.write_text(json.dumps({**json.loads(saved), "tracking_uri": f"sqlite:///{db}"}))
    assert main(["summary"]) == 0
    assert capsys.readouterr().out.startswith(f"MLflow run   {run_id} trained these weights, but its database {db} "
                                              "is gone: `dvc repro --force train` trains them again in a new run\n")
    (ws / "models/fusion.safetensors").write_bytes(b"other weights")  # e.g. another run's, from DVC's cache
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert run_id not in out and "no MLflow run known for the weights in models/" in out
