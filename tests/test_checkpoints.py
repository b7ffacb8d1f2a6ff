"""checkpoints.py: runs out and models in. A resumed run equals an uninterrupted one, a used
--output-dir is refused (and trimmed on resume), periodic checkpoints keep the newest, the embedded
GGUF model saves clean checkpoints and loads them back (a tiny GGUF written by the test).
Run: python -m pytest tests/test_checkpoints.py"""

import json

import pytest
import torch

import checkpoints
import edge_grpo as eg
from checkpoints import checkpoint_dirs
from tests.test_edge_grpo import PROBLEMS, args_for, run, write_jsonl
from tests.tiny import tiny_model, write_tiny_gguf


def test_resume_matches_an_uninterrupted_run(tok, tmp_path):
    """4 steps straight vs 2 steps, a checkpoint, and a resumed run of steps 3-4 in a new process-like
    setting (model and tokenizer reloaded from the checkpoint): same metrics, same final weights."""
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    common = ["--data", str(data), "--max-steps", "4", "--lr-scheduler-type", "linear"]
    straight = tiny_model(tok)
    full = eg.train(args_for(tmp_path / "a", *common), model=straight, tokenizer=tok, progress=False)
    eg.train(args_for(tmp_path / "b", *common, "--save-steps", "2"), model=tiny_model(tok), tokenizer=tok,
             progress=False)
    resume_args = eg.parse_args(["--resume", str(tmp_path / "b" / "checkpoint-2"), "--output-dir", str(tmp_path / "c")])
    assert resume_args.max_steps == 4 and resume_args.data == str(data)  # the saved config is the default
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                   weights=resume_args.resume)
    resumed = eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    assert [m["step"] for m in resumed] == [3, 4]
    for key in ("reward", "loss", "grad_norm", "entropy", "learning_rate"):
        for a, b in zip(full[2:], resumed):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for p, q in zip(straight.parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_used_output_dir_is_refused_overwritten_on_request_and_trimmed_on_resume(tok, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    out = tmp_path / "out"
    common = ["--data", str(data), "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"]
    eg.train(args_for(out, *common), model=tiny_model(tok), tokenizer=tok, progress=False)
    steps = lambda: [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps() == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="--overwrite-output-dir"):
        eg.train(args_for(out, *common), model=tiny_model(tok), tokenizer=tok, progress=False)
    assert steps() == [1, 2, 3, 4] and (out / "checkpoint-4").is_dir()  # nothing lost to the refused run
    resume_args = eg.parse_args(["--resume", str(out / "checkpoint-2")])
    model, tokenizer = eg.load_model_and_tokenizer("tiny", torch.device("cpu"), torch.float32,
                                                   weights=resume_args.resume)
    eg.train(resume_args, model=model, tokenizer=tokenizer, progress=False)
    assert steps() == [1, 2, 3, 4]  # steps 3 and 4 redone, not repeated
    eg.train(args_for(out, *common, "--max-steps", "1", "--overwrite-output-dir"), model=tiny_model(tok), tokenizer=tok,
             progress=False)
    assert steps() == [1] and [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1"]


def test_periodic_checkpoints_keep_the_newest(tok, tmp_path):
    _, _, args = run(tmp_path / "r", tok, "--max-steps", "5", "--save-steps", "2", "--save-total-limit", "2")
    assert [p.name for p in checkpoint_dirs(args.output_dir)] == ["checkpoint-4", "checkpoint-5"]
    assert eg.parse_args([]).save_steps > 0 and eg.parse_args([]).save_total_limit > 0  # periodic by default


@pytest.fixture
def embedded_tiny(tmp_path, monkeypatch):
    """A package holding a tiny GGUF model, put where the embedded alias looks, so that training,
    saving and resuming go through load_embedded_gguf as `python edge_grpo.py` does."""
    package = tmp_path / "site" / "tiny_gguf_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_tiny_gguf(package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(checkpoints.MODEL_SOURCES["smollm2-135m"], "gguf", ("tiny_gguf_package", "tiny.gguf"))
    return tmp_path


def test_the_embedded_model_saves_clean_checkpoints_and_resumes(embedded_tiny):
    from transformers import AutoModelForCausalLM
    out = embedded_tiny / "run"
    common = ["--output-dir", str(out), "--max-completion-length", "8", "--gec-reflection-tokens", "4",
              "--log-completions-steps", "0"]
    eg.main([*common, "--max-steps", "2", "--save-steps", "1"])
    config = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert getattr(reloaded, "hf_quantizer", None) is None
    eg.main(["--resume", str(out / "checkpoint-2"), "--max-steps", "3"])  # README's resume command
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_checkpoint_saved_with_the_gguf_config_loads_as_a_plain_model(embedded_tiny):
    """Checkpoints written before the fix carry the GGUF quantization_config: they still load, plainly."""
    model, tokenizer = eg.load_model_and_tokenizer("smollm2-135m", torch.device("cpu"), torch.float32)
    model.save_pretrained(embedded_tiny / "old")
    tokenizer.save_pretrained(embedded_tiny / "old")
    config_path = embedded_tiny / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = dict(quant_method="gguf", gguf_file="tiny.gguf", dequantize=False)
    config_path.write_text(json.dumps(config))
    loaded, _ = eg.load_model_and_tokenizer("smollm2-135m", torch.device("cpu"), torch.float32,
                                            weights=embedded_tiny / "old")
    assert getattr(loaded, "hf_quantizer", None) is None
    loaded.save_pretrained(embedded_tiny / "again")
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)


def test_resume_never_rewrites_a_checkpoint_as_an_earlier_step(tok, tmp_path):
    """--resume checkpoint-4 --max-steps 2 used to save checkpoint-4's weights as checkpoint-2 and prune
    real ones; now it is refused before anything is written. Resuming a finished run has nothing to do."""
    data = write_jsonl(tmp_path / "data.jsonl", PROBLEMS)
    out = tmp_path / "out"
    eg.train(args_for(out, "--data", str(data), "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "2"),
             model=tiny_model(tok), tokenizer=tok, progress=False)
    files = lambda: {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    before = files()  # the lock file is rewritten by every launch, and left empty: only who holds the directory
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="past --max-steps 2"):
        eg.train(eg.parse_args(["--resume", str(out / "checkpoint-4"), "--max-steps", "2"]), model=tiny_model(tok),
                 tokenizer=tok, progress=False)
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
    assert eg.train(eg.parse_args(["--resume", str(out / "checkpoint-4")]), model=tiny_model(tok), tokenizer=tok,
                    progress=False) == []  # at step 4 of 4: nothing to do
    assert files() == before and (out / ".lock").read_text() == ""
    assert (out / "metrics.jsonl").read_text() == metrics
