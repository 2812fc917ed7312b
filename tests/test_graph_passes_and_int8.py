"""The conv1d-as-conv2d graph pass (same numbers, 2-D kernels) and the int8 bundles' gates."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from training.__main__ import parser
from training.arguments import recorded_arguments
from training.bundles import export_classifier as export_module
from training.bundles import quantize as quantize_module
from training.data.datasets import read_trec, split_dev
from training.bundles.export_classifier import ExportRefused, export_bundle, optimize_bundle
from training.bundles.graph_passes import conv1d_as_conv2d, drop_height_round_trips
from training.bundles.quantize import QuantizationRefused, quantize_bundle
from training.jobs.classifier import train_classifier

from tests.conftest import SAMPLE_DATA


def one_d_graph() -> onnx.ModelProto:
    """x (B, 2, L) -> Conv (3 filters, width 3, pads 1/1, dilation 2, stride 1) -> MaxPool (2, stride 2)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((3, 2, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "bias")
    nodes = [
        helper.make_node("Conv", ["x", "weight", "bias"], ["convolved"], kernel_shape=[3], pads=[1, 1], dilations=[2], strides=[1]),
        helper.make_node("MaxPool", ["convolved"], ["y"], kernel_shape=[2], strides=[2]),
    ]
    graph = helper.make_graph(
        nodes, "one_d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "pooled"])], initializer=[weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(graph_model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_convolution_computed_by_hand_is_unchanged_by_the_pass():
    # One filter [1, 2, 3] over [1, 0, 0, 0, 1], no padding: windows [1,0,0], [0,0,0], [0,0,1] -> [1, 0, 3].
    weight = numpy_helper.from_array(np.array([[[1.0, 2.0, 3.0]]], dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "weight"], ["y"], kernel_shape=[3])], "by_hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])], initializer=[weight],
    )
    graph_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert conv1d_as_conv2d(graph_model) == 1
    (conv,) = [node for node in graph_model.graph.node if node.op_type == "Conv"]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[1, 3]]
    x = np.array([[[1.0, 0.0, 0.0, 0.0, 1.0]]], dtype=np.float32)
    np.testing.assert_array_equal(run(graph_model, x), [[[1.0, 0.0, 3.0]]])


def test_the_pass_keeps_padding_dilation_pooling_and_a_dynamic_length():
    original = one_d_graph()
    rewritten = one_d_graph()
    assert conv1d_as_conv2d(rewritten) == 2
    assert conv1d_as_conv2d(rewritten) == 0  # nothing 1-D is left
    for length in (7, 12, 31):
        x = np.random.default_rng(length).standard_normal((4, 2, length)).astype(np.float32)
        before, after = run(original, x), run(rewritten, x)
        assert before.shape == after.shape
        np.testing.assert_allclose(after, before, atol=1e-5)


@pytest.fixture(scope="module")
def trec_split():
    """TREC's committed sample split as `train` splits it by default (10 %, seed 3435)."""
    path = SAMPLE_DATA / "trec.txt"
    train, dev = split_dev(read_trec(path), dev_fraction=0.1, seed=3435)
    return path, train, dev


def released(checkpoint, folder, name, trec_split):
    """A bundle as `python -m training train ...` then `export` would have released it."""
    path, train, dev = trec_split
    words = ["train", "--data", str(path), "--format", "trec", "--out", "x.pt"]
    checkpoint["metrics"].update(train_command=f"python -m training {' '.join(words)}",
                                 train_arguments=recorded_arguments(parser().parse_args(words)))
    export_bundle(checkpoint, folder / name, name, [e.text for e in dev])
    return folder / name


@pytest.fixture(scope="module")
def cnn_bundle(trec_split, tmp_path_factory):
    _, train, dev = trec_split
    checkpoint = train_classifier(train, dev, epochs=2, show_progress=False)
    return released(checkpoint, tmp_path_factory.mktemp("cnn"), "cnn", trec_split)


@pytest.fixture(scope="module")
def lstm_bundle(trec_split, tmp_path_factory):
    _, train, dev = trec_split
    checkpoint = train_classifier(train, dev, architecture_name="rnn", preset="lstm", epochs=2, show_progress=False,
                                  overrides={"hidden_size": "32"})
    return released(checkpoint, tmp_path_factory.mktemp("lstm"), "lstm", trec_split)


def conv_kernels(onnx_path) -> list[list[int]]:
    graph = onnx.load(str(onnx_path)).graph
    return [list(a.ints) for node in graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "kernel_shape"]


def test_export_writes_two_d_convolutions(cnn_bundle):
    kernels = conv_kernels(cnn_bundle / "model.onnx")
    assert len(kernels) == 3 and all(len(kernel) == 2 and kernel[0] == 1 for kernel in kernels)
    assert read_bundle(cnn_bundle).config["onnx"]["graph_passes"] == ["conv1d-as-conv2d"]


def test_optimize_rewrites_an_old_bundle_with_parity(trec_split, tmp_path, monkeypatch):
    """A bundle exported before the pass existed (1-D convolutions) is rewritten in place: the
    same logits on the dev texts, the pass and its parity recorded; a second run is refused."""
    _, train, dev = trec_split
    checkpoint = train_classifier(train, dev, epochs=1, show_progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(export_module, "apply_graph_passes", lambda path: [])
        old = released(checkpoint, tmp_path, "old", trec_split)
    assert all(len(kernel) == 1 for kernel in conv_kernels(old / "model.onnx"))
    texts = [e.text for e in dev]
    before = TextClassifier(read_bundle(old)).logits(texts)
    metrics = optimize_bundle(old, texts)
    assert all(len(kernel) == 2 for kernel in conv_kernels(old / "model.onnx"))
    after = TextClassifier(read_bundle(old)).logits(texts)
    np.testing.assert_allclose(after, before, atol=1e-4)
    assert metrics["graph_pass_max_abs_logit_delta"] <= 1e-4 and metrics["graph_pass_texts"] == len(texts)
    assert read_bundle(old).config["onnx"]["graph_passes"] == ["conv1d-as-conv2d"]
    sha256 = read_bundle(old).sha256
    with pytest.raises(ExportRefused, match="no graph pass applies"):
        optimize_bundle(old, texts)
    assert read_bundle(old).sha256 == sha256  # refused: left as it was


def test_an_lstm_bundle_gets_dynamic_int8_within_its_gate(lstm_bundle, trec_split):
    metrics = quantize_bundle(lstm_bundle, "python -m training quantize --bundle lstm")
    int8_dir = lstm_bundle.with_name("lstm-int8")
    bundle = read_bundle(int8_dir)
    assert bundle.name == "lstm-int8" and bundle.config["quantization"]["of"] == "lstm"
    assert bundle.config["quantization"]["method"].startswith("dynamic int8")
    ops = {node.op_type for node in onnx.load(str(int8_dir / "model.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert metrics["int8_accuracy_drop"] <= 0.005 and metrics["dev_examples"] == len(trec_split[2])
    assert metrics["fp32_dev_accuracy"] == pytest.approx(read_bundle(lstm_bundle).metrics["dev_accuracy"], abs=1.5 / 150)
    # The int8 bundle serves like any other: same labels, and nearly the same logits.
    texts = [e.text for e in trec_split[2]]
    fp32, int8 = TextClassifier(read_bundle(lstm_bundle)).logits(texts), TextClassifier(bundle).logits(texts)
    assert (fp32.argmax(axis=1) == int8.argmax(axis=1)).mean() >= 0.95
    assert np.abs(fp32 - int8).max() < 0.5


def test_a_cnn_bundle_gets_static_qdq_int8_not_conv_integer(cnn_bundle, tmp_path):
    metrics = quantize_bundle(cnn_bundle, "quantize", out_dir=tmp_path / "cnn-int8")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "cnn-int8" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "ConvInteger" not in ops
    assert metrics["calibration_texts"] > 0 and metrics["int8_accuracy_drop"] <= 0.005
    assert read_bundle(tmp_path / "cnn-int8").config["quantization"]["method"].startswith("static QDQ")


def test_the_gate_refuses_an_int8_bundle_that_costs_too_much(lstm_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "MAX_ACCURACY_DROP", -1.0)  # demand an int8 model 100 points better
    with pytest.raises(QuantizationRefused, match="drop"):
        quantize_bundle(lstm_bundle, "quantize", out_dir=tmp_path / "refused-int8")
    assert not (tmp_path / "refused-int8").exists()


def test_quantize_refuses_when_the_dev_split_cannot_be_reproduced(lstm_bundle, tmp_path):
    other = tmp_path / "lstm"
    shutil.copytree(lstm_bundle, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["train_arguments"]["seed"] = 7  # not the split the recorded dev accuracy came from
    (other / "metrics.json").write_text(json.dumps(metrics))
    from training.bundles.writing import write_manifest

    write_manifest(other)
    with pytest.raises(QuantizationRefused, match="not the recorded"):
        quantize_bundle(other, "quantize")
    assert not other.with_name("lstm-int8").exists()


def test_a_bundle_written_before_arguments_were_values_is_given_them_once_and_quantizes(lstm_bundle, trec_split, tmp_path):
    old = tmp_path / "old-lstm"
    shutil.copytree(lstm_bundle, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["train_arguments"]  # as bundles were written before 2026-12-06: the command line alone
    (old / "metrics.json").write_text(json.dumps(metrics))
    from training.bundles.writing import write_manifest

    write_manifest(old)
    with pytest.raises(SystemExit, match=r"record-arguments --bundle BUNDLE -- train --data .* --format trec --out x.pt"):
        quantize_bundle(old, "quantize")
    from training.__main__ import main

    path, _, _ = trec_split
    main(["record-arguments", "--bundle", str(old), "--", "train", "--data", str(path), "--format", "trec", "--out", "x.pt"])
    assert json.loads((old / "metrics.json").read_text())["train_arguments"]["data"] == str(path)
    assert quantize_bundle(old, "quantize")["dev_examples"] > 0


def test_the_language_model_gets_int8_within_one_percent_perplexity(tiny_lm_bundle, tmp_path):
    from models.text_encoding import tokenize
    from training.data.datasets import read_mr_dir

    tokens = [t for e in read_mr_dir(SAMPLE_DATA / "mr") for t in (*tokenize(e.text), "<eos>")]
    valid = tokens[int(0.9 * len(tokens)):]  # the tiny LM's own validation part
    metrics = quantize_bundle(tiny_lm_bundle, "quantize", out_dir=tmp_path / "lm-int8", valid_tokens=valid)
    assert metrics["int8_perplexity_rise"] <= 0.01
    served = CharLanguageModel(read_bundle(tmp_path / "lm-int8"))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "lm-int8" / "step.onnx")).graph.node}
    assert "DynamicQuantizeLSTM" in ops
    assert served.next_words("the movie is", 3)[1]


def test_the_results_command_shows_an_int8_bundle_beside_its_source(lstm_bundle, tmp_path, capsys):
    from training.__main__ import main

    zoo = tmp_path / "zoo"
    shutil.copytree(lstm_bundle, zoo / "lstm")
    quantize_bundle(zoo / "lstm", "quantize")
    main(["results", "--zoo", str(zoo), "--out", str(tmp_path / "results.md")])
    printed = capsys.readouterr().out
    assert "lstm-int8: quality" in printed and "batch-1 speed-up" in printed
    table = (tmp_path / "results.md").read_text()
    assert "## int8 variants" in table and "| `lstm-int8` | dynamic int8" in table
    assert "| `lstm` |" in table and "| `lstm-int8` | rnn" not in table  # int8 only in its own section


def test_the_operator_profile_finds_the_convolutions_of_a_cnn_bundle(cnn_bundle, capsys):
    from training.bench.op_profile import main, operator_times

    per_run_ms, by_operator = operator_times(cnn_bundle, batch=8, runs=3, threads=1)
    assert per_run_ms > 0 and by_operator["Conv"] > 0  # the 2-D rewrite keeps them Conv
    assert per_run_ms == pytest.approx(sum(by_operator.values()) / 3 / 1000)
    main(["--bundle", str(cnn_bundle), "--batch", "4", "--runs", "2"])
    assert f"| `{cnn_bundle.name}` |" in capsys.readouterr().out


def masked_residual_graph() -> onnx.ModelProto:
    """x (B, 2, L), mask (B, 1, L) -> h = Relu(Conv(x)) * mask -> y = h + Relu(Conv(h)) * mask
    -> max over time (B, 2): the dilated CNN's shape, with a 3-D step between convolutions."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((2, 2, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 2, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Mul", ["r1", "mask"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["c2"], kernel_shape=[3], pads=[2, 2], dilations=[2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Mul", ["r2", "mask"], ["m2"]),
        helper.make_node("Add", ["h", "m2"], ["y"]),
        helper.make_node("ReduceMax", ["y"], ["pooled"], axes=[2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "masked_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "length"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "length"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 2])], initializer=[w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dropping_height_round_trips_keeps_the_numbers_and_the_stack_four_d():
    original, rewritten = masked_residual_graph(), masked_residual_graph()
    conv1d_as_conv2d(rewritten)
    assert drop_height_round_trips(rewritten) == 1  # the Unsqueeze before the second convolution
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    second_conv = [n for n in rewritten.graph.node if n.op_type == "Conv"][1]
    assert producers[second_conv.input[0]].op_type == "Mul"  # computed on 4-D tensors, no Squeeze/Unsqueeze between
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Relu") == 2 and ops.count("Mul") == 2  # nothing computed twice, in 3-D and 4-D
    assert ops.count("Squeeze") == 2  # h for the residual Add, and the second convolution's output
    assert drop_height_round_trips(rewritten) == 0
    for length in (5, 9, 20):
        rng = np.random.default_rng(length)
        x = rng.standard_normal((3, 2, length)).astype(np.float32)
        mask = (rng.random((3, 1, length)) > 0.3).astype(np.float32)
        run_both = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "mask": mask})[0]
                    for m in (original, rewritten)]
        np.testing.assert_allclose(run_both[1], run_both[0], atol=1e-5)
