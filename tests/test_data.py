"""data.py: the built-in set, problem files with bad rows named, the paper's data fetched offline
(a file URL), and the data order. Run: python -m pytest tests/test_data.py"""

import hashlib
import json
from pathlib import Path

import pytest

import data
from reward import reward

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # the paper's data, beside the checkout on CI


@pytest.mark.parametrize("content, message", [
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"\n', "data.jsonl:2: not valid JSON"),
    ('{"problem": "a", "answer": "1"}\n\n{"problem": "b"}\n', "data.jsonl:3: missing 'answer'"),
    ('{"answer": "1"}\n', "data.jsonl:1: missing 'problem'"),
    ('[{"problem": "a", "answer": "1"}, 5]', "item 1: expected an object"),
    ('[{"problem": "a", "answer": "1"},\n {"problem": }]', "data.jsonl:2: not valid JSON"),
    ("", "the file is empty"),
    ("[]", "no problems"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        data.load_problems(path)
    assert message in str(e.value)



def test_builtin_problems_have_correct_boxed_solutions():
    rows = data.arithmetic_problems()
    assert len(rows) == 500 and all(reward(r["solution"], r["answer"]) == 2.0 for r in rows)


def test_data_order_is_a_fixed_permutation_per_epoch():
    rows = list(range(5))
    first, position = data.next_prompts(rows, 0, 5, seed=3)
    again, _ = data.next_prompts(rows, 0, 5, seed=3)
    second, _ = data.next_prompts(rows, position, 5, seed=3)
    assert sorted(first) == rows and first == again and sorted(second) == rows



# ----------------------------------------------------------------------------- the paper's data, fetched once

def spec_for(tmp_path, items, **extra):
    """A PAPER_DATA-like entry for a small JSON file served from a file:// URL (the real code path: urllib)."""
    source = tmp_path / "source.json"
    source.write_text(json.dumps(items))
    payload = source.read_bytes()
    spec = dict(url=source.as_uri(), format="json", rows=len(items), sha256=hashlib.sha256(payload).hexdigest())
    spec.update(extra)
    return spec


ROWS = [dict(problem="1+1?", answer="2", solution="\\boxed{2}"), dict(problem="2+3?", answer="5", solution=None)]


def test_fetch_downloads_once_checks_and_caches(tmp_path):
    spec = spec_for(tmp_path, ROWS)
    path = data.fetch_paper_data("toy", spec=spec, cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "toy.json" and data.load_problems(path)[1]["answer"] == "5"
    (tmp_path / "source.json").unlink()  # offline now: the cached copy serves
    assert data.fetch_paper_data("toy", spec=spec, cache=tmp_path / "cache") == path


@pytest.mark.parametrize("change, message", [
    (dict(sha256="0" * 64), "SHA-256"),
    (dict(rows=3), "2 rows, expected 3"),
    (dict(url="file:///nonexistent/deepscaler.json"), "could not download toy"),
])
def test_fetch_refuses_a_wrong_or_missing_file_and_caches_nothing(tmp_path, change, message):
    spec = spec_for(tmp_path, ROWS, **change)
    with pytest.raises(SystemExit, match=message):
        data.fetch_paper_data("toy", spec=spec, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


def test_fetch_names_the_bad_field(tmp_path):
    spec = spec_for(tmp_path, [dict(problem="1+1?")])
    with pytest.raises(SystemExit, match="item 0: missing 'answer'"):
        data.fetch_paper_data("toy", spec=spec, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


@pytest.mark.skipif(not (SHARED / "train" / "deepscaler_hard-1k.json").is_file(),
                    reason="the paper's data is not beside the checkout")
def test_the_pinned_training_set_checks_out(tmp_path):
    """The real entry (URL swapped for a local copy of the published file): 1000 rows, the pinned SHA-256."""
    spec = dict(data.PAPER_DATA["deepscaler_hard-1k"], url=(SHARED / "train" / "deepscaler_hard-1k.json").as_uri())
    rows = data.load_problems(data.fetch_paper_data("deepscaler_hard-1k", spec=spec, cache=tmp_path))
    assert len(rows) == 1000 and all(r["solution"] for r in rows)


def test_arrow_sources_are_converted_to_jsonl(tmp_path):
    """The evaluation suite's format: an Arrow stream as datasets.save_to_disk writes it."""
    pyarrow = pytest.importorskip("pyarrow")
    table = pyarrow.table({"problem": ["1+1?", "What is 0.5 + 0.5?"], "answer": ["2", "1"], "extra": [1, 2]})
    source = tmp_path / "data-00000-of-00001.arrow"
    with pyarrow.ipc.new_stream(str(source), table.schema) as writer:
        writer.write_table(table)
    spec = dict(url=source.as_uri(), format="arrow", rows=2, sha256=None)
    path = data.fetch_paper_data("toy_eval", spec=spec, cache=tmp_path / "cache")
    assert path.suffix == ".jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        dict(problem="1+1?", answer="2"), dict(problem="What is 0.5 + 0.5?", answer="1")]


def test_data_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_GRPO_CACHE", str(tmp_path))
    (tmp_path / "aime24.jsonl").write_text(json.dumps(dict(problem="p", answer="1")) + "\n")  # as if fetched before
    assert data.load_data("aime24") == [dict(problem="p", answer="1", solution=None)]
    assert data.data_name("aime24") == "aime24" and data.data_name("some/dir/mine.jsonl") == "mine"
    assert data.load_data("arithmetic") == data.arithmetic_problems()
    with pytest.raises(SystemExit, match="no such file"):
        data.load_data(str(tmp_path / "missing.jsonl"))
