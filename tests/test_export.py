"""Export: the parity gate, the bundle's manifest, and evaluation through onnxruntime."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from services.backends.inference import BundleError, TextClassifier, read_bundle
from training.bundles import export_classifier as export_module
from training.data.datasets import read_trec, split_dev
from training.evaluation.evaluate import evaluate_classifier
from training.bundles.export_classifier import ExportRefused, export_bundle
from training.jobs.classifier import accuracy, encode_examples, encoder_for, load_model, train_classifier

from tests.conftest import REPOSITORY, ZOO


@pytest.fixture(scope="module")
def small_run(trec_path):
    train, dev = split_dev(read_trec(trec_path)[:800], dev_fraction=0.25, seed=2)
    return train_classifier(train, dev, epochs=2, show_progress=False), dev


def test_bundle_has_every_file_and_a_true_manifest(small_run, tmp_path):
    checkpoint, dev = small_run
    metrics = export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    files = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert files == ["config.json", "labels.json", "manifest.json", "metrics.json", "model.onnx", "vocab.json"]
    assert metrics["parity_max_abs_logit_delta"] <= 1e-4 and metrics["parity_texts"] >= 100
    bundle = read_bundle(tmp_path / "tiny")
    assert bundle.labels == tuple(checkpoint["labels"]) and bundle.architecture == "kim-cnn"
    graph = onnx.load(str(tmp_path / "tiny" / "model.onnx"))
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["batch", "length"], ["batch"]]  # symbolic, not frozen to the export example


def test_onnx_matches_pytorch_at_a_new_batch_size_and_length(small_run, tmp_path):
    checkpoint, dev = small_run
    export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    classifier = TextClassifier(read_bundle(tmp_path / "tiny"))
    texts = [e.text for e in dev[:7]] + ["what " * 60 + "?"]  # batch 8, 128 positions (export example: 2 x 10)
    token_ids, lengths = classifier.encoder.encode_batch(texts)
    with torch.no_grad():
        expected = load_model(checkpoint)(torch.from_numpy(token_ids), torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(classifier.logits(texts), expected, atol=1e-5)


def test_export_is_refused_when_onnx_differs_from_pytorch(small_run, tmp_path, monkeypatch):
    checkpoint, dev = small_run
    real_export = export_module.export_onnx

    def export_a_different_model(model, path, encoding=None, opset=export_module.OPSET):  # stands in for an exporter bug
        with torch.no_grad():
            model.output.bias.add_(0.5)
        real_export(model, path, encoding, opset)
        with torch.no_grad():
            model.output.bias.sub_(0.5)

    monkeypatch.setattr(export_module, "export_onnx", export_a_different_model)
    with pytest.raises(ExportRefused, match="differs from PyTorch"):
        export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    assert sorted(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_an_altered_bundle_is_refused(small_run, tmp_path):
    checkpoint, dev = small_run
    export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    labels = tmp_path / "tiny" / "labels.json"
    labels.write_text(json.dumps(list(reversed(json.loads(labels.read_text())))))
    with pytest.raises(BundleError, match="labels.json has sha256"):
        read_bundle(tmp_path / "tiny")


def test_evaluate_agrees_with_pytorch_accuracy(small_run, tmp_path):
    checkpoint, dev = small_run
    export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    rows, targets = encode_examples(encoder_for(checkpoint), dev, checkpoint["labels"])
    result = evaluate_classifier(tmp_path / "tiny", dev)
    assert result == {"model": "tiny", "accuracy": pytest.approx(accuracy(load_model(checkpoint), rows, targets)), "n": len(dev)}


def test_cuda_request_without_a_gpu_is_an_error_not_a_fallback(small_run, tmp_path):
    from services.config import gpu_present

    if gpu_present():
        pytest.skip("a GPU is present here")
    checkpoint, dev = small_run
    export_bundle(checkpoint, tmp_path / "tiny", "tiny", [e.text for e in dev])
    with pytest.raises(BundleError, match="cuda"):
        TextClassifier(read_bundle(tmp_path / "tiny"), device="cuda")


@pytest.mark.parametrize("name", ["kim-cnn-trec6"])
def test_evaluate_command_prints_json_on_its_last_line(name, trec_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "evaluate", "--bundle", str(ZOO / name), "--data", str(trec_path), "--format", "trec"],
        capture_output=True, text=True, check=True, cwd=REPOSITORY,
    )
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["model"] == name and scored["n"] == 1500
    assert scored["accuracy"] > 0.9  # the sample comes from the file the bundle was trained on


def test_float16_storage_halves_the_file_and_keeps_parity(small_run, tmp_path):
    checkpoint, dev = small_run
    texts = [e.text for e in dev]
    export_bundle(checkpoint, tmp_path / "full", "full", texts)
    metrics = export_bundle(checkpoint, tmp_path / "half", "half", texts, storage="float16")
    full, half = (tmp_path / "full" / "model.onnx").stat().st_size, (tmp_path / "half" / "model.onnx").stat().st_size
    assert half < 0.55 * full
    stored = {init.name: init.data_type for init in onnx.load(str(tmp_path / "half" / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in stored.values()
    assert metrics["weight_storage"] == "float16" and metrics["parity_max_abs_logit_delta"] <= 1e-4
    assert 0 < metrics["float16_rounding_max_abs_logit_delta"] < 0.05 and metrics["float16_rounding_texts"] == len(texts)
    a = TextClassifier(read_bundle(tmp_path / "full")).probabilities(texts[:50])
    b = TextClassifier(read_bundle(tmp_path / "half")).probabilities(texts[:50])
    assert np.abs(a - b).max() < 0.01


def test_results_table_has_a_row_per_bundle(small_run, tmp_path):
    from training.evaluation.results_table import write_results

    checkpoint, dev = small_run
    export_bundle(checkpoint, tmp_path / "zoo" / "tiny-trec6", "tiny-trec6", [e.text for e in dev])
    [row] = write_results(tmp_path / "zoo", tmp_path / "results.md")
    assert row["bundle"] == "tiny-trec6" and row["data"] == "trec6"
    assert row["parameters"] == sum(t.numel() for t in checkpoint["state_dict"].values())
    assert row["accuracy"] == f"{100 * checkpoint['metrics']['dev_accuracy']:.1f} (dev)"
    assert row["latency_ms"] > 0 and row["throughput"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "| `tiny-trec6` | kim-cnn rand | trec6 |" in text and "| 31 | 4 |" in text  # the dilated table too


def test_a_window_tie_that_rounding_breaks_either_way_passes_parity_but_another_window_does_not(small_run):
    """A text with the same n-gram twice: its two windows score the same, so PyTorch's first
    and another runtime's second are the same explanation; a window that scores less is not."""
    checkpoint, _ = small_run
    model = load_model(checkpoint)
    encoder = encoder_for(checkpoint)
    token_ids, lengths = encoder.encode_batch(["what is the capital of peru , what is the capital of peru"])
    inputs = (torch.from_numpy(token_ids), torch.from_numpy(lengths))
    with torch.no_grad():
        features, starts = model.pooled_features(*inputs)
        scores = model.window_scores(*inputs)
    expected = starts.numpy()
    fired = (features > 0).numpy()
    width_index = 0
    per_width = model.config.feature_maps
    repeat = len("what is the capital of peru ,".split())  # the second copy starts this many tokens later
    feature = next(j for j in range(per_width) if features[0, j] > 0.01 and expected[0, j] + repeat < scores[0].shape[2]
                   and abs(float(scores[0][0, j, expected[0, j]] - scores[0][0, j, expected[0, j] + repeat])) <= export_module.PARITY_ATOL)
    tied = expected.copy()
    tied[0, feature] += repeat
    assert export_module.same_windows(model, inputs, expected, tied, fired)
    weaker = expected.copy()
    weaker[0, feature] = int(np.argmin(scores[width_index][0, feature].numpy()))
    assert not export_module.same_windows(model, inputs, expected, weaker, fired)
