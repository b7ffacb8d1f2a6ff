"""
analysis.py: evaluation on the paper's benchmarks and the paper's analyses. eval, entropy and reflection
write a JSON summary into --output-dir (entropy also a histogram); plot writes a PNG, view an HTML page,
gec and compare print.

  python analysis.py eval --model smollm2-135m --data math500 --limit 20   # the paper's five sets: omit --data
  python analysis.py entropy --records runs/eval/records.jsonl        # Fig. 3: entropy of correct vs wrong
  python analysis.py reflection --records runs/eval/records.jsonl     # Fig. 2: reflection and accuracy
  python analysis.py plot runs/grpo runs/edge-grpo                    # Fig. 5: advantage variance, entropy
  python analysis.py compare runs/eval-base runs/eval-trained          # the paper's results table
  python analysis.py gec --completions runs/edge-grpo/completions.jsonl  # what GEC did, by branch
  python analysis.py view runs/edge-grpo                              # its rollouts, token by token (HTML)

It computes nothing rollout.py, reward.py or edge_grpo.py already compute: sampling, entropy, GEC's
forced reflection, rewards, model loading and data loading are theirs. Records are one JSON line per
response: benchmark, problem index, problem, answer, response, correct, boxed, length, truncated,
entropy (the response's mean token entropy H_i at the sampling temperature), temperature.
"""

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from checkpoints import load_model_and_tokenizer, prompt_format_of, read_metrics, resolve_device, resolve_dtype
from cli import PROMPT_FORMATS, parse_known_or_fail, read_run_config
from data import EVAL_SETS, data_name, load_data
from errors import fail
from edge_grpo import response_entropy
from reward import MAX_REWARD, extract_boxed
from rollout import (Sampling, build_prompt, guided_error_correction, rollout_from_texts, sample_rollout,
                     token_logprobs_and_entropy)
from viewer import VIEW_STEPS, write_page

# The authors' evaluate_model.py: one sample per problem at temperature 0.1, up to 3000 new tokens.
EVAL_TEMPERATURE, EVAL_MAX_NEW_TOKENS, EVAL_SAMPLES = 0.1, 3000, 1
# The embedded 135M model rambles to any budget; on 2 CPU cores 3000 tokens per answer takes hours.
CPU_ALIAS_MAX_NEW_TOKENS = {"smollm2-135m": 512}
# Rows decoded at once by default: the KV cache of 64 rows x 3,500 tokens is 6.4 GB for Qwen2.5-Math-1.5B
# (28 KB per token in bf16) and 13 GB for the 7B; on a CPU more rows only wait longer for the longest.
EVAL_BATCH_SIZE = dict(cuda=64, cpu=8)
RECORD_FIELDS = ("benchmark", "index", "problem", "answer", "response", "correct", "entropy")
COMPLETION_FIELDS = ("step", "gec_action", "sampled_reward", "reward", "advantage_eda")  # what `gec` reads of a row
# Words that mark self-reflection in a response (Fig. 2). The paper does not list its keywords; these
# are the cue words common in the reflection literature, matched case-insensitively as substrings.
REFLECTION_WORDS = ("wait", "re-check", "recheck", "re-examine", "reconsider", "re-evaluate", "double-check",
                    "let me check", "let's check", "verify", "mistake", "rethink", "on second thought")


# -----------------------------------------------------------------------------
# eval


def eval_records(model, tokenizer, prompt_format, problems, benchmark, *, temperature, max_new_tokens, samples,
                 batch_size, seed):
    """Generate `samples` responses per problem, batch_size problems per generate call, and score them.
    Returns one record per response."""
    records = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [build_prompt(tokenizer, row["problem"], prompt_format) for row in batch]
        answers = [row["answer"] for row in batch]
        rollout = sample_rollout(model, tokenizer, prompts, answers, group_size=samples, max_new_tokens=max_new_tokens,
                                 sampling=Sampling(temperature), seed=seed + start)
        with torch.no_grad():
            _, entropy = token_logprobs_and_entropy(model, rollout.input_ids.to(model.device),
                                                    rollout.attention_mask.to(model.device),
                                                    rollout.completion_mask.to(model.device), temperature=temperature)
        mask = rollout.completion_mask
        H = response_entropy(entropy.cpu(), mask, authors_eda=False)  # (B,) H_i, as the trainer computes it
        for row, text in enumerate(rollout.texts):
            problem = batch[row // samples]
            records.append(dict(benchmark=benchmark, index=start + row // samples, problem=problem["problem"],
                                answer=problem["answer"], response=text,
                                correct=bool(rollout.rewards[row] == MAX_REWARD), boxed=extract_boxed(text) is not None,
                                length=int(mask[row].sum()), truncated=bool(rollout.truncated[row]),
                                entropy=float(H[row]), temperature=temperature))
    return records


def accuracy_table(records):
    """{benchmark: (pass@1 %, problems)}, plus the paper's weighted average and the unweighted mean.
    With several samples per problem, pass@1 is the mean over all responses (avg@k) and the weight of
    a benchmark is its number of problems, not of responses."""
    by_benchmark, problems = defaultdict(list), defaultdict(set)
    for r in records:
        by_benchmark[r["benchmark"]].append(r["correct"])
        problems[r["benchmark"]].add(r["index"])
    table = {name: (100 * sum(c) / len(c), len(problems[name])) for name, c in by_benchmark.items()}
    total = sum(n for _, n in table.values())
    weighted = sum(acc * n for acc, n in table.values()) / total if total else float("nan")
    unweighted = sum(acc for acc, _ in table.values()) / len(table) if table else float("nan")
    return table, weighted, unweighted


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021, Codex):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a correct one.
    With k = n: 1 if any sample is correct. Measures what the policy can reach, where avg@k measures
    how often it gets there."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_table(records, k):
    """{benchmark: pass@k %} over problems, and the average weighted by problem count."""
    correct = defaultdict(list)
    for r in records:
        correct[(r["benchmark"], r["index"])].append(bool(r["correct"]))
    by_benchmark = defaultdict(list)
    for (benchmark, _), c in correct.items():
        by_benchmark[benchmark].append(pass_at_k(len(c), sum(c), min(k, len(c))))
    table = {name: 100 * sum(v) / len(v) for name, v in by_benchmark.items()}
    total = sum(len(v) for v in by_benchmark.values())
    weighted = sum(100 * sum(v) for v in by_benchmark.values()) / total if total else float("nan")
    return table, weighted


def format_table(rows):
    """rows: [(label, {benchmark: (acc, n)}, weighted)] -> text, one column per benchmark then Avg.
    Labels and benchmark names are never cut: they say which model and which set."""
    names = sorted({name for _, table, _ in rows for name in table})
    first = max([len("model")] + [len(label) for label, _, _ in rows]) + 2
    widths = [max(len(n), 8) + 2 for n in names]
    header = f"{'model':<{first}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)) + f"{'Avg':>9}"
    lines = [header, "-" * len(header)]
    for label, table, weighted in rows:
        cells = "".join(f"{table[n][0]:>{w}.2f}" if n in table else f"{'-':>{w}}" for n, w in zip(names, widths))
        lines.append(f"{label:<{first}}{cells}{weighted:>9.2f}")
    counts = "".join(f"{'n=' + str(rows[0][1][n][1]) if n in rows[0][1] else '':>{w}}" for n, w in zip(names, widths))
    lines.append(f"{'':<{first}}{counts}   Avg weighted by problem count")
    return "\n".join(lines)


def response_stats(records):
    """Share with a boxed answer, mean length in tokens, share cut off at the length cap."""
    n = max(len(records), 1)
    return dict(boxed=sum(r["boxed"] for r in records) / n, mean_length=sum(r["length"] for r in records) / n,
                truncation_rate=sum(r["truncated"] for r in records) / n)


def default_max_new_tokens(model):
    """The authors' 3000 new tokens, or a CPU alias's budget: for the alias, and for a checkpoint of a
    run that trained it (its run_config.json names the model the run started from)."""
    run_config = Path(model) / "run_config.json"
    trained_from = json.loads(run_config.read_text()).get("model") if run_config.is_file() else model
    return CPU_ALIAS_MAX_NEW_TOKENS.get(trained_from, EVAL_MAX_NEW_TOKENS)


def load_eval_model(args):
    """The model, tokenizer, prompt format (prompt_format_of: a checkpoint's own) and batch size."""
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, resolve_dtype(args.dtype, device))
    model.eval()
    batch_size = args.batch_size or EVAL_BATCH_SIZE.get(device.type, EVAL_BATCH_SIZE["cpu"])
    return model, tokenizer, prompt_format_of(args.model, args.prompt_format), batch_size


def run_eval(args):
    files = [load_data(spec) for spec in args.data]  # bad data fails before the model loads
    model, tokenizer, prompt_format, batch_size = load_eval_model(args)
    max_new_tokens = args.max_new_tokens or default_max_new_tokens(args.model)
    records, greedy = [], []
    for spec, problems in zip(args.data, files):
        problems = problems[:args.limit] if args.limit else problems
        print(f"{data_name(spec)}: {len(problems)} problems x {args.samples} samples, T={args.temperature}"
              f"{' and greedy' if args.greedy else ''}, up to {max_new_tokens} new tokens, {batch_size} problems per "
              f"batch, prompt format {prompt_format}", file=sys.stderr)
        records += eval_records(model, tokenizer, prompt_format, problems, data_name(spec),
                                temperature=args.temperature, max_new_tokens=max_new_tokens, samples=args.samples,
                                batch_size=batch_size, seed=args.seed)
        # one response per problem at temperature 0, as many rows per call as the sampled pass, 64 at least
        if args.greedy:
            greedy += eval_records(model, tokenizer, prompt_format, problems, data_name(spec), temperature=0.0,
                                   max_new_tokens=max_new_tokens, samples=1,
                                   batch_size=max(batch_size * args.samples, 64), seed=args.seed)
    out = Path(args.output_dir)
    write_records(out / "records.jsonl", records)
    table, weighted, unweighted = accuracy_table(records)
    reach, reach_weighted = pass_at_k_table(records, args.samples)
    summary = dict(model=args.model, prompt_format=prompt_format, temperature=args.temperature,
                   max_new_tokens=max_new_tokens, samples=args.samples, seed=args.seed,
                   limit=args.limit, pass_at_1={k: v[0] for k, v in table.items()},
                   problems={k: v[1] for k, v in table.items()}, average_weighted=weighted,
                   # k = samples: any of the k right
                   average_unweighted=unweighted, pass_at_k=reach, pass_at_k_weighted=reach_weighted,
                   **response_stats(records))
    rows = [(f"{args.model} avg@{args.samples}" if args.samples > 1 else args.model, table, weighted)]
    if args.greedy:
        write_records(out / "greedy_records.jsonl", greedy)
        greedy_table, greedy_weighted, greedy_unweighted = accuracy_table(greedy)
        summary["greedy"] = dict(pass_at_1={k: v[0] for k, v in greedy_table.items()}, average_weighted=greedy_weighted,
                                 average_unweighted=greedy_unweighted, **response_stats(greedy))
        rows.append((f"{args.model} greedy", greedy_table, greedy_weighted))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(rows))
    if args.samples > 1:
        print(f"pass@{args.samples} (any of the {args.samples} right): {reach_weighted:.2f}")
    print(f"responses: {out / 'records.jsonl'}; summary: {out / 'summary.json'}")
    return summary


def write_records(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_records(path):
    path = Path(path)
    if not path.is_file():
        fail(f"--records {path}: no such file (write one with: python analysis.py eval ...)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer past 4300 digits; nesting
                fail(f"{path}:{number}: not valid JSON: {getattr(e, 'msg', type(e).__name__)}")
            missing = [field for field in RECORD_FIELDS if not isinstance(record, dict) or field not in record]
            if missing:
                fail(f"{path}:{number}: a record needs {', '.join(missing)} (records come from: python "
                     f"analysis.py eval ...)")
            records.append(record)
    if not records:
        fail(f"{path}: no records")
    return records


# -----------------------------------------------------------------------------
# entropy (Fig. 3)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def entropy_stats(records):
    """Fig. 3 for one temperature. H = mean H_i over all responses.
    relative_confidence = mean H_i of wrong / mean H_i of correct: above 1, correct responses are the
    more confident ones. rho_c = share of correct responses with H_i > H (confident-correct is the
    rule when this is small); rho_w = share of wrong responses with H_i < H. The *_group versions
    compare each H_i with its own question's mean, the mean EDA uses."""
    H = _mean(r["entropy"] for r in records)
    correct = [r for r in records if r["correct"]]
    wrong = [r for r in records if not r["correct"]]
    h_c, h_w = _mean(r["entropy"] for r in correct), _mean(r["entropy"] for r in wrong)
    group_mean = defaultdict(list)
    for r in records:
        group_mean[(r["benchmark"], r["index"])].append(r["entropy"])
    own = {key: sum(v) / len(v) for key, v in group_mean.items()}
    mixed = [r for r in records if len(group_mean[(r["benchmark"], r["index"])]) > 1]
    return dict(
        responses=len(records), correct=len(correct), mean_entropy=H, mean_entropy_correct=h_c, mean_entropy_wrong=h_w,
        relative_confidence=h_w / h_c if h_c and h_w is not None else None,
        rho_c=_mean(r["entropy"] > H for r in correct), rho_w=_mean(r["entropy"] < H for r in wrong),
        rho_c_group=_mean(r["entropy"] > own[(r["benchmark"], r["index"])] for r in mixed if r["correct"]),
        rho_w_group=_mean(r["entropy"] < own[(r["benchmark"], r["index"])] for r in mixed if not r["correct"]),
    )


def run_entropy(args):
    if args.records:
        records = read_records(args.records)
    else:
        if not (args.model and args.data):
            fail("entropy needs --records FILE, or --model and --data to sample fresh responses")
        problems = load_data(args.data)[:args.limit or None]
        model, tokenizer, prompt_format, batch_size = load_eval_model(args)
        max_new_tokens = args.max_new_tokens or default_max_new_tokens(args.model)
        records = []
        for t in args.temperatures:
            records += eval_records(model, tokenizer, prompt_format, problems, data_name(args.data), temperature=t,
                                    max_new_tokens=max_new_tokens, samples=args.samples, batch_size=batch_size,
                                    seed=args.seed)
        write_records(Path(args.output_dir) / "entropy_records.jsonl", records)
    by_temperature = defaultdict(list)
    for r in records:
        by_temperature[r.get("temperature")].append(r)
    result = {str(t): entropy_stats(rs) for t, rs in sorted(by_temperature.items(), key=lambda kv: kv[0] or 0)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "entropy.json").write_text(json.dumps(result, indent=2))
    print(f"{'T':>5}{'n':>6}{'correct':>9}{'H correct':>11}{'H wrong':>10}{'rel.conf':>10}{'rho_c':>8}{'rho_w':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    for t, s in result.items():
        print(f"{t:>5}{s['responses']:>6}{s['correct']:>9}{fmt(s['mean_entropy_correct'], '.3f'):>11}"
              f"{fmt(s['mean_entropy_wrong'], '.3f'):>10}{fmt(s['relative_confidence'], '.2f'):>10}"
              f"{fmt(s['rho_c'], '.2f'):>8}{fmt(s['rho_w'], '.2f'):>8}")
    plot_entropy_histogram(records, out / "entropy_hist.png")
    return result


# -----------------------------------------------------------------------------
# reflection (Fig. 2)


def reflects(text):
    lowered = text.lower()
    return any(word in lowered for word in REFLECTION_WORDS)


def reflection_stats(records):
    """Share of responses that reflect, their accuracy, and the overall accuracy."""
    reflecting = [r for r in records if reflects(r["response"])]
    return dict(responses=len(records), reflecting=len(reflecting), reflection_share=len(reflecting) / len(records),
                accuracy=_mean(r["correct"] for r in records),
                accuracy_reflecting=_mean(r["correct"] for r in reflecting),
                accuracy_not_reflecting=_mean(r["correct"] for r in records if not reflects(r["response"])))


def forced_reflection(model, tokenizer, prompt_format, records, *, max_new_tokens, temperature, seed):
    """Append the reflection cue to every wrong response and continue it (rollout.py's GEC in its
    forced-reflection mode). Returns how many wrong responses there were and how many became correct."""
    wrong = [r for r in records if not r["correct"]]
    if not wrong:
        return dict(wrong=0, corrected=0, corrected_share=None)
    prompts = [build_prompt(tokenizer, r["problem"], prompt_format) for r in wrong]
    answers = [r["answer"] for r in wrong]
    before = rollout_from_texts(tokenizer, model, prompts, [r["response"] for r in wrong], answers, group_size=1,
                                truncated=[r["truncated"] for r in wrong])
    after = guided_error_correction(model, tokenizer, before, answers, [None] * len(wrong), seed=seed,
                                    forced_reflection=True, reflection_tokens=max_new_tokens,
                                    sampling=Sampling(temperature))
    corrected = int((after.rewards == MAX_REWARD).sum())
    return dict(wrong=len(wrong), corrected=corrected, corrected_share=corrected / len(wrong))


def run_reflection(args):
    records = read_records(args.records)
    result = dict(reflection_words=list(REFLECTION_WORDS), **reflection_stats(records))
    if args.model:
        model, tokenizer, prompt_format, _ = load_eval_model(args)
        temperature = records[0].get("temperature", EVAL_TEMPERATURE)
        result["forced_reflection"] = forced_reflection(model, tokenizer, prompt_format, records[:args.limit or None],
                                                        max_new_tokens=args.max_new_tokens or 256,
                                                        temperature=temperature, seed=args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reflection.json").write_text(json.dumps(result, indent=2))
    fmt = lambda v: f"{100 * v:.1f}%" if v is not None else "-"
    print(f"responses {result['responses']}: reflecting {fmt(result['reflection_share'])}; accuracy overall "
          f"{fmt(result['accuracy'])}, reflecting {fmt(result['accuracy_reflecting'])}, "
          f"not reflecting {fmt(result['accuracy_not_reflecting'])}")
    if "forced_reflection" in result:
        f = result["forced_reflection"]
        print(f"forced reflection: {f['corrected']} of {f['wrong']} wrong responses became correct "
              f"({fmt(f['corrected_share'])})")
    return result


# -----------------------------------------------------------------------------
# plot (Fig. 5) and compare


# (key drawn solid, key drawn dashed or None, panel title, y-axis label)
PLOTTED = (("adv_var", None, "advantage variance (after EDA)", "mean within-group variance"),
           ("entropy", None, "mean response entropy H", "nats per token"),
           ("accuracy", None, "policy accuracy (its own answers, before GEC)", "share correct"),
           ("zero_std_after_gec", "zero_std_before_gec", "collapsed groups: after GEC (solid), before (dashed)",
            "share of groups"))


def read_run(directory):
    directory = Path(directory)
    metrics_path = directory / "metrics.jsonl"
    if not metrics_path.is_file():
        fail(f"{directory}: no metrics.jsonl (a training --output-dir is expected)")
    rows = read_metrics(metrics_path)  # a last line cut off mid-write is dropped
    config_path = directory / "config.json"
    label = read_run_config(config_path).get("arm", directory.name) if config_path.is_file() else directory.name
    return label, rows


def moving_average(values, window):
    out = []
    for k in range(len(values)):
        chunk = [v for v in values[max(0, k - window + 1):k + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        fail("plots need matplotlib, an optional dependency: pip install matplotlib")


def run_plot(args):
    runs = [read_run(d) for d in args.runs]
    logged = {key for _, rows in runs for r in rows for key in r}
    unknown = [key for key in args.metrics if key not in logged]
    if unknown:
        fail(f"--metrics {' '.join(unknown)}: not in these runs' metrics.jsonl; they log: {', '.join(sorted(logged))}")
    panels = PLOTTED + tuple((key, None, key, key) for key in args.metrics)  # a variant's own metric, one panel each
    plt = require_matplotlib()
    rows_of_panels = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows_of_panels, 2, figsize=(11, 3.5 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    summary = {}
    for (label, rows), directory in zip(runs, args.runs):
        steps = [r["step"] for r in rows]
        name = f"{label} ({Path(directory).name})"
        keys = [k for solid, dashed, _, _ in panels for k in (solid, dashed) if k]
        summary[name] = {key: _mean(r[key] for r in rows if r.get(key) is not None) for key in keys}
        for ax, (solid, dashed, title, ylabel) in zip(axes.flat, panels):
            line, = ax.plot(steps, moving_average([r.get(solid) for r in rows], args.smooth),
                            label=name if ax is axes.flat[0] else None)
            if dashed:
                ax.plot(steps, moving_average([r.get(dashed) for r in rows], args.smooth), "--", color=line.get_color())
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
    fig.suptitle(f"training dynamics (moving average over {args.smooth} steps)")
    fig.legend(loc="lower center", ncol=min(3, len(runs)), frameon=False)  # below the panels, over no curve
    fig.tight_layout(rect=(0, 0.02 + 0.03 * math.ceil(len(runs) / 3), 1, 1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    for name, means in summary.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items() if v is not None))
    print(f"figure: {out}")
    return summary


def plot_entropy_histogram(records, path):
    try:
        plt = require_matplotlib()
    except SystemExit as e:
        print(f"{e} (skipping the histogram)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    everything = [r["entropy"] for r in records]
    low, high = min(everything), max(everything)
    bins = [low + (high - low) * k / 30 for k in range(31)] if high > low else 30  # one set of bins for both classes
    for label, correct in (("correct", True), ("wrong", False)):
        values = [r["entropy"] for r in records if r["correct"] == correct]
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
    ax.set_xlabel("mean token entropy H_i")
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gec_stats(lines):
    """completions.jsonl's rows by GEC action: how many, the share that ends with the right answer
    (the maximum reward) before and after GEC, and the mean advantage after EDA."""
    by_action = defaultdict(list)
    for line in lines:
        by_action[line["gec_action"]].append(line)
    rewritten = [line for line in lines if line["gec_action"] not in ("none", "skipped")]
    stats = {action: dict(rows=len(rows), correct_before=_mean(r["sampled_reward"] == MAX_REWARD for r in rows),
                          correct_after=_mean(r["reward"] == MAX_REWARD for r in rows),
                          mean_advantage_eda=_mean(r["advantage_eda"] for r in rows)) for action,
                          rows in sorted(by_action.items())}
    return dict(rows=len(lines), rewritten=len(rewritten),
                rewritten_correct_after=_mean(r["reward"] == MAX_REWARD for r in rewritten), actions=stats)


def run_gec(args):
    path = Path(args.completions)
    if not path.is_file():
        fail(f"--completions {path}: no such file (a training run writes OUTPUT_DIR/completions.jsonl every "
             f"--log-completions-steps)")
    lines = read_metrics(path, fields=COMPLETION_FIELDS)  # the same JSON lines, a cut-off last one dropped
    result = gec_stats(lines)
    fmt = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    print(f"{result['rows']} rows, {result['rewritten']} rewritten by GEC; of those, "
          f"{fmt(result['rewritten_correct_after'])} end with the right answer")
    for action, s in result["actions"].items():
        print(f"  {action:>10}: {s['rows']:>5} rows, correct before {fmt(s['correct_before'])}, after "
              f"{fmt(s['correct_after'])}, mean advantage after EDA {s['mean_advantage_eda']:+.3f}")
    return result


def run_view(args):
    """The rollout viewer (viewer.py): RUN_DIR/rollouts.html."""
    if not Path(args.run).is_dir():
        fail(f"{args.run}: not a run directory (a training run's --output-dir, holding completions.jsonl)")
    everything = args.steps == ["all"]
    try:
        steps = None if everything or not args.steps else [int(s) for s in args.steps]
    except ValueError:
        fail(f"--steps {' '.join(args.steps)}: logged step numbers (e.g. --steps 5 50 100), or all")
    path, shown = write_page(args.run, steps, most=10**9 if everything else args.most, output=args.output)
    print(f"{path}: {len(shown)} steps ({', '.join(map(str, shown))}), {path.stat().st_size / 1e3:,.0f} KB; "
          f"open it in a browser")
    return dict(path=str(path), steps=shown)


def run_compare(args):
    rows = []
    for directory in args.evals:
        path = Path(directory) / "summary.json"
        if not path.is_file():
            fail(f"{directory}: no summary.json (write one with: python analysis.py eval --output-dir {directory})")
        s = json.loads(path.read_text())
        table = {k: (v, s["problems"][k]) for k, v in s["pass_at_1"].items()}
        rows.append((f"{s['model']} ({Path(directory).name})", table, s["average_weighted"]))
    print(format_table(rows))


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluation and the EDGE-GRPO paper's analyses.", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p, required):
        p.add_argument("--model", required=required, help="alias, hub id, local path or training checkpoint dir")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help=f"default {EVAL_MAX_NEW_TOKENS} (authors); smollm2-135m and its checkpoints: 512")
        p.add_argument("--samples", type=int, default=EVAL_SAMPLES, help="responses per problem")
        p.add_argument("--batch-size", type=int, default=0,
                       help=f"problems per generate call; 0: by device "
                            f"({', '.join(f'{k} {v}' for k, v in EVAL_BATCH_SIZE.items())})")
        p.add_argument("--prompt-format", choices=("auto",) + PROMPT_FORMATS, default="auto",
                       help="auto: a training checkpoint's own, else the authors' choice for the model's family")
        p.add_argument("--limit", type=int, default=0, help="first N problems per file (0: all)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")

    p = sub.add_parser("eval", help="pass@1 on problem files, the paper's table", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=list(EVAL_SETS),
                   help="problem files (JSONL/JSON) or names fetched once; default: the paper's five benchmarks")
    p.add_argument("--temperature", type=float, default=EVAL_TEMPERATURE, help="sampling temperature (authors: 0.1)")
    p.add_argument("--greedy", action="store_true",
                   help="also greedy pass@1: one response per problem at temperature 0 (summary.json's greedy)")
    p.add_argument("--output-dir", default="runs/eval")
    model_flags(p, required=True)

    p = sub.add_parser("entropy", help="Fig. 3: entropy of correct vs wrong responses", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--records", help="records.jsonl from eval (else --model and --data sample fresh)")
    p.add_argument("--data", help="one problem file or dataset name, for fresh responses")
    p.add_argument("--temperatures", type=float, nargs="+", default=[EVAL_TEMPERATURE], help="for fresh responses")
    p.add_argument("--output-dir", default="runs/analysis")
    model_flags(p, required=False)

    p = sub.add_parser("reflection", help="Fig. 2: reflection vs accuracy; forced reflection with --model",
                       allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--records", required=True, help="records.jsonl from eval")
    p.add_argument("--output-dir", default="runs/analysis")
    model_flags(p, required=False)

    p = sub.add_parser("plot", help="Fig. 5: training curves of one or more runs", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="training output dirs (with metrics.jsonl)")
    p.add_argument("--output", default="runs/dynamics.png", help="PNG path")
    p.add_argument("--smooth", type=int, default=3, help="moving-average window in steps (1: raw)")
    p.add_argument("--metrics", nargs="+", default=[],
                   help="more panels, one per metrics.jsonl key (e.g. semantic_entropy prompts_drawn updated_fraction)")

    p = sub.add_parser("gec", help="what GEC did: rows per action and the share that ends right (completions.jsonl)",
                       allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--completions", required=True, help="a training run's completions.jsonl")

    p = sub.add_parser("view", help="a run's rollouts token by token in one HTML page: GEC's rewrites, entropy, EDA",
                       allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a training run's output dir (with completions.jsonl); writes RUN/rollouts.html")
    p.add_argument("--steps", nargs="+", help="logged steps to show (e.g. 5 50 100), or all; default: --most of them, "
                   "evenly spaced, first and last included")
    p.add_argument("--most", type=int, default=VIEW_STEPS, help="steps the page holds when --steps is not given")
    p.add_argument("--output", help="the page's path (default RUN/rollouts.html)")

    p = sub.add_parser("compare", help="the paper's table for several eval dirs", allow_abbrev=False,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("evals", nargs="+", help="eval output dirs (with summary.json)")
    return parser


def check_numbers(args):
    """Counts and temperatures checked before any model loads: an evaluation of 0 samples or 0 tokens
    would be written as if finished."""
    get = lambda name, default=None: getattr(args, name, default)
    temperatures = ([get("temperature")] if get("temperature") is not None else []) + list(get("temperatures") or [])
    checks = [(get("samples", 1) >= 1, "--samples must be at least 1"),
              (get("limit", 0) >= 0, "--limit must be >= 0 (0: every problem)"),
              (get("batch_size", 0) >= 0, "--batch-size must be >= 0 (0: by device)"),
              (get("max_new_tokens") is None or get("max_new_tokens") >= 1, "--max-new-tokens must be at least 1"),
              (get("seed", 0) >= 0, "--seed must be >= 0"),
              (get("smooth", 1) >= 1, "--smooth must be at least 1 (1: raw)"),
              (get("most", 1) >= 1, "--most must be at least 1"),
              (all(math.isfinite(t) and t >= 0 for t in temperatures), "--temperature(s) must be finite and >= 0")]
    for ok, message in checks:
        if not ok:
            fail(message)


def main(argv=None):
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    args = parse_known_or_fail(parser, argv, options_of=lambda args: subcommands[args.command])
    check_numbers(args)
    return dict(eval=run_eval, entropy=run_entropy, reflection=run_reflection, plot=run_plot, gec=run_gec,
                view=run_view, compare=run_compare)[args.command](args)


if __name__ == "__main__":
    main()
