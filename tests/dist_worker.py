"""Run by tests/test_distributed.py under torchrun (one process per rank): EDGE-GRPO runs of the tiny
model, one after another, each given as [output_dir, [flags...]] in the JSON list argv[1]. A flag
list may end with {"die_at_step": k}: rank 1 then exits abruptly at that step."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import edge_grpo as eg  # noqa: E402
from tests.test_edge_grpo import args_for  # noqa: E402
from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402


def run(output_dir, flags):
    die_at = flags.pop()["die_at_step"] if flags and isinstance(flags[-1], dict) else None
    if die_at is not None and int(os.environ["RANK"]) == 1:
        step_once = eg.train_step

        def dying_step(*a, **k):
            if a[6] == die_at:  # train_step's step argument
                os._exit(3)
            return step_once(*a, **k)
        eg.train_step = dying_step
    tok = tiny_tokenizer()
    args = args_for(output_dir, *flags)
    if args.resume:
        model, tok = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32, weights=args.resume)
    else:
        model = tiny_model(tok)  # seeded: the same weights on every rank
    eg.train(args, model=model, tokenizer=tok, progress=False)


if __name__ == "__main__":
    for output_dir, flags in json.loads(sys.argv[1]):
        run(output_dir, flags)
    eg.distributed.barrier()  # as edge_grpo.main: no rank still in a collective when the group goes
    eg.distributed.teardown()
