"""
fast.py: the speed and memory machinery, in one room, switched by one flag (--fast, on by default).

Everything here computes the same numbers as the plain path (rollout.token_logprobs_and_entropy:
stock modules, log_softmax through ordinary autograd, one backward per micro-batch); tests/test_fast.py
holds them equal. What it buys on the 135M demo (2 CPU cores) is logged in README's performance section.

  fused_logprobs_and_entropy  rollout.token_logprobs_and_entropy's twin: each group's prompt runs
                              once (its keys/values repeated for the G completions) and gets a
                              backward of its own (backward_separately); the LM head is one autograd
                              Function with a closed-form backward, over chunks of rows, in fp32
                              (LogprobAndEntropy)
  lean_activations            SwiGLU MLPs, RMSNorms and embeddings through Functions that keep less
                              for backward; embedding and head gradients written straight into .grad
  decode_static               rollout.decode's twin on a static KV cache, its step compiled with --compile
  preallocate_adamw_state     AdamW's moments in flat buffers before the first step, not scattered
                              among its activations
  enable                      the above, plus the two process-wide settings, named in one start-up line:
                              TRANSFORMERS_SDPA_FORCE_GQA=1 on CPU and glibc's malloc kept from
                              handing freed blocks back to the kernel (keep_freed_memory)

Dimensions: B rows, G rows per group, T completion tokens, N scored positions, V vocabulary, D hidden.
"""

import ctypes
import os
import sys
import types

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import DynamicCache

from precision import LOGIT_CHUNK_ROWS, flat_views
from rollout import real_positions, sample_next_token, shares_prompts

KEEP_BLOCKS_BELOW = 16 << 20  # bytes: freed blocks under this stay in the process (keep_freed_memory)


def enable(model):
    """Routes the model's modules (lean_activations) and applies the process-wide settings. Returns
    what it did, one phrase each, for the start-up line."""
    done = [f"{lean_activations(model)} modules routed through lean autograd Functions"]
    if next(model.parameters()).device.type == "cpu":
        # transformers' SDPA attention then passes grouped-query keys/values to the kernel as they are
        # (enable_gqa) rather than copied for every query head (3x for SmolLM2): less memory, faster
        # decoding. CUDA's fast kernels refuse a mask with enable_gqa, so there transformers' choice stands.
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"  # read by transformers at every attention call
        done.append("TRANSFORMERS_SDPA_FORCE_GQA=1")
    if keep_freed_memory():
        done.append(f"glibc malloc keeps freed blocks under {KEEP_BLOCKS_BELOW >> 20} MB")
    return done


# -----------------------------------------------------------------------------
# Scoring: each group's prompt once, the LM head one closed-form Function


def fused_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask, temperature=1.0,
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


def completion_hidden_states(model, input_ids, attention_mask, T, group_size=1):
    """(b, T, D): the hidden states that predict the last T tokens of input_ids (b, Tp + T).
    When rows come in groups sharing a prompt, each prompt runs through the transformer once and its
    keys/values are repeated for the group's G completions: the same numbers and, through the
    repeat, the same gradient (the G paths through the shared prompt add up), for about 1/G of the
    prompt's cost. Not under gradient checkpointing, which forbids the cache in training."""
    position_ids = real_positions(attention_mask)  # (b, Tp + T)
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


def _activation_checkpointing(model):
    """transformers 5 renamed is_gradient_checkpointing to is_activation_checkpointing."""
    name = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    return bool(getattr(model, name, False))


def run_prompts_once(model, input_ids, attention_mask, G):
    """input_ids, attention_mask (B, t): rows in groups of G identical rows. Each group's row runs
    through the transformer once and its keys/values are repeated for the G rows; in backward the G
    paths through the repeat add up, and the prompts' graph gets a backward of its own
    (backward_separately). Returns the hidden states (B / G, t, D) and the cache (B rows)."""
    ids, mask = input_ids[::G], attention_mask[::G]  # (B / G, t)
    cache = DynamicCache(config=model.config)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask),
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
    with gradient accumulation (a .grad already there) a second copy of the gradient. Cut, each part
    goes into .grad as soon as it exists. Returns the hidden leaf; the cache's tensors are swapped for
    theirs. (Like reentrant checkpointing, this suits loss.backward(), not torch.autograd.grad.)"""
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
        in_fp32 = grad_weight is None or grad_weight.dtype == torch.float32
        sum_weight = grad_weight if in_fp32 else torch.zeros_like(weight32)
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
    backward, since autograd sums both parts first. Returns (buffer, whether it is weight.grad)."""
    if weight.grad is not None:
        return weight.grad, True
    return torch.zeros_like(weight), False


def _chunks(n, size):
    return [slice(start, start + size) for start in range(0, n, size)]


# -----------------------------------------------------------------------------
# Lean activations: what a decoder layer keeps for backward


def lean_activations(model):
    """Routes every SwiGLU MLP, RMSNorm and embedding of a Llama / Qwen2 / Mistral-style model through
    the three Functions below: the same numbers, about a third less memory held for backward, and no
    dense (V, D) embedding gradient (README, "What a training step holds"). Other modules are left
    alone, among them an MLP whose down_proj carries a LoRA adapter (SwiGLUDown reads down_proj's
    weight directly). Returns how many modules were routed."""
    routed = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("MLP") and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) \
                and type(module.down_proj) is torch.nn.Linear and module.down_proj.bias is None \
                and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)  # a method: deepcopy rebinds it
        elif kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and getattr(module, "weight",
                                                                                          None) is not None:
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
        # (D, I)
        grad_weight = grad_out.flatten(0, -2).t() @ (act * u).flatten(0, -2) if ctx.needs_input_grad[2] else None
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
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y.float() * normed).flatten(0, -2).sum(0).to(weight.dtype)
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
            sums = torch.zeros(len(used), rows.shape[-1], dtype=torch.float32, device=rows.device)
            sums.index_add_(0, slot, rows.float())
            grad_weight.index_add_(0, used, sums.to(grad_weight.dtype))
        return None, None if into_grad else grad_weight, None


# -----------------------------------------------------------------------------
# Decoding: a static KV cache and one fixed-shape step, compiled once per shape (--compile)

CACHE_BUCKET = 64  # static caches are sized up to a multiple of this: a few shapes, a few compilations


def padded_rows(n):
    """Rows of a static decoding batch: the next power of two, so GEC's varying number of continued
    rows compiles a handful of shapes. The padding rows are computed and ignored."""
    return 1 << (n - 1).bit_length()


def decode_step(model, ids, mask, position, cache):
    """(B, 1) tokens, (B, L) mask, (B, 1) positions -> next-token logits (B, V): the same shapes at
    every step, which is what lets torch.compile (and CUDA graphs) capture it once."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                 logits_to_keep=1).logits[:, -1]


def static_decoder(model, rows, length, compiled):
    """A StaticCache of rows x length (transformers' own class) and the step that uses it, kept on
    the model per shape and reused: a new cache object per rollout would make torch.compile trace
    again. compiled: the step through torch.compile (dynamic=False; CUDA graphs on GPU)."""
    from transformers import StaticCache
    decoders = model.__dict__.setdefault("_static_decoders", {})
    key = (rows, length, compiled)
    if key not in decoders:
        cache = StaticCache(config=model.config, max_cache_len=length)
        step = decode_step
        if compiled:
            mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
            step = torch.compile(decode_step, dynamic=False, mode=mode)
        decoders[key] = (cache, step)
    cache, step = decoders[key]
    cache.reset()
    return cache, step


@torch.no_grad()
def decode_static(model, cache, mask, step_ids, *, max_new_tokens, temperature, top_p, generator, stop_ids, pad_id,
                  compiled=False):
    """rollout.decode on a static cache: the same tokens (the same draws from the same generator), the
    same return value. The dynamic cache's keys/values are copied into a StaticCache sized for all
    this loop can feed (rounded up to CACHE_BUCKET, rows up to a power of two); the first feed (S
    tokens) runs as it is, every later step through one fixed-shape decode_step."""
    B, S = step_ids.shape
    past = cache.get_seq_length()
    rows = padded_rows(B)
    length = -(-(past + S + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    static, step = static_decoder(model, rows, length, compiled)
    pad = lambda t: torch.cat([t, t[:1].expand(rows - B, *t.shape[1:])]) if rows > B else t  # copies of row 0
    if past:
        for layer, source in zip(static.layers, cache.layers):
            layer.update(pad(source.keys), pad(source.values))
    full = torch.zeros((rows, length), dtype=mask.dtype, device=mask.device)  # (rows, L): 1 on fed real tokens
    full[:, :mask.shape[1]] = pad(mask)
    position = real_positions(pad(mask))[:, -S:]  # (rows, S)
    logits = decode_step(model, pad(step_ids), full, position, static)[:B]  # the first feed, eager
    stops = torch.tensor(stop_ids, device=mask.device)
    done = torch.zeros(B, dtype=torch.bool, device=mask.device)
    new, column, position = [], mask.shape[1], position[:, -1:]
    for _ in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_p, generator).masked_fill(done, pad_id)  # (B,)
        new.append(token)
        done |= torch.isin(token, stops)
        if done.all():
            break
        full[:, column] = 1
        column, position = column + 1, position + 1
        logits = step(model, pad(token[:, None]), full, position, static)[:B].clone()  # (B, V)
    ids = torch.stack(new, dim=1).cpu() if new else torch.zeros((B, 0), dtype=torch.long)  # (B, T)
    fed = column  # columns whose keys/values are in the cache
    kv = DynamicCache([(layer.keys[:B, :, :fed], layer.values[:B, :, :fed]) for layer in static.layers],
                      config=model.config)
    return ids, (kv, full[:B, :fed])


# -----------------------------------------------------------------------------
# Memory: AdamW's state allocated up front


def preallocate_adamw_state(optimizer):
    """torch's AdamW (--optim adamw_torch_fused) creates its two moments lazily, a tensor per parameter
    scattered among the first step's activations, where they leave holes later steps cannot fill
    (peak memory of the 135M demo on CPU -100 MB when they are not). Here they are zeros in two flat
    buffers (precision.flat_views), as AdamW would make them, before the first step: the same update."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # one buffer needs one dtype and device; sharded parameters (--fsdp) get theirs from FSDP
    if not isinstance(optimizer, torch.optim.AdamW) or len({(p.dtype, p.device) for p in params}) != 1 \
            or isinstance(params[0], DTensor):
        return False
    fused = optimizer.param_groups[0]["fused"]
    for p, exp_avg, exp_avg_sq in zip(params, flat_views(params)[1], flat_views(params)[1]):
        step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")  # as AdamW makes it
        optimizer.state[p].update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    return True


# -----------------------------------------------------------------------------
# Process settings


def keep_freed_memory():
    """Linux (glibc): keep freed blocks under 16 MB in the process instead of handing them back to the
    kernel. Every step frees and allocates again the same gigabyte of activations, KV caches and
    gradients; glibc's default returns large blocks at once (mmap, above a threshold that climbs to
    32 MB) or trims the heap, and every step then page-faults them in again (README: about 1 s of a
    3.9 s update of the CPU demo). A block of 16 MB or more
    (logit chunks, the (V, D) embedding gradient) that the kept memory cannot hold is mapped on its
    own and handed back when freed, rather than growing the heap for good: there it would leave a
    hole that smaller blocks split up, and the heap would grow past it step after step. Call it
    once the model is loaded: what loading freed is handed back first. PyTorch's CPU tuning guide
    suggests jemalloc or tcmalloc for the same reason. Returns whether glibc took the settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): nothing to tune
        return False
    libc.malloc_trim(0)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
