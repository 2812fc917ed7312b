"""The lecture notes' image CNN through the same pipeline: torch-free preprocessing shared by
training and serving, training whose loss falls, export with parity, the released digits-cnn
bundle's figure re-measured, show-filters, and the service's /classify-image and OIP v2."""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from models.image_encoding import ImageEncoder, ImageError, grid_from_grey, grid_from_picture
from services.backends.inference import ImageClassifier, read_bundle
from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server
from training.data import image_data
from training.bundles.export_image import export_image_bundle
from training.evaluation.show_filters import feature_maps, first_convolution, show_filters
from training.jobs.image import cv_image_cnn, load_image_model, shifted, svm_accuracy, train_image_cnn, train_image_ensemble

DIGITS = ZOO / "digits-cnn"
TRAIN, TEST, LABELS = image_data.digits()


def picture(grid: np.ndarray, side: int = 112, dark_ink: bool = True, fmt: str = "PNG") -> bytes:
    """A digit grid drawn as a picture: scaled up, dark ink on white paper (or the reverse)."""
    grey = (grid / 16.0 * 255).astype(np.uint8)
    image = Image.fromarray(255 - grey if dark_ink else grey).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def quick_checkpoint():
    """The digits network, 6 epochs (a couple of seconds)."""
    return train_image_cnn(TRAIN, TEST, LABELS, preset="digits", epochs=6)


def test_the_fixed_split_holds_out_the_last_360_digits():
    assert len(TRAIN[0]) == 1437 and len(TEST[0]) == 360 and LABELS == [str(d) for d in range(10)]
    assert TRAIN[0].shape[1:] == (8, 8) and 0 <= TRAIN[0].min() and TRAIN[0].max() == 16


def test_training_loss_falls_and_the_digits_are_learnt(quick_checkpoint):
    history = quick_checkpoint["metrics"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 3
    assert quick_checkpoint["metrics"]["dev_accuracy"] > 0.85


def test_export_has_parity_and_the_service_classifier_agrees_with_torch(quick_checkpoint, tmp_path):
    metrics = export_image_bundle(quick_checkpoint, tmp_path / "digits-quick", "digits-quick", TEST[0])
    assert metrics["parity_max_abs_logit_delta"] <= 1e-4
    classifier = ImageClassifier(read_bundle(tmp_path / "digits-quick"))
    from training.jobs.image import load_image_model

    model = load_image_model(quick_checkpoint)
    images = ImageEncoder().encode(TEST[0][:50])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(images)), dim=1).numpy()
    np.testing.assert_allclose(classifier.probabilities(TEST[0][:50]), expected, atol=1e-5)


def test_the_released_bundle_scores_what_its_metrics_say_on_the_held_out_digits():
    bundle = read_bundle(DIGITS)
    predicted = ImageClassifier(bundle).probabilities(TEST[0]).argmax(axis=1)
    accuracy = float((predicted == TEST[1]).mean())
    assert accuracy == pytest.approx(bundle.metrics["test_accuracy"], abs=1e-9)
    assert bundle.metrics["parity_max_abs_logit_delta"] <= 1e-4
    assert accuracy >= 0.9
    # The kernel-machine baseline beside it, on the same split: 347 of the 360.
    assert svm_accuracy(TRAIN, TEST) == pytest.approx(347 / 360)


def test_shifted_moves_each_image_by_at_most_the_shift_and_lets_no_ink_in():
    image = np.zeros((1, 1, 5, 5), dtype=np.float32)
    image[0, 0, 2, 2] = 1.0  # one ink pixel in the middle
    moved = shifted(np.repeat(image, 200, axis=0), 1, np.random.default_rng(0))
    rows, columns = np.nonzero(moved[:, 0].sum(axis=0))
    assert set(rows) == {1, 2, 3} and set(columns) == {1, 2, 3}  # all nine offsets in [-1, 1]^2 occur
    assert (moved.reshape(200, -1).sum(axis=1) == 1.0).all()  # the pixel moves, nothing else appears
    edge = np.zeros((1, 1, 5, 5), dtype=np.float32)
    edge[0, 0, 0, :] = 1.0  # the top row can fall off the image
    sums = shifted(np.repeat(edge, 200, axis=0), 1, np.random.default_rng(0)).reshape(200, -1).sum(axis=1)
    assert set(sums) <= {0.0, 4.0, 5.0} and 0.0 in sums
    assert shifted(image, 0, np.random.default_rng(0)) is image


def test_cross_validation_holds_out_contiguous_blocks_of_writers():
    result = cv_image_cnn(TRAIN, LABELS, preset="digits-16", folds=5, baseline="svm")
    # Fold 1 is the first 287 images (1,437 / 5 rounded), trained on the other 1,150.
    first = svm_accuracy((TRAIN[0][287:], TRAIN[1][287:]), (TRAIN[0][:287], TRAIN[1][:287]))
    assert len(result["fold_accuracies"]) == 5 and result["fold_accuracies"][0] == first
    assert result["mean_accuracy"] == pytest.approx(np.mean(result["fold_accuracies"]))


def test_an_ensemble_of_seeds_is_one_graph_serving_the_mean_of_its_members_logits(tmp_path):
    ensemble = train_image_ensemble(TRAIN, TEST, LABELS, 2, preset="digits", epochs=2)
    singles = [train_image_cnn(TRAIN, TEST, LABELS, preset="digits", epochs=2, seed=seed) for seed in (3435, 4435)]
    assert ensemble["metrics"]["member_seeds"] == [3435, 4435]  # member 0 is the single model of --seed
    assert ensemble["metrics"]["member_test_accuracies"] == [single["metrics"]["test_accuracy"] for single in singles]
    images = ImageEncoder.from_config(ensemble["encoding"]).encode(TEST[0])
    with torch.no_grad():  # by hand: the two networks' logits, averaged
        by_hand = np.mean([load_image_model(single)(torch.from_numpy(images)).numpy() for single in singles], axis=0)
    assert ensemble["metrics"]["test_accuracy"] == pytest.approx((by_hand.argmax(1) == TEST[1]).mean())
    metrics = export_image_bundle(ensemble, tmp_path / "digits-pair", "digits-pair", TEST[0])
    bundle = read_bundle(tmp_path / "digits-pair")
    assert bundle.config["ensemble"]["members"] == 2 and metrics["parameters"] == 2 * singles[0]["metrics"]["parameters"]
    np.testing.assert_allclose(ImageClassifier(bundle).logits_of_images(images), by_hand, atol=1e-4)  # one graph, one request


def test_cross_validation_of_an_ensemble_scores_it_as_served_and_its_members_beside_it():
    result = cv_image_cnn(TRAIN, LABELS, preset="digits", folds=2, overrides={"recipe.epochs": "1"}, members=2)
    half = int(np.linspace(0, len(TRAIN[0]), 3).round()[1])  # fold 1 holds out the first half, as cv_image_cnn cuts it
    first_block, rest = (TRAIN[0][:half], TRAIN[1][:half]), (TRAIN[0][half:], TRAIN[1][half:])
    members = [train_image_cnn(rest, first_block, LABELS, preset="digits", epochs=1, seed=seed) for seed in (3435, 4435)]
    assert result["members"] == 2 and len(result["fold_accuracies"]) == 2
    assert result["member_mean_accuracies"][0] == pytest.approx(np.mean([m["metrics"]["test_accuracy"] for m in members]))


def test_a_picture_of_a_digit_becomes_the_digits_grid():
    errors = [np.abs(grid_from_picture(picture(grid), 10**6) - grid).mean() for grid in TEST[0][:50]]
    assert np.median(errors) < 2.0  # on the 0..16 scale: resampling blurs, the shape stays
    # Dark ink on light paper and light ink on dark paper are the same digit.
    grid = TEST[0][7]
    np.testing.assert_allclose(grid_from_picture(picture(grid), 10**6), grid_from_picture(picture(grid, dark_ink=False), 10**6), atol=0.5)
    assert grid_from_picture(picture(grid, fmt="JPEG"), 10**6).shape == (8, 8)


def test_pictures_that_cannot_be_used_are_refused_with_the_reason():
    with pytest.raises(ImageError, match="blank"):
        grid_from_grey(np.ones((20, 20), dtype=np.float32))
    with pytest.raises(ImageError, match="not a readable image"):
        grid_from_picture(b"GIF89a but not really", 10**6)
    with pytest.raises(ImageError, match="TEXTSERVE_MAX_IMAGE_PIXELS"):
        grid_from_picture(picture(TEST[0][0], side=300), 200 * 200)  # 90,000 pixels against 40,000


def test_idx_pairs_and_picture_folders_are_read_like_the_digits(tmp_path):
    images = (TEST[0][:5] / 16 * 255).astype(np.uint8)
    with gzip.open(tmp_path / "images.idx.gz", "wb") as file:
        file.write(struct.pack(">HBB3I", 0, 8, 3, 5, 8, 8) + images.tobytes())
    with open(tmp_path / "labels.idx", "wb") as file:
        file.write(struct.pack(">HBBI", 0, 8, 1, 5) + TEST[1][:5].astype(np.uint8).tobytes())
    grids, labels, names = image_data.read_idx(tmp_path / "images.idx.gz", tmp_path / "labels.idx")
    np.testing.assert_allclose(grids, images.astype(np.float32) * 16 / 255)
    assert labels.tolist() == TEST[1][:5].tolist() and names[0] == "0"
    for index, grid in enumerate(TEST[0][:6]):
        folder = tmp_path / "pictures" / str(TEST[1][index])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.png").write_bytes(picture(grid))
    grids, labels, names = image_data.read_png_folder(tmp_path / "pictures")
    assert grids.shape == (6, 8, 8) and names == sorted({str(d) for d in TEST[1][:6]})
    assert [names[i] for i in labels] == sorted(str(d) for d in TEST[1][:6])


def test_show_filters_draws_the_first_layer_and_its_maps_as_the_served_graph_computes_them(tmp_path):
    weights, bias, padding = first_convolution(DIGITS / "model.onnx")
    config = read_bundle(DIGITS).config
    channels, kernel = config["model"]["conv_channels"][0], config["model"]["kernel_size"]
    assert weights.shape == (channels, 1, kernel, kernel) and padding == config["model"]["padding"]
    image = ImageEncoder.from_config(config["encoding"]).encode(TEST[0][:1])[0, 0]
    expected = F.relu(F.conv2d(torch.from_numpy(image)[None, None], torch.from_numpy(weights), torch.from_numpy(bias), padding=padding))[0]
    np.testing.assert_allclose(feature_maps(image, weights, bias, padding), expected.numpy(), atol=1e-5)
    out = tmp_path / "filters.png"
    show_filters(DIGITS, 0, out)
    with Image.open(out) as drawn:
        assert drawn.width > 600 and drawn.height > 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("bentoml_home"), ZOO, http_workers="1", models="digits-cnn,kim-cnn-trec6",
                        max_image_pixels=str(300 * 300)) as url:
        yield url


def test_the_readmes_seven_is_read_as_a_seven(server):
    """README: curl -s localhost:3000/classify-image -F model=digits-cnn -F images=@docs/examples/seven.png"""
    with open(REPOSITORY / "docs" / "examples" / "seven.png", "rb") as seven:
        answer = requests.post(f"{server}/classify-image", data={"model": "digits-cnn"}, timeout=30,
                               files=[("images", ("seven.png", seven, "image/png"))])
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["label"] == "7"


def test_classify_image_takes_arrays_base64_pictures_and_multipart(server):
    classifier = ImageClassifier(read_bundle(DIGITS))
    arrays = requests.post(f"{server}/classify-image", json={"model": "digits-cnn", "images": TEST[0][:10].tolist(), "top_k": 2}, timeout=30)
    assert arrays.status_code == 200, arrays.text
    results = arrays.json()["results"]
    served = np.array([[r["probabilities"][label] for label in LABELS] for r in results])
    np.testing.assert_allclose(served, classifier.probabilities(TEST[0][:10]), atol=1e-6)
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in results)
    pictures = [base64.b64encode(picture(grid)).decode() for grid in TEST[0][:40]]
    answer = requests.post(f"{server}/classify-image", json={"model": "digits-cnn", "images": pictures}, timeout=30).json()
    accuracy = np.mean([int(r["label"]) == label for r, label in zip(answer["results"], TEST[1][:40])])
    assert accuracy >= 0.9, accuracy
    upload = requests.post(f"{server}/classify-image", data={"model": "digits-cnn"}, timeout=30,
                           files=[("images", ("a.png", picture(TEST[0][0]), "image/png")), ("images", ("b.jpg", picture(TEST[0][1], fmt="JPEG"), "image/jpeg"))])
    assert upload.status_code == 200 and len(upload.json()["results"]) == 2
    kinds = {m["name"]: m["kind"] for m in requests.get(f"{server}/models", timeout=10).json()["models"]}
    assert kinds == {"digits-cnn": "image classifier", "kim-cnn-trec6": "classifier"}


def test_oip_v2_takes_the_fp32_image_tensor(server):
    side = read_bundle(DIGITS).config["model"]["input_size"]  # the grid as the released network reads it (16 for digits-16)
    metadata = requests.get(f"{server}/v2/models/digits-cnn", timeout=10).json()
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, side, side]}]
    images = ImageEncoder(size=side).encode(TEST[0][:3])
    body = {"inputs": [{"name": "images", "shape": [3, 1, side, side], "datatype": "FP32", "data": images.flatten().tolist()}]}
    answer = requests.post(f"{server}/v2/models/digits-cnn/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    expected = ImageClassifier(read_bundle(DIGITS)).probabilities(TEST[0][:3])
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(3, 10), expected, atol=1e-6)
    assert outputs["label"]["data"] == [LABELS[i] for i in expected.argmax(axis=1)]
    wrong = {"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    refused = requests.post(f"{server}/v2/models/digits-cnn/infer", json=wrong, timeout=30)
    assert refused.status_code == 400 and f"[N, 1, {side}, {side}]" in refused.json()["error"]


@pytest.mark.parametrize("images, status, says", [
    (["bm90IGFuIGltYWdl"], 400, "not a readable image"),  # base64 of "not an image"
    (["%%%"], 400, "not base64"),
    ([[[1, 2, 3], [4, 5]]], 400, "rows have different lengths"),
    ([[[0.0] * 8] * 8], 400, "has no ink"),
    ([[[99.0] * 8] * 8], 400, "ink amounts must be finite numbers from 0 to 16"),
    ([[[1.0] * 2] * 2], 400, "an array must be 4x4 to 256x256"),
    ([], 400, "images is empty"),
    ([TEST[0][0].tolist()] * 65, 413, "the limit is 64 (TEXTSERVE_MAX_IMAGES_PER_REQUEST)"),
])
def test_bad_images_get_a_4xx_that_says_what_was_wrong(server, images, status, says):
    answer = requests.post(f"{server}/classify-image", json={"model": "digits-cnn", "images": images}, timeout=30)
    assert answer.status_code == status and says in answer.json()["error"], answer.text


@pytest.mark.parametrize("top_k", ["²", "9" * 5000, "-1", "two"])
def test_a_multipart_top_k_that_is_not_a_whole_number_is_a_400(server, top_k):
    # "²" passes str.isdigit() and int() refuses it; 5000 digits are past what int() converts.
    answer = requests.post(f"{server}/classify-image", data={"model": "digits-cnn", "top_k": top_k}, timeout=30,
                           files=[("images", ("a.png", picture(TEST[0][0]), "image/png"))])
    assert answer.status_code == 400 and answer.json()["error"] == "top_k: must be a whole number"


def test_a_huge_picture_is_refused_before_decoding_and_text_models_stay_separate(server):
    huge = base64.b64encode(picture(TEST[0][0], side=400)).decode()  # 160,000 pixels, limit 90,000 here
    answer = requests.post(f"{server}/classify-image", json={"model": "digits-cnn", "images": [huge]}, timeout=30)
    assert answer.status_code == 413 and "TEXTSERVE_MAX_IMAGE_PIXELS" in answer.json()["error"]
    wrong_kind = requests.post(f"{server}/classify-image", json={"model": "kim-cnn-trec6", "images": [TEST[0][0].tolist()]}, timeout=30)
    assert wrong_kind.status_code == 400 and "needs an image classifier" in wrong_kind.json()["error"]
    text_on_image = requests.post(f"{server}/classify", json={"model": "digits-cnn", "texts": ["seven"]}, timeout=30)
    assert text_on_image.status_code == 400 and "is an image classifier" in text_on_image.json()["error"]


def test_the_results_table_has_an_image_section_with_the_re_measured_accuracy(tmp_path):
    from training.evaluation.results_table import write_results

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "digits-cnn").symlink_to(DIGITS)
    [row] = write_results(zoo, tmp_path / "results.md")
    assert row["test_accuracy"] == pytest.approx(row["recorded_test_accuracy"])
    text = (tmp_path / "results.md").read_text()
    metrics, config = read_bundle(DIGITS).metrics, read_bundle(DIGITS).config
    recorded = 100 * metrics["test_accuracy"]
    members = f" × {config['ensemble']['members']} seeds" if "ensemble" in config else ""
    assert "## Image classifiers" in text and (f"| `digits-cnn` | {config['preset']}{members} | {recorded:.1f} / {recorded:.1f} | "
                                               f"{row['selection']} | 96.4 (C=10, gamma=0.001) |") in text
    assert "train-image" in text and "cv-image" in text and row["svm_test_accuracy"] == pytest.approx(100 * 347 / 360)


def test_images_go_through_the_batcher_and_are_counted_in_the_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = requests.get(f"{server}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def total(values: dict, name: str, **labels) -> float:
        return sum(v for (n, l), v in values.items() if n == name and all(dict(l).get(k) == x for k, x in labels.items()))

    before = samples()
    for _ in range(3):
        answer = requests.post(f"{server}/classify-image", json={"model": "digits-cnn", "images": TEST[0][:5].tolist()}, timeout=30)
        assert answer.status_code == 200 and float(answer.headers["x-inference-time"]) > 0
    after = samples()
    assert total(after, "textserve_texts_total", model="digits-cnn") - total(before, "textserve_texts_total", model="digits-cnn") == 15
    ok = dict(model="digits-cnn", endpoint="/classify-image", status="200")
    assert total(after, "textserve_requests_total", **ok) - total(before, "textserve_requests_total", **ok) == 3
    assert total(after, "textserve_batch_texts_count") - total(before, "textserve_batch_texts_count") == 3
