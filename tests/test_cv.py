"""Cross-validation runs that survive being stopped, and attaching their figures to a released bundle."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from services.backends.inference import read_bundle
from tests.conftest import REPOSITORY, SAMPLE_DATA

# Kim CNN, one epoch per fold on the 1,500 committed MR sentences: seconds per run.
DATA = ["--data", str(SAMPLE_DATA / "mr"), "--format", "mr", "--epochs", "1", "--min-count", "2"]


def training_command(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "training", *arguments], capture_output=True, text=True, cwd=REPOSITORY)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-2000:])
    return result


@pytest.fixture(scope="module")
def finished_cv(tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "kim-cv.json"
    training_command("cv", *DATA, "--folds", "3", "--out", str(out))
    return out


def test_a_stopped_cv_run_resumes_and_reaches_the_same_figures(finished_cv, tmp_path):
    finished = json.loads(finished_cv.read_text())
    # What the file holds after fold 2 of 3 has ended: the settings and the folds scored so far.
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"cv_settings": finished["cv_settings"],
                                   "cv_fold_progress": {k: v for k, v in finished["cv_fold_progress"].items() if k != "3"}}))
    rerun = training_command("cv", *DATA, "--folds", "3", "--out", str(partial))
    resumed = json.loads(partial.read_text())
    assert f"fold 1/3: accuracy {finished['cv_fold_accuracies'][0]:.4f} (from" in rerun.stdout
    assert "fold 2/3" in rerun.stdout and "fold 3/3" in rerun.stdout and "(best dev epoch" in rerun.stdout
    assert rerun.stdout.count("(from") == 2  # only fold 3 trained again
    assert resumed["cv_fold_accuracies"] == finished["cv_fold_accuracies"]  # training is deterministic on the CPU
    assert resumed["cv_accuracy_mean"] == pytest.approx(sum(finished["cv_fold_accuracies"]) / 3)


def test_each_fold_keeps_its_curve_and_the_selection_rules_are_scored_from_it(finished_cv):
    finished = json.loads(finished_cv.read_text())
    curves = finished["cv_fold_curves"]
    assert sorted(curves) == ["1", "2", "3"] and all(len(curve) == 1 for curve in curves.values())  # one epoch each
    # With one epoch every rule keeps that epoch, whose fold accuracy is the fold's figure.
    assert [curves[fold][0][1] for fold in "123"] == finished["cv_fold_accuracies"]
    by_rule = finished["cv_accuracy_by_selection_rule"]
    assert sorted(by_rule) == ["first-best-dev", "last-best-dev", "last-epoch"]
    assert all(value == pytest.approx(finished["cv_accuracy_mean"]) for value in by_rule.values())


def test_the_selection_rules_pick_the_first_best_the_last_best_or_the_last_epoch():
    from training.jobs.classifier import select_epoch

    curve = [[0.80, 0.70], [0.85, 0.71], [0.84, 0.72], [0.85, 0.73], [0.83, 0.74]]  # [dev, held-out] per epoch
    assert select_epoch(curve, "first-best-dev") == 0.71
    assert select_epoch(curve, "last-best-dev") == 0.73  # Kim's `>=`
    assert select_epoch(curve, "last-epoch") == 0.74


def test_a_cv_file_from_other_settings_is_refused_not_mixed_in(finished_cv):
    before = finished_cv.read_text()
    result = training_command("cv", *DATA[:-2], "--min-count", "1", "--folds", "3", "--out", str(finished_cv), check=False)
    assert result.returncode != 0 and "other settings" in result.stderr and "Traceback" not in result.stderr
    assert finished_cv.read_text() == before


@pytest.fixture(scope="module")
def released_bundle(tmp_path_factory):
    """A bundle trained with the same recipe as `finished_cv` (the released model of that recipe)."""
    folder = tmp_path_factory.mktemp("zoo")
    training_command("train", *DATA, "--out", str(folder / "kim.pt"))
    training_command("export", "--checkpoint", str(folder / "kim.pt"), *DATA[:4], "--bundle", str(folder / "kim-cnn-mr"))
    return folder / "kim-cnn-mr"


def test_attach_cv_adds_the_figures_and_leaves_the_graph_alone(finished_cv, released_bundle, tmp_path):
    bundle = tmp_path / "kim-cnn-mr"
    shutil.copytree(released_bundle, bundle)
    graph_sha = hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()

    result = training_command("attach-cv", "--bundle", str(bundle), "--cv", str(finished_cv))
    cv = json.loads(finished_cv.read_text())
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["cv_accuracy_mean"] == cv["cv_accuracy_mean"]
    metrics = read_bundle(bundle).metrics  # the manifest was rewritten: the bundle still verifies
    assert metrics["cv_fold_accuracies"] == cv["cv_fold_accuracies"] and metrics["cv_command"] == cv["cv_command"]
    assert "cv_settings" not in metrics and "cv_fold_progress" not in metrics and "cv_fold_curves" not in metrics
    assert metrics["dev_accuracy"] > 0 and metrics["train_command"].startswith("python -m training train")
    assert hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest() == graph_sha
    assert [path.name for path in tmp_path.iterdir()] == ["kim-cnn-mr"]  # no staging copy left behind


def test_attach_cv_refuses_a_run_of_another_recipe(finished_cv, released_bundle, tmp_path):
    other_recipe = json.loads(finished_cv.read_text())
    other_recipe["cv_settings"]["min_count"] = 1
    (tmp_path / "other.json").write_text(json.dumps(other_recipe))
    before = (released_bundle / "metrics.json").read_text()
    result = training_command("attach-cv", "--bundle", str(released_bundle), "--cv", str(tmp_path / "other.json"), check=False)
    assert result.returncode != 0 and "min_count=1" in result.stderr and "min_count=2" in result.stderr
    assert (released_bundle / "metrics.json").read_text() == before
