"""The latent cache: contract shapes, equality with a direct encode, incremental, resumable, refused when stale."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import make_prepared
from PIL import Image

from fluxfill.config import FluxfillError, validate
from fluxfill.encode import GEOMETRY, META, LatentCache, encode, settings
from fluxfill.fusion import SemanticFusion
from fluxfill.latents import encode_diptychs, encode_prompts, text_pipeline, vae_pipeline
from fluxfill.objective import BATCH_KEYS, flow_matching_step
from fluxfill.panels import panels_from_triptych

PANEL = 32


def params_for(tmp_path, **encode):
    return validate({"data": {"panel_size": PANEL, "output": str(tmp_path / "prepared")},
                     "model": {"max_sequence_length": 16},
                     "encode": {"output": str(tmp_path / "latents"), "shard_size": 2, "batch_size": 2, **encode}})


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def cache(tmp_path):
    make_prepared(tmp_path / "prepared", 5, PANEL)
    params = params_for(tmp_path)
    result = encode(params, device="cpu")
    return params, result, tmp_path / "latents"


def test_cache_shapes_and_collate(cache):
    params, result, out = cache
    assert result["complete"] and len(result["written"]) == 9  # 3 shards x 3 phases
    ds = LatentCache(out, "train", expect={"preset": "tiny", "panel_size": PANEL})
    assert len(ds) == 4 and len(LatentCache(out, "val")) == 1
    item = ds[0]
    n = (PANEL // 16) * (2 * PANEL // 16)
    assert list(item["x_0"].shape) == [n, 64] and list(item["masked_latents"].shape) == [n, 64]
    assert list(item["prompt_embeds"].shape) == [16, 32] and list(item["pooled_prompt_embeds"].shape) == [32]
    assert list(item["image_embeds"].shape) == [24]
    batch = ds.collate([ds[i] for i in range(3)])
    assert set(BATCH_KEYS) <= set(batch)
    assert list(batch["x_0"].shape) == [3, n, 64] and list(batch["mask_latents"].shape) == [1, n, 256]
    assert list(batch["img_ids"].shape) == [n, 3] and list(batch["txt_ids"].shape) == [16, 3]
    assert batch["ids"] == ["s001", "s002", "s003"]
    for key in ("x_0", "masked_latents", "prompt_embeds", "pooled_prompt_embeds", "image_embeds"):  # rows stacked
        assert torch.equal(batch[key], torch.stack([ds[i][key] for i in range(3)])), key
    out_step = flow_matching_step(_tiny_transformer(), SemanticFusion("learned", 32, 24),
                                  batch)
    assert list(out_step.hidden_states.shape) == [3, n, 384]
    # the step reads the batch as the contract says: x_t = x_0 + σ (ε - x_0), then masked latents and mask
    sigma = out_step.sigma[:, None, None]  # [3, 1, 1]
    torch.testing.assert_close(out_step.hidden_states[..., :64], batch["x_0"] + sigma * out_step.target)
    torch.testing.assert_close(out_step.hidden_states[..., 64:128], batch["masked_latents"], rtol=0, atol=0)
    torch.testing.assert_close(out_step.hidden_states[..., 128:], batch["mask_latents"].expand(3, -1, -1),
                               rtol=0, atol=0)


def _tiny_transformer():
    from fluxfill.config import ModelConfig
    from fluxfill.models import load_component

    return load_component(ModelConfig(), "transformer")


def test_cache_equals_direct_encode(cache, tiny):
    params, _, out = cache
    ds = LatentCache(out, None)
    prepared = out.parent / "prepared"
    manifest = pd.read_csv(prepared / "manifest.csv")
    p = panels_from_triptych(Image.open(prepared / manifest.file[3]))
    direct = encode_diptychs(vae_pipeline(tiny["vae"]), [p.diptych], [p.mask])
    item = ds[3]
    torch.testing.assert_close(item["x_0"], direct.x_0[0])
    batch = ds.collate([item])
    torch.testing.assert_close(torch.cat((batch["masked_latents"], batch["mask_latents"]), -1), direct.x_cond)
    emb, pooled, _ = encode_prompts(text_pipeline(tiny["text_encoder"], tiny["tokenizer"], tiny["text_encoder_2"],
                                                  tiny["tokenizer_2"]), [manifest.prompt[3]], 16)
    torch.testing.assert_close(item["prompt_embeds"], emb[0])
    torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0])


def test_cache_files_get_the_umasks_mode_and_no_leftovers_stay(tmp_path):
    """Every file readable as any new file is (safetensors' save_file alone creates 0600 files); what an
    interrupted write left in the folder (temporary files, mode probes) is removed, so DVC does not track it."""
    import stat

    make_prepared(tmp_path / "prepared", 3, PANEL)
    out = tmp_path / "latents"
    out.mkdir()
    leftovers = [".text-00000.safetensors.tmp", f".{META}.tmp", ".fluxfill-123.mode-probe"]
    for name in leftovers:
        (out / name).write_bytes(b"left by a killed encode")
    (out / ".gitignore").write_text("kept: not a file encode writes\n")
    encode(params_for(tmp_path), device="cpu")  # under the tests' umask 022 (conftest.py)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {name: 0o644 for name in [".gitignore", META, GEOMETRY, *(f"{ph}-0000{i}.safetensors"
                                                                            for ph in ("text", "vae", "vision")
                                                                            for i in (0, 1))]}


def test_second_encode_writes_nothing(cache):
    params, _, out = cache
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = encode(params, device="cpu")
    assert again["written"] == [] and len(again["kept"]) == 9
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_prompt_reencodes_only_its_text_shard(cache):
    params, _, out = cache
    manifest_path = out.parent / "prepared" / "manifest.csv"
    df = pd.read_csv(manifest_path, keep_default_na=False)
    df.loc[3, "prompt"] = "a different instruction"
    df.to_csv(manifest_path, index=False)
    again = encode(params, device="cpu")
    assert again["written"] == ["text-00001.safetensors"]


def test_interrupted_encode_resumes_identically(tmp_path, cache):
    _, _, full = cache
    other = tmp_path / "other"
    make_prepared(other / "prepared", 5, PANEL)
    params = params_for(other)
    partial = encode(params, device="cpu", stop_after=4)
    assert not partial["complete"] and len(partial["written"]) == 4
    assert not (other / "latents" / META).exists()
    resumed = encode(params, device="cpu")
    assert resumed["complete"] and len(resumed["written"]) == 5 and len(resumed["kept"]) == 4
    a, b = files(full), files(other / "latents")
    assert a.keys() == b.keys() and GEOMETRY in a
    for name in a:
        if name != META:
            assert a[name] == b[name], name


def test_wrong_settings_are_refused(cache):
    params, _, out = cache
    with pytest.raises(FluxfillError, match=r"panel_size: cache has 32, expected 64"):
        LatentCache(out, "train", expect={"panel_size": 64})
    with pytest.raises(FluxfillError, match=r"preset: cache has 'tiny', expected 'flux-fill-dev'"):
        LatentCache(out, "train", expect={**settings(params), "preset": "flux-fill-dev"})
    with pytest.raises(FluxfillError, match=r"meta.json not found"):
        LatentCache(out.parent / "nowhere")


def test_panel_size_mismatch_with_prepared(tmp_path):
    make_prepared(tmp_path / "prepared", 5, PANEL)
    params = validate({"data": {"panel_size": 64, "output": str(tmp_path / "prepared")},
                       "encode": {"output": str(tmp_path / "latents")}})
    with pytest.raises(FluxfillError, match=r"holds 32-px panels but data.panel_size is 64"):
        encode(params, device="cpu")


def test_encode_deletes_only_its_own_stale_shards(cache):
    params, _, out = cache
    (out / "text-00009.safetensors").write_bytes(b"a shard of a larger dataset")  # stale: this stage's name
    (out / "weights.safetensors").write_bytes(b"someone's weights")
    (out / "notes-00001.safetensors").write_bytes(b"not a phase")
    assert encode(params, device="cpu")["written"] == []
    assert not (out / "text-00009.safetensors").exists()
    assert (out / "weights.safetensors").read_bytes() == b"someone's weights"
    assert (out / "notes-00001.safetensors").exists()


def test_each_model_family_is_released_before_the_next_loads(tmp_path, monkeypatch):
    """Weak references to every model encode loads: when a family loads, no model of an earlier family lives.

    The families are the text encoders (CLIP text + T5) and the image encoders (VAE + CLIP vision, which share
    one decode of each triptych).
    """
    import gc
    import weakref

    from fluxfill import encode as encode_module

    families = {"text_encoder": "text", "text_encoder_2": "text", "vae": "images", "image_encoder": "images"}
    loaded: list[tuple[str, weakref.ref]] = []
    alive_at_load: dict[str, list[str]] = {}
    real = encode_module.load_component
    gc_calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: gc_calls.append(a) or 0)  # release must not need a collection

    def load_component(cfg, name, *args, **kwargs):
        if name in families:
            alive_at_load[name] = sorted({n for n, ref in loaded if ref() is not None and families[n] != families[name]})
        module = real(cfg, name, *args, **kwargs)
        if name in families:
            loaded.append((name, weakref.ref(module)))
        return module

    monkeypatch.setattr(encode_module, "load_component", load_component)
    make_prepared(tmp_path / "prepared", 3, PANEL)
    assert encode(params_for(tmp_path), device="cpu")["complete"]
    assert alive_at_load == {"text_encoder": [], "text_encoder_2": [], "vae": [], "image_encoder": []}
    assert [n for n, _ in loaded] == ["text_encoder", "text_encoder_2", "vae", "image_encoder"]
    assert [n for n, ref in loaded if ref() is not None] == [] and gc_calls == []


@pytest.mark.parametrize("lost", [("vision-00001.safetensors",), ("vae-00000.safetensors", "vision-00002.safetensors"),
                                  ("vision-00001.safetensors", GEOMETRY)])
def test_lost_image_shards_are_encoded_again_alone_and_identically(cache, monkeypatch, lost):
    """The image phase writes only the lost files, from one pass, and loads only the encoders they need (the
    VAE for a lost geometry file too)."""
    from fluxfill import encode as encode_module

    params, _, out = cache
    before = files(out)
    loaded, real = [], encode_module.load_component
    monkeypatch.setattr(encode_module, "load_component", lambda cfg, name, *a, **k: loaded.append(name) or real(cfg, name, *a, **k))
    for name in lost:
        (out / name).unlink()
    again = encode(params, device="cpu")
    assert sorted(again["written"]) == sorted(n for n in lost if n != GEOMETRY) and files(out) == before
    vae_lost = any(name.startswith("vae") or name == GEOMETRY for name in lost)
    assert loaded == ["vae"] * vae_lost + ["image_encoder", "image_processor"]


def test_missing_geometry_alone_is_rebuilt_identically(cache):
    params, _, out = cache
    before = (out / GEOMETRY).read_bytes()
    (out / GEOMETRY).unlink()
    again = encode(params, device="cpu")
    assert again["written"] == [] and (out / GEOMETRY).read_bytes() == before


def test_a_truncated_shard_is_encoded_again_with_a_log_line(cache, caplog):
    params, _, out = cache
    shard = out / "vae-00001.safetensors"
    before = shard.read_bytes()
    shard.write_bytes(before[:50])
    with caplog.at_level("WARNING", logger="fluxfill.encode"):
        again = encode(params, device="cpu")
    assert again["written"] == ["vae-00001.safetensors"] and shard.read_bytes() == before
    assert f"{shard}: unreadable shard (Error while deserializing header: " in caplog.text
    assert caplog.text.rstrip().endswith("); encoding it again")


def test_a_failed_background_write_fails_the_encode(tmp_path, monkeypatch):
    from fluxfill import encode as encode_module

    real, calls = encode_module._save_atomic, []

    def failing(tensors, path, metadata):
        calls.append(path.name)
        if path.name == "vae-00001.safetensors":
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(encode_module, "_save_atomic", failing)
    make_prepared(tmp_path / "prepared", 5, PANEL)
    with pytest.raises(OSError, match="No space left on device"):
        encode(params_for(tmp_path), device="cpu")
    written = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert META not in written and "vae-00001.safetensors" not in written and "vae-00000.safetensors" in written
    assert calls[3:7] == ["geometry.safetensors", "vae-00000.safetensors", "vision-00000.safetensors", "vae-00001.safetensors"]


def test_the_cli_prints_no_library_noise_unless_verbose(tmp_path):
    """`fluxfill encode` in a fresh interpreter: torchao's kernel-loading failures on a CPU, torch's notes on its
    enums and the vision tower's load report stay out of the output; -v shows the library logs."""
    import subprocess
    import sys

    make_prepared(tmp_path / "prepared", 3, PANEL)
    sets = ["--set", f"data.panel_size={PANEL}", "--set", "data.output=prepared", "--set", "encode.output=latents",
            "--set", "model.max_sequence_length=16"]

    def run(*extra):
        out = subprocess.run([sys.executable, "-m", "fluxfill.cli", *extra, "encode", *sets], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    quiet = run()
    assert "encode: 3 shard file(s) written, 0 up to date -> latents" in quiet
    for noise in ("Failed to load", "_pytree", "Unable to import `torchao`", "LOAD REPORT"):
        assert noise not in quiet
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:  # the [quantize] extra: its import logs are there with -v
        (tmp_path / "latents" / "meta.json").unlink()
        verbose = run("-v")
        assert "encode: 0 shard file(s) written, 3 up to date -> latents" in verbose and "torchao" in verbose


def test_a_failed_model_load_leaves_no_reader_thread_behind(cache, monkeypatch):
    """The first triptych reads start before the image encoders load; when a load fails, the reader still ends."""
    import threading

    from fluxfill import encode as encode_module

    params, _, out = cache
    (out / "vision-00000.safetensors").unlink()
    real = encode_module.load_component

    def load_component(cfg, name, *args, **kwargs):
        if name == "image_encoder":
            raise FluxfillError("image encoder weights missing")
        return real(cfg, name, *args, **kwargs)

    monkeypatch.setattr(encode_module, "load_component", load_component)
    with pytest.raises(FluxfillError, match="image encoder weights missing") as failure:
        encode(params, device="cpu")
    assert failure.value.__traceback__ is not None  # the traceback (and its frames) are still held here
    assert [t.name for t in threading.enumerate() if t.name.startswith("encode-read")] == []


def test_triptych_reads_start_under_the_text_phase(tmp_path, monkeypatch):
    """The first batches' PNGs decode while the text encoders run (under T5-XXL that is minutes), and a text
    phase that fails still ends the reader."""
    import threading

    from fluxfill import encode as encode_module

    make_prepared(tmp_path / "prepared", 5, PANEL)
    read, seen = threading.Event(), []
    real_inputs, real_prompts = encode_module.model_inputs, encode_module.encode_prompts

    def model_inputs(*args):
        read.set()
        return real_inputs(*args)

    def encode_prompts(*args):
        seen.append(read.wait(timeout=10))  # only set before the text phase ends if the reads started before it
        return real_prompts(*args)

    monkeypatch.setattr(encode_module, "model_inputs", model_inputs)
    monkeypatch.setattr(encode_module, "encode_prompts", encode_prompts)
    encode(params_for(tmp_path), device="cpu")
    assert seen == [True, True, True]  # 5 prompts in batches of 2

    def failing(*args):
        raise FluxfillError("text encoder failed")

    monkeypatch.setattr(encode_module, "encode_prompts", failing)
    for f in (tmp_path / "latents").iterdir():
        f.unlink()
    with pytest.raises(FluxfillError, match="text encoder failed"):
        encode(params_for(tmp_path), device="cpu")
    assert [t.name for t in threading.enumerate() if t.name.startswith("encode-read")] == []
