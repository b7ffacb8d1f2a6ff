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

--dtype bfloat16 runs the same code on CPU, which is how the tests check it. Also here: the memory
plan and its check against the GPU at start-up (check_memory_plan). The optimizer the masters feed and
its learning-rate schedule: optim.py.

Smaller GPUs (--optim, --use-peft): the same loop with less state per parameter (bytes):
  adamw_torch_fused   (default)  bf16 weights 2 + gradients 2 + fp32 masters 4 + their gradients 4 + moments 8 = 20
  adamw_torch_8bit    torchao    the same with 8-bit block-quantized moments (2)                         = 14
  adamw_torch_8bit_sr torchao    bf16 weights updated in place with stochastic rounding, no masters:
                                 weights 2 + gradients 2 + 8-bit moments 2                               =  6
  --use-peft (lora.py)           frozen bf16 weights 2; the above only for the adapters (~1 % of them)
Stochastic rounding rounds w + update up or down at random with the odds that keep its mean exact,
so updates far below bf16's spacing still move a weight by lr on average; round-to-nearest drops them.

  python precision.py            # the memory plan of the paper's run for Qwen2.5-Math-1.5B and -7B
  python precision.py --table    # README's table: model x method x GPU memory
  python precision.py --gpus     # README's table: GB per GPU against the number of GPUs
"""

import resource
import sys
from dataclasses import dataclass

import torch

from errors import fail

# Rows of the (N, V) logit matrix the LM head materializes at once while scoring, in fp32 (rollout.py and
# fast.py use it): 512 x 151,936 (Qwen) x 4 bytes is 311 MB per tensor, instead of the 5 GB of a whole
# 8 x 1024 x V batch. Defined here, the lowest room that needs it, for the memory plan.
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


def flat_views(tensors, dtype=None, device=None):
    """Zero tensors shaped like tensors, as views into one flat buffer (one dtype and device).
    Gradients and AdamW's moments live in such buffers: allocated once, zeroed in place, one kernel
    to add or copy them all."""
    buffer = torch.zeros(sum(t.numel() for t in tensors), dtype=dtype or tensors[0].dtype,
                         device=device or tensors[0].device)
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


def split_master_weights(model, dtype, device=None, masters=True):
    """Moves the model to device and casts it to dtype, keeping fp32 masters (on device) of its
    trainable parameters, read from the model as it is: load it in fp32, so that checkpointed
    masters come back exactly. None when dtype is fp32 (the parameters are their own masters) or
    masters is False (stochastic rounding updates the bf16 weights themselves)."""
    device = device or next(model.parameters()).device
    if dtype == torch.float32 or not masters:
        model.to(device=device, dtype=dtype)
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    _, fp32 = flat_views(params, torch.float32, device)
    with torch.no_grad():
        for m, p in zip(fp32, params):
            m.copy_(p)
    model.to(device=device, dtype=dtype)  # the Parameter objects stay, their data changes
    for m in fp32:
        m.requires_grad_(True)
    return MasterWeights(params=params, masters=fp32, model_grads=attach_flat_grads(params),
                         master_grads=attach_flat_grads(fp32))


def master_state_dict(model, master_weights):
    """The model's state dict with the fp32 masters in place of the bf16 weights: what a checkpoint
    saves (as TRL does under mixed precision), so it resumes exactly and loads anywhere."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves, tied ones under each name
    by_id = {id(p): m for p, m in zip(master_weights.params, master_weights.masters)} if master_weights else {}
    return {name: by_id.get(id(t), t).detach() for name, t in state.items()}


# -----------------------------------------------------------------------------
# Which runs have masters, and what the optimizer's moments cost (the optimizer itself: optim.py)

MOMENT_BYTES = {"adamw_torch_fused": 8, "adamw_torch_8bit": 2, "adamw_torch_8bit_sr": 2}  # both moments, per parameter


def uses_masters(optim, dtype):
    """Whether the optimizer updates fp32 master weights: whenever the model computes below fp32,
    except under stochastic rounding, which updates the bf16 weights themselves."""
    return dtype != torch.float32 and optim != "adamw_torch_8bit_sr"


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


LORA_SHAPES = dict(q_proj=("D", "q"), k_proj=("D", "kv"), v_proj=("D", "kv"), o_proj=("q", "D"),
                   gate_proj=("D", "I"), up_proj=("D", "I"), down_proj=("I", "D"))  # (in, out) per layer
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama and Qwen2


def lora_parameter_count(config, r, targets=None):
    """Parameters of rank-r adapters A (r, in) and B (out, r) on the target modules of every layer."""
    D, I = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or D // config.num_attention_heads
    size = dict(D=D, I=I, q=config.num_attention_heads * head_dim, kv=config.num_key_value_heads * head_dim)
    targets = LORA_SHAPES if targets in (["all-linear"], "all-linear") else (targets or LORA_DEFAULT_TARGETS)
    return config.num_hidden_layers * sum(r * (size[LORA_SHAPES[t][0]] + size[LORA_SHAPES[t][1]]) for t in targets)


def memory_plan(config, *, dtype, beta, rows, group_size, prompt_tokens, completion_tokens, micro_batch_rows,
                optim="adamw_torch_fused", lora_rank=0, lora_targets=None, shards=1):
    """Bytes of the training state and of the largest transient blocks, by part, for a model config.
    rows = P x G sequences of prompt_tokens + completion_tokens (GEC's continuation included) in the
    KV cache; a micro-batch of micro_batch_rows runs each group's prompt once. optim and lora_rank
    (0: full fine-tune) as --optim and --lora-r. Activations are estimated from what a decoder layer
    keeps for backward with our lean MLP and norms (about 10 D + 2 I values per token per layer), so
    treat the total as an estimate, not a promise. shards > 1: --fsdp over that many GPUs, whose fp32
    weight shards are the masters and whose gradients and moments are sharded with them; the whole
    model in dtype is still gathered for generation."""
    n = parameter_count(config)
    trained = lora_parameter_count(config, lora_rank, lora_targets) if lora_rank else n
    width = torch.finfo(dtype).bits // 8
    mixed = uses_masters(optim, dtype)
    D, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or D // config.num_attention_heads
    kv_per_token = 2 * L * config.num_key_value_heads * head_dim * width
    tokens = micro_batch_rows * completion_tokens + max(1, micro_batch_rows // group_size) * prompt_tokens
    head_copy = V * D * 4 if width < 4 else 0  # the fused LM head reads a bf16 weight as an fp32 copy ...
    head_grad = head_copy if not lora_rank else 0  # ... and sums its gradient in fp32
    if shards > 1:  # FSDP2: fp32 shards (the masters), their fp32 gradients and moments, 1/shards each
        state = {"weights": n * width, "master weights (fp32)": trained * 4 / shards,
                 "gradients": trained * 4 / shards, "AdamW moments": trained * MOMENT_BYTES[optim] / shards}
    else:
        state = {"weights": (n + (trained if lora_rank else 0)) * width,
                 "master weights (fp32)": trained * 4 if mixed else 0,
                 "gradients": trained * width + (trained * 4 if mixed else 0),
                 "AdamW moments": trained * MOMENT_BYTES[optim]}
    plan = {
        **state,
        "reference model (--beta)": n * width if beta > 0 and not lora_rank else 0,  # LoRA: adapters off
        "KV cache of one rollout": rows * (prompt_tokens + completion_tokens) * kv_per_token,
        "activations of one micro-batch": tokens * L * (10 * D + 2 * I) * width,
        "LM head chunk (fp32 logits, weight and its gradient)": 2 * LOGIT_CHUNK_ROWS * V * 4 + head_copy + head_grad,
    }
    plan["total"] = sum(plan.values())
    return plan


def format_plan(plan, available=None):
    lines = [f"  {name:<55}{size / GB:>8.1f} GB" for name, size in plan.items()]
    if available is not None:
        lines.append(f"  {'available on the device':<55}{available / GB:>8.1f} GB")
    return "\n".join(lines)


# The authors' settings: 1 prompt x G = 8, prompt 512 + completion 1024 + reflection 256 tokens.
PAPER_RUN = dict(beta=0.0, rows=8, group_size=8, prompt_tokens=512, completion_tokens=1024 + 256)
METHODS = {  # README's table: label -> memory_plan's arguments
    "fp32 masters (default)": dict(optim="adamw_torch_fused"),
    "8-bit AdamW + stochastic rounding": dict(optim="adamw_torch_8bit_sr"),
    "LoRA r=16 (q, v)": dict(optim="adamw_torch_fused", lora_rank=16),
}
GPU_SIZES_GB = (16, 24, 40, 80)
CUDA_RESERVE = 1.5 * GB  # a card of N GB holds N GiB; the CUDA context and allocator slack take about this


def largest_fitting_micro_batch(config, gpu_gb, **method):
    """The largest --micro-batch-size of 8, 4, 2, 1 whose plan fits a GPU of gpu_gb, or None."""
    for micro_batch_rows in (8, 4, 2, 1):
        plan = memory_plan(config, dtype=torch.bfloat16, micro_batch_rows=micro_batch_rows, **PAPER_RUN, **method)
        if plan["total"] <= gpu_gb * 2**30 - CUDA_RESERVE:
            return micro_batch_rows
    return None


def fit_table():
    """Markdown: model x method x GPU memory, each cell the largest micro-batch that fits the paper's run."""
    from transformers import Qwen2Config
    lines = ["| model | method | state (GB) | total at micro-batch 8 (GB) | "
             + " | ".join(f"{g} GB" for g in GPU_SIZES_GB) + " |", "|---" * (4 + len(GPU_SIZES_GB)) + "|"]
    for name, shape in QWEN_MATH_SHAPES.items():
        config = Qwen2Config(**shape)
        for label, method in METHODS.items():
            plan = memory_plan(config, dtype=torch.bfloat16, micro_batch_rows=8, **PAPER_RUN, **method)
            state = sum(plan[k] for k in ("weights", "master weights (fp32)", "gradients", "AdamW moments"))
            cells = [largest_fitting_micro_batch(config, g, **method) for g in GPU_SIZES_GB]
            lines.append(f"| {name} | {label} | {state / GB:.1f} | {plan['total'] / GB:.1f} | "
                         + " | ".join(f"micro-batch {c}" if c else "no" for c in cells) + " |")
    return "\n".join(lines)


GPU_COUNTS = (1, 2, 4, 8)


def gpu_count_table():
    """Markdown: GB per GPU at the paper's settings with one group of G = 8 per GPU: data parallel
    (distributed.py) holds the whole state on every GPU, whatever their number; --fsdp shards the
    fp32 state over them (memory_plan's shards). Each cell: GB at micro-batch 8 (the largest
    micro-batch that fits an 80 GB GPU)."""
    from transformers import Qwen2Config
    lines = ["| model | method | data parallel, any number of GPUs | "
             + " | ".join(f"--fsdp, {n} GPUs" for n in GPU_COUNTS[1:]) + " |", "|---" * (3 + len(GPU_COUNTS[1:])) + "|"]
    for name, shape in QWEN_MATH_SHAPES.items():
        config = Qwen2Config(**shape)
        for label, method in list(METHODS.items())[:2]:
            # --fsdp runs the default optimizer only: the other methods get the data-parallel cell alone
            counts = GPU_COUNTS if method["optim"] == "adamw_torch_fused" else GPU_COUNTS[:1]
            cells = []
            for n in counts:
                total = memory_plan(config, dtype=torch.bfloat16, micro_batch_rows=8, **PAPER_RUN, **method,
                                    shards=n)["total"]
                fits = largest_fitting_micro_batch(config, 80, **method, shards=n)
                cells.append(f"{total / GB:.1f} ({fits or 'none'})")
            cells += ["-"] * (len(GPU_COUNTS) - len(counts))
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_memory_plan(config, dtype, args, shards=1):
    """memory_plan for a run's settings (edge_grpo.py's flags); shards: processes under --fsdp."""
    rows = args.prompts_per_step * args.num_generations
    return memory_plan(config, dtype=dtype, beta=args.beta, rows=rows, group_size=args.num_generations,
                       prompt_tokens=args.max_prompt_length,
                       completion_tokens=args.max_completion_length + (args.gec_reflection_tokens if args.gec else 0),
                       micro_batch_rows=min(args.micro_batch_size, rows), optim=args.optim,
                       lora_rank=args.lora_r if args.use_peft else 0, lora_targets=args.lora_target_modules,
                       shards=shards)


def check_memory_plan(config, dtype, args, device, shards=1):
    """Prints the plan and fails now, not with an out-of-memory error an hour in, when it cannot fit."""
    plan = run_memory_plan(config, dtype, args, shards)
    available = torch.cuda.get_device_properties(device).total_memory
    masters = ", fp32 masters" if uses_masters(args.optim, dtype) else ""
    masters += f", state sharded over {shards} GPUs" if args.fsdp else ""
    print(f"memory plan ({dtype}{masters}, "
          f"{args.optim}{', LoRA' if args.use_peft else ''}):\n{format_plan(plan, available)}")
    if plan["total"] > available:
        fail(f"the run needs about {plan['total'] / 1e9:.0f} GB and {device} has {available / 1e9:.0f} GB: lower "
             "--micro-batch-size, --max-completion-length or --num-generations, use --gradient-checkpointing, "
             "--optim adamw_torch_8bit_sr, --use-peft, --fsdp over more GPUs, or a GPU with more memory")


def peak_memory_mb():
    """The step's peak: CUDA's allocator where a GPU ran, else the process's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


if __name__ == "__main__":
    from transformers import Qwen2Config
    if "--table" in sys.argv[1:]:
        print(fit_table())
        sys.exit(0)
    if "--gpus" in sys.argv[1:]:
        print(gpu_count_table())
        sys.exit(0)
    for name, shape in QWEN_MATH_SHAPES.items():
        config = Qwen2Config(**shape)
        for label, dtype, optim in (("bf16 compute, fp32 masters (default on GPU)", torch.bfloat16,
                                     "adamw_torch_fused"),
                                    ("bf16, 8-bit AdamW, stochastic rounding", torch.bfloat16, "adamw_torch_8bit_sr"),
                                    ("fp32", torch.float32, "adamw_torch_fused")):
            plan = memory_plan(config, dtype=dtype, optim=optim, micro_batch_rows=8, **PAPER_RUN)
            print(f"{name} ({parameter_count(config) / 1e9:.2f} B parameters), {label}:\n{format_plan(plan)}")
