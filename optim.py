"""
optim.py: the optimizer and its learning-rate schedule.

AdamW by --optim (torch's fused one, or torchao's 8-bit moments, with stochastic rounding for bf16
weights without masters: precision.py says why and what each costs), over the trainable parameters
or their fp32 masters; and Hugging Face's schedules (warmup from 0, then constant or linear decay to
0), with the one departure a resumed run needs: a changed --max-steps goes on from the rate reached.
"""

import torch
from torch.distributed.tensor import DTensor

from errors import require
from precision import attach_flat_grads

# -----------------------------------------------------------------------------
# The optimizer: where its state lives and in how many bits

def build_optimizer(params, optim, learning_rate, weight_decay, device):
    """AdamW over params (the trainable parameters, or their fp32 masters), by --optim:
    adamw_torch_fused: torch's fused AdamW, one kernel over all parameters; on CPU it steps 135M
      parameters in 0.09 s instead of 0.54 s (the per-tensor loop). Under --fast its two moments
      live in flat buffers allocated before the first step (fast.preallocate_adamw_state).
    adamw_torch_8bit: torchao's AdamW8bit: each moment in 8 bits with a scale per block of 256 values
      (tensors under 4096 values stay fp32); the arithmetic is fp32, compiled once per shape.
    adamw_torch_8bit_sr: the same on bf16 weights, the result rounded stochastically.
    The gradients of params without masters are views of one flat buffer, zeroed in place."""
    if optim == "adamw_torch_fused":
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                                      fused=device.type in ("cpu", "cuda"))
    else:
        ao = require("torchao.optim", f"--optim {optim}")
        optimizer = ao.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay,
                                 bf16_stochastic_round=optim == "adamw_torch_8bit_sr")
    # one buffer needs one dtype and device; sharded parameters (--fsdp) get theirs from FSDP
    if len({(p.dtype, p.device) for p in params}) == 1 and not isinstance(params[0], DTensor):
        if params[0].grad is None:  # masters come with theirs (split_master_weights)
            attach_flat_grads(params)
    return optimizer


# -----------------------------------------------------------------------------
# The learning-rate schedule (Hugging Face's), and where a resumed run takes it up


def lr_factor(k, total, warmup_steps, kind, anchor=None):
    """The learning rate of optimizer update k (0-based) as a fraction of --learning-rate, Hugging
    Face's schedules (get_linear_schedule_with_warmup, get_constant_schedule_with_warmup): k / W
    during the W warmup updates (0 at the first), then 1 (constant) or a linear decay that reaches 0
    at update `total`. anchor = (k0, f0): a run resumed with another --max-steps continues from the
    factor f0 it had reached at update k0 and decays linearly to 0 at the new total, instead of
    jumping to where the new total's schedule would be (Hugging Face's Trainer jumps)."""
    if k < warmup_steps:
        return k / warmup_steps
    if kind == "constant":
        return 1.0
    if anchor is not None and k >= anchor[0]:
        k0, f0 = anchor
        return max(0.0, f0 * (total - k) / max(total - k0, 1))
    return max(0.0, (total - k) / max(total - warmup_steps, 1))


def make_scheduler(optimizer, args, anchor=None):
    total = args.max_steps * args.num_iterations
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, total, args.warmup_steps, args.lr_scheduler_type, anchor))


def resumed_anchor(state, args):
    """The anchor of lr_factor for a resumed run: the saved one, or, when --max-steps changed under a
    linear schedule, the factor the run had reached at its checkpoint."""
    saved_total, anchor = state["schedule"]["total"], state["schedule"]["anchor"]
    total = args.max_steps * args.num_iterations
    if saved_total == total or args.lr_scheduler_type != "linear":
        return anchor
    k0 = state["scheduler"]["last_epoch"]
    f0 = lr_factor(k0, saved_total, args.warmup_steps, "linear", anchor)
    print(f"--max-steps changed ({saved_total // args.num_iterations} -> {args.max_steps}): the learning rate goes on "
          f"from {f0 * args.learning_rate:.3g} and decays linearly to 0 at step {args.max_steps}")
    if f0 == 0:
        print("WARNING: the resumed schedule had already decayed to 0: no update will change the weights. "
              "Pass --lr-scheduler-type constant (or a fresh run) to train on.")
    return (k0, f0)
