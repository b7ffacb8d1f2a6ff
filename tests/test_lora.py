"""lora.py (--use-peft) on CPU with tiny Llama and Qwen2 models: base weights untouched, the adapted
model's log-probs against a model merged by hand, the KL reference against the base model, the
merged checkpoint through from_pretrained, an adapter-only checkpoint through evaluation's loader,
resume, and the errors. Skipped without peft.
Run: python -m pytest tests/test_lora.py"""

import copy

import pytest
import torch
from safetensors.torch import load_file

import edge_grpo as eg
import lora
from fast import lean_activations, fused_logprobs_and_entropy
from tests.test_edge_grpo import PROBLEMS, args_for, mixed_rollout, write_jsonl
from tests.tiny import qwen_tokenizer, tiny_model, tiny_qwen2, tiny_tokenizer

pytest.importorskip("peft")

ARCHITECTURES = {"llama": (tiny_tokenizer, tiny_model), "qwen2": (qwen_tokenizer, tiny_qwen2)}


def train_lora(tmp_path, arch, *extra, steps="2"):
    """A short --use-peft run (lr 1e-2, so the adapters move visibly). Returns the model, a copy of it
    before training, the tokenizer and the args."""
    make_tokenizer, make_model = ARCHITECTURES[arch]
    tok = make_tokenizer()
    model = make_model(tok)
    base = copy.deepcopy(model)
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    args = args_for(tmp_path / "out", "--data", str(data), "--max-steps", steps, "--use-peft",
                    "--learning-rate", "1e-2", "--lora-target-modules", "q_proj", "v_proj", "down_proj", *extra)
    eg.train(args, model=model, tokenizer=tok, progress=False)
    return model, base, tok, args


def hand_merged(model, base):
    """base with W + (alpha / r) B A written into every adapted layer, by hand from the adapters."""
    merged = copy.deepcopy(base)
    weights = dict(merged.named_parameters())
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A"):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                scale = module.lora_alpha["default"] / module.r["default"]
                weights[f"{name}.weight"] += scale * B @ A
    return merged


def scores(model, rollout):
    return fused_logprobs_and_entropy(model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask,
                                      group_size=rollout.group_size)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_trains_adapters_only_and_matches_a_hand_merged_model(tmp_path, arch):
    """Two steps: every base weight bit-identical, every B moved off its initial 0; the adapted model's
    log-probs and entropies equal those of the base with B A merged by hand (1e-5), and so do those of
    the --save-merged-model checkpoint loaded by from_pretrained."""
    from transformers import AutoModelForCausalLM
    model, base, tok, args = train_lora(tmp_path, arch, "--save-merged-model")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    state = model.state_dict()
    for name, p in base.state_dict().items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight").replace(".bias",
                                                                                               ".base_layer.bias")
        assert torch.equal(state[key], p), name
    assert all(module.lora_B["default"].weight.abs().max() > 0 for module in lora.adapter_layers(model))
    rollout = mixed_rollout(model, tok)
    logp, entropy = scores(model, rollout)
    expected_logp, expected_entropy = scores(lean(hand_merged(model, base)), rollout)
    assert torch.allclose(logp, expected_logp, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/checkpoint-2", dtype=torch.float32)
    assert torch.allclose(scores(saved, rollout)[0], expected_logp, atol=1e-5)


def lean(model):
    lean_activations(model)
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_kl_reference_is_the_base_model(tmp_path, arch):
    """After training with --beta: pi_ref (the model inside reference_policy) gives exactly the base
    model's log-probs; outside, the adapted ones, with the adapters trainable again."""
    model, base, tok, args = train_lora(tmp_path, arch, "--beta", "0.1")
    rollout = mixed_rollout(model, tok)
    with torch.no_grad(), eg.reference_policy(model, model):
        reference, _ = scores(model, rollout)
    expected, _ = scores(lean(base), rollout)
    assert torch.allclose(reference, expected, atol=1e-6)
    assert not torch.allclose(scores(model, rollout)[0], expected, atol=1e-3)  # the adapters are on again
    assert all(p.requires_grad == ("lora_" in name) for name, p in model.named_parameters())


def test_lora_resume_equals_an_uninterrupted_run(tmp_path):
    tok = tiny_tokenizer()
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--max-steps", "4", "--use-peft", "--learning-rate", "1e-2", "--beta", "0.1"]
    eg.train(args_for(tmp_path / "a", *common), model=tiny_model(tok), tokenizer=tok, progress=False)
    eg.train(args_for(tmp_path / "b", *common, "--save-steps", "2"), model=tiny_model(tok), tokenizer=tok,
             progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-2"), "--output-dir", str(tmp_path / "c")])
    assert resume_args.use_peft
    eg.train(resume_args, model=tiny_model(tok), tokenizer=tok, progress=False)  # the base model, as --model loads it
    straight, resumed, start = (load_file(f"{tmp_path}/{d}/adapter/adapter_model.safetensors")
                                for d in ("a/checkpoint-4", "c/checkpoint-4", "b/checkpoint-2"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(straight[k], start[k]) for k in straight)


def test_an_adapter_checkpoint_loads_as_the_merged_model(tmp_path):
    """Without --save-merged-model a checkpoint holds the adapter only; load_model_and_tokenizer (what
    evaluation and --model use) rebuilds the base from run_config.json's --model and merges it in."""
    tok = tiny_tokenizer()
    base_dir = tmp_path / "base"
    tiny_model(tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    args = args_for(tmp_path / "out", "--model", str(base_dir), "--data", str(data), "--max-steps", "2", "--use-peft",
                    "--learning-rate", "1e-2")
    eg.train(args, progress=False)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert lora.is_adapter_checkpoint(checkpoint) and not (checkpoint / "model.safetensors").exists()
    loaded, tokenizer = eg.load_model_and_tokenizer(str(checkpoint), torch.device("cpu"), torch.float32)
    adapted = tiny_model(tok)
    lora.add_adapters(adapted, args)
    lora.load_adapter(adapted, checkpoint)
    rollout = mixed_rollout(lean(loaded), tok)
    assert torch.allclose(scores(loaded, rollout)[0], scores(lean(hand_merged(adapted, tiny_model(tok))), rollout)[0],
                          atol=1e-5)


def test_lora_errors_name_the_flag(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    args = args_for(tmp_path, "--use-peft", "--lora-target-modules", "q_proj", "lm_head")
    with pytest.raises(SystemExit, match="lm_head"):
        lora.add_adapters(tiny_model(tok), args)
    with pytest.raises(SystemExit, match="--save-merged-model"):
        args_for(tmp_path, "--save-merged-model")
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(SystemExit, match="--use-peft needs peft: pip install peft"):
        lora.add_adapters(tiny_model(tok), args_for(tmp_path, "--use-peft"))


def test_an_adapted_down_proj_keeps_the_stock_mlp():
    """lean_activations' fused MLP reads down_proj's weight directly: an adapted down_proj must keep
    the stock MLP (which calls the adapter), and an unadapted one is still routed."""
    import peft
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["down_proj"]), model)
    plain = tiny_model(tok)
    assert lean_activations(model) == lean_activations(plain) - len(model.model.layers)
