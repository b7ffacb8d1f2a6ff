"""
data.py: the problems a run trains and evaluates on, and where they come from.

  arithmetic_problems   the built-in training set (offline, every GEC branch has what it needs)
  arithmetic_test_problems
                        its held-out test split: the same kind of problem, none of the training set's
  load_problems         a JSON array or JSONL of {problem, answer, solution?}; bad rows named by file and line
  fetch_paper_data      the paper's training set and five evaluation sets, downloaded once into a cache
                        directory, checked (rows, fields, and the training file's SHA-256), then read from there
  load_data             --data: a path, "arithmetic", or one of PAPER_DATA's names
  next_prompts          the data order: one fixed permutation per (seed, epoch), so resume needs no RNG state

Sources (../shared/PAPER.md): the training set is the authors' train_data/deepscaler_hard-1k.json,
pinned to the commit it was published in. Their evaluate_model.py reads the five benchmarks from
understand-r1-zero's `datasets/evaluation_suite` (a Hugging Face `save_to_disk` folder: one Arrow
stream per benchmark); we convert each to JSONL once, which needs pyarrow (imported only then).

  python data.py                      # fetch all six into the cache and print where they are
"""

import hashlib
import json
import math
import os
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from errors import fail
from reward import MAX_REWARD, reference_answer_text, reward


# -----------------------------------------------------------------------------
# The built-in set


ARITHMETIC_TRAIN_ROWS, ARITHMETIC_TRAIN_SEED = 500, 1234
# The held-out split: 30 problems, sized for the study's budget (replicate.py: 12 runs of about 3 min
# and 13 evaluations of 30 x 5 responses, about 50 s each, in 45 minutes on 2 CPU cores). Only 9
# products are left once the training set's 115 are taken in either order: the split is those 9 and 21 sums.
ARITHMETIC_TEST_ROWS, ARITHMETIC_TEST_SEED = 30, 4321


def arithmetic_row(a, op, b):
    value = a + b if op == "+" else a * b
    return dict(problem=f"What is ${a} {op} {b}$?", answer=str(value),
                solution=f"We compute ${a} {op} {b} = {value}$. The answer is $\\boxed{{{value}}}$.")


def arithmetic_triples(n=ARITHMETIC_TRAIN_ROWS, seed=ARITHMETIC_TRAIN_SEED):
    """(a, op, b) of the built-in training set: sums of 2..30 and products of 1..12, half each."""
    rng = random.Random(seed)
    triples = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if rng.random() < 0.5:
            triples.append((a, "+", b))
        else:
            triples.append((a % 12 + 1, "\\times", b % 12 + 1))
    return triples


def arithmetic_problems(n=ARITHMETIC_TRAIN_ROWS, seed=ARITHMETIC_TRAIN_SEED):
    """The built-in training set: small sums and products with worked solutions, so every GEC branch
    (reflection, answer, solution) has what it needs and a 135M model can get some right."""
    return [arithmetic_row(*t) for t in arithmetic_triples(n, seed)]


def arithmetic_test_problems(n=ARITHMETIC_TEST_ROWS, seed=ARITHMETIC_TEST_SEED):
    """The held-out split (--data arithmetic-test): problems of the training set's kind and ranges,
    none of whose (a, op, b) the training set holds in either order (3 + 5 held out means 5 + 3 is
    too: the same fact). Every remaining product, then sums drawn to n rows, in a fixed shuffled order."""
    seen = set(arithmetic_triples())
    seen |= {(b, op, a) for a, op, b in seen}
    products = [(a, "\\times", b) for a in range(1, 13) for b in range(1, 13) if (a, "\\times", b) not in seen]
    sums = [(a, "+", b) for a in range(2, 31) for b in range(2, 31) if (a, "+", b) not in seen]
    rng = random.Random(seed)
    chosen = products[:n] + rng.sample(sums, n - min(n, len(products)))
    rng.shuffle(chosen)
    return [arithmetic_row(*t) for t in chosen]


# -----------------------------------------------------------------------------
# Files of problems


def load_problems(path):
    """Rows with problem, answer and optional solution, from a JSON array or JSONL file. Every defect
    is reported with the file and line (JSONL) or item (JSON array)."""
    path = Path(path)
    if not path.is_file():
        fail(f"--data {path}: no such file (or a dataset name: {', '.join(PAPER_DATA)})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = raw[:e.start].count(b"\n") + 1, e.start - raw.rfind(b"\n", 0, e.start)
        fail(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}): save the file as UTF-8")
    if not text.strip():
        fail(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{path}:{e.lineno}: not valid JSON: {e.msg}")
        except (ValueError, RecursionError) as e:  # an integer past Python's 4300 digits; nesting too deep
            fail(f"{path}: not readable JSON ({str(e).splitlines()[0][:120] or type(e).__name__})")
        located = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                fail(f"{path}:{number}: not valid JSON: {e.msg}")
            except (ValueError, RecursionError) as e:  # an integer past Python's 4300 digits; nesting too deep
                fail(f"{path}:{number}: not readable JSON ({str(e).splitlines()[0][:120] or type(e).__name__})")
    rows = []
    for where, item in located:
        if not isinstance(item, dict):
            fail(f"{where}: expected an object with problem and answer, got {type(item).__name__}")
        for field in ("problem", "answer"):
            if item.get(field) in (None, "", []):
                fail(f"{where}: missing '{field}'")
        for field, value in (("problem", item["problem"]), ("answer", item["answer"]),
                             ("solution", item.get("solution"))):
            problem = plain_value_problem(value, lists=field == "answer")
            if problem:
                fail(f"{where}: '{field}' is {problem}; expected text (or a "
                     f"number{', or a list of them' if field == 'answer' else ''})")
        if not rewardable(item["answer"]):
            fail(f"{where}: the answer {item['answer']!r} can never earn the full reward: written back into "
                 f"\\boxed{{}} as {reference_answer_text(item['answer'])!r} it does not match itself (blank, or a "
                 f"number its text does not print exactly); write it as a string")
        rows.append(dict(problem=str(item["problem"]), answer=item["answer"], solution=item.get("solution") or None))
    if not rows:
        fail(f"{path}: no problems in the file")
    return rows


def rewardable(answer):
    """Whether a response can earn the maximum reward on this answer: the reference itself, boxed as GEC
    writes it, must match it (a whitespace-only answer or a float such as 1e16 that does not print back
    to itself never does)."""
    return reward(f"\\boxed{{{reference_answer_text(answer)}}}", answer) == MAX_REWARD


def plain_value_problem(value, lists=False):
    """What is wrong with a field's value, or None: text and finite numbers are fine (and, for an
    answer, a list of them); an object, a nested list, NaN or true/false would be graded as their repr."""
    if isinstance(value, list) and lists:
        return next((f"a list holding {p}" for p in map(plain_value_problem, value) if p), None)
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ("an object" if isinstance(value, dict) else "a list" if isinstance(value, list)
                else type(value).__name__)
    return None if math.isfinite(value) else f"{value} (not a number)"


# -----------------------------------------------------------------------------
# The paper's data, fetched once

AUTHORS_COMMIT = "f82a2e429afcedf04ba9800619cf2bc00882e147"  # ZhangXJ199/EDGE-GRPO, where the training set was added
AUTHORS_RAW = f"https://raw.githubusercontent.com/ZhangXJ199/EDGE-GRPO/{AUTHORS_COMMIT}/"
SUITE_RAW = "https://raw.githubusercontent.com/sail-sg/understand-r1-zero/main/datasets/evaluation_suite/"
# name -> where it comes from, its format there, the rows it must have, and (when the source is pinned)
# the SHA-256 of the downloaded bytes. The evaluation suite's files are not pinned to a commit, so only
# their rows and fields are checked.
PAPER_DATA = {
    "deepscaler_hard-1k": dict(url=AUTHORS_RAW + "train_data/deepscaler_hard-1k.json", format="json", rows=1000,
                               sha256="623f45f2ae16ac60ffd5282406fb785c6d4e4c9844aa059c47e142fa5368aa48"),
    "aime24": dict(url=SUITE_RAW + "aime/data-00000-of-00001.arrow", format="arrow", rows=30, sha256=None),
    "amc": dict(url=SUITE_RAW + "amc/data-00000-of-00001.arrow", format="arrow", rows=83, sha256=None),
    "math500": dict(url=SUITE_RAW + "math/data-00000-of-00001.arrow", format="arrow", rows=500, sha256=None),
    "minerva": dict(url=SUITE_RAW + "minerva/data-00000-of-00001.arrow", format="arrow", rows=272, sha256=None),
    "olympiadbench": dict(url=SUITE_RAW + "olympiad_bench/data-00000-of-00001.arrow", format="arrow", rows=675,
                          sha256=None),
}
EVAL_SETS = ("aime24", "amc", "math500", "minerva", "olympiadbench")  # the paper's table, in its order
DOWNLOAD_TIMEOUT = 60  # seconds without an answer before a download is given up


def cache_dir():
    """$EDGE_GRPO_CACHE, else $XDG_CACHE_HOME/edge-grpo, else ~/.cache/edge-grpo (the XDG convention
    Hugging Face's cache follows too)."""
    if os.environ.get("EDGE_GRPO_CACHE"):
        return Path(os.environ["EDGE_GRPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-grpo"


def fetch_paper_data(name, spec=None, cache=None):
    """The local JSON/JSONL file of PAPER_DATA[name] (spec: another entry, for tests), downloaded and
    checked on first use. Nothing is written to the cache unless every check passes."""
    spec = spec or PAPER_DATA[name]
    cache = Path(cache or cache_dir())
    final = cache / (f"{name}.json" if spec["format"] == "json" else f"{name}.jsonl")
    if final.is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {name} from {spec['url']} into {cache}", file=sys.stderr)
    try:
        with urllib.request.urlopen(spec["url"], timeout=DOWNLOAD_TIMEOUT) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        fail(f"could not download {name} from {spec['url']} ({getattr(e, 'reason', e)}). Offline? Download it on a "
             f"machine that is online, then pass --data PATH, or put it at {final}")
    digest = hashlib.sha256(payload).hexdigest()
    if spec["sha256"] and digest != spec["sha256"]:
        fail(f"{name} from {spec['url']}: SHA-256 {digest}, expected {spec['sha256']}: not the published file")
    tmp = final.with_suffix(final.suffix + ".tmp")
    if spec["format"] == "json":
        tmp.write_bytes(payload)
    else:
        rows = arrow_rows(payload, name)
        tmp.write_text("".join(json.dumps(dict(problem=r["problem"], answer=r["answer"])) + "\n" for r in rows))
    try:
        rows = load_problems(tmp)  # fields, with file and line
        if len(rows) != spec["rows"]:
            fail(f"{name} from {spec['url']}: {len(rows)} rows, expected {spec['rows']}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def arrow_rows(payload, name):
    """Rows of an Arrow IPC stream (what `datasets.save_to_disk` writes) as dicts."""
    try:
        import pyarrow
    except ImportError:
        fail(f"{name} is published as an Arrow file; converting it needs pyarrow: pip install pyarrow")
    return pyarrow.ipc.open_stream(payload).read_all().to_pylist()


BUILT_IN = {"arithmetic": arithmetic_problems, "arithmetic-test": arithmetic_test_problems}


def load_data(spec):
    """--data: "arithmetic" (the built-in set), "arithmetic-test" (its held-out split), one of
    PAPER_DATA's names (fetched once) or a path."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]()
    return load_problems(fetch_paper_data(spec) if spec in PAPER_DATA else spec)


def data_name(spec):
    """A short name for tables: the dataset name, or the file's stem."""
    return spec if spec in PAPER_DATA or spec in BUILT_IN else Path(spec).stem


# -----------------------------------------------------------------------------
# Data order


def prompt_order(n, epoch, seed):
    """The data order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the
    same prompts as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def next_prompts(rows, position, count, seed):
    """count rows starting at global position (epochs wrap around). Returns rows, new position."""
    out = []
    for k in range(position, position + count):
        epoch, index = divmod(k, len(rows))
        out.append(rows[prompt_order(len(rows), epoch, seed)[index]])
    return out, position + count


if __name__ == "__main__":
    for dataset in PAPER_DATA:
        print(f"{dataset:>20}: {fetch_paper_data(dataset)}")
