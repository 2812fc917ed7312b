"""The training side's layout and command line: rooms by purpose, a `__main__` that only gathers
the commands each room registers, commands recorded as values (never a shell string parsed
back), `--set` read one way everywhere, and a seeded retrain that gives the weights it gave
before the files moved."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
TRAINING = REPOSITORY / "training"
SAMPLE_TREC = TRAINING / "sample_data" / "trec.txt"


def training(*args: str, cwd: Path = REPOSITORY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, cwd=cwd)


def weights_fingerprint(checkpoint_file: Path) -> list:
    """Sum, sum of squares, every 997th value's sum and count of the checkpoint's float weights."""
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    values = torch.cat([v.double().flatten() for _, v in sorted(checkpoint["state_dict"].items()) if v.is_floating_point()])
    return [float(values.sum()), float((values * values).sum()), float(values[::997].sum()), int(values.numel())]


def test_a_seeded_retrain_gives_the_weights_it_gave_before_the_files_moved(tmp_path):
    # Kim's CNN, one epoch on the committed TREC sample, seed 3435, through the command line: the
    # figures the same command gave at commit 40319a3, before training/ was split into rooms.
    done = training("train", "--data", str(SAMPLE_TREC), "--format", "trec", "--epochs", "1", "--out", str(tmp_path / "x.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["dev_accuracy"] == pytest.approx(0.38)
    total, squares, sampled, count = weights_fingerprint(tmp_path / "x.pt")
    assert count == 1_479_906
    assert (total, squares, sampled) == pytest.approx((-102.23057931565563, 23731.73077745606, 5.859008408151567), rel=1e-6)
    recorded = torch.load(tmp_path / "x.pt", map_location="cpu", weights_only=True)["metrics"]["train_arguments"]
    assert recorded["data"] == str(SAMPLE_TREC) and recorded["epochs"] == 1 and recorded["dev_fraction"] == 0.1


def test_a_seeded_language_model_retrain_gives_the_curve_and_weights_it_gave_before_the_split(tmp_path):
    # A tiny LM, 2 epochs with weight averaging from the first halving, on the committed MR sample
    # in PTB's layout: the figures the same command gave at commit 40319a3, before
    # train_language_model became LanguageModelRun's stages.
    from models.text_encoding import tokenize
    from training.data.datasets import read_mr_dir

    lines = [" ".join(tokenize(example.text)) for example in read_mr_dir(TRAINING / "sample_data" / "mr")]
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "train.txt").write_text("".join(f" {line} \n" for line in lines[:700]))
    (tmp_path / "ptb" / "valid.txt").write_text("".join(f" {line} \n" for line in lines[-80:]))
    done = training("train-lm", "--data", str(tmp_path / "ptb"), "--out", str(tmp_path / "lm.pt"), "--device", "cpu",
                    "--set", "hidden_size=32", "--set", "filters=8,8,8,8,8,8", "--set", "recipe.epochs=2",
                    "--set", "recipe.average_from_halving=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["valid_perplexity"] == pytest.approx(812.8530647814916, rel=1e-6)
    total, squares, sampled, count = weights_fingerprint(tmp_path / "lm.pt")
    assert count == 157_352
    assert (total, squares, sampled) == pytest.approx((-46.26354194425039, 919.1523450082211, -0.5937289902940392), rel=1e-6)


def test_the_top_floor_holds_a_handful_of_files_and_the_rest_is_in_rooms():
    top = sorted(path.name for path in TRAINING.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "arguments.py", "predict.py"]
    rooms = sorted(path.name for path in TRAINING.iterdir() if (path / "__init__.py").is_file())
    assert rooms == ["bench", "bundles", "data", "evaluation", "jobs"]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_no_job_imports_a_sibling_job():
    jobs = {"training.jobs.classifier", "training.jobs.language_model", "training.jobs.image"}
    for job in jobs:
        path = REPOSITORY / (job.replace(".", "/") + ".py")
        assert not imports_of(path) & (jobs - {job}), path


def test_main_only_gathers_the_commands_each_room_registers():
    tree = ast.parse((TRAINING / "__main__.py").read_text())
    compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    assert not [c for c in compared if "command" in c], compared  # no `args.command == ...` dispatch
    from training.__main__ import parser

    whole = parser()
    [subcommands] = [action for action in whole._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(subcommands.choices) == 17
    for name, sub in subcommands.choices.items():
        assert callable(sub.get_default("run")), name


def test_no_shell_string_is_parsed_back():
    for path in [*TRAINING.rglob("*.py"), *(REPOSITORY / "deploy").rglob("*.py"), *(REPOSITORY / "services").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
        assert "shlex.split" not in calls, path


def test_a_set_without_a_value_or_with_one_of_the_wrong_type_is_refused_by_its_name(tmp_path):
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    (ptb / "train.txt").write_text(" the elephants wandered over the plains \n" * 50)
    (ptb / "valid.txt").write_text(" the elephants wandered \n" * 5)
    bare = training("train-lm", "--data", str(ptb), "--out", str(tmp_path / "lm.pt"), "--set", "hidden_size")
    assert bare.returncode != 0 and "--set 'hidden_size': expected NAME=VALUE" in bare.stderr
    wrong = training("train-lm", "--data", str(ptb), "--out", str(tmp_path / "lm.pt"), "--set", "hidden_size=big")
    assert wrong.returncode == 2 and "--set hidden_size='big' is not a valid int" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    unknown = training("train", "--data", str(SAMPLE_TREC), "--format", "trec", "--out", str(tmp_path / "x.pt"),
                       "--set", "recipe.epoch=2")
    assert unknown.returncode == 2 and "unknown setting 'recipe.epoch'" in unknown.stderr and "Traceback" not in unknown.stderr
