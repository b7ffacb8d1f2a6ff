"""edge_grpo.py: the math on hand-made tensors, accumulation, end-to-end steps, resume, bad input.
Run: python -m pytest tests/test_edge_grpo.py"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edge_grpo as eg
from reward import reward
from rollout import build_prompt, guided_error_correction, sample_rollout
from tests.tiny import tiny_model, tiny_tokenizer


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_hand_table():
    rewards = torch.tensor([2.0, 1.0, 1.0, 0.0,   1.0, 1.0, 1.0, 1.0,   2.0, 0.0, 0.0, 0.0])
    A = eg.group_advantages(rewards, G=4)
    # group 1: mean 1, sample std sqrt((1 + 0 + 0 + 1) / 3) = 0.816497; 1 / (0.816497 + 1e-4) = 1.224595
    # group 2: all equal -> exactly 0
    # group 3: mean 0.5, sample std sqrt((2.25 + 3 * 0.25) / 3) = 1.0; 1.5 / 1.0001 = 1.499850, -0.5 / 1.0001 = -0.499950
    expected = [1.224595, 0, 0, -1.224595, 0, 0, 0, 0, 1.499850, -0.499950, -0.499950, -0.499950]
    assert torch.allclose(A, torch.tensor(expected), atol=1e-5)
    assert (A[4:8] == 0).all()


def test_mean_only_advantages_and_no_nan():
    A = eg.group_advantages(torch.tensor([2.0, 0.0, 0.0, 0.0]), G=4, scale=False)
    assert A.tolist() == [1.5, -0.5, -0.5, -0.5]
    assert not torch.isnan(eg.group_advantages(torch.zeros(8), G=8)).any()


def test_eda_hand_table():
    A = torch.tensor([1.2, -1.2, 0.5, -0.5])
    H = torch.tensor([0.5, 1.0, 2.0, 0.5])  # group mean 1.0 -> scales 2, 1, 0.5, 2
    assert torch.allclose(eg.entropy_driven_advantages(A, H, G=4), torch.tensor([2.4, -1.2, 0.25, -1.0]))
    # per group: the second group's mean is its own (0.25 + 0.75) / 2 = 0.5 -> scales 2, 2/3
    A2, H2 = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 3.0, 0.25, 0.75])
    assert torch.allclose(eg.entropy_driven_advantages(A2, H2, G=2), torch.tensor([2.0, -2 / 3, 2.0, -2 / 3]))


def test_eda_guards_near_zero_entropy():
    A, H = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    guarded = eg.entropy_driven_advantages(A, H, G=4)
    assert torch.isfinite(guarded).all()
    assert guarded[0] == eg.EDA_SCALE_RANGE[1]  # mean(H)/H_0 = 0.75/1e-6, clamped to 10
    assert torch.allclose(guarded[1:], torch.tensor([-0.75, 0.75, -0.75]))
    assert torch.isfinite(eg.entropy_driven_advantages(A, torch.zeros(4), G=4)).all()  # all-zero group: scale 1


def test_masked_mean_and_token_weights():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert eg.masked_mean(x, mask).tolist() == [1.5, 5.0, 0.0]
    w = eg.token_weights(mask, "grpo", max_completion_length=4)
    assert torch.allclose(w, torch.tensor([[1 / 6, 1 / 6, 0], [1 / 9, 1 / 9, 1 / 9], [0, 0, 0]]))
    assert torch.allclose(eg.token_weights(mask, "bnpo", 4), mask / 5.0)
    assert torch.allclose(eg.token_weights(mask, "dr_grpo", 4), mask / 12.0)


def test_clipped_policy_loss_hand_table():
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [1.1]]))
    A = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipped = eg.clipped_policy_loss(logp, old, A, eps_low=0.2, eps_high=0.2)
    # ratio 1.5, A=1: min(1.5, 1.2) = 1.2 clipped;  ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5 unclipped
    # ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 clipped;  ratio 1.1, A=2: inside the range, 2.2
    assert torch.allclose(loss.squeeze(1), torch.tensor([-1.2, 1.5, 0.8, -2.2]))
    assert clipped.squeeze(1).tolist() == [True, False, True, False]
    loss_high, _ = eg.clipped_policy_loss(logp, old, A, eps_low=0.2, eps_high=0.28)  # DAPO-style upper bound
    assert math.isclose(loss_high[0, 0].item(), -1.28, rel_tol=1e-6)


def test_kl_k3():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    kl = eg.kl_k3(logp, ref)
    assert kl[0, 0] == 0 and math.isclose(kl[0, 1].item(), 2 - math.log(2) - 1, rel_tol=1e-6)


def test_fig5_quantities():
    assert eg.zero_std_fraction(torch.tensor([1.0, 1, 2, 1, 0, 0]), G=2) == pytest.approx(2 / 3)
    A = torch.tensor([1.0, -1.0, 0.0, 0.0])
    assert eg.group_variance(A, G=2) == pytest.approx(1.0)  # (2 + 0) / 2


# ----------------------------------------------------------------------------- the update

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def args_for(tmp_path, *extra):
    return eg.parse_args(["--model", "tiny", "--output-dir", str(tmp_path), "--num-generations", "4",
                          "--prompts-per-step", "2", "--max-completion-length", "12", "--gec-reflection-tokens", "6",
                          "--learning-rate", "1e-3", "--temperature", "1.0", "--log-completions-steps", "0", *extra])


def mixed_rollout(model, tok, seed=0):
    """A rollout after GEC: the tiny model answers wrong, GEC makes groups mixed."""
    prompts = [build_prompt(tok, "What is 1+1?"), build_prompt(tok, "Compute 12*3.")]
    first = sample_rollout(model, tok, prompts, ["2", "36"], group_size=4, max_new_tokens=12, seed=seed)
    return guided_error_correction(model, tok, first, ["2", "36"], ["1+1=\\boxed{2}", None], seed=seed + 1,
                                   reflection_tokens=6)


def update_delta(tok, rollout, args):
    """Parameter change of one update with SGD(lr=1): exactly minus the (accumulated) gradient."""
    model = tiny_model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = eg.policy_update(model, None, optimizer, eg.make_scheduler(optimizer, args), rollout, args)
    return [b - p.detach() for b, p in zip(before, model.parameters())], metrics


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("eda", ["--eda", "--no-eda"])
def test_accumulation_equals_full_batch(tok, tmp_path, loss_type, eda):
    """Not for --authors-eda: their H_i averages over the padded width of the (micro-)batch, so their
    gradient depends on how rows are batched, as it does on their per-device batch."""
    rollout = mixed_rollout(tiny_model(tok), tok)
    assert len(set(rollout.rewards.tolist())) > 1
    common = ("--loss-type", loss_type, eda, "--max-grad-norm", "0")
    full, m_full = update_delta(tok, rollout, args_for(tmp_path, "--micro-batch-size", "8", *common))
    for size in ["4", "3", "1"]:  # 3 and 1 split groups: EDA then reads H_i from the no-grad pass
        micro, m_micro = update_delta(tok, rollout, args_for(tmp_path, "--micro-batch-size", size, *common))
        assert sum(d.abs().sum() for d in full) > 0
        for a, b in zip(full, micro):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert m_micro["adv_var"] == pytest.approx(m_full["adv_var"], rel=1e-5)


def test_eda_changes_the_gradient_and_authors_eda_differs(tok, tmp_path):
    rollout = mixed_rollout(tiny_model(tok), tok)
    plain, _ = update_delta(tok, rollout, args_for(tmp_path, "--no-eda", "--max-grad-norm", "0"))
    eda, _ = update_delta(tok, rollout, args_for(tmp_path, "--eda", "--max-grad-norm", "0"))
    authors, _ = update_delta(tok, rollout, args_for(tmp_path, "--authors-eda", "--max-grad-norm", "0"))
    assert not all(torch.allclose(a, b) for a, b in zip(plain, eda))
    assert not all(torch.allclose(a, b) for a, b in zip(eda, authors))


def test_masking_inserted_tokens_changes_the_loss_mask(tok, tmp_path):
    rollout = mixed_rollout(tiny_model(tok), tok)
    assert (rollout.sampled_mask < rollout.completion_mask).any()
    trained, _ = update_delta(tok, rollout, args_for(tmp_path, "--max-grad-norm", "0"))
    masked, _ = update_delta(tok, rollout, args_for(tmp_path, "--max-grad-norm", "0", "--inserted-tokens", "mask"))
    assert not all(torch.allclose(a, b) for a, b in zip(trained, masked))


def test_num_iterations_runs_the_old_logprob_pass_and_clips(tok, tmp_path):
    rollout = mixed_rollout(tiny_model(tok), tok)
    args = args_for(tmp_path, "--num-iterations", "3", "--learning-rate", "0.5")
    model = tiny_model(tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    m = eg.policy_update(model, None, optimizer, eg.make_scheduler(optimizer, args), rollout, args)
    assert m["clip_fraction"] > 0  # updates 2 and 3 move the ratio away from 1
    assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float))


def test_flat_buffer_adamw_steps_like_plain_adamw(tok, tmp_path):
    """make_optimizer's AdamW (gradients and both moments as views of three flat buffers, zeroed in
    place) against torch's AdamW with its own per-parameter tensors: three updates on the same
    rollout give the same weights. The buffers outlive the updates."""
    rollout = mixed_rollout(tiny_model(tok), tok)
    args = args_for(tmp_path, "--learning-rate", "1e-2", "--weight-decay", "0.1")
    models = [tiny_model(tok), tiny_model(tok)]
    flat = eg.make_optimizer(models[0], args, torch.device("cpu"))
    plain = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    grad_storage = next(models[0].parameters()).grad.untyped_storage().data_ptr()
    for _ in range(3):
        for model, optimizer in zip(models, (flat, plain)):
            eg.policy_update(model, None, optimizer, eg.make_scheduler(optimizer, args), rollout, args)
    params = [list(m.parameters()) for m in models]
    assert all(p.grad.untyped_storage().data_ptr() == grad_storage for p in params[0])
    assert all(flat.state[p]["exp_avg"].untyped_storage().data_ptr() == flat.state[params[0][0]]["exp_avg"].untyped_storage().data_ptr()
               for p in params[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*params))
    assert sum((a - b).abs().sum() for a, b in zip(params[0], tiny_model(tok).parameters())) > 1e-3  # it moved


def test_kl_to_reference_is_zero_at_the_start(tok, tmp_path):
    rollout = mixed_rollout(tiny_model(tok), tok)
    args = args_for(tmp_path, "--beta", "0.1")
    model = tiny_model(tok)
    reference = tiny_model(tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    m = eg.policy_update(model, reference, optimizer, eg.make_scheduler(optimizer, args), rollout, args)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- end to end

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROBLEMS = [dict(problem=f"What is {a} + {b}?", answer=str(a + b), solution=f"{a}+{b}=\\boxed{{{a + b}}}")
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


def run(tmp_path, tok, *extra, model=None):
    tmp_path.mkdir(parents=True)
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    args = args_for(tmp_path / "out", "--data", str(data), "--max-steps", "2", *extra)
    model = model or tiny_model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    history = eg.train(args, model=model, tokenizer=tok, progress=False)
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return history, changed, args


def test_two_steps_change_weights_only_when_advantages_are_nonzero(tok, tmp_path):
    history, changed, _ = run(tmp_path / "vanilla", tok, "--no-gec", "--no-eda")
    assert all(m["zero_std_after_gec"] == 1.0 for m in history)  # a random tiny model never answers right
    assert not changed
    history, changed, args = run(tmp_path / "edge", tok)
    assert any(m["zero_std_after_gec"] < 1.0 for m in history) and changed
    lines = (tmp_path / "edge" / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    for key in ("reward", "accuracy", "zero_std_before_gec", "zero_std_after_gec", "gec_actions", "adv_var",
                "adv_var_before_eda", "entropy", "entropy_correct", "entropy_wrong", "completion_length",
                "truncation_rate", "clip_fraction", "kl", "grad_norm", "learning_rate", "seconds_generation",
                "seconds_gec", "seconds_update", "tokens_per_second", "peak_memory_mb"):
        assert key in json.loads(lines[-1]), key
    checkpoint = tmp_path / "edge" / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "run_config.json").is_file()
    assert not list((tmp_path / "edge" / "out").glob(".checkpoint-*"))  # no temporary dir left behind


def test_resume_matches_an_uninterrupted_run(tok, tmp_path):
    """4 steps straight vs 2 steps, a checkpoint, and a resumed run of steps 3-4 in a new process-like
    setting (model and tokenizer reloaded from the checkpoint): same metrics, same final weights."""
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--max-steps", "4", "--lr-scheduler-type", "linear"]
    straight = tiny_model(tok)
    full = eg.train(args_for(tmp_path / "a", *common), model=straight, tokenizer=tok, progress=False)
    eg.train(args_for(tmp_path / "b", *common, "--save-steps", "2"), model=tiny_model(tok), tokenizer=tok, progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-2"), "--output-dir", str(tmp_path / "c")])
    assert resume_args.max_steps == 4 and resume_args.data == str(data)  # the saved config is the default
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32, weights=resume_args.resume)
    resumed = eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("reward", "loss", "grad_norm", "entropy", "learning_rate"):
        for a, b in zip(full[2:], resumed):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for p, q in zip(straight.parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--num-generations", "1"], "--num-generations 1"),
    (["--no-gec", "--forced-reflection"], "--forced-reflection"),
    (["--no-eda", "--authors-eda"], "--authors-eda"),
    (["--authors-eda", "--num-generations", "8", "--micro-batch-size", "4"], "multiple of G"),
    (["--top-p", "0"], "--top-p"),
    (["--max-steps", "0"], "--max-steps"),
    (["--resume", "/nonexistent"], "run_config.json"),
])
def test_contradictory_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        eg.parse_args(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("content, message", [
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"\n', "data.jsonl:2: not valid JSON"),
    ('{"problem": "a", "answer": "1"}\n\n{"problem": "b"}\n', "data.jsonl:3: missing 'answer'"),
    ('{"answer": "1"}\n', "data.jsonl:1: missing 'problem'"),
    ('[{"problem": "a", "answer": "1"}, 5]', "item 1: expected an object"),
    ('[{"problem": "a", "answer": "1"},\n {"problem": }]', "data.jsonl:2: not valid JSON"),
    ("", "the file is empty"),
    ("[]", "no problems"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        eg.load_problems(path)
    assert message in str(e.value)


def test_bad_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(eg, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded before data check"))
    args = eg.parse_args(["--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        eg.train(args, progress=False)


def test_aliases_bring_settings_and_flags_override():
    qwen = eg.parse_args(["--model", "qwen2.5-math-1.5b"])
    assert (qwen.learning_rate, qwen.temperature, qwen.num_generations, qwen.max_completion_length) == (1e-6, 0.6, 8, 1024)
    assert eg.parse_args(["--model", "qwen2.5-math-1.5b", "--learning-rate", "2e-6"]).learning_rate == 2e-6
    assert eg.parse_args([]).model == "smollm2-135m"
    assert eg.arm_name(eg.parse_args(["--no-gec", "--no-eda"])) == "GRPO"
    assert eg.arm_name(eg.parse_args(["--forced-reflection", "--no-eda"])) == "forced reflection"
    assert eg.arm_name(eg.parse_args([])) == "EDGE-GRPO"


def test_paper_alias_without_data_says_where_to_get_it():
    with pytest.raises(SystemExit, match="deepscaler_hard-1k.json"):
        eg.load_training_data(eg.parse_args(["--model", "qwen2.5-math-7b"]))


def test_builtin_problems_have_correct_boxed_solutions():
    rows = eg.arithmetic_problems()
    assert len(rows) == 500 and all(reward(r["solution"], r["answer"]) == 2.0 for r in rows)


def test_data_order_is_a_fixed_permutation_per_epoch():
    rows = list(range(5))
    first, position = eg.next_prompts(rows, 0, 5, seed=3)
    again, _ = eg.next_prompts(rows, 0, 5, seed=3)
    second, _ = eg.next_prompts(rows, position, 5, seed=3)
    assert sorted(first) == rows and first == again and sorted(second) == rows


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_freed_blocks_and_returns_big_ones():
    """First a 64 MB tensor in a fresh process: the heap has no room for it, so it is mapped on its own
    and handed back when freed, with either setting (with mmap off, as this project first did, the
    heap grew by 64 MB for good). Then 100 MB of 4 MB tensors freed, and 5 rounds of a 40 MB tensor
    allocated, filled and freed, page faults counted: glibc's defaults map every block over 32 MB
    afresh (~10,000 faults per round); with keep_freed_memory it comes from the freed memory (none).
    Each side in its own process: the setting is process-wide."""
    script = ("import resource, sys, torch, edge_grpo\n"
              "if sys.argv[1] == 'keep': assert edge_grpo.keep_freed_memory()\n"
              "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
              "before = rss(); big = torch.ones(2**24); during = rss(); del big; after = rss()\n"
              "blocks = [torch.ones(2**20) for _ in range(25)]; del blocks\n"
              "start = faults()\n"
              "for _ in range(5): torch.ones(10 * 2**20)\n"
              "print(faults() - start, during - before, after - before)\n")
    root = Path(__file__).resolve().parents[1]
    runs = {mode: subprocess.Popen([sys.executable, "-c", script, mode], cwd=root, stdout=subprocess.PIPE, text=True)
            for mode in ("default", "keep")}  # both at once
    results = {mode: [int(x) for x in run.communicate()[0].split()[-3:]] for mode, run in runs.items()}
    (default_faults, _, _), (keep_faults, grew, kept) = results["default"], results["keep"]
    assert default_faults > 5 * 8_000 and keep_faults < 1_000, results
    assert grew >= 60 and kept < 8, results  # MB: the 64 MB block was resident, then handed back
