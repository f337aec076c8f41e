"""``fluxfill prepare``: the three sources, validation, conversions, atomic output, data version."""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxfill.cli import main
from fluxfill.config import DataConfig, FluxfillError
from fluxfill.data import (
    DEMO_PHOTOS,
    LOOKS,
    MANIFEST_COLUMNS,
    apply_look,
    assign_splits,
    collect,
    dvc_md5,
    prepare,
    read_manifest,
)

PANEL = 64
PROMPT = DataConfig().prompt_template.format(instruction="it is well exposed, sharp and free of noise")


def save(path: Path, color=(0, 0, 0), size=(80, 80), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def folder_dataset(root: Path, ids="abcd") -> Path:
    """source i is (10+i, 0, 0), target i is (0, 10+i, 0): panels can be told apart by pixel."""
    for i, sid in enumerate(ids):
        save(root / "source" / f"{sid}.png", (10 + i, 0, 0))
        save(root / "target" / f"{sid}.png", (0, 10 + i, 0))
    return root


def folder_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw = {"panel_size": PANEL, **kw}
    return DataConfig(source="folder", path=str(tmp_path / "raw"), output=str(tmp_path / "out"), **kw)


def centre(img: Image.Image, panel: int) -> tuple[int, int, int]:
    """Pixel at the centre of panel 0 (reference), 1 (source) or 2 (target)."""
    h = img.height
    return img.getpixel((panel * h + h // 2, h // 2))


def png_chunks(data: bytes) -> list[str]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos + 4:pos + 8].decode())
        pos += 12 + length
    return chunks


def check_manifest(out: Path) -> list[dict[str, str]]:
    """Manifest rows match the files one to one, with their sha256 and the triptych size."""
    rows = read_manifest(out).to_dict("records")
    assert rows and list(rows[0]) == list(MANIFEST_COLUMNS)
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in rows] + ["manifest.csv"])
    for r in rows:
        data = (out / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert r["file"] == f"{r['id']}.png" and r["split"] in ("train", "val")
        assert set(png_chunks(data)) == {"IHDR", "IDAT", "IEND"}  # no timestamps or text
        with Image.open(out / r["file"]) as img:
            assert img.mode == "RGB" and img.width == 3 * img.height
    return rows


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ sources


def test_demo_source(tmp_path):
    cfg = DataConfig(panel_size=32, output=str(tmp_path / "out"))
    result = prepare(cfg)
    assert 15 <= result.count == len(DEMO_PHOTOS) <= 25
    assert (result.path, result.manifest) == (tmp_path / "out", tmp_path / "out" / "manifest.csv")
    assert (result.train, result.val) == (15, 4)  # round(19 * 0.2) = 4
    rows = check_manifest(result.path)
    assert [r["id"] for r in rows] == sorted(DEMO_PHOTOS)
    for r in rows:
        assert (r["source"], r["target"], r["prompt"]) == (f"skimage:{r['id']}#degraded", f"skimage:{r['id']}", PROMPT)
        assert r["reference"].startswith("skimage:") and r["reference"] != r["target"]
        with Image.open(result.path / r["file"]) as img:
            assert img.size == (96, 32)
            px = np.asarray(img, dtype=np.float64)  # [32, 96, 3]
        source, target = px[:, 32:64], px[:, 64:]
        assert source.mean() < target.mean() - 10  # the degraded source is darker
    # same params, same bytes
    again = prepare(cfg.model_copy(update={"output": str(tmp_path / "again")}))
    assert snapshot(again.path) == snapshot(result.path)


def test_tint_target_is_the_source_under_the_look_the_reference_shows(tmp_path):
    cfg = DataConfig(panel_size=32, output=str(tmp_path / "out"), demo_task="tint")
    rows = {r["id"]: r for r in check_manifest(prepare(cfg).path)}
    assert set(rows) == set(DEMO_PHOTOS)
    prompts = {r["prompt"] for r in rows.values()}
    assert prompts == {DataConfig().prompt_template.format(
        instruction="its colours are graded with the same look as the reference photo")}  # the look is not named

    def panels(sid):
        with Image.open(tmp_path / "out" / f"{sid}.png") as img:
            return [img.crop((i * 32, 0, (i + 1) * 32, 32)).convert("RGB") for i in range(3)]  # ref, source, target

    def px(img):
        return np.asarray(img, dtype=np.int16)

    looks_used = set()
    for sid, r in rows.items():
        look = r["target"].removeprefix(f"skimage:{sid}#look=")
        other = r["reference"].removeprefix("skimage:").split("#look=")
        assert r["source"] == f"skimage:{sid}" and look in LOOKS and other[1] == look and other[0] != sid
        looks_used.add(look)
        reference, source, target = panels(sid)
        assert np.array_equal(px(apply_look(source, look)), px(target))  # target = look(source), pixel for pixel
        assert np.abs(px(target) - px(source)).mean() > 4  # and the look is visible
        for wrong in set(LOOKS) - {look}:  # no other look explains the pair
            assert not np.array_equal(px(apply_look(source, wrong)), px(target))
        if other[0] in rows:  # the reference is the other photo under the same look
            other_source = panels(other[0])[1]
            assert np.array_equal(px(apply_look(other_source, look)), px(reference))
            assert np.abs(px(reference) - px(other_source)).mean() > 4
        assert rows[other[0]]["split"] == "train"  # no val photo leaks into training through a reference
    assert len(looks_used) >= 4  # the look varies: without the reference the edit is ambiguous
    enhance = read_manifest(prepare(DataConfig(panel_size=32, output=str(tmp_path / "e"))).path).set_index("id")
    enhance = enhance.to_dict("index")
    assert enhance["coffee"]["source"] == "skimage:coffee#degraded"  # enhance is still there, and the default


def test_folder_source(tmp_path):
    root = folder_dataset(tmp_path / "raw")
    save(root / "reference" / "b.png", (0, 0, 99))
    result = prepare(folder_cfg(tmp_path))
    rows = check_manifest(result.path)
    assert (result.count, result.train, result.val) == (4, 3, 1)
    assert [r["id"] for r in rows] == list("abcd")
    targets = {r["id"]: r["target"] for r in rows}
    splits = {r["id"]: r["split"] for r in rows}
    for i, r in enumerate(rows):
        assert r["source"] == f"{root.as_posix()}/source/{r['id']}.png"
        assert r["target"] == f"{root.as_posix()}/target/{r['id']}.png"
        assert r["prompt"] == PROMPT
        with Image.open(result.path / r["file"]) as img:
            assert img.size == (3 * PANEL, PANEL)
            assert centre(img, 1) == (10 + i, 0, 0)
            assert centre(img, 2) == (0, 10 + i, 0)
            ref = centre(img, 0)
        if r["id"] == "b":
            assert r["reference"] == f"{root.as_posix()}/reference/b.png" and ref == (0, 0, 99)
        else:  # borrowed: another sample's target, from the train split
            donor = next(k for k, v in targets.items() if v == r["reference"])
            assert donor != r["id"] and splits[donor] == "train"
            assert ref == (0, 10 + "abcd".index(donor), 0)


def test_manifest_source(tmp_path):
    raw = tmp_path / "raw"
    for sid, c in (("x", 1), ("y", 2), ("z", 3)):
        save(raw / "in" / f"{sid}.png", (c, 0, 0))
        save(raw / "out" / f"{sid}.png", (0, c, 0))
    save(raw / "refs" / "r.png", (0, 0, 77))
    (raw / "pairs.csv").write_text(
        "target,source,reference,prompt,split\n"
        "out/z.png,in/z.png,,,train\n"
        "out/x.png,in/x.png,,make it bright,val\n"
        "out/y.png,in/y.png,refs/r.png,,\n"
    )
    cfg = DataConfig(source="manifest", path=str(raw / "pairs.csv"), output=str(tmp_path / "prep"), panel_size=PANEL)
    result = prepare(cfg)
    rows = {r["id"]: r for r in check_manifest(result.path)}
    assert sorted(rows) == ["x", "y", "z"]
    assert (rows["x"]["prompt"], rows["x"]["split"]) == ("make it bright", "val")
    assert (rows["y"]["prompt"], rows["y"]["split"]) == (PROMPT, "train")  # one free sample: no val to draw
    assert rows["z"]["split"] == "train"
    assert rows["y"]["source"] == f"{raw.as_posix()}/in/y.png"
    assert rows["y"]["reference"] == f"{raw.as_posix()}/refs/r.png"
    assert rows["x"]["reference"] in (rows["y"]["target"], rows["z"]["target"])
    with Image.open(result.path / "y.png") as img:
        assert (centre(img, 0), centre(img, 1), centre(img, 2)) == ((0, 0, 77), (2, 0, 0), (0, 2, 0))


def test_split_is_seeded():
    ids = [f"s{i:02d}" for i in range(20)]
    split = assign_splits(ids, 0.2, seed=0)
    assert split == assign_splits(ids[::-1], 0.2, seed=0)
    assert sum(v == "val" for v in split.values()) == 4
    assert split != assign_splits(ids, 0.2, seed=1)
    assert set(assign_splits(ids, 0.0, seed=0).values()) == {"train"}
    assert sorted(assign_splits(["a", "b"], 0.1, seed=0).values()) == ["train", "val"]  # at least one val
    assert assign_splits(["a", "b"], 0.9, seed=0) != {"a": "val", "b": "val"}  # at least one train
    assert assign_splits(["a"], 0.5, seed=0) == {"a": "train"}


def test_split_through_prepare_on_20_samples(tmp_path):
    ids = [f"p{i:02d}" for i in range(20)]
    folder_dataset(tmp_path / "raw", ids)
    cfg = folder_cfg(tmp_path, panel_size=16)

    def val_ids(c):
        return sorted(s.id for s in collect(c) if s.split == "val")

    first = val_ids(cfg)
    assert len(first) == 4
    assert val_ids(cfg) == first
    assert val_ids(cfg.model_copy(update={"seed": 1})) != first


# ------------------------------------------------------------------------------------------ validation


def test_all_folder_problems_reported_at_once(tmp_path):
    root = tmp_path / "raw"
    src, tgt = root / "source", root / "target"
    for sid in "abcefg":
        save(tgt / f"{sid}.png")
    save(src / "a.png")
    good = (src / "a.png").read_bytes()
    (src / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    (src / "c.png").write_text("not pixels")
    save(src / "d.png")  # no target
    save(tgt / "h.png")  # no source
    save(src / "e.jpg")
    save(src / "e.png")  # duplicate id
    save(src / "f.png", size=(32, 48))  # smaller than the 64-px panel
    outside = save(tmp_path / "elsewhere" / "g.png")
    (src / "g.png").symlink_to(outside)
    (src / ".DS_Store").write_text("ignored")

    with pytest.raises(FluxfillError) as e:
        prepare(folder_cfg(tmp_path))
    msg = str(e.value)
    s, t = src.as_posix(), tgt.as_posix()
    assert msg.splitlines()[0] == (
        f"prepare found 7 problem(s) with data.source=folder (nothing written, {tmp_path / 'out'} unchanged):"
    )
    assert f"{s}/b.png: unreadable or truncated image (image file is truncated" in msg
    assert f"{s}/c.png: not an image" in msg
    assert f"{s}/d.png: missing pair: no target/d.* for this source" in msg
    assert f"{t}/h.png: missing pair: no source/h.* for this target" in msg
    assert f"{s}/e.png: duplicate id 'e' (also {s}/e.jpg)" in msg
    assert f"{s}/f.png: 32x48 is smaller than a 64-px panel" in msg and "data.allow_upscale=true" in msg
    assert f"{s}/g.png: leads outside the data root {root}" in msg
    assert not (tmp_path / "out").exists()


def test_all_manifest_problems_reported_at_once(tmp_path):
    raw = tmp_path / "raw"
    for name in ("in/a.png", "out/a.png", "in/d.png", "in/e.png", "out/e.png", "in/f.png", "out/f.png",
                 "sub/f.png", "out/f2.png", "out/g.png"):
        save(raw / name)
    outside = save(tmp_path / "outside.png")
    (raw / "in" / "g.png").symlink_to(outside)
    csv_path = raw / "m.csv"
    csv_path.write_text(
        "source,target,split\n"
        f"{outside},out/a.png,\n"
        "../outside.png,out/a.png,\n"
        "in/missing.png,out/a.png,\n"
        "in/d.png,,\n"
        "in/e.png,out/e.png,test\n"
        "in/f.png,out/f.png,\n"
        "sub/f.png,out/f2.png,\n"
        "in/g.png,out/g.png,\n"
    )
    cfg = DataConfig(source="manifest", path=str(csv_path), output=str(tmp_path / "out"), panel_size=PANEL)
    with pytest.raises(FluxfillError) as e:
        prepare(cfg)
    msg = str(e.value)
    m = csv_path.as_posix()
    assert "prepare found 7 problem(s) with data.source=manifest" in msg
    assert f"{m}:2: source {outside}: absolute path; manifest paths are relative to the CSV's folder" in msg
    assert f"{m}:3: source ../outside.png: '..' leaves the data root" in msg
    assert f"{m}:4: source in/missing.png: file not found" in msg
    assert f"{m}:5: missing pair: the target column is empty" in msg
    assert f"{m}:6: split 'test' is not one of train, val" in msg
    assert f"{m}:8: duplicate id 'f' (the source file stem, also on line 7)" in msg
    assert f"{m}:9: source in/g.png: leads outside the data root" in msg
    assert not (tmp_path / "out").exists()


def test_manifest_columns(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("input,target,notes\nin/a.png,out/a.png,x\n")
    with pytest.raises(FluxfillError) as e:
        prepare(DataConfig(source="manifest", path=str(csv_path), output=str(tmp_path / "out")))
    assert (
        f"{csv_path}: missing column(s) source; unknown column(s) input, notes; "
        "the header must be source,target[,reference,prompt,split]"
    ) in str(e.value)


@pytest.mark.parametrize("source", ["folder", "manifest"])
def test_empty_dataset(tmp_path, source):
    raw = tmp_path / "raw"
    (raw / "source").mkdir(parents=True)
    (raw / "target").mkdir()
    (raw / "m.csv").write_text("source,target\n")
    path = raw / "m.csv" if source == "manifest" else raw
    with pytest.raises(FluxfillError, match=rf"1 problem\(s\).*\n  {path}: empty dataset: no samples found"):
        prepare(DataConfig(source=source, path=str(path), output=str(tmp_path / "out")))


def test_missing_inputs(tmp_path):
    with pytest.raises(FluxfillError, match=r"nope: folder not found; data.source=folder expects nope/source/"):
        prepare(DataConfig(source="folder", path="nope", output=str(tmp_path / "out")))
    with pytest.raises(FluxfillError, match=r"nope.csv: manifest not found"):
        prepare(DataConfig(source="manifest", path="nope.csv", output=str(tmp_path / "out")))
    save(tmp_path / "raw" / "target" / "a.png")
    with pytest.raises(FluxfillError) as e:
        prepare(folder_cfg(tmp_path))
    assert str(e.value).splitlines()[1:] == [
        f"  {tmp_path / 'raw' / 'source'}: folder not found; data.source=folder expects "
        f"{tmp_path / 'raw'}/source/ and {tmp_path / 'raw'}/target/ (and optional {tmp_path / 'raw'}/reference/)"
    ]
    root = folder_dataset(tmp_path / "raw", "a")
    with pytest.raises(FluxfillError, match=r"source/a.png: no reference and no other sample to borrow one from"):
        prepare(folder_cfg(tmp_path))
    save(root / "reference" / "a.png")
    assert prepare(folder_cfg(tmp_path)).count == 1


def test_upscale_only_when_allowed(tmp_path, caplog):
    root = folder_dataset(tmp_path / "raw", "ab")
    save(root / "source" / "a.png", (5, 0, 0), size=(40, 40))
    with pytest.raises(FluxfillError, match=r"a.png: 40x40 is smaller than a 64-px panel"):
        prepare(folder_cfg(tmp_path))
    with caplog.at_level(logging.INFO, logger="fluxfill.data"):
        result = prepare(folder_cfg(tmp_path, allow_upscale=True))
    assert f"{root.as_posix()}/source/a.png: 40x40 upscaled to fill a 64-px panel" in caplog.messages
    with Image.open(result.path / "a.png") as img:
        assert centre(img, 1) == (5, 0, 0)


def test_conversions_to_rgb(tmp_path, caplog):
    root = tmp_path / "raw"
    save(root / "source" / "a.png", 100, mode="L")
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)  # [H, W, RGBA]: left half transparent,
    rgba[:, 40:, 3] = 128  # right half black at half opacity
    (root / "target").mkdir()
    Image.fromarray(rgba, "RGBA").save(root / "target" / "a.png")
    pal = Image.new("P", (80, 80), 0)
    pal.putpalette([200, 10, 10] + [0] * 765)
    pal.save(root / "source" / "b.png")
    Image.fromarray(np.full((80, 80), 32768, dtype=np.uint16)).save(root / "target" / "b.png")  # I;16
    with caplog.at_level(logging.INFO, logger="fluxfill.data"):
        result = prepare(folder_cfg(tmp_path))
    r = root.as_posix()
    assert f"{r}/source/a.png: L converted to RGB" in caplog.messages
    assert f"{r}/target/a.png: RGBA alpha composited on white" in caplog.messages
    assert f"{r}/source/b.png: palette converted to RGB" in caplog.messages
    assert f"{r}/target/b.png: I;16 (16-bit) scaled to 8-bit RGB" in caplog.messages
    with Image.open(result.path / "a.png") as img:
        assert centre(img, 1) == (100, 100, 100)
        assert img.getpixel((2 * PANEL + 5, 32)) == (255, 255, 255)  # transparent -> white
        assert img.getpixel((3 * PANEL - 5, 32)) == (127, 127, 127)  # half black on white
    with Image.open(result.path / "b.png") as img:
        assert (centre(img, 1), centre(img, 2)) == ((200, 10, 10), (128, 128, 128))


# ------------------------------------------------------------------------------------------ output


def test_failed_prepare_leaves_earlier_output_intact(tmp_path, monkeypatch):
    root = folder_dataset(tmp_path / "raw")
    cfg = folder_cfg(tmp_path)
    out = prepare(cfg).path
    before = snapshot(out)

    save(root / "target" / "z.png")
    good = (root / "source" / "a.png").read_bytes()
    (root / "source" / "z.png").write_bytes(good[:-30])
    with pytest.raises(FluxfillError, match="z.png: unreadable or truncated image"):
        prepare(cfg)
    assert snapshot(out) == before

    # a failure half-way through writing: nothing swapped in, no temp folder left behind
    (root / "source" / "z.png").unlink()
    (root / "target" / "z.png").unlink()
    save(root / "target" / "a.png", (0, 200, 0))
    import fluxfill.data

    png, calls = fluxfill.data._png, []

    def fail_on_third(img):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return png(img)

    monkeypatch.setattr(fluxfill.data, "_png", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]

    monkeypatch.undo()
    prepare(cfg)
    assert snapshot(out) != before  # target a changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_help_explains_sources_and_layout(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("demo", "folder", "manifest", "source/<id>.png", "target/<id>.png", "reference/<id>.png",
                 "source,target[,reference,prompt,split]", "data.allow_upscale", "--check", "1536x512"):
        assert text in out, text


def test_cli_check_prepare_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder_dataset(tmp_path / "data" / "raw")
    args = ["prepare", "--set", "data.source=folder", "--set", f"data.panel_size={PANEL}"]
    assert main([*args, "--check"]) == 0
    assert capsys.readouterr().out == "4 samples ok (3 train, 1 val) from data.source=folder\n"
    assert not (tmp_path / "data" / "prepared").exists()

    assert main(args) == 0
    assert capsys.readouterr().out == (
        "prepared 4 triptychs of 192x64 (3 train, 1 val) in data/prepared; manifest data/prepared/manifest.csv\n"
    )
    assert len(read_manifest("data/prepared")) == 4

    (tmp_path / "data" / "raw" / "target" / "a.png").unlink()
    assert main(args) == 1
    assert capsys.readouterr().err == (
        "fluxfill prepare: error: prepare found 1 problem(s) with data.source=folder "
        "(nothing written, data/prepared unchanged):\n"
        "  data/raw/source/a.png: missing pair: no target/a.* for this source; add it or remove the source\n"
    )
    assert len(read_manifest("data/prepared")) == 4


# ------------------------------------------------------------------------------------------ DVC hash


def test_dvc_md5_is_what_dvc_records(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"hello\n")
    (d / "sub" / "b.bin").write_bytes(b"x")
    assert dvc_md5(d) == "eaf8a86d902a6817a4a031e3cbd7c606.dir"  # what `dvc add d` (DVC 3.67) records for this folder
    assert dvc_md5(d / "a.txt") == hashlib.md5(b"hello\n").hexdigest()
