"""
rollout.py: from problems to a scored group of responses, the input of every GRPO step.

  1. build_prompt            the problem through the chat template, as the authors prompted each family
  2. sample_rollout          G completions per prompt: each prompt prefilled once, then one decoding
                             loop for all P x G rows; masks from the first EOS, rewards from reward.py
  3. token_logprobs_and_entropy
                             per-token log p(o_t) and entropy H_t of the full next-token distribution,
                             completion positions only, through ordinary autograd (the plain path;
                             fast.py computes the same faster and leaner, --fast)
  4. guided_error_correction GEC (paper section 3.2): every response below the maximum reward is
                             continued after a reflection cue (1/2), gets the correct answer appended
                             (1/4) or is replaced by the reference solution (1/4); then re-scored:
                             choose_gec_actions -> rewrite_rows -> continue_rows -> rescore.
                             Not the paper's: the prefix branch (--gec-branches ... prefix), on-policy
                             guidance that shows the start of the solution, never the answer

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

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from cli import DEFAULT_GEC_BRANCHES, GEC_BRANCHES
from errors import fail
from precision import LOGIT_CHUNK_ROWS  # rows of logits at once while scoring
from reward import MAX_REWARD, acceptable_answers, reference_answer_text, reward

# -----------------------------------------------------------------------------
# Constants: the authors' values (grpo_aha_trainer.py)

# Appended to the user message for every family but Qwen2.5-Math, whose chat template's default
# system prompt already asks for step-by-step reasoning and a boxed answer.
STEP_BY_STEP = "\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
REFLECTION_CUE = " Wait! Something is wrong here."
ANSWER_SENTENCE = "\nWait! Something is wrong here. After verification, the correct answer is \\boxed{{{answer}}}."
# The paper's three branches, and the prefix branch (not the paper's), which takes the share of the two branches
# that show the answer: --gec-branches reflection prefix is EDGE-GRPO with those two replaced, row for row.
BRANCH_PROBABILITY = dict(reflection=0.5, answer=0.25, solution=0.25, prefix=0.5)  # of GEC_BRANCHES (cli.py)
# The prefix branch shows at most this share of the solution's tokens, so that the policy always writes the last
# quarter itself, even of a solution whose answer appears only at its very end (PrefixRL and POPE vary the
# share; one fixed value keeps the control simple). On the built-in set the answer cuts first:
# "We compute $12 + 34 =" of "We compute $12 + 34 = 46$. The answer is \boxed{46}.".
PREFIX_MAX_FRACTION = 0.75
GEC_MAX_PROMPT_TOKENS = 256          # GEC only for prompts shorter than this (their condition)

GEC_ACTIONS = ("none", "reflection", "answer", "solution", "prefix", "skipped")  # skipped: prompt too long
# Who wrote each completion token (Rollout.inserted): the policy, or GEC's text of one branch: the cue, the
# answer sentence, the solution, the solution's prefix. GEC_TEXT: the text each action inserts.
TOKEN_SOURCES = ("sampled", "cue", "answer", "solution", "prefix")
GEC_TEXT = dict(reflection="cue", answer="answer", solution="solution", prefix="prefix")


@dataclass
class Rollout:
    """One scored batch of B = P x G responses: what a GRPO step learns from. Built by sample_rollout,
    rebuilt (never mutated) by guided_error_correction."""
    prompt_ids: torch.Tensor       # (B, Tp) left-padded
    prompt_mask: torch.Tensor      # (B, Tp) 1 on prompt tokens
    completion_ids: torch.Tensor   # (B, T) right-padded
    completion_mask: torch.Tensor  # (B, T) 1 on the response up to and including its first EOS
    # (B, T) 1 where the policy sampled the token; 0 where GEC inserted it, and on padding
    sampled_mask: torch.Tensor
    inserted: torch.Tensor         # (B, T) index into TOKEN_SOURCES: 0 where the policy sampled (and on padding)
    truncated: torch.Tensor        # (B,) bool: the response hit its length cap without EOS
    texts: list                    # (B,) decoded responses, special tokens removed
    rewards: torch.Tensor          # (B,) r_i in {0, 1, 2}, see reward.py
    actions: list                  # (B,) GEC action per row, one of GEC_ACTIONS
    group_size: int                # G

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B, Tp + T)

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (B, Tp + T)


# -----------------------------------------------------------------------------
# 1. Prompts (their format is decided once per run: checkpoints.prompt_format_of)


def build_prompt(tokenizer, problem, prompt_format):
    user = problem if prompt_format == "bare" else problem + STEP_BY_STEP
    if tokenizer.chat_template is None:
        warnings.warn("the tokenizer has no chat template: prompting with plain text 'Question: ... Answer:'")
        return f"{tokenizer.bos_token or ''}Question: {user}\nAnswer:"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


# -----------------------------------------------------------------------------
# 2. Sampling


def drop_long_prompts(problems, tokenizer, prompt_format, max_prompt_length):
    """Problems whose prompt exceeds --max-prompt-length tokens are left out, and counted."""
    kept = [row for row in problems
            if len(tokenizer(build_prompt(tokenizer, row["problem"], prompt_format),
                             add_special_tokens=False).input_ids)
            <= max_prompt_length]
    if len(kept) < len(problems):
        print(f"left out {len(problems) - len(kept)} of {len(problems)} problems longer than --max-prompt-length "
              f"{max_prompt_length}")
    if not kept:
        fail(f"every problem is longer than --max-prompt-length {max_prompt_length} tokens")
    return kept


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


def real_positions(attention_mask):
    """(B, L) -> (B, L): position ids that count real tokens only, so left padding (and the holes GEC
    leaves in a continued cache) shift nothing. (RoPE models are invariant to a constant shift anyway;
    absolute-position models such as GPT-2 are not.)"""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(model, input_ids, attention_mask, group_size):
    """KV cache of the prompts (B, Tp) but their last token, which the first decoding step feeds.
    When the rows come in groups of G identical prompts (rollout order), each prompt runs once and
    its keys/values are repeated for the group."""
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] < 2:
        return cache
    G = group_size if shares_prompts(input_ids, input_ids.shape[1], group_size) else 1
    ids, mask = input_ids[::G, :-1], attention_mask[::G, :-1]  # (B / G, Tp - 1)
    model.base_model(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask), cache=cache, use_cache=True)
    cache.batch_repeat_interleave(G)
    return cache


def row_generators(seed, rows, device="cpu"):
    """One private generator per row, seeded by (seed, the row's index in the whole step's batch): a
    row draws the same numbers whichever rows share its batch and whichever process (torchrun rank)
    holds it, and the caller's RNG is untouched. rows: global row indices."""
    return [torch.Generator(device=device).manual_seed(hash((seed, row)) % 2**63) for row in rows]


def uniforms(generator, n, dtype=torch.float32, device="cpu"):
    """(n, 1) uniform draws: n from one Generator, or one from each of a list of n (row_generators)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, 1, dtype=dtype, device=device, generator=g) for g in generator])
    return torch.rand(n, 1, dtype=dtype, device=device, generator=generator)


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
    u = uniforms(generator, cdf.shape[0], cdf.dtype, cdf.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)  # first cdf > u


@torch.no_grad()
def decode(model, cache, mask, step_ids, *, max_new_tokens, temperature, top_p, generator, stop_ids, pad_id):
    """The sampling loop. cache: keys/values of everything before step_ids (B, S), the tokens fed
    first (left-padded when S > 1); mask (B, cache + S). Each step feeds one token per row; a row
    that has produced a stop id gets pad_id after it; the loop ends when every row has stopped.
    Returns the new ids (B, T <= max_new_tokens) and kv = (cache, its mask), from which rows can be
    continued (guided_error_correction). The cache grows a token at a time. Every function here that
    decodes takes the decoder in its Sampling record: fast.decode_static has this signature and gives
    the same tokens on a static cache, compiled or not (--compile)."""
    stops = torch.tensor(stop_ids, device=mask.device)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)  # (B,)
    new = []
    for _ in range(max_new_tokens):
        # Positions count real tokens only (left padding, and holes GEC leaves in a continued cache).
        position = real_positions(mask)[:, -step_ids.shape[1]:]  # (B, S)
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


@dataclass(frozen=True)
class Sampling:
    """How the policy samples, chosen by the flags (--temperature, --top-p, and --compile's decoder): one
    record from the trainer through the rollout and GEC's continuation to the decoding loop."""
    temperature: float = 1.0
    top_p: float = 1.0
    decoder: Callable = decode  # or fast.decode_static (--compile): the same signature, the same tokens


def generate(model, input_ids, attention_mask, *, max_new_tokens, seed, stop_ids, pad_id, sampling=Sampling(),
             group_size=1, first_row=0):
    """Completions (B, T <= max_new_tokens) of left-padded prompts (B, Tp), and the kv to continue
    them (see decode). Each row samples from its own generator, seeded by (seed, first_row + its
    index): the same seed gives the same samples. group_size: groups of G identical prompts are
    prefilled once each."""
    device = model.device
    mask = attention_mask.to(device)
    cache = prefill(model, input_ids.to(device), mask, group_size)
    return sampling.decoder(model, cache, mask, input_ids[:, -1:].to(device), max_new_tokens=max_new_tokens,
                            temperature=sampling.temperature, top_p=sampling.top_p,
                            generator=row_generators(seed, range(first_row, first_row + input_ids.shape[0]), device),
                            stop_ids=stop_ids, pad_id=pad_id)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def pad_id_of(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sample_rollout(model, tokenizer, prompts, answers, *, group_size, max_new_tokens, sampling=Sampling(), seed=0,
                   first_row=0):
    """G = group_size completions for each prompt, sampled together, scored by reward.py. first_row:
    the index of this batch's first row in the step's whole batch (a torchrun rank's share)."""
    return sample_with_cache(model, tokenizer, prompts, answers, group_size=group_size, max_new_tokens=max_new_tokens,
                             sampling=sampling, seed=seed, first_row=first_row)[0]


def sample_with_cache(model, tokenizer, prompts, answers, *, group_size, max_new_tokens, sampling=Sampling(),
                      seed=0, first_row=0):
    """sample_rollout, and the sampling pass's KV cache with its mask, from which guided_error_correction
    continues rows without running prompt and response through the model again."""
    encoded = tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False,
                        return_tensors="pt")
    prompt_ids = encoded.input_ids.repeat_interleave(group_size, dim=0)  # (B, Tp)
    prompt_mask = encoded.attention_mask.repeat_interleave(group_size, dim=0)  # (B, Tp)
    stop_ids = stop_token_ids(tokenizer, model)
    completion_ids, kv = generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, seed=seed,
                                  stop_ids=stop_ids, pad_id=pad_id_of(tokenizer), sampling=sampling,
                                  group_size=group_size, first_row=first_row)  # (B, T)
    completion_mask, truncated = completion_mask_from_eos(completion_ids, stop_ids)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + pad_id_of(tokenizer) * (1 - completion_mask),
                                   skip_special_tokens=True)
    row_answers = [answers[row // group_size] for row in range(len(texts))]
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, sampled_mask=completion_mask.clone(),
                      inserted=torch.zeros_like(completion_mask), truncated=truncated,
                      texts=texts, rewards=torch.tensor([reward(t, a) for t, a in zip(texts, row_answers)]),
                      actions=["none"] * len(texts), group_size=group_size)
    return rollout, kv


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
                   inserted=torch.zeros_like(mask), truncated=torch.tensor(truncated, dtype=torch.bool),
                   texts=list(texts), rewards=torch.tensor([reward(t, answers[i // group_size]) for i,
                                                            t in enumerate(texts)]),
                   actions=["none"] * len(texts), group_size=group_size)


def format_samples(rollout, problems, count=2):
    """The first response of each of the first `count` groups, one line each."""
    lines = []
    for p in range(min(count, len(problems))):
        row = p * rollout.group_size
        text = rollout.texts[row].replace("\n", " ")
        lines.append(f"  [{rollout.actions[row]:>10} r={rollout.rewards[row]:.0f}] {problems[p]['problem'][:60]!r}"
                     f" -> {text[:200]!r}{'...' if len(text) > 200 else ''}")
    return lines


def select_groups(rollout, groups):
    """The rollout's rows of the given groups (indices into its P groups), as a new Rollout."""
    G = rollout.group_size
    rows = [g * G + j for g in groups for j in range(G)]
    index = torch.tensor(rows, dtype=torch.long)
    return Rollout(prompt_ids=rollout.prompt_ids[index], prompt_mask=rollout.prompt_mask[index],
                   completion_ids=rollout.completion_ids[index], completion_mask=rollout.completion_mask[index],
                   sampled_mask=rollout.sampled_mask[index], inserted=rollout.inserted[index],
                   truncated=rollout.truncated[index],
                   texts=[rollout.texts[r] for r in rows], rewards=rollout.rewards[index],
                   actions=[rollout.actions[r] for r in rows], group_size=G)


def concat_rollouts(first, second, pad_id):
    """Two rollouts of the same G as one: prompts left-padded and completions right-padded to a
    common width."""
    def widen(t, width, value, left):
        pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
        return torch.cat([pad, t] if left else [t, pad], dim=1)
    Tp = max(first.prompt_ids.shape[1], second.prompt_ids.shape[1])
    T = max(first.completion_ids.shape[1], second.completion_ids.shape[1])
    def cat(name, width, value, left):
        return torch.cat([widen(getattr(r, name), width, value, left) for r in (first, second)])
    return Rollout(prompt_ids=cat("prompt_ids", Tp, pad_id, True), prompt_mask=cat("prompt_mask", Tp, 0, True),
                   completion_ids=cat("completion_ids", T, pad_id, False),
                   completion_mask=cat("completion_mask", T, 0, False), sampled_mask=cat("sampled_mask", T, 0, False),
                   inserted=cat("inserted", T, 0, False),
                   truncated=torch.cat([first.truncated, second.truncated]), texts=first.texts + second.texts,
                   rewards=torch.cat([first.rewards, second.rewards]), actions=first.actions + second.actions,
                   group_size=first.group_size)


# -----------------------------------------------------------------------------
# 3. Scoring: log-probs of the taken tokens and entropy of the full distribution
#    The plain path, one screen; --fast (fast.py) computes the same numbers with less time and memory.


def token_logprob(logp, targets):
    """(c, V), (c,) -> (c,): log p(o_t), the log-probability of the token that was taken."""
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def token_entropy(logp, targets):
    """(c, V) -> (c,): H_t = -sum_v p(v) log p(v), the entropy of the whole next-token distribution."""
    return -(logp.exp() * logp).sum(dim=-1)


def per_token_quantities(model, input_ids, attention_mask, completion_mask, quantities, temperature=1.0,
                         chunk_rows=LOGIT_CHUNK_ROWS):
    """input_ids, attention_mask (B, Tp + T) with the completion in the last T columns; completion_mask
    (B, T) picks the positions to score. Each of `quantities` maps the log-probs of a chunk of scored
    positions (c, V), fp32 at the sampling temperature, and their tokens (c,) to one number per
    position (c,); returns one (B, T) tensor per quantity, 0 off the mask, with gradients through
    ordinary autograd. A new per-token quantity (varentropy, top-k mass, ...) is one such function."""
    T = completion_mask.shape[1]
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=real_positions(attention_mask)).last_hidden_state  # (B, Tp + T, D)
    keep = completion_mask.bool()  # (B, T)
    # the state before token t predicts it: (N, D), (N,)
    hidden, targets = hidden[:, -T - 1:-1][keep], input_ids[:, -T:][keep]
    temperature = temperature if temperature > 0 else 1.0  # greedy sampling: score the plain distribution
    head = model.get_output_embeddings()
    columns = [[] for _ in quantities]
    for start in range(0, hidden.shape[0], chunk_rows):  # (c, V) logits at a time, not (N, V)
        rows = slice(start, start + chunk_rows)
        logp = (head(hidden[rows]).float() / temperature).log_softmax(dim=-1)  # (c, V)
        for column, quantity in zip(columns, quantities):
            column.append(quantity(logp, targets[rows]))
    zeros = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)  # (B, T)
    return [zeros.masked_scatter(keep, torch.cat(column)) if column else zeros for column in columns]


def token_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    """Log-probs log p(o_t) and entropies H_t (B, T) of the completion tokens: what the loss and EDA use."""
    taken, entropy = per_token_quantities(model, input_ids, attention_mask, completion_mask,
                                          (token_logprob, token_entropy), temperature)
    return taken, entropy


# -----------------------------------------------------------------------------
# 4. Guided error correction


def choose_gec_actions(needs_fix, has_solution, prompt_too_long, generator, forced_reflection=False,
                       branches=DEFAULT_GEC_BRANCHES):
    """One action per row, from one uniform draw per row (every row draws, so row i's choice does not
    depend on the others; generator: one Generator, or one per row, row_generators). needs_fix,
    has_solution, prompt_too_long: (B,) bool.
    GEC: reflection with p 1/2, answer with p 1/4, solution with p 1/4 (answer when there is no
    solution). Forced reflection (the paper's baseline): reflection for every row that needs a fix.
    branches: the ones allowed (--gec-branches); the draw's interval [0, 1) is cut in GEC_BRANCHES' order
    by each allowed branch's BRANCH_PROBABILITY, normalized (reflection solution: 2/3, 1/3; reflection
    prefix: 1/2, 1/2). A row without a solution falls back from solution or prefix to answer, else
    reflection, else is skipped."""
    u = uniforms(generator, len(needs_fix)).squeeze(1)  # (B,)
    weights = [BRANCH_PROBABILITY[b] if b in branches else 0.0 for b in GEC_BRANCHES]
    bounds = [sum(weights[:k + 1]) / sum(weights) for k in range(len(weights))]  # the intervals' upper ends
    actions = []
    for row, draw in enumerate(u.tolist()):
        if not needs_fix[row]:
            actions.append("none")
        elif prompt_too_long[row]:
            actions.append("skipped")
        elif forced_reflection:
            actions.append("reflection")
        else:
            branch = next((b for b, bound in zip(GEC_BRANCHES, bounds) if draw < bound), GEC_BRANCHES[-1])
            if branch in ("solution", "prefix") and not has_solution[row]:  # both need the reference solution
                branch = next((b for b in ("answer", "reflection") if b in branches), "skipped")
            actions.append(branch)
    return actions


def answer_positions(text, answers):
    """Where each acceptable form of the reference answer occurs in text (character offsets), as a
    whole number where it starts or ends with a digit: 4 occurs in "2 + 2 = 4", not in "14"."""
    starts = []
    for answer in dict.fromkeys(reference_answer_text(a) for a in acceptable_answers(answers)):
        if not answer:
            continue
        before = r"(?<![0-9])" if answer[0].isdigit() else ""
        after = r"(?![0-9])" if answer[-1].isdigit() else ""
        starts += [m.start() for m in re.finditer(before + re.escape(answer) + after, text)]
    return sorted(starts)


def answer_free_prefix(tokenizer, solution, answers, max_fraction=PREFIX_MAX_FRACTION):
    """The prefix branch's text: the longest prefix of the solution's tokens whose text stops before
    the first occurrence of the reference answer (no digit of it shown), and at most max_fraction of
    the solution's tokens. Returns its ids. The answer written another way (\\frac{1}{2} for 1/2) is
    not recognized: on such data the cap is the only guard."""
    ids = _encode(tokenizer, solution)
    cap = int(max_fraction * len(ids))
    positions = answer_positions(tokenizer.decode(ids), answers)
    if not positions:
        return ids[:cap]
    first = positions[0]
    low, high = 0, cap  # binary search: the longest n <= cap whose text ends at or before the answer
    while low < high:
        n = (low + high + 1) // 2
        if len(tokenizer.decode(ids[:n])) <= first:
            low = n
        else:
            high = n - 1
    return ids[:low]


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


@dataclass
class Rewrite:
    """GEC's rows as token lists while they are built: rewrite_rows makes them, continue_rows appends
    what the policy writes after the cue or the prefix, rescore pads and scores them."""
    ids: list      # (B,) each row's token ids
    sampled: list  # (B,) per token 1 if the policy sampled it, 0 if GEC inserted it
    kept: dict     # rewritten row -> how many of its tokens are the original response (its end tokens dropped)


def rewrite_rows(tokenizer, rollout, actions, answers, solutions, stop_ids):
    """Each row as GEC rewrites it, before any continuation: a Rewrite of its token ids, per token 1 if
    the policy sampled it and 0 if GEC inserted it, and for each rewritten row how many of its tokens
    are the original response (without its trailing special tokens)."""
    G = rollout.group_size
    eos = stop_ids[0]
    special_ids = set(stop_ids) | special_token_ids(tokenizer)
    ids, sampled, kept = [], [], {}
    for row, action in enumerate(actions):
        length = int(rollout.completion_mask[row].sum())
        response = rollout.completion_ids[row, :length].tolist()
        flags = rollout.sampled_mask[row, :length].tolist()
        if action in ("none", "skipped"):
            ids.append(response)
            sampled.append(flags)
            continue
        kept[row] = trailing_special_start(response, special_ids)  # the response goes on: drop its end tokens
        response, flags = response[:kept[row]], flags[:kept[row]]
        if action == "reflection":  # the policy continues after the cue (continue_rows)
            inserted = _encode(tokenizer, REFLECTION_CUE)
        elif action == "answer":
            inserted = _encode(tokenizer,
                               ANSWER_SENTENCE.format(answer=reference_answer_text(answers[row // G]))) + [eos]
        elif action == "solution":  # the reference solution replaces the response
            response, flags = [], []
            inserted = _encode(tokenizer, solutions[row // G]) + [eos]
        else:  # "prefix": the solution's start replaces the response; the policy continues it (continue_rows)
            response, flags, kept[row] = [], [], 0
            inserted = answer_free_prefix(tokenizer, solutions[row // G], answers[row // G])
        ids.append(response + inserted)
        sampled.append(flags + [0] * len(inserted))
    return Rewrite(ids, sampled, kept)


def cached_contexts(model, rollout, kv, ids, rows, kept_lengths, pad_id):
    """Continue rows from the sampling pass's KV cache instead of running prompt + response through
    the model again. The cache holds the prompt and every fed sampled token; a row's kept response
    (without its EOS) is a prefix of those, except a truncated response's last token, which was
    sampled but never fed. What follows the kept response in the cache (the EOS, the padding) stays
    as a hole, masked out. Fed now: that last token if any, then the cue, left-padded.
    kv: (cache, its mask) from sample_with_cache; ids: each row's tokens after GEC's rewrite
    (response + cue); kept_lengths: how many of them are the response. Returns cache, mask, step_ids."""
    cache, cache_mask = kv
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


def continue_rows(model, rollout, kv, rewrite, rows, sampling, *, seed, max_new_tokens, stop_ids, pad_id,
                  first_row=0):
    """The policy goes on after the reflection cue (or the solution's prefix), for `rows` only, in one
    decoding loop: from the sampling cache when there is one (kv), else from a fresh prefill of
    prompt + response + cue.
    The new tokens are appended to the rewrite's rows (sampled flag 1), in place."""
    ids = rewrite.ids
    if kv is not None:
        cache, mask, step_ids = cached_contexts(model, rollout, kv, ids, rows,
                                                [rewrite.kept[row] for row in rows], pad_id)
    else:  # a rollout that was not sampled here (saved texts)
        contexts = [rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() + ids[row] for row in rows]
        context_ids, mask = (t.to(model.device) for t in left_pad(contexts, pad_id))
        cache, step_ids = prefill(model, context_ids, mask, group_size=1), context_ids[:, -1:]
    continuation, _ = sampling.decoder(
        model, cache, mask, step_ids, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, generator=row_generators(seed, [first_row + row for row in rows], model.device),
        stop_ids=stop_ids, pad_id=pad_id)  # (len(rows), T')
    continuation_mask, _ = completion_mask_from_eos(continuation, stop_ids)
    for k, row in enumerate(rows):
        new = continuation[k, :int(continuation_mask[k].sum())].tolist()
        ids[row] = ids[row] + new
        rewrite.sampled[row] = rewrite.sampled[row] + [1] * len(new)


def rescore(tokenizer, rollout, actions, rewrite, answers, stop_ids, pad_id):
    """The rewritten rows as a new Rollout: padded tensors, texts, and rewards (rows GEC left alone
    keep theirs); each inserted token marked with its row's branch (Rollout.inserted)."""
    G, ids, sampled = rollout.group_size, rewrite.ids, rewrite.sampled
    completion_ids = right_pad(ids, pad_id)  # (B, T')
    completion_mask = right_pad([[1] * len(s) for s in ids], 0, width=completion_ids.shape[1])  # (B, T')
    sources = [[0 if flag else TOKEN_SOURCES.index(GEC_TEXT.get(action, "sampled")) for flag in flags]
               for flags, action in zip(sampled, actions)]
    ends = [bool(s) and s[-1] in stop_ids for s in ids]
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in ids]
    rewards = torch.tensor([reward(texts[row], answers[row // G]) if action not in ("none", "skipped")
                            else float(rollout.rewards[row]) for row, action in enumerate(actions)])
    return Rollout(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, sampled_mask=right_pad(sampled, 0, width=completion_ids.shape[1]),
                   inserted=right_pad(sources, 0, width=completion_ids.shape[1]),
                   truncated=torch.tensor([not e for e in ends]), texts=texts, rewards=rewards, actions=actions,
                   group_size=G)


def guided_error_correction(model, tokenizer, rollout, answers, solutions, *, seed, reflection_tokens, kv=None,
                            forced_reflection=False, sampling=Sampling(), first_row=0, branches=DEFAULT_GEC_BRANCHES):
    """GEC: rewrite every response with r_i < MAX_REWARD, then re-score; returns a new Rollout.
    answers, solutions: one per prompt (a solution may be None or ''); kv: the sampling pass's cache
    (sample_with_cache), if any. Tokens GEC inserts (the cue, the answer sentence, the solution,
    their EOS, the solution's prefix) get sampled_mask 0; tokens the policy generates after the cue or
    the prefix get 1."""
    G, B = rollout.group_size, len(rollout.texts)
    stop_ids, pad_id = stop_token_ids(tokenizer, model), pad_id_of(tokenizer)
    actions = choose_gec_actions(
        needs_fix=(rollout.rewards < MAX_REWARD).tolist(),
        has_solution=[bool(solutions[row // G]) for row in range(B)],
        prompt_too_long=(rollout.prompt_mask.sum(dim=1) >= GEC_MAX_PROMPT_TOKENS).tolist(),
        generator=row_generators(seed, range(first_row, first_row + B)), forced_reflection=forced_reflection,
        branches=branches)
    rewrite = rewrite_rows(tokenizer, rollout, actions, answers, solutions, stop_ids)
    continuing = [row for row in range(B) if actions[row] in ("reflection", "prefix")]  # one decoding loop for both
    if continuing:
        continue_rows(model, rollout, kv, rewrite, continuing, sampling, seed=seed + 1,
                      max_new_tokens=reflection_tokens, stop_ids=stop_ids, pad_id=pad_id, first_row=first_row)
    return rescore(tokenizer, rollout, actions, rewrite, answers, stop_ids, pad_id)


# -----------------------------------------------------------------------------
# 5. A response's tokens as text, for the viewer (analysis.py view)


def token_pieces(tokenizer, ids):
    """The text each token adds to the decoded response (special tokens add none): pieces whose
    concatenation is tokenizer.decode(ids, skip_special_tokens=True). A character split over several
    byte tokens shows on the token that completes it. Each step decodes a short window, so a
    response costs O(T) decodes, as incremental detokenizers (vLLM's) do."""
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=True)
    pieces, start, read = [], 0, 0  # the window ids[start:read] is already shown
    for k in range(1, len(ids) + 1):
        shown, now = decode(ids[start:read]), decode(ids[start:k])
        if len(now) > len(shown) and now.startswith(shown) and not now.endswith("\ufffd"):
            pieces.append(now[len(shown):])
            start, read = read, k
        else:
            pieces.append("")  # nothing new yet (a special token, or half a character)
    text, joined = decode(ids), "".join(pieces)
    if pieces and text.startswith(joined):
        pieces[-1] += text[len(joined):]  # a character cut off by the length cap
    elif pieces:  # a tokenizer whose window decodes disagree with the whole: one piece per row, exact
        pieces = [text] + [""] * (len(ids) - 1)
    return pieces
