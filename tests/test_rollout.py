"""rollout.py on a tiny model: masks, seeding, log-probs and entropy, guided error correction.
Run: python -m pytest tests/test_rollout.py"""

import math
import warnings

import pytest
import torch

import fast
from reward import MAX_REWARD, reward
from rollout import rollout_from_texts as make_rollout
from rollout import (ANSWER_SENTENCE, GEC_MAX_PROMPT_TOKENS, REFLECTION_CUE, STEP_BY_STEP, Sampling,
                     build_prompt, choose_gec_actions, completion_mask_from_eos, generate, guided_error_correction,
                     sample_next_token, sample_rollout, sample_with_cache, shares_prompts, token_logprobs_and_entropy)
from checkpoints import default_prompt_format
from tests.tiny import qwen_tokenizer, sharpened, tiny_model, tiny_qwen2, tiny_tokenizer


def sample(model, tok, seed, temperature=1.0, G=4, max_new_tokens=16):
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    return sample_rollout(model, tok, prompts, ["2", "36"], group_size=G, max_new_tokens=max_new_tokens,
                          sampling=Sampling(temperature), seed=seed)


# ----------------------------------------------------------------------------- prompts

def test_prompt_families(tok):
    assert default_prompt_format("Qwen/Qwen2.5-Math-1.5B") == "bare"
    assert default_prompt_format("HuggingFaceTB/SmolLM2-135M") == "step-by-step"
    bare = build_prompt(tok, "2+2?", "bare")
    assert bare == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt(tok, "2+2?", "step-by-step") == \
        f"<|im_start|>user\n2+2?{STEP_BY_STEP}<|im_end|>\n<|im_start|>assistant\n"


def test_no_chat_template_falls_back_to_plain_text_with_a_warning():
    plain = tiny_tokenizer(chat_template=None)
    with pytest.warns(UserWarning, match="no chat template"):
        prompt = build_prompt(plain, "2+2?", "step-by-step")
    assert prompt == f"<|im_start|>Question: 2+2?{STEP_BY_STEP}\nAnswer:"


# ----------------------------------------------------------------------------- masks

def test_completion_mask_ends_at_first_eos_inclusive():
    EOS, OTHER_STOP, PAD = 2, 7, 2
    ids = torch.tensor([
        [EOS, PAD, PAD, PAD, PAD],      # stops at once: only the EOS is trained
        [5, 6, EOS, PAD, PAD],          # stops early
        [5, 6, 8, 9, EOS],              # stops on the last position
        [5, 6, 8, 9, 10],               # never stops: truncated
        [5, OTHER_STOP, 5, EOS, PAD],   # a second stop id (Qwen has two)
    ])
    mask, truncated = completion_mask_from_eos(ids, [EOS, OTHER_STOP])
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, False, True, False]


def test_rollout_masks_and_texts(model, tok):
    r = sample(model, tok, seed=3, G=4, max_new_tokens=24)
    B = 8
    assert r.prompt_ids.shape[0] == r.completion_ids.shape[0] == B and len(r.texts) == B
    mask, truncated = completion_mask_from_eos(r.completion_ids, [tok.eos_token_id])
    assert torch.equal(r.completion_mask, mask) and torch.equal(r.truncated, truncated)
    assert torch.equal(r.sampled_mask, r.completion_mask)
    assert r.actions == ["none"] * B
    for row in range(B):
        kept = r.completion_ids[row, :int(mask[row].sum())].tolist()
        assert r.texts[row] == tok.decode(kept, skip_special_tokens=True)
        assert r.rewards[row] == reward(r.texts[row], ["2", "36"][row // 4])
    # group structure: the G rows of a group share the prompt
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[3]) and not torch.equal(r.prompt_ids[3], r.prompt_ids[4])


# ----------------------------------------------------------------------------- seeding

def test_same_seed_same_samples_and_caller_rng_untouched(model, tok):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = sample(model, tok, seed=7), sample(model, tok, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    c = sample(model, tok, seed=8)
    assert not torch.equal(a.completion_ids[:, :c.completion_ids.shape[1]],
                           c.completion_ids[:, :a.completion_ids.shape[1]])


def test_greedy_is_the_same_for_any_seed(model, tok):
    a, b = sample(model, tok, seed=1, temperature=0), sample(model, tok, seed=999, temperature=0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    # and the G copies of a prompt are identical under greedy decoding
    assert torch.equal(a.completion_ids[0], a.completion_ids[3])


def test_greedy_decoding_equals_transformers_generate(model, tok):
    """Our decoding loop against model.generate on left-padded prompts of different lengths: the same
    tokens, including where rows stop and the padding after. The stop id is a token that the two
    prompts' rows first produce at different steps, so rows stop at different steps."""
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"),
               build_prompt(tok, "Compute 12*3 and explain.", "step-by-step")]
    enc = tok(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    ids, mask = enc.input_ids.repeat_interleave(2, 0), enc.attention_mask.repeat_interleave(2, 0)
    model = sharpened(tiny_model(tok))

    def both(stop, group_size):
        ours, _ = generate(model, ids, mask, max_new_tokens=20, sampling=Sampling(0), seed=0, stop_ids=[stop],
                           pad_id=tok.pad_token_id, group_size=group_size)
        with torch.no_grad():
            theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                    eos_token_id=stop, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
        return ours, theirs

    ours, theirs = both(tok.eos_token_id, group_size=2)
    assert torch.equal(ours, theirs)
    first = lambda row, t: row.tolist().index(t) if t in row.tolist() else None
    stop = next(int(t) for t in ours[0] if first(ours[0], int(t)) != first(ours[2], int(t)))
    for group_size in (1, 2):
        ours, theirs = both(stop, group_size)
        assert torch.equal(ours, theirs)
    stopped_at = [first(row, stop) for row in ours]
    assert stopped_at[0] != stopped_at[2]
    for row, k in enumerate(stopped_at):
        if k is not None:
            assert (ours[row, k + 1:] == tok.pad_token_id).all()


def test_sampling_frequencies_match_the_tempered_softmax():
    """200,000 draws from one row of logits at T = 0.7: each token's share is within 6 standard errors
    of softmax(z / T). A sampler that ignored the temperature misses token 0 by over 90 errors."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -float("inf")])
    n, T = 200_000, 0.7
    draws = sample_next_token(z.expand(n, -1), T, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double() / n
    p = (z / T).softmax(-1).double()
    assert torch.all((counts - p).abs() < 6 * (p * (1 - p) / n).sqrt() + 1e-12), (counts, p)
    assert counts[5] == 0  # a token of probability 0 is never drawn


def test_top_p_keeps_the_nucleus_like_transformers():
    """probs (0.5, 0.3, 0.15, 0.05) with top_p 0.7: the nucleus is the first two tokens, renormalized
    to (0.625, 0.375); and on random logits the kept set equals transformers' TopPLogitsWarper's."""
    from transformers.generation.logits_process import TopPLogitsWarper
    n = 100_000
    z = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    counts = torch.bincount(sample_next_token(z.expand(n, -1), 1.0, 0.7, torch.Generator().manual_seed(1)),
                            minlength=4).double() / n
    assert abs(counts[0] - 0.625) < 6 * math.sqrt(0.625 * 0.375 / n) and counts[2:].sum() == 0
    logits = torch.randn(50, 30) * 2
    kept_by_hf = TopPLogitsWarper(0.8)(None, logits.clone()) > -float("inf")  # (50, 30)
    drawn = sample_next_token(logits.repeat_interleave(400, 0), 1.0, 0.8, torch.Generator().manual_seed(2))
    for row in range(50):
        assert kept_by_hf[row, drawn[row * 400:(row + 1) * 400]].all()  # never outside HF's nucleus


# ----------------------------------------------------------------------------- scoring

def plain_forward_logits(model, r):
    """The reference: one ordinary forward over prompt + completion, logits at completion positions."""
    T = r.completion_ids.shape[1]
    position_ids = (r.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids).logits
    return logits[:, -T - 1:-1].double()  # (B, T, V)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_match_a_plain_forward(model, tok, temperature):
    r = sample(model, tok, seed=5)
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   temperature=temperature)
    ref = (plain_forward_logits(model, r) / temperature).log_softmax(-1)  # temperature applied exactly once
    ref_taken = ref.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    m = r.completion_mask.bool()
    assert torch.allclose(logp[m].double(), ref_taken[m], atol=1e-5)
    assert torch.allclose(entropy[m].double(), ref_entropy[m], atol=1e-5)
    assert (logp[~m] == 0).all() and (entropy[~m] == 0).all()


def test_entropy_of_a_uniform_model_is_log_v(tok):
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0, the next-token distribution is uniform
    r = sample(model, tok, seed=0)
    with torch.no_grad():
        logp, entropy = token_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   temperature=0.7)
    V, m = len(tok), r.completion_mask.bool()
    assert torch.allclose(entropy[m], torch.full_like(entropy[m], math.log(V)), atol=1e-5)
    assert torch.allclose(logp[m], torch.full_like(logp[m], -math.log(V)), atol=1e-5)


def test_scores_do_not_depend_on_batch_padding(model, tok):
    """A row scored alone equals the same row scored in a batch with longer prompts (left padding)."""
    r = sample(model, tok, seed=2)
    with torch.no_grad():
        batch_logp, _ = token_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask)
        row = 4  # a row of the second, longer prompt has no padding; the first prompt's rows do
        for row in (0, 4):
            keep = r.prompt_mask[row].bool()
            ids = torch.cat([r.prompt_ids[row][keep], r.completion_ids[row]])[None]
            mask = torch.cat([r.prompt_mask[row][keep], r.completion_mask[row]])[None]
            alone, _ = token_logprobs_and_entropy(model, ids, mask, r.completion_mask[row][None])
            assert torch.allclose(alone[0], batch_logp[row], atol=1e-5)


# ----------------------------------------------------------------------------- GEC: branch choice

def test_gec_branch_frequencies_over_many_seeds():
    """50,000 wrong rows over 50 seeds. Each share is within 6 standard errors of the documented
    1/2, 1/4, 1/4 (chance of a false failure < 1e-8); an implementation with 1/3 each misses by
    more than 50 standard errors."""
    counts = {"reflection": 0, "answer": 0, "solution": 0}
    n = 0
    for seed in range(50):
        actions = choose_gec_actions([True] * 1000, [True] * 1000, [False] * 1000,
                                     torch.Generator().manual_seed(seed))
        for a in actions:
            counts[a] += 1
        n += len(actions)
    for action, p in (("reflection", 0.5), ("answer", 0.25), ("solution", 0.25)):
        assert abs(counts[action] / n - p) < 6 * math.sqrt(p * (1 - p) / n), (action, counts)


def test_gec_choices_respect_correctness_solutions_prompt_length_and_mode():
    g = lambda: torch.Generator().manual_seed(0)
    n = 4000
    no_solution = choose_gec_actions([True] * n, [False] * n, [False] * n, g())
    assert "solution" not in no_solution
    assert abs(no_solution.count("answer") / n - 0.5) < 6 * math.sqrt(0.25 / n)  # answer takes the solution's share
    mixed = choose_gec_actions([True, False, True], [True] * 3, [False, False, True], g())
    assert mixed[1] == "none" and mixed[2] == "skipped"
    assert choose_gec_actions([True] * 50 + [False], [True] * 51, [False] * 51, g(), forced_reflection=True) \
        == ["reflection"] * 50 + ["none"]
    assert choose_gec_actions([True] * 100, [True] * 100, [False] * 100, g()) == \
        choose_gec_actions([True] * 100, [True] * 100, [False] * 100, g())


# ----------------------------------------------------------------------------- GEC: end to end

def rollout_from_texts(tok, prompts, texts, G, model=None):
    """A Rollout whose responses we choose: each text encoded and ended with EOS."""
    return make_rollout(tok, model or tiny_model(tok), prompts, texts, ["2", "36"], G)


def test_gec_rewrites_wrong_rows_and_only_regenerates_continued_ones(model, tok):
    G = 8
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    texts = ["so \\boxed{2}", "it is 3", "\\boxed{3}", "hmm", "x", "1+1=2", "\\boxed{5}", "no"] + \
            ["12*3=36", "\\boxed{35}", "36?", "?", "I think 30", "\\boxed{6}", "36",
             "\\boxed{-36}"]  # group 2: all wrong
    before = rollout_from_texts(tok, prompts, texts, G)
    assert before.rewards.tolist()[:3] == [2.0, 0.0, 1.0] and (before.rewards[G:] < MAX_REWARD).all()
    solutions = ["1 and 1 make \\boxed{2}.", None]  # the second problem has no solution: answer instead

    import rollout
    calls = []
    counting = lambda model, cache, mask, *a, **kw: calls.append(mask) or rollout.decode(model, cache, mask, *a, **kw)
    after = guided_error_correction(model, tok, before, ["2", "36"], solutions, seed=4, reflection_tokens=6,
                                    sampling=Sampling(decoder=counting))

    assert after.actions[0] == "none"
    assert torch.equal(after.completion_ids[0, :before.completion_mask[0].sum()],
                       before.completion_ids[0, :before.completion_mask[0].sum()])
    assert after.rewards[0] == 2.0 and after.texts[0] == texts[0]
    assert "solution" not in after.actions[G:]
    continued = [row for row, a in enumerate(after.actions) if a == "reflection"]
    assert len(calls) == 1 and calls[0].shape[0] == len(continued) > 0  # one decoding loop, continued rows only

    eos, cue = tok.eos_token_id, tok(REFLECTION_CUE, add_special_tokens=False).input_ids
    for row, action in enumerate(after.actions):
        length = int(after.completion_mask[row].sum())
        ids, sampled = after.completion_ids[row, :length].tolist(), after.sampled_mask[row, :length].tolist()
        response = before.completion_ids[row, :int(before.completion_mask[row].sum()) - 1].tolist()  # without EOS
        answer = ["2", "36"][row // G]
        assert after.rewards[row] == reward(after.texts[row], answer)
        assert after.texts[row] == tok.decode(ids, skip_special_tokens=True)
        if action == "answer":
            sentence = tok(ANSWER_SENTENCE.format(answer=answer), add_special_tokens=False).input_ids
            assert ids == response + sentence + [eos] and sampled == [1] * len(response) + [0] * (len(sentence) + 1)
            assert after.rewards[row] == MAX_REWARD and not after.truncated[row]
        elif action == "solution":
            assert after.texts[row] == solutions[0] and ids[-1] == eos and sum(sampled) == 0
            assert after.rewards[row] == MAX_REWARD
        elif action == "reflection":
            n = len(response)
            assert ids[:n + len(cue)] == response + cue
            assert sampled == [1] * n + [0] * len(cue) + [1] * (length - n - len(cue))
            assert after.truncated[row] == (ids[-1] != eos)
    # the all-wrong second group is mixed after GEC
    assert len(set(after.rewards[G:].tolist())) > 1 and MAX_REWARD in after.rewards[G:].tolist()


def test_gec_continues_from_the_sampling_cache_as_from_a_fresh_prefill(tok):
    """GEC continues reflection rows from the KV cache of the sampling pass (holes where a response
    ended, the never-fed last token of a truncated one). Greedy continuations equal those of a full
    prefill of prompt + response + cue, for rows that ended and rows that were truncated."""
    model = sharpened(tiny_model(tok))
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"),
               build_prompt(tok, "Compute 12*3 and explain.", "step-by-step")]
    r, kv = sample_with_cache(model, tok, prompts, ["2", "36"], group_size=4, max_new_tokens=16,
                              sampling=Sampling(3.0), seed=0)
    assert kv is not None and r.truncated.any() and not r.truncated.all()
    kwargs = dict(seed=1, forced_reflection=True, reflection_tokens=8, sampling=Sampling(0))
    cached = guided_error_correction(model, tok, r, ["2", "36"], ["two", "36"], kv=kv, **kwargs)
    fresh = guided_error_correction(model, tok, r, ["2", "36"], ["two", "36"], **kwargs)
    assert cached.actions == fresh.actions and cached.actions.count("reflection") == 8
    assert torch.equal(cached.completion_ids, fresh.completion_ids)
    assert torch.equal(cached.completion_mask, fresh.completion_mask)
    tails = {tuple(row[-8:].tolist()) for row in cached.completion_ids}
    assert len(tails) > 4  # the continuations differ from row to row: the test can tell contexts apart


def test_gec_skips_long_prompts_and_forced_reflection_only_reflects(model, tok):
    G = 2
    long_problem = "9" * GEC_MAX_PROMPT_TOKENS  # char-level tokenizer: one token per character
    prompts = [build_prompt(tok, long_problem, "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    before = rollout_from_texts(tok, prompts, ["a", "b", "c", "\\boxed{36}"], G)
    after = guided_error_correction(model, tok, before, ["2", "36"], ["s", "t"], seed=0, forced_reflection=True,
                                    reflection_tokens=4)
    assert after.actions == ["skipped", "skipped", "reflection", "none"]
    assert torch.equal(after.completion_ids[0, :2], before.completion_ids[0, :2])


def test_gec_is_reproducible(model, tok):
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    before = rollout_from_texts(tok, prompts, ["a", "b", "c", "d"], 2)
    runs = [guided_error_correction(model, tok, before, ["2", "36"], ["two", None], seed=9, reflection_tokens=5)
            for _ in range(2)]
    assert runs[0].actions == runs[1].actions and runs[0].texts == runs[1].texts
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)


def test_prompt_sharing_needs_whole_groups_of_equal_prompts(tok):
    ids = torch.tensor([[1, 2, 9], [1, 2, 8], [3, 4, 7], [3, 4, 6]])
    assert shares_prompts(ids, prompt_width=2, group_size=2)
    assert not shares_prompts(ids, prompt_width=2, group_size=4)   # the prompts differ inside the "group"
    assert not shares_prompts(ids[:3], prompt_width=2, group_size=2)  # not whole groups
    assert not shares_prompts(ids, prompt_width=2, group_size=1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefilling_each_prompt_once_gives_the_same_samples(model, tok, temperature):
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"), build_prompt(tok, "Compute 12*3.", "step-by-step")]
    enc = tok(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    ids, mask = enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0)
    kwargs = dict(max_new_tokens=12, sampling=Sampling(temperature), seed=5, stop_ids=[tok.eos_token_id],
                  pad_id=tok.pad_token_id)
    assert torch.equal(generate(model, ids, mask, group_size=1, **kwargs)[0],
                       generate(model, ids, mask, group_size=4, **kwargs)[0])


# ----------------------------------------------------------------------------- GEC on a Qwen-style tokenizer

def test_gec_appends_after_the_text_not_after_an_end_of_turn_token():
    """Qwen2.5-Math base stops at <|endoftext|>; a response may close its turn with <|im_end|> first.
    GEC appends its cue, answer sentence or solution after the text, as the authors' decode with
    skip_special_tokens does: never after <|im_end|>."""
    tok = qwen_tokenizer()
    model = tiny_qwen2(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [build_prompt(tok, "What is 2+3?", "bare")]
    texts = [f"so it is \\boxed{{{k}}}.<|im_end|>" for k in range(6)] + ["no box<|im_end|>", "cut off"]
    before = make_rollout(tok, model, prompts, texts, ["5"], group_size=8, truncated=[False] * 7 + [True])
    assert (before.completion_ids[0] == im_end).any()
    after = guided_error_correction(model, tok, before, ["5"], ["2+3=\\boxed{5}"], seed=3, reflection_tokens=4)
    assert {"reflection", "answer", "solution"} <= set(after.actions)
    for row, action in enumerate(after.actions):
        ids = after.completion_ids[row, :int(after.completion_mask[row].sum())].tolist()
        text = texts[row].replace("<|im_end|>", "")
        if action == "answer":
            expected = tok(text + ANSWER_SENTENCE.format(answer="5"), add_special_tokens=False).input_ids + \
                [tok.eos_token_id]
            assert ids == expected
        elif action == "reflection":
            prefix = tok(text + REFLECTION_CUE, add_special_tokens=False).input_ids
            assert ids[:len(prefix)] == prefix
        if action != "none":
            assert im_end not in ids[:len(tok(text, add_special_tokens=False).input_ids) + 1]


def test_decoding_uses_the_current_cache_api():
    """No FutureWarning about past_key_values: it would print in every run, tearing the progress bar."""
    tok = tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        rollout = sample(tiny_model(tok), tok, seed=0)
        fast.fused_logprobs_and_entropy(tiny_model(tok), rollout.input_ids, rollout.attention_mask,
                                        # the fast path runs prompts with a cache
                                        rollout.completion_mask, group_size=4)


def test_a_rows_samples_do_not_depend_on_the_rest_of_its_batch(tok):
    """Each row samples (and GEC draws and continues) from its own generator, seeded by (seed, the row's
    index in the step's batch): the second prompt's group sampled alone, told its first row, gets
    the tokens and GEC actions it gets in the whole batch. This is what lets torchrun ranks split a
    step's prompts and still sample what one process would."""
    model = sharpened(tiny_model(tok))
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"),
               build_prompt(tok, "Compute 12*3 please.", "step-by-step")]
    kwargs = dict(group_size=4, max_new_tokens=12, sampling=Sampling(1.0), seed=5)
    whole, kv = sample_with_cache(model, tok, prompts, ["2", "36"], **kwargs)
    alone, kv_alone = sample_with_cache(model, tok, prompts[1:], ["36"], first_row=4, **kwargs)
    width = alone.completion_ids.shape[1]
    assert torch.equal(whole.completion_ids[4:, :width], alone.completion_ids)
    assert (whole.completion_ids[4:, width:] == tok.pad_token_id).all()
    gec = dict(seed=9, reflection_tokens=6, sampling=Sampling(1.0))
    both = guided_error_correction(model, tok, whole, ["2", "36"], ["two", None], kv=kv, **gec)
    part = guided_error_correction(model, tok, alone, ["36"], [None], kv=kv_alone, first_row=4, **gec)
    assert both.actions[4:] == part.actions and both.texts[4:] == part.texts
    assert "reflection" in part.actions


def test_concat_rollouts_pads_prompts_left_and_completions_right():
    from rollout import Rollout, concat_rollouts, select_groups

    def make(prompt, completion, reward):
        return Rollout(prompt_ids=torch.tensor([prompt]), prompt_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       completion_ids=torch.tensor([completion]),
                       completion_mask=torch.ones(1, len(completion), dtype=torch.long),
                       sampled_mask=torch.ones(1, len(completion), dtype=torch.long),
                       inserted=torch.zeros(1, len(completion), dtype=torch.long), truncated=torch.tensor([False]),
                       texts=["t"], rewards=torch.tensor([reward]), actions=["none"], group_size=1)
    both = concat_rollouts(make([7, 8], [1], 0.0), make([6, 7, 8], [2, 3], 2.0), pad_id=0)
    assert both.prompt_ids.tolist() == [[0, 7, 8], [6, 7, 8]] and both.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert both.completion_ids.tolist() == [[1, 0], [2, 3]] and both.completion_mask.tolist() == [[1, 0], [1, 1]]
    assert select_groups(both, [1]).completion_ids.tolist() == [[2, 3]] and both.rewards.tolist() == [0.0, 2.0]


# ----------------------------------------------------------------------------- the prefix branch (on-policy guidance)

@pytest.mark.parametrize("solution, answer, prefix", [
    # inside, then at the end
    ("We compute $12 + 34 = 46$. The answer is \\boxed{46}.", "46", "We compute $12 + 34 = "),
    ("We have 14 - 10 = 4, as asked.", "4", "We have 14 - 10 = "),                 # 4 occurs as a number, not in 14
    ("Adding both numbers gives: 9", "9", "Adding both numbers g"),          # at the end: the cap, 21 of 28 characters
    ("7 is the answer, and 7 it stays.", "7", ""),                       # at the start (and twice): nothing shown
    ("Add them column by column, carrying tens.", "58", "Add them column by column, car"),  # absent: the cap, 30 of 41
    ("\\frac{1}{2} of it: 1/2", ["1/2", "\\frac{1}{2}"], ""),            # any acceptable form counts
])
def test_answer_free_prefix_hand_cases(tok, solution, answer, prefix):
    """The longest prefix of the solution's tokens (characters here) that shows no character of the
    answer's first occurrence, at most 3/4 of the solution: int(0.75 x its length) tokens."""
    from rollout import PREFIX_MAX_FRACTION, answer_free_prefix
    ids = answer_free_prefix(tok, solution, answer)
    assert tok.decode(ids) == prefix
    assert len(ids) <= int(PREFIX_MAX_FRACTION * len(solution))


def test_prefix_rows_are_conditioned_on_not_trained(tok):
    """A wrong row given the prefix branch: its tokens are the prefix (inserted, source "prefix",
    sampled 0) then the policy's continuation (sampled 1), scored on the whole text; the loss mask
    leaves the prefix out whatever --inserted-tokens says, and trains the continuation."""
    import edge_grpo as eg
    from rollout import TOKEN_SOURCES, answer_free_prefix
    model = tiny_model(tok)
    G = 4
    prompts = [build_prompt(tok, "What is 12 + 34?", "step-by-step")]
    before = rollout_from_texts(tok, prompts, ["no", "maybe 3", "\\boxed{5}", "x"], G)
    solution = "We compute $12 + 34 = 46$. The answer is \\boxed{46}."
    after = guided_error_correction(model, tok, before, ["46"], [solution], seed=1, reflection_tokens=5,
                                    branches=("prefix",))
    assert after.actions == ["prefix"] * G
    prefix = answer_free_prefix(tok, solution, "46")
    for row in range(G):
        length = int(after.completion_mask[row].sum())
        ids = after.completion_ids[row, :length].tolist()
        sources = after.inserted[row, :length].tolist()
        assert ids[:len(prefix)] == prefix and length > len(prefix)  # the policy wrote something after it
        assert sources == [TOKEN_SOURCES.index("prefix")] * len(prefix) + [0] * (length - len(prefix))
        assert after.sampled_mask[row, :length].tolist() == [0] * len(prefix) + [1] * (length - len(prefix))
        assert after.texts[row] == tok.decode(ids, skip_special_tokens=True)
        assert after.rewards[row] == reward(after.texts[row], "46")
        for mode in ("train", "mask"):
            mask = eg.trained_token_mask(after, mode)[row, :length].tolist()
            assert mask == [0] * len(prefix) + [1] * (length - len(prefix))


def test_prefix_branch_takes_the_answer_branches_share_and_the_default_draws_as_before():
    """reflection + prefix: the same rows reflect as under the paper's three branches (u < 1/2), and
    every row the paper would answer or replace gets the prefix; no row without a solution gets it."""
    g = lambda: torch.Generator().manual_seed(11)
    paper = choose_gec_actions([True] * 2000, [True] * 2000, [False] * 2000, g())
    guided = choose_gec_actions([True] * 2000, [True] * 2000, [False] * 2000, g(), branches=("reflection", "prefix"))
    assert [a == "reflection" for a in paper] == [a == "reflection" for a in guided]
    assert set(guided) == {"reflection", "prefix"}
    draws = torch.rand(2000, generator=g()).tolist()  # the paper's thresholds, drawn independently
    assert paper == ["reflection" if u < 0.5 else "answer" if u < 0.75 else "solution" for u in draws]
    assert set(choose_gec_actions([True] * 200, [False] * 200, [False] * 200, g(), branches=("reflection", "prefix"))) \
        == {"reflection"}
