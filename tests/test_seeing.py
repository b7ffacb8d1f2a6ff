"""Seeing a run: completions.jsonl's per-token fields, the rollout viewer (parsed with html.parser, and
opened in headless Chromium where it is installed), TensorBoard's and W&B's logs read back with their
own readers, each step once after a resume.
Run: python -m pytest tests/test_seeing.py"""

import json
import math
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import analysis
import checkpoints
import edge_grpo as eg
import trackers
from rollout import TOKEN_SOURCES, token_pieces
from tests.test_edge_grpo import args_for
from tests.tiny import tiny_model
from viewer import choose_steps, shade

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run_logged(tok, out, *flags, steps=2):
    return eg.train(args_for(out, "--max-steps", str(steps), "--log-completions-steps", "1", *flags),
                    model=tiny_model(tok), tokenizer=tok, progress=False)


def rows_of(out):
    return [json.loads(line) for line in (Path(out) / "completions.jsonl").read_text().splitlines()]


def text_of(row):
    return row["rewritten"] if row["rewritten"] is not None else row["sampled"]


# ----------------------------------------------------------------------------- completions.jsonl per token

def byte_tokenizer():
    """A byte-level BPE with no merges: every byte one token, so 'é' (2 bytes) and '😀' (4) are split."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={c: k for k, c in enumerate(sorted(alphabet))} | {"<eos>": len(alphabet)},
                                merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.mark.parametrize("text", ["We compute $12 + 34 = 46$. \\boxed{46}", "héllo wörld ∑ 😀 <script>&", "",
                                  "a\n\nb"])
def test_token_pieces_concatenate_to_the_decoded_text_also_when_a_character_spans_tokens(text):
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)
    if "😀" in text:  # 4 byte tokens: the first three add nothing, the fourth the whole character
        k = next(i for i, p in enumerate(pieces) if "😀" in p)
        assert pieces[k] == "😀" and pieces[k - 3:k] == ["", "", ""]

def test_a_character_cut_by_the_length_cap_still_shows():
    tok = byte_tokenizer()
    ids = tok("hé", add_special_tokens=False).input_ids[:2]  # 'h' and the first of é's two bytes
    assert token_pieces(tok, ids) == ["h", "\ufffd"] and tok.decode(ids) == "h\ufffd"


def test_completions_hold_each_rows_tokens_entropies_sources_and_loss_mask(tok, tmp_path):
    out = tmp_path / "run"
    run_logged(tok, out)
    rows = rows_of(out)
    assert {r["gec_action"] for r in rows} >= {"answer", "reflection"}  # the tiny model is wrong: GEC rewrites
    for r in rows:
        n = len(r["tokens"])
        assert len(r["token_entropy"]) == len(r["token_source"]) == len(r["token_trained"]) == n
        assert "".join(r["tokens"]) == text_of(r)
        # H_i is the mean of H_t over the response's tokens: the rounded H_t give it back to 0.005
        assert sum(r["token_entropy"]) / n == pytest.approx(r["entropy"], abs=0.005)
        inserted = {TOKEN_SOURCES[s] for s in r["token_source"]} - {"sampled"}
        expected = {"none": set(), "skipped": set(), "reflection": {"cue"}, "answer": {"answer"},
                    "solution": {"solution"}}[r["gec_action"]]
        assert inserted == expected, r["gec_action"]
        assert r["token_trained"] == [1] * n  # --inserted-tokens train: every token, GEC's too
        if r["gec_action"] == "answer":  # the policy's own text, then the sentence: sources 0...0 2...2
            first = r["token_source"].index(2)
            assert set(r["token_source"][:first]) == {0} and set(r["token_source"][first:]) == {2}
            assert "".join(r["tokens"][:first]) == r["sampled"]


def test_the_loss_mask_logged_is_the_one_trained_prefix_and_masked_text_untrained(tok, tmp_path):
    run_logged(tok, tmp_path / "prefix", "--gec-branches", "prefix", steps=1)
    rows = [r for r in rows_of(tmp_path / "prefix") if r["gec_action"] == "prefix"]
    assert rows
    for r in rows:
        prefix = [k for k, s in enumerate(r["token_source"]) if TOKEN_SOURCES[s] == "prefix"]
        assert prefix == list(range(len(prefix))) and prefix  # the solution's prefix comes first ...
        assert [r["token_trained"][k] for k in prefix] == [0] * len(prefix)  # ... and is never trained
        assert r["token_trained"][len(prefix):] == [1] * (len(r["tokens"]) - len(prefix))  # what the policy wrote is
    run_logged(tok, tmp_path / "masked", "--inserted-tokens", "mask", steps=1)
    for r in rows_of(tmp_path / "masked"):
        assert r["token_trained"] == [int(s == 0) for s in r["token_source"]]


# ----------------------------------------------------------------------------- the page, parsed

class Page(HTMLParser):
    """The viewer's page as data: per step, per row, its tokens (text, shade, H_t, inside an inserted run?)
    and its facts line; and every element's name, to find any script the page should not hold."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.steps, self.elements, self.stack = {}, [], []
        self.row = self.token = self.facts = None
        self.feed(text)

    def handle_starttag(self, name, attrs):
        a = dict(attrs)
        self.elements.append(name)
        self.stack.append((name, a))
        if name == "section":
            self.step = self.steps.setdefault(int(a["data-step"]), dict(rows=[], hidden="hidden" in a))
        elif name == "div" and a.get("class") == "row":
            self.row = dict(tokens=[], facts="", rewritten=a["data-rewritten"])
            self.step["rows"].append(self.row)
        elif name == "div" and a.get("class") == "facts":
            self.facts = self.row
        elif name == "t" and self.row is not None:
            inserted = [b for n, b in self.stack[:-1] if n == "span" and b.get("class") == "ins"]
            trained = [b for n, b in self.stack if n == "span" and "data-trained" in b][-1]["data-trained"]
            self.token = dict(text="", shade=a.get("e"), h=a.get("h"),
                              source=inserted[-1]["data-src"] if inserted else None, trained=trained)
            self.row["tokens"].append(self.token)
        elif name == "details":
            self.row = None  # the response before GEC: text, not the tokens trained on

    def handle_endtag(self, name):
        while self.stack and self.stack.pop()[0] != name:
            pass
        if name == "t":
            self.token = None
        if name == "div" and self.facts is not None and not any(n == "div" and b.get("class") == "facts" for n,
                                                                b in self.stack):
            self.facts = None

    def handle_data(self, text):
        if self.token is not None:
            self.token["text"] += text
        elif self.facts is not None:
            self.facts["facts"] += text


def test_the_page_shows_every_logged_row_token_by_token_with_its_numbers(tok, tmp_path, capsys):
    out = tmp_path / "run"
    run_logged(tok, out, steps=3)
    result = analysis.main(["view", str(out)])
    assert result["steps"] == [1, 2, 3] and f"{out / 'rollouts.html'}: 3 steps" in capsys.readouterr().out
    page = Page((out / "rollouts.html").read_text(encoding="utf-8"))
    assert page.elements.count("script") == 2  # the page's own two: the error hook and the navigation
    rows = rows_of(out)
    assert sorted(page.steps) == [1, 2, 3] and [s["hidden"] for s in page.steps.values()] == [False] * 3
    for step, shown in page.steps.items():
        logged = [r for r in rows if r["step"] == step]
        assert len(shown["rows"]) == len(logged)
        for r, s in zip(logged, shown["rows"]):
            assert "".join(t["text"] for t in s["tokens"]) == text_of(r)
            assert [t["text"] for t in s["tokens"]] == r["tokens"]
            assert [t["source"] for t in s["tokens"]] == \
                [None if k == 0 else TOKEN_SOURCES[k] for k in r["token_source"]]
            assert [float(t["h"]) for t in s["tokens"]] == pytest.approx(r["token_entropy"], abs=0.005)
            assert [int(t["shade"]) for t in s["tokens"]] == [shade(h) for h in r["token_entropy"]]
            assert [int(t["trained"]) for t in s["tokens"]] == r["token_trained"]
            assert s["rewritten"] == str(int(r["gec_action"] not in ("none", "skipped")))
            shown = " ".join(s["facts"].split()).replace("Ai", "A i").replace("Hi", "H i")
            assert (f"{r['gec_action']} · reward {r['sampled_reward']:g} → {r['reward']:g} · A i "
                    f"{r['advantage']:+.2f} → {r['advantage_eda']:+.2f} (EDA) · H i {r['entropy']:.3f}") == shown


def test_steps_are_chosen_evenly_or_by_name_and_an_unlogged_step_is_one_line(tok, tmp_path):
    # 200 logged steps, 5 kept: indices round(k * 199 / 4) = 0, 50 (49.75), 100 (99.5), 149 (149.25), 199
    assert choose_steps(list(range(5, 1001, 5)), most=5) == [5, 255, 505, 750, 1000]
    assert choose_steps([1, 2, 3], most=10) == [1, 2, 3] and choose_steps([1, 2, 3], [3, 1]) == [1, 3]
    assert [shade(h) for h in (0.0, 0.49, 0.5, 3.99, 4.0, 12.0, -1e-9)] == [0, 0, 1, 7, 7, 7, 0]
    out = tmp_path / "run"
    run_logged(tok, out, steps=3)
    assert analysis.main(["view", str(out), "--steps", "3", "1"])["steps"] == [1, 3]
    assert analysis.main(["view", str(out), "--most", "2"])["steps"] == [1, 3]
    assert analysis.main(["view", str(out), "--steps", "all"])["steps"] == [1, 2, 3]
    with pytest.raises(SystemExit, match=r"--steps 7: not logged in .*completions.jsonl \(logged: 1 \.\. 3"):
        analysis.main(["view", str(out), "--steps", "7"])
    with pytest.raises(SystemExit, match="--steps x: logged step numbers"):
        analysis.main(["view", str(out), "--steps", "x"])
    with pytest.raises(SystemExit, match="no completions.jsonl"):
        analysis.main(["view", str(tmp_path)])
    path = out / "completions.jsonl"
    lines = path.read_text().splitlines()
    damaged = json.loads(lines[1]) | dict(token_entropy=[0.1])  # the per-token lists no longer line up
    path.write_text("\n".join([lines[0], json.dumps(damaged)] + lines[2:]) + "\n")
    with pytest.raises(SystemExit, match=r"completions.jsonl:2: not a completions row the viewer can show \(per-token"):
        analysis.main(["view", str(out)])


HOSTILE = ["<script>document.title='owned'</script>", "</div></section><b>", "&amp; &lt; &", "\u202eright-to-left",
           "x" * 100_000, "<t e=9>fake</t>", "\"'><img src=x onerror=alert(1)>"]


def hostile_run(tmp_path):
    """A completions.jsonl written by hand: each response one hostile token, then an ordinary one."""
    out = tmp_path / "hostile"
    out.mkdir()
    rows = [dict(step=1, prompt=0, problem="<script>alert(2)</script> What is 1+1?", answer="</code>2",
                 sampled=text + " 2", sampled_reward=0.0, gec_action="none", rewritten=None, reward=0.0,
                 advantage=0.0, advantage_eda=0.0, entropy=1.0, tokens=[text, " 2"], token_entropy=[1.0, 1.0],
                 token_source=[0, 0], token_trained=[1, 1])
            for text in HOSTILE]
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_hostile_completions_come_out_as_text(tmp_path):
    out = hostile_run(tmp_path)
    path, _ = analysis.write_page(out)
    page = Page(path.read_text(encoding="utf-8"))
    assert page.elements.count("script") == 2 and "img" not in page.elements and page.elements.count("section") == 1
    shown = page.steps[1]["rows"]
    assert [[t["text"] for t in row["tokens"]] for row in shown] == [[text, " 2"] for text in HOSTILE]
    assert [t["shade"] for row in shown for t in row["tokens"]] == ["2"] * 2 * len(HOSTILE)  # the fake <t e=9> is text


# ----------------------------------------------------------------------------- the page, in a browser

def chromium(*flags):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--enable-logging=stderr", "--v=0", *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")
def test_chromium_runs_the_page_without_an_error_and_shows_one_steps_rows(tok, tmp_path):
    out = tmp_path / "run"
    run_logged(tok, out, steps=3)
    path, _ = analysis.write_page(out)
    shown = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{path}#step-2")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "Uncaught" not in shown.stderr and "CONSOLE" not in shown.stderr, shown.stderr[-2000:]
    dom = Page(shown.stdout)
    assert 'data-ready="1"' in shown.stdout and "data-error" not in shown.stdout  # the script ran to its end
    visible = [step for step, s in dom.steps.items() if not s["hidden"]]
    assert visible == [2]  # the step the address names, the others hidden
    assert len(dom.steps[2]["rows"]) == len([r for r in rows_of(out) if r["step"] == 2]) == 8


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize("width", [1280, 1920])
def test_hostile_completions_break_neither_the_page_nor_its_width_in_chromium(tmp_path, width):
    out = hostile_run(tmp_path)
    path, _ = analysis.write_page(out)
    probe = path.with_name("probe.html")  # the page, and after it a script that measures it
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>",
                                                              "<script>document.documentElement.dataset.fits = "
                     "String(document.documentElement.scrollWidth <= window.innerWidth && "
                     "document.title.indexOf('owned') < 0)</script></body>"), encoding="utf-8")
    shown = chromium(f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},900", "--dump-dom",
                     f"file://{probe}")
    assert shown.returncode == 0 and 'data-ready="1"' in shown.stdout and "data-error" not in shown.stdout
    assert 'data-fits="true"' in shown.stdout, "a completion widened the page or ran a script"
    assert "Uncaught" not in shown.stderr


# ----------------------------------------------------------------------------- TensorBoard and W&B

def numeric_metrics(out):
    return {m["step"]: trackers.scalars(m) for m in checkpoints.read_metrics(Path(out) / "metrics.jsonl")}


def interrupted_and_resumed(tok, out, *flags):
    """Two steps, a checkpoint after each; then a resume from checkpoint-1 redoes step 2, as after a kill
    that came after step 2 was logged and before its checkpoint was kept."""
    run_logged(tok, out, "--save-steps", "1", "--save-total-limit", "0", *flags)
    return eg.train(eg.parse_args(["--resume", str(out / "checkpoint-1"), *flags]), progress=False)


def test_tensorboard_holds_every_metric_of_every_step_once_after_a_resume(tok, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (.ci/run installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    interrupted_and_resumed(tok, out, "--report-to", "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = numeric_metrics(out)
    assert sorted(expected) == [1, 2]
    names = set().union(*(m.keys() for m in expected.values()))
    assert set(events.Tags()["scalars"]) == names
    assert "gec_actions/answer" in names and "loss_tokens_by_source/cue" in names
    for name in names:
        logged = events.Scalars(name)
        # each step once, the redone one too
        assert [e.step for e in logged] == [s for s in (1, 2) if name in expected[s]]
        assert [e.value for e in logged] == pytest.approx([expected[e.step][name] for e in logged], rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]  # the flags, once


def wandb_records(path):
    """The records of a W&B run file (.wandb): LevelDB's log format (32 KiB blocks of chunks, each with a
    7-byte header: crc, length, type), after W&B's own 7-byte header; each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2
    data, records, pending, pos = Path(path).read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_holds_the_history_each_step_once_and_the_completions(tok, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    interrupted_and_resumed(tok, out, "--report-to", "wandb")
    history = [r.history for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
               for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
    runs = {path.name for path in (out / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(runs) == 1  # the resume continued the same W&B run (one id)
    assert [h.step.num for h in history] == [1, 2]  # step 2 was not sent again by the resume
    expected = numeric_metrics(out)
    clock = ("seconds", "tokens_per_second", "peak_memory_mb")  # measured, not computed: step 2's differ between tries
    for h in history:
        logged = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in h.item}
        for name, value in expected[h.step.num].items():
            if h.step.num == 1 or not name.startswith(clock):  # step 2 as first sent: the resume computed the same
                assert logged[name] == pytest.approx(value, rel=1e-6), name
        assert logged["completions/_type"] == "table-file" and logged["completions/nrows"] == 8


def test_a_missing_tracker_or_a_contradiction_is_one_line_before_any_model_loads(tok, tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(SystemExit, match=r"--report-to wandb: the wandb package is not installed \(pip "
                                         r"install wandb\)"):
        eg.train(args_for(tmp_path / "a", "--report-to", "wandb"), progress=False)  # no model given
    with pytest.raises(SystemExit, match="--report-to none contradicts"):
        args_for(tmp_path / "b", "--report-to", "none", "tensorboard")


def test_overwrite_clears_the_old_runs_tracker_logs_and_page(tok, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run_logged(tok, out, "--report-to", "tensorboard")
    analysis.main(["view", str(out)])
    old = set((out / "tensorboard").iterdir())
    run_logged(tok, out, "--overwrite-output-dir")
    assert not (out / "tensorboard").exists() and not (out / "rollouts.html").exists() and old
    assert math.isfinite(numeric_metrics(out)[2]["loss"])
