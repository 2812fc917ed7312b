"""Ensembles of seeds (train --members N): one checkpoint, one ONNX graph serving the mean of the
members' logits, an exact /explain, and cross-validation that scores the ensemble as served."""

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from models.ensemble import ExplainableLogitMean, LogitMeanEnsemble, ensemble_of
from models.kim_cnn import KimCNN, kim_cnn_config
from models.rnn_classifier import RNNClassifier, RNNClassifierConfig
from services.backends.bundle_format import BundleFormatError, check_files
from services.backends.explain import explain_texts
from services.backends.inference import TextClassifier, read_bundle
from training.data.datasets import read_trec, split_dev
from training.evaluation.evaluate import evaluate_classifier
from training.bundles.export_classifier import export_bundle
from training.jobs.classifier import (accuracy, batch_tensors, encode_examples, encoder_for, load_model, member_seeds,
                                       train_classifier, train_ensemble)

from tests.conftest import REPOSITORY, SAMPLE_DATA

VOCAB = ("<pad>", "<unk>", "it", "was", "not", "very", "good", "a", "movie")
WORD = {word: index for index, word in enumerate(VOCAB)}


def trigram_detector(config, output_weight: float, output_bias: float) -> KimCNN:
    """A Kim CNN whose only live filter fires (value 1) on "not very good" and adds `output_weight`
    to the logit of class 0; class 0's bias is `output_bias`."""
    model = KimCNN(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embeddings[0].weight.copy_(torch.eye(len(VOCAB)))
        model.embeddings[0].weight[0].zero_()
        detector = model.convolutions[1]  # width 3, filter 0: pooled feature 2
        for offset, word in enumerate(["not", "very", "good"]):
            detector.weight[0, WORD[word], offset] = 1.0
        detector.bias[0] = -2.0
        model.output.weight[0, 2] = output_weight
        model.output.bias[0] = output_bias
    return model


@pytest.fixture(scope="module")
def two_detectors(tmp_path_factory):
    """Members adding 5 and 3 to "negative" (biases 1 and 0): the ensemble's logit is 4 + 0.5."""
    config = kim_cnn_config("rand", vocab_size=len(VOCAB), num_classes=2, embedding_dim=len(VOCAB),
                            filter_widths=(2, 3), feature_maps=2)
    members = [trigram_detector(config, 5.0, 1.0), trigram_detector(config, 3.0, 0.0)]
    checkpoint = {
        "architecture": "kim-cnn", "preset": "rand", "config": asdict(config),
        "member_state_dicts": [member.state_dict() for member in members],
        "vocab": list(VOCAB), "labels": ["negative", "positive"], "metrics": {"member_seeds": [7, 1007]}, "step": 0,
        "encoding": {"kind": "words", "lowercase": True, "edge_padding": 2, "min_length": 1},
    }
    path = tmp_path_factory.mktemp("zoo") / "negation-pair"
    export_bundle(checkpoint, path, "negation-pair", ["it was not very good", "a movie", "not good", "very good movie"] * 20)
    return path


def test_the_graph_serves_the_mean_of_the_members_logits(two_detectors):
    classifier = TextClassifier(read_bundle(two_detectors))
    logits = classifier.logits(["it was not very good", "a movie"])
    # By hand: "not very good" fires the filter once: (1 + 5) and (0 + 3) -> 4.5; without it, (1 + 0) / 2.
    np.testing.assert_allclose(logits, [[4.5, 0.0], [0.5, 0.0]], atol=1e-5)
    config = json.loads((two_detectors / "config.json").read_text())
    assert config["ensemble"] == {"members": 2, "combine": "mean-logits", "seeds": [7, 1007]}


def test_explain_stays_exact_for_an_ensemble(two_detectors):
    classifier = TextClassifier(read_bundle(two_detectors))
    [result] = explain_texts(classifier, ["It was not very good, a movie"], top_k=3)
    top = result["ngrams"][0]
    # Both members' filter 0 of width 3 picked the same trigram: 5/2 + 3/2, counted as two filters.
    assert (top["ngram"], top["start"], top["width"], top["filters"]) == ("not very good", 2, 3, 2)
    assert top["contribution"] == pytest.approx(4.0, abs=1e-5)
    assert result["logit"] == pytest.approx(4.5, abs=1e-5) and result["bias"] == pytest.approx(0.5, abs=1e-5)
    assert result["rest"] == pytest.approx(0.0, abs=1e-5)


def test_a_config_that_miscounts_the_members_is_refused(two_detectors, tmp_path):
    config = json.loads((two_detectors / "config.json").read_text())
    for wrong in ({"members": 1}, {"members": "2"}, {"members": True}, [2]):
        with pytest.raises(BundleFormatError, match="'ensemble' must be an object with 'members'"):
            check_files(two_detectors, {**config, "ensemble": wrong}, ["negative", "positive"])


def test_ensemble_of_keeps_explanations_only_where_every_member_has_them():
    kim = kim_cnn_config("rand", vocab_size=20, num_classes=3, embedding_dim=4, filter_widths=(2,), feature_maps=2)
    assert type(ensemble_of([KimCNN(kim), KimCNN(kim)])) is ExplainableLogitMean
    gru = RNNClassifierConfig(vocab_size=20, num_classes=3, cell="gru", embedding_dim=4, hidden_size=4)
    assert type(ensemble_of([RNNClassifier(gru), RNNClassifier(gru)])) is LogitMeanEnsemble
    with pytest.raises(ValueError, match="two or more members"):
        ensemble_of([KimCNN(kim)])


@pytest.fixture(scope="module")
def trained_pair(trec_path):
    train, dev = split_dev(read_trec(trec_path)[:400], dev_fraction=0.25, seed=2)
    options = {"epochs": 2, "show_progress": False, "overrides": {"feature_maps": "20", "embedding_dim": "50"}}
    return train_ensemble(train, dev, 2, seed=11, **options), train, dev, options


def test_members_are_the_single_runs_of_their_seeds_and_the_dev_figure_is_the_ensembles(trained_pair):
    checkpoint, train, dev, options = trained_pair
    assert member_seeds(11, 2) == [11, 1011] and checkpoint["metrics"]["member_seeds"] == [11, 1011]
    single = train_classifier(train, dev, seed=1011, **options)  # member 1 on its own
    for name, weight in single["state_dict"].items():
        torch.testing.assert_close(checkpoint["member_state_dicts"][1][name], weight, rtol=0, atol=0)
    rows, targets = encode_examples(encoder_for(checkpoint), dev, checkpoint["labels"])
    members = [load_model({**checkpoint, "member_state_dicts": None, "state_dict": state})
               for state in checkpoint["member_state_dicts"]]
    with torch.no_grad():
        mean_logits = torch.stack([member(*batch_tensors(rows)) for member in members]).mean(dim=0)
    by_hand = float((mean_logits.argmax(dim=1).numpy() == targets).mean())
    assert checkpoint["metrics"]["dev_accuracy"] == pytest.approx(by_hand)
    assert checkpoint["metrics"]["dev_accuracy"] == pytest.approx(accuracy(load_model(checkpoint), rows, targets))
    assert checkpoint["metrics"]["member_dev_accuracies"][1] == pytest.approx(single["metrics"]["dev_accuracy"])


def test_an_exported_ensemble_evaluates_through_onnxruntime_as_in_torch(trained_pair, tmp_path):
    checkpoint, _, dev, _ = trained_pair
    metrics = export_bundle(checkpoint, tmp_path / "pair", "pair", [e.text for e in dev], storage="float32")
    assert metrics["ensemble_members"] == 2 and metrics["parity_max_abs_logit_delta"] <= 1e-4
    scored = evaluate_classifier(tmp_path / "pair", dev)
    assert scored["accuracy"] == pytest.approx(checkpoint["metrics"]["dev_accuracy"])
    assert scored["n"] == len(dev)


def test_cv_with_members_scores_each_ensemble_and_resumes_mid_fold(tmp_path):
    lines = (SAMPLE_DATA / "trec.txt").read_text().splitlines(keepends=True)
    questions = tmp_path / "trec-400.txt"  # quick, with all 20 ABBR questions so that every fold trains every class
    questions.write_text("".join([l for l in lines if l.startswith("ABBR")] + [l for l in lines if not l.startswith("ABBR")][:380]))
    data = ["--data", str(questions), "--format", "trec", "--epochs", "1", "--folds", "2",
            "--set", "feature_maps=10", "--members", "2"]
    out = tmp_path / "cv.json"
    run = subprocess.run([sys.executable, "-m", "training", "cv", *data, "--out", str(out)],
                         capture_output=True, text=True, cwd=REPOSITORY)
    assert run.returncode == 0, run.stderr[-2000:]
    finished = json.loads(out.read_text())
    assert finished["cv_members"] == 2 and len(finished["cv_member_runs"]) == 2
    # The one-member figure is member 0's, the two-member one is the fold figures' mean.
    assert finished["cv_accuracy_by_members"]["1"] == pytest.approx(finished["cv_member_accuracies"][0])
    assert finished["cv_accuracy_by_members"]["2"] == pytest.approx(finished["cv_accuracy_mean"])
    fold = finished["cv_member_runs"]["1"]
    logits = np.array([member["logits"] for member in fold["members"]])  # (2, N, K)
    by_hand = float((logits.mean(axis=0).argmax(axis=1) == np.array(fold["targets"])).mean())
    assert finished["cv_fold_accuracies"][0] == pytest.approx(by_hand)

    # Stopped after fold 2's first member: the rerun trains only fold 2's second member.
    partial = {key: finished[key] for key in ("cv_settings", "cv_fold_curves")}
    partial["cv_fold_progress"] = {"1": finished["cv_fold_progress"]["1"]}
    partial["cv_member_runs"] = {"1": finished["cv_member_runs"]["1"],
                                 "2": {**finished["cv_member_runs"]["2"], "members": finished["cv_member_runs"]["2"]["members"][:1]}}
    resumed_path = tmp_path / "partial.json"
    resumed_path.write_text(json.dumps(partial))
    rerun = subprocess.run([sys.executable, "-m", "training", "cv", *data, "--out", str(resumed_path)],
                           capture_output=True, text=True, cwd=REPOSITORY)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "fold 2/2, member 2/2" in rerun.stdout and "member 1/2" not in rerun.stdout
    assert json.loads(resumed_path.read_text())["cv_fold_accuracies"] == finished["cv_fold_accuracies"]


def test_members_below_one_are_refused_with_a_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(SAMPLE_DATA / "trec.txt"),
                          "--format", "trec", "--members", "0", "--out", str(tmp_path / "x.pt")],
                         capture_output=True, text=True, cwd=REPOSITORY)
    assert run.returncode != 0 and "--members 0: give 1 (a single model) or more" in run.stderr
