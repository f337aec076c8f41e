"""`fluxfill edit` and the Editor API: whole sources at their size, settings in PNG chunks, bad inputs, = evaluate."""

from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import make_prepared
from PIL import Image

from fluxfill import Editor, __version__
from fluxfill.cli import main
from fluxfill.config import FluxfillError, validate
from fluxfill.edit import letterbox
from fluxfill.evaluate import evaluate
from fluxfill.panels import panels_from_triptych, to_rgb

PANEL = 64


def rng_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def exif_rotated_jpeg(path, w=60, h=40):
    """A w x h JPEG whose EXIF orientation 6 says: display rotated 90° clockwise (h x w)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rng_image(w, h, seed=5).save(path, exif=exif.tobytes(), quality=95)


def test_letterbox_keeps_the_whole_image_and_repeats_its_edges():
    img = rng_image(451, 300)
    panel, box = letterbox(img, PANEL)
    assert panel.size == (PANEL, PANEL) and box == (0, 10, 64, 53)  # 451x300 -> 64x43, centred
    a = np.asarray(panel)
    inner = np.asarray(img.resize((64, 43), Image.Resampling.LANCZOS))
    assert np.array_equal(a[10:53], inner)
    assert (a[:10] == a[10]).all() and (a[53:] == a[52]).all()  # edge rows repeated, no frame colour
    square, box = letterbox(rng_image(PANEL, PANEL), PANEL)
    assert box == (0, 0, PANEL, PANEL) and np.array_equal(np.asarray(square), np.asarray(rng_image(PANEL, PANEL)))


def test_edit_odd_grey_rgba_and_exif_rotated_sources(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    rng_image(451, 300).save(src / "a_odd.png")
    rng_image(37, 53, "L", seed=1).save(src / "b_grey.jpg")
    rgba = rng_image(70, 45, "RGBA", seed=2)
    rgba.putalpha(Image.fromarray(np.tile(np.arange(70, dtype=np.uint8) * 3, (45, 1))))  # transparent on the left
    rgba.save(src / "c_rgba.png")
    exif_rotated_jpeg(src / "d_exif.jpg")
    rng_image(80, 50, seed=3).save(tmp_path / "ref.jpg")

    rc = main(["edit", "--source", str(src), "--reference", "ref.jpg", "--out", "out", "--model", str(model_dir),
               "--steps", "1", "--seed", "11", "--batch-size", "3", "--side-by-side", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "edit: 4 image(s) -> out/" in out and "α 0.3000" in out
    assert "4/4" in err  # the progress bar counts images
    sizes = {"a_odd": (451, 300), "b_grey": (37, 53), "c_rgba": (70, 45), "d_exif": (40, 60)}
    for k, (stem, size) in enumerate(sizes.items()):
        edited = Image.open(tmp_path / "out" / f"{stem}.png")
        assert edited.size == size and edited.mode == "RGB" and np.asarray(edited).std() > 1
        assert edited.text == {
            "prompt": validate({}).data.prompt_template.format(instruction=validate({}).data.task_instruction),
            "seed": str(11 + k), "steps": "1", "guidance": "30", "fusion_mode": "learned", "alpha": "0.300000",
            "model": str(model_dir), "panel_size": "64", "fluxfill_version": __version__,
            "source": str(next(src.glob(stem + ".*")).relative_to(tmp_path)), "reference": "ref.jpg"}
        strip = Image.open(tmp_path / "out" / f"{stem}.side-by-side.png")
        w, h = size
        assert strip.size == (h + 2 * w, h) and strip.text == edited.text
        assert np.array_equal(np.asarray(strip)[:, h + w:], np.asarray(edited))
    # the source panel of each strip is the source as read: EXIF orientation applied, alpha on white
    rotated = Image.open(src / "d_exif.jpg").transpose(Image.Transpose.ROTATE_270)
    strip = np.asarray(Image.open(tmp_path / "out" / "d_exif.side-by-side.png"), dtype=int)
    assert np.abs(strip[:, 60:100] - np.asarray(rotated, dtype=int)).max() == 0
    strip = np.asarray(Image.open(tmp_path / "out" / "c_rgba.side-by-side.png"))
    assert np.array_equal(strip[:, 45:115], np.asarray(to_rgb(rgba)[0])) and (strip[:, 45] == 255).all()


def test_bad_inputs_are_listed_by_file_and_nothing_is_written(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in"
    src.mkdir()
    rng_image(40, 40).save(src / "good.png")
    (src / "notes.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    rng_image(40, 40).save(buf, format="PNG")
    (src / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rng_image(40, 40).save(src / "twin.png")
    rng_image(40, 40).save(tmp_path / "twin.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.png").write_bytes(b"earlier result")

    rc = main(["edit", "--source", str(src), "twin.jpg", "missing.png", "nothing/*.png", "--reference", "ref.png",
               "--out", "out", "--model", str(model_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "fluxfill edit: error: edit found 7 problem(s) (nothing written):" in err
    for line in ("missing.png: file not found", "nothing/*.png: no file matches this pattern", "ref.png: file not found",
                 "in/notes.png: not an image (Pillow cannot identify it)", "in/cut.png: unreadable or truncated image (image file is truncated",
                 "in/good.png: out/good.png exists; pass --overwrite", "twin.jpg: its output out/twin.png is also the "
                 "output of in/twin.png"):
        assert line in err, line
    assert sorted(p.name for p in out.iterdir()) == ["good.png"] and (out / "good.png").read_bytes() == b"earlier result"

    rng_image(40, 40).save(tmp_path / "ref.png")
    rc = main(["edit", "--source", "in/good.png", "--reference", "ref.png", "--out", "in", "--overwrite",
               "--model", str(model_dir)])
    assert rc == 1 and "in/good.png: its output in/good.png would overwrite a source" in capsys.readouterr().err
    assert main(["edit", "--source", "in/good.png", "--reference", "ref.png", "--out", "out", "--overwrite",
                 "--model", str(model_dir), "--steps", "1", "--device", "cpu"]) == 0
    assert Image.open(out / "good.png").size == (40, 40)  # replaced, as asked


def test_a_missing_reference_is_refused_before_the_pipeline_loads(tmp_path, model_dir, monkeypatch, capsys):
    import fluxfill.edit

    monkeypatch.chdir(tmp_path)
    rng_image(40, 40).save(tmp_path / "in.png")

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(fluxfill.edit, "load_pipeline", no_pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing but the message: no torch warning on the way
        rc = main(["edit", "--source", "in.png", "--out", "out", "--model", str(model_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1] == (
        "fluxfill edit: error: this model mixes a reference into the conditioning (α = 0.3000): "
        "pass a reference image (--reference PATH)")
    assert not (tmp_path / "out").exists()


def test_python_api(tmp_path, model_dir, model_factory, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults
    notes = logging.Handler()
    notes.emit = (seen := []).append
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    lora_log.addHandler(notes)
    try:
        ed = Editor.load(model_dir, device="cpu")
    finally:
        lora_log.removeHandler(notes)
    assert [r.getMessage() for r in seen] == []  # a transformer-only LoRA: diffusers' text-encoder note is dropped
    assert list(ed.pipe.transformer.peft_config) == ["default_0"]
    assert ed.alpha == pytest.approx(0.3) and ed.spec.panel_size == PANEL and ed.source == str(model_dir)
    assert ed.settings() == {"prompt": ed.spec.prompt, "seed": 0, "steps": 8, "guidance": 30.0}  # params defaults
    source, reference = rng_image(90, 70), rng_image(50, 50, seed=1)
    out = ed(source, reference, steps=1, seed=4)
    assert isinstance(out, Image.Image) and out.size == (90, 70)
    both = ed([source, rng_image(30, 20, seed=2)], reference, steps=1, seed=4)
    assert [im.size for im in both] == [(90, 70), (30, 20)]
    diff = np.abs(np.asarray(both[0], dtype=int) - np.asarray(out, dtype=int))
    assert diff.max() <= 1  # source k uses seed + k: the first is the same, up to batched float rounding
    with pytest.raises(FluxfillError, match=r"mixes a reference into the conditioning \(α = 0.3000\): pass a reference"):
        ed(source)

    folder = tmp_path / "baseline"
    model_factory(folder, fusion_mode="none")
    plain = Editor.load(folder, device="cpu")
    assert plain.alpha is None and plain(source, steps=1).size == (90, 70)  # no reference needed
    (folder / "fusion.safetensors").write_bytes((model_dir / "fusion.safetensors").read_bytes())
    with pytest.raises(FluxfillError, match=r"holds fusion mode 'learned' but .* says 'none': the folder mixes two runs"):
        Editor.load(folder)
    (folder / "fluxfill_model.json").write_text("{\"model\": 3}")
    with pytest.raises(FluxfillError, match=r"fluxfill_model.json: not a valid fluxfill model spec"):
        Editor.load(folder)
    (folder / "fluxfill_model.json").unlink()
    with pytest.raises(FluxfillError, match=r"fluxfill_model.json not found: .* is not a trained model folder"):
        Editor.load(folder)


def test_edit_reproduces_evaluate(tmp_path, model_factory, monkeypatch):
    """The same sample, seed and settings give the same pixels through `fluxfill edit` as through `evaluate`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepared = make_prepared(tmp_path / "data" / "prepared", 3, PANEL, val=2)
    raw = {"data": {"panel_size": PANEL}, "model": {"max_sequence_length": 16},
           "train": {"lora": {"rank": 4, "alpha": 8}}, "eval": {"num_inference_steps": 2, "seed": 5, "batch_size": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    model_factory(tmp_path / "models")
    result = evaluate(validate(raw), device="cpu")

    manifest = pd.read_csv(prepared / "manifest.csv")
    for k, row in manifest[manifest.split == "val"].reset_index().iterrows():
        panels = panels_from_triptych(Image.open(prepared / row.file))
        panels.source.save(tmp_path / f"src{k}.png")
        panels.reference.save(tmp_path / f"ref{k}.png")
        grid = result["grids"][k]  # batch size 1: one row per grid
        label_h = grid.height - PANEL
        evaluated = np.asarray(grid.crop((2 * PANEL, label_h, 3 * PANEL, label_h + PANEL)))
        seed = [] if k == 0 else ["--seed", str(5 + k)]  # defaults: params.yaml's eval section (seed 5, 2 steps)
        assert main(["edit", "--source", f"src{k}.png", "--reference", f"ref{k}.png", "--prompt", row.prompt,
                     "--out", "edited", "--device", "cpu", *seed]) == 0
        edited = Image.open(tmp_path / "edited" / f"src{k}.png")
        assert (edited.text["seed"], edited.text["steps"]) == (str(5 + k), "2")
        assert edited.text["model"] == str(tmp_path / "models")  # the default: models/ of this repository
        assert np.array_equal(np.asarray(edited), evaluated)
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["num_samples"] == 2


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves neither a partial PNG nor a temporary file."""
    from fluxfill.edit import save_png

    target = tmp_path / "out.png"
    save_png(rng_image(20, 10), target, {"seed": "1"})
    before = target.read_bytes()

    def broken(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_png(rng_image(20, 10, seed=1), target, {"seed": "2"})
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
