"""
cli.py: the run's description. Every flag of edge_grpo.py with its default, the recipes that set
defaults (the authors' settings, the CPU demo's, the model aliases, --dr-grpo, --ngrpo), and the rules
that refuse a combination before anything is loaded. Nothing here computes: no tensor, no model, no
import of torch, so a mistyped flag fails in a blink. edge_grpo.py reads the parsed arguments.

  python edge_grpo.py --help     # everything below, with defaults

The vocabularies of the flags (prompt formats, GEC branches, optimizers, loss types, rewards) are
defined here and imported by the modules that implement them.
"""

import argparse
import difflib
import json
import math
import os
import re
import sys
from pathlib import Path

from data import PAPER_DATA
from errors import fail

# -----------------------------------------------------------------------------
# The flags' vocabularies and the defaults that are constants of a paper

PROMPT_FORMATS = ("bare", "step-by-step")                   # rollout.build_prompt
GEC_BRANCHES = ("reflection", "answer", "solution", "prefix")  # rollout.choose_gec_actions; prefix: not the paper's
REPORT_TO = ("none", "tensorboard", "wandb")                   # trackers.py
DEFAULT_GEC_BRANCHES = GEC_BRANCHES[:3]                        # the paper's three
REFLECTION_NEW_TOKENS = 256  # the authors' budget of the continuation after GEC's reflection cue
# optim.build_optimizer: HF's names, + _sr
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch_8bit", "adamw_torch_8bit_sr")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")  # TRL's names, with TRL's meanings (edge_grpo.token_weights)
REWARDS = ("exact-match", "format-only")          # edge_grpo.trained_rewards
NGRPO_CLIP = (0.16, 0.24)  # NGRPO's asymmetric clip range (its authors' training script): --epsilon, --epsilon-high
# SEED-GRPO's alpha in its authors' code (scale 1 / (1 + alpha SE / log G)): --seed-grpo-alpha
SEED_GRPO_ALPHA = 0.0417

# The paper's hyperparameters (../shared/PAPER.md, "Authors' training settings"); 1 epoch of 1000 prompts.
AUTHORS_SETTINGS = dict(learning_rate=1e-6, num_generations=8, prompts_per_step=1, temperature=0.6, top_p=1.0,
                        max_completion_length=1024, max_prompt_length=512, gec_reflection_tokens=REFLECTION_NEW_TOKENS,
                        max_steps=1000, beta=0.0, epsilon=0.2, lr_scheduler_type="linear", warmup_steps=0,
                        max_grad_norm=1.0, micro_batch_size=8, data="deepscaler_hard-1k")
# The CPU demo, chosen by measurement (README, "The demo"): small groups, short answers, a learning rate
# high enough that 135M parameters move within minutes.
DEMO_SETTINGS = dict(learning_rate=3e-5, num_generations=4, prompts_per_step=2, temperature=1.0, top_p=1.0,
                     max_completion_length=48, max_prompt_length=256, gec_reflection_tokens=32, max_steps=24,
                     lr_scheduler_type="constant", micro_batch_size=8)
MODEL_ALIASES = {  # alias -> the settings it brings; where its weights come from: checkpoints.MODEL_SOURCES
    "qwen2.5-math-1.5b": AUTHORS_SETTINGS,
    "qwen2.5-math-7b": AUTHORS_SETTINGS,
    "smollm2-135m": DEMO_SETTINGS,
}


# Flags that change only the budget, the machine or where and how the run is written: a resumed run may change
# them. Every other flag defines the experiment (experiment_differences): model, data, method, G, P, reward, seed...
FREE_FLAGS = ("max_steps", "save_steps", "save_total_limit", "log_completions_steps", "output_dir",
              "overwrite_output_dir", "resume", "device", "dtype", "micro_batch_size", "gradient_checkpointing",
              "fast", "compile", "ddp_timeout", "fsdp", "allow_changed_flags", "report_to", "changed_flags")


def experiment_differences(saved, now, free=FREE_FLAGS):
    """The flags that define the experiment and differ: [(flag, saved value, value now)]. saved: a run's
    config (run_config.json, config.json); a flag it does not hold (added since) ran at its default."""
    defaults = vars(build_parser(add_help=False).parse_args([]))
    differ = []
    for key in sorted(set(saved) | set(now)):
        if key in free or key not in defaults:  # not a flag (config.json's arm)
            continue
        before, after = saved.get(key, defaults.get(key)), now.get(key, defaults.get(key))
        if isinstance(before, (list, tuple)) or isinstance(after, (list, tuple)):
            before, after = list(before or []) or None, list(after or []) or None
        if before != after:
            differ.append((key, before, after))
    return differ


def describe_differences(differences, limit=6):
    """[(flag, before, now)] -> "--num-generations 4 -> 8, --gec True -> False" for one line."""
    cells = [f"--{key.replace('_', '-')} {before} -> {after}" for key, before, after in differences[:limit]]
    return ", ".join(cells) + (f" and {len(differences) - limit} more" if len(differences) > limit else "")


def processes():
    """How many processes torchrun started (1 without torchrun): its WORLD_SIZE, readable before any
    process group exists (distributed.py reads it from here)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# -----------------------------------------------------------------------------
# The parser, the recipes, the rules


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description="EDGE-GRPO: GRPO with guided error correction and entropy-driven "
                                            "advantages. The defaults shown are what runs with the --model (and "
                                            "--resume) given: an alias brings its settings (python edge_grpo.py "
                                            "--model qwen2.5-math-1.5b --help shows the paper's).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help,
                                allow_abbrev=False)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m",
                   help=f"alias ({', '.join(MODEL_ALIASES)}), hub id or local path; an alias brings its settings")
    g.add_argument("--data", default=None,
                   help=f"JSON array or JSONL with problem, answer, optional solution, or a name fetched once "
                   f"({', '.join(PAPER_DATA)}); none: the built-in arithmetic set (the qwen aliases: "
                   f"deepscaler_hard-1k)")
    g.add_argument("--prompt-format", choices=("auto",) + PROMPT_FORMATS, default="auto",
                   help="bare problem, or with the step-by-step instruction; auto: by model family (the "
                        "authors' choice)")
    g.add_argument("--output-dir", default=None,
                   help="metrics.jsonl, config.json and checkpoints go here; none: runs/ARM "
                   "(runs/edge-grpo, runs/grpo, runs/forced-reflection, ...)")
    g.add_argument("--overwrite-output-dir", action="store_true",
                   help="start afresh in an --output-dir that holds a run")
    g.add_argument("--resume", default=None,
                   help="a checkpoint dir to continue from, in its own run's directory (its config is "
                   "the default; flags that define the experiment may not change, see --allow-changed-flags)")
    g.add_argument("--allow-changed-flags", action="store_true",
                   help="--resume with flags that define the experiment changed (method, G, data, model, ...): "
                        "taken, and config.json records from which step which flags changed")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, sampling and GEC")
    g = p.add_argument_group("method (defaults: EDGE-GRPO; --no-gec --no-eda: vanilla GRPO)")
    g.add_argument("--gec", action=argparse.BooleanOptionalAction, default=True,
                   help="guided error correction of wrong responses")
    g.add_argument("--forced-reflection", action="store_true",
                   help="the paper's baseline: reflection cue + continuation for every wrong response, no guidance")
    g.add_argument("--eda", action=argparse.BooleanOptionalAction, default=True,
                   help="entropy-driven advantage A_i * mean(H)/H_i")
    g.add_argument("--authors-eda", action="store_true",
                   help="EDA as the authors' code: gradient through H_i, mean(H)/H_i unclamped (H_i still floored at "
                        "1e-6 against NaN)")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group std (off: mean-only)")
    g.add_argument("--inserted-tokens", choices=("train", "mask"), default="train",
                   help="train GEC's inserted text like sampled text (authors) or leave it out of the loss")
    g.add_argument("--gec-reflection-tokens", type=int, default=REFLECTION_NEW_TOKENS,
                   help="max new tokens after the reflection cue")
    g.add_argument("--gec-branches", nargs="+", choices=GEC_BRANCHES, default=list(DEFAULT_GEC_BRANCHES),
                   help="GEC's branches (1/2 reflection, 1/4 answer, 1/4 solution); a removed branch's share "
                        "goes to the others in proportion (reflection solution: 2/3, 1/3). prefix (weight 1/2, not "
                        "the paper's): the solution's start up to its answer (at most 3/4 of it) replaces the "
                        "response, the policy writes the rest, the prefix is never trained; reflection prefix: "
                        "EDGE-GRPO guided without the answer")
    g.add_argument("--reward", choices=REWARDS, default="exact-match",
                   help="what the advantages are computed from: format + exact-match accuracy (0/1/2), or format-only "
                        "(1 for any boxed answer, right or wrong: a control)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num-generations", type=int, default=8, help="G, responses per prompt (>= 2)")
    g.add_argument("--prompts-per-step", type=int, default=1, help="P, prompts per optimizer step")
    g.add_argument("--max-completion-length", type=int, default=1024, help="max new tokens per response")
    g.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts are skipped (counted in metrics)")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1.0 is off")
    g = p.add_argument_group("optimization")
    g.add_argument("--learning-rate", type=float, default=1e-6, help="AdamW peak learning rate")
    g.add_argument("--lr-scheduler-type", choices=("linear", "constant"), default="linear",
                   help="decay to 0 over the run, or constant")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warmup from 0, in optimizer steps (Hugging Face's schedule)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 is off")
    g.add_argument("--max-steps", type=int, default=1000,
                   help="rollout steps (each does --num-iterations optimizer updates)")
    g.add_argument("--sft-steps", type=int, default=0,
                   help="the first K steps are supervised fine-tuning on the drawn problems' reference solutions "
                        "(token-mean NLL), the rest the RL method: K = --max-steps is pure SFT (a baseline), half is "
                        "SFT then RL")
    g.add_argument("--beta", type=float, default=0.0,
                   help="KL coefficient to a frozen reference (k3); 0 builds no reference model")
    g.add_argument("--epsilon", type=float, default=0.2,
                   help="PPO clip range, lower side (and upper unless --epsilon-high)")
    g.add_argument("--epsilon-high", type=float, default=None, help="PPO clip range, upper side; none: --epsilon")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo",
                   help="as TRL: grpo: per-response token mean; bnpo: token mean per micro-batch; dapo: token "
                        "mean over the step; dr_grpo: sum / (B x max length)")
    g.add_argument("--num-iterations", type=int, default=1, help="updates per rollout (>1 stores old log-probs)")
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="rows per forward/backward; a multiple of G lets EDA reuse the training forward")
    g = p.add_argument_group("GRPO-family variants (README, \"The GRPO family\")")
    g.add_argument("--dr-grpo", action="store_true",
                   help="Dr. GRPO (Liu et al. 2025): no std scaling and the constant normalizer (= --no-scale-rewards "
                        "--loss-type dr_grpo)")
    g.add_argument("--ngrpo", action="store_true",
                   help="NGRPO (Nan et al. 2025): group statistics with a virtual maximum-reward response, and its "
                        "asymmetric clip (default --epsilon 0.16 --epsilon-high 0.24, which flags given override); "
                        "its authors' script also drops all-correct groups, which this does not (they get 0 "
                        "advantage, as in GRPO)")
    g.add_argument("--importance-sampling-level", choices=("token", "sequence"), default="token",
                   help="sequence: GSPO (Zheng et al. 2025), one length-normalised ratio per response, clipped "
                        "as a whole (the paper clips at --epsilon 3e-4 --epsilon-high 4e-4)")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: groups whose rewards are all equal after GEC are replaced by fresh prompts "
                        "until P mixed groups are found (metric prompts_drawn)")
    g.add_argument("--max-sampling-rounds", type=int, default=3,
                   help="--dynamic-sampling: extra sampling rounds per step at most")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="DAPO's soft overlong punishment: the reward falls linearly by up to 1 over the last N "
                        "tokens before --max-completion-length (DAPO: 4096 of 20480); 0: off")
    g.add_argument("--top-entropy-quantile", type=float, default=1.0,
                   help="train only the tokens whose entropy is in this top fraction of each micro-batch's tokens "
                        "(Wang et al. 2025: 0.2; under torchrun each rank's micro-batch, where TRL pools the "
                        "ranks' tokens); 1.0: every token")
    g.add_argument("--entropy-band", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="train only the tokens whose entropy lies between these quantiles of each micro-batch's tokens "
                        "(SPINE's forking tokens without the noisiest top, e.g. 0.8 0.98); 0.8 1.0 = "
                        "--top-entropy-quantile 0.2")
    g.add_argument("--seed-grpo", action="store_true",
                   help="SEED-GRPO (Chen et al. 2025): each group's advantages x 1 / (1 + alpha SE / log G), SE "
                        "the semantic entropy of its answers (clustered by reward.py's exact match); metric "
                        "semantic_entropy")
    g.add_argument("--seed-grpo-alpha", type=float, default=SEED_GRPO_ALPHA,
                   help="--seed-grpo's alpha (its authors' code: 0.0417; the paper: 0.02)")
    g = p.add_argument_group("system and logging")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; bfloat16 keeps fp32 master weights and AdamW moments (precision.py); auto: "
                        "bfloat16 on GPU, float32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="the speed and memory machinery (fast.py), same numbers; --no-fast: the plain reference path")
    g.add_argument("--ddp-timeout", type=int, default=1800,
                   help="torchrun: seconds a rank waits for the others before the run fails (Hugging Face's name and "
                        "default); a hung rank stalls the launch this long: e.g. --ddp-timeout 300")
    g.add_argument("--fsdp", nargs="?", const="full_shard", choices=("full_shard",), default=None,
                   help="torchrun: shard the fp32 weights, their gradients and AdamW's moments over the processes "
                        "(FSDP2), for a state one GPU cannot hold (the 7B); Hugging Face's --fsdp full_shard")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode on a static KV cache with a torch.compile'd step (same tokens); default: on with CUDA, "
                        "off on CPU (a compile costs about a minute there); needs --fast")
    g.add_argument("--save-steps", type=int, default=100,
                   help="checkpoint every N steps, and at the end (0: only at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="keep the newest N checkpoints (0: keep all)")
    g.add_argument("--log-completions-steps", type=int, default=5,
                   help="print sample completions every N steps and log every row to completions.jsonl (0: never)")
    g.add_argument("--report-to", nargs="+", choices=REPORT_TO, default=["none"],
                   help="also log metrics to TensorBoard (OUTPUT_DIR/tensorboard) and/or Weights & Biases "
                        "(trackers.py)")
    g = p.add_argument_group("smaller GPUs (precision.py, lora.py)")
    g.add_argument("--optim", choices=OPTIMIZERS, default="adamw_torch_fused",
                   help="adamw_torch_fused: fp32 moments (and fp32 masters under bf16); adamw_torch_8bit: "
                        "torchao's 8-bit moments; adamw_torch_8bit_sr: 8-bit moments and bf16 weights updated with "
                        "stochastic rounding, no masters (needs bf16)")
    g.add_argument("--use-peft", action="store_true",
                   help="train LoRA adapters only (peft); not the paper's full fine-tune")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA scale alpha (the update is alpha / r x B A)")
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the adapters' input (TRL's default is 0.05; 0 keeps the scored policy the "
                        "sampled one)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="module names to adapt, or all-linear; none: peft's default for the family (q_proj v_proj)")
    g.add_argument("--save-merged-model", action="store_true",
                   help="LoRA: checkpoints also hold the merged model that from_pretrained loads (else the "
                        "adapter only)")
    return p


def parse_args(argv=None):
    """Two passes: the first finds --model / --resume, whose settings become the defaults; the
    second lets every flag given on the command line override them, and --help shows the defaults
    that will run. --prompt-format may stay auto: the trainer decides it from the model
    (checkpoints.prompt_format_of)."""
    first, _ = build_parser(add_help=False).parse_known_args(argv)
    parser = build_parser()
    if first.resume:
        config_path = Path(first.resume) / "run_config.json"
        if not config_path.is_file():
            fail(f"--resume {first.resume}: no run_config.json there; pass a checkpoint dir (OUTPUT_DIR/checkpoint-N)")
        saved = read_run_config(config_path)
        saved.pop("resume", None)
        saved.pop("fsdp", None)  # the layout over GPUs is chosen at each launch: a checkpoint resumes on any
        saved.pop("allow_changed_flags", None)
        saved.pop("changed_flags", None)
        saved["output_dir"] = str(Path(first.resume).resolve().parent)  # the run is the directory holding it
        parser.set_defaults(**saved)
    elif first.model in MODEL_ALIASES:
        parser.set_defaults(**MODEL_ALIASES[first.model])
    if first.dr_grpo:  # a recipe: its two settings become the defaults (given flags that contradict it fail)
        parser.set_defaults(loss_type="dr_grpo", scale_rewards=False)
    if first.ngrpo and not first.resume:  # its clip range becomes the default
        parser.set_defaults(epsilon=NGRPO_CLIP[0], epsilon_high=NGRPO_CLIP[1])
    args = parse_known_or_fail(parser, argv)
    validate_numbers(args, parser)
    validate_args(args)
    if first.resume:  # a continuation is the same experiment, unless the user says otherwise
        args.changed_flags = experiment_differences(saved, vars(args))
        if args.changed_flags and not args.allow_changed_flags:
            fail(f"--resume {first.resume}: these flags differ from the run's, which would make its steps two "
                 f"experiments under one name: {describe_differences(args.changed_flags)}. Nothing was changed. Drop "
                 f"them, or pass --allow-changed-flags to go on with them (config.json records the change)")
    if args.importance_sampling_level == "sequence" and args.loss_type != "grpo":  # allowed, as TRL allows it, and said
        print(f"warning: GSPO (--importance-sampling-level sequence) with --loss-type {args.loss_type}: GSPO's paper "
              "and TRL's recipe for it average per response, --loss-type grpo", file=sys.stderr)
    args.output_dir = args.output_dir or str(Path("runs") / run_slug(arm_name(args)))
    return args


def parse_known_or_fail(parser, argv, options_of=None):
    """parser.parse_args, but an unknown flag fails naming the flags it may have meant (abbreviations
    are off: --lr is not taken for --lr-scheduler-type). options_of(args): the parser whose flags to
    suggest from (a subcommand's), by default parser."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [s for a in (options_of(args) if options_of else parser)._actions for s in a.option_strings]
        given = unknown[0].split("=")[0]
        meant = close_flags(given, options) if given.startswith("--") else []
        fail(f"unrecognized argument {unknown[0]}" + (f": did you mean {' or '.join(meant)}?" if meant else "")
             + " (--help lists every flag)")
    return args


def close_flags(given, options):
    """Flags a mistyped one may have meant: the flag whose words' initials it is (--lr: --learning-rate),
    the nearest spellings (--num-generation: --num-generations), flags that begin with it."""
    initials = [o for o in options if o.startswith("--") and "".join(w[0] for w in o[2:].split("-")) == given[2:]]
    near = difflib.get_close_matches(given, options, n=3, cutoff=0.75)
    begun = [o for o in options if o.startswith(given)]
    return list(dict.fromkeys(initials + near + begun))[:3]


def read_run_config(path):
    """A checkpoint's run_config.json or a run's config.json, or one line naming it when it is damaged or
    hand-edited into something that is not a JSON object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        config = e
    if not isinstance(config, dict):
        why = f"{type(config).__name__}: {str(config)[:120]}" if isinstance(config, Exception) else "not a JSON object"
        where = (f"the checkpoint is damaged: resume from the previous checkpoint in {path.parent.parent}"
                 if path.name == "run_config.json" else "repair it, or delete it (a plot then labels the run by its "
                                                        "directory)")
        fail(f"{path}: unreadable ({why}); {where}")
    return config


def validate_args(args):
    """Contradictions and impossible values, before anything is loaded: (condition, the message naming
    the flag and the way out), in the parser's groups' order."""
    G = args.num_generations
    checks = [
        # method
        (args.gec or not args.forced_reflection, "--forced-reflection is a mode of GEC: it contradicts --no-gec"),
        (args.eda or not args.authors_eda, "--authors-eda changes EDA: it contradicts --no-eda"),
        (not args.authors_eda or args.micro_batch_size % G == 0,
         f"--authors-eda needs whole groups per micro-batch: --micro-batch-size {args.micro_batch_size} is not a "
         f"multiple of G={G}"),
        (args.gec_reflection_tokens >= 1, "--gec-reflection-tokens must be at least 1"),
        (set(args.gec_branches) == set(DEFAULT_GEC_BRANCHES) or (args.gec and not args.forced_reflection),
         "--gec-branches chooses among GEC's branches: it contradicts --no-gec and --forced-reflection"),
        # sampling
        (G >= 2, f"--num-generations {G}: a group needs at least 2 responses (its std is undefined for 1)"),
        (args.prompts_per_step >= 1, "--prompts-per-step must be at least 1"),
        (args.prompts_per_step % processes() == 0,
         f"--prompts-per-step {args.prompts_per_step} must be a multiple of the number of processes "
         f"({processes()}): each takes whole groups"),
        (args.max_completion_length >= 1, "--max-completion-length must be at least 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        # optimization
        (args.learning_rate > 0, "--learning-rate must be positive"),
        (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (args.max_steps >= 1, "--max-steps must be at least 1"),
        (0 <= args.sft_steps <= args.max_steps, f"--sft-steps must be between 0 and --max-steps ({args.max_steps})"),
        (args.beta >= 0, "--beta must be >= 0"),
        (args.epsilon >= 0 and (args.epsilon_high is None or args.epsilon_high >= 0),
         "--epsilon and --epsilon-high must be >= 0"),
        (args.num_iterations >= 1, "--num-iterations must be at least 1"),
        (args.micro_batch_size >= 1, "--micro-batch-size must be at least 1"),
        # variants
        (not args.dr_grpo or (args.loss_type == "dr_grpo" and not args.scale_rewards),
         "--dr-grpo means --loss-type dr_grpo and --no-scale-rewards: it contradicts the --loss-type or "
         "--scale-rewards given"),
        (args.max_sampling_rounds >= 0, "--max-sampling-rounds must be >= 0"),
        (0 <= args.overlong_buffer < args.max_completion_length,
         "--overlong-buffer must be >= 0 and below --max-completion-length"),
        (0 < args.top_entropy_quantile <= 1, "--top-entropy-quantile must be in (0, 1]"),
        (not args.entropy_band or 0 <= args.entropy_band[0] < args.entropy_band[1] <= 1,
         "--entropy-band LOW HIGH: quantiles with 0 <= LOW < HIGH <= 1"),
        (not args.entropy_band or args.top_entropy_quantile == 1,
         "--entropy-band and --top-entropy-quantile both choose the trained tokens: give one"),
        (args.seed_grpo_alpha >= 0, "--seed-grpo-alpha must be >= 0"),
        # system and logging
        (args.fast or not args.compile, "--compile is part of the fast path: it contradicts --no-fast"),
        (not args.fsdp or processes() > 1,
         "--fsdp shards the state over torchrun's processes: launch with torchrun --nproc-per-node N (N >= 2)"),
        (not args.fsdp or not args.compile,
         "--compile with --fsdp: FSDP's hooks run around every layer of the decoding step, which is not compiled here; "
         "use --no-compile"),
        (not args.dynamic_sampling or not args.fsdp,
         "--dynamic-sampling with --fsdp: the ranks may keep unequal numbers of groups, and FSDP needs the same "
         "number of forward passes on every rank; run it data parallel (no --fsdp)"),
        (args.save_steps >= 0 and args.save_total_limit >= 0, "--save-steps and --save-total-limit must be >= 0"),
        # smaller GPUs
        (args.optim != "adamw_torch_8bit_sr" or args.dtype != "float32",
         "--optim adamw_torch_8bit_sr rounds bf16 weights stochastically: it needs --dtype bfloat16 (or auto)"),
        (not args.fsdp or args.optim == "adamw_torch_fused",
         f"--fsdp runs with --optim adamw_torch_fused only for now (its fp32 shards are the masters), not "
         f"{args.optim}"),
        (args.lora_r >= 1 and 0 <= args.lora_dropout < 1, "--lora-r must be >= 1 and --lora-dropout in [0, 1)"),
        (args.use_peft or not args.save_merged_model, "--save-merged-model merges LoRA adapters: it needs --use-peft"),
        (not args.fsdp or not args.use_peft,
         "--fsdp with --use-peft: LoRA's trained state is small, run it data parallel (no --fsdp)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate_numbers(args, parser):
    """Every number a flag takes: finite (argparse's float() takes nan and inf), and in its range; the
    device a name torch knows. One line naming the flag and what it accepts."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                fail(f"{action.option_strings[0]} {v}: expected a finite number")
    checks = [
        (args.seed >= 0, f"--seed {args.seed}: must be >= 0 (it seeds numpy's and torch's generators)"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (args.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0: no clipping)"),
        (args.max_prompt_length >= 1, "--max-prompt-length must be at least 1"),
        (args.lora_alpha >= 1, "--lora-alpha must be at least 1"),
        (args.ddp_timeout >= 1, "--ddp-timeout must be at least 1 second"),
        (args.log_completions_steps >= 0, "--log-completions-steps must be >= 0 (0: never)"),
        ("none" not in args.report_to or len(args.report_to) == 1,
         "--report-to none contradicts the trackers named with it"),
        (DEVICE_NAME.fullmatch(args.device) is not None,
         f"--device {args.device}: expected auto, cpu, cuda, cuda:N or mps"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def arm_name(args):
    """The paper's three arms (and the fourth, EDA without GEC); GEC's branches when not the paper's;
    the supervised steps before them (--sft-steps)."""
    if not args.gec:
        rl = "GRPO + EDA" if args.eda else "GRPO"
    elif args.forced_reflection:
        rl = "forced reflection + EDA" if args.eda else "forced reflection"
    else:
        rl = "EDGE-GRPO" if args.eda else "GRPO + GEC"
        if list(args.gec_branches) != list(DEFAULT_GEC_BRANCHES):
            rl += f" ({' + '.join(args.gec_branches)})"
    if args.sft_steps >= args.max_steps:
        return "SFT"
    return f"SFT, then {rl}" if args.sft_steps else rl


def run_slug(name):
    """An arm's name as a directory: "GRPO + EDA" -> grpo-eda, "SFT, then GRPO" -> sft-then-grpo."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
