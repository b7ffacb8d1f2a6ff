"""cli.py, the run's description: flag errors name the flag, recipes set defaults that given flags
override, --help formats, and the house rules the refactor set (cli.py imports no torch and no trainer,
the import graph has no circle, nothing imports a room above it).
Run: python -m pytest tests/test_cli.py"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, message", [
    (["--num-generations", "1"], "--num-generations 1"),
    (["--no-gec", "--forced-reflection"], "--forced-reflection"),
    (["--no-eda", "--authors-eda"], "--authors-eda"),
    (["--authors-eda", "--num-generations", "8", "--micro-batch-size", "4"], "multiple of G"),
    (["--top-p", "0"], "--top-p"),
    (["--max-steps", "0"], "--max-steps"),
    (["--resume", "/nonexistent"], "run_config.json"),
])
def test_contradictory_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--fsdp", "--use-peft"], "data parallel"),
    (["--fsdp", "--optim", "adamw_torch_8bit"], "adamw_torch_fused only"),
    (["--fsdp", "--compile"], "--no-compile"),
    (["--fsdp", "--dynamic-sampling"], "run it data parallel"),
])
def test_fsdp_refuses_what_it_does_not_run(argv, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=message):
        cli.parse_args(argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="launch with torchrun"):
        cli.parse_args(["--fsdp"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.parse_args(["--fsdp"]).fsdp == cli.parse_args(["--fsdp", "full_shard"]).fsdp == "full_shard"


def test_aliases_bring_settings_and_flags_override():
    qwen = cli.parse_args(["--model", "qwen2.5-math-1.5b"])
    assert (qwen.learning_rate, qwen.temperature, qwen.num_generations, qwen.max_completion_length) == (1e-6,
                                                                                                        0.6, 8, 1024)
    assert cli.parse_args(["--model", "qwen2.5-math-1.5b", "--learning-rate", "2e-6"]).learning_rate == 2e-6
    assert cli.parse_args([]).model == "smollm2-135m"
    assert cli.arm_name(cli.parse_args(["--no-gec", "--no-eda"])) == "GRPO"
    assert cli.parse_args(["--no-gec", "--no-eda"]).output_dir == str(Path("runs/grpo"))
    assert cli.parse_args(["--forced-reflection"]).output_dir == str(Path("runs/forced-reflection-eda"))
    assert cli.parse_args([]).output_dir == str(Path("runs/edge-grpo"))
    assert cli.arm_name(cli.parse_args(["--forced-reflection", "--no-eda"])) == "forced reflection"
    assert cli.arm_name(cli.parse_args([])) == "EDGE-GRPO"


def test_help_lists_every_flag():
    """--help formats (a stray % in a help string would break argparse's default formatter)."""
    text = cli.build_parser().format_help()
    for flag in ("--optim", "--use-peft", "--fast", "--compile", "--ddp-timeout", "--dr-grpo", "--dynamic-sampling",
                 "--importance-sampling-level", "--top-entropy-quantile", "--overlong-buffer"):
        assert flag in text


def test_cli_loads_no_torch_and_no_trainer():
    """A flag error must not wait for torch: importing cli.py (and parsing) loads neither torch nor edge_grpo."""
    code = "import sys, cli; cli.parse_args(['--no-gec', '--no-eda']); assert 'torch' not in sys.modules, 'torch'; " \
           "assert 'edge_grpo' not in sys.modules, 'edge_grpo'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# the rooms, lowest first: a module imports only from rooms below it (or its own)
FLOORS = [{"reward", "errors"}, {"data"}, {"cli", "precision", "trackers"},
          {"rollout", "lora", "distributed", "optim"}, {"fast", "checkpoints"}, {"edge_grpo", "viewer"},
          {"analysis", "course"}, {"replicate"}]


def project_imports(path):
    names = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & names - {path.stem}


def test_the_import_graph_has_no_circle_and_no_import_upward():
    floor = {name: k for k, names in enumerate(FLOORS) for name in names}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == set(floor), modules ^ set(floor)  # every module has its floor
    for name in modules:
        for imported in project_imports(ROOT / f"{name}.py"):
            assert floor[imported] < floor[name], f"{name}.py imports {imported}.py, which is not below it"
    assert "fast" not in project_imports(ROOT / "rollout.py")  # the plain room never reaches into its fast twin


# ----------------------------------------------------------------------------- traps a new user hit (issue 27)

@pytest.mark.parametrize("argv, meant", [(["--lr", "1e-5"], "--learning-rate"),
                                         (["--num-generation", "4"], "--num-generations"),
                                         (["--max-step", "3"], "--max-steps")])
def test_no_abbreviations_and_a_typo_names_the_flag_meant(argv, meant):
    """--lr was taken for --lr-scheduler-type and --num-generation silently for --num-generations."""
    import edge_grpo as eg
    with pytest.raises(SystemExit, match=f"unrecognized argument {argv[0]}: did you mean {meant}"):
        eg.parse_args(argv)


def test_a_flag_error_answers_before_torch_loads():
    code = ("import runpy, sys\nsys.argv = ['edge_grpo.py', '--lr', '1e-5']\n"
            "try:\n    runpy.run_path('edge_grpo.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert 'did you mean --learning-rate' in str(e), e\n    assert 'torch' not in sys.modules, 'torch "
            "loaded first'\nelse:\n    raise AssertionError('no error')\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_help_shows_the_defaults_that_run():
    """python edge_grpo.py runs the demo's settings (the default model's alias): --help says so; with
    the paper's alias it shows the paper's."""
    def default_of(flag, *argv):
        text = subprocess.run([sys.executable, "edge_grpo.py", *argv, "--help"], cwd=ROOT,
                              capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""}, check=True).stdout
        return re.search(rf"\n  {flag} [A-Z_]+\s+[^(]*\(default: ([^)]*)\)", text).group(1)
    assert default_of("--learning-rate") == "3e-05" and default_of("--max-completion-length") == "48"
    assert default_of("--learning-rate", "--model", "qwen2.5-math-1.5b") == "1e-06"
    assert default_of("--max-completion-length", "--model", "qwen2.5-math-1.5b") == "1024"
