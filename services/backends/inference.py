"""Model bundles and their onnxruntime sessions: the one inference path that the service and
`python -m training evaluate` share. Torch-free.

A classifier bundle folder holds model.onnx, vocab.json, labels.json, config.json, metrics.json
and manifest.json (every other file's sha256, checked here before a session is made); a
language-model bundle has step.onnx and word_encoder.onnx instead of model.onnx, and no labels.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.text_encoding import WordVocab, encoder_from_config
from services.backends.bundle_format import BundleError, check_classifier_graph, check_files
from services.backends.cost_batching import length_groups, measure_token_budget, padded_tokens, rows_at_typical_length

MANIFEST = "manifest.json"
LANGUAGE_MODEL_ARCHITECTURE = "char-lm"
DEVICES = ("cpu", "cuda")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    name: str
    path: Path
    config: dict
    labels: tuple[str, ...]
    metrics: dict
    sha256: str  # of manifest.json, which pins every other file

    @property
    def version(self) -> str:
        return version_of(self.sha256)

    @property
    def architecture(self) -> str:
        return self.config["architecture"]


def version_of(sha256: str) -> str:
    """A bundle's version as Triton's protocol writes versions, a decimal number (perf_analyzer
    reads it as one): the first 48 bits of its manifest's sha256 (or of a store tag's version,
    its first 16 hex digits), so that one bundle has one version in every process and after
    every restart."""
    return str(int(sha256[:12], 16))


def read_bundle(path: str | Path) -> Bundle:
    """Read a bundle folder, checking every file against the manifest's sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; is this a model bundle?")
    manifest = json.loads(manifest_path.read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(value, str) for value in files.values()):
        raise BundleError(f"{path}: {MANIFEST} must be an object whose \"files\" maps each file name to its sha256")
    for file_name, expected in files.items():
        file_path = path / file_name
        if not file_path.is_file():
            raise BundleError(f"{path}: {file_name} is listed in the manifest but missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(f"{path}: {file_name} has sha256 {actual}, the manifest says {expected}")
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict):
        raise BundleError(f"{path}: config.json must be a JSON object")
    labelled = config.get("architecture") != LANGUAGE_MODEL_ARCHITECTURE  # a language model predicts words, not labels
    labels = json.loads((path / "labels.json").read_text()) if labelled and (path / "labels.json").is_file() else None
    check_files(path, config, labels if labelled else ())
    return Bundle(
        name=config["name"],
        path=path,
        config=config,
        labels=tuple(labels) if labelled else (),
        metrics=json.loads((path / "metrics.json").read_text()),
        sha256=sha256_file(manifest_path),
    )


@functools.cache
def load_cuda_wheels() -> bool:
    """CUDA 13's runtime and cuDNN from the nvidia-* wheels installed beside onnxruntime (the GPU
    image: deploy/requirements-serving-gpu.txt), loaded once before the first CUDA session, since
    onnxruntime-gpu's CUDA provider finds them by name only. Where none are installed, the
    system's libraries serve (or the session refuses CUDA, as make_session says)."""
    if importlib.util.find_spec("nvidia") is None or not hasattr(ort, "preload_dlls"):
        return False
    ort.preload_dlls(cuda=True, cudnn=True)
    return True


def make_session(onnx_path: Path, device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session on `device`; asking for CUDA where it cannot run is an error,
    never a silent fall-back to the CPU. `threads` 0 lets onnxruntime pick (one per core)."""
    if device not in DEVICES:
        raise BundleError(f"unknown device {device!r}; expected one of {DEVICES}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError("device 'cuda' requested but this onnxruntime build has no CUDAExecutionProvider")
        load_cuda_wheels()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise BundleError(
                "device 'cuda' requested but onnxruntime could not start its CUDA provider "
                f"(no usable GPU or CUDA libraries); providers in use: {session.get_providers()}"
            )
        return session
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def text_problem(text: str, max_chars: int, limit_setting: str = "TEXTSERVE_MAX_TEXT_CHARS") -> tuple[int, str] | None:
    """What is wrong with one text to classify, as (HTTP status, problem), or None: blank -> 400,
    longer than `max_chars` (0: no limit) -> 413. The service and `python -m training predict`
    both ask this, so a file scored offline meets the rules a request meets."""
    if not text.strip():
        return 400, "is empty or only whitespace"
    if max_chars and len(text) > max_chars:
        return 413, f"has {len(text)} characters; the limit is {max_chars} ({limit_setting})"
    return None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis (the classes), for (B, K) or stacked (M, B, K) logits."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TextClassifier:
    """A classifier bundle in onnxruntime: texts -> logits / probabilities. The bundle's
    `encoding` says whether its graph takes word ids, characters or a tokenizer's ids
    (docs/bundle.md)."""

    KNOWN_INPUTS = ("token_ids", "lengths", "input_ids", "attention_mask", "token_type_ids")
    EVIDENCE_OUTPUTS = ("window_starts", "contributions")  # exported by models that can explain (Kim's CNN)
    TYPICAL_TOKENS = 16  # a question or a short review, in words: the length the token budget is measured at

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0) -> None:
        encoding = bundle.config["encoding"]
        if encoding["kind"] not in ("words", "chars", "tokenizer"):
            raise BundleError(f"{bundle.name}: input encoding {encoding['kind']!r} is not a text classifier's")
        vocab = WordVocab.load(bundle.path / "vocab.json") if encoding["kind"] == "words" else None
        self.bundle = bundle
        self.encoder = encoder_from_config(encoding, vocab, bundle.path)
        self.session = make_session(bundle.path / "model.onnx", device, threads)
        self._check_graph()
        # Padded tokens per onnxruntime run (cost_batching.py); None: the texts of one call run
        # as one padded batch. The service sets it at warm-up (measure_token_budget).
        self.token_budget: int | None = None
        self.observe_batch: Callable[[int, int], None] | None = None  # (padded tokens, text tokens) per call

    def _check_graph(self) -> None:
        """The graph's inputs and outputs against the bundle contract (bundle_format.py)."""
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = self.bundle.config.get("onnx", {}).get("outputs", outputs)[0]  # the class scores
        check_classifier_graph(self.bundle, self.session, self.output_name)
        found = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in self.session.get_inputs()}
        self.input_types = {name: found[name] for name in self.KNOWN_INPUTS if name in found}
        self.explainable = set(self.EVIDENCE_OUTPUTS) <= set(outputs)

    def feeds(self, token_ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs from an encoded batch, in the element type each is declared with."""
        if "input_ids" in self.input_types:  # a tokenizer's graph: the mask marks the tokens before the padding
            mask = np.arange(token_ids.shape[1])[None, :] < lengths[:, None]
            values = {"input_ids": token_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(token_ids)}
        else:
            values = {"token_ids": token_ids, "lengths": lengths}
        return {name: values[name].astype(kind, copy=False) for name, kind in self.input_types.items()}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.labels

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), K) float32 logits, in the order of `texts`: the texts run in groups of
        similar length within `token_budget` padded tokens (one padded batch without one)."""
        token_ids, lengths = self.encoder.encode_batch(texts)
        groups = length_groups(lengths, self.token_budget, self.budget_rows)
        if self.observe_batch is not None:
            self.observe_batch(padded_tokens(lengths, groups), int(lengths.sum()))
        if len(groups) == 1:
            return self.session.run([self.output_name], self.feeds(token_ids, lengths))[0]
        logits = None
        for rows in groups:
            width = max(int(lengths[rows].max()), 1)  # right padding past the group's longest row is dropped
            part = self.session.run([self.output_name], self.feeds(token_ids[rows, :width], lengths[rows]))[0]
            if logits is None:
                logits = np.empty((len(texts), *part.shape[1:]), part.dtype)
            logits[rows] = part
        return logits

    @property
    def typical_width(self) -> int:
        """The row length the budget is measured at: characters are always the encoder's length."""
        return self.encoder.length if self.bundle.config["encoding"]["kind"] == "chars" else self.TYPICAL_TOKENS

    @property
    def budget_rows(self) -> int:
        """The rows the budget gives at the typical length: the least a group of long texts has."""
        return rows_at_typical_length(self.token_budget, self.typical_width)

    def measure_token_budget(self, max_rows: int) -> int:
        """This model's padded-token budget on this device (cost_batching.measure_token_budget)."""
        width = self.typical_width
        # Ids of 1 (a word, a letter) in every position: the graphs' cost does not depend on which.
        run = lambda rows: self.session.run([self.output_name], self.feeds(np.ones((rows, width), np.int64), np.full(rows, width, np.int64)))
        return measure_token_budget(run, width, max_rows)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def evidence(self, texts: Sequence[str]) -> tuple[np.ndarray, ...]:
        """(token_ids (B, T), lengths (B,), logits (B, K), window_starts (B, F'), contributions (B, K, F'))."""
        if not self.explainable:
            raise BundleError(f"{self.bundle.name}: its graph has no evidence outputs to explain with")
        token_ids, lengths, (logits, starts, contributions) = self._run(texts, ["logits", *self.EVIDENCE_OUTPUTS])
        return token_ids, lengths, logits, starts, contributions

    def _run(self, texts: Sequence[str], outputs: list[str]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Encode `texts` as one padded batch and run the graph, feeding the inputs it declares."""
        token_ids, lengths = self.encoder.encode_batch(texts)
        return token_ids, lengths, self.session.run(outputs, self.feeds(token_ids, lengths))


IMAGE_ARCHITECTURE = "image-cnn"


class ImageClassifier:
    """An image classifier bundle in onnxruntime: grids of ink (B, H, W) in [0, 16] (what
    models/image_encoding.py makes of a picture) -> probabilities (B, K). Its graph takes
    `images` float32 (B, 1, S, S)."""

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0) -> None:
        from models.image_encoding import ImageEncoder

        self.bundle = bundle
        self.encoder = ImageEncoder.from_config(bundle.config["encoding"])
        self.session = make_session(bundle.path / "model.onnx", device, threads)
        check_classifier_graph(bundle, self.session)
        self.output_name = self.session.get_outputs()[0].name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.bundle.labels

    @property
    def side(self) -> int:
        return self.encoder.size

    def logits_of_images(self, images: np.ndarray) -> np.ndarray:
        """images (B, 1, S, S) float32 in [0, 1], as the graph takes them -> logits (B, K)."""
        return self.session.run([self.output_name], {"images": images.astype(np.float32, copy=False)})[0]

    def probabilities(self, grids: np.ndarray) -> np.ndarray:
        """(B, H, W) ink grids -> (B, K) probabilities."""
        return softmax(self.logits_of_images(self.encoder.encode(grids)))
