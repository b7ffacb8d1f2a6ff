"""
viewer.py: a run's rollouts as one HTML page, token by token (python analysis.py view RUN_DIR).

What GEC and EDA did to each response is visible only per token: which rows GEC rewrote and with
what text, where the policy took over again, which tokens it was unsure of (entropy H_t), and how
EDA rescaled A_i by the row's mean entropy H_i. The page reads completions.jsonl (written every
--log-completions-steps) and holds, per logged step, each group's prompt once and each response as
its tokens: the background shaded by H_t, GEC's inserted text boxed and labelled, each row's action,
reward before -> after GEC, A_i before -> after EDA and H_i; a collapsed group is marked.

The page is one self-contained file: no server, no network, no external script or font. Model
output is untrusted text: every piece is HTML-escaped, and each token isolates its bidirectional
text, so a `<script>` or a right-to-left override in a completion shows as text and moves nothing.
A short script only navigates (steps, one group, rewritten rows); without it every step shows.
"""

import html
import math
from pathlib import Path

from checkpoints import read_metrics
from cli import read_run_config
from errors import fail
from rollout import TOKEN_SOURCES

VIEW_STEPS = 10  # logged steps a page holds by default, evenly spaced, first and last included (~30 bytes a token)
ENTROPY_MAX = 4.0  # nats: the top of the shading's scale (H_t above it: the darkest shade); 8 shades of 0.5
SHADES = ["#ffffff", "#fff4e0", "#ffe7bf", "#ffd699", "#ffc170", "#ffa94d", "#ff8f33", "#f5731b"]  # white -> orange
ENTROPY_SHADES = len(SHADES)
VIEW_FIELDS = ("step", "prompt", "problem", "answer", "sampled", "gec_action", "sampled_reward", "reward")


def choose_steps(logged, wanted=None, most=VIEW_STEPS):
    """The steps the page shows: `wanted` (those of them that were logged), or at most `most` of the
    logged steps, evenly spaced, the first and the last included."""
    if wanted:
        return [s for s in logged if s in set(wanted)]
    if len(logged) <= most:
        return list(logged)
    picks = {logged[round(k * (len(logged) - 1) / (most - 1))] for k in range(most)}
    return sorted(picks)


def shade(h):
    """H_t (nats) -> its shade's index, 0 (certain) .. ENTROPY_SHADES - 1 (ENTROPY_MAX and above)."""
    return min(int(max(h, 0.0) / ENTROPY_MAX * ENTROPY_SHADES), ENTROPY_SHADES - 1)


def runs_of(line):
    """A row's tokens cut into runs of one source and one trained flag: [(source, trained, tokens)],
    each token (text, H_t). A row logged before tokens were (no `tokens` field): its text as one run."""
    if "tokens" not in line:
        text = line["rewritten"] if line.get("rewritten") is not None else line["sampled"]
        return [("sampled", 1, [(text, None)])]
    runs = []
    for text, h, source, trained in zip(line["tokens"], line["token_entropy"], line["token_source"],
                                        line["token_trained"]):
        key = (TOKEN_SOURCES[source], trained)
        if not runs or runs[-1][:2] != key:
            runs.append((*key, []))
        runs[-1][2].append((text, h))
    return runs


def response_html(line):
    """A response as its token spans: <t e=shade h=H_t>, inside one <span> per run; a run of text GEC
    inserted carries class `ins` and its source (cue, answer, solution, prefix); an untrained run
    (the prefix, or inserted text under --inserted-tokens mask) data-trained=0."""
    parts = []
    for source, trained, tokens in runs_of(line):
        marker = (f' class="ins" data-src="{source}" title="inserted by GEC: {source}'
                  f'{"" if trained else ", not trained"}"') if source != "sampled" else ' data-src="sampled"'
        body = "".join(f"<t>{html.escape(text)}</t>" if h is None else f"<t e={shade(h)} "
                                                                       f"h={h:.2f}>{html.escape(text)}</t>"
                       for text, h in tokens)
        parts.append(f'<span{marker} data-trained="{trained}">{body}</span>')
    return "".join(parts)


def number(value, fmt="+.2f"):
    return "-" if value is None else format(value, fmt)


def row_html(line, index):
    """One response: its numbers, then its tokens; a rewritten row also keeps what the policy first wrote."""
    action = line["gec_action"]
    rewritten = action not in ("none", "skipped")
    facts = [f'<b class="act act-{html.escape(action)}">{html.escape(action)}</b>',
             f'reward {line["sampled_reward"]:g} &rarr; {line["reward"]:g}',
             f'A<sub>i</sub> {number(line.get("advantage"))} &rarr; {number(line.get("advantage_eda"))} (EDA)',
             f'H<sub>i</sub> {number(line.get("entropy"), ".3f")}']
    before = (f'<details><summary>the policy\'s response before GEC</summary><div class="resp">'
              f'{html.escape(line["sampled"])}</div></details>') if rewritten else ""
    return (f'<div class="row" data-row="{index}" data-rewritten="{int(rewritten)}"><div class="facts">'
            f'{" &middot; ".join(facts)}</div><div class="resp" dir="ltr">{response_html(line)}</div>{before}</div>')


def group_html(lines, prompt):
    """A group: its prompt and answer once, its G responses; marked when its rewards are all equal
    (advantage collapse) before GEC, and whether GEC mixed it again."""
    before = {line["sampled_reward"] for line in lines}
    after = {line["reward"] for line in lines}
    collapsed = ("" if len(before) > 1 else
                 ' <b class="collapsed">collapsed before GEC</b>' + (" &rarr; mixed after" if len(after) > 1 else
                                                                    " &rarr; still collapsed: no gradient"))
    rows = "".join(row_html(line, k) for k, line in enumerate(lines))
    return (f'<div class="group" data-group="{prompt}" data-collapsed="{int(len(after) == 1)}"><div class="prompt">'
            f'<b>prompt {prompt}</b>{collapsed}<div class="problem">{html.escape(str(lines[0]["problem"]))}</div>'
            f'answer: <code>{html.escape(str(lines[0]["answer"]))}</code></div>{rows}</div>')


def step_html(step, lines):
    groups = {}
    for line in lines:
        groups.setdefault(line["prompt"], []).append(line)
    rewritten = sum(line["gec_action"] not in ("none", "skipped") for line in lines)
    collapsed = sum(len({line["sampled_reward"] for line in g}) == 1 for g in groups.values())
    return (f'<section class="step" id="step-{step}" data-step="{step}"><h2>Step {step}</h2><p class="sum">'
            f'{len(lines)} responses in {len(groups)} groups; GEC rewrote {rewritten}; {collapsed} groups collapsed '
            f'before GEC</p>{"".join(group_html(g, p) for p, g in sorted(groups.items()))}</section>')


STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:6px 12px;z-index:1}
header select,header button,header label{margin-right:8px;font:inherit}
main{max-width:1200px;margin:0 auto;padding:8px 12px}
.legend span{display:inline-block;padding:0 6px;border:1px solid #ddd}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px}
.prompt{border-bottom:1px solid #eee;padding-bottom:6px;margin-bottom:6px}
.problem{white-space:pre-wrap;overflow-wrap:anywhere}
.collapsed{color:#a00}
.row{border-top:1px dashed #ddd;padding:6px 0}
.facts{font-size:13px;color:#555}
.act{padding:0 5px;border-radius:3px;background:#eee;color:#222}
.act-reflection,.act-answer,.act-solution,.act-prefix{background:#d9e8ff}
.resp{font:14px/1.6 ui-monospace,monospace;white-space:pre-wrap;overflow-wrap:anywhere;word-break:break-word;
      max-height:24em;overflow:auto;unicode-bidi:isolate}
.resp t{unicode-bidi:isolate}
.ins{outline:2px solid #2a62d6;outline-offset:1px;border-radius:2px}
.ins::before{content:attr(data-src);font:10px system-ui;background:#2a62d6;color:#fff;padding:0 3px;margin-right:2px}
.ins[data-trained="0"]{outline-style:dashed}
details{font-size:13px;color:#555}
#status{font:13px ui-monospace,monospace;color:#555}
""" + "".join(f"t[e=\"{k}\"]{{background:{c}}}" for k, c in enumerate(SHADES))

SCRIPT = """
const steps = [...document.querySelectorAll("section.step")];
const pick = document.getElementById("step"), only = document.getElementById("rewritten"),
      group = document.getElementById("group"), status = document.getElementById("status");
function show(step) {
  const wanted = steps.find(s => s.dataset.step === String(step)) || steps[0];
  if (!wanted) return;
  for (const s of steps) s.hidden = s !== wanted;
  pick.value = wanted.dataset.step;
  history.replaceState(null, "", "#step-" + wanted.dataset.step);
  filter();
}
function filter() {
  for (const g of document.querySelectorAll(".group")) {
    g.hidden = group.value !== "all" && g.dataset.group !== group.value;
    for (const r of g.querySelectorAll(".row")) r.hidden = only.checked && r.dataset.rewritten !== "1";
  }
}
function move(by) { show(steps[Math.max(0, Math.min(steps.length - 1, pick.selectedIndex + by))].dataset.step); }
pick.addEventListener("change", () => show(pick.value));
only.addEventListener("change", filter);
group.addEventListener("change", filter);
document.getElementById("prev").addEventListener("click", () => move(-1));
document.getElementById("next").addEventListener("click", () => move(1));
document.addEventListener("keydown", e => {
  if (e.key === "ArrowLeft") move(-1);
  if (e.key === "ArrowRight") move(1);
});
document.addEventListener("mouseover", e => {
  const t = e.target.closest("t[h]");
  if (t) status.textContent = "H_t = " + t.getAttribute("h") + " nats";
});
show((location.hash.match(/^#step-(\\d+)$/) || [])[1]);
document.documentElement.dataset.ready = "1";
"""


def page_html(title, lines_by_step):
    """The whole page: a header (step picker, filters, the entropy legend), one section per step."""
    steps = sorted(lines_by_step)
    groups = sorted({line["prompt"] for lines in lines_by_step.values() for line in lines})
    legend = "".join(f'<span style="background:{c}">{k * ENTROPY_MAX / ENTROPY_SHADES:g}'
                     f'{"+" if k == ENTROPY_SHADES - 1 else ""}</span>' for k, c in enumerate(SHADES))
    options = "".join(f'<option value="{s}">step {s}</option>' for s in steps)
    group_options = "".join(f'<option value="{g}">group {g}</option>' for g in groups)
    body = "".join(step_html(s, lines_by_step[s]) for s in steps) or "<p>No logged steps.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<script>
window.addEventListener("error", e => {{ document.documentElement.dataset.error = String(e.message); }});
</script>
<style>{STYLE}</style></head><body>
<header><b>{html.escape(title)}</b> <button id="prev">&larr;</button><select id="step">{options}</select>
<button id="next">&rarr;</button><select id="group"><option value="all">all groups</option>{group_options}</select>
<label><input type="checkbox" id="rewritten"> rewritten rows only</label>
<span class="legend">H<sub>t</sub> (nats): {legend}</span> <span class="ins" data-src="inserted">GEC's text</span>
<span id="status"></span></header>
<main>{body}</main>
<script>{SCRIPT}</script></body></html>
"""


def check_line(path, number, line):
    """A hand-edited or damaged completions.jsonl row, named by file and line, before it reaches the page."""
    numbers = ("sampled_reward", "reward")
    per_token = ("tokens", "token_entropy", "token_source", "token_trained")
    bad = [f for f in numbers if not isinstance(line[f], (int, float)) or not math.isfinite(line[f])]
    bad += [f for f in ("advantage", "advantage_eda", "entropy") if not isinstance(line.get(f, 0),
                                                                                   (int, float, type(None)))]
    if "tokens" in line:
        columns = [line.get(f) for f in per_token]
        if not all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            bad.append("per-token lists (" + ", ".join(per_token) + ") of one length")
        elif not (all(isinstance(t, str) for t in columns[0]) and all(isinstance(h, (int, float)) for h in columns[1])
                  and all(s in range(len(TOKEN_SOURCES)) for s in columns[2]) and all(t in (0, 1) for t in columns[3])):
            bad.append("per-token values (text, entropy, source index, 0/1)")
    if not isinstance(line["gec_action"], str):
        bad.append("gec_action")
    if bad:
        fail(f"{path}:{number}: not a completions row the viewer can show ({', '.join(bad)}): delete or "
             f"repair the line")


def write_page(run_dir, steps=None, most=VIEW_STEPS, output=None):
    """RUN_DIR/rollouts.html (or `output`) from RUN_DIR/completions.jsonl; returns its path and the steps
    it holds. steps: the logged steps to show (None: at most `most`, evenly spaced)."""
    run_dir = Path(run_dir)
    source = run_dir / "completions.jsonl"
    if not source.is_file():
        fail(f"{run_dir}: no completions.jsonl (a training run writes one every --log-completions-steps)")
    lines = read_metrics(source, fields=VIEW_FIELDS)
    for number, line in enumerate(lines, 1):
        check_line(source, number, line)
    logged = sorted({line["step"] for line in lines})
    missing = sorted(set(steps or ()) - set(logged))
    if missing:
        fail(f"--steps {' '.join(map(str, missing))}: not logged in {source} (logged: "
             f"{logged[0] if logged else '-'} .. {logged[-1] if logged else '-'}, every --log-completions-steps)")
    chosen = choose_steps(logged, steps, most)
    by_step = {s: [line for line in lines if line["step"] == s] for s in chosen}
    config = run_dir / "config.json"
    arm = read_run_config(config).get("arm", "") if config.is_file() else ""
    path = Path(output) if output else run_dir / "rollouts.html"
    path.write_text(page_html(f"{run_dir.resolve().name}: {arm}" if arm else run_dir.resolve().name, by_step),
                    encoding="utf-8")
    return path, chosen
