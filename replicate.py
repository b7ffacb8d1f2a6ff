"""
replicate.py: the paper's comparison (its Table 2) as a seeded, controlled study on held-out problems.

  python replicate.py                                   # the paper's 4 arms x 3 seeds on the CPU demo, held-out eval
  python replicate.py --arms paper controls --seeds 5   # + the controls: which part of EDGE-GRPO does the work?
  python replicate.py --model qwen2.5-math-1.5b --data deepscaler_hard-1k --eval-data math500 --seeds 3   # on a GPU
  python replicate.py --arms grpo edge-grpo -- --learning-rate 1e-5    # flags after -- go to every run

Every arm is edge_grpo.py with its flags (PAPER_ARMS, CONTROLS), trained by edge_grpo.train and
evaluated by `analysis.py eval`: this file trains and evaluates nothing itself, it holds the design
around them.
- Paired seeds: for seed s every arm sees the same prompts in the same order and starts from the
  same per-row generators, so arms are compared seed by seed.
- Held-out problems: arithmetic-test shares no (a, op, b) with the training set (data.py).
- Statistics: mean and sample std over seeds; the paired difference to GRPO with a t interval over
  seeds (n - 1 degrees of freedom). An interval that holds 0 says the study cannot tell the arm
  from GRPO, and the table says so.
- Resumable: a run whose evaluation exists is skipped, a trained one only evaluated, an interrupted
  one resumed from its newest checkpoint.

Out: OUTPUT_DIR/ARM/seed-S/ (the run: metrics.jsonl, config.json, its final checkpoint without the
optimizer state once evaluated; eval/: records and summary.json), OUTPUT_DIR/base/eval/ (the model
before training), results.json (every number per arm and seed), table.md, curves.png.
"""

import argparse
import copy
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch

import analysis
import cli
import edge_grpo
from checkpoints import checkpoint_dirs, hold_lock, load_model_and_tokenizer
from data import EVAL_SETS
from errors import fail

# -----------------------------------------------------------------------------
# The design: arms, seeds, what is measured

PAPER_ARMS = {  # the paper's Table 2 rows: label -> edge_grpo.py flags
    "GRPO": ["--no-gec", "--no-eda"],
    "GRPO + forced reflection": ["--forced-reflection", "--no-eda"],
    "GRPO + forced reflection + EDA": ["--forced-reflection"],
    "EDGE-GRPO": [],
}
CONTROLS = {  # each one change, and the question it answers
    "EDA only": ["--no-gec"],                                   # does EDA help without GEC?
    "GEC only": ["--no-eda"],                                   # does GEC help without EDA?
    "GEC, inserted text masked": ["--inserted-tokens", "mask"],  # is the gain the policy copying GEC's text?
    "GEC without the answer branch": ["--gec-branches", "reflection", "solution"],  # ... the appended answer?
    "format-only reward": ["--reward", "format-only"],          # does the correctness signal matter at all?
    # guidance that never shows the answer: the two answer-showing branches replaced, row for row, by the prefix
    # branch (the same draws pick the same rows); reflection kept, so the one change against EDGE-GRPO is the answer
    "EDGE-GRPO, on-policy guidance": ["--gec-branches", "reflection", "prefix"],
}
SFT_ARMS = {  # supervised fine-tuning on the same solutions, the same steps and prompts: {steps} / {half} of them
    "SFT": ["--sft-steps", "{steps}"],
    "SFT, then GRPO": ["--sft-steps", "{half}", "--no-gec", "--no-eda"],
    "SFT, then EDGE-GRPO": ["--sft-steps", "{half}"],
}
ARM_GROUPS = {"paper": PAPER_ARMS, "controls": CONTROLS, "sft": SFT_ARMS, "all": {**PAPER_ARMS, **CONTROLS, **SFT_ARMS}}
EVERY_ARM = ARM_GROUPS["all"]
BASELINE = "GRPO"  # the paired differences are taken to this arm, and to SFT where it ran
SFT_BASELINE = "SFT"
HEADLINE = ("GRPO", "EDGE-GRPO", "SFT", "EDGE-GRPO, on-policy guidance")  # the arms --headline-seeds gives more seeds
# One colour per arm, 14 apart (matplotlib's cycle repeats after 10): tab10, then black, olive, navy, gold.
ARM_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000", "#556b2f", "#000080", "#ffd700")
# The questions the controls answer, each a paired difference of two arms (shown where both ran).
CONTRASTS = (("EDGE-GRPO", "GEC only", "what EDA adds to GEC"),
             ("EDGE-GRPO", "SFT", "EDGE-GRPO against SFT on the same solutions"),
             ("EDGE-GRPO", "GEC, inserted text masked", "what training GEC's inserted text gives"),
             ("EDGE-GRPO", "GEC without the answer branch", "what the answer branch gives"),
             ("EDGE-GRPO, on-policy guidance", "GRPO", "guidance that never shows the answer, against GRPO"),
             ("SFT, then GRPO", "SFT", "GRPO after SFT, against SFT alone"),
             ("SFT, then EDGE-GRPO", "SFT", "EDGE-GRPO after SFT, against SFT alone"))
# Steps per run of the CPU alias: 16 of the demo's 24, so that 4 arms x 3 seeds finish in 45 minutes on 2
# cores (measured: a 24-step forced-reflection run takes 330 s, GEC continuing every wrong response;
# the 24-step study about 54 min). --max-steps 24 runs the demo's length; other models keep their settings.
STUDY_STEPS = {"smollm2-135m": 16}
EVAL_SAMPLES = 4   # avg@k: k responses per problem at the eval temperature, sized for the CPU budget (README)
CURVES = (("adv_var", None, "advantage variance (Fig. 5)", "mean within-group variance"),
          ("zero_std_after_gec", "zero_std_before_gec", "collapsed groups: trained on (solid), before GEC (dashed)",
           "share of groups"),
          ("entropy", None, "mean response entropy H_i", "nats per token"),
          ("accuracy", None, "policy's own accuracy (training prompts, before GEC)", "share correct"))


def slug(label):
    """"GRPO + forced reflection" -> "grpo-forced-reflection": the arm's directory and its name on the command line."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def chosen_arms(names):
    """--arms: group names (paper, controls, sft, all) or arm names as slugs, in the order given; GRPO
    first, since every other arm is compared with it."""
    every = EVERY_ARM
    by_slug = {slug(label): label for label in every}
    arms = {}
    for name in names:
        if name in ARM_GROUPS:
            arms.update(ARM_GROUPS[name])
        elif name in by_slug:
            arms[by_slug[name]] = every[by_slug[name]]
        else:
            fail(f"--arms {name}: not a group ({', '.join(ARM_GROUPS)}) or an arm ({', '.join(by_slug)})")
    return {BASELINE: PAPER_ARMS[BASELINE], **arms}


def arm_flags(flags, max_steps):
    """An arm's flags for runs of max_steps steps: {steps} and {half} (the SFT arms' --sft-steps) filled in."""
    return [f.format(steps=max_steps, half=max_steps // 2) for f in flags]


def arm_seeds(label, opts):
    """The seeds an arm runs: 0 .. --seeds - 1, or 0 .. --headline-seeds - 1 for the HEADLINE arms."""
    return list(range(max(opts.seeds, opts.headline_seeds) if label in HEADLINE else opts.seeds))


# -----------------------------------------------------------------------------
# The statistics: pure functions of per-seed numbers

# t_{0.975, df}: the two-sided 95 % quantile of Student's t for df = 1..30 (standard tables).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df):
    """t_{0.975, df}: the table up to 30, beyond it the Cornish-Fisher expansion around z = 1.96."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_and_std(values):
    """Mean and sample standard deviation (ddof = 1; None for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def paired_difference(arm, baseline):
    """arm, baseline: {seed: value}. The mean over the seeds both have of d_s = arm_s - baseline_s and
    its 95 % interval, mean +- t_{0.975, n-1} x sd(d) / sqrt(n) (None with one seed)."""
    seeds = sorted(set(arm) & set(baseline))
    d = [arm[s] - baseline[s] for s in seeds]
    mean, std = mean_and_std(d)
    half = t_quantile_975(len(d) - 1) * std / math.sqrt(len(d)) if std is not None else None
    return dict(mean=mean, low=None if half is None else mean - half,
                high=None if half is None else mean + half, n=len(d))


# -----------------------------------------------------------------------------
# One run: train (or resume, or skip), evaluate, trim


def study_settings(opts, extra):
    """The edge_grpo.py settings every run shares (the model's recipe, --max-steps, the flags after
    --), resolved once: the steps, the sampling temperature and length the evaluation reuses."""
    return edge_grpo.parse_args(base_argv(opts, extra))


def base_argv(opts, extra):
    steps = opts.max_steps or STUDY_STEPS.get(opts.model)
    return (["--model", opts.model] + (["--data", opts.data] if opts.data else [])
            + (["--max-steps", str(steps)] if steps else []) + list(extra))


def run_args(directory, flags, seed, opts, extra, resume=None):
    """edge_grpo.py's arguments for one arm and seed: its checkpoints every --save-steps (edge_grpo's
    100: a GPU run resumes from the newest; a 24-step CPU run is short enough to redo), only the
    newest kept, no samples printed."""
    argv = base_argv(opts, extra) + ["--seed", str(seed), "--output-dir", str(directory), "--save-total-limit", "1",
                                     "--log-completions-steps", "0"] + flags
    return edge_grpo.parse_args((["--resume", str(resume)] if resume else ["--overwrite-output-dir"]) + argv)


def train_run(directory, flags, seed, opts, extra, base, max_steps):
    """The run's final checkpoint, training (or resuming) it when it is not there. base(): the
    untrained model and tokenizer, loaded once for the study. Returns the checkpoint and what was done."""
    final = directory / f"checkpoint-{max_steps}"
    if final.is_dir():
        return final, "trained before"
    started = [c for c in checkpoint_dirs(directory) if int(c.name.split("-")[-1]) < max_steps]
    model = tokenizer = None
    if started:  # interrupted: go on from the newest checkpoint (train loads its weights)
        args, done = run_args(directory, flags, seed, opts, extra, resume=started[-1]), "resumed"
    else:
        args, done = run_args(directory, flags, seed, opts, extra), "trained"
        model, tokenizer = base()
        model = copy.deepcopy(model)
    torch.manual_seed(seed)  # as edge_grpo.main does
    edge_grpo.train(args, model=model, tokenizer=tokenizer, progress=False)
    return final, done


def eval_argv(model_path, directory, opts, settings):
    """analysis.py eval's arguments: avg@k (and pass@k) at the eval temperature and greedy pass@1 on the
    held-out sets, with the same seed for every model."""
    argv = ["eval", "--model", str(model_path), "--data", *opts.eval_data, "--samples", str(opts.eval_samples),
            "--greedy", "--temperature", str(eval_temperature(opts, settings)), "--output-dir", str(directory),
            "--seed", "0", "--max-new-tokens", str(opts.eval_max_new_tokens or settings.max_completion_length)]
    return argv + (["--limit", str(opts.eval_limit)] if opts.eval_limit else [])


def eval_temperature(opts, settings):
    return settings.temperature if opts.eval_temperature is None else opts.eval_temperature


def evaluate(model_path, directory, opts, settings):
    """analysis.py eval of one model. Skipped when its summary.json exists (written last); the cache
    check (stale_eval) has made sure it measured what this study asks."""
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        return read_summary(summary_path), False
    return analysis.main(eval_argv(model_path, directory, opts, settings)), True


def read_summary(path):
    """An evaluation's summary.json; pass@k added from its records when an older version wrote it without."""
    summary = read_json(path)
    if "pass_at_k_weighted" not in summary:
        records = analysis.read_records(path.parent / "records.jsonl")
        summary["pass_at_k"], summary["pass_at_k_weighted"] = analysis.pass_at_k_table(records, summary["samples"])
    return summary


def read_json(path):
    """A JSON file the study wrote, or one line naming it when it is damaged or hand-edited."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        fail(f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]}); delete it (or its run) and run the study again")


def trim_checkpoint(checkpoint, keep_weights):
    """After the evaluation the optimizer state (two fp32 moments, 2/3 of a checkpoint) is dropped;
    with --no-keep-weights the weights too (the run's metrics and evaluation stay)."""
    if not keep_weights:
        shutil.rmtree(checkpoint, ignore_errors=True)
    else:
        (checkpoint / "trainer_state.pt").unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# The cache: a run or an evaluation is reused only when it measured what this study asks


def stale_run(directory, args):
    """How the run in directory differs from what this study would train there (its flags, the
    steps included): [] when it is the same experiment or nothing is there yet."""
    config = directory / "config.json"
    if not config.is_file():
        return []
    saved = read_json(config)
    differences = cli.experiment_differences(saved, vars(args))
    if saved.get("max_steps") != args.max_steps:
        differences.append(("max_steps", saved.get("max_steps"), args.max_steps))
    return differences


def stale_eval(directory, opts, settings):
    """How the evaluation in directory differs from what this study asks: sets, samples, temperature,
    length, limit, seed, greedy. [] when it is the same or not there yet."""
    path = directory / "summary.json"
    if not path.is_file():
        return []
    saved = read_json(path)
    wanted = dict(samples=opts.eval_samples, temperature=eval_temperature(opts, settings), limit=opts.eval_limit,
                  max_new_tokens=opts.eval_max_new_tokens or settings.max_completion_length, seed=0,
                  benchmarks=sorted(analysis.data_name(spec) for spec in opts.eval_data), greedy=True)
    found = dict(saved, benchmarks=sorted(saved.get("problems", {})), greedy="greedy" in saved,
                 seed=saved.get("seed", 0))
    return [(f"eval {key}", found.get(key), value) for key, value in wanted.items() if found.get(key) != value]


def check_cache(out, arms, opts, extra, settings):
    """Every run and evaluation already in the study's directory against this study's settings.
    A mismatch stops the study naming it (nothing is touched), unless --redo: then those runs are
    deleted here and trained again."""
    stale = {}
    base_eval = stale_eval(out / "base" / "eval", opts, settings)
    if base_eval:
        stale[out / "base"] = base_eval
    for label, flags in arms.items():
        for seed in arm_seeds(label, opts):
            directory = out / slug(label) / f"seed-{seed}"
            differences = stale_run(directory, run_args(directory, flags, seed, opts, extra)) \
                or stale_eval(directory / "eval", opts, settings)
            if differences:
                stale[directory] = differences
    if stale and not opts.redo:
        first, differences = next(iter(stale.items()))
        fail(f"{out} holds {len(stale)} runs or evaluations made with other settings than this study's (the first, "
             f"{first}: {cli.describe_differences(differences)}); nothing was changed. Pass --redo to train "
             f"and evaluate them again there, or another --output-dir for a fresh study")
    for directory in stale:
        shutil.rmtree(directory)
        print(f"--redo: {directory} removed, to be redone")


# -----------------------------------------------------------------------------
# What each run measured


def quarter_mean(rows, key, last):
    """The mean of key over the first (last=False) or last quarter of the steps, as edge_grpo's summary."""
    k = max(1, len(rows) // 4)
    values = [r[key] for r in (rows[-k:] if last else rows[:k]) if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def run_numbers(rows, summary, G):
    """One run's row of results.json: its held-out evaluation and its training dynamics (the RL steps'
    for the RL quantities; an SFT step samples nothing)."""
    rl = [r for r in rows if r.get("objective", "rl") == "rl"]

    def mean(key, over=rl):
        values = [r[key] for r in over if r.get(key) is not None]
        return sum(values) / len(values) if values else None
    rewritten = ("reflection", "answer", "solution", "prefix")
    actions = {a: sum(r["gec_actions"].get(a, 0) for r in rl) for a in rewritten + ("skipped",)}
    ended_right = {a: sum(r.get("gec_ended_right", {}).get(a, 0) for r in rl) for a in rewritten}
    corrected = sum(actions[a] for a in rewritten)
    greedy = summary["greedy"]
    return dict(
        heldout_avg_at_k=summary["average_weighted"], heldout_pass_at_k=summary["pass_at_k_weighted"],
        heldout_greedy=greedy["average_weighted"],
        heldout_boxed=summary["boxed"], heldout_mean_length=summary["mean_length"],
        heldout_truncation_rate=summary["truncation_rate"], heldout_greedy_boxed=greedy["boxed"],
        heldout_greedy_mean_length=greedy["mean_length"], heldout_greedy_truncation_rate=greedy["truncation_rate"],
        steps=len(rows), sft_steps=len(rows) - len(rl),
        collapsed_before_gec=mean("zero_std_before_gec"), collapsed_after_gec=mean("zero_std_after_gec"),
        adv_var=mean("adv_var"), entropy_final=quarter_mean(rl, "entropy", last=True),
        own_accuracy_first=quarter_mean(rl, "accuracy", last=False),
        own_accuracy_last=quarter_mean(rl, "accuracy", last=True),
        own_boxed_first=quarter_mean(rl, "boxed", last=False), own_boxed_last=quarter_mean(rl, "boxed", last=True),
        loss_tokens=mean("loss_tokens", rows), inserted_share=mean("inserted_share", rows),  # every step's, SFT's too
        seconds_per_step=mean("seconds", rows), gec_corrected_rows=corrected,
        gec_correct_share=sum(ended_right.values()) / corrected if corrected else None,
        gec_actions=actions, gec_ended_right=ended_right,
    )


# -----------------------------------------------------------------------------
# The report: results.json, table.md, curves.png


def fmt(value, spec=".1f", scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def mean_cell(values, spec=".1f", scale=1.0):
    """mean ± sample std over seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = mean_and_std(values)
    return fmt(mean, spec, scale) + ("" if std is None else f" ± {format(std * scale, spec)}")


def difference_cell(diff, than="GRPO"):
    """A paired difference in points: mean [95 % interval] and "≈ than" when the interval holds 0."""
    if diff is None:
        return ""
    if diff["low"] is None:
        return f"{diff['mean']:+.1f} (1 seed: no interval)"
    cell = f"{diff['mean']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}]"
    return cell + (f" ≈ {than}" if diff["low"] <= 0 <= diff["high"] else "")


def arm_rows(results, label):
    return {r["seed"]: r for r in results["runs"] if r["arm"] == label}


def by_seed(runs, label, key):
    """{seed: the arm's held-out `key` (avg_at_k, pass_at_k, greedy)}: what paired_difference pairs."""
    return {r["seed"]: r[f"heldout_{key}"] for r in runs if r["arm"] == label}


def comparisons(runs, arms):
    """Each arm's paired differences (seed by seed, the seeds both have): to GRPO in avg@k, pass@k and
    greedy, and to SFT in avg@k and greedy where SFT ran."""
    out = {}
    for label in arms:
        out[label] = {} if label == BASELINE else {
            f"{key}_vs_grpo": paired_difference(by_seed(runs, label, key), by_seed(runs, BASELINE, key))
            for key in ("avg_at_k", "pass_at_k", "greedy")}
        if SFT_BASELINE in arms and label != SFT_BASELINE and by_seed(runs, SFT_BASELINE, "avg_at_k"):
            out[label].update({f"{key}_vs_sft": paired_difference(by_seed(runs, label, key),
                                                                   by_seed(runs, SFT_BASELINE, key))
                               for key in ("avg_at_k", "greedy")})
    return {label: diffs for label, diffs in out.items() if diffs}  # GRPO: only where SFT ran


def contrasts(runs):
    """CONTRASTS' paired differences in avg@k, pass@k and greedy, for the pairs of arms that both ran."""
    return [dict(arm=arm, than=than, question=question,
                 **{key: paired_difference(by_seed(runs, arm, key), by_seed(runs, than, key))
                    for key in ("avg_at_k", "pass_at_k", "greedy")})
            for arm, than, question in CONTRASTS if by_seed(runs, arm, "avg_at_k") and by_seed(runs, than, "avg_at_k")]


def format_table(results):
    """Two tables, one row per arm. Held-out: avg@k, pass@k and greedy, mean ± std over seeds, the paired
    differences to GRPO and SFT with their 95 % intervals, what each step trained on, its cost.
    Training: the paper's dynamics (collapse, advantage variance, entropy, the policy's own accuracy)."""
    s = results["settings"]
    k = s["eval_samples"]
    base = results["base"]
    seeds = {label: len(arm_rows(results, label)) for label in s["arms"]}
    counts = sorted(set(n for n in seeds.values() if n))
    lines = [f"# EDGE-GRPO study: held-out accuracy on {', '.join(s['eval_data'])} ({base['problems']} problems)",
             "",
             f"{s['model']}, {s['max_steps']} steps per run, {'/'.join(map(str, counts))} seeds per arm; avg@{k} and "
             f"pass@{k} at T = {s['eval_temperature']}, greedy pass@1, up to {s['eval_max_new_tokens']} new tokens. "
             f"Accuracies in %, mean ± sample std over the arm's seeds; Δ: the paired difference (seed by seed, over "
             f"the seeds both arms have), mean [95 % t interval]; \"≈ GRPO\" / \"≈ SFT\": the interval holds 0, "
             f"this study cannot tell the two apart. Tokens: trained per step, of them the share GEC inserted (SFT: "
             f"the solutions, all copied).",
             "",
             f"| arm | seeds | avg@{k} | pass@{k} | greedy | Δ avg@{k} vs GRPO | Δ avg@{k} vs SFT | Δ "
             f"pass@{k} vs GRPO | Δ greedy vs GRPO | tokens / step (inserted %) | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| base model (untrained) | | {fmt(base['heldout_avg_at_k'])} | {fmt(base.get('heldout_pass_at_k'))} | "
             f"{fmt(base['heldout_greedy'])} | | | | | | |"]
    compared = results["comparisons"]
    for label in s["arms"]:
        rows = arm_rows(results, label)
        if not rows:
            continue
        col = lambda key, spec=".1f", scale=1.0: mean_cell([r[key] for r in rows.values()], spec, scale)
        diff = lambda key, than: difference_cell(compared.get(label, {}).get(key), than) if label != than else "-"
        lines.append(f"| {label} | {len(rows)} | {col('heldout_avg_at_k')} | {col('heldout_pass_at_k')} | "
                     f"{col('heldout_greedy')} | {diff('avg_at_k_vs_grpo', 'GRPO')} | "
                     f"{diff('avg_at_k_vs_sft', 'SFT')} | {diff('pass_at_k_vs_grpo', 'GRPO')} | "
                     f"{diff('greedy_vs_grpo', 'GRPO')} | {col('loss_tokens', '.0f')} "
                     f"({col('inserted_share', '.0f', 100)}) | {col('seconds_per_step')} |")
    lines += ["", "Training (the RL steps; an SFT step samples nothing):", "",
              f"| arm | boxed % (avg@{k}) | collapsed groups % before / after GEC | advantage variance | "
              f"entropy, last quarter | own accuracy %, first -> last quarter | GEC rewrites ending right % |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| base model (untrained) | {fmt(base['heldout_boxed'], '.0f', 100)} | | | | | |"]
    for label in s["arms"]:
        rows = arm_rows(results, label)
        if not rows:
            continue
        col = lambda key, spec=".1f", scale=1.0: mean_cell([r[key] for r in rows.values()], spec, scale)
        lines.append(f"| {label} | {col('heldout_boxed', '.0f', 100)} | {col('collapsed_before_gec', '.0f', 100)} / "
                     f"{col('collapsed_after_gec', '.0f', 100)} | {col('adv_var', '.2f')} | "
                     f"{col('entropy_final', '.2f')} | {col('own_accuracy_first', '.0f', 100)} -> "
                     f"{col('own_accuracy_last', '.0f', 100)} | {col('gec_correct_share', '.0f', 100)} |")
    pairs = results.get("contrasts") or []
    if pairs:
        lines += ["", "What the controls answer (paired differences, mean [95 % t interval]; ≈: the interval "
                      "holds 0):", "",
                  f"| question | arm - arm | seeds | Δ avg@{k} | Δ pass@{k} | Δ greedy |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in pairs:
            cell = lambda key: difference_cell(c[key], "").rstrip()
            lines.append(f"| {c['question']} | {c['arm']} - {c['than']} | {c['avg_at_k']['n']} | "
                         f"{cell('avg_at_k')} | {cell('pass_at_k')} | {cell('greedy')} |")
    noise = binomial_noise(results)
    lines += ["", f"One evaluation's own noise: a held-out accuracy near {noise['accuracy']:.0f} % on "
                  f"{noise['problems']} "
              f"problems has a binomial standard error of about {noise['se']:.1f} points (per problem, not per "
              f"response)."]
    if counts == [1]:
        lines.append("With one seed there is no spread and no interval: this run cannot tell arms apart.")
    total = results["seconds_all_calls"]
    lines.append(f"Study time: {results['seconds'] / 60:.1f} min this call" + (
        f", {total / 60:.1f} min of training and evaluation over all calls" if total else "")
        + f"; runs and evaluations in {s['output_dir']}.")
    return "\n".join(lines) + "\n"


def binomial_noise(results):
    accuracies = [r["heldout_avg_at_k"] for r in results["runs"]] or [results["base"]["heldout_avg_at_k"]]
    p = sum(accuracies) / len(accuracies) / 100
    n = results["base"]["problems"]
    return dict(accuracy=100 * p, problems=n, se=100 * math.sqrt(p * (1 - p) / max(n, 1)))


def plot_curves(results, histories, path, smooth=3):
    """The Fig. 5 panels over training steps: the mean over seeds with a band of +- one std, one colour
    per arm (the RL steps; the SFT arm samples nothing and has no curve)."""
    try:
        plt = analysis.require_matplotlib()
    except SystemExit as e:
        print(f"{e} (no curves.png)", file=sys.stderr)
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    drawn = 0
    for label in results["settings"]["arms"]:
        runs = [rows for (arm, _), rows in sorted(histories.items()) if arm == label]
        runs = [[r for r in rows if r.get("objective", "rl") == "rl"] for rows in runs]
        offset = min((len(rows) for rows in runs), default=0)
        if not runs or not offset:
            continue
        first = results["settings"]["max_steps"] - offset + 1  # SFT, then RL: its curve starts after the SFT steps
        colour = ARM_COLOURS[drawn % len(ARM_COLOURS)]
        drawn += 1
        for ax, (solid, dashed, title, ylabel) in zip(axes.flat, CURVES):
            for key, style in ((solid, "-"), (dashed, "--")):
                if key is None:
                    continue
                curves = [analysis.moving_average([r.get(key) for r in rows], smooth) for rows in runs]
                steps = min(len(c) for c in curves)
                mean = [sum(c[t] for c in curves) / len(curves) for t in range(steps)]
                std = [mean_and_std([c[t] for c in curves])[1] or 0.0 for t in range(steps)]
                x = list(range(first, first + steps))
                ax.plot(x, mean, style, color=colour, label=label if style == "-" and ax is axes.flat[0] else None)
                if style == "-":
                    ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                                    color=colour, alpha=0.15, linewidth=0)
            ax.set_title(title, fontsize=11)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
    s = results["settings"]
    fig.suptitle(f"EDGE-GRPO study: {s['model']}, mean over each arm's seeds (band: ± 1 std), "
                 f"moving average over {smooth} steps", fontsize=12)
    fig.legend(loc="lower center", ncol=min(4, max(drawn, 1)), frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(drawn / 4), 1, 0.96))  # the legend below the panels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# The study: check the cache, evaluate the base model, each run in turn, the report


def study_plan(arms, opts):
    """(seed, arm) pairs, seed by seed: a study stopped early still holds paired comparisons."""
    seeds = max(len(arm_seeds(label, opts)) for label in arms)
    return [(seed, label) for seed in range(seeds) for label in arms if seed in arm_seeds(label, opts)]


def base_model_loader(opts):
    """base(): the untrained model and tokenizer, loaded once for the whole study, on first use."""
    loaded = {}

    def base():
        if "model" not in loaded:
            loaded["model"] = load_model_and_tokenizer(opts.model, torch.device("cpu"), torch.float32)
        return loaded["model"]
    return base


def evaluate_base(out, opts, settings):
    """The model before training, evaluated once; its time recorded beside it."""
    t0 = time.perf_counter()
    summary, evaluated = evaluate(opts.model, out / "base" / "eval", opts, settings)
    if evaluated:
        (out / "base" / "timing.json").write_text(json.dumps(dict(seconds_eval=time.perf_counter() - t0)))
    return summary, evaluated


def study_run(directory, flags, seed, opts, extra, base, settings):
    """One arm and seed: skipped when evaluated, else trained (or resumed) and evaluated, its
    checkpoint trimmed and its time recorded. Returns its evaluation summary and what was done."""
    summary_path = directory / "eval" / "summary.json"
    if summary_path.is_file():
        return read_summary(summary_path), "skipped"
    t0 = time.perf_counter()
    checkpoint, action = train_run(directory, flags, seed, opts, extra, base, settings.max_steps)
    t1 = time.perf_counter()
    summary, _ = evaluate(checkpoint, directory / "eval", opts, settings)
    trim_checkpoint(checkpoint, opts.keep_weights)
    (directory / "timing.json").write_text(json.dumps(dict(action=action, seconds_train=t1 - t0,
                                                           seconds_eval=time.perf_counter() - t1)))
    return summary, action


def report(out, opts, extra, arms, settings, base_summary, runs, histories, started, write=True):
    """results.json, table.md and curves.png from every run's numbers (write=False: the table printed only)."""
    results = dict(
        settings=dict(model=opts.model, data=opts.data or "arithmetic", eval_data=opts.eval_data, arms=list(arms),
                      flags={label: flags for label, flags in arms.items()}, extra_flags=list(extra),
                      seeds=list(range(opts.seeds)),
                      seeds_per_arm={label: len(arm_seeds(label, opts)) for label in arms},
                      max_steps=settings.max_steps, eval_samples=opts.eval_samples,
                      eval_temperature=eval_temperature(opts, settings),
                      eval_max_new_tokens=opts.eval_max_new_tokens or settings.max_completion_length,
                      output_dir=str(out), keep_weights=opts.keep_weights),
        base=dict(heldout_avg_at_k=base_summary["average_weighted"],
                  heldout_pass_at_k=base_summary["pass_at_k_weighted"],
                  heldout_greedy=base_summary["greedy"]["average_weighted"], heldout_boxed=base_summary["boxed"],
                  problems=sum(base_summary["problems"].values())),
        runs=runs, seconds=time.perf_counter() - started)
    base_timing = out / "base" / "timing.json"  # every run's training and evaluation, whichever call did them
    parts = [r[key] for r in runs for key in ("seconds_train", "seconds_eval")]
    parts += [read_json(base_timing)["seconds_eval"]] if base_timing.is_file() else []
    results["seconds_all_calls"] = sum(v for v in parts if v is not None)
    results["comparisons"] = comparisons(runs, arms)
    results["contrasts"] = contrasts(runs)
    table = format_table(results)
    if not write:
        print(table)
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table)
    curves = plot_curves(results, histories, out / "curves.png")
    print("\n" + table)
    print(f"results: {out / 'results.json'}; table: {out / 'table.md'}" + (f"; curves: {curves}" if curves else ""))
    return results


def report_so_far(out, opts, extra, arms, settings, started):
    """--report-only: the table of the runs a study (perhaps still running) has evaluated so far, printed;
    nothing trained, evaluated or written, no lock taken, each run's settings still checked."""
    base_path = out / "base" / "eval" / "summary.json"
    if not base_path.is_file():
        fail(f"{out}: no evaluation of the base model yet, so nothing to report")
    runs, histories = [], {}
    for seed, label in study_plan(arms, opts):
        directory = out / slug(label) / f"seed-{seed}"
        if not (directory / "eval" / "summary.json").is_file():
            continue
        differences = stale_run(directory, run_args(directory, arms[label], seed, opts, extra)) \
            or stale_eval(directory / "eval", opts, settings)
        if differences:
            fail(f"{directory}: made with other settings than these ({cli.describe_differences(differences)})")
        _, rows = analysis.read_run(directory)
        histories[(label, seed)] = rows
        timing = read_json(directory / "timing.json") if (directory / "timing.json").is_file() else {}
        runs.append(dict(arm=label, seed=seed, directory=str(directory), seconds_train=timing.get("seconds_train"),
                         seconds_eval=timing.get("seconds_eval"),
                         **run_numbers(rows, read_summary(directory / "eval" / "summary.json"),
                                       settings.num_generations)))
    return report(out, opts, extra, arms, settings, read_summary(base_path), runs, histories, started, write=False)


def run_study(opts, extra):
    """Every arm x seed, seed by seed, then the report. Returns results.json's content and what was done
    (counts of trained, resumed, evaluated, skipped runs), so a caller can check that a second call
    redoes nothing."""
    started = time.perf_counter()
    out = Path(opts.output_dir)
    settings = study_settings(opts, extra)
    arms = {label: arm_flags(flags, settings.max_steps) for label, flags in chosen_arms(opts.arms).items()}
    if opts.report_only:
        return report_so_far(out, opts, extra, arms, settings, started), dict(trained=0, resumed=0,
                                                                              evaluated=0, skipped=0)
    with hold_lock(out, "replicate.py"):  # one study writes here at a time
        check_cache(out, arms, opts, extra, settings)  # every arm's flags parsed, every cached run checked
        done = dict(trained=0, resumed=0, evaluated=0, skipped=0)
        base_summary, evaluated = evaluate_base(out, opts, settings)
        done["evaluated"] += evaluated
        base = base_model_loader(opts)
        runs, histories, timings = [], {}, []
        plan = study_plan(arms, opts)
        for number, (seed, label) in enumerate(plan, 1):
            directory = out / slug(label) / f"seed-{seed}"
            t0 = time.perf_counter()
            summary, action = study_run(directory, arms[label], seed, opts, extra, base, settings)
            done[action if action in done else "trained"] += action != "trained before"
            done["evaluated"] += action != "skipped"
            _, rows = analysis.read_run(directory)
            histories[(label, seed)] = rows
            timing = read_json(directory / "timing.json") if (directory / "timing.json").is_file() else {}
            runs.append(dict(arm=label, seed=seed, directory=str(directory),
                             **run_numbers(rows, summary, settings.num_generations),
                             seconds_train=timing.get("seconds_train"), seconds_eval=timing.get("seconds_eval")))
            seconds = time.perf_counter() - t0
            if action != "skipped":
                timings.append(seconds)
            left = len(plan) - number
            eta = f", ETA {left * sum(timings) / len(timings) / 60:.0f} min" if timings and left else ""
            what = action if action == "skipped" else f"{action} and evaluated"
            print(f"[{number}/{len(plan)}] {label}, seed {seed}: {what} in {seconds:.0f} s; held-out "
                  f"avg@{opts.eval_samples} {summary['average_weighted']:.1f}%, pass@{opts.eval_samples} "
                  f"{summary['pass_at_k_weighted']:.1f}%, greedy {summary['greedy']['average_weighted']:.1f}%; "
                  f"{left} to go{eta}", flush=True)
        results = report(out, opts, extra, arms, settings, base_summary, runs, histories, started)
    return results, done


def build_parser():
    p = argparse.ArgumentParser(description="The EDGE-GRPO paper's comparison: arms x seeds, evaluated on held-out "
                                            "problems. Flags after -- go to every run of edge_grpo.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--arms", nargs="+", default=["paper"],
                   help=f"groups ({', '.join(ARM_GROUPS)}) or arms ({', '.join(slug(a) for a in EVERY_ARM)}); "
                        "GRPO always runs, as the baseline")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, the same for every arm")
    p.add_argument("--headline-seeds", type=int, default=0,
                   help=f"more seeds for the headline arms ({', '.join(HEADLINE)}); 0: --seeds")
    p.add_argument("--model", default="smollm2-135m", help="as edge_grpo.py --model (an alias brings its settings)")
    p.add_argument("--data", default=None,
                   help="training data, as edge_grpo.py --data; none: the built-in arithmetic set")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out sets, as analysis.py eval --data; none: arithmetic-test for the built-in set, else "
                        f"the paper's five ({', '.join(EVAL_SETS)})")
    p.add_argument("--max-steps", type=int, default=0,
                   help="steps per run; 0: 16 for smollm2-135m (the 45-minute budget; the demo runs 24), else the "
                        "model's settings")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES, help="k of avg@k and pass@k")
    p.add_argument("--eval-temperature", type=float, default=None,
                   help="temperature of avg@k; none: the runs' sampling temperature (greedy pass@1 is measured too)")
    p.add_argument("--eval-max-new-tokens", type=int, default=0, help="0: the runs' --max-completion-length")
    p.add_argument("--eval-limit", type=int, default=0, help="first N problems of each held-out set (0: all)")
    p.add_argument("--output-dir", default="runs/replicate")
    p.add_argument("--redo", action="store_true",
                   help="runs or evaluations in --output-dir made with other settings are deleted and done again "
                        "(without it the study refuses them)")
    p.add_argument("--report-only", action="store_true",
                   help="print the table of the runs evaluated so far (a study may still be running there); "
                        "trains, evaluates and writes nothing")
    p.add_argument("--keep-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each run's final weights once evaluated (its optimizer state is always dropped)")
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = cli.parse_known_or_fail(build_parser(), argv[:argv.index("--")] if "--" in argv else argv)
    checks = [(opts.seeds >= 1, "--seeds must be at least 1"),
              (opts.headline_seeds >= 0, "--headline-seeds must be >= 0"),
              (opts.eval_samples >= 1, "--eval-samples must be at least 1"),
              (opts.max_steps >= 0, "--max-steps must be >= 0 (0: the model's default)"),
              (opts.eval_limit >= 0, "--eval-limit must be >= 0 (0: every problem)"),
              (opts.eval_max_new_tokens >= 0, "--eval-max-new-tokens must be >= 0 (0: the runs' length)"),
              (opts.eval_temperature is None or 0 <= opts.eval_temperature < math.inf,
               "--eval-temperature must be a finite number >= 0")]
    for ok, message in checks:
        if not ok:
            fail(message)
    opts.eval_data = opts.eval_data or (["arithmetic-test"] if opts.data in (None, "arithmetic") else list(EVAL_SETS))
    return opts, extra


def main(argv=None):
    opts, extra = parse_args(argv)
    return run_study(opts, extra)


if __name__ == "__main__":
    main()
