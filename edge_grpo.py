"""
edge_grpo.py: the EDGE-GRPO trainer. One step:

  P prompts x G samples -> rewards -> guided error correction (GEC) -> group advantages A_i
  -> entropy-driven advantages (EDA) A_i * mean_j(H_j) / H_i -> PPO-clip token loss
  -> micro-batched backward -> clip grad -> AdamW -> LR schedule

  python edge_grpo.py                                  # short real run: embedded SmolLM2-135M, CPU, < 10 min
  python edge_grpo.py --model qwen2.5-math-1.5b       # the paper's run, one GPU (fetches the paper's data once)
  python edge_grpo.py --no-gec --no-eda                # vanilla GRPO;  --forced-reflection --no-eda: the baseline
  torchrun --nproc-per-node 8 edge_grpo.py --model qwen2.5-math-1.5b --prompts-per-step 8   # 8 GPUs (distributed.py)
  torchrun --nproc-per-node 8 edge_grpo.py --model qwen2.5-math-7b --prompts-per-step 8 --fsdp  # sharded state

Dimensions: P prompts per step, G = --num-generations, B = P x G rows, T completion tokens.

Read top to bottom: the algorithm (pure functions, in the order a step uses them, each GRPO-family
variant right after what it replaces), one step, DAPO's dynamic sampling, the loop; then the
machinery (optimizer and schedule, the memory plan, main). The flags and their defaults: cli.py.
Elsewhere: rollout.py (sampling, scoring, GEC), reward.py, precision.py (bf16 and smaller GPUs),
lora.py, fast.py (--fast: the same numbers with less time and memory), distributed.py (torchrun),
checkpoints.py (loading models, checkpoints, resume), data.py; replicate.py runs the paper's
comparison over seeds.

Departures from the authors' code, each on purpose (README's table has them all): EDA's H_i is the
mean entropy over the response's real tokens (theirs averages padding too), detached, floored and its
scale clamped (--authors-eda restores theirs); the loss is TRL's "grpo" aggregation, which their
"bnpo" with one completion per GPU is.
"""

import cli

if __name__ == "__main__":
    cli.parse_args()  # a flag error or --help answers now, before torch and transformers load (seconds)

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import distributed
import fast
import trackers
from checkpoints import (completion_lines, directory_mb, hold_lock, write_config, load_model_and_tokenizer,
                         load_trainer_state, prepare_output_dir, prompt_format_of, reference_model, resolve_device,
                         resolve_dtype, restore_trainer_state, save_checkpoint, stop_on_signals, trim_run_logs)
from cli import arm_name
from data import load_data, next_prompts
from errors import fail
from lora import add_adapters, adapters_disabled, load_adapter
from optim import build_optimizer, make_scheduler, resumed_anchor
from precision import check_memory_plan, peak_memory_mb, split_master_weights, uses_masters
from reward import FORMAT_REWARD, MAX_REWARD, boxed_answer, format_reward
from rollout import (GEC_ACTIONS, TOKEN_SOURCES, Sampling, build_prompt, concat_rollouts, decode, drop_long_prompts,
                     format_samples, guided_error_correction, rollout_from_texts, sample_with_cache, select_groups,
                     token_logprobs_and_entropy)

# -----------------------------------------------------------------------------
# Constants (the flags' defaults are in cli.py)

ADVANTAGE_EPS = 1e-4       # A_i = (r_i - mean) / (std + 1e-4): the authors' (TRL's) epsilon
NGRPO_EPS = 1e-6           # NGRPO's epsilon in the same place (its authors' code)
ENTROPY_FLOOR = 1e-6       # H_i below this is treated as this: a response of certain tokens gives no NaN
EDA_SCALE_RANGE = (0.1, 10.0)  # mean(H)/H_i clamped here: the bound the authors wrote (commented out) in their EDA
COLLAPSE_WARN_STEPS = 5    # warn after this many steps in a row with every group collapsed after GEC
NONFINITE_STOP_STEPS = 3   # stop after this many steps in a row whose updates had NaN or inf gradients
# --reward: what the advantages are computed from (trained_rewards), and that reward's maximum
REWARD_MAXIMUM = {"exact-match": MAX_REWARD, "format-only": FORMAT_REWARD}


# -----------------------------------------------------------------------------
# The algorithm: pure functions on tensors, in pipeline order


# rewards, shaped


def trained_rewards(rollout, kind="exact-match"):
    """(B,) the rewards the advantages are computed from. exact-match: reward.py's format + accuracy
    (0/1/2), as the rollout was scored; format-only: the format part alone, 1 for any boxed answer,
    right or wrong. GEC still rewrites the wrong responses (it knows the reference), so under
    format-only the correct answers reach the policy only through the text GEC inserts."""
    if kind == "format-only":
        return torch.tensor([format_reward(text) for text in rollout.texts], dtype=rollout.rewards.dtype)
    return rollout.rewards


def overlong_penalty(lengths, max_length, buffer):
    """(B,) -> (B,): DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward:
    0 up to max_length - buffer tokens, then falling linearly to -1 at max_length, -1 beyond."""
    lengths = lengths.float()
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_length, ramp, -torch.ones_like(lengths)))


# group advantages (GRPO, NGRPO)


def group_advantages(rewards, G, scale=True, eps=ADVANTAGE_EPS):
    """(B,) -> (B,). A_i = (r_i - mean_group r) / (std_group r + eps), std as torch.std: the sample
    std (ddof = 1), the authors' convention. A group of equal rewards gives exactly 0 (its centered
    rewards are 0), never NaN. scale=False: mean-only, A_i = r_i - mean."""
    r = rewards.view(-1, G).float()  # (P, G)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


def virtual_max_advantages(rewards, G, max_reward=MAX_REWARD, scale=True, eps=NGRPO_EPS):
    """(B,) -> (B,). NGRPO's advantage calibration (Nan et al. 2025): each group's mean and std
    (sample std, as torch.std) are taken over its G rewards plus one virtual response of the maximum
    reward, which is not trained on: A_i = (r_i - mean(r, r_max)) / (std(r, r_max) + 1e-6). An
    all-wrong group now gets negative advantages instead of 0; an all-correct group still gets 0."""
    r = rewards.view(-1, G).float()  # (P, G)
    augmented = torch.cat([r, torch.full_like(r[:, :1], max_reward)], dim=1)  # (P, G + 1)
    centered = r - augmented.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (augmented.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


# EDA: the entropy-driven advantage


def masked_mean(x, mask, dim=-1):
    """Mean of x over mask == 1 along dim; 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def entropy_driven_advantages(advantages, entropies, G, floor=ENTROPY_FLOOR, scale_range=EDA_SCALE_RANGE):
    """(B,), (B,) -> (B,). EDA: A_i' = A_i * mean_group(H) / H_i. Confident responses (low H_i) weigh
    more, uncertain ones less. H_i is floored so a near-certain response gives no inf, and the scale
    is clamped to scale_range (None: unclamped, the authors' behaviour). The group mean is detached."""
    H = entropies.clamp(min=floor).view(-1, G)  # (P, G)
    scale = H.mean(dim=1, keepdim=True).detach() / H
    if scale_range is not None:
        scale = scale.clamp(*scale_range)
    return advantages * scale.view(-1)


# SEED-GRPO: the advantages scaled by the group's semantic entropy


def answer_clusters(texts):
    """One cluster id per response: responses whose \\boxed{} answers are the same answer to reward.py's
    exact-match checker (equal boxed_answer) share one; a response without a boxed answer is a
    cluster of its own (as SEED-GRPO's authors treat one without an answer)."""
    ids, keys = [], {}
    for i, text in enumerate(texts):
        answer = boxed_answer(text)
        key = ("answer", answer) if answer is not None else ("none", i)
        ids.append(keys.setdefault(key, len(keys)))
    return ids


def semantic_entropy(texts, G):
    """B responses in groups of G -> (P,) SE(q) = -sum_k p_k log p_k over each group's answer clusters,
    p_k = |C_k| / G (the frequency estimate of semantic entropy): 0 when all G answers agree, log G
    when all differ. SEED-GRPO weights each cluster by its responses' probabilities instead."""
    entropies = []
    for start in range(0, len(texts), G):
        counts = torch.bincount(torch.tensor(answer_clusters(texts[start:start + G]))).float()
        p = counts[counts > 0] / G
        entropies.append(-(p * p.log()).sum())
    return torch.stack(entropies)


def semantic_entropy_scale(entropies, G, alpha):
    """(P,) -> (P,). SEED-GRPO (Chen et al. 2025, eq. 6): A_i' = A_i * f(alpha * SE(q) / SE_max), with
    SE_max = log G and f(x) = 1 / (1 + x), the form of its authors' code (their alpha: --seed-grpo-alpha):
    a group whose answers disagree (the model is unsure) moves the policy less; one that agrees keeps
    its full step."""
    return 1.0 / (1.0 + alpha * entropies / math.log(G))


# which tokens the loss trains, and with what weight


def trained_token_mask(rollout, inserted_tokens):
    """(B, T) 1 on the tokens the loss trains: each response up to its EOS, less GEC's inserted text under
    --inserted-tokens mask, and never the prefix branch's prefix: the policy is conditioned on it, as on
    the prompt, and learns only from what it writes after it (PrefixRL, POPE)."""
    mask = rollout.completion_mask * (rollout.sampled_mask if inserted_tokens == "mask" else 1)
    return mask * (rollout.inserted != TOKEN_SOURCES.index("prefix"))


def trained_tokens_by_source(loss_mask, inserted):
    """(B, T), (B, T) -> {source: tokens the loss trains} over TOKEN_SOURCES: the policy's own ("sampled")
    and each kind of text GEC inserted; how much of a step's update is copied text."""
    return {name: int((loss_mask.bool() & (inserted == k)).sum()) for k, name in enumerate(TOKEN_SOURCES)}


def token_weights(loss_mask, loss_type, max_completion_length, micro_batches, step_counts=None):
    """(B, T) -> (B, T): the weight of each token in the step's loss, fixed once per optimizer step so
    that micro-batches summing their weighted losses give exactly the loss and gradient TRL's
    GRPOTrainer defines for the same micro-batches (its loss_type names, its meanings):
      grpo:    1/(len_i x B), each response's token mean then the mean over responses (the authors'
               effective aggregation);
      bnpo:    1/(tokens in the row's micro-batch x number of micro-batches): a token mean per
               micro-batch, then the mean over micro-batches (depends on the micro-batching, as TRL's);
      dapo:    1/(tokens in the step), one token mean over the whole step;
      dr_grpo: 1/(B x max_completion_length), a constant.
    micro_batches: lists of row indices, the partition of the B rows the update uses. When the step's
    rows are split over processes (distributed.py), step_counts holds the whole step's rows,
    micro-batches and tokens (3,), summed over them; by default this process's own."""
    mask = loss_mask.float()
    if step_counts is None:
        step_counts = torch.tensor([mask.shape[0], len(micro_batches), mask.sum()])
    B, batches, tokens = step_counts.tolist()  # the whole step's
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / B
    if loss_type == "bnpo":
        weights = torch.zeros_like(mask)
        for rows in micro_batches:
            weights[rows] = mask[rows] / mask[rows].sum().clamp(min=1) / batches
        return weights
    if loss_type == "dapo":
        return mask / max(tokens, 1)
    if loss_type == "dr_grpo":
        return mask / (B * max_completion_length)
    raise ValueError(f"unknown loss type {loss_type!r}")


def high_entropy_tokens(entropy, mask, quantile):
    """(b, T) -> (b, T) 0/1: the tokens whose entropy H_t is in the top `quantile` fraction of the
    masked tokens, the "forking tokens" of Wang et al. 2025 ("Beyond the 80/20 rule": training on the
    top 20 % alone); 1.0 keeps every token. Ties at the threshold are kept."""
    if quantile >= 1:
        return mask.float()
    H = entropy.detach().float()
    threshold = torch.quantile(H[mask.bool()], 1 - quantile) if mask.any() else H.new_tensor(0.0)
    return mask.float() * (H >= threshold).float()


def entropy_band_tokens(entropy, mask, low, high):
    """(b, T) -> (b, T) 0/1: the tokens whose entropy H_t lies between the `low` and `high` quantiles
    of the masked tokens (both kept at ties): an entropy band of forking tokens, as SPINE (Wu et al.
    2025) selects them, that also leaves out the noisiest top; (1 - q, 1) is the top q fraction."""
    H = entropy.detach().float()
    if not mask.any():
        return mask.float()
    lo, hi = torch.quantile(H[mask.bool()], torch.tensor([low, high], device=H.device))
    return mask.float() * ((H >= lo) & (H <= hi)).float()


# the losses: PPO-clip (per token, or per sequence: GSPO), KL, SFT


def sequence_log_ratio(logp, old_logp, mask):
    """(b, T) -> (b, 1): GSPO's sequence-level log importance ratio (Zheng et al. 2025),
    log s_i = mean_t (log pi(o_t) - log pi_old(o_t)) over the response's tokens, i.e.
    s_i = (pi(y_i) / pi_old(y_i)) ^ (1 / |y_i|), the length-normalised sequence ratio."""
    return masked_mean(logp - old_logp, mask)[:, None]


def clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high, sequence_mask=None):
    """(b, T), (b, T), (b,) -> per-token loss (b, T) and whether the clip was active (b, T).
    PPO-clip: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), ratio per token; with
    sequence_mask (b, T), GSPO: every token of response i uses its sequence's ratio s_i."""
    log_ratio = logp - old_logp if sequence_mask is None else sequence_log_ratio(logp, old_logp, sequence_mask)
    ratio = torch.exp(log_ratio).expand_as(logp)
    A = advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    return -torch.min(unclipped, clipped), clipped < unclipped


def kl_k3(logp, ref_logp):
    """(b, T) -> (b, T): the k3 estimator of KL(pi || pi_ref), exp(d) - d - 1 with d = ref - logp; >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def sft_loss(logp, weights):
    """(b, T), (b, T) -> the micro-batch's share of the supervised loss: -sum_t w_t log p(o_t), with
    w_t = 1 / (the step's solution tokens) on every solution token, so that the micro-batches add up
    to the token-mean negative log-likelihood of the step's reference solutions (and their EOS)."""
    return -(logp * weights).sum()


# what the paper plots: advantage variance, collapse (Fig. 5)


def group_variance(x, G):
    """(B,) -> mean over groups of the sample variance within each group: the paper's Fig. 5
    quantity (about 1 for a mixed group of std-normalized advantages, 0 for a collapsed one)."""
    return x.view(-1, G).var(dim=1).mean().item()


def collapsed_groups(rewards, G):
    """(B,) -> (P,) bool: the groups whose rewards are all equal (advantage collapse: no gradient)."""
    r = rewards.view(-1, G)
    return (r == r[:, :1]).all(dim=1)


def zero_std_fraction(rewards, G):
    """Share of groups whose rewards are all equal: advantage collapse."""
    return collapsed_groups(rewards, G).float().mean().item()


# -----------------------------------------------------------------------------
# One step: sample -> correct -> advantages -> token weights -> micro-batch losses -> optimizer step


@dataclass
class MicroBatch:
    """Rows of the rollout for one forward and backward; columns that are padding in every row are cut."""
    rows: list                     # which of the B rows
    input_ids: torch.Tensor        # (b, Tp + T) prompt and completion
    attention_mask: torch.Tensor   # (b, Tp + T)
    completion_mask: torch.Tensor  # (b, T)
    per_token: dict                # name -> (b, T): this micro-batch's part of the step's per-token tensors


def micro_batch(rollout, rows, per_token, device):
    prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
    # the first column with a prompt token
    start = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else 0
    width = max(int(completion_mask.sum(1).max()), 1)
    ids = torch.cat([rollout.prompt_ids[rows, start:], rollout.completion_ids[rows, :width]], dim=1)
    mask = torch.cat([prompt_mask[:, start:], completion_mask[:, :width]], dim=1)
    return MicroBatch(rows, ids.to(device), mask.to(device), completion_mask[:, :width].to(device),
                      {name: t[rows, :width].to(device) for name, t in per_token.items()})


def logprobs_and_entropies(model, batch, args, group_size, temperature=None):
    """log p(o_t) and H_t (b, T) of a micro-batch's completion tokens at the sampling temperature (or
    the one given): the fast path (fast.py: each group's prompt once, the fused LM head) or the plain
    one (rollout.py), equal numbers."""
    temperature = args.temperature if temperature is None else temperature
    if args.fast:
        return fast.fused_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                                                temperature=temperature, group_size=group_size)
    return token_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, batch.completion_mask,
                                      temperature=temperature)


def response_entropy(entropy, completion_mask, authors_eda):
    """(b, T) -> H_i (b,), the mean over the response's own tokens. Ours detached; the authors' keeps
    the gradient (theirs is torch.mean over a completion tensor that, with one completion per GPU,
    holds exactly that row's tokens)."""
    return masked_mean(entropy if authors_eda else entropy.detach(), completion_mask)


def step_advantages(advantages, H, G, args):
    """The advantages the loss uses, and the one place EDA is applied: A_i x mean_group(H) / H_i with
    --eda (the scale unclamped under --authors-eda), A_i as they are with --no-eda."""
    if not args.eda:
        return advantages
    return entropy_driven_advantages(advantages, H, G, scale_range=None if args.authors_eda else EDA_SCALE_RANGE)


@torch.no_grad()
def rollout_pass(model, rollout, batches, args):
    """A no-grad pass over the rollout before the update: old log-probs (B, T) and H_i (B,)."""
    device = next(model.parameters()).device
    old_logp, H = torch.zeros(rollout.completion_mask.shape), torch.zeros(len(rollout.texts))
    with distributed.gathered(model):  # --fsdp: the whole model gathered once for the pass
        for rows in batches:
            batch = micro_batch(rollout, rows, {}, device)
            logp, entropy = logprobs_and_entropies(model, batch, args, rollout.group_size)
            old_logp[rows, :logp.shape[1]] = logp.float().cpu()
            H[rows] = response_entropy(entropy.float(), batch.completion_mask, authors_eda=False).cpu()
    return old_logp, H


def reference_policy(model, ref_model):
    """The block in which ref_model computes pi_ref: a frozen copy as it is, or, under LoRA, the
    model itself with its adapters off."""
    return adapters_disabled(model) if ref_model is model else contextlib.nullcontext()


def micro_batch_loss(model, ref_model, batch, logp, entropy, old_logp, A, args, G):
    """The PPO-clip token loss of a micro-batch (+ beta x k3 KL to the reference), each token weighted
    by token_weights and summed: the micro-batch's share of the step's loss. Returns the loss and, for
    the metrics, its clipped tokens and summed KL."""
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    trained = batch.per_token["loss_mask"]  # (b, T)
    sequence_mask = trained if args.importance_sampling_level == "sequence" else None  # GSPO
    per_token, clip_active = clipped_policy_loss(logp, old_logp, A, args.epsilon, eps_high, sequence_mask)  # (b, T)
    forking = (entropy_band_tokens(entropy, trained, *args.entropy_band) if args.entropy_band  # (b, T): 1 where
               else high_entropy_tokens(entropy, trained, args.top_entropy_quantile))         # the gradient flows
    per_token = per_token * forking
    kl_sum = 0.0
    if ref_model is not None:
        with torch.no_grad(), reference_policy(model, ref_model):
            ref_logp, _ = logprobs_and_entropies(ref_model, batch, args, G)
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + args.beta * kl
        kl_sum = (kl.detach() * trained).sum().item()
    loss = (per_token * batch.per_token["weights"]).sum()
    return loss, dict(clipped=(clip_active.float() * trained).sum().item(), kl=kl_sum, updated=forking.sum().item())


def optimizer_step(optimizer, scheduler, args, master_weights):
    """Clips the summed gradient's norm, steps AdamW (on the fp32 masters under mixed precision, whose
    rounding the model then takes), advances the schedule, zeroes the gradients in place (they are
    views of one flat buffer). Under torchrun the ranks' gradients are summed first. A gradient with
    NaN or inf is dropped instead, the weights and the schedule untouched. Returns the norm before
    clipping (every rank the same)."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.sum_gradients(trained)  # each rank's part of the step's gradient: the whole on every rank
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
    if isinstance(grad_norm, distributed.DTensor):  # --fsdp: the norm of the sharded gradients, reduced over ranks
        grad_norm = grad_norm.full_tensor()
    if not math.isfinite(float(grad_norm)):  # NaN or inf: the update would poison the weights, so it is skipped
        optimizer.zero_grad(set_to_none=False)
        return float(grad_norm)
    optimizer.step()
    scheduler.step()
    if master_weights is not None:
        master_weights.copy_to_model()
    optimizer.zero_grad(set_to_none=False)
    return float(grad_norm)


def policy_update(model, ref_model, optimizer, scheduler, rollout, args, master_weights=None, shaping=None,
                  advantage_scale=None, token_entropy=False):
    """advantages -> token weights -> micro-batch losses -> optimizer step, --num-iterations times.
    master_weights (precision.py): the optimizer updates fp32 masters of a bf16 model. shaping (B,):
    added to the rewards before the advantages (--overlong-buffer); advantage_scale (B,): multiplies
    the advantages, before EDA (--seed-grpo). token_entropy: also return each token's H_t (per_row's
    H_t, else None), copied off the device only for the steps completions.jsonl logs. Returns metrics."""
    G, B = rollout.group_size, len(rollout.texts)
    device = next(model.parameters()).device
    loss_mask = trained_token_mask(rollout, args.inserted_tokens)  # (B, T)
    size = args.micro_batch_size  # a multiple of G keeps whole groups in each micro-batch
    batches = [list(range(s, min(s + size, B))) for s in range(0, B, size)]
    rewards = trained_rewards(rollout, args.reward) + (0 if shaping is None else shaping)  # (B,)
    A = (virtual_max_advantages(rewards, G, max_reward=REWARD_MAXIMUM[args.reward],
                                scale=args.scale_rewards) if args.ngrpo
         else group_advantages(rewards, G, scale=args.scale_rewards))  # (B,) the group advantages A_i
    if advantage_scale is not None:
        A = A * advantage_scale
    # the normalizers count the whole step: rows, micro-batches and tokens summed over the ranks (torchrun)
    step_counts = distributed.all_reduce_sum(torch.tensor([B, len(batches), loss_mask.sum()], dtype=torch.float64))
    weights = token_weights(loss_mask, args.loss_type, args.max_completion_length, batches, step_counts)  # (B, T)
    per_token = dict(weights=weights, loss_mask=loss_mask.float())
    # A_eda (B,): the advantages the loss uses, after EDA. EDA reads H_i from the training forward itself,
    # unless a no-grad pass must come first: for old log-probs (num_iterations > 1), or when a micro-batch
    # splits a group (EDA's mean is the group's); then A_eda is fixed before the first micro-batch.
    H, A_eda, fixed = torch.zeros(B), A.clone(), False
    H_t = torch.zeros(loss_mask.shape) if token_entropy else None  # (B, T) each token's H_t, for the viewer
    if args.num_iterations > 1 or (args.eda and size % G):
        per_token["old_logp"], H = rollout_pass(model, rollout, batches, args)
        if not args.authors_eda:  # the authors' EDA keeps H_i's gradient: from the training forward
            A_eda, fixed = step_advantages(A, H, G, args), True
    totals = dict(loss=0.0, kl=0.0, clipped=0.0, grad_norm=0.0, updated=0.0, skipped=0)
    for iteration in range(args.num_iterations):
        for rows in batches:
            batch = micro_batch(rollout, rows, per_token, device)
            # (b, T), (b, T); as_forward: under --fsdp, FSDP gathers the LM head and reduces its gradient
            logp, entropy = distributed.as_forward(model, logprobs_and_entropies, batch, args, G)
            if iteration == 0 and token_entropy:
                H_t[rows, :entropy.shape[1]] = entropy.detach().float().cpu()
            if fixed:
                A_batch = A_eda[rows].to(device)  # (b,)
            else:
                H_batch = response_entropy(entropy, batch.completion_mask, args.authors_eda)  # (b,)
                A_batch = step_advantages(A[rows].to(device), H_batch, G, args)  # (b,)
                if iteration == 0:  # the rollout's policy: what the metrics report
                    H[rows], A_eda[rows] = H_batch.detach().float().cpu(), A_batch.detach().float().cpu()
            old_logp = batch.per_token.get("old_logp", logp.detach())
            loss, counts = micro_batch_loss(model, ref_model, batch, logp, entropy, old_logp, A_batch, args, G)
            loss.backward()
            if master_weights is not None:
                master_weights.accumulate_gradients()  # this micro-batch's bf16 gradients into the fp32 sums
            totals["loss"] += loss.item()
            totals["clipped"] += counts["clipped"]
            totals["kl"] += counts["kl"]
            totals["updated"] += counts["updated"]
        grad_norm = optimizer_step(optimizer, scheduler, args, master_weights)
        totals["grad_norm"] += grad_norm / args.num_iterations
        totals["skipped"] += not math.isfinite(grad_norm)
    tokens = float(loss_mask.sum()) * args.num_iterations
    correct = rollout.rewards == MAX_REWARD
    by_source = trained_tokens_by_source(loss_mask, rollout.inserted)
    return dict(loss=totals["loss"] / args.num_iterations, kl=totals["kl"] / max(tokens, 1),
                skipped_updates=totals["skipped"],  # updates dropped for a NaN or inf gradient
                clip_fraction=totals["clipped"] / max(tokens, 1), grad_norm=totals["grad_norm"],
                updated_fraction=totals["updated"] / max(tokens, 1),  # < 1 only with --top-entropy-quantile
                adv_var_before_eda=group_variance(A, G), adv_var=group_variance(A_eda, G),
                entropy=H.mean().item(),
                entropy_correct=H[correct].mean().item() if correct.any() else None,
                entropy_wrong=H[~correct].mean().item() if (~correct).any() else None,
                loss_tokens=sum(by_source.values()), loss_tokens_by_source=by_source,  # what the update trained on
                inserted_share=1 - by_source["sampled"] / max(sum(by_source.values()), 1),  # of it, GEC's text
                # completions.jsonl's
                per_row=dict(A=A.tolist(), A_eda=A_eda.tolist(), H=H.tolist(), H_t=H_t, loss_mask=loss_mask))


def logs_completions(args, step_number):
    """Whether step number step_number (1, 2, ...) writes its rows to completions.jsonl: every
    --log-completions-steps steps (0: never)."""
    return bool(args.log_completions_steps) and step_number % args.log_completions_steps == 0


def decoding_path(args, model):
    """The decoder rollout.py samples with: fast.decode_static on a static cache with a torch.compile'd
    step under --compile (by default on CUDA), else rollout.decode, the plain loop. The same tokens."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    compile_ = args.compile if args.compile is not None else on_cuda and not args.fsdp
    return functools.partial(fast.decode_static, compiled=True) if args.fast and compile_ else decode


def sample_and_correct(model, tokenizer, problems, seed, args, first_row=0, clock=None):
    """G samples for each problem, then GEC (if on): returns the sampled rollout and the corrected one.
    clock: a dict whose "gec" seconds this call adds to."""
    G = args.num_generations
    prompts = [build_prompt(tokenizer, row["problem"], args.prompt_format) for row in problems]
    answers = [row["answer"] for row in problems]
    sampling = Sampling(args.temperature, args.top_p, decoding_path(args, model))
    sampled, kv = sample_with_cache(model, tokenizer, prompts, answers, group_size=G,
                                    max_new_tokens=args.max_completion_length, sampling=sampling, seed=seed,
                                    first_row=first_row)
    if not args.gec:
        return sampled, sampled
    started = time.perf_counter()
    corrected = guided_error_correction(model, tokenizer, sampled, answers, [row["solution"] for row in problems],
                                        seed=seed + 1, kv=kv, forced_reflection=args.forced_reflection,
                                        reflection_tokens=args.gec_reflection_tokens, sampling=sampling,
                                        first_row=first_row, branches=args.gec_branches)
    if clock is not None:
        clock["gec"] += time.perf_counter() - started
    return sampled, corrected  # the sampling cache (kv) is freed here, before the update


def train_step(model, ref_model, tokenizer, optimizer, scheduler, problems, step, args, master_weights=None,
               first_row=0, draw=None, position=0):
    """Sample, correct, update. first_row: the index of this process's first row in the step's batch
    (torchrun: its share of the prompts). draw(position, n) -> (the next n problems of the data order,
    the new position), for --dynamic-sampling, which may draw on from `position`. Returns the step's
    metrics; what was trained on (the sampled and corrected rollouts, their problems, the advantages
    A_i before and after EDA and H_i per row: completions.jsonl's lines); the data position after it."""
    G = args.num_generations
    seed = args.seed * 1_000_003 + step * 7919  # a fresh, reproducible seed per step
    t0, clock = time.perf_counter(), dict(gec=0.0)
    model.eval()
    with distributed.gathered(model):  # --fsdp: the whole model gathered once for generation
        sampled, rollout = sample_and_correct(model, tokenizer, problems, seed, args, first_row, clock)
        drawn = len(problems)
        first_sampled = sampled  # the policy's own answers to the step's first draw: what the metrics report
        if args.dynamic_sampling:
            sampled, rollout, problems, drawn, position = dynamic_sampling(model, tokenizer, sampled, rollout, problems,
                                                                           draw, position, seed, args, clock)
    # (B,) DAPO's length shaping, on the length the policy sampled (before GEC)
    penalty = torch.zeros(len(rollout.texts))
    if args.overlong_buffer:
        penalty = overlong_penalty(sampled.completion_mask.sum(1), args.max_completion_length, args.overlong_buffer)
    t2 = time.perf_counter()
    model.train()
    learning_rate = float(scheduler.get_last_lr()[0])  # a tensor under torchao
    # SEED-GRPO's uncertainty: the semantic entropy of the policy's own answers (before GEC), per group
    uncertainty = semantic_entropy(sampled.texts, G)  # (P,)
    scale = (semantic_entropy_scale(uncertainty, G, args.seed_grpo_alpha).repeat_interleave(G) if args.seed_grpo
             else None)
    update = policy_update(model, ref_model, optimizer, scheduler, rollout, args, master_weights, shaping=penalty,
                           advantage_scale=scale, token_entropy=logs_completions(args, step + 1))
    per_row = update.pop("per_row")
    t3 = time.perf_counter()
    # the tokens GEC had the policy write (after the cue or the prefix)
    continued = (rollout.sampled_mask.sum() - sampled.sampled_mask.sum()).clamp(min=0)
    generated = int(sampled.completion_mask.sum()) + int(continued)
    trained_groups = len(rollout.texts) // G
    actions = {a: rollout.actions.count(a) for a in GEC_ACTIONS[1:]}  # reflection, answer, solution, prefix, skipped
    ended_right = {a: sum(1 for row, b in enumerate(rollout.actions) if b == a and rollout.rewards[row] == MAX_REWARD)
                   for a in GEC_ACTIONS[1:-1]}  # of each branch's rewritten rows, those that end with the right answer
    metrics = dict(
        step=step + 1, objective="rl",
        reward=rollout.rewards.mean().item(), reward_before_gec=first_sampled.rewards.mean().item(),
        accuracy=(first_sampled.rewards == MAX_REWARD).float().mean().item(),  # the policy's own answers, before GEC
        boxed=(first_sampled.rewards >= 1).float().mean().item(),
        accuracy_after_gec=(rollout.rewards == MAX_REWARD).float().mean().item(),
        zero_std_before_gec=zero_std_fraction(trained_rewards(first_sampled, args.reward), G),  # collapse of the
        zero_std_after_gec=zero_std_fraction(trained_rewards(rollout, args.reward), G),         # rewards trained on
        prompts_drawn=drawn, groups_trained=trained_groups,
        gec_actions=actions, gec_ended_right=ended_right, **update,
        completion_length=first_sampled.completion_mask.sum(1).float().mean().item(),
        truncation_rate=first_sampled.truncated.float().mean().item(),
        learning_rate=learning_rate,
        seconds_generation=t2 - t0 - clock["gec"], seconds_gec=clock["gec"], seconds_update=t3 - t2, seconds=t3 - t0,
        tokens_per_second=generated / max(t2 - t0, 1e-9), peak_memory_mb=peak_memory_mb(),
        overlong_penalty=penalty.mean().item(),
        semantic_entropy=uncertainty.mean().item(),  # SEED-GRPO's SE(q), whether or not --seed-grpo uses it
    )
    return metrics, dict(sampled=sampled, rollout=rollout, problems=problems, **per_row), position


# -----------------------------------------------------------------------------
# Supervised fine-tuning: the baseline the RL steps are compared with (--sft-steps K)


def sft_step(model, tokenizer, optimizer, scheduler, problems, step, args, master_weights=None):
    """The first --sft-steps steps: the token-mean negative log-likelihood of each drawn problem's reference
    solution and its EOS, given the prompt the RL steps use, at temperature 1 (the model's own
    distribution), over the same micro-batches, optimizer step, clipping and schedule. No sampling:
    nothing of the RL metrics exists for these steps. Returns the step's metrics."""
    t0 = time.perf_counter()
    model.train()
    learning_rate = float(scheduler.get_last_lr()[0])
    device = next(model.parameters()).device
    prompts = [build_prompt(tokenizer, row["problem"], args.prompt_format) for row in problems]
    demo = rollout_from_texts(tokenizer, model, prompts, [row["solution"] for row in problems],
                              [row["answer"] for row in problems], group_size=1)  # solution + EOS after each prompt
    batches = [list(range(s, min(s + args.micro_batch_size, len(prompts)))) for s in range(0, len(prompts),
                                                                                           args.micro_batch_size)]
    tokens = distributed.all_reduce_sum(demo.completion_mask.sum().double()).item()  # the step's, over the ranks
    weights = demo.completion_mask.float() / max(tokens, 1)  # (P, T): a token mean over the step
    loss_sum = 0.0
    for rows in batches:
        batch = micro_batch(demo, rows, dict(weights=weights), device)
        logp, _ = distributed.as_forward(model, logprobs_and_entropies, batch, args, 1, 1.0)  # (b, T)
        loss = sft_loss(logp, batch.per_token["weights"])
        loss.backward()
        if master_weights is not None:
            master_weights.accumulate_gradients()
        loss_sum += loss.item()
    grad_norm = optimizer_step(optimizer, scheduler, args, master_weights)
    seconds = time.perf_counter() - t0
    trained = int(demo.completion_mask.sum())
    return dict(step=step + 1, objective="sft", loss=loss_sum, sft_nll=loss_sum, grad_norm=grad_norm,
                skipped_updates=int(not math.isfinite(grad_norm)), learning_rate=learning_rate,
                prompts_drawn=len(problems), loss_tokens=trained,
                loss_tokens_by_source=dict(dict.fromkeys(TOKEN_SOURCES, 0), solution=trained), inserted_share=1.0,
                seconds_generation=0.0, seconds_gec=0.0, seconds_update=seconds, seconds=seconds,
                peak_memory_mb=peak_memory_mb())


# -----------------------------------------------------------------------------
# DAPO's dynamic sampling: mixed groups kept, fresh prompts drawn


def mixed_groups(rewards, G):
    """Indices of the groups whose rewards are not all equal: the ones with a gradient."""
    return (~collapsed_groups(rewards, G)).nonzero().flatten().tolist()


def dynamic_sampling(model, tokenizer, sampled, rollout, problems, draw, position, seed, args, clock=None):
    """DAPO's dynamic sampling (Yu et al. 2025), after GEC: groups whose rewards are all equal are
    dropped and fresh prompts sampled (and corrected) in their place until P mixed groups are found
    or --max-sampling-rounds more rounds have run; the step then trains on the mixed groups it has
    (all of the first round's if none is mixed). Every row of every round keeps its own generator
    (rows past the first round's are numbered on). Under torchrun every rank draws the same fresh
    prompts and samples its share of them, and the ranks exchange the groups they keep, so each
    holds the step's kept groups in one process's order and trains on its share of them. draw(position,
    n): the next n problems of the data order from position, and the position after them. Returns the
    sampled and the corrected rollouts to train on, their problems, how many prompts were drawn, and
    the data position."""
    G, P, pad_id = args.num_generations, len(problems) * distributed.world_size(), tokenizer.pad_token_id
    keep = mixed_groups(trained_rewards(rollout, args.reward), G)
    kept_sampled, kept, kept_problems = kept_groups(sampled, rollout, problems, keep, pad_id)  # all ranks'
    if len(kept_problems) == P:
        return sampled, rollout, problems, P, position
    drawn = P
    for _ in range(args.max_sampling_rounds):
        fresh, position = draw(position, P - len(kept_problems))  # the same prompts on every rank
        share, first = distributed.share(fresh)
        new_sampled, new = (sample_and_correct(model, tokenizer, share, seed, args, first_row=(drawn + first) * G,
                                               clock=clock) if share else (None, None))
        drawn += len(fresh)
        mixed = mixed_groups(trained_rewards(new, args.reward), G) if share else []
        found_sampled, found, found_problems = kept_groups(new_sampled, new, share, mixed, pad_id)
        take = list(range(min(P - len(kept_problems), len(found_problems))))  # the first mixed groups, in order
        kept_sampled = concat_rollouts(kept_sampled, select_groups(found_sampled, take), pad_id)
        kept = concat_rollouts(kept, select_groups(found, take), pad_id)
        kept_problems += [found_problems[g] for g in take]
        if len(kept_problems) == P:
            break
    if not kept_problems:
        return sampled, rollout, problems, drawn, position
    mine, _ = distributed.share(list(range(len(kept_problems))))  # this rank's share of the groups kept
    mine_problems = [kept_problems[g] for g in mine]
    return select_groups(kept_sampled, mine), select_groups(kept, mine), mine_problems, drawn, position


def kept_groups(sampled, rollout, problems, groups, pad_id):
    """The given groups of this rank's (sampled, corrected) rollouts and problems, joined with every
    other rank's in rank order: the step's, as one process holds them. A rank with no rollout (None)
    adds nothing."""
    parts = distributed.gather(None if sampled is None else
                               (select_groups(sampled, groups), select_groups(rollout, groups),
                                [problems[g] for g in groups]))
    parts = [p for p in parts if p is not None]
    joined_sampled, joined, joined_problems = parts[0]
    for s, r, probs in parts[1:]:
        joined_sampled, joined = concat_rollouts(joined_sampled, s, pad_id), concat_rollouts(joined, r, pad_id)
        joined_problems = joined_problems + probs
    return joined_sampled, joined, joined_problems


# -----------------------------------------------------------------------------
# The loop


def load_training_data(args):
    return load_data(args.data or "arithmetic")


@dataclass
class Run:
    """One run as set_up leaves it: the model and what trains it, the data and where the run stands in it."""
    args: object                # the parsed flags (cli.py)
    model: torch.nn.Module      # the policy (LoRA-adapted, FSDP-sharded or split from its fp32 masters)
    tokenizer: object
    ref_model: object           # pi_ref for --beta > 0, else None
    optimizer: torch.optim.Optimizer
    scheduler: object
    master_weights: object      # precision.MasterWeights under mixed precision, else None
    anchor: object              # the learning-rate schedule's anchor of a resumed run (lr_factor), else None
    problems: list              # the training set, long prompts left out
    start: int                  # the first step to run: 0, or a resumed checkpoint's step
    position: int               # where in the data order the next prompts are drawn (data.next_prompts)
    metrics_path: Path
    lead: bool                  # rank 0: it writes metrics and checkpoints, and prints
    trackers: dict              # --report-to's TensorBoard / W&B handles (trackers.py), rank 0's; else empty


def set_up(args, model=None, tokenizer=None):
    """Everything before the first step: data, the resumed state, the process group, the model (loaded
    unless given: tests pass a tiny one) with its adapters, reference, masters or shards, the fast
    path, the optimizer and its schedule. None when a resumed run has nothing left to do."""
    problems = load_training_data(args)  # bad data fails here, before any model is loaded
    trackers.require(args.report_to)
    without = [number for number, row in enumerate(problems, 1) if not row.get("solution")]
    if args.sft_steps and without:  # refused rather than trained on a bare answer: SFT means the worked solution
        fail(f"--sft-steps {args.sft_steps} trains on the reference solutions, and {len(without)} of {len(problems)} "
             f"problems of --data {args.data or 'arithmetic'} have none (the first: row {without[0]}); give a "
             f"'solution' for every row, or --sft-steps 0")
    state = load_trainer_state(args.resume) if args.resume else None
    start, position = (state["step"], state["position"]) if state else (0, 0)
    if start > args.max_steps:  # it would save the checkpoint's weights as step --max-steps, then prune real ones
        fail(f"--resume {args.resume} is at step {start}, past --max-steps {args.max_steps}: pass a --max-steps above "
             f"{start} to train on, or resume a checkpoint from before step {args.max_steps}")
    if start == args.max_steps:
        print(f"nothing to do: {args.resume} is at step {start} = --max-steps; pass a larger --max-steps to train on")
        return None
    rank_device = distributed.setup(args.ddp_timeout)  # under torchrun: join the group, one GPU per rank
    lead = distributed.rank() == 0  # rank 0 writes metrics and checkpoints, and prints
    metrics_path = prepare_output_dir(args) if lead else Path(args.output_dir) / "metrics.jsonl"
    distributed.barrier()
    device = rank_device if rank_device is not None and args.device in ("auto", "cuda") else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, args.optim)
    # fp32 on the CPU: the masters of a mixed-precision run are read from it (a checkpoint saved them)
    if model is None:
        weights = None if args.use_peft else args.resume  # LoRA resumes from the base model and the saved adapter
        model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32, weights=weights)
    if args.use_peft:
        trained = add_adapters(model, args)
        if args.resume:
            load_adapter(model, args.resume)
        if lead:
            print(f"LoRA r={args.lora_r}: {trained:,} of {sum(p.numel() for p in model.parameters()):,} "
                  f"parameters train")
    ref_model = reference_model(model, args, device, dtype)  # from the fp32 model, before it is split or sharded
    if args.fsdp:  # FSDP2: each rank keeps a shard of the fp32 weights (the masters), gathered in dtype to compute
        distributed.shard(model, dtype, device)
        master_weights = None
    else:
        master_weights = split_master_weights(model, dtype, device, masters=uses_masters(args.optim, dtype))
    if device.type == "cuda":
        check_memory_plan(model.config, dtype, args, device, shards=distributed.world_size() if args.fsdp else 1)
    problems = drop_long_prompts(problems, tokenizer, args.prompt_format, args.max_prompt_length)
    if args.fast:  # the same numbers with less time and memory (fast.py); its process-wide settings named here
        enabled = fast.enable(model)
        if lead:
            print("--fast: " + "; ".join(enabled))
    if args.gradient_checkpointing:  # transformers 5 calls it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    optimizer = make_optimizer(model, args, device, master_weights)
    anchor = resumed_anchor(state, args) if state else None
    scheduler = make_scheduler(optimizer, args, anchor)
    if state:
        restore_trainer_state(state, optimizer, scheduler)
        if args.fsdp:  # the checkpoint holds whole moments: each rank keeps its shard
            distributed.shard_optimizer_state(optimizer)
        if lead:  # only now that the checkpoint has loaded: a damaged one leaves every line in place
            trim_run_logs(args.output_dir, start)
    if lead:
        write_config(args, arm_name(args), start)
        ranks = distributed.world_size()
        print(f"{arm_name(args)}: {args.model} on {args.data or 'the built-in arithmetic set'} ({len(problems)} "
              f"problems), P={args.prompts_per_step} x G={args.num_generations}, {args.max_steps} steps, device "
              f"{device}, {dtype}, prompt format {args.prompt_format}" + (f", {ranks} processes" if ranks > 1 else ""))
    return Run(args, model, tokenizer, ref_model, optimizer, scheduler, master_weights, anchor, problems,
               start, position, metrics_path, lead, trackers.open_trackers(args, start) if lead else {})


def train(args, model=None, tokenizer=None, progress=True):
    """The whole run: set up, then one train_step per step, each step's metrics appended to
    metrics.jsonl as it happens, checkpoints every --save-steps and at the end. Returns the metrics."""
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the directory for all
    with hold_lock(args.output_dir, "edge_grpo.py") if lead else contextlib.nullcontext():
        return run_steps(args, model, tokenizer, progress)


def run_steps(args, model=None, tokenizer=None, progress=True):
    """train()'s body, inside the output directory's lock."""
    from tqdm import tqdm
    run = set_up(args, model, tokenizer)
    if run is None:
        return []
    draw = lambda position, n: next_prompts(run.problems, position, n, args.seed)  # --dynamic-sampling draws on
    (received, restore_signals), history, saved = stop_on_signals(), [], None
    bar = tqdm(range(run.start, args.max_steps), initial=run.start, total=args.max_steps,
               disable=not progress or not run.lead, dynamic_ncols=True)
    try:
        for step in bar:
            batch, run.position = draw(run.position, args.prompts_per_step)
            mine, first_prompt = distributed.share(batch)  # this rank's whole groups
            if step < args.sft_steps:  # supervised fine-tuning first (--sft-steps), on the same prompts
                metrics, trained = sft_step(run.model, run.tokenizer, run.optimizer, run.scheduler, mine, step, args,
                                            run.master_weights), None
            else:
                metrics, trained, run.position = train_step(
                    run.model, run.ref_model, run.tokenizer, run.optimizer, run.scheduler, mine, step, args,
                    run.master_weights, first_row=first_prompt * args.num_generations, draw=draw, position=run.position)
            history.append(distributed.combine_metrics(metrics))
            if run.lead:
                report_step(run, bar, history, trained)
            if streak(history, "skipped_updates", args.num_iterations) == NONFINITE_STOP_STEPS:
                fail(f"steps {step + 2 - NONFINITE_STOP_STEPS}-{step + 1}: every gradient held NaN or inf, so no "
                     f"update was applied and nothing was saved; the run has diverged. Lower --learning-rate and "
                     f"resume from the newest checkpoint in {args.output_dir} (all hold finite weights), or "
                     f"start afresh")
            stopping = distributed.all_reduce_sum(torch.tensor([float(bool(received))])).item() > 0  # any rank's signal
            if stopping or (args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < args.max_steps):
                saved = save(run, step + 1)
                if run.lead:
                    bar.write(f"checkpoint: {saved} ({directory_mb(saved):,.0f} MB)")
                distributed.barrier()
            if stopping:
                if run.lead:
                    print(f"stopped by a signal after step {step + 1} of {args.max_steps}; to go on: "
                          f"python edge_grpo.py --resume {saved}", flush=True)
                raise SystemExit(128 + (received[0] if received else 15))  # the signal's exit status; 15: SIGTERM
    finally:
        restore_signals()
        trackers.close_trackers(run.trackers)
    checkpoint = save(run, args.max_steps)
    if run.lead and history:
        print(summary(history, args, checkpoint))
    distributed.barrier()
    return history


def save(run, step):
    """OUTPUT_DIR/checkpoint-STEP, written by rank 0; under --fsdp every rank first helps gather the shards."""
    model_state, optimizer_state = distributed.full_state(run.model, run.optimizer) if run.args.fsdp else (None, None)
    if run.lead:
        return save_checkpoint(Path(run.args.output_dir), step, run.model, run.tokenizer, run.optimizer, run.scheduler,
                               run.anchor, run.position, run.args, run.master_weights, model_state=model_state,
                               optimizer_state=optimizer_state)


def report_step(run, bar, history, trained):
    """The step's metrics line (appended and flushed as it happens: an interrupted run keeps every line),
    the progress bar, sample completions every --log-completions-steps (printed, and every row in
    completions.jsonl), and the loud warnings."""
    metrics, args = history[-1], run.args
    with run.metrics_path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    trackers.log_step(run.trackers, metrics)
    if trained is None:  # a supervised step: its loss, nothing sampled
        bar.set_postfix(sft_nll=f"{metrics['sft_nll']:.3f}", s=f"{metrics['seconds']:.1f}")
        return
    rollout, problems = trained["rollout"], trained["problems"]
    bar.set_postfix(reward=f"{metrics['reward_before_gec']:.2f}->{metrics['reward']:.2f}",
                    acc=f"{metrics['accuracy']:.2f}",
                    collapsed=f"{metrics['zero_std_before_gec']:.2f}->{metrics['zero_std_after_gec']:.2f}",
                    H=f"{metrics['entropy']:.2f}", s=f"{metrics['seconds']:.1f}")
    if logs_completions(args, metrics["step"]):
        bar.write("\n".join([f"step {metrics['step']} samples:"] + format_samples(rollout, problems)))
        lines = completion_lines(metrics["step"], trained, run.tokenizer)
        with (Path(args.output_dir) / "completions.jsonl").open("a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
        trackers.log_completions(run.trackers, metrics["step"], lines)
    if metrics["skipped_updates"]:
        bar.write(f"WARNING: step {metrics['step']}: the gradient held NaN or inf (grad_norm "
                  f"{metrics['grad_norm']}); the update was skipped, the weights are unchanged")
    if streak(history, "zero_std_after_gec", 1.0) == COLLAPSE_WARN_STEPS:
        bar.write(f"WARNING: every group has had identical rewards for {COLLAPSE_WARN_STEPS} steps: advantages "
                  "are all 0, nothing is learned (advantage collapse). Try --gec, more --num-generations, or easier "
                  "data.")
    if streak(history, "truncation_rate", 1.0) == COLLAPSE_WARN_STEPS:
        bar.write(f"WARNING: no completion has ended for {COLLAPSE_WARN_STEPS} steps: raise --max-completion-length.")


def streak(history, key, value):
    """How many of the last steps in a row have metrics[key] == value."""
    n = 0
    while n < len(history) and history[-1 - n].get(key) == value:
        n += 1
    return n


def summary(history, args, checkpoint):
    def mean(key, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")
    sft, history = [r for r in history if r["objective"] == "sft"], [r for r in history if r["objective"] == "rl"]
    lines = [f"\n{arm_name(args)}:"]
    if sft:
        lines.append(f"  supervised steps: {len(sft)}, {mean('seconds', sft):.1f} s/step, solution NLL "
                     f"{sft[0]['sft_nll']:.3f} -> {sft[-1]['sft_nll']:.3f}")
    if history:
        k = max(1, len(history) // 4)
        head, tail = history[:k], history[-k:]
        lines += [
            f"  RL steps: {len(history)}, {mean('seconds', history):.1f} s/step "
            f"(generation {mean('seconds_generation', history):.1f}, GEC {mean('seconds_gec', history):.1f}, "
            f"update {mean('seconds_update', history):.1f}), peak memory {history[-1]['peak_memory_mb']:.0f} MB",
            f"  collapsed groups (all rewards equal): {mean('zero_std_before_gec', history):.0%} before GEC, "
            f"{mean('zero_std_after_gec', history):.0%} after" + ("" if args.gec else " (GEC off)"),
            f"  advantage variance (Fig. 5): {mean('adv_var', history):.2f}; mean entropy "
            f"{mean('entropy', history):.3f}; GEC's text {mean('inserted_share', history):.0%} of the tokens trained",
            f"  policy's own answers, first {k} vs last {k} steps: boxed {mean('boxed', head):.0%} -> "
            f"{mean('boxed', tail):.0%}, correct {mean('accuracy', head):.0%} -> {mean('accuracy', tail):.0%}, "
            f"reward {mean('reward_before_gec', head):.2f} -> {mean('reward_before_gec', tail):.2f}"]
    lines.append(f"  metrics: {Path(args.output_dir) / 'metrics.jsonl'}; checkpoint: {checkpoint} "
                 f"({directory_mb(checkpoint):,.0f} MB)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Machinery: the optimizer (optim.py builds it and its schedule)


def make_optimizer(model, args, device, master_weights=None):
    """--optim (optim.build_optimizer) over the model's trainable parameters, or over their fp32
    masters when the model computes in bf16; under --fast its moments allocated up front."""
    params = master_weights.masters if master_weights else [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.optim, args.learning_rate, args.weight_decay, device)
    if args.fast and args.optim == "adamw_torch_fused":
        fast.preallocate_adamw_state(optimizer)
    return optimizer


# -----------------------------------------------------------------------------
# Machinery: the arguments, main


def parse_args(argv=None):
    """The run's arguments (cli.parse_args), with the prompt format decided once from the model
    (checkpoints.prompt_format_of), saved with the run and every checkpoint."""
    args = cli.parse_args(argv)
    args.prompt_format = prompt_format_of(args.model, args.prompt_format)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # model init paths that draw random numbers (none for loaded weights)
    try:
        train(args)
        distributed.barrier()  # every rank out of its last collective before the group is destroyed
    except RuntimeError as e:  # gloo's collective that waited --ddp-timeout for a hung rank (NCCL's watchdog aborts)
        if distributed.launched() and "timed out" in str(e).lower():
            fail(f"rank {distributed.rank()}: waited --ddp-timeout {args.ddp_timeout} s for another rank and gave up "
                 f"({str(e).splitlines()[0][:160]}); a hung rank stalls a launch that long: a shorter --ddp-timeout "
                 f"(e.g. 300) ends it sooner")
        raise
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
