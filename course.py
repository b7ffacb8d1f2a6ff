"""
course.py: a student's copy of the repository with the assignments' functions blanked (COURSE.md).

  python course.py OUT                                # a student copy with assignment 1 blanked
  python course.py OUT --next                         # in that copy: blank the next one (what is written stays)
  python course.py OUT --all                          # every assignment blanked at once
  python course.py OUT edge_grpo.py:group_advantages  # only these

Copies the files git tracks (or, outside a git checkout, every file but .git, .venv and runs/) to
OUT, then replaces the body of each named function with `raise NotImplementedError` (its signature
and docstring stay: they are the assignment). The assignment's test then fails in OUT until the
student writes the body; in this repository the reference passes it. Progressive by default: every
run calls the functions of later assignments (token_weights, the loss), so those stay written until
the student reaches them, and each assignment's demo runs once the assignments up to it are written.
OUT/.course lists what has been blanked.
"""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SKIPPED = (".git", ".venv", "runs", "__pycache__")


def assignments(course=ROOT / "COURSE.md"):
    """file:function of every assignment, in COURSE.md's order (its "Write:" lines)."""
    return re.findall(r"^Write: `([\w/]+\.py):(\w+)", course.read_text(), flags=re.MULTILINE)


def tracked_files(root):
    try:
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        return [root / line for line in out.splitlines() if (root / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in root.rglob("*") if p.is_file() and not set(p.relative_to(root).parts) & set(SKIPPED)]


def blank(source, name):
    """source with function `name`'s body (after its docstring) replaced by raise NotImplementedError."""
    tree = ast.parse(source)
    found = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name]
    if not found:
        raise SystemExit(f"course.py: error: no function {name}")
    node = found[0]
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    lines = source.splitlines(keepends=True)
    indent = " " * body[0].col_offset if body else " " * (node.col_offset + 4)
    first = body[0].lineno - 1 if body else node.end_lineno
    replacement = f'{indent}raise NotImplementedError("assignment: write {name} (COURSE.md)")\n'
    return "".join(lines[:first]) + replacement + "".join(lines[node.end_lineno:])


def blank_in_place(out, targets):
    """Blanks targets in an existing copy and records them in OUT/.course."""
    out = Path(out)
    for file, name in targets:
        path = out / file
        path.write_text(blank(path.read_text(), name))
    marker = out / ".course"
    done = marker.read_text().split() if marker.is_file() else []
    marker.write_text("".join(f"{t}\n" for t in done + [f"{f}:{n}" for f, n in targets]))


def next_assignment(out):
    """The first assignment of COURSE.md not yet blanked in the copy OUT."""
    marker = Path(out) / ".course"
    if not marker.is_file():
        raise SystemExit(f"course.py: error: {out} is not a student copy (no .course): make one with python "
                         f"course.py {out}")
    done = set(marker.read_text().split())
    left = [t for t in assignments() if f"{t[0]}:{t[1]}" not in done]
    if not left:
        raise SystemExit(f"course.py: error: every assignment is blanked in {out} already")
    return [left[0]]


def make_copy(out, targets):
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"course.py: error: {out} is not empty; give a new directory")
    for path in tracked_files(ROOT):
        destination = out / path.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    blank_in_place(out, targets)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    out, rest = Path(argv[0]), argv[1:]
    if rest == ["--next"]:
        targets = next_assignment(out)
        blank_in_place(out, targets)
    else:
        targets = assignments() if rest == ["--all"] else [tuple(t.split(":")) for t in rest] or assignments()[:1]
        make_copy(out, targets)
    print(f"{out}: blanked " + ", ".join(f"{f}:{n}" for f, n in targets)
          + ("" if rest else f" (assignment 1 of {len(assignments())}; python course.py {out} --next for the next)"))


if __name__ == "__main__":
    main()
