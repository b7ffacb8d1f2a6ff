"""
trackers.py: a run's metrics in TensorBoard or Weights & Biases (--report-to), beside metrics.jsonl.

metrics.jsonl stays the record, written the same way whatever is chosen; a tracker gets each of its
lines as it is written, under the same names (a nested metric as name/key: gec_actions/answer), the
run's flags once, and W&B the logged completions as a table. Only rank 0 reports (torchrun). Both
are optional imports, asked for by name when missing.

A resumed run continues the same tracker run and every step appears once: TensorBoard's events from
the steps the run redoes are purged (SummaryWriter's purge_step); W&B keeps the steps it already
has (a redone step computes the same numbers: the resume tests check it) and gets the new ones.
"""

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path

from errors import fail

TRACKER_DIRS = ("tensorboard", "wandb")  # under OUTPUT_DIR: cleared with the run logs by --overwrite-output-dir
WANDB_STATE = "edge-grpo-run.json"  # OUTPUT_DIR/wandb/: the W&B run's id and the last step it holds
COMPLETION_COLUMNS = ("step", "prompt", "problem", "answer", "gec_action", "sampled", "rewritten", "sampled_reward",
                      "reward", "advantage", "advantage_eda", "entropy")


def require(report_to):
    """Each chosen tracker importable, or one line naming the package to install; before any model loads."""
    for name in report_to:
        if name != "none" and importlib.util.find_spec(name) is None:
            fail(f"--report-to {name}: the {name} package is not installed (pip install {name}); or leave {name} out")


def scalars(metrics, prefix=""):
    """A metrics line as {name: float}: nested dicts flattened to name/key, text and None left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix + key] = float(value)
    return flat


def open_trackers(args, start):
    """The chosen trackers for this run, continuing at step `start` (0: a fresh run). Returns a dict
    name -> handle: a SummaryWriter; for W&B its run and the state file."""
    trackers, output_dir = {}, Path(args.output_dir)
    config = {k: v for k, v in vars(args).items() if k != "changed_flags"}
    if "tensorboard" in args.report_to:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start + 1 if start else None)
        if not start:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        trackers["tensorboard"] = writer
    if "wandb" in args.report_to:
        import wandb
        state_path = output_dir / "wandb" / WANDB_STATE
        state = json.loads(state_path.read_text()) if start and state_path.is_file() else None
        state = state or dict(id=uuid.uuid4().hex[:12], last_step=0)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "edge-grpo"), name=output_dir.resolve().name,
                         dir=str(output_dir), id=state["id"], resume="allow", config=config)
        trackers["wandb"] = dict(run=run, state=state, path=state_path)
        state_path.write_text(json.dumps(state))
    return trackers


def log_step(trackers, metrics):
    """One metrics.jsonl line to every tracker, at its step."""
    step, values = metrics["step"], scalars(metrics)
    if "tensorboard" in trackers:
        writer = trackers["tensorboard"]
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        writer.flush()  # a killed run loses no logged step
    if "wandb" in trackers:
        w = trackers["wandb"]
        if step > w["state"]["last_step"]:  # else W&B already holds this step, from before the resume
            w["run"].log(values, step=step)
            w["state"]["last_step"] = step
            w["path"].write_text(json.dumps(w["state"]))
            w["sent_step"] = step  # its completions table goes with it


def log_completions(trackers, step, lines):
    """The step's completions.jsonl rows as a W&B table (TensorBoard: the metrics only)."""
    if "wandb" in trackers and trackers["wandb"].get("sent_step") == step:
        import wandb
        table = wandb.Table(columns=list(COMPLETION_COLUMNS),
                            data=[[line[c] for c in COMPLETION_COLUMNS] for line in lines])
        trackers["wandb"]["run"].log({"completions": table}, step=step)


def close_trackers(trackers):
    if "tensorboard" in trackers:
        trackers["tensorboard"].close()
    if "wandb" in trackers:
        trackers["wandb"]["run"].finish()
