"""Settings cannot destroy data: output paths are checked before anything is deleted; one training at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fluxfill import safety
from fluxfill.cli import main
from fluxfill.config import DataConfig, FluxfillError, load_params

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``'s parent (so `..` is covered too), by path, with its bytes; not git's own, nor
    the training lock file (`fluxfill train` takes the lock first: it is then empty again)."""
    return {str(p): p.read_bytes() for p in root.parent.rglob("*")
            if p.is_file() and ".git" not in p.parts and p != root / safety.LOCK_FILE}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository with tracked source, dvc.yaml, params.yaml, earlier outputs and a checkpoint."""
    root = tmp_path / "repo"
    for name, text in {"fluxfill/__init__.py": "x = 1\n", "fluxfill/train.py": "y = 2\n", "dvc.yaml": "stages: {}\n",
                       "params.yaml": yaml.safe_dump({"train": {"max_steps": 3}}), "README.md": "read me\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(GIT + ["add", "-A"], cwd=root, check=True)
    subprocess.run(GIT + ["commit", "-q", "-m", "init"], cwd=root, check=True)
    for name in ("models/fusion.safetensors", "checkpoints/abc/checkpoint-000002/x", "data/raw/photo.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"data")
    (tmp_path / "neighbour.txt").write_text("outside the repository")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("key,value,reason", [
    ("train.output", ".", "is the repository root"),
    ("train.output", "..", "lies outside the repository"),
    ("train.output", "fluxfill", "overlaps fluxfill/__init__.py, a file tracked by git"),
    ("train.output", "README.md", "overlaps README.md, a file tracked by git"),
    ("train.output", "data", "overlaps data.output='data/prepared'"),
    ("train.output", "checkpoints/models", "overlaps train.checkpoint_dir='checkpoints'"),
    ("train.output", "metrics", "overlaps metrics/train.json"),
    ("train.output", ".dvc/tmp", "overlaps .dvc, which is part of the project"),
    ("train.checkpoint_dir", ".", "is the repository root"),
    ("train.checkpoint_dir", "/tmp", "lies outside the repository"),
])
def test_train_refuses_a_path_that_could_destroy_data_and_deletes_nothing(repo, capsys, key, value, reason):
    before = snapshot(repo)
    assert main(["train", "--fresh", "--set", f"{key}={value}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fluxfill train: error: {key}={value!r}") and reason in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"set {key} to a folder of its own inside the repository" in err
    assert snapshot(repo) == before


@pytest.mark.parametrize("argv,message", [
    (["prepare", "--set", "data.output=."], "data.output='.' is the repository root"),
    (["prepare", "--set", "data.output=data/raw/prepared"], "data.output='data/raw/prepared' ("),
    (["encode", "--set", "encode.output=models"], "encode.output='models' (") ,
    (["evaluate", "--set", "eval.output=.."], "eval.output='..' ("),
])
def test_every_stage_checks_its_outputs_first(repo, capsys, argv, message):
    before = snapshot(repo)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fluxfill {argv[0]}: error: {message}"), err
    assert snapshot(repo) == before


def test_default_paths_pass_and_the_repository_is_gits_top_level(repo):
    params = load_params()
    for stage in ("prepare", "encode", "train", "evaluate"):
        safety.check_outputs(params, stage)
    # a link inside the repository to a shared folder outside it (the README's multi-node checkpoints) is accepted
    (repo.parent / "shared").mkdir()
    (repo / "shared-checkpoints").symlink_to(repo.parent / "shared", target_is_directory=True)
    safety.check_outputs(load_params(overrides=["train.checkpoint_dir=shared-checkpoints"]), "train")
    with pytest.raises(safety.UnsafePath, match=r"train.checkpoint_dir='\.\./shared' \(.*\) lies outside the repository"):
        safety.check_outputs(load_params(overrides=["train.checkpoint_dir=../shared"]), "train")
    (repo / "fluxfill" / "sub").mkdir()
    assert safety.repository(repo / "fluxfill" / "sub") == repo
    # a DVC queued-experiment workspace is a clone inside .dvc/tmp/exps: its outputs are checked against it
    ws = repo / ".dvc" / "tmp" / "exps" / "tmp1234"
    subprocess.run(["git", "clone", "-q", str(repo), str(ws)], check=True)
    assert safety.repository(ws) == ws
    os.chdir(ws)
    safety.check_outputs(load_params(), "train")
    with pytest.raises(safety.UnsafePath, match=r"train.output='fluxfill' .* overlaps fluxfill/__init__.py, a file tracked"):
        safety.check_outputs(load_params(overrides=["train.output=fluxfill"]), "train")


def test_without_git_the_skipped_tracked_file_check_is_logged(repo, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(repo / "no-bin"))  # git cannot be found
    with caplog.at_level("DEBUG", logger="fluxfill.safety"):
        safety.check_outputs(load_params(), "train")
    assert f"cannot list the files git tracks in {repo} ([Errno 2] No such file or directory: 'git'): outputs are " \
        "not checked against them" in caplog.text
    assert "git rev-parse failed in" in caplog.text  # the repository then is the folder holding dvc.yaml
    with pytest.raises(safety.UnsafePath, match="overlaps .dvc, which is part of the project"):  # the rest still holds
        safety.check_outputs(load_params(overrides=["train.output=.dvc/x"]), "train")


def test_prepare_replaces_its_output_only_when_it_wrote_everything_there(tmp_path):
    from fluxfill.data import collect, prepare

    cfg = DataConfig(panel_size=32, output=str(tmp_path / "prepared"))
    first = prepare(cfg)
    assert first.count > 0
    assert prepare(cfg).count == first.count  # its own files: replaced
    (tmp_path / "prepared" / "my-notes.txt").write_text("keep me")
    with pytest.raises(FluxfillError, match=r"holds files `fluxfill prepare` did not write \(my-notes.txt\)"):
        prepare(cfg)
    assert (tmp_path / "prepared" / "my-notes.txt").read_text() == "keep me"
    assert (tmp_path / "prepared" / "manifest.csv").exists()
    # a damaged manifest lists nothing: the triptychs this prepare writes are still its own, anything else is not
    (tmp_path / "prepared" / "my-notes.txt").unlink()
    manifest = tmp_path / "prepared" / "manifest.csv"
    good = manifest.read_bytes()
    manifest.write_bytes(good[:len(good) // 2])
    (tmp_path / "prepared" / "photo.png").write_bytes(b"a photo")
    with pytest.raises(FluxfillError, match=r"holds files `fluxfill prepare` did not write \(photo.png\)"):
        prepare(cfg)
    (tmp_path / "prepared" / "photo.png").unlink()
    assert prepare(cfg).count == first.count
    assert manifest.read_bytes() == good
    # without prepare's own manifest header, a file named like a triptych is not prepare's: a folder of photos
    [sample, *_] = collect(cfg)
    for header in (None, b"file,caption\n"):
        photos = tmp_path / f"photos-{header is None}"
        photos.mkdir()
        (photos / f"{sample.id}.png").write_bytes(b"my photo")
        if header:
            (photos / "manifest.csv").write_bytes(header)
        with pytest.raises(FluxfillError, match=rf"holds files `fluxfill prepare` did not write \({sample.id}.png\)"):
            prepare(cfg.model_copy(update={"output": str(photos)}))
        assert (photos / f"{sample.id}.png").read_bytes() == b"my photo"


# --------------------------------------------------------------------------------------------------- lock
HOLD = """
import sys, time
from pathlib import Path
from fluxfill.safety import training_lock
with training_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path's training lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_second_training_is_refused_naming_the_holder(tmp_path, holder, monkeypatch):
    monkeypatch.delenv(safety.LOCK_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(safety.TrainingRunning, match=rf"another training is running in this workspace: pid {holder.pid} "
                                                     rf"\(`.*-c .*`, since \d{{4}}-\d\d-\d\d"):
        with safety.training_lock(tmp_path):
            pass
    # the ranks of one launch are one training: a worker rank, or a process the holder started, goes ahead
    monkeypatch.setenv("LOCAL_RANK", "1")
    with safety.training_lock(tmp_path):
        pass
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv(safety.LOCK_ENV, str(holder.pid))
    with safety.training_lock(tmp_path):
        pass
    # a holder killed with SIGKILL leaves no lock behind
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    monkeypatch.delenv(safety.LOCK_ENV)
    start = time.monotonic()
    with safety.training_lock(tmp_path):
        assert os.environ[safety.LOCK_ENV] == str(os.getpid())
        assert f'"pid": {os.getpid()}' in (tmp_path / safety.LOCK_FILE).read_text()
    assert time.monotonic() - start < 5 and (tmp_path / safety.LOCK_FILE).read_text() == ""
    assert safety.LOCK_ENV not in os.environ
