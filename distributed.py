"""
distributed.py: the same update on N processes (torchrun), data parallel.

  torchrun --nproc-per-node N edge_grpo.py ...            # N GPUs (or N CPU processes) on one machine
  torchrun --nnodes M --node-rank K --nproc-per-node N --rdzv-endpoint HOST:PORT edge_grpo.py ...

Each rank takes whole groups: the P prompts of a step are split into N consecutive blocks of P / N,
and every row keeps its index in the step's whole batch, so sampling and GEC draw exactly what one
process would (rollout.row_generators). Rewards, GEC, advantages and EDA stay within a group, so
within a rank. The loss weights count the whole step (token_weights with the global number of rows,
micro-batches, or tokens, all-reduced), so each rank's gradient is its part of the one-process
gradient, and one all-reduce (a sum) of the gradients per optimizer step makes it whole on every rank;
every rank then takes the same optimizer step. That is what DDP does under no_sync; DDP's wrapper
itself cannot serve here, because our fused Functions (fast.py) write gradients straight into .grad,
where its hooks never see them. Rank 0 writes the metrics (combined over ranks) and the checkpoints;
every rank resumes from them. A rank that dies ends the run: torchrun stops the other ranks, and a
collective still waiting on a dead peer fails after --ddp-timeout seconds.

--fsdp: when a model's state does not fit one GPU (the 7B: 152 GB), FSDP2 shards it (shard, below):
the same split of the work and the same loss weights, with every rank holding 1/N of the fp32
weights, their gradients and AdamW's moments.
"""

import os
import types
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from cli import processes  # torchrun's WORLD_SIZE, read before any process group exists


def launched():
    """Whether torchrun started this process as one of several."""
    return processes() > 1


def setup(timeout_s):
    """Joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs). Returns the device
    this rank computes on for --device auto/cuda: its own GPU (LOCAL_RANK), or the CPU."""
    if not launched() or dist.is_initialized():
        return None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def share(items):
    """This rank's consecutive block of items, and the index of its first item: equal blocks when
    len(items) divides by the world size, else the first len(items) % N ranks hold one more."""
    n, extra = divmod(len(items), world_size())
    first = rank() * n + min(rank(), extra)
    return items[first:first + n + (rank() < extra)], first


def gather(obj):
    """Every rank's obj, in rank order, on every rank (all_gather_object: small Python objects)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor):
    """tensor summed over ranks, in place; a no-op in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_gradients(params):
    """Sums the gradients of params over ranks: one all-reduce of their flat buffer when they are
    views of one (precision.attach_flat_grads), else one per tensor. Once per optimizer step."""
    grads = [p.grad for p in params if p.grad is not None]
    if world_size() == 1 or any(isinstance(g, DTensor) for g in grads):  # FSDP2 reduce-scattered them already
        return
    base = grads[0]._base if grads and grads[0]._base is not None else None
    if base is not None and all(g._base is base for g in grads) and sum(g.numel() for g in grads) == base.numel():
        dist.all_reduce(base)
    else:
        for g in grads:
            dist.all_reduce(g)


def combine_metrics(metrics):
    """Every rank's metrics -> the step's, on every rank: sums for the loss, the groups trained, GEC's
    action counts, the tokens trained and tokens per second; the largest for times and memory; the mean over ranks for
    the rest (rates, each rank's weighing the same: exact for equal shares, as every step has unless
    --dynamic-sampling ends short of P groups; None where a rank had none)."""
    if world_size() == 1:
        return metrics
    gathered = gather(metrics)
    combined = {}
    for key, value in metrics.items():
        values = [m[key] for m in gathered]
        if key in ("step", "learning_rate", "grad_norm", "objective"):
            combined[key] = value  # the same on every rank
        elif key in ("gec_actions", "gec_ended_right", "loss_tokens_by_source"):
            combined[key] = {a: sum(v[a] for v in values) for a in value}
        elif key in ("loss", "tokens_per_second", "groups_trained", "loss_tokens", "sft_nll"):
            combined[key] = sum(values)
        elif key.startswith("seconds") or key == "peak_memory_mb":
            combined[key] = max(values)
        else:
            present = [v for v in values if v is not None and v == v]  # a rank with no rows has NaN rates
            combined[key] = sum(present) / len(present) if present else None
    return combined


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): the training state sharded over the ranks


def shard(model, dtype, device):
    """FSDP2 (torch's fully_shard) over all ranks: each decoder layer is one unit, the root (embeddings,
    final norm, LM head, tied or not) another. Each rank keeps 1/N of every fp32 parameter: those
    shards are the master weights, AdamW's moments follow them. A unit's weights are gathered in dtype
    (the MixedPrecisionPolicy) just before it runs and freed after; after its backward its gradients
    are reduce-scattered in fp32, summed over the ranks (divide factor 1: each rank's loss is already
    its part of the step's, token_weights). Run the model's scoring through as_forward and its
    generation inside gathered."""
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for unit in fsdp_units(model):  # a plain sum (SUM is what every backend has; gloo lacks PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    model.call_as_forward = types.MethodType(lambda self, fn, *args: fn(self, *args), model)
    register_fsdp_forward_method(model, "call_as_forward")  # FSDP's pre/post-forward hooks around it
    with torch.no_grad():  # FSDP sets itself up on the first forward, which must be the root's: ours
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))  # call the layers directly
    for unit in fsdp_units(model):
        unit.reshard()  # the root keeps its weights gathered after a forward; model.parameters() are the shards again
    return model


def fsdp_units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def as_forward(model, fn, *args):
    """fn(model, *args). Under FSDP2 it runs as the model's forward, so that FSDP gathers the root's
    weights (our scoring reads the LM head's and the embedding's outside any module's forward) and,
    in backward, reduces their gradients."""
    if isinstance(model, FSDPModule):
        return model.call_as_forward(fn, *args)
    return fn(model, *args)


@contextmanager
def gathered(model):
    """Under FSDP2, every unit's weights gathered for the block and freed after it: generation and
    the no-grad scoring pass then all-gather each unit once, not once per decoded token. Costs the
    whole model in dtype (the 7B: 15 GB in bf16), which generation needs anyway. A no-op otherwise."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:  # the root never reshards after forward (FSDP's own rule)
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def full_state(model, optimizer):
    """Under FSDP2, the model's and the optimizer's state with every shard gathered, on the CPU, in
    the layout of a single process (what a checkpoint holds, whatever the number of GPUs). A
    collective: every rank calls it."""
    gathered_ = {}

    def full(t):
        if not isinstance(t, DTensor):
            return t
        if id(t) not in gathered_:  # a tied weight is gathered once and saved under both names
            gathered_[id(t)] = t.full_tensor().to("cpu", copy=True)  # its own storage, not a view of a gather buffer
        return gathered_[id(t)]
    model_state = {name: full(t).detach() for name, t in model.state_dict(keep_vars=True).items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in optimizer_state["state"].items()}
    return model_state, optimizer_state


def shard_optimizer_state(optimizer):
    """After loading a checkpoint's (whole) optimizer state: each rank keeps the shard of every moment
    that matches its shard of the parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                state = optimizer.state[p]
                for key, value in state.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                        state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def barrier():
    if world_size() > 1:
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
