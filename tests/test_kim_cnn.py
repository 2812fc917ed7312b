"""Kim's CNN: shapes, the max-norm, training that learns, and padding that never moves a logit."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.kim_cnn import KimCNN, kim_cnn_config
from training.data.datasets import read_trec, split_dev
from training.bundles.export_classifier import export_onnx
from training.jobs.classifier import batch_tensors, train_classifier


def random_model(vocab_size=50, num_classes=4, seed=0) -> KimCNN:
    torch.manual_seed(seed)
    model = KimCNN(kim_cnn_config("rand", vocab_size=vocab_size, num_classes=num_classes)).eval()
    # Kim starts the output at zero and the conv biases at zero, which would hide what padding does;
    # a trained model has neither, so give both random values.
    torch.nn.init.normal_(model.output.weight, std=0.5)
    for convolution in model.convolutions:
        torch.nn.init.normal_(convolution.bias, mean=0.3, std=0.3)
    return model


def alone_and_padded(short_text: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text alone, and the same text as row 0 of a batch whose other row is 3x as long."""
    long_text = [7, 8, 9] * len(short_text)
    alone = batch_tensors([short_text])
    batched = batch_tensors([short_text, long_text])
    assert batched[0].shape[1] == 3 * len(short_text)
    return alone, batched


def test_config_holds_the_papers_values():
    config = kim_cnn_config("rand", vocab_size=10, num_classes=2)
    assert (config.embedding_dim, config.filter_widths, config.feature_maps) == (300, (3, 4, 5), 100)
    recipe = config.recipe
    assert (config.dropout, config.max_norm, recipe.optimizer, recipe.batch_size, recipe.adadelta_rho, recipe.epochs) == (0.5, 3.0, "adadelta", 50, 0.95, 25)
    assert config.edge_padding == 4
    with pytest.raises(ValueError, match="unknown preset"):
        kim_cnn_config("fancy", vocab_size=10, num_classes=2)


def test_forward_returns_logits_of_shape_batch_by_classes():
    model = random_model()
    token_ids, lengths = batch_tensors([[0, 0, 0, 0, 5, 6, 0, 0, 0, 0], [0, 0, 0, 0, 5, 0, 0, 0, 0]])
    assert model(token_ids, lengths).shape == (2, 4)


def test_padding_does_not_change_a_prediction_in_pytorch():
    model = random_model()
    # Kim's edge padding already gives every text all-padding windows of widths 3 and 4, so an
    # unmasked batch moves a logit through the width-5 filters, whenever every real window
    # scores below the filter's bias. Make that so (positive vectors, negative filters).
    with torch.no_grad():
        model.embeddings[0].weight.abs_()
        model.convolutions[2].weight.abs_().neg_()
    short = [0, 0, 0, 0, 11, 12, 13, 0, 0, 0, 0]
    (ids_alone, len_alone), (ids_batch, len_batch) = alone_and_padded(short)
    with torch.no_grad():
        alone = model(ids_alone, len_alone)[0]
        batched = model(ids_batch, len_batch)[0]
        unmasked = model(ids_batch, torch.full_like(len_batch, ids_batch.shape[1]))[0]
    assert torch.allclose(alone, batched, atol=1e-5)
    # Without the mask the windows in the batch's padding are pooled too: the test can fail.
    assert (alone - unmasked).abs().max() > 0.01


def test_padding_does_not_change_a_prediction_in_onnxruntime(tmp_path):
    model = random_model()
    export_onnx(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    short = [0, 0, 0, 0, 21, 22, 23, 24, 0, 0, 0, 0]
    (ids_alone, len_alone), (ids_batch, len_batch) = alone_and_padded(short)
    alone = session.run(None, {"token_ids": ids_alone.numpy(), "lengths": len_alone.numpy()})[0][0]
    batched = session.run(None, {"token_ids": ids_batch.numpy(), "lengths": len_batch.numpy()})[0][0]
    np.testing.assert_allclose(alone, batched, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(alone, model(ids_alone, len_alone)[0].numpy(), atol=1e-5)


def test_max_norm_caps_each_output_row_at_three():
    model = random_model()
    with torch.no_grad():
        model.output.weight[0].fill_(1.0)  # norm sqrt(300) ~ 17.3
        model.output.weight[1].fill_(0.01)  # norm 0.17, left alone
    before = model.output.weight[1].clone()
    model.apply_constraints()
    norms = model.output.weight.norm(dim=1)
    assert norms[0].item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(model.output.weight[1], before)


def test_padding_row_stays_zero_through_training(trec_path):
    examples = read_trec(trec_path)[:300]
    checkpoint = train_classifier(examples[:250], examples[250:], epochs=1, show_progress=False)
    assert torch.count_nonzero(checkpoint["state_dict"]["embeddings.0.weight"][0]) == 0


def test_training_loss_falls_and_beats_chance(trec_path, tmp_path):
    train, dev = split_dev(read_trec(trec_path)[:1200], dev_fraction=0.2, seed=1)
    checkpoint = train_classifier(train, dev, epochs=4, show_progress=False)
    losses = [epoch["train_loss"] for epoch in checkpoint["metrics"]["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert checkpoint["metrics"]["dev_accuracy"] > 0.5  # six classes, the largest is 23 %
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    reloaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data, no pickled module
    assert reloaded["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]



def test_kims_init_bound_is_theanos_with_the_pooled_fan_out():
    torch.manual_seed(0)
    model = KimCNN(kim_cnn_config("rand", vocab_size=10, num_classes=2, kim_init_length=45))
    xavier = KimCNN(kim_cnn_config("rand", vocab_size=10, num_classes=2))
    for convolution, reference, width in zip(model.convolutions, xavier.convolutions, (3, 4, 5)):
        # By hand, CNN_sentence: fan_in = 300 * width, fan_out = 100 * width * 300 / (45 - width + 1).
        bound = (6 / (300 * width + 100 * width * 300 / (46 - width))) ** 0.5
        assert convolution.weight.abs().max() <= bound and convolution.weight.abs().max() > 0.99 * bound
        assert bound / ((6 / (400 * width)) ** 0.5) == pytest.approx(0.63, abs=0.01)  # against Xavier's
        assert reference.weight.abs().max() > 1.5 * bound


def test_pooling_over_padding_adds_one_padding_window_whatever_the_batch():
    torch.manual_seed(0)
    model = KimCNN(kim_cnn_config("rand", vocab_size=50, num_classes=3, pool_padding=True)).eval()
    with torch.no_grad():  # every real window of the width-5 filters scores below their biases
        model.embeddings[0].weight.abs_()
        model.convolutions[2].weight.abs_().neg_()
        model.convolutions[2].bias.fill_(0.7)
    short = [0, 0, 0, 0, 11, 12, 13, 0, 0, 0, 0]
    (ids_alone, len_alone), (ids_batch, len_batch) = alone_and_padded(short)
    with torch.no_grad():
        features_alone, starts_alone = model.pooled_features(ids_alone, len_alone)
        features_batch, _ = model.pooled_features(ids_batch, len_batch)
        torch.testing.assert_close(features_alone[0], features_batch[0])  # the batch's padding changes nothing
        width5 = slice(200, 300)
        assert torch.all(features_alone[0, width5] == 0.7)  # each filter: relu(bias) of its padding window
        assert torch.all(starts_alone[0, width5] == len(short) - 5 + 1)  # the window past the row's end
        masked = KimCNN(kim_cnn_config("rand", vocab_size=50, num_classes=3))
        masked.load_state_dict(model.state_dict())
        assert torch.all(masked.eval().pooled_features(ids_alone, len_alone)[0][0, width5] == 0)


def test_shuffling_batches_keeps_kims_batches_and_moves_only_their_order():
    from models.recipe import TrainingRecipe

    recipe = TrainingRecipe(batch_size=4, shuffle="batches")
    rng = np.random.default_rng(3)
    fixed = rng.permutation(10)
    epochs = [recipe.epoch_batches(10, rng, fixed) for _ in range(3)]
    expected = sorted(tuple(fixed[start:start + 4]) for start in (0, 4, 8))
    for batches in epochs:
        assert sorted(tuple(batch) for batch in batches) == expected  # the same three batches every epoch
    assert len({tuple(tuple(batch) for batch in batches) for batches in epochs}) > 1  # in another order
    fresh = TrainingRecipe(batch_size=4).epoch_batches(10, np.random.default_rng(3))
    assert sorted(np.concatenate(fresh).tolist()) == list(range(10)) and [len(b) for b in fresh] == [4, 4, 2]
    with pytest.raises(ValueError, match="unknown shuffle"):
        TrainingRecipe(shuffle="never")


def test_a_model_pooling_over_padding_exports_and_explains_as_served(trec_path, tmp_path):
    from services.backends.explain import explain_texts
    from services.backends.inference import TextClassifier, read_bundle
    from training.bundles.export_classifier import export_bundle

    train, dev = split_dev(read_trec(trec_path)[:300], dev_fraction=0.2, seed=1)
    checkpoint = train_classifier(train, dev, epochs=1, show_progress=False,
                                  overrides={"pool_padding": "true", "feature_maps": "8", "embedding_dim": "20"})
    metrics = export_bundle(checkpoint, tmp_path / "padded", "padded", [e.text for e in dev], storage="float32")
    assert metrics["parity_max_abs_logit_delta"] <= 1e-4  # the export's own gate, through the graph passes
    classifier = TextClassifier(read_bundle(tmp_path / "padded"))
    text = "Who wrote Hamlet ?"
    alone = classifier.logits([text])[0]
    np.testing.assert_allclose(classifier.logits([text, "What is the longest river in the whole wide world of ours ?"])[0], alone, atol=1e-5)
    [explained] = explain_texts(classifier, [text], top_k=100)
    total = explained["bias"] + sum(n["contribution"] for n in explained["ngrams"]) + explained["rest"]
    assert total == pytest.approx(explained["logit"], abs=1e-4)
