"""Data-parallel training under torchrun (training/jobs/distributed.py) is the same training as one
process: two gloo ranks on this CPU against one process with the same global batch and seeds,
for Kim's CNN and a tiny character-aware LM; and a job that loses a rank stops with a clear
message and resumes from its last checkpoint, with another number of ranks.

Dropout is off in the comparisons: each rank draws its own masks, so with dropout the two runs
are equally valid but not equal. What is left is the order of float additions (DDP's all-reduce
sums the two halves' gradients; one process sums the whole batch at once): after 54 Adadelta
steps of the CNN the weights agree to 1e-7 and the losses to 1e-7 relative; the LM's SGD at rate
1.0 amplifies such differences faster, so it is compared after its first 6 steps (tolerances below).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPOSITORY, SAMPLE_DATA
from training.data.datasets import read_mr_dir
from models.text_encoding import tokenize

TORCHRUN = Path(sys.executable).with_name("torchrun")
# The sample's 1,500 questions with 149 held out: 1,351 to train on, so the last batch of 50 holds
# one example and one of two ranks has nothing of it (it joins the all-reduce weighted 0).
CNN_ARGS = ["--data", str(SAMPLE_DATA / "trec.txt"), "--format", "trec", "--dev-fraction", "0.09933", "--epochs", "2"]
LM_TINY = ["--set", "hidden_size=48", "--set", "filters=8,8,8,8,8,8"]


def run_training(args: list[str], ranks: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m training ARGS` as one process, or under torchrun with `ranks` gloo ranks."""
    launcher = [sys.executable] if ranks == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node", str(ranks)]
    result = subprocess.run([*launcher, "-m", "training", *args], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def largest_difference(first: dict, second: dict) -> float:
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> Path:
    """PTB's layout (train.txt, valid.txt; one sentence per line) from the committed MR sample:
    2,150 training tokens, so that an epoch is 3 steps of 20 rows x 35 words."""
    folder = tmp_path_factory.mktemp("ptb")
    sentences = [" ".join(tokenize(example.text)).encode("ascii", "ignore").decode() for example in read_mr_dir(SAMPLE_DATA / "mr")]
    train, count = [], 0
    for sentence in sentences:
        if count + len(sentence.split()) + 1 > 2_150:
            break
        train.append(sentence)
        count += len(sentence.split()) + 1
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "valid.txt").write_text("\n".join(sentences[1400:1440]) + "\n")
    return folder


def test_kim_cnn_on_two_ranks_trains_as_one_process(tmp_path):
    args = [*CNN_ARGS, "--set", "dropout=0"]
    run_training(["train", *args, "--out", str(tmp_path / "one.pt")], ranks=1)
    run_training(["train", *args, "--out", str(tmp_path / "two.pt")], ranks=2)
    one, two = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("one", "two"))
    assert (one["metrics"]["world_size"], two["metrics"]["world_size"]) == (1, 2)
    assert one["metrics"]["global_batch"] == two["metrics"]["global_batch"] == 50
    assert one["metrics"]["train_examples"] == 1351  # 27 full batches and one of a single example
    for a, b in zip(one["metrics"]["history"], two["metrics"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["dev_accuracy"] == a["dev_accuracy"]
    assert largest_difference(one["state_dict"], two["state_dict"]) < 1e-5
    assert not (tmp_path / "two.pt.resume").exists()  # the run's state is dropped once the checkpoint is written


def test_tiny_lm_on_two_ranks_trains_as_one_process(lm_data, tmp_path):
    args = ["train-lm", "--data", str(lm_data), *LM_TINY, "--set", "dropout=0", "--set", "recipe.epochs=2"]
    run_training([*args, "--out", str(tmp_path / "one.pt")], ranks=1)
    run_training([*args, "--out", str(tmp_path / "two.pt")], ranks=2)
    one, two = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("one", "two"))
    assert [entry["step"] for entry in one["metrics"]["history"]] == [3, 6]
    assert (one["metrics"]["world_size"], two["metrics"]["world_size"], two["metrics"]["global_batch"]) == (1, 2, 20)
    for a, b in zip(one["metrics"]["history"], two["metrics"]["history"], strict=True):
        assert b["train_perplexity"] == pytest.approx(a["train_perplexity"], rel=1e-5)
        assert b["valid_perplexity"] == pytest.approx(a["valid_perplexity"], rel=1e-5)
    assert largest_difference(one["resume"]["state_dict"], two["resume"]["state_dict"]) < 1e-4
    # The carried LSTM state of all 20 rows, gathered from the two ranks' halves into one batch.
    for a, b in zip(one["resume"]["carried_state"], two["resume"]["carried_state"], strict=True):
        assert a.shape == b.shape == (2, 20, 48)
        assert (a - b).abs().max().item() < 1e-4


def kill_rank_once(command: list[str], ready: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `command` under torchrun with two ranks, SIGKILL rank 1 once `ready` exists, and return
    how the job ended."""
    job = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "training", *command],
                           cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert job.poll() is None, f"the job ended before {ready} was written: {job.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rank_one = [pid for pid in map(int, subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split())
                if "LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")]
    assert len(rank_one) == 1
    os.kill(rank_one[0], signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=90)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def test_a_killed_rank_stops_the_lm_job_which_resumes_from_its_checkpoint_on_one_rank(lm_data, tmp_path):
    out = tmp_path / "lm.pt"
    args = ["train-lm", "--data", str(lm_data), *LM_TINY, "--set", "recipe.epochs=8", "--checkpoint-every", "0", "--out", str(out)]
    stopped = kill_rank_once(args, ready=out.with_suffix(".curve.jsonl"))  # after the first epoch at least
    assert stopped.returncode != 0
    # Rank 0 says what happened and what to do, in one line: it lost its peer, or torchrun stopped it.
    assert re.search(rf"rank 0 of 2: (lost contact with another rank|stopped by SIGTERM).*resume from {re.escape(str(out))}",
                     stopped.stderr), stopped.stderr[-3000:]
    assert "local_rank: 1" in stopped.stderr  # torchrun's report names the rank that died
    saved = torch.load(out, weights_only=True)
    epoch, chunk = saved["resume"]["progress"]["epoch"], saved["resume"]["progress"]["chunk"]
    assert saved["metrics"]["epochs_run"] < 8

    resumed = run_training(args, ranks=1)  # one process takes over both ranks' rows
    assert f"resuming {out}: epoch {epoch}, chunk {chunk}/3" in resumed.stdout
    finished = torch.load(out, weights_only=True)
    assert finished["metrics"]["epochs_run"] == 8 and finished["metrics"]["world_size"] == 1
    assert finished["metrics"]["history"][: len(saved["metrics"]["history"])] == saved["metrics"]["history"]
    ranks_per_epoch = [entry.get("world_size", 1) for entry in finished["metrics"]["history"]]
    assert ranks_per_epoch[0] == 2 and ranks_per_epoch[-1] == 1


def test_a_killed_rank_stops_the_classifier_job_which_resumes_after_its_last_epoch(tmp_path):
    out = tmp_path / "cnn.pt"
    args = ["train", *CNN_ARGS[:-1], "4", "--out", str(out)]
    stopped = kill_rank_once(args, ready=out.with_name("cnn.pt.resume") / "member-0.pt")
    assert stopped.returncode != 0 and not out.exists()
    assert re.search(r"rank 0 of 2: (lost contact with another rank|stopped by SIGTERM)", stopped.stderr), stopped.stderr[-3000:]
    state = torch.load(out.with_name("cnn.pt.resume") / "member-0.pt", weights_only=True)
    done = len(state["history"])
    assert 1 <= done < 4

    resumed = run_training(args, ranks=1)
    assert f"{done} of 4 epochs done" in resumed.stdout
    finished = torch.load(out, weights_only=True)
    assert [entry["epoch"] for entry in finished["metrics"]["history"]] == [1, 2, 3, 4]
    assert finished["metrics"]["history"][:done] == state["history"]
    assert not out.with_name("cnn.pt.resume").exists()


def test_a_stopped_single_process_run_resumes_to_the_same_weights(tmp_path):
    """Without torchrun the per-epoch state restores everything (weights, Adadelta's running
    averages, the batch order's generator, dropout's generator): stopped after an epoch and rerun,
    the run ends with the weights of one that never stopped, bit for bit."""
    args = ["train", *CNN_ARGS[:-1], "3"]
    run_training([*args, "--out", str(tmp_path / "straight.pt")], ranks=1)
    out = tmp_path / "stopped.pt"
    job = subprocess.Popen([sys.executable, "-m", "training", *args, "--out", str(out)], cwd=REPOSITORY,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state_file = out.with_name("stopped.pt.resume") / "member-0.pt"
    while not state_file.exists():
        assert job.poll() is None
        time.sleep(0.05)
    job.kill()
    job.wait()
    resumed = run_training([*args, "--out", str(out)], ranks=1)
    assert "resuming" in resumed.stdout
    straight, stopped = (torch.load(tmp_path / name, weights_only=True) for name in ("straight.pt", "stopped.pt"))
    assert straight["metrics"]["history"] == stopped["metrics"]["history"]
    assert largest_difference(straight["state_dict"], stopped["state_dict"]) == 0.0


def test_cv_on_two_ranks_scores_the_folds_as_one_process(tmp_path):
    args = ["cv", "--data", str(SAMPLE_DATA / "trec.txt"), "--format", "trec", "--folds", "2", "--epochs", "1", "--set", "dropout=0"]
    one = json.loads(run_training([*args, "--out", str(tmp_path / "one.json")], ranks=1).stdout.strip().splitlines()[-1])
    two = json.loads(run_training([*args, "--out", str(tmp_path / "two.json")], ranks=2).stdout.strip().splitlines()[-1])
    assert two["cv_fold_accuracies"] == one["cv_fold_accuracies"]
    assert json.loads((tmp_path / "two.json").read_text())["cv_fold_accuracies"] == one["cv_fold_accuracies"]
    assert not (tmp_path / "two.json.resume").exists()


def test_patience_stops_only_after_epochs_without_a_better_dev_accuracy():
    """--patience N ends the run at the first epoch that does not beat the best dev accuracy and
    comes N or more epochs after the best; an epoch that improves never ends it (patience 0 too)."""
    from training.data.datasets import read_labelled, split_dev
    from training.jobs.classifier import train_classifier

    train, dev = split_dev(read_labelled(SAMPLE_DATA / "trec.txt", "trec"), dev_fraction=0.1, seed=3435)
    for patience in (0, 2):
        run = train_classifier(train[:400], dev, epochs=12, patience=patience, show_progress=False)
        curve = [entry["dev_accuracy"] for entry in run["metrics"]["history"]]
        best_epoch, should_stop = 1, []
        for epoch, accuracy in enumerate(curve, start=1):
            improved = epoch == 1 or accuracy > max(curve[: epoch - 1])
            best_epoch = epoch if improved else best_epoch
            should_stop.append(not improved and epoch - best_epoch >= patience)
        assert not any(should_stop[:-1]), (patience, curve)  # it ran on while the rule said go on
        assert should_stop[-1] or len(curve) == 12, (patience, curve)  # and stopped when the rule said stop
        assert run["metrics"]["best_epoch"] == best_epoch
        assert len(curve) < 12 or patience == 2, curve  # the sample's dev curve has a setback early: patience 0 stops
