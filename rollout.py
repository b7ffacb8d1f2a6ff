"""
rollout.py: from problems to a scored group of responses, the input of every GRPO step.

  1. build_prompt            the problem through the chat template, as the authors prompted each family
  2. sample_rollout          G completions per prompt: each prompt prefilled once, then one decoding
                             loop for all P x G rows; masks from the first EOS, rewards from reward.py
  3. token_logprobs_and_entropy
                             per-token log p(o_t) and entropy H_t of the full next-token distribution,
                             completion positions only, the vocabulary in chunks, each group's prompt once
                             (with a backward of its own); lean_activations: less kept for backward
  4. guided_error_correction GEC (paper section 3.2): every response below the maximum reward is
                             continued after a reflection cue (1/2), gets the correct answer appended
                             (1/4) or is replaced by the reference solution (1/4); then re-scored

Dimensions: P prompts, G responses per prompt, B = P x G rows (group i is rows i*G .. i*G+G-1),
Tp prompt tokens, T completion tokens, V vocabulary, D hidden size.

Departures from the authors' code (../shared/PAPER.md, "Guided Error Correction"):
- corrected rows end with EOS (theirs lose it when re-tokenized, so those rows never learn to stop);
- only the rows being continued are decoded again, from the KV cache of their sampling pass
  (theirs regenerates the whole batch, prompt and response included);
- corrected rows are built from token ids, not decoded and re-tokenized, so the sampled tokens the
  loss trains on are exactly the ones the policy sampled;
- a per-token sampled_mask marks the text GEC inserted; the loss decides what to do with it.
"""

import os
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from reward import MAX_REWARD, reference_answer_text, reward

# -----------------------------------------------------------------------------
# Constants: the authors' values (grpo_aha_trainer.py)

# Appended to the user message for every family but Qwen2.5-Math, whose chat template's default
# system prompt already asks for step-by-step reasoning and a boxed answer.
STEP_BY_STEP = "\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
REFLECTION_CUE = " Wait! Something is wrong here."
ANSWER_SENTENCE = "\nWait! Something is wrong here. After verification, the correct answer is \\boxed{{{answer}}}."
P_REFLECTION, P_ANSWER = 0.5, 0.25   # and P_SOLUTION = 1 - 0.5 - 0.25 = 0.25
GEC_MAX_PROMPT_TOKENS = 256          # GEC only for prompts shorter than this (their condition)
REFLECTION_NEW_TOKENS = 256          # budget of the continuation after the reflection cue
# Rows of the (N, V) logit matrix materialized at once while scoring: 512 x 151,936 (Qwen) x 4 bytes
# is 311 MB per tensor, instead of the 5 GB of a whole 8 x 1024 x V batch.
LOGIT_CHUNK_ROWS = 512

GEC_ACTIONS = ("none", "reflection", "answer", "solution", "skipped")  # skipped: prompt too long


@dataclass
class Rollout:
    """One scored batch of B = P x G responses. Built by sample_rollout, rebuilt (never mutated) by
    guided_error_correction."""
    prompt_ids: torch.Tensor       # (B, Tp) left-padded
    prompt_mask: torch.Tensor      # (B, Tp) 1 on prompt tokens
    completion_ids: torch.Tensor   # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on the response up to and including its first EOS
    sampled_mask: torch.Tensor     # (B, T) 1 where the policy sampled the token; 0 where GEC inserted it, and on padding
    truncated: torch.Tensor        # (B,) bool: the response hit its length cap without EOS
    texts: list                    # (B,) decoded responses, special tokens removed
    rewards: torch.Tensor          # (B,) r_i in {0, 1, 2}, see reward.py
    actions: list                  # (B,) GEC action per row, one of GEC_ACTIONS
    group_size: int                # G
    kv: tuple = None               # (KV cache, its mask) of the sampling pass, for GEC to continue rows from

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, Tp + T)

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, Tp + T)


# -----------------------------------------------------------------------------
# 1. Prompts


PROMPT_FORMATS = ("bare", "step-by-step")


def default_prompt_format(model_name):
    """The authors' choice per family: Qwen2.5-Math models get the bare problem (their chat template's
    default system prompt asks for step-by-step reasoning and \\boxed{}), every other family gets
    the STEP_BY_STEP instruction appended. Decided once per run from the model's name, saved with
    every checkpoint (run_config.json) and read back by resume and evaluation: a checkpoint's
    directory name says nothing about its family."""
    return "bare" if "qwen2.5-math" in str(model_name).lower() else "step-by-step"


def build_prompt(tokenizer, problem, prompt_format):
    user = problem if prompt_format == "bare" else problem + STEP_BY_STEP
    if tokenizer.chat_template is None:
        warnings.warn("the tokenizer has no chat template: prompting with plain text 'Question: ... Answer:'")
        return f"{tokenizer.bos_token or ''}Question: {user}\nAnswer:"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


# -----------------------------------------------------------------------------
# 2. Sampling


def stop_token_ids(tokenizer, model):
    """Every id that ends a response: the tokenizer's EOS first (it is what corrected rows end with),
    then the generation config's (Qwen's lists two)."""
    ids = [tokenizer.eos_token_id]
    configured = model.generation_config.eos_token_id
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def completion_mask_from_eos(completion_ids, stop_ids):
    """1 up to and including the first stop token, 0 after: the EOS is trained, so the model learns to
    stop. Never built by comparing with the pad id (pad is often EOS). Returns mask (B, T) and
    truncated (B,): rows that never stopped."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    positions = torch.arange(T, device=completion_ids.device)  # (T,)
    first_stop = torch.where(is_stop, positions, T).min(dim=1).values  # (B,) T when there is none
    mask = (positions[None, :] <= first_stop[:, None]).long()  # (B, T)
    return mask, first_stop == T


def left_pad(sequences, pad_id):
    """Lists of ids -> ids (B, L) and mask (B, L), padded on the left as generate expects."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        if s:
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
    return ids, mask


def right_pad(sequences, pad_value, width=None):
    width = max(max((len(s) for s in sequences), default=0), width or 0)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, s in enumerate(sequences):
        out[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def shares_prompts(input_ids, prompt_width, group_size):
    """True when the rows come in whole groups of group_size rows with identical prompts."""
    b = input_ids.shape[0]
    if group_size < 2 or b % group_size or prompt_width == 0:
        return False
    prompts = input_ids[:, :prompt_width].view(b // group_size, group_size, prompt_width)
    return bool((prompts == prompts[:, :1]).all())


def run_prompts_once(model, input_ids, attention_mask, G):
    """input_ids, attention_mask (B, t): rows in groups of G identical rows. Each group's row runs
    through the transformer once and its keys/values are repeated for the G rows. Returns the hidden
    states (B / G, t, D) and the cache (B rows). Used by sampling (prefill) and by training
    (completion_hidden_states), where the G paths through the repeat add up in backward, and where
    the prompts' graph gets a backward of its own (backward_separately)."""
    ids, mask = input_ids[::G], attention_mask[::G]  # (B / G, t)
    cache = DynamicCache(config=model.config)
    # Left padding: positions count real tokens only. (RoPE models are invariant to a constant shift
    # anyway; absolute-position models such as GPT-2 are not.)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                              cache=cache, use_cache=True).last_hidden_state  # (B / G, t, D)
    if torch.is_grad_enabled():
        hidden = backward_separately(hidden, cache)
    cache.batch_repeat_interleave(G)
    return hidden, cache


def backward_separately(hidden, cache):
    """Cuts the prompts' graph off the completions' one: the completions see the prompts' hidden
    states and keys/values as leaves, and once backward has filled all their gradients (summed over
    the G completions) a hook runs backward through the prompts. Same gradients; the reason is
    memory. In one graph every weight is used twice, by the prompts and by the completions, and
    autograd adds a weight's two gradients before accumulating them; the prompts' part comes last,
    so the completions' gradient of every layer waits in a buffer until the end of their backward:
    with gradient accumulation (a .grad already there) a second copy of the gradient (430 MB for
    the 135M demo model in fp32). Cut, each part goes into .grad as soon as it exists. Returns the
    hidden leaf; the cache's tensors are swapped for theirs. (Like reentrant checkpointing, this
    suits loss.backward(), not torch.autograd.grad.)"""
    slots = [(layer, name) for layer in cache.layers for name in ("keys", "values")]
    outputs = [hidden] + [getattr(layer, name) for layer, name in slots]
    # A tensor that needs no gradient (keys of a layer below every LoRA adapter) stays a plain leaf.
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in outputs]
    for (layer, name), leaf in zip(slots, leaves[1:]):
        setattr(layer, name, leaf)
    outputs, graded = zip(*[(out, leaf) for out, leaf in zip(outputs, leaves) if out.requires_grad]) or ((), ())
    outputs = list(outputs)

    def backward_through_prompts(grads):
        used = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None]
        outputs.clear()  # keep nothing of the prompts' graph alive after this
        handle.remove()
        if used:
            torch.autograd.backward([out for out, _ in used], [grad for _, grad in used])

    if graded:
        handle = torch.autograd.graph.register_multi_grad_hook(graded, backward_through_prompts, mode="all")
    return leaves[0]


@torch.no_grad()
def prefill(model, input_ids, attention_mask, group_size):
    """KV cache of the prompts (B, Tp) but their last token, which the first decoding step feeds.
    When the rows come in groups of G identical prompts (rollout order), each prompt runs once."""
    if input_ids.shape[1] < 2:
        return DynamicCache(config=model.config)
    G = group_size if shares_prompts(input_ids, input_ids.shape[1], group_size) else 1
    return run_prompts_once(model, input_ids[:, :-1], attention_mask[:, :-1], G)[1]


def sample_next_token(logits, temperature, top_p, generator):
    """logits (B, V) -> ids (B,). Temperature 0 is greedy. Otherwise one draw from softmax(logits / T),
    restricted to the nucleus (the most likely tokens holding top_p of the mass) when top_p < 1: the
    distribution the loss scores, with nothing else (no top-k, no repetition penalty from the model's
    generation config). Drawn by inverse CDF, one uniform per row; torch.multinomial draws V
    exponentials per row, 7 ms of every 70 ms decoding step of the 135M demo model on 2 CPU cores."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)  # (B, V)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before the token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.double().cumsum(dim=-1)  # (B, V); fp64 so that 150k additions do not drift
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # first cdf > u


@torch.no_grad()
def decode(model, cache, mask, step_ids, *, max_new_tokens, temperature, top_p, generator, stop_ids, pad_id):
    """The sampling loop. cache: keys/values of everything before step_ids (B, S), the tokens fed
    first (left-padded when S > 1); mask (B, cache + S). Each step feeds one token per row; a row
    that has produced a stop id gets pad_id after it; the loop ends when every row has stopped.
    Returns the new ids (B, T <= max_new_tokens) and kv = (cache, its mask), from which rows can be
    continued (guided_error_correction)."""
    stops = torch.tensor(stop_ids, device=mask.device)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)  # (B,)
    new = []
    for _ in range(max_new_tokens):
        # Positions count real tokens only (left padding, and holes GEC leaves in a continued cache).
        position = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # (B, S)
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=position, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        token = sample_next_token(logits, temperature, top_p, generator).masked_fill(done, pad_id)  # (B,)
        new.append(token)
        done |= torch.isin(token, stops)
        if done.all():
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    ids = torch.stack(new, dim=1).cpu() if new else torch.zeros((mask.shape[0], 0), dtype=torch.long)  # (B, T)
    return ids, (cache, mask[:, :cache.get_seq_length()])


def generate(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, seed, stop_ids, pad_id,
             group_size=1):
    """Completions (B, T <= max_new_tokens) of left-padded prompts (B, Tp), and the kv to continue
    them (see decode). The seed drives a private generator: the same seed gives the same samples
    and the caller's RNG is untouched. group_size: groups of G identical prompts are prefilled
    once each."""
    device = model.device
    mask = attention_mask.to(device)
    cache = prefill(model, input_ids.to(device), mask, group_size)
    return decode(model, cache, mask, input_ids[:, -1:].to(device), max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, generator=torch.Generator(device=device).manual_seed(seed),
                  stop_ids=stop_ids, pad_id=pad_id)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def pad_id_of(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sample_rollout(model, tokenizer, prompts, answers, *, group_size, max_new_tokens, temperature=1.0,
                   top_p=1.0, seed=0, keep_kv=False):
    """G = group_size completions for each prompt, sampled together, scored by reward.py.
    keep_kv: keep the sampling pass's KV cache in the rollout, for guided_error_correction."""
    encoded = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False,
                        return_tensors="pt")
    prompt_ids = encoded.input_ids.repeat_interleave(group_size, dim=0)  # (B, Tp)
    prompt_mask = encoded.attention_mask.repeat_interleave(group_size, dim=0)  # (B, Tp)
    stop_ids = stop_token_ids(tokenizer, model)
    completion_ids, kv = generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids,
                                  pad_id=pad_id_of(tokenizer), group_size=group_size)  # (B, T)
    completion_mask, truncated = completion_mask_from_eos(completion_ids, stop_ids)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + pad_id_of(tokenizer) * (1 - completion_mask),
                                   skip_special_tokens=True)
    row_answers = [answers[row // group_size] for row in range(len(texts))]
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, sampled_mask=completion_mask.clone(), truncated=truncated,
                   texts=texts, rewards=torch.tensor([reward(t, a) for t, a in zip(texts, row_answers)]),
                   actions=["none"] * len(texts), group_size=group_size, kv=kv if keep_kv else None)


def rollout_from_texts(tokenizer, model, prompts, texts, answers, group_size, truncated=None):
    """A Rollout of given response texts (saved evaluation responses, hand-made tests): each text is
    tokenized and, unless truncated, ended with EOS; rewards are scored by reward.py."""
    eos, pad_id = stop_token_ids(tokenizer, model)[0], pad_id_of(tokenizer)
    truncated = truncated or [False] * len(texts)
    encoded = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    ids = [_encode(tokenizer, t) + ([] if cut else [eos]) for t, cut in zip(texts, truncated)]
    completion_ids = right_pad(ids, pad_id)
    mask = right_pad([[1] * len(s) for s in ids], 0, width=completion_ids.shape[1])
    return Rollout(prompt_ids=encoded.input_ids.repeat_interleave(group_size, 0),
                   prompt_mask=encoded.attention_mask.repeat_interleave(group_size, 0),
                   completion_ids=completion_ids, completion_mask=mask, sampled_mask=mask.clone(),
                   truncated=torch.tensor(truncated, dtype=torch.bool), texts=list(texts),
                   rewards=torch.tensor([reward(t, answers[i // group_size]) for i, t in enumerate(texts)]),
                   actions=["none"] * len(texts), group_size=group_size)


# -----------------------------------------------------------------------------
# 3. Scoring: log-probs of the taken tokens and entropy of the full distribution


class LogprobAndEntropy(torch.autograd.Function):
    """log p(y) (n,) and entropy H (n,) of p = softmax(z), z = (hidden W^T + b) / temperature, for n
    rows of hidden (n, D), chunk_rows rows at a time, so at most two (chunk_rows, V) blocks exist, in
    forward and in backward. Autograd through log_softmax would keep (or, checkpointed,
    rebuild) several such blocks per chunk and sweep them about ten times; here backward recomputes
    the chunk's logits with one matmul and applies the closed forms in place:
        d log p_y / dz = onehot(y) - p          d H / dz = -p * (log p + H)
    Only hidden, the per-row log-normalizer and H are kept between forward and backward.
    If weight.grad exists, backward adds the weight's gradient into it rather than returning it.
    Precision: logits, the division by T and everything after are fp32 whatever the model's dtype
    (a bf16 weight is read as an fp32 copy per call): from bf16 logits the entropy at T 0.1 is off by
    ~10 % and a log-prob by up to 0.4 nats; the weight's gradient is summed in fp32 and rounded once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows):
        ctx.set_materialize_grads(False)
        scaled = hidden.float() / temperature  # (n, D): the temperature on h, not on n x V logits
        bias = None if bias is None else bias.float() / temperature
        weight32 = weight.float()  # (V, D), the weight itself when it is fp32
        n = hidden.shape[0]
        taken, entropy, lse = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        for rows in _chunks(n, chunk_rows):
            z = F.linear(scaled[rows], weight32, bias)  # (c, V) fp32
            logp = z.log_softmax(dim=-1)  # (c, V)
            y = targets[rows, None]  # (c, 1)
            taken[rows] = logp.gather(-1, y).squeeze(-1)
            lse[rows] = z.gather(-1, y).squeeze(-1) - taken[rows]  # logsumexp(z), for free
            del z  # at most two (c, V) blocks at a time
            entropy[rows] = -logp.exp().mul_(logp).sum(dim=-1)
        ctx.save_for_backward(scaled, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.hidden_dtype = temperature, chunk_rows, hidden.dtype
        return taken, entropy

    @staticmethod
    def backward(ctx, grad_taken, grad_entropy):  # (n,) each, None when unused
        scaled, weight, bias, targets, lse, entropy = ctx.saved_tensors
        T = ctx.temperature
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_taken is None:
            grad_taken = torch.zeros_like(entropy)
        weight32 = weight.float()
        grad_hidden = torch.empty_like(scaled) if need_hidden else None
        grad_weight, into_grad = weight_grad_buffer(weight) if need_weight else (None, False)
        sum_weight = grad_weight if grad_weight is None or grad_weight.dtype == torch.float32 else torch.zeros_like(weight32)
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for rows in _chunks(scaled.shape[0], ctx.chunk_rows):
            logp = F.linear(scaled[rows], weight32, bias).sub_(lse[rows, None])  # (c, V) fp32
            g = grad_taken[rows, None]  # (c, 1)
            if grad_entropy is None:  # dz = -g p + g onehot(y)
                dz = logp.exp_().mul_(-g)
            else:  # dz = -p (g + g_H (log p + H)) + g onehot(y)
                p = logp.exp()
                dz = logp.add_(entropy[rows, None]).mul_(grad_entropy[rows, None]).add_(g).mul_(p).neg_()
            dz.scatter_add_(-1, targets[rows, None], g)  # (c, V)
            if need_hidden:
                grad_hidden[rows] = dz @ weight32 / T  # z = (h / T) W^T: dh = dz W / T
            if need_weight:
                sum_weight.addmm_(dz.t(), scaled[rows])  # dW = dz^T (h / T)
            if need_bias:
                grad_bias += dz.sum(dim=0) / T
        if need_weight and sum_weight is not grad_weight:
            grad_weight.add_(sum_weight)  # the fp32 sum, rounded once to the weight's dtype
        grad_hidden = None if grad_hidden is None else grad_hidden.to(ctx.hidden_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
        return grad_hidden, None if into_grad else grad_weight, grad_bias, None, None, None


def weight_grad_buffer(weight):
    """Where a backward should put the gradient of a (V, D) weight: weight.grad itself when it already
    holds one (accumulation over micro-batches; the gradient is added in place and not returned),
    else a zero tensor to fill and return. Returned, it would be one more (V, D) tensor that autograd
    then adds into weight.grad; for the tied LM head and input embedding it is held to the end of
    backward, since autograd sums both parts first: 113 MB for SmolLM2-135M, 0.9 GB for Qwen2.5-1.5B
    in fp32. Returns (buffer, whether it is weight.grad)."""
    if weight.grad is not None:
        return weight.grad, True
    return torch.zeros_like(weight), False


def _chunks(n, size):
    return [slice(start, start + size) for start in range(0, n, size)]


class SwiGLUDown(torch.autograd.Function):
    """The Llama / Qwen2 MLP after its two input projections: (silu(g) * u) W_down^T for g, u (..., I).
    Autograd through the three operations keeps g, silu(g), u and their product, four (tokens, I)
    tensors per layer, the largest part of what training holds for backward; this keeps g and u and
    recomputes the other two in backward (elementwise, no matmul)."""

    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        return F.linear(F.silu(g) * u, weight)

    @staticmethod
    def backward(ctx, grad_out):  # (..., D)
        g, u, weight = ctx.saved_tensors
        sigmoid = torch.sigmoid(g)
        act = g * sigmoid  # silu(g)
        grad_weight = grad_out.flatten(0, -2).t() @ (act * u).flatten(0, -2) if ctx.needs_input_grad[2] else None  # (D, I)
        grad_product = grad_out @ weight  # (..., I)
        grad_u = grad_product * act
        grad_g = grad_product.mul_(u).mul_(sigmoid * (1 + g * (1 - sigmoid)))  # silu' = s (1 + g (1 - s))
        return grad_g, grad_u, grad_weight


class RMSNormFunction(torch.autograd.Function):
    """weight * x / rms(x), in fp32 as transformers' LlamaRMSNorm and Qwen2RMSNorm compute it.
    Autograd keeps x and x / rms(x); this keeps x and 1 / rms(x), one number per token."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inv_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x.float() * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.float() * inv_rms
        grad_weight = (grad_y.float() * normed).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_normed = (grad_y * weight).float()
        grad_x = inv_rms * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class EmbeddingIntoGrad(torch.autograd.Function):
    """weight[ids], as nn.Embedding (with its padding_idx, whose row gets no gradient). Autograd's
    backward builds the (V, D) gradient as a dense tensor, per backward, per stage; this adds the
    rows straight into weight.grad when it exists (weight_grad_buffer)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):  # (..., D)
        ids, weight = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])  # (n,), (n, D)
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        grad_weight, into_grad = weight_grad_buffer(weight)
        if grad_weight.dtype == torch.float32:
            grad_weight.index_add_(0, ids, rows.float())
        else:  # bf16: sum a token's repeats in fp32 (index_add_ into bf16 loses ~3 % at 1000 repeats), round once
            used, slot = ids.unique(return_inverse=True)  # (u,), (n,)
            sums = torch.zeros(len(used), rows.shape[-1], dtype=torch.float32, device=rows.device).index_add_(0, slot, rows.float())
            grad_weight.index_add_(0, used, sums.to(grad_weight.dtype))
        return None, None if into_grad else grad_weight, None


def lean_activations(model):
    """Routes every SwiGLU MLP, RMSNorm and embedding of a Llama / Qwen2 / Mistral-style model through
    the three functions above: the same numbers, a third less memory held for backward (the 135M
    demo model: 463 -> 310 MiB for a micro-batch of 4 x 64 completion tokens) and no dense (V, D)
    embedding gradient. Other modules are left alone, among them an MLP whose down_proj carries a
    LoRA adapter (SwiGLUDown reads down_proj's weight directly). Returns how many modules were routed.
    On CPU it also has transformers' SDPA attention pass grouped-query keys/values to the kernel as
    they are (enable_gqa) rather than copied for every query head (3x for SmolLM2): 310 -> 266 MiB
    held for backward in the same micro-batch, and faster decoding. (CUDA's fast kernels refuse a
    mask with enable_gqa, so there transformers' choice stands.)"""
    if next(model.parameters()).device.type == "cpu":
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"  # read by transformers at every attention call
    routed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("MLP") and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) \
                and type(module.down_proj) is torch.nn.Linear and module.down_proj.bias is None and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)  # a method: deepcopy rebinds it
        elif kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif isinstance(module, torch.nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq \
                and not module.sparse:
            module.forward = types.MethodType(_embedding_forward, module)
        else:
            continue
        routed += 1
    return routed


def _swiglu_mlp_forward(mlp, x):
    return SwiGLUDown.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)


def _rms_norm_forward(norm, x):
    return RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)


def _embedding_forward(embedding, ids):
    return EmbeddingIntoGrad.apply(ids, embedding.weight, embedding.padding_idx)


def _activation_checkpointing(model):
    """transformers 5 renamed is_gradient_checkpointing to is_activation_checkpointing."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def completion_hidden_states(model, input_ids, attention_mask, T, group_size=1):
    """(b, T, D): the hidden states that predict the last T tokens of input_ids (b, Tp + T).
    When rows come in groups sharing a prompt, each prompt runs through the transformer once and its
    keys/values are repeated for the group's G completions: the same numbers and, through the
    repeat, the same gradient (the G paths through the shared prompt add up), for about 1/G of the
    prompt's cost. Not under gradient checkpointing, which forbids the cache in training."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens only
    Tp = input_ids.shape[1] - T
    if _activation_checkpointing(model) or not shares_prompts(input_ids, Tp, group_size):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (b, Tp + T, D)
        return hidden[:, -T - 1:-1]  # the state before token t predicts token t
    G = group_size
    prompt, cache = run_prompts_once(model, input_ids[:, :Tp], attention_mask[:, :Tp], G)  # (b / G, Tp, D)
    rest = model.base_model(input_ids=input_ids[:, Tp:], attention_mask=attention_mask,
                            position_ids=position_ids[:, Tp:], cache=cache,
                            use_cache=True).last_hidden_state  # (b, T, D)
    return torch.cat([prompt[:, -1:].repeat_interleave(G, dim=0), rest[:, :-1]], dim=1)


def token_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                               chunk_rows=LOGIT_CHUNK_ROWS, group_size=1):
    """input_ids, attention_mask (B, Tp + T) with the completion in the last T columns; completion_mask
    (B, T) picks the positions to score. Returns log-probs (B, T) and entropies (B, T), 0 off the mask.

    group_size: rows come in groups of G sharing a prompt (rollout order): each prompt is run once.
    Memory: the transformer runs once over (B, Tp + T); only the N = completion_mask.sum() scored
    positions go through the LM head, chunk_rows at a time (LogprobAndEntropy), so at most two
    (chunk_rows, V) blocks exist, in training too."""
    T = completion_mask.shape[1]
    hidden = completion_hidden_states(model, input_ids, attention_mask, T, group_size)  # (B, T, D)
    keep = completion_mask.bool()  # (B, T)
    hidden, targets = hidden[keep], input_ids[:, -T:][keep]  # (N, D), (N,)
    head = model.get_output_embeddings()
    temperature = temperature if temperature > 0 else 1.0  # greedy sampling: score the plain distribution
    taken, entropy = LogprobAndEntropy.apply(hidden, head.weight, getattr(head, "bias", None), targets, temperature,
                                             chunk_rows)  # (N,) each
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)  # (B, T)
    return zeros.masked_scatter(keep, taken), zeros.masked_scatter(keep, entropy)


# -----------------------------------------------------------------------------
# 4. Guided error correction


def choose_gec_actions(needs_fix, has_solution, prompt_too_long, generator, forced_reflection=False):
    """One action per row, from one uniform draw per row (every row draws, so row i's choice does not
    depend on the others). needs_fix, has_solution, prompt_too_long: (B,) bool.
    GEC: reflection with p 1/2, answer with p 1/4, solution with p 1/4 (answer when there is no
    solution). Forced reflection (the paper's baseline): reflection for every row that needs a fix."""
    u = torch.rand(len(needs_fix), generator=generator)  # (B,)
    actions = []
    for row, draw in enumerate(u.tolist()):
        if not needs_fix[row]:
            actions.append("none")
        elif prompt_too_long[row]:
            actions.append("skipped")
        elif forced_reflection or draw < P_REFLECTION:
            actions.append("reflection")
        elif draw < P_REFLECTION + P_ANSWER or not has_solution[row]:
            actions.append("answer")
        else:
            actions.append("solution")
    return actions


def special_token_ids(tokenizer):
    """Every id that skip_special_tokens drops: the named special tokens and every added token marked
    special (Qwen's <|im_end|>, <|im_start|>, ...)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def trailing_special_start(ids, special_ids):
    """Length of ids without its trailing special tokens (EOS, and end-of-turn tokens such as Qwen's
    <|im_end|> that the model may emit before its EOS): where GEC's text is appended. The authors
    decode with skip_special_tokens, which drops them too; left in, the policy would be trained to
    talk on past an end-of-turn token."""
    end = len(ids)
    while end and ids[end - 1] in special_ids:
        end -= 1
    return end


def cached_contexts(model, rollout, ids, rows, kept_lengths, pad_id):
    """Continue rows from the sampling pass's KV cache instead of running prompt + response through
    the model again. The cache holds the prompt and every fed sampled token; a row's kept response
    (without its EOS) is a prefix of those, except a truncated response's last token, which was
    sampled but never fed. What follows the kept response in the cache (the EOS, the padding) stays
    as a hole, masked out. Fed now: that last token if any, then the cue, left-padded.
    ids: each row's tokens after GEC's rewrite (response + cue); kept_lengths: how many of them are the
    response. Returns cache, mask, step_ids."""
    cache, cache_mask = rollout.kv
    Tp = rollout.prompt_ids.shape[1]
    cached = cache_mask.shape[1] - Tp  # sampled tokens whose keys/values are in the cache
    index = torch.tensor(rows, device=cache_mask.device)
    selected = DynamicCache([(layer.keys[index], layer.values[index]) for layer in cache.layers], config=model.config)
    mask = cache_mask[index].clone()  # (n, Tp + cached)
    suffixes = []
    for k, (row, kept) in enumerate(zip(rows, kept_lengths)):
        mask[k, Tp + min(kept, cached):] = 0
        suffixes.append(ids[row][min(kept, cached):])  # the never-fed last token, if any, and the cue
    step_ids, step_mask = left_pad(suffixes, pad_id)  # (n, S)
    return selected, torch.cat([mask, step_mask.to(mask.device)], dim=1), step_ids.to(mask.device)


def guided_error_correction(model, tokenizer, rollout, answers, solutions, *, seed, forced_reflection=False,
                            reflection_tokens=REFLECTION_NEW_TOKENS, temperature=1.0, top_p=1.0):
    """Rewrite every response with r_i < MAX_REWARD, then re-score; returns a new Rollout.
    answers, solutions: one per prompt (a solution may be None or ''). Tokens GEC inserts (the cue,
    the answer sentence, the solution, their EOS) get sampled_mask 0; tokens the policy generates
    after the cue get 1."""
    G = rollout.group_size
    B = len(rollout.texts)
    stop_ids, pad_id = stop_token_ids(tokenizer, model), pad_id_of(tokenizer)
    eos = stop_ids[0]
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = rollout.prompt_mask.sum(dim=1)  # (B,)
    actions = choose_gec_actions(
        needs_fix=(rollout.rewards < MAX_REWARD).tolist(),
        has_solution=[bool(solutions[row // G]) for row in range(B)],
        prompt_too_long=(prompt_lengths >= GEC_MAX_PROMPT_TOKENS).tolist(),
        generator=generator, forced_reflection=forced_reflection)

    # Each row as lists: its token ids and, per token, 1 if sampled by the policy, 0 if inserted.
    special_ids = set(stop_ids) | special_token_ids(tokenizer)
    ids, sampled, kept = [], [], {}
    for row in range(B):
        length = int(rollout.completion_mask[row].sum())
        response = rollout.completion_ids[row, :length].tolist()
        flags = rollout.sampled_mask[row, :length].tolist()
        if actions[row] in ("none", "skipped"):
            ids.append(response)
            sampled.append(flags)
            continue
        kept[row] = trailing_special_start(response, special_ids)  # the response goes on: drop its end tokens
        response, flags = response[:kept[row]], flags[:kept[row]]
        if actions[row] == "reflection":
            inserted = _encode(tokenizer, REFLECTION_CUE)
        elif actions[row] == "answer":
            inserted = _encode(tokenizer, ANSWER_SENTENCE.format(answer=reference_answer_text(answers[row // G]))) + [eos]
        else:
            response, flags = [], []
            inserted = _encode(tokenizer, solutions[row // G]) + [eos]
        ids.append(response + inserted)
        sampled.append(flags + [0] * len(inserted))

    # Continue the reflection rows, and only them, in one decoding loop.
    continued = [row for row in range(B) if actions[row] == "reflection"]
    if continued:
        if rollout.kv is not None:
            cache, mask, step_ids = cached_contexts(model, rollout, ids, continued, [kept[row] for row in continued],
                                                    pad_id)
        else:  # a rollout that was not sampled here (saved texts): prefill prompt + response + cue
            contexts = [rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() + ids[row] for row in continued]
            context_ids, mask = (t.to(model.device) for t in left_pad(contexts, pad_id))
            cache, step_ids = prefill(model, context_ids, mask, group_size=1), context_ids[:, -1:]
        continuation, _ = decode(model, cache, mask, step_ids, max_new_tokens=reflection_tokens, temperature=temperature,
                                 top_p=top_p, generator=torch.Generator(device=model.device).manual_seed(seed + 1),
                                 stop_ids=stop_ids, pad_id=pad_id)  # (len(continued), T')
        continuation_mask, _ = completion_mask_from_eos(continuation, stop_ids)
        for k, row in enumerate(continued):
            new = continuation[k, :int(continuation_mask[k].sum())].tolist()
            ids[row] = ids[row] + new
            sampled[row] = sampled[row] + [1] * len(new)

    completion_ids = right_pad(ids, pad_id)  # (B, T')
    completion_mask = right_pad([[1] * len(s) for s in ids], 0, width=completion_ids.shape[1])  # (B, T')
    ends = [bool(s) and s[-1] in stop_ids for s in ids]
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in ids]
    rewards = torch.tensor([reward(texts[row], answers[row // G]) if actions[row] not in ("none", "skipped")
                            else float(rollout.rewards[row]) for row in range(B)])
    return Rollout(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, sampled_mask=right_pad(sampled, 0, width=completion_ids.shape[1]),
                   truncated=torch.tensor([not e for e in ends]), texts=texts, rewards=rewards, actions=actions,
                   group_size=G)
