"""The benchmarks' own code, on tiny models: each measuring function runs against today's trainer and
rollout (vs_trl.py had broken silently when train_step began returning a dict) and reports what it
says it reports. Timings are not asserted here (they live in the benchmarks' output)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import sharpened, tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generation  # noqa: E402
import gpu_check  # noqa: E402
import scoring_memory  # noqa: E402
import vs_trl  # noqa: E402


@pytest.fixture
def tiny():
    tok = tiny_tokenizer()
    return sharpened(tiny_model(tok)), tok


def test_gpu_check_measures_steps_that_move_the_master_weights(tiny):
    model, tok = tiny
    args = argparse.Namespace(num_generations=2, max_completion_length=6, learning_rate=1e-2, steps=2)
    result = gpu_check.check("tiny", model, tok, args, torch.device("cpu"))
    assert result["steps"] == 2 and result["G"] == 2 and result["device"] == "cpu"
    phases = result["generation"] + result["gec"] + result["update"]
    assert 0 < phases <= result["seconds_per_step"] * 1.01  # the phases are parts of the step
    assert 0 < result["completion_length"] <= 6 + 6 // 4 + 64  # sampled + GEC's continuation and insertions
    # bf16 compute over fp32 masters at lr 1e-2: almost every master weight moves in 3 steps
    assert result["master_weights_moved"] > 0.5
    assert result["memory_plan_gb"] > 0


def test_vs_trl_runs_our_step_and_summarizes_by_median(tiny, monkeypatch):
    monkeypatch.setattr(vs_trl, "load_model", lambda: tiny)
    monkeypatch.setattr(vs_trl, "LEARNING_RATE", 1e-2)
    out = vs_trl.run_ours(P=1, G=2, L=5, steps=2, edge=True)
    assert len(out) == 2 and all(set(s) == {"seconds", "generation", "gec", "update", "tokens", "rss"} for s in out)
    assert all(s["tokens"] > 0 and s["rss"] > 0 and s["seconds"] >= s["generation"] for s in out)
    # summarize: medians over the steps after the warm-up, the peak RSS their maximum (a hand table)
    runs = [[dict(seconds=9.0, generation=9.0, gec=0.0, update=0.0, tokens=1, rss=999.0),
             dict(seconds=2.0, generation=1.0, gec=0.5, update=0.5, tokens=10, rss=100.0)],
            [dict(seconds=9.0, generation=9.0, gec=0.0, update=0.0, tokens=1, rss=999.0),
             dict(seconds=4.0, generation=2.0, gec=1.0, update=1.0, tokens=20, rss=300.0)]]
    s = vs_trl.summarize(runs, warmup=1)
    assert s == dict(step=3.0, per_token=0.2, tokens=15.0, rss=300.0, generation=1.5, gec=0.75, update=0.75)


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_generation_benchmark_decodes_every_row_to_the_full_length(tiny, monkeypatch, path):
    model, tok = tiny
    monkeypatch.setattr(generation, "load", lambda name, device: (model, tok.eos_token_id))
    result = generation.run_one("tiny", path, rows=2, new_tokens=5, device_name="cpu", repeats=1)
    assert result["path"] == path and result["rows"] == 2 and result["new_tokens"] == 5
    assert result["tokens_per_s"] == pytest.approx(10 / result["seconds"])
    assert result["ms_per_step"] == pytest.approx(1000 * result["seconds"] / 5)


def test_scoring_memory_measures_each_way(tmp_path):
    for chunk_rows in (0, 2):  # the usual way and the chunked one; the growth is >= 0 MB, a float
        grown = scoring_memory.measure(batch=2, tokens=3, vocab=64, chunk_rows=chunk_rows, grad=True)
        assert isinstance(grown, float) and grown >= 0
