"""
course.py: a student's copy of the repository with the assignments' functions blanked (COURSE.md).

  python course.py OUT                               # every assignment of COURSE.md blanked
  python course.py OUT edge_grpo.py:group_advantages  # only these

Copies the files git tracks (or, outside a git checkout, every file but .git, .venv and runs/) to
OUT, then replaces the body of each named function with `raise NotImplementedError` (its signature
and docstring stay: they are the assignment). The assignment's test then fails in OUT until the
student writes the body; in this repository the reference passes it.
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


def make_copy(out, targets):
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"course.py: error: {out} is not empty; give a new directory")
    for path in tracked_files(ROOT):
        destination = out / path.relative_to(ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
    for file, name in targets:
        path = out / file
        path.write_text(blank(path.read_text(), name))
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    targets = [tuple(t.split(":")) for t in argv[1:]] or assignments()
    out = make_copy(argv[0], targets)
    print(f"{out}: {len(targets)} functions blanked: " + ", ".join(f"{f}:{n}" for f, n in targets))


if __name__ == "__main__":
    main()
