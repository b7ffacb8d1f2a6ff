"""Nothing lost: a non-finite update, a cut-off metrics line, a full disk, damaged checkpoint files, bad
data, an interrupted prune and SIGINT/SIGTERM each give one clear line and leave every good file as it was.
Run: python -m pytest tests/test_reliability.py"""

import errno
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import analysis
import checkpoints
import data
import edge_grpo as eg
from checkpoints import checkpoint_dirs
from tests.test_edge_grpo import PROBLEMS, args_for, write_jsonl
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def four_steps(tok, out, *flags):
    data_path = write_jsonl(out.parent / "data.jsonl", PROBLEMS)
    args = args_for(out, "--data", str(data_path), "--max-steps", "4", "--save-steps", "2", "--save-total-limit",
                    "2", *flags)
    return eg.train(args, model=tiny_model(tok), tokenizer=tok, progress=False)


def resume_fresh(checkpoint, *flags):
    """--resume as a new process does it: the model and tokenizer loaded from the checkpoint."""
    return eg.train(eg.parse_args(["--resume", str(checkpoint), *flags]), progress=False)


def files(directory):
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).rglob("*")
            if p.is_file()}


# ----------------------------------------------------------------------------- 1. a non-finite update

def test_a_diverging_run_stops_and_every_checkpoint_stays_finite(tok, tmp_path):
    """--learning-rate 1e30: step 1 moves every weight by ~1e30, step 2's forward overflows and its
    gradient is NaN. That update and the next are skipped (weights unchanged, counted), the third in a
    row stops the run with one line; every checkpoint left holds finite weights, the newest kept."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"steps 2-4: every gradient held NaN or inf"):
        eg.train(args_for(out, "--learning-rate", "1e30", "--max-steps", "8", "--save-steps", "1",
                          "--save-total-limit", "2"),
                 model=tiny_model(tok), tokenizer=tok, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1, 1] and math.isfinite(rows[0]["grad_norm"])
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-3"]
    for checkpoint in checkpoint_dirs(out):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
        assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if t.is_floating_point())


def test_non_finite_weights_are_never_saved(tok, tmp_path):
    model = tiny_model(tok)
    args = args_for(tmp_path / "run")
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(SystemExit, match="the weights hold NaN or inf, so no checkpoint-1 was written"):
        checkpoints.save_checkpoint(tmp_path / "run", 1, model, tok, optimizer, eg.make_scheduler(optimizer, args),
                                    None, 0, args)
    assert not list((tmp_path / "run").glob("*checkpoint-1*"))


# ----------------------------------------------------------------------------- 2. a cut-off metrics line

def test_a_cut_off_last_metrics_line_is_dropped_and_the_run_resumes(tok, tmp_path, capsys):
    out = tmp_path / "run"
    four_steps(tok, out)
    path = out / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "rew')  # a full disk stopped this append half-way
    history = resume_fresh(out / "checkpoint-2", "--output-dir", str(out), "--max-steps", "5")
    assert [m["step"] for m in history] == [3, 4, 5]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert "metrics.jsonl:5: the last line was cut off mid-write; dropped" in capsys.readouterr().out
    path.write_text('{"step": 1, "x\n{"step": 2}\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:1: not valid JSON"):  # only the last line may be cut off
        checkpoints.read_metrics(path)


# ----------------------------------------------------------------------------- 3. a full disk, damaged files

def test_a_full_disk_during_a_save_removes_the_partial_copy_and_names_the_last_checkpoint(tok, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full(obj, path, *a, **k):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"could not write checkpoint-4 .*No space left.* is the disk full\? "
                                         r".*checkpoint-2"):
        four_steps(tok, out)
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]  # no .checkpoint-4.tmp left
    assert checkpoints.is_complete(out / "checkpoint-2")


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
    ("trainer_state.pt", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    ("run_config.json", lambda p: p.write_text(p.read_text()[:30])),
    ("tokenizer.json", lambda p: p.write_text(p.read_text()[:50])),
])
def test_a_damaged_checkpoint_file_gives_one_line_naming_it_and_loses_no_metrics(tok, tmp_path, name, damage):
    out = tmp_path / "run"
    four_steps(tok, out)
    damage(out / "checkpoint-2" / name)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        resume_fresh(out / "checkpoint-2")
    message = str(e.value)
    assert f"checkpoint-2/{name}: unreadable" in message and "resume from the previous checkpoint" in message
    assert "\n" not in message and (out / "metrics.jsonl").read_text() == before  # trimmed only after a good load


# ----------------------------------------------------------------------------- 4. bad data

@pytest.mark.parametrize("line, message", [
    ('{"problem": "1+1", "answer": {"value": 2}}', "'answer' is an object"),
    ('{"problem": "1+1", "answer": [{"value": 2}]}', "'answer' is a list holding an object"),
    ('{"problem": "1+1", "answer": NaN}', "'answer' is nan (not a number)"),
    ('{"problem": {"text": "1+1"}, "answer": "2"}', "'problem' is an object"),
    ('{"problem": "1+1", "answer": true}', "'answer' is bool"),
])
def test_answers_and_problems_that_are_not_text_are_refused_by_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "2+2", "answer": 4}\n' + line + "\n")
    with pytest.raises(SystemExit, match=re.escape(f"bad.jsonl:2: {message}")):
        data.load_problems(path)
    rows = data.load_problems(write_jsonl(tmp_path / "ok.jsonl", [dict(problem="p", answer=["1", 2.5])]))
    assert rows[0]["answer"] == ["1", 2.5]


def test_a_file_that_is_not_utf8_is_refused_by_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "2+2", "answer": "4"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(SystemExit, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 17\)"):
        data.load_problems(path)


# ----------------------------------------------------------------------------- 5. an interrupted prune

def test_a_prune_killed_half_way_leaves_no_half_checkpoint_under_its_name(tok, tmp_path, monkeypatch):
    """Pruning checkpoint-2 when checkpoint-4 is saved: the kill comes after one file of it is deleted."""
    out = tmp_path / "run"
    real_rmtree = checkpoints.shutil.rmtree

    def killed_half_way(path, *a, **k):
        path = Path(path)
        if path.name.endswith("checkpoint-2.deleting") or path.name == "checkpoint-2":
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        four_steps(tok, out, "--save-total-limit", "1")
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert not (out / "checkpoint-2").exists()  # renamed before it was deleted
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-4"]
    (out / "checkpoint-3").mkdir()  # what an older version's interrupted prune could leave: not a checkpoint
    (out / "checkpoint-3" / "config.json").write_text("{}")
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-4"]
    resume_fresh(out / "checkpoint-4", "--max-steps", "5")
    assert not list(out.glob(".checkpoint-*"))  # the half-deleted one cleared at the next start


# ----------------------------------------------------------------------------- 6. signals

SCRIPT = """import sys
sys.path.insert(0, ".")
import edge_grpo as eg
from tests.tiny import tiny_model, tiny_tokenizer
tok = tiny_tokenizer()
args = eg.parse_args(["--model", "tiny", "--output-dir", sys.argv[1], "--num-generations", "2",
                      "--prompts-per-step", "2", "--max-completion-length", "8", "--gec-reflection-tokens", "4",
                      "--log-completions-steps", "0",
                      "--max-steps", "100000", "--save-steps", "0"])
eg.train(args, model=tiny_model(tok), tokenizer=tok, progress=False)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_write_a_checkpoint_and_print_the_resume_command(tmp_path, signum):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    checkpoint = out / f"checkpoint-{last}"
    assert checkpoints.is_complete(checkpoint) and [p.name for p in checkpoint_dirs(out)] == [checkpoint.name]
    assert f"to go on: python edge_grpo.py --resume {checkpoint}" in stdout


# ----------------------------------------------------------------------------- the rest

def test_gec_is_timed_apart_from_sampling_and_the_parts_add_up(tok, tmp_path, monkeypatch):
    """seconds_gec used to time only dynamic sampling (about 0): now GEC's own call, here made to take
    at least 50 ms."""
    real = eg.guided_error_correction
    monkeypatch.setattr(eg, "guided_error_correction", lambda *a, **k: time.sleep(0.05) or real(*a, **k))
    history = eg.train(args_for(tmp_path / "run", "--max-steps", "2"), model=tiny_model(tok), tokenizer=tok,
                       progress=False)
    for m in history:
        assert m["seconds_gec"] >= 0.05
        assert m["seconds_generation"] + m["seconds_gec"] + m["seconds_update"] == pytest.approx(m["seconds"], abs=1e-6)


def test_completions_are_logged_per_row_and_analysis_reads_them(tok, tmp_path, capsys):
    out = tmp_path / "run"
    history = eg.train(args_for(out, "--max-steps", "2", "--log-completions-steps", "1", "--no-eda"),
                       model=tiny_model(tok), tokenizer=tok, progress=False)
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] * 8 + [2] * 8  # P x G = 2 x 4 rows a step
    for line in lines:
        assert (line["rewritten"] is None) == (line["gec_action"] in ("none", "skipped"))
        assert line["advantage"] == line["advantage_eda"]  # --no-eda
        assert line["reward"] == line["sampled_reward"] or line["gec_action"] != "none"
    step1 = [line for line in lines if line["step"] == 1]
    assert sum(line["entropy"] for line in step1) / 8 == pytest.approx(history[0]["entropy"], rel=1e-5)
    result = analysis.main(["gec", "--completions", str(out / "completions.jsonl")])
    assert result["rows"] == 16 and result["rewritten"] == sum(line["rewritten"] is not None for line in lines)
    assert "rewritten by GEC" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one run, one directory, one record

def contents(directory):
    """Every file's bytes but the lock's (rewritten, and left empty, by every launch)."""
    return {p.relative_to(directory): p.read_bytes() for p in Path(directory).rglob("*")
            if p.is_file() and p.name != ".lock"}


def logged_steps(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


def test_completions_hold_each_step_once_after_overwrite_resume_and_a_cut_off_line(tok, tmp_path):
    out = tmp_path / "run"
    four_steps(tok, out, "--log-completions-steps", "1")
    completions = out / "completions.jsonl"
    assert logged_steps(completions) == [s for s in (1, 2, 3, 4) for _ in range(8)]  # P x G = 8 rows a step
    four_steps(tok, out, "--log-completions-steps", "1", "--overwrite-output-dir")  # used to keep the old 32 rows
    assert logged_steps(completions) == [s for s in (1, 2, 3, 4) for _ in range(8)]
    completions.write_text(completions.read_text() + '{"step": 5, "prom')  # a kill -9 cut this append
    resume_fresh(out / "checkpoint-2")
    assert logged_steps(completions) == [s for s in (1, 2, 3, 4) for _ in range(8)]  # 3 and 4 redone, once each
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    assert analysis.main(["gec", "--completions", str(completions)])["rows"] == 32


def test_a_copied_checkpoint_resumes_into_its_own_directory_and_the_original_is_untouched(tok, tmp_path):
    import shutil
    out = tmp_path / "run"
    four_steps(tok, out)
    original = contents(out)
    shutil.copytree(out / "checkpoint-2", tmp_path / "copy" / "checkpoint-2")
    resume_fresh(tmp_path / "copy" / "checkpoint-2")
    assert contents(out) == original
    assert logged_steps(tmp_path / "copy" / "metrics.jsonl") == [3, 4]
    assert [p.name for p in checkpoint_dirs(tmp_path / "copy")] == ["checkpoint-2", "checkpoint-4"]


def test_resume_into_another_runs_directory_is_refused_and_changes_nothing(tok, tmp_path):
    four_steps(tok, tmp_path / "a")
    four_steps(tok, tmp_path / "b")
    before = contents(tmp_path / "b")
    with pytest.raises(SystemExit, match=r"belongs to the run in .*/a, and --output-dir .*/b holds another run"):
        resume_fresh(tmp_path / "a" / "checkpoint-2", "--output-dir", str(tmp_path / "b"))
    assert contents(tmp_path / "b") == before


def test_a_resume_with_a_changed_method_flag_is_refused_unless_allowed(tok, tmp_path):
    out = tmp_path / "run"
    four_steps(tok, out)
    before = contents(out)
    with pytest.raises(SystemExit, match=r"--eda True -> False, --gec True -> False.*Nothing was changed"):
        eg.parse_args(["--resume", str(out / "checkpoint-2"), "--no-gec", "--no-eda"])
    with pytest.raises(SystemExit, match=r"--num-generations 4 -> 2"):
        eg.parse_args(["--resume", str(out / "checkpoint-2"), "--num-generations", "2"])
    assert contents(out) == before
    resumed = eg.parse_args(["--resume", str(out / "checkpoint-2"), "--max-steps", "6", "--save-steps", "3"])
    assert resumed.max_steps == 6
    resume_fresh(out / "checkpoint-2", "--no-eda", "--allow-changed-flags")
    config = json.loads((out / "config.json").read_text())
    assert config["arm"] == "GRPO + GEC" and config["flag_changes"] == [
        dict(from_step=3, changes=[dict(flag="eda", before=True, now=False)])]


def test_two_launches_into_one_directory_the_second_stops_and_the_first_finishes(tok, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data_path = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    out = tmp_path / "run"
    flags = ["--model", str(model_dir), "--data", str(data_path), "--output-dir", str(out), "--num-generations", "2",
             "--prompts-per-step", "2", "--max-completion-length", "8", "--max-steps", "40", "--save-steps", "0",
             "--log-completions-steps", "0"]
    first = subprocess.Popen([sys.executable, "edge_grpo.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    locked = lambda: (out / ".lock").is_file() and (out / ".lock").read_text()
    while not locked() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "edge_grpo.py", *flags], cwd=ROOT, capture_output=True, text=True)
    output, _ = first.communicate(timeout=300)
    assert second.returncode != 0 and re.search(r"is in use by edge_grpo\.py \(pid \d+", second.stderr), second.stderr
    assert len(second.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert first.returncode == 0, output
    assert logged_steps(out / "metrics.jsonl") == list(range(1, 41)) and (out / ".lock").read_text() == ""


def test_a_stale_lock_is_said_and_taken_over(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("edge_grpo.py (pid 999999, started 2026-12-01 10:00:00)")
    with checkpoints.hold_lock(tmp_path / "run", "test"):
        pass
    assert "ended without releasing it (killed?); taken over" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--device", "gpu"], "--device gpu: expected auto, cpu, cuda, cuda:N or mps"),
    (["--learning-rate", "nan"], "--learning-rate nan: expected a finite number"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number"),
    (["--max-grad-norm", "-0.5"], "--max-grad-norm must be >= 0"),
    (["--sft-steps", "-1"], "--sft-steps must be between 0 and --max-steps"),
    (["--entropy-band", "0.2", "nan"], "--entropy-band nan: expected a finite number"),
])
def test_bad_flag_values_are_one_line_naming_the_flag(argv, says):
    with pytest.raises(SystemExit) as e:
        eg.parse_args(argv)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, says", [
    (["eval", "--model", "m", "--samples", "0"], "--samples must be at least 1"),
    (["eval", "--model", "m", "--limit", "-3"], "--limit must be >= 0"),
    (["eval", "--model", "m", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["eval", "--model", "m", "--temperature", "nan"], "--temperature(s) must be finite"),
    (["entropy", "--temperatures", "0.1", "-1"], "--temperature(s) must be finite"),
])
def test_bad_analysis_counts_are_refused_before_anything_is_written(argv, says, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(says)):
        analysis.main(argv + ["--output-dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_device_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=r"--device cuda: this machine has no CUDA device"):
        checkpoints.resolve_device("cuda")


@pytest.mark.parametrize("answer, says", [
    (" ", "can never earn the full reward"), (1e16, "can never earn the full reward"),
    (-0.0, "can never earn the full reward"),
])
def test_answers_that_can_never_be_rewarded_are_refused_by_line(tmp_path, answer, says):
    path = write_jsonl(tmp_path / "d.jsonl", [PROBLEMS[0], dict(problem="p", answer=answer)])
    with pytest.raises(SystemExit, match=rf"d\.jsonl:2: .*{says}"):
        data.load_problems(path)


def test_damaged_files_are_one_line_naming_the_file(tok, tmp_path):
    out = tmp_path / "run"
    four_steps(tok, out, "--log-completions-steps", "1")
    deep = "[" * 100000 + "]" * 100000
    cases = [  # (file, its new text, the call that reads it, what the line says)
        ("metrics.jsonl", '{"step": 1}\nnot json\n{"step": 3}\n', lambda: resume_fresh(out / "checkpoint-2"),
         "metrics.jsonl:2: not valid JSON"),
        ("metrics.jsonl", '{"step": 1}\n' + deep + '\n{"step": 3}\n', lambda: analysis.main(["plot", str(out)]),
         "metrics.jsonl:2: not valid JSON"),
        ("metrics.jsonl", '{"step": 1}\n[1, 2]\n{"step": 3}\n', lambda: analysis.main(["plot", str(out)]),
         "metrics.jsonl:2: not one of this file's rows"),
        ("config.json", '{"arm": ', lambda: analysis.main(["plot", str(out)]), "config.json: unreadable"),
        ("config.json", '[1]', lambda: analysis.main(["plot", str(out)]), "config.json: unreadable"),
        ("completions.jsonl", '{"step": 1}\n{"step": 2}\n', lambda: analysis.main(["gec", "--completions",
                                                                                    str(out / "completions.jsonl")]),
         "completions.jsonl:1: not one of this file's rows"),
        ("checkpoint-2/run_config.json", deep, lambda: eg.parse_args(["--resume", str(out / "checkpoint-2")]),
         "run_config.json: unreadable"),
    ]
    for name, text, read, says in cases:
        saved = (out / name).read_bytes()
        (out / name).write_text(text)
        with pytest.raises(SystemExit) as e:
            read()
        assert says in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        (out / name).write_bytes(saved)


def test_model_flags_that_are_not_models_say_what_they_are(tok, tmp_path):
    out = tmp_path / "run"
    four_steps(tok, out)
    for argv in (["--model", str(out)], ["--model", str(out / "metrics.jsonl")], ["--model", str(tmp_path / "nope")],
                 ["--model", "./typo/model"]):
        with pytest.raises(SystemExit) as e:
            checkpoints.load_model_and_tokenizer(argv[1], torch.device("cpu"), torch.float32)
        message = str(e.value)
        assert "damaged" not in message and "Repo id" not in message, message
    with pytest.raises(SystemExit, match=r"is a training run's directory, not a model: pass one of its checkpoints "
                                         r"\(the newest: .*checkpoint-4\)"):
        checkpoints.load_model_and_tokenizer(str(out), torch.device("cpu"), torch.float32)
    with pytest.raises(SystemExit, match="no such directory"):
        checkpoints.load_model_and_tokenizer(str(tmp_path / "nope"), torch.device("cpu"), torch.float32)


def test_an_unreachable_hub_fails_at_once_saying_model_takes_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    started = time.time()
    with pytest.raises(SystemExit, match=r"the hub is not reachable and it is not in the local cache.*local directory"):
        checkpoints.load_model_and_tokenizer("qwen2.5-math-1.5b", torch.device("cpu"), torch.float32)
    assert time.time() - started < 20  # no minute of retries
