"""The CPU benchmarks run end to end at a small size and report consistent figures (no timing is asserted)."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path

import pytest
import torch


@pytest.fixture
def captured(monkeypatch):
    """The figures a benchmark would write to bench/results/ (which the tests leave alone); the benchmarks set
    torch's thread count, which is put back."""
    got = {}
    for module in ("bench.encode_throughput", "bench.train_overhead"):
        monkeypatch.setattr(importlib.import_module(module), "write_result",
                            lambda name, figures: got.setdefault(name, figures))
    monkeypatch.delenv("FLUXFILL_BENCH_THREADS", raising=False)
    threads = torch.get_num_threads()
    yield got
    torch.set_num_threads(threads)


def test_encode_bench_reports_stage_over_model_calls(captured, monkeypatch):
    import bench.encode_throughput as b

    monkeypatch.setattr(b, "SAMPLES", 4)
    monkeypatch.setattr(b, "PANEL", 64)
    monkeypatch.setattr(b, "SHARD", 2)
    monkeypatch.setattr(b, "ROUNDS", 3)
    b.main()
    figures = captured["encode_throughput"]
    assert figures["target_stage_over_model_calls"] == 1.10 and figures["threads"] == 1 == torch.get_num_threads()
    half = 5e-4  # the file rounds each figure to 3 decimals: the figures agree within what that rounding allows
    for bs in (1, 4, 8):
        f = figures[f"batch_{bs}"]
        stages, alone = f["rounds"]["stage_s"], f["rounds"]["model_calls_alone_s"]
        assert len(stages) == len(alone) == 3
        assert f["stage_s"] == statistics.median(stages) and f["model_calls_alone_s"] == statistics.median(alone)
        # the ratio is the median of the rounds' own ratios, inside their spread
        low = statistics.median((s - half) / (a + half) for s, a in zip(stages, alone, strict=True))
        high = statistics.median((s + half) / (a - half) for s, a in zip(stages, alone, strict=True))
        lo, hi = f["stage_over_model_calls_min_max"]
        assert low - half <= f["stage_over_model_calls"] <= high + half and lo <= f["stage_over_model_calls"] <= hi
        assert 4 / (f["stage_s"] + half) - half <= f["samples_per_s"] <= 4 / (f["stage_s"] - half) + half


def test_train_overhead_bench_pairs_every_step_and_keeps_the_workspace_clean(captured, monkeypatch, tmp_path):
    import bench.train_overhead as b

    for name, value in (("SAMPLES", 8), ("PANEL", 64), ("WARMUP", 1), ("STEPS", 3), ("ROUNDS", 2)):
        monkeypatch.setattr(b, name, value)
    monkeypatch.chdir(tmp_path)
    originals = [getattr(owner, name) for owner, name, _ in b.SECTIONS]
    b.main()
    assert [getattr(owner, name) for owner, name, _ in b.SECTIONS] == originals  # every patched function restored
    f = captured["train_overhead"]
    where = f["where_ms_per_step"]
    assert list(where) == ["train_step_minus_bare", *(label for *_, label in b.SECTIONS), "rest of the loop"]
    # each function runs on every step: main-thread CPU time, positive (4 cache reads per step of batch 4)
    assert all(where[label] > 0 for label in ("cache reads", "fusion statistics", "host sync", "progress bar"))
    assert f["target_ms_per_step"] == 5.0 and f["steps_per_round"] == 3 and f["panel_size"] == 64
    assert len(f["rounds"]["overhead_cpu_ms"]) == 2 and f["bare_step_cpu_s"] > 0 and f["our_step_cpu_s"] > 0
    spread = f["overhead_ms_per_step_cpu"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert list(Path(tmp_path).iterdir()) == []  # train's metrics/, plots/ and .fluxfill/ stayed in its own folder
