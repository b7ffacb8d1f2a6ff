"""precision.py and the bf16 path, on CPU: fp32 masters that move by lr where bf16 weights cannot, an
update equal to fp32 AdamW on the same gradients, resume, the LM head's and the embedding's numerics
against float64, the memory plan; and the Qwen2 architecture (biases, tied and untied heads, its
tokenizer's two end tokens) through scoring, the lean routing and a whole bf16 training step.
Run: python -m pytest tests/test_precision.py"""

import copy
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

import edge_grpo as eg
from optim import build_optimizer
import precision
from rollout import build_prompt
from tests.test_edge_grpo import PROBLEMS, args_for, write_jsonl
from tests.tiny import tiny_model, tiny_qwen2

LR = 1e-6  # the paper's learning rate


def train_bf16(tmp_path, tok, *extra, model=None, steps="1"):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    args = args_for(tmp_path / "out", "--data", str(data), "--max-steps", steps, "--dtype", "bfloat16",
                    "--learning-rate", str(LR), "--lr-scheduler-type", "constant", *extra)
    model = model or tiny_model(tok)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    history = eg.train(args, model=model, tokenizer=tok, progress=False)
    return model, initial, history, args


def test_masters_move_by_lr_where_bf16_weights_cannot(tok, tmp_path):
    """One step at lr 1e-6 with --dtype bfloat16: the fp32 masters (saved as the checkpoint's weights)
    move, each by about lr (Adam's first step is lr x sign(g)); the bf16 weights are the rounded
    masters and, at |w| ~ 0.02 where bf16's spacing is ~1e-4, almost none of them moves. Fails with
    pure-bf16 AdamW, where the checkpoint would hold those bf16 weights."""
    model, initial, history, args = train_bf16(tmp_path, tok)
    assert history[0]["zero_std_after_gec"] < 1  # a step with a gradient
    saved = load_file(f"{args.output_dir}/checkpoint-1/model.safetensors")
    layers = [k for k in saved if ".layers." in k and k.endswith("proj.weight")]  # every element gets a gradient
    moved = [(saved[k] != initial[k]).float().mean().item() for k in layers]
    assert all(saved[k].dtype == torch.float32 for k in saved)
    assert min(moved) > 0.9, moved
    step = torch.cat([(saved[k] - initial[k]).abs().flatten() for k in layers])
    assert step[step > 0].median().item() == pytest.approx(LR, rel=0.05)
    compute = dict(model.named_parameters())
    assert all(torch.equal(compute[k], saved[k].to(torch.bfloat16)) for k in layers)  # bf16 = rounded masters
    bf16_moved = sum((compute[k] != initial[k].to(torch.bfloat16)).float().sum().item() for k in layers)
    assert bf16_moved / sum(compute[k].numel() for k in layers) < 0.05


def test_a_mixed_update_equals_fp32_adamw_on_the_same_gradients(tok):
    """Hand-set bf16 gradients of two micro-batches: the masters step exactly as an fp32 model with
    torch's AdamW given the same (fp32-summed) gradients; the bf16 weights are their rounding."""
    args = eg.parse_args(["--learning-rate", "1e-3", "--weight-decay", "0.1"])
    reference = tiny_model(tok)
    model = copy.deepcopy(reference)
    master_weights = precision.split_master_weights(model, torch.bfloat16)
    optimizer = eg.make_optimizer(model, args, torch.device("cpu"), master_weights)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        sums = [torch.zeros_like(p) for p in reference.parameters()]
        for _ in range(2):  # micro-batches
            for p, total in zip(model.parameters(), sums):
                g = (torch.randn(p.shape, generator=generator) * 1e-2).to(torch.bfloat16)
                p.grad.copy_(g)
                total += g.float()
            master_weights.accumulate_gradients()
        for p, total in zip(reference.parameters(), sums):
            p.grad = total
        optimizer.step()
        master_weights.copy_to_model()
        optimizer.zero_grad(set_to_none=False)
        plain.step()
    for p, m, ref in zip(model.parameters(), master_weights.masters, reference.parameters()):
        assert torch.allclose(m, ref, rtol=0, atol=1e-7)
        assert torch.equal(p, m.to(torch.bfloat16))


def test_mixed_precision_resume_equals_an_uninterrupted_run(tok, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--max-steps", "4", "--dtype", "bfloat16", "--learning-rate", "1e-3"]
    eg.train(args_for(tmp_path / "a", *common), model=tiny_model(tok), tokenizer=tok, progress=False)
    eg.train(args_for(tmp_path / "b", *common, "--save-steps", "2"), model=tiny_model(tok), tokenizer=tok,
             progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-2"), "--output-dir", str(tmp_path / "c")])
    assert resume_args.dtype == "bfloat16"
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                   weights=resume_args.resume)
    eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    straight, resumed = (load_file(f"{tmp_path}/{d}/checkpoint-4/model.safetensors") for d in ("a", "c"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_memory_plan_arithmetic():
    """Qwen2.5-Math-1.5B's shapes: 1.54 B parameters (its model card: 1.54 B); mixed precision holds
    20 bytes per parameter of training state."""
    from transformers import Qwen2Config
    config = Qwen2Config(**precision.QWEN_MATH_SHAPES["qwen2.5-math-1.5b"])
    n = precision.parameter_count(config)
    assert n == pytest.approx(1.54e9, rel=0.005)
    seven_b = Qwen2Config(**precision.QWEN_MATH_SHAPES["qwen2.5-math-7b"])
    assert precision.parameter_count(seven_b) == pytest.approx(7.62e9, rel=0.005)
    plan = precision.memory_plan(config, dtype=torch.bfloat16, beta=0.0, rows=8, group_size=8,
                                 prompt_tokens=512, completion_tokens=1280, micro_batch_rows=8)
    state = sum(plan[k] for k in ("weights", "master weights (fp32)", "gradients", "AdamW moments"))
    assert state == 20 * n and plan["reference model (--beta)"] == 0
    # rows x tokens x (K, V) x layers x kv heads x dim x 2 B
    assert plan["KV cache of one rollout"] == 8 * 1792 * 2 * 28 * 2 * 128 * 2
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    # one prompt per group
    assert plan["activations of one micro-batch"] == (512 + 8 * 1280) * 28 * (10 * 1536 + 2 * 8960) * 2


# ----------------------------------------------------------------------------- the Qwen2 architecture

def test_qwen_prompt_is_the_authors(qtok):
    """Qwen2.5-Math gets the bare problem; its template's default system prompt asks for \\boxed{}."""
    prompt = build_prompt(qtok, "2+2?", eg.prompt_format_of("qwen2.5-math-1.5b"))
    assert prompt == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                      "\\boxed{}.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("tied", [True, False])
def test_a_bf16_training_step_on_qwen2_with_gec_and_eda(qtok, tmp_path, tied):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    args = args_for(tmp_path / "out", "--data", str(data), "--max-steps", "2", "--dtype", "bfloat16",
                    "--prompt-format", "bare")
    model = tiny_qwen2(qtok, tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = eg.train(args, model=model, tokenizer=qtok, progress=False)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["entropy"]) for m in history)
    assert any(m["zero_std_after_gec"] < 1 for m in history) and history[0]["gec_actions"]["reflection"] >= 0
    assert next(model.parameters()).dtype == torch.bfloat16
    saved = load_file(f"{args.output_dir}/checkpoint-2/model.safetensors")
    assert any(not torch.equal(saved[k], before[k]) for k in saved if "bias" in k)  # the biases train too
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "run_config.json").read_text())["dtype"] == "bfloat16"


# -----------------------------------------------------------------------------
# --optim: torchao's 8-bit AdamW, with and without stochastic rounding (skipped without torchao)


def regression(optim, dtype, steps=150, lr=1e-2):
    """A least-squares toy: W (128, 64), 8192 values, so torchao quantizes its moments (>= 4096).
    Returns the trained W in fp32."""
    torch.manual_seed(0)
    X, target = torch.randn(256, 64), torch.randn(128, 64) * 0.1
    w = torch.nn.Parameter((torch.randn(128, 64) * 0.02).to(dtype))
    optimizer = build_optimizer([w], optim, lr, 0.0, torch.device("cpu"))
    for _ in range(steps):
        ((X.to(dtype) @ w.t()).float() - X @ target.t()).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return w.detach().float()


def test_8bit_optimizers_train_a_toy_objective_to_the_fp32_adamw_result():
    """150 steps of each --optim on the same objective, against torch's fp32 AdamW: 8-bit moments
    land within 1e-3 (relative, measured 1.6e-4), bf16 weights with stochastic rounding within 1e-2
    (measured 4.7e-3: bf16 keeps 8 bits, 2^-8 = 3.9e-3)."""
    pytest.importorskip("torchao")
    reference = regression("adamw_torch_fused", torch.float32)
    for optim, dtype, tolerance in (("adamw_torch_8bit", torch.float32, 1e-3),
                                    ("adamw_torch_8bit_sr", torch.bfloat16, 1e-2)):
        w = regression(optim, dtype)
        assert ((w - reference).norm() / reference.norm()).item() < tolerance, optim


def test_stochastic_rounding_moves_bf16_weights_by_lr_on_average():
    """8192 weights at 0.02 (bf16's spacing there: 1.2e-4), a gradient of constant sign, lr 1e-6: each
    Adam step asks for a move of ~lr, 1 % of the spacing. 200 steps of torchao's 8-bit AdamW on fp32
    weights move them by 0.905 x 200 x lr (its 8-bit moments' own error on this toy: within 15 % of
    200 lr); on bf16 weights with stochastic rounding by the same amount on average (within 2 %; the
    rounding noise of the mean is ~0.4 %). Rounded to nearest, torch's bf16 AdamW and torchao's
    without stochastic rounding leave every weight where it was."""
    pytest.importorskip("torchao")
    steps = 200

    def mean_move(optim, dtype):
        w = torch.nn.Parameter(torch.full((128, 64), 0.02, dtype=dtype))
        if optim == "torch":
            optimizer = torch.optim.AdamW([w], lr=LR, weight_decay=0.0)
        else:
            optimizer = build_optimizer([w], optim, LR, 0.0, torch.device("cpu"))
        for _ in range(steps):
            w.grad = torch.ones_like(w)
            optimizer.step()
        return (torch.tensor(0.02, dtype=dtype).double() - w.detach().double()).mean().item()

    exact = mean_move("adamw_torch_8bit", torch.float32)
    assert exact == pytest.approx(steps * LR, rel=0.15)
    assert mean_move("adamw_torch_8bit_sr", torch.bfloat16) == pytest.approx(exact, rel=0.02)
    assert mean_move("torch", torch.bfloat16) == 0
    assert mean_move("adamw_torch_8bit", torch.bfloat16) == 0


@pytest.mark.parametrize("optim", ["adamw_torch_8bit", "adamw_torch_8bit_sr"])
def test_8bit_resume_equals_an_uninterrupted_run(tok, tmp_path, optim):
    """4 steps straight, or 2, a checkpoint (8-bit moments, RNG state for the stochastic rounding)
    and 2 more: the same weights, bit for bit. hidden 64: the embedding and MLP weights have
    >= 4096 values, so their moments are 8-bit."""
    pytest.importorskip("torchao")
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--max-steps", "4", "--optim", optim]
    eg.train(args_for(tmp_path / "a", *common), model=tiny_model(tok, hidden=64), tokenizer=tok, progress=False)
    eg.train(args_for(tmp_path / "b", *common, "--save-steps", "2"), model=tiny_model(tok, hidden=64), tokenizer=tok,
             progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-2"), "--output-dir", str(tmp_path / "c")])
    assert resume_args.optim == optim
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                   weights=resume_args.resume)
    eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    straight, resumed, start = (load_file(f"{tmp_path}/{d}/model.safetensors")
                                for d in ("a/checkpoint-4", "c/checkpoint-4", "b/checkpoint-2"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(straight[k], start[k]) for k in straight)  # the last two steps did move the weights
    if optim == "adamw_torch_8bit_sr":
        assert all(v.dtype == torch.bfloat16 for v in straight.values())  # no masters: bf16 weights are the state


def test_an_optional_library_missing_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(SystemExit, match="--optim adamw_torch_8bit needs torchao: pip install torchao"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_torch_8bit", 1e-3, 0.0, torch.device("cpu"))


def test_stochastic_rounding_refuses_fp32():
    with pytest.raises(SystemExit, match="bfloat16"):
        eg.parse_args(["--optim", "adamw_torch_8bit_sr", "--dtype", "float32"])
    assert eg.resolve_dtype("auto", torch.device("cpu"), "adamw_torch_8bit_sr") == torch.bfloat16


def test_the_memory_table_fits_the_7b_on_one_80gb_gpu_only_with_the_lean_optimizer():
    """The plan behind README's table: Qwen2.5-Math-7B at the paper's settings needs ~200 GB with fp32
    masters (no single GPU) and fits 80 GB with 8-bit moments and stochastic rounding; the 1.5B fits a
    16 GB card with LoRA. State bytes per parameter: 20, 6 (hand arithmetic in precision.py)."""
    from transformers import Qwen2Config
    config = Qwen2Config(**precision.QWEN_MATH_SHAPES["qwen2.5-math-7b"])
    n = precision.parameter_count(config)
    fits = lambda gb, **method: precision.largest_fitting_micro_batch(config, gb, **method)
    assert fits(80, optim="adamw_torch_fused") is None
    assert fits(80, optim="adamw_torch_8bit_sr") is not None
    plan = precision.memory_plan(config, dtype=torch.bfloat16, micro_batch_rows=1, optim="adamw_torch_8bit_sr",
                                 **precision.PAPER_RUN)
    assert plan["weights"] + plan["gradients"] + plan["AdamW moments"] == 6 * n and plan["master weights (fp32)"] == 0
    small = Qwen2Config(**precision.QWEN_MATH_SHAPES["qwen2.5-math-1.5b"])
    assert precision.largest_fitting_micro_batch(small, 16, optim="adamw_torch_fused", lora_rank=16) is not None
    assert precision.lora_parameter_count(small, 16) == 28 * 16 * ((1536 + 1536) + (1536 + 256))  # q (D->D), v (D->kv)
