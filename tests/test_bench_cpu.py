"""The CPU benchmarks run end to end at a small size and report consistent figures (no timing is asserted)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest


@pytest.fixture
def captured(monkeypatch):
    """The figures a benchmark would write to bench/results/ (which the tests leave alone)."""
    got = {}
    for module in ("bench.encode_throughput", "bench.train_overhead"):
        monkeypatch.setattr(importlib.import_module(module), "write_result",
                            lambda name, figures: got.setdefault(name, figures))
    return got


def test_encode_bench_reports_stage_over_model_calls(captured, monkeypatch):
    import bench.encode_throughput as b

    monkeypatch.setattr(b, "SAMPLES", 4)
    monkeypatch.setattr(b, "PANEL", 64)
    monkeypatch.setattr(b, "SHARD", 2)
    monkeypatch.setattr(b, "ROUNDS", 1)
    b.main()
    figures = captured["encode_throughput"]
    assert figures["target_stage_over_model_calls"] == 1.10
    for bs in (1, 4, 8):
        f = figures[f"batch_{bs}"]
        assert f["rounds"]["stage_s"] == [f["stage_s"]] and f["rounds"]["model_calls_alone_s"] == [f["model_calls_alone_s"]]
        # the file rounds each figure to 3 decimals: the ratios agree within what that rounding allows
        stage, alone, half = f["stage_s"], f["model_calls_alone_s"], 5e-4
        assert (stage - half) / (alone + half) - half <= f["stage_over_model_calls"] <= (stage + half) / (alone - half) + half
        assert 4 / (stage + half) - half <= f["samples_per_s"] <= 4 / (stage - half) + half


def test_train_overhead_bench_pairs_every_step_and_keeps_the_workspace_clean(captured, monkeypatch, tmp_path):
    import bench.train_overhead as b

    for name, value in (("SAMPLES", 8), ("PANEL", 64), ("WARMUP", 1), ("STEPS", 3), ("ROUNDS", 2)):
        monkeypatch.setattr(b, name, value)
    monkeypatch.chdir(tmp_path)
    b.main()
    f = captured["train_overhead"]
    assert f["target_ms_per_step"] == 5.0 and f["steps_per_round"] == 3 and f["panel_size"] == 64
    assert len(f["rounds"]["overhead_cpu_ms"]) == 2 and f["bare_step_cpu_s"] > 0 and f["our_step_cpu_s"] > 0
    spread = f["overhead_ms_per_step_cpu"]
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert list(Path(tmp_path).iterdir()) == []  # train's metrics/, plots/ and .fluxfill/ stayed in its own folder
