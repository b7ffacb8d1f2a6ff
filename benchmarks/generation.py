"""
benchmarks/generation.py: decoding speed of the three paths of rollout.decode, the same tokens each:
  dynamic   the plain loop, the KV cache growing a token at a time (transformers' DynamicCache)
  static    a StaticCache sized once, a fixed-shape step, eager (fast.decode_static)
  compiled  the same step through torch.compile (CUDA graphs on GPU): what --compile runs

  python benchmarks/generation.py                      # CPU: the embedded SmolLM2-135M, 8 rows x 128 new tokens
  python benchmarks/generation.py --rows 8 4 2 1       # + ms per step by batch size: does compacting finished rows pay?

On CUDA it also runs a random model with Qwen2.5-Math-1.5B's shapes at 8 rows x 1024 new tokens (the
paper's rollout). Every row decodes exactly new_tokens (no stop token), seed 0, temperature 1.0.
Each configuration runs in its own process (peak memory is per process) and prints one JSON line:
path, rows, new_tokens, tokens_per_s, peak_mb, plus seconds, compile_s (the first, compiling run;
not in tokens_per_s) and the model. benchmarks/gpu_check.py includes the GPU lines.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATHS = ("dynamic", "static", "compiled")


def load(model_name, device):
    import torch
    if model_name == "embedded":
        import edge_grpo
        model, tokenizer = edge_grpo.load_model_and_tokenizer("smollm2-135m", device, torch.float32)
        return model, tokenizer.eos_token_id
    from gpu_check import qwen_shaped_model
    model, tokenizer = qwen_shaped_model(device)
    return model.to(torch.bfloat16), tokenizer.eos_token_id


def run_one(model_name, path, rows, new_tokens, device_name, repeats=2):
    """Decodes rows x new_tokens (after one warm-up run, which compiles on the compiled path)."""
    import functools
    import torch
    import fast
    from rollout import Sampling, decode, generate
    decoder = dict(dynamic=decode, static=functools.partial(fast.decode_static, compiled=False),
                   compiled=functools.partial(fast.decode_static, compiled=True))[path]
    device = torch.device(device_name)
    model, _ = load(model_name, device)
    model.eval()
    fast.enable(model)  # as `python edge_grpo.py` (--fast) runs it
    high = min(1000, model.config.vocab_size)  # ids 100-999 of a real vocabulary: ordinary tokens
    prompt = torch.randint(high // 10, high, (1, 64), generator=torch.Generator().manual_seed(0)).repeat(rows, 1)
    mask = torch.ones_like(prompt)

    def once(seed):
        start = time.perf_counter()
        ids, _ = generate(model, prompt, mask, max_new_tokens=new_tokens, seed=seed, stop_ids=[-1], pad_id=0,
                          sampling=Sampling(1.0, 1.0, decoder), group_size=rows)  # -1: no row ever stops
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, ids

    compile_s, _ = once(0)
    seconds = min(once(seed)[0] for seed in range(1, 1 + repeats))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(model=model_name, device=device_name, path=path, rows=rows, new_tokens=new_tokens,
                tokens_per_s=rows * new_tokens / seconds, ms_per_step=1000 * seconds / new_tokens, peak_mb=peak,
                seconds=seconds, compile_s=compile_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--rows", nargs="+", type=int, default=[8], help="batch sizes to measure")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 on CPU, 1024 on CUDA")
    parser.add_argument("--models", nargs="+", default=None,
                        help="embedded, qwen-shaped (default: embedded; + qwen-shaped on CUDA)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = args.models or (["embedded", "qwen-shaped"] if device == "cuda" else ["embedded"])
    for model_name in models:
        new_tokens = args.new_tokens or (1024 if model_name == "qwen-shaped" else 128)
        for rows in args.rows:
            for path in args.paths:
                child = json.dumps([model_name, path, rows, new_tokens, device])
                out = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                print(lines[-1] if lines else json.dumps(dict(model=model_name, path=path, rows=rows,
                                                              error=out.stderr.strip().splitlines()[-1:])), flush=True)


if __name__ == "__main__":
    main()
