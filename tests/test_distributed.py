"""distributed.py under torchrun on CPU (gloo, 2 processes): the same update as one process on the
same prompts, for each loss aggregation with GEC and EDA on, data parallel and sharded (--fsdp, FSDP2),
and with DAPO's dynamic sampling;
resume on 2 ranks equals an uninterrupted run, both ways; a rank that dies ends the run with an error
instead of a hang. Each launch uses torchrun's
--standalone rendezvous (a free port of its own), so parallel launches cannot collide.
Run: python -m pytest tests/test_distributed.py"""

import importlib.util
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
from tests.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
LAYOUTS = {"ddp": [], "fsdp": ["--fsdp"]}  # data parallel (the whole state on every rank) and FSDP2 (sharded)
DYNAMIC = ["--dynamic-sampling", "--num-generations", "2"]  # G = 2: steps 3 and 4 drop a group and draw one prompt
FSDP_PATHS = {"plain": ["--no-fast"], "checkpointing": ["--gradient-checkpointing"],  # the other forward paths
              "old-logprobs": ["--num-iterations", "2"]}  # and a no-grad pass (gathered) before the update


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
    configs = [[str(tmp / f"two-{layout}-{loss}"), common(data, "--max-steps", "2", "--loss-type", loss, *flags)]
               for layout, flags in LAYOUTS.items() for loss in LOSS_TYPES]
    configs.append([str(tmp / "two-fsdp-bf16"), common(data, "--max-steps", "2", "--dtype", "bfloat16", "--fsdp")])
    configs.append([str(tmp / "two-dynamic"), common(data, "--max-steps", "4", *DYNAMIC)])
    for name, flags in FSDP_PATHS.items():
        configs.append([str(tmp / f"two-fsdp-{name}"), common(data, "--max-steps", "2", "--fsdp", *flags)])
    # resume: beta 0, since a resumed run reloads its reference with --model, which a tiny model built in code has not
    for layout, flags in LAYOUTS.items():
        configs += [[str(tmp / f"straight-{layout}"), common(data, "--max-steps", "4", "--beta", "0", *flags)],
                    [str(tmp / f"first-half-{layout}"), common(data, "--max-steps", "2", "--beta", "0", *flags)],
                    [str(tmp / f"resumed-{layout}"),
                     ["--resume", str(tmp / f"first-half-{layout}" / "checkpoint-2"), "--max-steps", "4", *flags]]]
    # a checkpoint holds the single-process layout: data parallel's resumes sharded
    configs.append([str(tmp / "resumed-ddp-as-fsdp"),
                    ["--resume", str(tmp / "first-half-ddp" / "checkpoint-2"), "--max-steps", "4", "--fsdp"]])
    if importlib.util.find_spec("tensorboard"):  # a tracker: rank 0 writes it, once per step
        configs.append([str(tmp / "two-tensorboard"), common(data, "--max-steps", "2", "--report-to", "tensorboard")])
    start = time.perf_counter()
    result = torchrun(configs)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, data, time.perf_counter() - start


def weights(directory, step):
    return load_file(Path(directory) / f"checkpoint-{step}" / "model.safetensors")


def metrics(directory):
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def one_process(tmp, data, name, *flags, steps=2):
    """The same run in this process (once per name)."""
    if not (tmp / name / f"checkpoint-{steps}").exists():
        tok = tiny_tokenizer()
        eg.train(args_for(tmp / name, *common(data, "--max-steps", str(steps), *flags)), model=tiny_model(tok),
                 tokenizer=tok, progress=False)
    return weights(tmp / name, steps)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_ranks_give_the_weights_of_one_process(launched, loss_type, layout):
    """Two steps on 2 ranks (one prompt's group each) and in one process on the same 2 prompts: the
    same samples, rewards and GEC actions, and weights equal to 1e-6 relative (the ranks' gradients
    are summed in another order than one process sums its micro-batches), data parallel or sharded."""
    tmp, data, _ = launched
    one = one_process(tmp, data, f"one-{loss_type}", "--loss-type", loss_type)
    two = weights(tmp / f"two-{layout}-{loss_type}", 2)
    initial = tiny_model(tiny_tokenizer()).state_dict()
    assert any(not torch.equal(one[k], initial[k]) for k in one)  # the steps did move the weights
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-6, atol=1e-7), (k, (two[k] - one[k]).abs().max())
    m1, m2 = metrics(tmp / f"one-{loss_type}"), metrics(tmp / f"two-{layout}-{loss_type}")
    for a, b in zip(m1, m2):
        assert a["gec_actions"] == b["gec_actions"] and a["reward"] == b["reward"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # FSDP's gradients summed, not averaged
    # rank 0 wrote one of each
    assert len(m2) == 2 and not list((tmp / f"two-{layout}-{loss_type}").glob("checkpoint-1"))


def test_dynamic_sampling_on_two_ranks_keeps_the_groups_of_one_process(launched):
    """--dynamic-sampling, P = 2, G = 2: where a group collapses, every rank draws the same fresh prompt,
    rank 0 samples it (rank 1's share of one prompt is empty), the ranks exchange their mixed groups and
    each trains on its share: the prompts drawn, the groups trained and the weights of one process."""
    tmp, data, _ = launched
    one = one_process(tmp, data, "one-dynamic", *DYNAMIC, steps=4)
    two = weights(tmp / "two-dynamic", 4)
    m1, m2 = metrics(tmp / "one-dynamic"), metrics(tmp / "two-dynamic")
    assert [m["prompts_drawn"] for m in m1] == [m["prompts_drawn"] for m in m2]
    assert max(m["prompts_drawn"] for m in m1) > 2
    assert [m["groups_trained"] for m in m2] == [2, 2, 2, 2]
    for a, b in zip(m1, m2):
        assert a["reward"] == b["reward"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_same_update(one, two)


def assert_same_update(one, two):
    """Weights equal to 1e-6 and within a 1e-3 part of the update from the initial weights (the ranks'
    smaller batches round some matmuls differently, and Adam magnifies the tiniest gradients)."""
    initial = tiny_model(tiny_tokenizer()).state_dict()
    for k in one:
        assert (two[k] - one[k]).abs().max() <= 1e-3 * (one[k] - initial[k]).abs().max() + 1e-9, k
        assert torch.allclose(two[k], one[k], rtol=1e-6, atol=1e-6), (k, (two[k] - one[k]).abs().max())


@pytest.mark.parametrize("path", FSDP_PATHS)
def test_fsdp_on_every_path(launched, path):
    """Under --fsdp: --no-fast (the stock forward and LM head, through as_forward), --gradient-checkpointing,
    and --num-iterations 2 (old log-probs from a gathered no-grad pass, then two updates): the weights
    of one process with the same flags."""
    tmp, data, _ = launched
    assert_same_update(one_process(tmp, data, f"one-{path}", *FSDP_PATHS[path]), weights(tmp / f"two-fsdp-{path}", 2))


def test_fsdp_in_bf16_keeps_fp32_master_shards_and_the_one_process_update(launched):
    """--fsdp --dtype bfloat16: the layers compute in bf16 from fp32 shards (the masters), so the
    checkpoint is fp32 and the update is one process's bf16-with-masters update up to bf16 rounding
    (the micro-batches have other shapes, so the rounding differs: direction within 1 %)."""
    tmp, data, _ = launched
    one = one_process(tmp, data, "one-bf16", "--dtype", "bfloat16")
    two = weights(tmp / "two-fsdp-bf16", 2)
    initial = tiny_model(tiny_tokenizer()).state_dict()
    a = torch.cat([(one[k] - initial[k]).flatten() for k in one])
    b = torch.cat([(two[k] - initial[k]).flatten() for k in one])
    assert all(t.dtype == torch.float32 for t in two.values())
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99 and (a - b).norm() < 0.1 * a.norm()
    for x, y in zip(metrics(tmp / "one-bf16"), metrics(tmp / "two-fsdp-bf16")):
        assert x["gec_actions"] == y["gec_actions"] and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_on_two_ranks_equals_an_uninterrupted_run(launched, layout):
    """Resumed from checkpoint-2 (under --fsdp: the shards gathered into one file, then sharded again)."""
    tmp, _, _ = launched
    assert torch.equal(torch.cat([v.flatten() for v in weights(tmp / f"straight-{layout}", 4).values()]),
                       torch.cat([v.flatten() for v in weights(tmp / f"resumed-{layout}", 4).values()]))
    assert [m["step"] for m in metrics(tmp / f"resumed-{layout}")] == [3, 4]


def test_trackers_are_written_by_rank_0_alone(launched):
    """--report-to tensorboard on 2 ranks: one event file (rank 0's), each step's metrics once, the
    values of metrics.jsonl."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard (.ci/run installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import trackers
    tmp, _, _ = launched
    out = tmp / "two-tensorboard"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {m["step"]: trackers.scalars(m) for m in metrics(out)}
    assert sorted(expected) == [1, 2] and set(events.Tags()["scalars"]) == set(expected[1]) | set(expected[2])
    for name in ("loss", "reward", "grad_norm", "gec_actions/answer"):
        assert [(e.step, e.value) for e in events.Scalars(name)] == \
            [(step, pytest.approx(expected[step][name], rel=1e-6)) for step in (1, 2)]


def test_a_checkpoint_resumes_on_any_layout(launched):
    """Saved data parallel, resumed under --fsdp; saved under --fsdp, resumed in one process: the
    weights of the uninterrupted runs (up to their rounding differences)."""
    tmp, _, _ = launched
    assert_same_update(weights(tmp / "straight-fsdp", 4), weights(tmp / "resumed-ddp-as-fsdp", 4))
    args = args_for(tmp / "resumed-fsdp-in-one", "--resume", str(tmp / "first-half-fsdp" / "checkpoint-2"),
                    "--max-steps", "4")
    model, tok = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32, weights=args.resume)
    eg.train(args, model=model, tokenizer=tok, progress=False)
    assert_same_update(weights(tmp / "straight-ddp", 4), weights(tmp / "resumed-fsdp-in-one", 4))


def test_a_rank_that_dies_ends_the_run_with_an_error(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    start = time.perf_counter()
    result = torchrun([[str(tmp_path / "out"),
                        common(data, "--max-steps", "4", "--ddp-timeout", "30") + [{"die_at_step": 1}]]],
                      timeout=120)
    assert result.returncode != 0
    # torchrun names the rank that died and its exit code; the other was stopped (SIGTERM) or failed on its own
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*3", result.stderr), result.stderr[-2000:]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*(-15|1) ", result.stderr), \
        result.stderr[-2000:]
    assert time.perf_counter() - start < 90
