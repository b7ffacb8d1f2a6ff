"""
lora.py: LoRA (Hu et al., 2021) through peft, for GPUs too small for the full fine-tune.

Each adapted linear layer computes W x + (alpha / r) B A x with W frozen and only A (r, in) and
B (out, r) trained; B starts at 0, so step 0 is the base model exactly. What it changes:
- the update: only the adapters learn, a rank-r change per layer. This is not the paper's full
  fine-tune (its numbers were measured with every weight trained); say so when you compare;
- the KL reference (--beta > 0) is the same model with its adapters switched off: no second copy;
- memory: the frozen weights cost 2 bytes each in bf16; masters, gradients and AdamW moments exist
  for the adapters only (precision.memory_plan);
- checkpoints hold the adapter (checkpoint-N/adapter/, the layout peft's PeftModel.from_pretrained
  reads) and, with --save-merged-model, the merged model that from_pretrained loads on its own.
Our speed machinery keeps working, with two exceptions checked here: the LM head and the
embedding are read as plain weights by fast.py's fused functions, so they cannot be adapted; an
MLP whose down_proj is adapted falls back to the stock MLP (fast.lean_activations).

peft is imported only when --use-peft is given.
"""

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from errors import require

ADAPTER_DIR = "adapter"          # checkpoint-N/adapter: adapter_config.json + adapter_model.safetensors
NOT_ADAPTABLE = ("lm_head", "embed_tokens")  # read as plain weights by the fused LM head and embedding


def lora_config(args):
    """peft's LoraConfig from TRL's flag names. No target modules: peft's default for the family
    (q_proj and v_proj for Llama and Qwen2); "all-linear": every linear layer but the LM head."""
    peft = require("peft", "--use-peft")
    targets = args.lora_target_modules
    if targets and any(name in NOT_ADAPTABLE for name in targets):
        from errors import fail
        fail(f"--lora-target-modules {' '.join(targets)}: {' and '.join(NOT_ADAPTABLE)} cannot be adapted here "
             "(the fused LM head and embedding read their weights directly)")
    if targets == ["all-linear"]:
        targets = "all-linear"
    return peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=targets, bias="none", task_type="CAUSAL_LM")


def add_adapters(model, args):
    """Injects LoRA adapters into the model in place (base weights frozen, adapters trainable, in
    fp32) and returns how many parameters train."""
    peft = require("peft", "--use-peft")
    peft.inject_adapter_in_model(lora_config(args), model)
    model.peft_config["default"].base_model_name_or_path = model.config.name_or_path
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]


@contextmanager
def adapters_disabled(model):
    """The base model, for the KL reference: every adapter off inside the block."""
    layers = adapter_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p in trainable:  # enable_adapters(False) froze them; keep exactly what trained before
            p.requires_grad_(True)


def adapter_state_dict(model, master_weights=None):
    """The adapters' weights as peft saves them (fp32 masters under mixed precision)."""
    peft = require("peft", "--use-peft")
    from precision import master_state_dict
    return peft.get_peft_model_state_dict(model, state_dict=master_state_dict(model, master_weights),
                                          save_embedding_layers=False)  # (no hub lookup)


def save_adapter(model, directory, master_weights=None):
    """checkpoint-N/adapter: what PeftModel.from_pretrained(base, directory) loads."""
    from safetensors.torch import save_file
    directory = Path(directory) / ADAPTER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter_state_dict(model, master_weights).items()}
    save_file(state, directory / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(directory)


def load_adapter(model, checkpoint):
    """Loads checkpoint/adapter's weights into a model that add_adapters prepared the same way."""
    peft = require("peft", "--use-peft")
    from safetensors.torch import load_file
    state = load_file(Path(checkpoint) / ADAPTER_DIR / "adapter_model.safetensors")
    result = peft.set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{checkpoint}/{ADAPTER_DIR}: no weights for {missing[:3]} (a different "
                         f"--lora-target-modules?)")


def merged_state_dict(model, master_weights=None):
    """The state dict of the plain model with every adapter merged in: W + (alpha / r) B A, computed
    in fp32 from the masters and rounded once to W's dtype. Keys are the base model's own."""
    from precision import master_state_dict
    state = master_state_dict(model, master_weights)
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    adapted = {id(layer) for layer in adapter_layers(model)}
    for name, layer in model.named_modules():
        if id(layer) in adapted:
            A, B = state[f"{name}.lora_A.default.weight"].float(), state[f"{name}.lora_B.default.weight"].float()
            W = merged[f"{name}.weight"]
            merged[f"{name}.weight"] = (W.float() + layer.scaling["default"] * (B @ A)).to(W.dtype)
    return merged


def is_adapter_checkpoint(path):
    """A LoRA checkpoint saved without --save-merged-model: an adapter and no model weights."""
    return (Path(path) / ADAPTER_DIR).is_dir() and not (Path(path) / "config.json").is_file()


def base_model_of(checkpoint):
    """The --model a LoRA checkpoint's run started from (its run_config.json)."""
    return json.loads((Path(checkpoint) / "run_config.json").read_text())["model"]


@torch.no_grad()
def load_merged(checkpoint, base):
    """base: the plain model the run started from. Returns it with the checkpoint's adapter merged in
    (what analysis.py evaluates when a LoRA checkpoint has no merged model)."""
    peft = require("peft", "a LoRA checkpoint")
    adapted = copy.deepcopy(base)
    peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(Path(checkpoint) / ADAPTER_DIR), adapted)
    load_adapter(adapted, checkpoint)
    base.load_state_dict(merged_state_dict(adapted))
    return base
