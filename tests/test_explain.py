"""/explain's core on a Kim CNN built by hand, whose decisive n-gram is known: one width-3
filter detects "not very good" and pushes the logit of "negative" up by 5."""

from dataclasses import asdict

import pytest
import torch

from models.kim_cnn import KimCNN, kim_cnn_config
from services.backends.explain import explain_texts
from services.backends.inference import BundleError, TextClassifier, read_bundle
from training.bundles.export_classifier import export_bundle

VOCAB = ("<pad>", "<unk>", "it", "was", "not", "very", "good", "a", "movie")
WORD = {word: index for index, word in enumerate(VOCAB)}


@pytest.fixture(scope="module")
def negation_detector(tmp_path_factory):
    config = kim_cnn_config("rand", vocab_size=len(VOCAB), num_classes=2, embedding_dim=len(VOCAB),
                            filter_widths=(2, 3), feature_maps=2)
    model = KimCNN(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embeddings[0].weight.copy_(torch.eye(len(VOCAB)))
        model.embeddings[0].weight[0].zero_()  # <pad>
        detector = model.convolutions[1]  # width 3; its filter 0 is pooled feature 2
        for offset, word in enumerate(["not", "very", "good"]):
            detector.weight[0, WORD[word], offset] = 1.0
        detector.bias[0] = -2.0  # fires (3 - 2 = 1) only on the whole trigram
        model.output.weight[0, 2] = 5.0  # class 0 = "negative"
    checkpoint = {
        "architecture": "kim-cnn", "preset": "rand", "state_dict": model.state_dict(), "config": asdict(config),
        "vocab": list(VOCAB), "labels": ["negative", "positive"], "metrics": {}, "step": 0,
        "encoding": {"kind": "words", "lowercase": True, "edge_padding": 2, "min_length": 1},
    }
    path = tmp_path_factory.mktemp("zoo") / "negation"
    export_bundle(checkpoint, path, "negation", ["it was not very good", "a movie", "not good", "very good movie"] * 20)
    return TextClassifier(read_bundle(path))


def test_the_decisive_trigram_is_found(negation_detector):
    [result] = explain_texts(negation_detector, ["It was not very good, a movie"], top_k=3)
    assert result["label"] == "negative"
    top = result["ngrams"][0]
    assert (top["ngram"], top["start"], top["width"], top["filters"]) == ("not very good", 2, 3, 1)
    assert top["contribution"] == pytest.approx(5.0, abs=1e-5)
    assert result["logit"] == pytest.approx(5.0, abs=1e-5) and result["bias"] == pytest.approx(0.0, abs=1e-5)
    assert result["rest"] == pytest.approx(0.0, abs=1e-5)


def test_without_the_trigram_nothing_fires(negation_detector):
    [result] = explain_texts(negation_detector, ["very good , not a movie"], top_k=3)
    assert result["ngrams"] == [] and result["logit"] == pytest.approx(0.0, abs=1e-6)


def test_logit_is_bias_plus_contributions_in_a_mixed_batch(negation_detector):
    texts = ["not very good", "a movie that was not very good at all and long", "good"]
    results = explain_texts(negation_detector, texts, top_k=50)
    for result in results:
        assert result["logit"] == pytest.approx(result["bias"] + sum(n["contribution"] for n in result["ngrams"]) + result["rest"], abs=1e-5)
    assert results[1]["ngrams"][0]["start"] == 4  # "a movie that was NOT very good": the window moved with the words


def test_models_without_evidence_refuse_to_explain(tmp_path, trec_path):
    from training.data.datasets import read_trec
    from training.jobs.classifier import train_classifier

    examples = read_trec(trec_path)[:120]
    checkpoint = train_classifier(examples[:100], examples[100:], architecture_name="rnn", preset="gru",
                                  overrides={"hidden_size": "8", "embedding_dim": "8"}, epochs=1, show_progress=False)
    export_bundle(checkpoint, tmp_path / "gru", "gru", [e.text for e in examples])
    classifier = TextClassifier(read_bundle(tmp_path / "gru"))
    assert not classifier.explainable
    with pytest.raises(BundleError, match="no evidence outputs"):
        classifier.evidence(["Who?"])
