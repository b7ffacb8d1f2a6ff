"""fast.py, the speed and memory machinery, against the plain path (rollout.py) and float64: the
fused LM head's closed-form backward, each group's prompt run once, the lean activations, the bf16
numerics, the allocator setting; and --fast against --no-fast on whole training steps.
Run: python -m pytest tests/test_fast.py"""

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edge_grpo as eg
import fast
import rollout
from fast import EmbeddingIntoGrad, LogprobAndEntropy, lean_activations, fused_logprobs_and_entropy
from rollout import build_prompt, sample_rollout
from tests.test_rollout import sample
from tests.tiny import qwen_tokenizer, sharpened, tiny_model, tiny_qwen2, tiny_tokenizer


@pytest.mark.parametrize("uses", ["both", "logp", "entropy"])
def test_fused_head_gradients_equal_autograd_through_log_softmax(uses):
    """LogprobAndEntropy's closed-form backward against float64 autograd through log_softmax, with a
    bias, T = 0.7 and chunks of 3 rows: values and the gradients of hidden, weight and bias."""
    g = torch.Generator().manual_seed(0)
    n, D, V, T = 7, 5, 11, 0.7
    hidden, weight, bias = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((n, D), (V, D), (V,)))
    targets = torch.randint(0, V, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def loss_of(taken, entropy):  # an unused output reaches backward as None: that path is tested too
        terms = dict(logp=(taken * a.to(taken.dtype)).sum(), entropy=(entropy * b.to(entropy.dtype)).sum())
        return sum(terms.values()) if uses == "both" else terms[uses]

    taken, entropy = LogprobAndEntropy.apply(hidden, weight, bias, targets, T, 3)
    ours = torch.autograd.grad(loss_of(taken, entropy), (hidden, weight, bias))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    logp = ((h64 @ w64.T + b64) / T).log_softmax(-1)  # (n, V)
    ref_taken, ref_entropy = logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    reference = torch.autograd.grad(loss_of(ref_taken, ref_entropy), (h64, w64, b64))
    assert torch.allclose(taken.double(), ref_taken, atol=1e-5) and torch.allclose(entropy.double(),
                                                                                   ref_entropy, atol=1e-5)
    for mine, ref in zip(ours, reference):
        assert torch.allclose(mine.double(), ref, atol=1e-5), (mine, ref)
        assert ref.abs().max() > 1e-3


def test_fused_head_adds_into_an_existing_weight_grad():
    """With weight.grad already there (accumulation over micro-batches), backward adds the weight's
    gradient into it in place and hands autograd nothing more for the weight: the final .grad is the
    earlier one plus the float64 reference, and it is the same tensor object."""
    g = torch.Generator().manual_seed(1)
    n, D, V, T = 6, 4, 9, 0.8
    hidden, weight = torch.randn(n, D, generator=g, requires_grad=True), torch.randn(V, D, generator=g,
                                                                                     requires_grad=True)
    targets, a = torch.randint(0, V, (n,), generator=g), torch.randn(n, generator=g)
    earlier = torch.randn(V, D, generator=g)
    weight.grad = earlier.clone()
    buffer = weight.grad
    taken, entropy = LogprobAndEntropy.apply(hidden, weight, None, targets, T, 4)
    ((taken * a).sum() + entropy.sum()).backward()
    w64 = weight.detach().double().requires_grad_()
    logp = ((hidden.detach().double() @ w64.T) / T).log_softmax(-1)
    ((logp.gather(-1, targets[:, None]).squeeze(-1) * a.double()).sum() - (logp.exp() * logp).sum()).backward()
    assert weight.grad is buffer
    assert torch.allclose(weight.grad.double(), earlier.double() + w64.grad, atol=1e-5)
    assert w64.grad.abs().max() > 1e-2


def test_chunked_equals_unchunked_values_and_gradients(model, tok):
    r = sample(model, tok, seed=11)
    results = []
    for chunk_rows in (3, 10_000):
        model.zero_grad()
        logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   chunk_rows=chunk_rows)
        (logp.sum() + entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (l1, h1, g1), (l2, h2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5) and g1.abs().sum() > 0
    model.zero_grad()


def test_shared_prompt_prefix_equals_the_plain_forward(model, tok):
    """Groups sharing a prompt: each prompt runs once, its keys/values repeated G times. Same
    log-probs, entropies and gradients as running every row in full."""
    r = sample(model, tok, seed=13, G=4)
    results = []
    for group_size in (1, 4):
        model.zero_grad()
        logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   group_size=group_size)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, h1, g1), (l2, h2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    model.zero_grad()


@pytest.mark.parametrize("lean", [False, True])
def test_shared_prompts_accumulate_over_micro_batches_like_one_plain_backward(tok, lean):
    """Two micro-batches of one group each, prompts shared, gradients accumulated (the second one
    finds .grad filled: the fused head adds into it, the prompts' backward runs on its own) against
    both groups in one plain forward and one backward. And the cut itself: every weight is used by
    the prompts and by the completions, and each part reaches .grad on its own (two accumulations
    per weight per backward instead of one). With lean_activations too: the embedding then adds its
    rows into .grad directly."""
    model = tiny_model(tok)
    if lean:
        lean_activations(model)
    r = sample(model, tok, seed=17, G=4)
    params = list(model.parameters())
    model.zero_grad()
    logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=1)
    (logp.sum() - 0.5 * entropy.sum()).backward()
    reference = [p.grad.clone() for p in params]
    model.zero_grad()
    accumulations = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: accumulations.append(p)) for p in params]
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        logp, entropy = fused_logprobs_and_entropy(model, r.input_ids[rows], r.attention_mask[rows],
                                                   r.completion_mask[rows], group_size=4)
        (logp.sum() - 0.5 * entropy.sum()).backward()
    for hook in hooks:
        hook.remove()
    assert all(torch.allclose(p.grad, ref, atol=1e-5) for p, ref in zip(params, reference))
    assert len(accumulations) == 2 * 2 * len(params)  # 2 micro-batches x (completions, prompts)
    model.zero_grad()


def test_lean_activations_same_numbers_less_memory_for_backward(tok):
    """Every MLP and RMSNorm of the tiny Llama routed through SwiGLUDown / RMSNormFunction: the same
    log-probs, entropies and gradients as the stock modules (float64 model; both norms compute in
    float32, as transformers' does, hence the tolerance), and the tensors kept for backward shrink by
    what the two functions drop: per layer and token 2 x I values of the MLP (silu(g) and the product)
    and D for each of the two norms, and D for the final norm."""
    stock = tiny_model(tok).double()
    lean = copy.deepcopy(stock)
    assert lean_activations(lean) == 2 * 3 + 1 + 1  # 2 layers x (MLP, 2 norms), the final norm, the embedding
    r = sample(stock, tok, seed=5, G=4)
    results = []
    for model in (stock, lean):
        model.zero_grad(set_to_none=True)
        kept = {}

        def keep(t):  # every tensor saved for backward, once per storage
            kept.setdefault(t.untyped_storage().data_ptr(), t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept_values = sum(t.numel() for ptr, t in kept.items() if ptr not in params)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()], kept_values))
    (l1, h1, g1, kept_stock), (l2, h2, g2, kept_lean) = results
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(h1, h2, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g1, g2))
    config, tokens = stock.config, r.input_ids.numel()
    per_layer = 2 * config.intermediate_size + 2 * config.hidden_size
    dropped = tokens * (config.num_hidden_layers * per_layer + config.hidden_size)
    assert kept_stock - kept_lean == dropped, (kept_stock, kept_lean, dropped)
    assert sum(g.abs().sum() for g in g1) > 0


def test_lean_routing_of_a_loaded_model_survives_train_and_eval(tok, tmp_path):
    """A model loaded from a directory (a checkpoint, a resumed run) keeps fast.py's routing through
    the train() / eval() of every step: transformers 5.25 began to kernelize such models by default,
    swapping each RMSNorm's forward back on every mode change (a resumed bf16 run then differed from
    an uninterrupted one by ~1e-6 in the norms); checkpoints.load_model_and_tokenizer turns that off."""
    tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = eg.load_model_and_tokenizer(str(tmp_path), torch.device("cpu"), torch.float32)
    assert lean_activations(model) == 8  # 2 layers x (MLP, 2 norms), the final norm, the embedding
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    outputs = []
    for norm in norms:
        norm.register_forward_hook(lambda module, args, out: outputs.append(type(out.grad_fn).__name__))
    for mode in (True, False, True):
        model.train(mode)
        outputs.clear()
        model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
        assert outputs == ["RMSNormFunctionBackward"] * 5


def test_lean_activations_under_gradient_checkpointing(tok):
    """--gradient-checkpointing recomputes each layer in backward, through the lean functions too (and
    takes the plain path, no prompt sharing): the same gradients as without it."""
    r = sample(tiny_model(tok), tok, seed=19, G=4)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(tok).train()
        lean_activations(model)
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   group_size=4)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_bf16_head_log_probs_and_entropies_are_fp32_accurate():
    """bf16 hidden states and head weight, logits large enough that bf16 rounding of them matters
    (|z| ~ 10, T 0.1 as in evaluation): our head against float64 on the same bf16 values. bf16
    logits would be off by up to ~0.04 in z, 0.4 after dividing by T."""
    torch.manual_seed(0)
    hidden = (torch.randn(64, 32) * 2).to(torch.bfloat16)
    weight = (torch.randn(500, 32) * 0.6).to(torch.bfloat16)
    targets = torch.randint(0, 500, (64,))
    for T in (0.6, 0.1):
        taken, entropy = LogprobAndEntropy.apply(hidden, weight, None, targets, T, 16)
        z = hidden.double() @ weight.double().t() / T
        ref = z.log_softmax(-1)
        ref_entropy = -(ref.exp() * ref).sum(-1)
        assert (taken.double() - ref.gather(-1, targets[:, None]).squeeze(-1)).abs().max() < 1e-4
        assert ((entropy.double() - ref_entropy).abs() / ref_entropy.clamp(min=1e-3)).max() < 1e-4
        bf16_logits = (hidden @ weight.t()).double() / T  # what computing the logits in bf16 gives
        assert (bf16_logits.log_softmax(-1) - ref).abs().max() > 1e-2  # so the test can tell


def test_bf16_embedding_gradient_sums_a_tokens_repeats_in_fp32():
    """1000 occurrences of one token: the gradient row is their fp32 sum, rounded once to bf16 (error
    within 2^-8 of the row's norm). A bf16 accumulator, adding one occurrence at a time as CUDA's
    atomic index_add_ does, drifts by several percent. (CPU's index_add_ happens to sum in fp32.)"""
    torch.manual_seed(0)
    weight = torch.randn(10, 16).to(torch.bfloat16).requires_grad_()
    ids = torch.full((1000,), 3)
    upstream = torch.randn(1000, 16).to(torch.bfloat16)
    EmbeddingIntoGrad.apply(ids, weight, None).backward(upstream)
    exact = upstream.double().sum(0)
    relative = lambda row: ((row.double() - exact).norm() / exact.norm()).item()
    assert relative(weight.grad[3]) < 2 ** -8
    assert (weight.grad.double().abs().sum(1) > 0).tolist() == [k == 3 for k in range(10)]
    bf16_sum = torch.zeros(16, dtype=torch.bfloat16)
    for row in upstream:
        bf16_sum += row
    assert relative(bf16_sum) > 0.01


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_scoring_and_lean_routing_equal_stock_modules(qtok, tied):
    """q/k/v biases, tied (1.5B) and untied (7B) heads, float64: our scoring with the fused head and
    the lean MLP/norm/embedding routing gives the plain forward's log-probs and entropies, and the
    stock modules' gradients."""
    stock = tiny_qwen2(qtok, tied=tied).double()
    lean = copy.deepcopy(stock)
    assert lean_activations(lean) == 2 * 3 + 1 + 1
    prompts = [build_prompt(qtok, p, "bare") for p in ("What is 1+1?", "Compute 12*3.")]
    r = sample_rollout(stock, qtok, prompts, ["2", "36"], group_size=4, max_new_tokens=10, seed=1)
    position_ids = (r.attention_mask.cumsum(1) - 1).clamp(min=0)
    T = r.completion_ids.shape[1]
    with torch.no_grad():
        logits = stock(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids).logits
    ref = (logits[:, -T - 1:-1] / 0.6).log_softmax(-1)
    m = r.completion_mask.bool()
    grads = []
    for model in (stock, lean):
        logp, entropy = fused_logprobs_and_entropy(model, r.input_ids, r.attention_mask, r.completion_mask,
                                                   temperature=0.6, group_size=4)
        assert torch.allclose(logp[m].double(), ref.gather(-1, r.completion_ids[..., None]).squeeze(-1)[m], atol=1e-5)
        assert torch.allclose(entropy[m].double(), -(ref.exp() * ref).sum(-1)[m], atol=1e-5)
        (logp.sum() - 0.5 * entropy.sum()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert any("q_proj.bias" in name for name in grads[0]) and ("lm_head.weight" in grads[0]) == (not tied)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_freed_blocks_and_returns_big_ones():
    """First a 64 MB tensor in a fresh process: the heap has no room for it, so it is mapped on its own
    and handed back when freed, with either setting (with mmap off, as this project first did, the
    heap grew by 64 MB for good). Then 100 MB of 4 MB tensors freed, and 5 rounds of a 40 MB tensor
    allocated, filled and freed, page faults counted: glibc's defaults map every block over 32 MB
    afresh (~10,000 faults per round); with keep_freed_memory it comes from the freed memory (none).
    Each side in its own process: the setting is process-wide."""
    script = ("import resource, sys, torch, fast\n"
              "if sys.argv[1] == 'keep': assert fast.keep_freed_memory()\n"
              "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "rss = lambda: int(next(l for l in open('/proc/self/status') if "
              "l.startswith('VmRSS')).split()[1]) // 1024\nbefore = rss(); big = torch.ones(2**24); during = rss(); "
              "del big; after = rss()\nblocks = [torch.ones(2**20) for _ in range(25)]; del blocks\n"
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


# ----------------------------------------------------------------------------- --fast against --no-fast

ARCHITECTURES = {"llama": (tiny_tokenizer, tiny_model), "qwen2": (qwen_tokenizer, tiny_qwen2)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_scoring_equals_the_plain_path(arch):
    """One micro-batch of two groups with GEC's rows: the fast path (prompts once, fused head, lean
    modules) against the plain one (stock modules, log_softmax through autograd), float64 models:
    log-probs and entropies within 1e-6, every parameter's gradient within 1e-5 (both paths compute the
    norms in float32, as transformers does)."""
    make_tokenizer, make_model = ARCHITECTURES[arch]
    tok = make_tokenizer()
    plain = make_model(tok).double()
    lean = copy.deepcopy(plain)
    fast_enabled = lean_activations(lean)
    assert fast_enabled > 0
    prompts = [build_prompt(tok, p, "step-by-step") for p in ("What is 1+1?", "Compute 12*3.")]
    first = sample_rollout(plain, tok, prompts, ["2", "36"], group_size=4, max_new_tokens=10, seed=3)
    r = rollout.guided_error_correction(plain, tok, first, ["2", "36"], ["1+1=\\boxed{2}", None], seed=4,
                                        reflection_tokens=5)
    results = []
    for model, score in ((plain, lambda m: rollout.token_logprobs_and_entropy(m, r.input_ids, r.attention_mask,
                                                                               r.completion_mask, temperature=0.7)),
                         (lean, lambda m: fused_logprobs_and_entropy(m, r.input_ids, r.attention_mask,
                                                                     r.completion_mask, temperature=0.7,
                                                                     group_size=4))):
        logp, entropy = score(model)
        (logp.sum() - 0.3 * entropy.sum()).backward()
        results.append((logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, h1, g1), (l2, h2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(h1, h2, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-5, atol=1e-5), name
    assert all(g.abs().sum() > 0 for name, g in g1.items() if "embed" not in name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_and_plain_training_steps_give_the_same_weights(tmp_path, arch):
    """Two whole EDGE-GRPO steps (GEC, EDA, micro-batches of 4 splitting the P x G = 8 rows into
    groups, beta 0.1 with a reference model) with --fast and with --no-fast, from the same weights:
    the same rollouts (equal rewards and GEC actions) and weights within 1e-5 (float32; the two paths
    round differently)."""
    from tests.test_edge_grpo import PROBLEMS, args_for, write_jsonl
    make_tokenizer, make_model = ARCHITECTURES[arch]
    tok = make_tokenizer()
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    runs = []
    for flag in ("--fast", "--no-fast"):
        model = make_model(tok)
        args = args_for(tmp_path / flag, "--data", str(data), "--max-steps", "2", flag, "--micro-batch-size", "4",
                        "--beta", "0.1", "--save-steps", "0")
        history = eg.train(args, model=model, tokenizer=tok, progress=False)
        runs.append((history, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (h1, w1), (h2, w2) = runs
    for a, b in zip(h1, h2):
        assert a["gec_actions"] == b["gec_actions"] and a["reward"] == b["reward"]
        assert a["adv_var"] == pytest.approx(b["adv_var"], rel=1e-4)
    assert any(m["zero_std_after_gec"] < 1 for m in h1)  # a step with a gradient
    initial = dict(make_model(tok).named_parameters())
    assert any(not torch.equal(w1[n], initial[n]) for n in w1)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], rtol=1e-4, atol=1e-5), name


def test_a_new_per_token_quantity_on_the_plain_path(model, tok):
    """What a student adds without touching fast.py: varentropy, V_t = sum_v p (log p + H)^2, the
    variance of the surprisal, is one function of a chunk's log-probs. On the plain path it comes out
    per token (B, T), equals a float64 computation from the full logits, and has gradients."""
    def varentropy(logp, targets):  # (c, V) -> (c,)
        H = -(logp.exp() * logp).sum(-1, keepdim=True)
        return (logp.exp() * (logp + H) ** 2).sum(-1)

    r = sample(model, tok, seed=7)
    (V,) = rollout.per_token_quantities(model, r.input_ids, r.attention_mask, r.completion_mask, [varentropy],
                                        temperature=0.8, chunk_rows=5)
    T = r.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                       position_ids=rollout.real_positions(r.attention_mask)).logits[:, -T - 1:-1].double() / 0.8
    logp = logits.log_softmax(-1)
    H = -(logp.exp() * logp).sum(-1, keepdim=True)
    reference = (logp.exp() * (logp + H) ** 2).sum(-1)
    m = r.completion_mask.bool()
    assert torch.allclose(V[m].double(), reference[m], atol=1e-5) and (V[~m] == 0).all()
    model.zero_grad()
    V.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


# ----------------------------------------------------------------------------- decoding: static cache, compiled step


DECODERS = dict(dynamic=rollout.decode, static=functools.partial(fast.decode_static, compiled=False),
                compiled=functools.partial(fast.decode_static, compiled=True))


def rollout_and_gec(model, tok, decoding, top_p=1.0):
    """A sampled rollout (8 rows, 20 tokens, some truncated) and GEC's continuation of 5 of its rows
    (3 are marked correct and left alone): 5 rows decode in a static batch of 8."""
    import dataclasses
    from reward import MAX_REWARD
    sampling = rollout.Sampling(1.0, top_p, DECODERS[decoding])
    prompts = [build_prompt(tok, "What is 1+1?", "step-by-step"),
               build_prompt(tok, "Compute 12*3 please.", "step-by-step")]
    r, kv = rollout.sample_with_cache(model, tok, prompts, ["2", "36"], group_size=4, max_new_tokens=20,
                                      sampling=sampling, seed=3)
    rewards = r.rewards.clone()
    rewards[[0, 3, 6]] = MAX_REWARD
    corrected = rollout.guided_error_correction(model, tok, dataclasses.replace(r, rewards=rewards), ["2", "36"],
                                                ["two", None], seed=5, kv=kv, forced_reflection=True,
                                                reflection_tokens=7, sampling=sampling)
    assert corrected.actions.count("reflection") == 5
    return r.completion_ids, corrected.completion_ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_static_decoding_gives_the_tokens_of_the_dynamic_loop(arch, top_p):
    """fast.decode_static (a StaticCache sized once, copies of the prompts' keys/values, a fixed-shape
    step, padded rows) samples exactly the tokens of rollout.decode's dynamic loop from the same
    seed, in sampling and in GEC's continuation from the sampling cache."""
    make_tokenizer, make_model = ARCHITECTURES[arch]
    tok = make_tokenizer()
    model = sharpened(make_model(tok))
    dynamic, static = (rollout_and_gec(model, tok, path, top_p) for path in ("dynamic", "static"))
    assert torch.equal(dynamic[0], static[0]) and torch.equal(dynamic[1], static[1])
    assert dynamic[0].shape == (8, 20) and len({tuple(row) for row in dynamic[0].tolist()}) > 1


@pytest.mark.slow  # compiles the decoding step of two tiny models: ~10-20 s on 2 CPU cores; CI runs it
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_decoding_gives_the_tokens_of_the_dynamic_loop(arch):
    """The same through torch.compile (what --compile runs): equal tokens, and one compiled step per
    shape kept on the model (sampling's 8 rows, GEC's 5 padded to 8 with a longer cache)."""
    make_tokenizer, make_model = ARCHITECTURES[arch]
    tok = make_tokenizer()
    model = sharpened(make_model(tok))
    dynamic, compiled = (rollout_and_gec(model, tok, path) for path in ("dynamic", "compiled"))
    assert torch.equal(dynamic[0], compiled[0]) and torch.equal(dynamic[1], compiled[1])
    assert all(key[0] == 8 and key[2] for key in model._static_decoders)
    before = len(model._static_decoders)
    rollout_and_gec(model, tok, "compiled")
    assert len(model._static_decoders) == before  # reused, not rebuilt


def test_the_decoding_path_follows_the_flags(tmp_path):
    from tests.test_edge_grpo import args_for
    model = tiny_model(tiny_tokenizer())
    assert eg.decoding_path(args_for(tmp_path), model) is rollout.decode  # CPU: no compile by default
    compiled = eg.decoding_path(args_for(tmp_path, "--compile"), model)
    assert compiled.func is fast.decode_static and compiled.keywords == dict(compiled=True)
    with pytest.raises(SystemExit, match="--compile"):
        args_for(tmp_path, "--no-fast", "--compile")
