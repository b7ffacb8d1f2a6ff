"""COURSE.md and course.py: every function, test and command the course names exists and parses, and
a blanked copy fails an assignment's test where this repository passes it.
Run: python -m pytest tests/test_course.py"""

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import course
import edge_grpo as eg

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "COURSE.md").read_text()


def functions(path):
    return {n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)}


def test_six_to_eight_assignments_each_with_a_function_a_test_a_demo_and_a_question():
    sections = TEXT.split("\n## ")[1:]
    assert 6 <= len(sections) <= 8
    for section in sections:
        for part in ("Write: `", "Test: `python -m pytest", "Demo: `python edge_grpo.py", "Question:"):
            assert part in section, (section[:40], part)


def test_every_function_and_test_exists():
    for file, name in course.assignments():
        assert name in functions(file), f"{file}:{name}"
    for file, expression in re.findall(r"Test: `python -m pytest (tests/\w+\.py) -k \"?([^`\"]+)\"?`", TEXT):
        tests = {n for n in functions(file) if n.startswith("test_")}
        for fragment in expression.split(" or "):
            assert any(fragment.strip() in t for t in tests), f"{file} -k {fragment}"
    assert len(course.assignments()) == TEXT.count("\nWrite: `")


def test_every_training_command_parses():
    commands = re.findall(r"`python edge_grpo\.py([^`]*)`", TEXT)
    assert len(commands) >= 8
    for flags in commands:
        eg.parse_args(shlex.split(flags))  # an unknown flag or a contradiction exits


def test_blank_keeps_the_signature_and_docstring():
    source = '''def f(x):\n    """Doc."""\n    y = x + 1\n    return y\n\n\ndef g():\n    return 2\n'''
    blanked = course.blank(source, "f")
    assert 'def f(x):\n    """Doc."""\n    raise NotImplementedError' in blanked and "return y" not in blanked
    assert "def g():\n    return 2" in blanked
    ast.parse(blanked)


@pytest.mark.slow  # a pytest run in the copy, a few seconds
def test_a_blanked_copy_fails_the_assignment_and_the_reference_passes(tmp_path):
    out = course.make_copy(tmp_path / "student", [("edge_grpo.py", "group_advantages")])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_edge_grpo.py", "-k",
               "group_advantages_hand_table"]
    student = subprocess.run(command, cwd=out, capture_output=True, text=True)
    assert student.returncode != 0 and "NotImplementedError" in student.stdout
    reference = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stdout[-2000:]


def reference_into(copy, file, name):
    """The student writes the function: the copy's blanked one replaced by this repository's."""
    def segment(source):
        node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name)
        lines = source.splitlines(keepends=True)
        return "".join(lines[node.lineno - 1:node.end_lineno])
    path = copy / file
    path.write_text(path.read_text().replace(segment(path.read_text()), segment((ROOT / file).read_text())))


DEMO = """import shlex, sys
sys.path.insert(0, ".")
import edge_grpo as eg
from tests.tiny import tiny_model, tiny_tokenizer
tok = tiny_tokenizer()
args = eg.parse_args(shlex.split(sys.argv[1]) + ["--model", "tiny", "--max-steps", "1", "--num-generations", "2",
                     "--prompts-per-step", "2", "--max-completion-length", "6", "--gec-reflection-tokens", "4",
                     "--log-completions-steps", "0", "--output-dir", sys.argv[2]])
eg.train(args, model=tiny_model(tok), tokenizer=tok, progress=False)
"""


@pytest.mark.slow  # eight one-step runs in a student copy, ~30 s
def test_each_demo_runs_with_only_the_assignments_up_to_it_written(tmp_path):
    """The student copy blanks one assignment at a time (--next): after writing assignments 1..K the
    demo of K runs, on a tiny model for one step. (Blanking all eight at once stopped demo 1 at
    token_weights, assignment 7.)"""
    out = tmp_path / "student"
    course.main([str(out)])
    sections = TEXT.split("\n## ")[1:]
    for k, ((file, name), section) in enumerate(zip(course.assignments(), sections)):
        if k:
            course.main([str(out), "--next"])
        assert "assignment: write " + name in (out / file).read_text()
        reference_into(out, file, name)
        flags = re.search(r"Demo: `python edge_grpo\.py([^`]*)`", section).group(1)
        demo = subprocess.run([sys.executable, "-c", DEMO, flags, str(tmp_path / f"run{k}")], cwd=out,
                              capture_output=True, text=True)
        assert demo.returncode == 0, (k + 1, name, demo.stderr[-1500:])
    with pytest.raises(SystemExit, match="every assignment is blanked"):
        course.main([str(out), "--next"])
