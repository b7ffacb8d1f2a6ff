"""distributed.py under torchrun on CPU (gloo, 2 processes): the same update as one process on the
same prompts, for each loss aggregation with GEC and EDA on; resume on 2 ranks equals an uninterrupted
run; a rank that dies ends the run with an error instead of a hang. Each launch uses torchrun's
--standalone rendezvous (a free port of its own), so parallel launches cannot collide.
Run: python -m pytest tests/test_distributed.py"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import edge_grpo as eg
from tests.test_edge_grpo import PROBLEMS, args_for, write_jsonl
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def torchrun(configs, timeout=300):
    """tests/dist_worker.py on 2 CPU processes, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "dist_worker.py"), json.dumps(configs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def common(data, *extra):
    # P = 2 prompts (one group per rank), G = 4, micro-batches of 4 rows, GEC and EDA on (the defaults), beta 0.1
    return ["--data", str(data), "--prompts-per-step", "2", "--micro-batch-size", "4", "--beta", "0.1",
            "--lr-scheduler-type", "constant", *extra]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch for every 2-process run of this file (a launch costs seconds)."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(tmp / "data.jsonl", PROBLEMS)
    configs = [[str(tmp / f"two-{loss}"), common(data, "--max-steps", "2", "--loss-type", loss)] for loss in LOSS_TYPES]
    # resume: beta 0, since a resumed run reloads its reference with --model, which a tiny model built in code has not
    configs += [[str(tmp / "straight"), common(data, "--max-steps", "4", "--beta", "0")],
                [str(tmp / "first-half"), common(data, "--max-steps", "2", "--beta", "0")],
                [str(tmp / "resumed"), ["--resume", str(tmp / "first-half" / "checkpoint-2"), "--max-steps", "4"]]]
    start = time.perf_counter()
    result = torchrun(configs)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, data, time.perf_counter() - start


def weights(directory, step):
    return load_file(Path(directory) / f"checkpoint-{step}" / "model.safetensors")


def metrics(directory):
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_ranks_give_the_weights_of_one_process(launched, loss_type):
    """Two steps on 2 ranks (one prompt's group each) and in one process on the same 2 prompts: the
    same samples, rewards and GEC actions, and weights equal to 1e-6 relative (the ranks' gradients
    are summed in another order than one process sums its micro-batches)."""
    tmp, data, _ = launched
    tok = __import__("tests.tiny", fromlist=["tiny_tokenizer"]).tiny_tokenizer()
    args = args_for(tmp / f"one-{loss_type}", *common(data, "--max-steps", "2", "--loss-type", loss_type))
    eg.train(args, model=tiny_model(tok), tokenizer=tok, progress=False)
    one, two = weights(tmp / f"one-{loss_type}", 2), weights(tmp / f"two-{loss_type}", 2)
    initial = tiny_model(tok).state_dict()
    assert any(not torch.equal(one[k], initial[k]) for k in one)  # the steps did move the weights
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-6, atol=1e-7), (k, (two[k] - one[k]).abs().max())
    m1, m2 = metrics(tmp / f"one-{loss_type}"), metrics(tmp / f"two-{loss_type}")
    for a, b in zip(m1, m2):
        assert a["gec_actions"] == b["gec_actions"] and a["reward"] == b["reward"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert len(m2) == 2 and not list((tmp / f"two-{loss_type}").glob("checkpoint-1"))  # rank 0 wrote one of each


def test_resume_on_two_ranks_equals_an_uninterrupted_run(launched):
    tmp, _, seconds = launched
    assert torch.equal(torch.cat([v.flatten() for v in weights(tmp / "straight", 4).values()]),
                       torch.cat([v.flatten() for v in weights(tmp / "resumed", 4).values()]))
    assert [m["step"] for m in metrics(tmp / "resumed")] == [3, 4]
    assert seconds < 120, seconds  # the launch stays cheap enough for CI


def test_a_rank_that_dies_ends_the_run_with_an_error(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    start = time.perf_counter()
    result = torchrun([[str(tmp_path / "out"), common(data, "--max-steps", "4", "--ddp-timeout", "30") + [{"die_at_step": 1}]]],
                      timeout=120)
    assert result.returncode != 0
    # torchrun names the rank that died and its exit code; the other was stopped (SIGTERM) or failed on its own
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*3", result.stderr), result.stderr[-2000:]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*(-15|1) ", result.stderr), result.stderr[-2000:]
    assert time.perf_counter() - start < 90
