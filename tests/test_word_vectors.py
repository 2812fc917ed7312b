"""Pretrained vectors for Kim's variants: three file formats read by hand-made files, missing
words initialised as Kim did, and the static / non-static / multichannel channels."""

import struct

import numpy as np
import pytest
import torch

from models.text_encoding import WordVocab
from training.data.datasets import read_trec
from training.jobs.classifier import load_model, train_classifier
from training.data.word_vectors import VectorFileError, detect_format, embedding_matrix, read_word_vectors

VOCAB = WordVocab(("<pad>", "<unk>", "what", "is", "naïve"))
VECTORS = {"what": [0.5, -1.0, 2.0], "is": [1.5, 0.25, -0.125], "naïve": [3.0, 3.0, 3.0], "absent": [9.0, 9.0, 9.0]}


def write_text(path, header: bool):
    lines = [f"{len(VECTORS)} 3"] if header else []
    lines += [" ".join([word, *map(str, values)]) for word, values in VECTORS.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_binary(path):
    with open(path, "wb") as file:
        file.write(f"{len(VECTORS)} 3\n".encode())
        for word, values in VECTORS.items():
            file.write(word.encode("utf-8") + b" " + struct.pack("<3f", *values) + b"\n")


@pytest.mark.parametrize("kind", ["word2vec-text", "word2vec-binary", "glove"])
def test_each_format_reads_the_vocabularys_words(kind, tmp_path):
    path = tmp_path / f"vectors.{kind}"
    {"word2vec-text": lambda p: write_text(p, True), "word2vec-binary": write_binary, "glove": lambda p: write_text(p, False)}[kind](path)
    assert detect_format(path) == kind
    vectors, dimension = read_word_vectors(path, VOCAB)
    assert dimension == 3 and set(vectors) == {"what", "is", "naïve"}  # "absent" is not in the vocabulary
    np.testing.assert_array_equal(vectors["is"], np.array([1.5, 0.25, -0.125], dtype=np.float32))


def test_missing_words_get_kims_uniform_vectors_and_pad_stays_zero():
    matrix = embedding_matrix(VOCAB, {"what": np.array([0.5, -1.0, 2.0], dtype=np.float32)}, 3, seed=1)
    assert matrix.shape == (5, 3)
    np.testing.assert_array_equal(matrix[0], 0.0)
    np.testing.assert_array_equal(matrix[2], [0.5, -1.0, 2.0])
    assert np.all(np.abs(matrix[[1, 3, 4]]) <= 0.25)


def test_a_malformed_vectors_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("what 0.1 0.2 0.3\nis 0.1 0.2\n")
    with pytest.raises(VectorFileError, match="line 2: 2 values, expected 3"):
        read_word_vectors(path, VOCAB)


@pytest.fixture(scope="module")
def glove_file(tmp_path_factory, trec_path):
    """Random 20-d vectors for most words of the first 300 TREC questions."""
    examples = read_trec(trec_path)[:300]
    rng = np.random.default_rng(0)
    words = sorted({w for e in examples for w in e.text.split()})[::2]  # half the words: the rest are missing
    path = tmp_path_factory.mktemp("vectors") / "glove.txt"
    path.write_text("\n".join(" ".join([w, *(f"{v:.4f}" for v in rng.normal(size=20))]) for w in words) + "\n")
    return path, examples


@pytest.mark.parametrize("preset, frozen, tuned", [("static", [0], []), ("non-static", [], [0]), ("multichannel", [1], [0])])
def test_variants_freeze_and_tune_the_right_channels(preset, frozen, tuned, glove_file):
    path, examples = glove_file
    checkpoint = train_classifier(examples[:250], examples[250:], preset=preset, lowercase=False, epochs=2,
                                  vectors_path=path, show_progress=False)
    assert checkpoint["config"]["embedding_dim"] == 20 and 0.3 < checkpoint["metrics"]["vectors_coverage"] < 0.7
    vocab = checkpoint["vocab"]
    vectors, _ = read_word_vectors(path, WordVocab(tuple(vocab)))
    word = sorted(vectors)[0]
    model = load_model(checkpoint)
    for channel in frozen:
        np.testing.assert_allclose(model.embeddings[channel].weight[vocab.index(word)].detach().numpy(), vectors[word], atol=1e-6)
    for channel in tuned:
        assert not np.allclose(model.embeddings[channel].weight[vocab.index(word)].detach().numpy(), vectors[word], atol=1e-6)


def test_a_pretrained_preset_without_vectors_says_what_is_missing(trec_path):
    examples = read_trec(trec_path)[:60]
    with pytest.raises(ValueError, match="--vectors FILE"):
        train_classifier(examples[:50], examples[50:], preset="static", epochs=1, show_progress=False)
