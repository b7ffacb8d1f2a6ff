"""replicate.py, the study, and the controls it adds to edge_grpo.py: the statistics on hand tables, the
held-out split, the format-only reward and GEC without a branch, and the study end to end on a tiny
model (its report, a second call that redoes nothing, an interrupted run that resumes).
Run: python -m pytest tests/test_replicate.py"""

import json
import math
import re

import pytest
import torch

import data
import edge_grpo as eg
import replicate
from reward import is_correct
from rollout import choose_gec_actions, rollout_from_texts
from tests.tiny import tiny_model, tiny_tokenizer


# ----------------------------------------------------------------------------- the statistics

def test_mean_std_and_paired_interval_hand_table():
    mean, std = replicate.mean_and_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # sample std: sum of squares 5, over n - 1 = 3
    assert replicate.mean_and_std([7.0]) == (7.0, None)
    # d = arm - baseline per seed: 0.1, 0.3, 0.1 -> mean 1/6, sd sqrt(((1/15)^2 x 2 + (2/15)^2) / 2) = 0.11547,
    # half-width t_{0.975, 2} x sd / sqrt(3) = 4.303 x 0.066667 = 0.28687
    diff = replicate.paired_difference({0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.5})
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(1 / 6)
    assert diff["low"] == pytest.approx(1 / 6 - 0.28687, abs=1e-4)
    assert diff["high"] == pytest.approx(1 / 6 + 0.28687, abs=1e-4)
    assert replicate.paired_difference({0: 0.5}, {0: 0.25}) == dict(mean=0.25, low=None, high=None, n=1)
    assert "≈ GRPO" in replicate.difference_cell(diff)  # the interval holds 0
    assert "≈" not in replicate.difference_cell(dict(mean=0.2, low=0.05, high=0.35, n=3))


def test_t_quantiles_match_the_table_and_its_continuation():
    assert replicate.t_quantile_975(1) == 12.706 and replicate.t_quantile_975(2) == 4.303
    for df, expected in ((40, 2.021), (60, 2.000), (120, 1.980), (10 ** 6, 1.960)):  # printed tables
        assert replicate.t_quantile_975(df) == pytest.approx(expected, abs=1.5e-3)


# ----------------------------------------------------------------------------- the held-out split

def triple(row):
    a, op, b = re.fullmatch(r"What is \$(\d+) (\+|\\times) (\d+)\$\?", row["problem"]).groups()
    return int(a), op, int(b)


def test_the_test_split_is_disjoint_from_the_training_set_in_either_order():
    train = {triple(r) for r in data.arithmetic_problems()}
    test = data.load_data("arithmetic-test")
    assert len(test) == data.ARITHMETIC_TEST_ROWS == 30 and data.data_name("arithmetic-test") == "arithmetic-test"
    triples = [triple(r) for r in test]
    assert len(set(triples)) == len(triples)
    for a, op, b in triples:
        assert (a, op, b) not in train and (b, op, a) not in train
        assert (2 <= a <= 30 and 2 <= b <= 30) if op == "+" else (1 <= a <= 12 and 1 <= b <= 12)
    assert sum(op != "+" for _, op, _ in triples) == 9  # every product left, then sums
    for row in test:
        a, op, b = triple(row)
        assert row["answer"] == str(a + b if op == "+" else a * b) and is_correct(row["solution"], row["answer"])
    assert test == data.arithmetic_test_problems()  # fixed: the same rows every call


# ----------------------------------------------------------------------------- the controls

def test_format_only_reward_hand_table():
    """1 for any boxed answer, right or wrong; the exact-match reward is the rollout's own (0/1/2).
    A group of a boxed wrong and a boxed right answer is mixed under exact match, collapsed under
    format-only: the control removes the correctness signal and nothing else."""
    tok = tiny_tokenizer()
    texts = ["so \\boxed{4}", "so \\boxed{5}", "no box at all", "\\boxed{}"]
    rollout = rollout_from_texts(tok, tiny_model(tok), ["p"], texts, ["4"], group_size=4)
    assert rollout.rewards.tolist() == [2.0, 1.0, 0.0, 0.0]
    assert eg.trained_rewards(rollout, "exact-match").tolist() == [2.0, 1.0, 0.0, 0.0]
    assert eg.trained_rewards(rollout, "format-only").tolist() == [1.0, 1.0, 0.0, 0.0]
    pair = rollout_from_texts(tok, tiny_model(tok), ["p"], texts[:2], ["4"], group_size=2)
    assert eg.group_advantages(eg.trained_rewards(pair, "exact-match"), 2).tolist() == \
        pytest.approx([0.7070, -0.7070], abs=1e-3)
    assert eg.group_advantages(eg.trained_rewards(pair, "format-only"), 2).tolist() == [0.0, 0.0]
    assert eg.REWARD_MAXIMUM["format-only"] == 1.0


def test_gec_without_the_answer_branch_never_answers_and_keeps_the_others_ratio():
    """30,000 wrong rows over 30 seeds: no "answer"; reflection and solution keep their 2 : 1 (each
    share within 6 standard errors of 2/3 and 1/3). Without a solution a row reflects; the default
    branches draw exactly as before (the same thresholds 1/2 and 3/4)."""
    counts, n = {"reflection": 0, "answer": 0, "solution": 0}, 0
    for seed in range(30):
        for a in choose_gec_actions([True] * 1000, [True] * 1000, [False] * 1000, torch.Generator().manual_seed(seed),
                                    branches=("reflection", "solution")):
            counts[a] += 1
            n += 1
    assert counts["answer"] == 0
    for action, p in (("reflection", 2 / 3), ("solution", 1 / 3)):
        assert abs(counts[action] / n - p) < 6 * math.sqrt(p * (1 - p) / n), counts
    g = lambda: torch.Generator().manual_seed(3)
    assert set(choose_gec_actions([True] * 500, [False] * 500, [False] * 500, g(),
                                  branches=("reflection", "solution"))) \
        == {"reflection"}
    only = choose_gec_actions([True] * 500, [True] * 500, [False] * 500, g(), branches=("solution",))
    assert set(only) == {"solution"}
    draws = torch.rand(500, generator=g()).tolist()
    expected = ["reflection" if u < 0.5 else "answer" if u < 0.75 else "solution" for u in draws]
    assert choose_gec_actions([True] * 500, [True] * 500, [False] * 500, g()) == expected


def test_control_flags_parse_and_contradictions_fail():
    assert eg.parse_args(["--gec-branches", "reflection", "solution"]).gec_branches == ["reflection", "solution"]
    default = eg.parse_args([])
    assert default.gec_branches == ["reflection", "answer", "solution"] and default.reward == "exact-match"
    for argv in (["--no-gec", "--gec-branches", "reflection"], ["--forced-reflection", "--gec-branches", "solution"]):
        with pytest.raises(SystemExit, match="--gec-branches"):
            eg.parse_args(argv)
    assert set(replicate.chosen_arms(["controls"])) == {"GRPO", *replicate.CONTROLS}
    with pytest.raises(SystemExit, match="--arms nope"):
        replicate.chosen_arms(["nope"])


# ----------------------------------------------------------------------------- the study end to end

TINY_RUN = ["--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "6",
            "--gec-reflection-tokens", "4", "--learning-rate", "1e-3", "--temperature", "1.0", "--save-steps", "2"]


@pytest.fixture
def tiny_path(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "tiny"
    tiny_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def study(tiny_path, out, *flags, steps=2, seeds=2):
    return replicate.main(["--arms", "grpo", "edge-grpo", "--seeds", str(seeds), "--model", tiny_path, "--max-steps",
                           str(steps), "--eval-limit", "3", "--eval-max-new-tokens", "5", "--eval-samples", "2",
                           "--output-dir", str(out), *flags, "--", *TINY_RUN])


def test_the_study_writes_its_report_and_a_second_call_redoes_nothing(tiny_path, tmp_path):
    out = tmp_path / "study"
    results, done = study(tiny_path, out)
    assert done == dict(trained=4, resumed=0, evaluated=5, skipped=0)  # 2 arms x 2 seeds, + the base model
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("GRPO", 0), ("EDGE-GRPO", 0), ("GRPO", 1),
                                                                ("EDGE-GRPO", 1)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == results["runs"] and set(saved["comparisons"]) == {"EDGE-GRPO"}
    run = saved["runs"][1]
    summary = json.loads((out / "edge-grpo" / "seed-0" / "eval" / "summary.json").read_text())
    assert run["heldout_avg_at_k"] == summary["average_weighted"]
    assert run["heldout_greedy"] == summary["greedy"]["average_weighted"]
    assert summary["samples"] == 2 and summary["problems"] == {"arithmetic-test": 3}
    metrics = [json.loads(line) for line in (out / "edge-grpo" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert run["steps"] == 2 and run["adv_var"] == pytest.approx(sum(m["adv_var"] for m in metrics) / 2)
    table = (out / "table.md").read_text()
    assert "| GRPO |" in table and "| EDGE-GRPO |" in table and "base model" in table and "95 % t interval" in table
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = out / "grpo" / "seed-1" / "checkpoint-2"
    # moments dropped
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "trainer_state.pt").exists()
    # a second call: every run and evaluation is there, nothing is trained or evaluated again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent.name in ("eval",
                                                                                                   "seed-0", "seed-1")}
    again, done = study(tiny_path, out)
    assert done == dict(trained=0, resumed=0, evaluated=0, skipped=4)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["runs"] == results["runs"]


def test_an_interrupted_run_resumes_to_the_same_numbers(tiny_path, tmp_path, monkeypatch):
    straight, _ = study(tiny_path, tmp_path / "a", steps=4, seeds=1)
    real_step = eg.train_step

    def dies_at_step_3(*args, **kwargs):  # the study stops during the third step of its first run
        if args[6] == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(eg, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        study(tiny_path, tmp_path / "b", steps=4, seeds=1)
    assert [c.name for c in (tmp_path / "b" / "grpo" / "seed-0").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(eg, "train_step", real_step)
    resumed, done = study(tiny_path, tmp_path / "b", steps=4, seeds=1)
    assert done["resumed"] == 1 and done["trained"] == 1  # GRPO resumed from step 2, EDGE-GRPO trained
    for a, b in zip(straight["runs"], resumed["runs"]):
        for key in ("heldout_avg_at_k", "heldout_greedy", "adv_var", "entropy_final", "collapsed_after_gec"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_the_new_arms_run_end_to_end_and_the_table_compares_with_sft(tiny_path, tmp_path):
    """SFT, SFT then GRPO, SFT then EDGE-GRPO and the on-policy guidance arm, 2 steps each: their
    objectives per step, GEC's branches, and the table's columns."""
    out = tmp_path / "study"
    results, _ = replicate.main(["--arms", "sft", "edge-grpo-on-policy-guidance", "--seeds", "1", "--model", tiny_path,
                                 "--max-steps", "2", "--eval-limit", "2", "--eval-max-new-tokens", "4",
                                 "--eval-samples", "2", "--output-dir", str(out), "--", *TINY_RUN])
    objectives = {slug: [json.loads(line)["objective"] for line in (out / slug / "seed-0" / "metrics.jsonl").open()]
                  for slug in ("sft", "sft-then-grpo", "sft-then-edge-grpo", "edge-grpo-on-policy-guidance")}
    assert objectives == {"sft": ["sft", "sft"], "sft-then-grpo": ["sft", "rl"], "sft-then-edge-grpo": ["sft", "rl"],
                          "edge-grpo-on-policy-guidance": ["rl", "rl"]}
    guided = [json.loads(line) for line in (out / "edge-grpo-on-policy-guidance" / "seed-0" / "metrics.jsonl").open()]
    assert all(m["gec_actions"]["answer"] == m["gec_actions"]["solution"] == 0 for m in guided)
    assert sum(m["gec_actions"]["prefix"] for m in guided) > 0
    assert all(m["loss_tokens_by_source"]["prefix"] == 0 for m in guided)  # never trained
    sft = next(r for r in results["runs"] if r["arm"] == "SFT")
    assert sft["sft_steps"] == 2 and sft["inserted_share"] == 1.0 and sft["adv_var"] is None
    assert set(results["comparisons"]["EDGE-GRPO, on-policy guidance"]) == {
        "avg_at_k_vs_grpo", "pass_at_k_vs_grpo", "greedy_vs_grpo", "avg_at_k_vs_sft", "greedy_vs_sft"}
    table = (out / "table.md").read_text()
    assert "| SFT, then EDGE-GRPO | 1 |" in table and "Δ avg@2 vs SFT" in table and "pass@2" in table


def test_headline_seeds_run_more_seeds_for_the_headline_arms_only():
    opts, _ = replicate.parse_args(["--arms", "all", "--seeds", "3", "--headline-seeds", "5"])
    arms = replicate.chosen_arms(opts.arms)
    plan = replicate.study_plan(arms, opts)
    assert len(arms) == 13 and len(plan) == 13 * 3 + 4 * 2
    assert [label for seed, label in plan if seed >= 3] == ["GRPO", "EDGE-GRPO",
                                                            "EDGE-GRPO, on-policy guidance", "SFT"] * 2
    assert replicate.arm_flags(replicate.SFT_ARMS["SFT, then GRPO"], 16) == ["--sft-steps", "8", "--no-gec", "--no-eda"]


def test_a_study_rerun_with_other_settings_is_refused_or_redone(tiny_path, tmp_path):
    """The cache is keyed by what was measured: another --max-steps or other flags after -- are refused
    naming the difference, nothing touched; --redo trains and evaluates those runs again."""
    out = tmp_path / "study"
    study(tiny_path, out, seeds=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(SystemExit, match=r"other settings than this study's .*--max-steps 2 -> 3.*--redo"):
        study(tiny_path, out, steps=3, seeds=1)
    with pytest.raises(SystemExit, match=r"--learning-rate 0.001 -> 0.01"):
        replicate.main(["--arms", "grpo", "edge-grpo", "--seeds", "1", "--model", tiny_path, "--max-steps", "2",
                        "--eval-limit", "3", "--eval-max-new-tokens", "5", "--eval-samples", "2",
                        "--output-dir", str(out), "--", *TINY_RUN[:8], "--learning-rate", "1e-2", *TINY_RUN[10:]])
    with pytest.raises(SystemExit, match=r"eval samples 2 -> 3"):
        study(tiny_path, out, "--eval-samples", "3", seeds=1)
    assert {p: p.read_bytes() for p in before} == before
    results, done = study(tiny_path, out, "--redo", steps=3, seeds=1)
    assert done["trained"] == 2 and all(r["steps"] == 3 for r in results["runs"])
