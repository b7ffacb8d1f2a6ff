"""
precision.py: mixed precision that learns at the paper's learning rate, and the memory it costs.

Why: at lr 1e-6 Adam's first steps move a weight by about lr, far below bf16's spacing (~1e-4 at
|w| ~ 0.02): a pure-bf16 AdamW step changed 0.39 % of the embedded model's weights, fp32 100 %. So
the optimizer updates fp32 master weights with fp32 moments, as DeepSpeed (the authors) and
accelerate (TRL) do, while the model computes in bf16:

  model (bf16): generation, scoring, backward   -> bf16 gradients of one micro-batch
  accumulate_gradients: + into fp32 master gradients, bf16 ones zeroed (after every micro-batch)
  AdamW on the fp32 masters (fp32 moments)      -> copy_to_model: bf16 weights = rounded masters

The memory arithmetic that chose this over fp32 parameters under autocast (bytes per parameter):
  bf16 weights 2 + bf16 gradients 2 + fp32 masters 4 + fp32 master gradients 4 + AdamW moments 8 = 20
  fp32 weights 4 + fp32 gradients 4 + AdamW moments 8 = 16, plus the bf16 copies autocast caches
  while it runs (2) = 18, and generation would either recast every weight per token or hold them.
Nearly the same; bf16 weights keep generation and a compiled decoding step on plain bf16 tensors,
and our fused autograd functions need no autocast rules. For Qwen2.5-Math-1.5B (1.54 B parameters)
that is 31 GB before activations, for the 7B (7.6 B) 152 GB: memory_plan prints the whole budget.

--dtype bfloat16 runs the same code on CPU, which is how the tests check it.

  python precision.py            # the memory plan of the paper's run for Qwen2.5-Math-1.5B and -7B
"""

from dataclasses import dataclass

import torch

# Rows of logits the LM head materializes at once, in fp32 (rollout.LOGIT_CHUNK_ROWS).
LOGIT_CHUNK_ROWS = 512
GB = 1e9
# The fields of Qwen/Qwen2.5-Math-1.5B's and -7B's config.json that set their shapes (no hub needed).
QWEN_MATH_SHAPES = {
    "qwen2.5-math-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


# -----------------------------------------------------------------------------
# Master weights


def flat_views(tensors, dtype=None):
    """Zero tensors shaped like tensors, as views into one flat buffer (one dtype and device).
    Gradients and AdamW's moments live in such buffers: allocated once, zeroed in place, one kernel
    to add or copy them all."""
    buffer = torch.zeros(sum(t.numel() for t in tensors), dtype=dtype or tensors[0].dtype, device=tensors[0].device)
    return buffer, [view.view_as(t) for view, t in zip(buffer.split([t.numel() for t in tensors]), tensors)]


def attach_flat_grads(tensors):
    """Gives each tensor a zero .grad, all views of one flat buffer; returns the buffer."""
    buffer, grads = flat_views(tensors)
    for t, g in zip(tensors, grads):
        t.grad = g
    return buffer


@dataclass
class MasterWeights:
    """fp32 copies of a low-precision model's trainable parameters: what the optimizer updates."""
    params: list               # the model's parameters, in the compute dtype (bf16)
    masters: list              # fp32 copies, views of one buffer, each with an fp32 .grad
    model_grads: torch.Tensor  # flat buffer behind the params' .grad (compute dtype)
    master_grads: torch.Tensor  # flat fp32 buffer behind the masters' .grad

    def accumulate_gradients(self):
        """After each micro-batch's backward: its bf16 gradients go into the fp32 sums, then are
        zeroed, so a step's micro-batches add up in fp32 (one bf16 rounding per micro-batch)."""
        self.master_grads.add_(self.model_grads)
        self.model_grads.zero_()

    @torch.no_grad()
    def copy_to_model(self):
        """After each optimizer step: the compute weights are the masters, rounded to nearest."""
        for p, m in zip(self.params, self.masters):
            p.copy_(m)


def split_master_weights(model, dtype):
    """Keeps fp32 masters of the model's trainable parameters (read from the model as it is: load it
    in fp32, so that checkpointed masters come back exactly), then casts the model to dtype. None
    when dtype is fp32: the parameters are their own masters."""
    if dtype == torch.float32:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    _, masters = flat_views(params, torch.float32)
    with torch.no_grad():
        for m, p in zip(masters, params):
            m.copy_(p)
    model.to(dtype)
    for m in masters:
        m.requires_grad_(True)
    return MasterWeights(params=params, masters=masters, model_grads=attach_flat_grads(params),
                         master_grads=attach_flat_grads(masters))


def master_state_dict(model, master_weights):
    """The model's state dict with the fp32 masters in place of the bf16 weights: what a checkpoint
    saves (as TRL does under mixed precision), so it resumes exactly and loads anywhere."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves, tied ones under each name
    by_id = {id(p): m for p, m in zip(master_weights.params, master_weights.masters)} if master_weights else {}
    return {name: by_id.get(id(t), t).detach() for name, t in state.items()}


# -----------------------------------------------------------------------------
# The memory plan


def parameter_count(config):
    """Parameters of a Llama / Qwen2-style decoder from its config (Qwen2 adds q/k/v biases)."""
    D, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or D // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    biases = (q + 2 * kv) if getattr(config, "model_type", "") == "qwen2" else 0
    layer = D * q + 2 * D * kv + q * D + biases + 3 * D * I + 2 * D
    return V * D * (1 if config.tie_word_embeddings else 2) + L * layer + D


def memory_plan(config, *, dtype, mixed, beta, rows, group_size, prompt_tokens, completion_tokens, micro_batch_rows,
                optimizer="adamw"):
    """Bytes of the training state and of the largest transient blocks, by part, for a model config.
    rows = P x G sequences of prompt_tokens + completion_tokens (GEC's continuation included) in the
    KV cache; a micro-batch of micro_batch_rows runs each group's prompt once. Activations are
    estimated from what a decoder layer keeps for backward with our lean MLP and norms (about
    10 D + 2 I values per token per layer), so treat the total as an estimate, not a promise."""
    n = parameter_count(config)
    width = torch.finfo(dtype).bits // 8
    D, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or D // config.num_attention_heads
    kv_per_token = 2 * L * config.num_key_value_heads * head_dim * width
    tokens = micro_batch_rows * completion_tokens + max(1, micro_batch_rows // group_size) * prompt_tokens
    plan = {
        "weights": n * width,
        "master weights (fp32)": n * 4 if mixed else 0,
        "gradients": n * width + (n * 4 if mixed else 0),
        "AdamW moments (fp32)": n * 8 if optimizer == "adamw" else 0,
        "reference model (--beta)": n * width if beta > 0 else 0,
        "KV cache of one rollout": rows * (prompt_tokens + completion_tokens) * kv_per_token,
        "activations of one micro-batch": tokens * L * (10 * D + 2 * I) * width,
        "LM head chunk (fp32 logits, weight and its gradient)": 2 * LOGIT_CHUNK_ROWS * V * 4 + (2 * V * D * 4 if mixed else 0),
    }
    plan["total"] = sum(plan.values())
    return plan


def format_plan(plan, available=None):
    lines = [f"  {name:<55}{size / GB:>8.1f} GB" for name, size in plan.items()]
    if available is not None:
        lines.append(f"  {'available on the device':<55}{available / GB:>8.1f} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    from transformers import Qwen2Config
    # The authors' settings: 1 prompt x G = 8, prompt 512 + completion 1024 + reflection 256 tokens, one micro-batch.
    for name, shape in QWEN_MATH_SHAPES.items():
        config = Qwen2Config(**shape)
        for label, dtype, mixed in (("bf16 compute, fp32 masters (default on GPU)", torch.bfloat16, True),
                                    ("fp32", torch.float32, False)):
            plan = memory_plan(config, dtype=dtype, mixed=mixed, beta=0.0, rows=8, group_size=8, prompt_tokens=512,
                               completion_tokens=1024 + 256, micro_batch_rows=8)
            print(f"{name} ({parameter_count(config) / 1e9:.2f} B parameters), {label}:\n{format_plan(plan)}")
