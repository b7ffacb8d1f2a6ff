"""analysis.py on hand-made records with known entropies and correctness, and eval end to end on a
tiny model. Run: python -m pytest tests/test_analysis.py"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
from tests.tiny import tiny_model, tiny_tokenizer


def record(benchmark, index, correct, entropy, response="...", temperature=0.1):
    return dict(benchmark=benchmark, index=index, problem="p", answer="1", response=response, correct=correct,
                boxed=True, length=10, truncated=False, entropy=entropy, temperature=temperature)


RECORDS = [  # two questions x 3 samples; overall mean H = (0.2+0.4+1.2 + 0.3+0.9+1.0) / 6 = 0.666...
    record("math", 0, True, 0.2), record("math", 0, True, 0.4), record("math", 0, False, 1.2),
    record("math", 1, True, 0.3), record("math", 1, False, 0.9), record("math", 1, False, 1.0),
]


def test_entropy_stats_hand_computed():
    s = analysis.entropy_stats(RECORDS)
    assert s["mean_entropy"] == pytest.approx(4.0 / 6)
    assert s["mean_entropy_correct"] == pytest.approx(0.3)          # (0.2 + 0.4 + 0.3) / 3
    assert s["mean_entropy_wrong"] == pytest.approx(3.1 / 3)        # (1.2 + 0.9 + 1.0) / 3
    assert s["relative_confidence"] == pytest.approx((3.1 / 3) / 0.3)
    assert s["rho_c"] == 0.0 and s["rho_w"] == 0.0                 # no correct above H, no wrong below it
    # within questions: q0 mean 0.6, q1 mean 0.733: correct above own mean: none; wrong below own mean: none
    assert s["rho_c_group"] == 0.0 and s["rho_w_group"] == 0.0


def test_entropy_stats_when_confidence_is_inverted():
    flipped = [dict(r, correct=not r["correct"]) for r in RECORDS]
    s = analysis.entropy_stats(flipped)
    assert s["rho_c"] == 1.0 and s["rho_w"] == 1.0
    assert s["relative_confidence"] == pytest.approx(0.3 / (3.1 / 3))


def test_reflection_stats_hand_computed():
    records = [record("m", 0, True, 1, "so 3. Wait, let me re-check: 3."), record("m", 1, False, 1, "it is 4"),
               record("m", 2, False, 1, "I made a MISTAKE, hmm"), record("m", 3, True, 1, "easy: 5")]
    s = analysis.reflection_stats(records)
    assert s["reflecting"] == 2 and s["reflection_share"] == 0.5
    assert s["accuracy"] == 0.5 and s["accuracy_reflecting"] == 0.5 and s["accuracy_not_reflecting"] == 0.5


def test_accuracy_table_weighted_and_unweighted():
    records = [record("a", i, i < 1, 1) for i in range(4)] + [record("b", 0, True, 1)]
    table, weighted, unweighted = analysis.accuracy_table(records)
    assert table == {"a": (25.0, 4), "b": (100.0, 1)}
    assert weighted == pytest.approx(40.0)   # 2 of 5 problems
    assert unweighted == pytest.approx(62.5)


def test_eval_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    tok = tiny_tokenizer()
    monkeypatch.setattr(analysis, "load_model_and_tokenizer", lambda *a, **k: (tiny_model(tok), tok))
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(dict(problem=f"{a}+{a}?", answer=str(2 * a))) + "\n" for a in (1, 2, 3)))
    summary = analysis.main(["eval", "--model", "tiny", "--data", str(data), "--max-new-tokens", "8",
                             "--batch-size", "2", "--output-dir", str(tmp_path / "ev")])
    records = [json.loads(line) for line in (tmp_path / "ev" / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and all(r["benchmark"] == "three" for r in records)
    assert all(r["entropy"] > 0 and 1 <= r["length"] <= 8 for r in records)
    assert summary["problems"] == {"three": 3} and summary["pass_at_1"]["three"] == 0.0
    assert "three" in capsys.readouterr().out
    # the saved records feed the other analyses without generating again
    result = analysis.main(["entropy", "--records", str(tmp_path / "ev" / "records.jsonl"), "--output-dir",
                            str(tmp_path / "an")])
    assert result["0.1"]["responses"] == 3
    # forced reflection continues every wrong response after the cue
    model = tiny_model(tok)
    forced = analysis.forced_reflection(model, tok, "step-by-step", records, max_new_tokens=4, temperature=1.0, seed=0)
    assert forced["wrong"] == 3 and 0 <= forced["corrected"] <= 3


def test_compare_prints_one_row_per_eval(tmp_path, capsys):
    for name, acc in (("base", 10.0), ("trained", 30.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(dict(
            model=name, pass_at_1={"math500": acc, "aime24": 0.0}, problems={"math500": 500, "aime24": 30},
            average_weighted=acc * 500 / 530)))
    analysis.main(["compare", str(tmp_path / "base"), str(tmp_path / "trained")])
    out = capsys.readouterr().out
    assert "base" in out and "trained" in out and "30.00" in out and f"{30 * 500 / 530:.2f}" in out


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    for arm, var in (("GRPO", 0.0), ("EDGE-GRPO", 1.0)):
        run = tmp_path / arm
        run.mkdir()
        (run / "config.json").write_text(json.dumps(dict(arm=arm)))
        lines = [dict(step=s, adv_var=var, entropy=0.5, accuracy=0.1, zero_std_before_gec=1 - var,
                      zero_std_after_gec=0.0) for s in range(1, 6)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "fig.png"
    summary = analysis.main(["plot", str(tmp_path / "GRPO"), str(tmp_path / "EDGE-GRPO"), "--output", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert summary["GRPO (GRPO)"]["adv_var"] == 0.0 and summary["EDGE-GRPO (EDGE-GRPO)"]["adv_var"] == 1.0
    summary = analysis.main(["plot", str(tmp_path / "GRPO"), "--metrics", "entropy", "--output", str(out)])
    assert summary["GRPO (GRPO)"]["entropy"] == 0.5 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--metrics semantic_entropy: not in these runs"):
        analysis.main(["plot", str(tmp_path / "GRPO"), "--metrics", "semantic_entropy", "--output", str(out)])


def test_missing_inputs_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        analysis.main(["plot", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        analysis.main(["reflection", "--records", str(tmp_path / "none.jsonl")])


def test_moving_average():
    assert analysis.moving_average([1, 3, None, 5], 2) == [1, 2, 3, 5]


def test_several_samples_count_problems_not_responses(tmp_path, monkeypatch, capsys):
    tok = tiny_tokenizer()
    monkeypatch.setattr(analysis, "load_model_and_tokenizer", lambda *a, **k: (tiny_model(tok), tok))
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(dict(problem=f"{a}+{a}?", answer=str(2 * a))) + "\n" for a in (1, 2, 3)))
    summary = analysis.main(["eval", "--model", "tiny", "--data", str(data), "--max-new-tokens", "4", "--samples", "4",
                             "--output-dir", str(tmp_path / "ev")])
    assert summary["problems"] == {"three": 3}
    out = capsys.readouterr()
    assert "n=3" in out.out and "n=12" not in out.out
    assert "8 problems per batch" in out.err  # the CPU default (EVAL_BATCH_SIZE)
    records = [record("b", i // 4, i < 3, 1) for i in range(8)]  # 2 problems x 4 samples, 3 of 8 correct
    assert analysis.accuracy_table(records)[0] == {"b": (37.5, 2)}


def test_a_checkpoint_is_evaluated_with_the_prompt_it_was_trained_with(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.setattr(analysis, "load_model_and_tokenizer", lambda *a, **k: (tiny_model(tok), tok))
    checkpoint = tmp_path / "checkpoint-1000"  # a name that says nothing of the family
    checkpoint.mkdir()
    (checkpoint / "run_config.json").write_text(json.dumps(dict(prompt_format="bare")))
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(dict(problem="1+1?", answer="2")) + "\n")
    seen = []
    original = analysis.build_prompt
    monkeypatch.setattr(analysis, "build_prompt", lambda t, p, f: seen.append(f) or original(t, p, f))
    summary = analysis.main(["eval", "--model", str(checkpoint), "--data", str(data), "--max-new-tokens", "2",
                             "--output-dir", str(tmp_path / "ev")])
    assert summary["prompt_format"] == "bare" and seen == ["bare"]


def test_records_with_a_missing_field_name_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record("m", 0, True, 0.5)) + "\n" + json.dumps(dict(problem="p", correct=True)) + "\n")
    with pytest.raises(SystemExit, match="records.jsonl:2: a record needs benchmark, index, answer, response, entropy"):
        analysis.main(["entropy", "--records", str(path)])


def test_errors_name_the_program_that_failed(tmp_path):
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "analysis.py", "entropy", "--records",
                           str(tmp_path / "none.jsonl")], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("analysis.py: error: ")


# ----------------------------------------------------------------------------- traps a new user hit (issue 27)

def test_tables_never_cut_a_model_name(tmp_path, capsys):
    """A checkpoint's name identifies the model: runs/edge-grpo/checkpoint-24 must not print as ...checkpoint-2."""
    name = "runs/edge-grpo/checkpoint-24"
    text = analysis.format_table([(name, {"olympiadbench": (12.5, 8)}, 12.5),
                                  ("base", {"olympiadbench": (1.0, 8)}, 1.0)])
    assert f"{name} " in text and "olympiadbench" in text
    lines = text.splitlines()
    assert len({len(line) for line in lines[:2]}) == 1 and lines[2].index("12.50") == lines[3].index(" 1.00")  # aligned
    evals = tmp_path / "runs" / "edge-grpo" / "eval-checkpoint-24"
    evals.mkdir(parents=True)
    (evals / "summary.json").write_text(json.dumps(dict(model=name, pass_at_1={"math500": 10.0},
                                                        problems={"math500": 5}, average_weighted=10.0)))
    analysis.main(["compare", str(evals)])
    assert f"{name} (eval-checkpoint-24)" in capsys.readouterr().out


def test_a_checkpoint_of_the_cpu_alias_gets_the_alias_budget(tmp_path, monkeypatch):
    """smollm2-135m is evaluated with 512 new tokens, not the authors' 3000: so is a checkpoint of its run."""
    checkpoint = tmp_path / "checkpoint-24"
    checkpoint.mkdir()
    (checkpoint / "run_config.json").write_text(json.dumps(dict(model="smollm2-135m", prompt_format="step-by-step")))
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(dict(problem="1+1?", answer="2")) + "\n")
    asked = []
    monkeypatch.setattr(analysis, "load_eval_model", lambda args: (None, None, "step-by-step", 8))
    monkeypatch.setattr(analysis, "eval_records", lambda *a,
                        **k: asked.append(k["max_new_tokens"]) or [record("one", 0, True, 0.5)])
    summary = analysis.main(["eval", "--model", str(checkpoint), "--data", str(data), "--output-dir",
                             str(tmp_path / "ev")])
    assert asked == [512] and summary["max_new_tokens"] == 512
    (checkpoint / "run_config.json").write_text(json.dumps(dict(model="Qwen/Qwen2.5-Math-1.5B")))
    analysis.main(["eval", "--model", str(checkpoint), "--data", str(data), "--output-dir", str(tmp_path / "ev2")])
    assert asked[-1] == analysis.EVAL_MAX_NEW_TOKENS == 3000


def test_plots_label_their_axes_keep_the_legend_off_the_curves_and_share_bins(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    figures, bins = [], []
    real_save, real_hist = matplotlib.figure.Figure.savefig, matplotlib.axes.Axes.hist
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a,
                        **k: figures.append(self) or real_save(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "hist", lambda self, x,
                        **k: bins.append(k.get("bins")) or real_hist(self, x, **k))
    run = tmp_path / "GRPO"
    run.mkdir()
    lines = [dict(step=s, adv_var=0.5, entropy=0.5, accuracy=0.1, zero_std_before_gec=0.5, zero_std_after_gec=0.0)
             for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    analysis.main(["plot", str(run), "--output", str(tmp_path / "fig.png")])
    panels = [ax for ax in figures[-1].axes if ax.get_visible() and ax.axison]
    assert len(panels) == 4 and all(ax.get_ylabel() for ax in panels)
    assert figures[-1].legends and all(ax.get_legend() is None for ax in panels)  # one legend, outside the panels
    analysis.plot_entropy_histogram(RECORDS, tmp_path / "hist.png")
    assert len(bins) == 2 and isinstance(bins[0], list) and bins[0] == bins[1]  # correct and wrong on the same bins
    assert bins[0][0] == 0.2 and bins[0][-1] == pytest.approx(1.2)


def test_pass_at_k_hand_table():
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) against hand values, and the table over problems."""
    assert analysis.pass_at_k(4, 0, 4) == 0.0 and analysis.pass_at_k(4, 1, 4) == 1.0  # k = n: any right
    assert analysis.pass_at_k(4, 1, 1) == pytest.approx(1 / 4)                       # k = 1: the mean
    assert analysis.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)                  # C(3,2) / C(5,2) = 3/10
    assert analysis.pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)               # C(7,4) = 35, C(10,4) = 210
    records = [dict(benchmark="a", index=i, correct=c) for i,
               cs in enumerate([[0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
               for c in cs] + [dict(benchmark="b", index=0, correct=c) for c in (0, 1, 0, 0)]
    table, weighted = analysis.pass_at_k_table(records, 4)
    assert table == {"a": pytest.approx(200 / 3), "b": 100.0} and weighted == pytest.approx(75.0)  # 3 of 4 problems
