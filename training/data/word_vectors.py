"""Pretrained word vectors for Kim's static / non-static / multichannel CNNs, read from a file
the user supplies (nothing is downloaded):

- word2vec text: a header line "COUNT DIM", then "word v1 ... vDIM" per line;
- word2vec binary (GoogleNews-vectors-negative300.bin): the same header, then per word its
  bytes up to a space and DIM little-endian float32 values (an optional newline between);
- GloVe: "word v1 ... vDIM" per line, no header;
- a character-aware language model bundle (a folder, models/zoo/char-lm-*): every word gets the
  vector the LM's word encoder builds from its characters (after the highway layers, lower-cased
  as the LM was trained), so no word is missing: the lecture's "pre-training" and "character-level
  embedding for unknown words" in one.

Only words of the vocabulary are kept, so a 3-million-word file streams through in constant
memory. Words the file lacks get U[-0.25, 0.25] vectors, as in Kim's CNN_sentence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.text_encoding import PAD_ID, WordVocab

FORMATS = ("auto", "word2vec-text", "word2vec-binary", "glove", "char-lm")
LM_BATCH_WORDS = 4096


class VectorFileError(ValueError):
    """The vectors file is not in the format it claims; the message names file and line/entry."""


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "char-lm"
    with open(path, "rb") as file:
        first_line = file.readline(4096)
    parts = first_line.split()
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        with open(path, "rb") as file:
            file.readline()
            sample = file.read(4096)
        try:
            sample.decode("utf-8")
            looks_text = all(byte >= 9 for byte in sample[:512])
        except UnicodeDecodeError:
            looks_text = False
        return "word2vec-text" if looks_text else "word2vec-binary"
    return "glove"


def read_word_vectors(path: str | Path, vocab: WordVocab, vector_format: str = "auto") -> tuple[dict[str, np.ndarray], int]:
    """({word: float32 vector} for the vocabulary's words found in the file, dimension)."""
    path = Path(path)
    if vector_format not in FORMATS:
        raise ValueError(f"unknown vectors format {vector_format!r}; expected one of {FORMATS}")
    if vector_format == "auto":
        vector_format = detect_format(path)
    wanted = set(vocab.tokens[2:])
    if vector_format == "char-lm":
        return read_language_model_vectors(path, sorted(wanted))
    if vector_format == "word2vec-binary":
        return read_binary(path, wanted)
    return read_text(path, wanted, has_header=vector_format == "word2vec-text")


def read_language_model_vectors(bundle_path: Path, words: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Every word's vector from a character-aware LM bundle's word encoder (onnxruntime)."""
    from services.backends.inference import read_bundle
    from services.backends.language_model import CharLanguageModel

    language_model = CharLanguageModel(read_bundle(bundle_path))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(words), LM_BATCH_WORDS):
        batch = words[start : start + LM_BATCH_WORDS]
        for word, vector in zip(batch, language_model.vectors([w.lower() for w in batch])):
            found[word] = vector.astype(np.float32)
    dimension = language_model.bundle.config["model"]["filters"]
    return found, sum(dimension)


def read_text(path: Path, wanted: set[str], has_header: bool) -> tuple[dict[str, np.ndarray], int]:
    found: dict[str, np.ndarray] = {}
    dimension = None
    with open(path, encoding="utf-8", errors="strict") as file:
        for number, line in enumerate(file, start=1):
            if has_header and number == 1:
                dimension = int(line.split()[1])
                continue
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) < 2:
                if not line.strip():
                    continue
                raise VectorFileError(f"{path} line {number}: expected 'word v1 v2 ...', got {line[:60]!r}")
            dimension = dimension or len(parts) - 1
            if len(parts) - 1 != dimension:
                raise VectorFileError(f"{path} line {number}: {len(parts) - 1} values, expected {dimension}")
            if parts[0] in wanted:
                try:
                    found[parts[0]] = np.array(parts[1:], dtype=np.float32)
                except ValueError:
                    raise VectorFileError(f"{path} line {number}: a value is not a number") from None
    if dimension is None:
        raise VectorFileError(f"{path}: no vectors in the file")
    return found, dimension


def read_binary(path: Path, wanted: set[str]) -> tuple[dict[str, np.ndarray], int]:
    found: dict[str, np.ndarray] = {}
    with open(path, "rb") as file:
        header = file.readline().split()
        count, dimension = int(header[0]), int(header[1])
        for entry in range(1, count + 1):
            word = bytearray()
            while True:
                byte = file.read(1)
                if not byte:
                    raise VectorFileError(f"{path}: the file ends inside entry {entry} of {count}")
                if byte == b" ":
                    break
                if byte != b"\n":  # the newline that ends the previous vector
                    word += byte
            raw = file.read(4 * dimension)
            if len(raw) != 4 * dimension:
                raise VectorFileError(f"{path}: entry {entry} of {count} has a short vector")
            text = word.decode("utf-8", errors="replace")
            if text in wanted:
                found[text] = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return found, dimension


def embedding_matrix(vocab: WordVocab, vectors: dict[str, np.ndarray], dimension: int, seed: int, init_range: float = 0.25) -> np.ndarray:
    """(V, dimension): pretrained rows where known, U[-init_range, init_range] elsewhere, 0 for <pad>."""
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-init_range, init_range, size=(len(vocab), dimension)).astype(np.float32)
    for index, word in enumerate(vocab.tokens):
        if word in vectors:
            matrix[index] = vectors[word]
    matrix[PAD_ID] = 0.0
    return matrix
