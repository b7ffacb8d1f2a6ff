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
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched():
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
    """This rank's consecutive block of items (len(items) divisible by the world size), and the index
    of its first item."""
    n = len(items) // world_size()
    return items[rank() * n:(rank() + 1) * n], rank() * n


def all_reduce_sum(tensor):
    """tensor summed over ranks, in place; a no-op in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_gradients(params):
    """Sums the gradients of params over ranks: one all-reduce of their flat buffer when they are
    views of one (precision.attach_flat_grads), else one per tensor. Once per optimizer step."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    base = grads[0]._base if grads and grads[0]._base is not None else None
    if base is not None and all(g._base is base for g in grads) and sum(g.numel() for g in grads) == base.numel():
        dist.all_reduce(base)
    else:
        for g in grads:
            dist.all_reduce(g)


def combine_metrics(metrics):
    """Every rank's metrics -> the step's, on every rank: sums for the loss, GEC's action counts and
    tokens per second; the largest for times and memory; the mean over ranks for the rest (rates
    over equal numbers of rows or groups per rank; None where a rank had none)."""
    if world_size() == 1:
        return metrics
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, metrics)
    combined = {}
    for key, value in metrics.items():
        values = [m[key] for m in gathered]
        if key in ("step", "learning_rate", "grad_norm"):
            combined[key] = value  # the same on every rank
        elif key == "gec_actions":
            combined[key] = {a: sum(v[a] for v in values) for a in value}
        elif key in ("loss", "tokens_per_second"):
            combined[key] = sum(values)
        elif key.startswith("seconds") or key == "peak_memory_mb":
            combined[key] = max(values)
        else:
            present = [v for v in values if v is not None]
            combined[key] = sum(present) / len(present) if present else None
    return combined


def barrier():
    if world_size() > 1:
        dist.barrier()


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
