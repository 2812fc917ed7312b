"""A bundle from an ONNX text classifier trained elsewhere (`python -m training import-onnx`).

Given the graph, its labels (in the order of its class scores) and how its inputs are made from
text: a Hugging Face tokenizer.json (encoding "tokenizer": inputs input_ids and, if the graph
takes them, attention_mask and token_type_ids), or a vocabulary with our word encoding
("words": token_ids and lengths) or Zhang's character quantisation ("chars"), it

1. writes the bundle into a hidden staging folder: model.onnx as given, labels.json, the
   vocabulary or tokenizer, config.json (format 1, docs/bundle.md) and metrics.json;
2. checks it with the validator the service uses (services/backends/bundle_format.py: files,
   config, the graph's input and output names, types and shapes);
3. probes it through the service's own session class on real texts: every row finite, the
   class scores logits rather than probabilities (the service applies the softmax), and each
   text scored alone the same as in a padded batch (within PROBE_ATOL), which fails when the
   graph ignores its attention mask or lengths;
4. writes the manifest, and only then replaces the bundle folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from models.text_encoding import PAD_TOKEN, UNK_TOKEN, ZHANG_ALPHABET, WordVocab
from services.backends.bundle_format import FORMAT_VERSION, BundleFormatError
from services.backends.inference import TextClassifier, read_bundle, sha256_file
from training.bundles.writing import staged_bundle, write_json, write_manifest

ARCHITECTURE = "imported"
PROBE_ATOL = 1e-4
# Probe texts when --probe is not given: short and long, so a batch pads some rows far.
PROBE_TEXTS = ("What is the capital of France ?", "Who wrote Hamlet ?", "a gorgeous , witty , seductive movie .",
               "How far is it from Denver to Aspen ?", "the plot is nothing but boilerplate clichés from start to "
               "finish , and the script assumes that not only the characters but the audience will fall for them .")


class ImportRefused(ValueError):
    """The graph or its files do not make a bundle; nothing is written."""


def read_labels(path: Path) -> list[str]:
    """A JSON list, or one label per line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list):
            raise ImportRefused(f"{path}: expected a JSON list of labels")
        return [str(label) for label in labels]
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_vocabulary(path: Path) -> WordVocab:
    """A JSON list or {"tokens": [...]}, or one token per line; id = position. Ours start with
    <pad> (id 0) and <unk> (id 1)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        content = json.loads(text)
        tokens = content["tokens"] if isinstance(content, dict) else content
    else:
        tokens = [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]
    try:
        return WordVocab(tuple(tokens))
    except ValueError as error:
        raise ImportRefused(f"{path}: {error} (ids 0 and 1 are padding and unknown words; got {tokens[:2]})") from None


def encoding_of(kind: str, max_length: int, lowercase: bool, edge_padding: int, alphabet: str, length: int) -> dict:
    if kind == "tokenizer":
        return {"kind": "tokenizer", "file": "tokenizer.json", "max_length": max_length}
    if kind == "words":
        return {"kind": "words", "lowercase": lowercase, "edge_padding": edge_padding, "min_length": 1}
    return {"kind": "chars", "alphabet": alphabet or ZHANG_ALPHABET, "length": length, "lowercase": lowercase, "reverse": True}


def scores_output(graph: onnx.ModelProto, wanted: str | None) -> str:
    names = [output.name for output in graph.graph.output]
    if wanted:
        if wanted not in names:
            raise ImportRefused(f"the graph has no output {wanted!r}; its outputs are {names}")
        return wanted
    if "logits" in names or len(names) == 1:
        return "logits" if "logits" in names else names[0]
    raise ImportRefused(f"the graph has outputs {names}: say which holds the class scores with --output")


def probe(classifier: TextClassifier, texts: Sequence[str]) -> dict:
    """Run the bundle as the service will: finite logits of the right width, not probabilities,
    and the same scores for a text alone as in a padded batch."""
    try:
        batch = classifier.logits(texts)
    except Exception as error:  # onnxruntime's own message, e.g. an id past the embedding table
        first = str(error).strip().splitlines()[0][:400]
        raise ImportRefused(f"the graph fails on the probe texts: {first} (do the tokenizer or vocabulary and the "
                            "graph's embedding agree?)") from None
    if batch.shape != (len(texts), len(classifier.labels)):
        raise ImportRefused(f"the graph gives class scores of shape {batch.shape} for {len(texts)} texts; expected "
                            f"({len(texts)}, {len(classifier.labels)}): one per label")
    if not np.isfinite(batch).all():
        raise ImportRefused("the graph gives non-finite class scores (nan or inf) on the probe texts")
    if (batch >= 0).all() and np.allclose(batch.sum(axis=1), 1.0, atol=1e-3):
        raise ImportRefused("the class scores look like probabilities (each row sums to 1); the service applies the "
                            "softmax itself: export the logits, the layer before the softmax")
    alone = np.concatenate([classifier.logits([text]) for text in texts])
    delta = float(np.abs(alone - batch).max())
    if delta > PROBE_ATOL:
        raise ImportRefused(f"a text scored alone differs from the same text in a padded batch by {delta:.2e} (limit "
                            f"{PROBE_ATOL:.0e}): the graph does not ignore padding; does it read attention_mask or lengths?")
    return {"probe_texts": len(texts), "probe_max_abs_batch_delta": delta,
            "probe_predictions": [classifier.labels[i] for i in batch.argmax(axis=1)]}


DEFAULT_MAX_LENGTH = 512


def length_limit(tokenizer: Path | None, max_length: int | None) -> tuple[int, str]:
    """The tokens a text keeps, and where that figure came from: --max-length when given, else
    the tokenizer's own truncation (tokenizer.json), else its folder's tokenizer_config.json
    (`model_max_length`, as Hugging Face saves it), else 512."""
    if max_length is not None:
        return max_length, "--max-length"
    if tokenizer is not None:
        truncation = (json.loads(Path(tokenizer).read_text()).get("truncation") or {}).get("max_length")
        if isinstance(truncation, int) and truncation > 0:
            return truncation, f"{Path(tokenizer).name}'s truncation"
        config_path = Path(tokenizer).with_name("tokenizer_config.json")
        if config_path.is_file():
            limit = json.loads(config_path.read_text()).get("model_max_length")
            if isinstance(limit, int) and 0 < limit < 1_000_000:  # Hugging Face writes 1e30 for "no limit"
                return limit, "tokenizer_config.json's model_max_length"
    return DEFAULT_MAX_LENGTH, f"the default, {DEFAULT_MAX_LENGTH}"


def self_contained(onnx_path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every weight inside it, and the external data files it read them from
    (torch.onnx.export writes a model's weights beside it, model.onnx.data, past a size or
    when asked): a bundle holds one model.onnx."""
    graph = onnx.load(onnx_path, load_external_data=False)
    external = sorted({entry.value for initializer in graph.graph.initializer
                       if initializer.data_location == onnx.TensorProto.EXTERNAL
                       for entry in initializer.external_data if entry.key == "location"})
    if not external:
        return graph, []
    missing = [name for name in external if not (onnx_path.parent / name).is_file()]
    if missing:
        raise ImportRefused(f"{onnx_path}: its weights are in {', '.join(missing)}, which is not beside it; put the data "
                            "file(s) the export wrote next to the .onnx file")
    return onnx.load(onnx_path, load_external_data=True), external


def import_onnx(onnx_path: Path, labels_path: Path, bundle_dir: Path, kind: str, tokenizer: Path | None = None,
                vocab: Path | None = None, output: str | None = None, max_length: int | None = None, lowercase: bool = False,
                edge_padding: int = 0, alphabet: str = "", length: int = 1014, probe_texts: Sequence[str] = PROBE_TEXTS,
                command: str = "") -> dict:
    """Write the bundle (replacing `bundle_dir` only if every check passes); its metrics."""
    for given in (onnx_path, labels_path, tokenizer, vocab):
        if given is not None and not Path(given).is_file():
            raise ImportRefused(f"{given}: no such file")
    labels = read_labels(labels_path)
    graph, external = self_contained(Path(onnx_path))
    scores = scores_output(graph, output)
    max_length, max_length_from = length_limit(tokenizer if kind == "tokenizer" else None, max_length)
    encoding = encoding_of(kind, max_length, lowercase, edge_padding, alphabet, length)
    if kind == "tokenizer" and tokenizer is None:
        raise ImportRefused("--encoding tokenizer needs --tokenizer tokenizer.json")
    if kind == "words" and vocab is None:
        raise ImportRefused("--encoding words needs --vocab (one token per line, <pad> and <unk> first)")
    with staged_bundle(bundle_dir) as staging:
        if external:  # the weights folded into the one file
            onnx.save(graph, staging / "model.onnx", save_as_external_data=False)
        else:
            shutil.copyfile(onnx_path, staging / "model.onnx")
        if kind == "tokenizer":
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
        if kind == "words":
            read_vocabulary(vocab).save(staging / "vocab.json")
        write_json(staging / "labels.json", labels)
        opsets = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}
        write_json(staging / "config.json", {
            "format": FORMAT_VERSION,
            "name": bundle_dir.name,
            "architecture": ARCHITECTURE,
            "preset": "",
            "model": {"source": onnx_path.name, "producer": f"{graph.producer_name} {graph.producer_version}".strip()},
            "encoding": encoding,
            "onnx": {"opset": opsets.get("ai.onnx"), "inputs": [i.name for i in graph.graph.input],
                     "outputs": [scores, *(o.name for o in graph.graph.output if o.name != scores)]},
        })
        metrics = {"import_command": command, "source_sha256": sha256_file(onnx_path), "labels": len(labels),
                   **({"folded_external_data": external} if external else {}),
                   **({"max_length": max_length, "max_length_from": max_length_from} if kind == "tokenizer" else {})}
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
        try:
            classifier = TextClassifier(read_bundle(staging))  # the service's checks (bundle_format.py)
        except BundleFormatError as error:
            raise ImportRefused(str(error).replace(str(staging), str(bundle_dir))) from None
        metrics.update(probe(classifier, probe_texts))
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics
