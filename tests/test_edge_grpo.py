"""edge_grpo.py: the math on hand-made tensors, accumulation, end-to-end steps, resume, bad input.
Run: python -m pytest tests/test_edge_grpo.py"""

import json
import math
from pathlib import Path

import pytest
import torch

import cli
import data
import edge_grpo as eg
import optim
from rollout import build_prompt, guided_error_correction, rollout_from_texts, sample_rollout
from tests.tiny import tiny_model


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_hand_table():
    rewards = torch.tensor([2.0, 1.0, 1.0, 0.0,   1.0, 1.0, 1.0, 1.0,   2.0, 0.0, 0.0, 0.0])
    A = eg.group_advantages(rewards, G=4)
    # group 1: mean 1, sample std sqrt((1 + 0 + 0 + 1) / 3) = 0.816497; 1 / (0.816497 + 1e-4) = 1.224595
    # group 2: all equal -> exactly 0
    # group 3: mean 0.5, sample std sqrt((2.25 + 3 * 0.25) / 3) = 1.0;
    # 1.5 / 1.0001 = 1.499850, -0.5 / 1.0001 = -0.499950
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
    one_batch = [[0, 1, 2]]
    w = eg.token_weights(mask, "grpo", 4, one_batch)
    assert torch.allclose(w, torch.tensor([[1 / 6, 1 / 6, 0], [1 / 9, 1 / 9, 1 / 9], [0, 0, 0]]))
    assert torch.allclose(eg.token_weights(mask, "dapo", 4, one_batch), mask / 5.0)
    assert torch.allclose(eg.token_weights(mask, "bnpo", 4, one_batch), mask / 5.0)  # one micro-batch: the same
    assert torch.allclose(eg.token_weights(mask, "dr_grpo", 4, one_batch), mask / 12.0)


def test_bnpo_is_a_token_mean_per_micro_batch_as_in_trl():
    """TRL's bnpo: each micro-batch's loss is its token sum / its token count, divided by the number
    of micro-batches (gradient accumulation steps). Rows 0-1 hold 2 + 3 tokens, rows 2-3 hold 1 + 4."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    w = eg.token_weights(mask, "bnpo", 4, [[0, 1], [2, 3]])
    assert torch.allclose(w, torch.cat([mask[:2] / 5 / 2, mask[2:] / 5 / 2]).float())
    w = eg.token_weights(mask, "bnpo", 4, [[0], [1, 2], [3]])  # another micro-batching, another loss (as TRL's)
    assert torch.allclose(w, torch.cat([mask[:1] / 2 / 3, mask[1:3] / 4 / 3, mask[3:] / 4 / 3]).float())
    assert torch.allclose(eg.token_weights(mask, "dapo", 4, [[0, 1], [2, 3]]), mask / 10.0)  # the step's token mean


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

def args_for(tmp_path, *extra):
    return eg.parse_args(["--model", "tiny", "--output-dir", str(tmp_path), "--num-generations", "4",
                          "--prompts-per-step", "2", "--max-completion-length", "12", "--gec-reflection-tokens", "6",
                          "--learning-rate", "1e-3", "--temperature", "1.0", "--log-completions-steps", "0", *extra])


def mixed_rollout(model, tok, seed=0):
    """A rollout after GEC: the tiny model answers wrong, GEC makes groups mixed."""
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("eda", ["--eda", "--no-eda"])
def test_accumulation_equals_full_batch(tok, tmp_path, loss_type, eda):
    """Not for bnpo, whose loss is defined per micro-batch (as TRL's), so it depends on the micro-batching."""
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
    storage = lambda p: flat.state[p]["exp_avg"].untyped_storage().data_ptr()
    assert all(storage(p) == storage(params[0][0]) for p in params[0])
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


# ----------------------------------------------------------------------------- bad input

def test_bad_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(eg, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded before data check"))
    args = eg.parse_args(["--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        eg.train(args, progress=False)


def test_paper_alias_without_data_says_where_to_get_it():
    with pytest.raises(SystemExit, match="deepscaler_hard-1k.json"):
        eg.load_training_data(eg.parse_args(["--model", "qwen2.5-math-7b"]))


# ----------------------------------------------------------------------------- the paper's run as typed (issue 12)

def test_one_prompt_per_step_prints_samples(tok, tmp_path, capsys):
    """The paper's setting, one prompt per step, with samples printed every step (it used to ask for
    row 1 x G of a G-row rollout)."""
    history, _, _ = run(tmp_path / "p1", tok, "--prompts-per-step", "1", "--log-completions-steps", "1")
    assert len(history) == 2
    out = capsys.readouterr().out
    assert out.count("samples:") == 2 and out.count("What is") >= 2


def test_token_entropies_leave_the_device_only_on_logged_steps(tok, tmp_path):
    """H_t per token is returned (for completions.jsonl) on the steps --log-completions-steps logs, and
    equals a separate no-grad pass of the same policy over the same rows; other steps skip the copy."""
    args = args_for(tmp_path, "--log-completions-steps", "2", "--num-iterations", "1")
    problems = [dict(problem="What is 1+1?", answer="2", solution="1+1=\\boxed{2}"),
                dict(problem="Compute 12*3.", answer="36", solution=None)]
    model = tiny_model(tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the policy stays as it was sampled
    scheduler = eg.make_scheduler(optimizer, args)
    assert [eg.logs_completions(args, n) for n in (1, 2, 3, 4)] == [False, True, False, True]
    _, quiet, _ = eg.train_step(model, None, tok, optimizer, scheduler, problems, 0, args)  # step 1: not logged
    _, logged, _ = eg.train_step(model, None, tok, optimizer, scheduler, problems, 1, args)  # step 2: logged
    assert quiet["H_t"] is None
    r = logged["rollout"]
    with torch.no_grad():
        _, H_t = eg.token_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask, 1.0)
    mask = r.completion_mask.bool()
    assert logged["H_t"].shape == mask.shape and torch.allclose(logged["H_t"][mask], H_t[mask], atol=1e-5)
    assert (logged["H_t"][~mask] == 0).all()


def test_warmup_and_linear_decay_are_hugging_faces():
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
    for warmup, total in [(0, 10), (3, 10), (4, 4)]:
        for kind, make in [("linear", lambda o: get_linear_schedule_with_warmup(o, warmup, total)),
                           ("constant", lambda o: get_constant_schedule_with_warmup(o, warmup))]:
            hf = make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
            expected = [hf.lr_lambdas[0](k) for k in range(total + 2)]
            assert [optim.lr_factor(k, total, warmup, kind) for k in range(total + 2)] == pytest.approx(expected)
    assert optim.lr_factor(0, 10, 3, "linear") == 0.0 and optim.lr_factor(1, 10, 3, "linear") == pytest.approx(1 / 3)


def test_a_changed_max_steps_continues_the_decay_from_where_it_was():
    # 8 updates planned, checkpoint after 4 (factor 0.5), resumed with 12: from 0.5 at update 4 to 0 at 12
    anchor = (4, optim.lr_factor(4, 8, 0, "linear"))
    assert anchor[1] == 0.5
    assert [optim.lr_factor(k, 12, 0, "linear", anchor) for k in (4, 6, 8, 11, 12)] == pytest.approx(
        [0.5, 0.5 * 6 / 8, 0.5 * 4 / 8, 0.5 * 1 / 8, 0.0])
    # before it: unused
    assert [optim.lr_factor(k, 12, 0, "linear", anchor) for k in (0, 3)] == pytest.approx([1.0, 9 / 12])


def test_resume_with_more_steps_has_no_jump_in_the_learning_rate(tok, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--lr-scheduler-type", "linear", "--learning-rate", "1e-3"]
    first = eg.train(args_for(tmp_path / "a", *common, "--max-steps", "4", "--save-steps", "2"), model=tiny_model(tok),
                     tokenizer=tok, progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "a" / "checkpoint-2"), "--max-steps", "6"])
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                   weights=resume_args.resume)
    resumed = eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    assert [m["step"] for m in resumed] == [3, 4, 5, 6]
    # step 3 ran at 1e-3 x (4 - 2) / 4 in the 4-step run; resumed, it starts there and falls to 0 after step 6
    assert first[2]["learning_rate"] == pytest.approx(5e-4)
    assert [m["learning_rate"] for m in resumed] == pytest.approx([5e-4, 5e-4 * 3 / 4, 5e-4 / 2, 5e-4 / 4])


def test_authors_eda_is_the_mean_over_the_rows_own_tokens(tok, tmp_path):
    """--authors-eda: H_i with its gradient, over the row's tokens only, so the gradient does not
    depend on the micro-batch (it did by ~31 % when padding entered the mean)."""
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    texts = ["\\boxed{2}", "no", "\\boxed{3}", "it is 2",  # short group, long group: padding would enter group 1
             "a long answer of many characters, \\boxed{36}", "short", "x", "\\boxed{35} and then some more words"]
    rollout = rollout_from_texts(tok, tiny_model(tok), prompts, texts, ["2", "36"], group_size=4)
    common = ("--authors-eda", "--max-grad-norm", "0")
    whole, _ = update_delta(tok, rollout, args_for(tmp_path, "--micro-batch-size", "8", *common))
    split, _ = update_delta(tok, rollout, args_for(tmp_path, "--micro-batch-size", "4", *common))
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    entropy = torch.tensor([[0.5, 1.5, 9.0], [2.0, 9.0, 9.0]], requires_grad=True)
    H = eg.response_entropy(entropy, torch.tensor([[1, 1, 0], [1, 0, 0]]), authors_eda=True)
    assert H.tolist() == [1.0, 2.0] and H.requires_grad  # padding (9.0) left out, gradient kept
    assert "floored" in cli.build_parser().format_help().replace("\n", " ")  # the help says what the code does


def test_prompt_format_is_decided_once_and_saved_with_the_checkpoint(tok, tmp_path):
    assert eg.parse_args(["--model", "qwen2.5-math-1.5b"]).prompt_format == "bare"
    assert eg.parse_args(["--model", "Qwen/Qwen2.5-Math-7B"]).prompt_format == "bare"
    assert eg.parse_args([]).prompt_format == "step-by-step"
    _, _, args = run(tmp_path / "r", tok, "--prompt-format", "bare")
    checkpoint = Path(args.output_dir) / "checkpoint-2"
    assert json.loads((checkpoint / "run_config.json").read_text())["prompt_format"] == "bare"
    assert eg.prompt_format_of(str(checkpoint)) == "bare"  # a checkpoint's name says nothing of its family
    assert eg.parse_args(["--resume", str(checkpoint)]).prompt_format == "bare"
    assert eg.prompt_format_of(str(checkpoint), "step-by-step") == "step-by-step"


def test_the_paper_alias_trains_on_the_fetched_paper_data(tmp_path, monkeypatch):
    args = eg.parse_args(["--model", "qwen2.5-math-1.5b"])
    assert args.data == "deepscaler_hard-1k"
    monkeypatch.setenv("EDGE_GRPO_CACHE", str(tmp_path))  # empty cache, and no network in tests: a clear error
    monkeypatch.setitem(data.PAPER_DATA, "deepscaler_hard-1k",
                        dict(data.PAPER_DATA["deepscaler_hard-1k"], url=(tmp_path / "offline.json").as_uri()))
    with pytest.raises(SystemExit, match="could not download deepscaler_hard-1k.*--data PATH"):
        eg.load_training_data(args)


# ----------------------------------------------------------------------------- GRPO-family variants


def test_gspo_sequence_ratio_hand_table():
    """GSPO: each response's tokens share s_i = exp(mean_t log-ratio) over its own tokens, clipped as a
    whole. Row 0: log-ratios 0.1, -0.3 -> s = e^-0.1 = 0.904837, inside [0.8, 1.2]: loss -0.904837 x A = 1
    on both tokens. Row 1: one real token, log-ratio 0.5 (the padded 9.0 does not count) -> s = e^0.5 =
    1.648721, A = 1 > 0: clipped to 1.2. The token-level ratio (e^0.1, e^-0.3) would fail row 0."""
    logp = torch.tensor([[0.1, -0.3], [0.5, 9.0]])
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipped = eg.clipped_policy_loss(logp, old, torch.tensor([1.0, 1.0]), 0.2, 0.2, sequence_mask=mask)
    assert torch.allclose(loss[0], torch.tensor([-0.904837, -0.904837]), atol=1e-6)
    assert loss[1, 0].item() == pytest.approx(-1.2) and clipped[1, 0] and not clipped[0].any()
    assert torch.allclose(eg.sequence_log_ratio(logp, old, mask), torch.tensor([[-0.1], [0.5]]))


def test_forking_tokens_hand_table():
    """The top 25 % of 8 real tokens by entropy are 2 tokens: entropies 0.1 .. 0.8, quantile 0.75 of
    them is 0.625 (linear interpolation), so 0.7 and 0.8 train; padding never does; 1.0 keeps all."""
    H = torch.tensor([[0.1, 0.8, 0.3, 0.5, 5.0], [0.7, 0.2, 0.6, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    kept = eg.high_entropy_tokens(H, mask, 0.25)
    assert kept.tolist() == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert torch.equal(eg.high_entropy_tokens(H, mask, 1.0), mask.float())


def test_entropy_band_hand_table():
    """The same 8 real tokens (0.1 .. 0.8): their 0.25 and 0.75 quantiles are 0.275 and 0.625, so the
    band keeps 0.3, 0.4, 0.5, 0.6; padding (5.0, 9.0) never counts, in the band or in its quantiles;
    the band (0.75, 1) is the top 25 %."""
    H = torch.tensor([[0.1, 0.8, 0.3, 0.5, 5.0], [0.7, 0.2, 0.6, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert eg.entropy_band_tokens(H, mask, 0.25, 0.75).tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert torch.equal(eg.entropy_band_tokens(H, mask, 0.75, 1.0), eg.high_entropy_tokens(H, mask, 0.25))


def test_seed_grpo_semantic_entropy_hand_table():
    """Groups of G = 4 answers, clustered by reward.py's exact match (1/2 = \\frac{1}{2}, 2 = 2.0), a
    response without a boxed answer a cluster of its own:
      all one answer      p = (1)               SE = 0                      scale 1
      1, 1, 3, no box     p = (.5, .25, .25)    SE = 1.5 ln 2 = 1.039721    scale 1 / (1 + a 0.75) = 0.969673
      no box, no box, 5, 5                      SE = 1.039721 (the two unboxed are two clusters, not one)
      four answers        p = (.25 x 4)         SE = ln 4 = 1.386294        scale 1 / (1 + a) = 0.959969
    with a = 0.0417 and SE_max = ln 4."""
    texts = ["\\boxed{1/2}", "so \\boxed{\\frac{1}{2}}", "\\boxed{ 1/2 }", "\\boxed{\\frac12}",
             "\\boxed{1}", "\\boxed{1}", "\\boxed{3}", "I give up",
             "x", "y", "\\boxed{5}", "\\boxed{5.0}",
             "\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"]
    se = eg.semantic_entropy(texts, 4)
    assert se.tolist() == pytest.approx([0.0, 1.039721, 1.039721, 1.386294], abs=1e-6)
    assert eg.semantic_entropy_scale(se, 4, cli.SEED_GRPO_ALPHA).tolist() == pytest.approx([1.0, 0.969673, 0.969673,
                                                                                            0.959969], abs=1e-6)
    assert eg.answer_clusters(texts[4:8]) == [0, 0, 1, 2]


def test_seed_grpo_scales_the_advantages_of_the_step(tok, tmp_path):
    """The tiny model never boxes an answer, so every group's SE is ln G, the largest: with alpha 1 each
    advantage is halved, and the first step (the same rollout) shows a quarter of the variance."""
    plain, _, _ = run(tmp_path / "plain", tok)
    seed, changed, _ = run(tmp_path / "seed", tok, "--seed-grpo", "--seed-grpo-alpha", "1")
    assert changed and seed[0]["semantic_entropy"] == pytest.approx(math.log(4))
    assert seed[0]["adv_var_before_eda"] == pytest.approx(plain[0]["adv_var_before_eda"] / 4, rel=1e-6)
    assert plain[0]["adv_var_before_eda"] > 0


def test_dr_grpo_is_one_recipe_flag():
    args = eg.parse_args(["--dr-grpo"])
    assert args.loss_type == "dr_grpo" and not args.scale_rewards
    with pytest.raises(SystemExit, match="--dr-grpo"):
        eg.parse_args(["--dr-grpo", "--loss-type", "grpo"])


@pytest.mark.parametrize("flags", [["--dr-grpo"], ["--importance-sampling-level", "sequence"],
                                   ["--top-entropy-quantile", "0.2"], ["--epsilon-high", "0.28"],
                                   ["--entropy-band", "0.5", "0.9"], ["--seed-grpo"]])
def test_each_variant_runs_end_to_end(tok, tmp_path, flags):
    """Two steps with GEC and EDA and the variant; the weights move; forking tokens train about the
    top fifth of the tokens, the band 0.5-0.9 about two fifths (ties and small micro-batches round it)."""
    history, changed, _ = run(tmp_path / "run", tok, *flags)
    assert changed
    if "--top-entropy-quantile" in flags:
        assert all(0.1 < m["updated_fraction"] < 0.4 for m in history)
    elif "--entropy-band" in flags:
        assert all(0.25 < m["updated_fraction"] < 0.55 for m in history)
    else:
        assert all(m["updated_fraction"] == 1.0 for m in history)


def test_overlong_penalty_hand_table():
    """DAPO's soft overlong punishment at L_max = 20, buffer 4: lengths up to 16 get 0, then
    (16 - |y|) / 4: 17 -> -0.25, 18 -> -0.5, 20 -> -1; beyond 20 -> -1."""
    lengths = torch.tensor([5, 16, 17, 18, 20, 23])
    assert eg.overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_overlong_shaping_reaches_the_advantages(tok, tmp_path):
    """With --overlong-buffer the step's metric reports the mean penalty of the sampled lengths (the
    tiny model runs to the 12-token cap: -1 for every row), and the run trains end to end."""
    history, changed, _ = run(tmp_path / "run", tok, "--overlong-buffer", "4")
    assert all(m["overlong_penalty"] <= -0.5 for m in history) and changed


def fake_rollout(rewards, G=4, tag=0):
    """A Rollout with the given rewards (P x G), rows told apart by their one completion token."""
    from rollout import Rollout
    B = len(rewards)
    return Rollout(prompt_ids=torch.full((B, 2), 5), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                   completion_ids=torch.arange(B)[:, None] + 100 * tag,
                   completion_mask=torch.ones(B, 1, dtype=torch.long),
                   sampled_mask=torch.ones(B, 1, dtype=torch.long), inserted=torch.zeros(B, 1, dtype=torch.long),
                   truncated=torch.zeros(B, dtype=torch.bool), texts=[f"{tag}:{i}" for i in range(B)],
                   rewards=torch.tensor(rewards, dtype=torch.float), actions=["none"] * B, group_size=G)


def test_dynamic_sampling_keeps_mixed_groups_and_draws_fresh_prompts(tok, monkeypatch):
    """P = 2. First round: group 0 collapsed (all 0), group 1 mixed. Round 2 draws one fresh prompt
    whose group is collapsed (all 2); round 3 draws one more, mixed. The step trains on round 1's
    group 1 and round 3's group, in that order; 4 prompts drawn; each round's rows numbered on (first
    rows 8, 12)."""
    rounds = iter([fake_rollout([2, 2, 2, 2], tag=2), fake_rollout([0, 2, 2, 0], tag=3)])
    seen_rows = []

    def fake_sample_and_correct(model, tokenizer, problems, seed, args, first_row=0, clock=None):
        seen_rows.append(first_row)
        r = next(rounds)
        return r, r
    monkeypatch.setattr(eg, "sample_and_correct", fake_sample_and_correct)
    drawn_problems = iter([[{"problem": "p3"}], [{"problem": "p4"}]])
    first = fake_rollout([0, 0, 0, 0, 0, 2, 0, 0], tag=1)
    args = eg.parse_args(["--dynamic-sampling", "--num-generations", "4", "--max-sampling-rounds", "3"])
    sampled, rollout, problems, drawn, position = eg.dynamic_sampling(
        None, tok, first, first, [{"problem": "p1"}, {"problem": "p2"}], lambda position,
        n: (next(drawn_problems), position + n), 10, 0, args)
    assert drawn == 4 and [p["problem"] for p in problems] == ["p2", "p4"] and seen_rows == [8, 12] and position == 12
    assert rollout.texts == ["1:4", "1:5", "1:6", "1:7", "3:0", "3:1", "3:2", "3:3"]
    assert rollout.rewards.tolist() == [0, 2, 0, 0, 0, 2, 2, 0]
    assert eg.mixed_groups(rollout.rewards, 4) == [0, 1]


def test_dynamic_sampling_runs_end_to_end(tok, tmp_path):
    """Without GEC the tiny model's groups all score 0: every step draws P more prompts per round
    (2 + 2 x 2 = 6) and, finding no mixed group, trains on its first draw. With GEC the groups are
    mixed and the step trains on P of them."""
    history, _, _ = run(tmp_path / "no-gec", tok, "--no-gec", "--dynamic-sampling", "--max-sampling-rounds", "2")
    assert all(m["prompts_drawn"] == 6 and m["groups_trained"] == 2 for m in history)
    history, changed, _ = run(tmp_path / "gec", tok, "--dynamic-sampling")
    assert all(m["groups_trained"] == 2 and m["prompts_drawn"] >= 2 for m in history) and changed


def test_ngrpo_virtual_max_advantages_hand_table():
    """G = 4, maximum reward 2, one virtual response of reward 2 in each group's statistics.
    All wrong [0, 0, 0, 0]: mean 0.4, sample std sqrt(3.2 / 4) = 0.894427 -> every A = -0.447214 (GRPO: 0).
    One right [2, 0, 0, 0]: mean 0.8, std sqrt(4.8 / 4) = 1.095445 -> 1.095445, then -0.730297 three times.
    All right [2, 2, 2, 2]: std 0 -> 0. The recipe's clip is NGRPO's (0.16, 0.24) unless given."""
    rewards = torch.tensor([0.0, 0, 0, 0, 2, 0, 0, 0, 2, 2, 2, 2])
    A = eg.virtual_max_advantages(rewards, 4)
    expected = [-0.447214] * 4 + [1.095445] + [-0.730297] * 3 + [0.0] * 4
    assert torch.allclose(A, torch.tensor(expected), atol=1e-5)
    assert eg.group_advantages(rewards, 4)[:4].abs().sum() == 0  # what NGRPO changes
    args = eg.parse_args(["--ngrpo"])
    assert (args.epsilon, args.epsilon_high) == (0.16, 0.24)
    assert eg.parse_args(["--ngrpo", "--epsilon", "0.2"]).epsilon == 0.2


def test_ngrpo_learns_from_all_wrong_groups(tok, tmp_path):
    """Without GEC the tiny model's groups are all wrong: GRPO's weights do not move, NGRPO's do."""
    _, grpo_changed, _ = run(tmp_path / "grpo", tok, "--no-gec", "--no-eda")
    _, ngrpo_changed, _ = run(tmp_path / "ngrpo", tok, "--no-gec", "--no-eda", "--ngrpo")
    assert not grpo_changed and ngrpo_changed


# ----------------------------------------------------------------------------- supervised fine-tuning (--sft-steps)

def test_sft_loss_hand_table():
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # three solution tokens in the step
    assert eg.sft_loss(logp, mask / 3).item() == pytest.approx((1 + 2 + 0.5) / 3)  # the padded -5 counts nothing


def test_sft_step_gradient_is_the_token_mean_nll_of_the_solutions(tok, tmp_path, monkeypatch):
    """sft_step's summed micro-batch gradients (micro-batches of one row, the fast path) against an
    independent computation: each prompt + solution + EOS through the model once, cross-entropy of
    the solution tokens summed over both rows and divided by their total count."""
    problems = [dict(problem="What is 1 + 2?", answer="3", solution="1+2=\\boxed{3}"),
                dict(problem="What is 30 + 4?", answer="34", solution="We add: 30+4=34, so \\boxed{34}.")]
    args = args_for(tmp_path, "--micro-batch-size", "1")
    model = tiny_model(tok)
    captured = {}

    def keep_gradients(optimizer, scheduler, args, master_weights):
        captured["grads"] = [p.grad.detach().clone() for p in model.parameters()]
        return 1.0
    monkeypatch.setattr(eg, "optimizer_step", keep_gradients)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = eg.sft_step(model, tok, optimizer, eg.make_scheduler(optimizer, args), problems, 0, args)

    reference = tiny_model(tok)
    total, count = 0.0, 0
    for row in problems:
        prompt = tok(build_prompt(tok, row["problem"], args.prompt_format), add_special_tokens=False).input_ids
        solution = tok(row["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([prompt + solution])
        logits = reference(input_ids=ids).logits[0, len(prompt) - 1:-1]  # the positions that predict the solution
        total = total + torch.nn.functional.cross_entropy(logits.double(), torch.tensor(solution), reduction="sum")
        count += len(solution)
    (total / count).backward()
    assert metrics["objective"] == "sft" and metrics["loss_tokens"] == count and metrics["inserted_share"] == 1.0
    assert metrics["sft_nll"] == pytest.approx((total / count).item(), rel=1e-5)
    for ours, theirs in zip(captured["grads"], reference.parameters()):
        assert torch.allclose(ours, theirs.grad.float(), atol=2e-6, rtol=1e-4)


def test_sft_steps_switch_objective_at_k_and_resume_across_the_switch(tok, tmp_path, monkeypatch):
    """--sft-steps 2 of 4: steps 1-2 supervised (no sampling), 3-4 EDGE-GRPO. A run stopped during
    step 2 (K - 1 done, checkpoint-1) and resumed equals the uninterrupted one, weights and metrics."""
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    flags = ["--data", str(data), "--max-steps", "4", "--sft-steps", "2", "--save-steps", "1",
             "--save-total-limit", "0"]
    straight = tiny_model(tok)
    history = eg.train(args_for(tmp_path / "a", *flags), model=straight, tokenizer=tok, progress=False)
    assert [m["objective"] for m in history] == ["sft", "sft", "rl", "rl"]
    assert "reward" not in history[0] and "gec_actions" in history[2]
    # one linear decay over both
    assert [m["learning_rate"] for m in history] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])

    real = eg.sft_step

    def stops_in_step_2(*a, **kw):
        if a[5] == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(eg, "sft_step", stops_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        eg.train(args_for(tmp_path / "b", *flags), model=tiny_model(tok), tokenizer=tok, progress=False)
    monkeypatch.setattr(eg, "sft_step", real)
    from checkpoints import load_model_and_tokenizer
    model, _ = load_model_and_tokenizer(str(tmp_path / "b" / "checkpoint-1"), torch.device("cpu"), torch.float32)
    resumed = eg.train(eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-1")]), model=model, tokenizer=tok,
                       progress=False)
    assert [m["objective"] for m in resumed] == ["sft", "rl", "rl"]
    timeless = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds") and k not in
                              ("tokens_per_second", "peak_memory_mb")} for r in rows]
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert timeless(lines) == timeless(history)
    for p, q in zip(straight.parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_sft_steps_refuse_data_without_solutions_and_beyond_max_steps(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS[:2] + [dict(problem="What is 2 + 2?", answer="4")])
    with pytest.raises(SystemExit, match=r"1 of 3 problems .* have none \(the first: row 3\)"):
        eg.train(args_for(tmp_path / "out", "--data", str(data), "--max-steps", "2", "--sft-steps", "1"))
    with pytest.raises(SystemExit, match="--sft-steps must be between 0 and --max-steps"):
        args_for(tmp_path / "out", "--max-steps", "2", "--sft-steps", "3")
    assert cli.arm_name(args_for(tmp_path, "--max-steps", "4", "--sft-steps", "4")) == "SFT"
    assert cli.arm_name(args_for(tmp_path, "--max-steps", "4", "--sft-steps", "2", "--no-gec", "--no-eda")) == \
        "SFT, then GRPO"
    assert cli.arm_name(args_for(tmp_path, "--gec-branches", "reflection", "prefix")) == \
        "EDGE-GRPO (reflection + prefix)"


def test_what_each_step_trains_on_is_counted_by_source(tok, tmp_path):
    """loss_tokens_by_source against the rollout's own marks: every trained token counted once, GEC's
    inserted text by branch; --inserted-tokens mask leaves only the policy's own."""
    from rollout import TOKEN_SOURCES
    rollout = mixed_rollout(tiny_model(tok), tok)
    for mode in ("train", "mask"):
        _, metrics = update_delta(tok, rollout, args_for(tmp_path, "--inserted-tokens", mode))
        counts = metrics["loss_tokens_by_source"]
        assert set(counts) == set(TOKEN_SOURCES) and metrics["loss_tokens"] == sum(counts.values())
        inserted = int(((rollout.sampled_mask == 0) & (rollout.completion_mask == 1)).sum())
        assert counts["sampled"] == int(rollout.sampled_mask.sum())
        if mode == "train":
            assert metrics["loss_tokens"] == int(rollout.completion_mask.sum()) and inserted > 0
            assert counts["cue"] + counts["answer"] + counts["solution"] == inserted
            assert metrics["inserted_share"] == pytest.approx(inserted / metrics["loss_tokens"])
        else:
            assert metrics["inserted_share"] == 0.0 and metrics["loss_tokens"] == counts["sampled"]
