"""The model bundle's contract (docs/bundle.md), checked in one place: by read_bundle (the files
and config.json, before a session is made) and by every session class (the graph's inputs and
outputs), so the service, `python -m training export` (its parity check runs the bundle through
the same classes) and `python -m training import-onnx` refuse the same bundles with the same
words. Torch-free.

A check names the bundle and the one thing that differs from the contract."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1  # config.json "format"; absent means 1 (bundles written before it was recorded)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a bundle's name is its zoo folder's name, never a path
LANGUAGE_MODEL_KIND = "word-chars"
ID_TYPES = ("tensor(int64)", "tensor(int32)")  # token ids: int64 as exported here, int32 as some exporters write

# Per encoding kind: what config.json's "encoding" must hold (field -> accepted types) and the
# files beside model.onnx that it needs.
ENCODING_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "words": {"lowercase": (bool,), "edge_padding": (int,)},
    "chars": {"alphabet": (str,), "length": (int,), "lowercase": (bool,), "reverse": (bool,)},
    "tokenizer": {"file": (str,), "max_length": (int,)},
    "image": {"size": (int,), "scale": (int, float)},
    LANGUAGE_MODEL_KIND: {"chars": (str,), "word_width": (int,)},
}
ENCODING_FILES = {"words": ("vocab.json",), "chars": (), "tokenizer": (), "image": (), LANGUAGE_MODEL_KIND: ("vocab.json",)}


class BundleError(RuntimeError):
    """A bundle is incomplete, altered, or cannot run where it was asked to."""


class BundleFormatError(BundleError):
    """A bundle that does not follow docs/bundle.md; the message says which file and what."""


@dataclass(frozen=True)
class Tensor:
    """One graph input or output as the contract states it: its name, the element types it may
    have and its shape (a str: a named axis of any size, "batch" must be symbolic; an int: fixed)."""

    name: str
    types: tuple[str, ...]
    shape: tuple[str | int, ...]


def classifier_graph(encoding: dict, num_labels: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[str, ...]]:
    """(inputs, outputs, optional input and output names) of a classifier's model.onnx."""
    kind = encoding["kind"]
    logits = Tensor("logits", ("tensor(float)",), ("batch", num_labels))
    if kind == "image":
        side = encoding["size"]
        return (Tensor("images", ("tensor(float)",), ("batch", 1, side, side)),), (logits,), ()
    if kind == "tokenizer":
        inputs = (Tensor("input_ids", ID_TYPES, ("batch", "sequence")), Tensor("attention_mask", ID_TYPES, ("batch", "sequence")),
                  Tensor("token_type_ids", ID_TYPES, ("batch", "sequence")))
        return inputs, (logits,), ("attention_mask", "token_type_ids")
    length = encoding["length"] if kind == "chars" else "length"
    inputs = (Tensor("token_ids", ID_TYPES, ("batch", length)), Tensor("lengths", ID_TYPES, ("batch",)))
    evidence = (Tensor("window_starts", ("tensor(int64)",), ("batch", "features")),
                Tensor("contributions", ("tensor(float)",), ("batch", num_labels, "features")))
    return inputs, (logits, *evidence), ("lengths", "window_starts", "contributions")


def language_model_graphs(encoding: dict) -> dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
    width = encoding["word_width"]
    state = ("layers", "batch", "hidden")
    return {
        "step.onnx": ((Tensor("char_ids", ("tensor(int64)",), ("batch", "steps", width)),
                       Tensor("h", ("tensor(float)",), state), Tensor("c", ("tensor(float)",), state)),
                      (Tensor("logits", ("tensor(float)",), ("batch", "steps", "vocabulary")),
                       Tensor("h_out", ("tensor(float)",), state), Tensor("c_out", ("tensor(float)",), state))),
        "word_encoder.onnx": ((Tensor("char_ids", ("tensor(int64)",), ("words", width)),),
                              (Tensor("cnn", ("tensor(float)",), ("words", "features")),
                               Tensor("highway", ("tensor(float)",), ("words", "features")))),
    }


# --------------------------------------------------------------------------- files and config.json

def check_files(path: Path, config: dict, labels: Sequence[str] | None) -> None:
    """config.json's fields, labels.json and the files the encoding needs (read_bundle calls
    this after the manifest's sha256s have matched)."""
    where = f"{path}/config.json"
    version = config.get("format", 1)
    if not isinstance(version, int) or version < 1:
        raise BundleFormatError(f"{where}: format {version!r} is not a bundle format version")
    if version > FORMAT_VERSION:
        raise BundleFormatError(f"{where}: bundle format {version} is newer than this server reads ({FORMAT_VERSION}); "
                                "upgrade textserve or export with this version")
    for field, kind in (("name", str), ("architecture", str), ("encoding", dict)):
        if not isinstance(config.get(field), kind):
            raise BundleFormatError(f"{where}: {field!r} must be a {kind.__name__} (docs/bundle.md)")
    if not NAME.fullmatch(config["name"]):
        raise BundleFormatError(f"{where}: name {config['name']!r} must be letters, digits, '.', '_' and '-' (it names "
                                "the zoo folder and the URL)")
    encoding = config["encoding"]
    kind = encoding.get("kind")
    if kind not in ENCODING_FIELDS:
        raise BundleFormatError(f"{where}: encoding kind {kind!r} is not one of {sorted(ENCODING_FIELDS)}")
    for field, types in ENCODING_FIELDS[kind].items():
        value = encoding.get(field)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise BundleFormatError(f"{where}: the {kind} encoding needs {field!r} as {names}, got {value!r}")
    needed = [*ENCODING_FILES[kind], *((encoding["file"],) if kind == "tokenizer" else ())]
    needed += ["step.onnx", "word_encoder.onnx"] if kind == LANGUAGE_MODEL_KIND else ["model.onnx"]
    for file in needed:
        if not (path / file).is_file():
            raise BundleFormatError(f"{path}: the {kind} encoding needs {file}, which is missing")
    ensemble = config.get("ensemble")
    if ensemble is not None and not (isinstance(ensemble, dict) and isinstance(ensemble.get("members"), int)
                                     and not isinstance(ensemble["members"], bool) and ensemble["members"] >= 2):
        raise BundleFormatError(f"{where}: 'ensemble' must be an object with 'members', an int of 2 or more, got {ensemble!r}")
    if kind == LANGUAGE_MODEL_KIND:
        return
    if labels is None:
        raise BundleFormatError(f"{path}: a classifier bundle needs labels.json")
    if len(labels) < 2 or not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
        raise BundleFormatError(f"{path}/labels.json: must list two or more distinct non-empty strings, got {list(labels)[:10]}")


# --------------------------------------------------------------------------- the graphs

def check_tensors(bundle_name: str, graph: str, role: str, found: Sequence, expected: Sequence[Tensor],
                  optional: Sequence[str], allowed_extra: bool) -> None:
    """`found`: onnxruntime's NodeArgs (name, type, shape) of one graph's inputs or outputs."""
    by_name = {arg.name: arg for arg in found}
    wanted = {tensor.name: tensor for tensor in expected}
    missing = [name for name in wanted if name not in by_name and name not in optional]
    unexpected = [name for name in by_name if name not in wanted]
    if missing or (unexpected and not allowed_extra):
        described = "; ".join(f"{t.name} {'/'.join(x[7:-1] for x in t.types)} {describe(t.shape)}"
                              + (" (optional)" if t.name in optional else "") for t in expected)
        raise BundleFormatError(f"{bundle_name}: {graph} has {role} {sorted(by_name)}; the contract is {described} "
                                "(docs/bundle.md)")
    for name, arg in by_name.items():
        if name not in wanted:
            continue
        tensor = wanted[name]
        if arg.type not in tensor.types:
            raise BundleFormatError(f"{bundle_name}: {graph} {role[:-1]} {name!r} is {arg.type}; expected "
                                    f"{' or '.join(tensor.types)}")
        shape = list(arg.shape or [])
        if len(shape) != len(tensor.shape):
            raise BundleFormatError(f"{bundle_name}: {graph} {role[:-1]} {name!r} has shape {describe(shape)}; expected "
                                    f"{describe(tensor.shape)}")
        for axis, (actual, contract) in enumerate(zip(shape, tensor.shape)):
            if contract == "batch" and isinstance(actual, int):
                raise BundleFormatError(f"{bundle_name}: {graph} {role[:-1]} {name!r} has a fixed batch of {actual}; "
                                        "axis 0 must be symbolic (export with a dynamic batch axis)")
            if isinstance(contract, int) and isinstance(actual, int) and actual != contract:
                raise BundleFormatError(f"{bundle_name}: {graph} {role[:-1]} {name!r} axis {axis} is {actual}; the "
                                        f"bundle's labels or encoding say {contract}")


def describe(shape: Sequence) -> str:
    return "(" + ", ".join("?" if axis is None else str(axis) for axis in shape) + ")"


def check_classifier_graph(bundle, session, output_name: str = "logits") -> None:
    """A classifier's model.onnx against the contract of its encoding and labels."""
    inputs, outputs, optional = classifier_graph(bundle.config["encoding"], len(bundle.labels))
    check_tensors(bundle.name, "model.onnx", "inputs", session.get_inputs(), inputs, optional, allowed_extra=False)
    if output_name != "logits":  # an imported graph whose class scores have another name (config onnx.outputs[0])
        outputs = (Tensor(output_name, outputs[0].types, outputs[0].shape),)
    check_tensors(bundle.name, "model.onnx", "outputs", session.get_outputs(), outputs, optional, allowed_extra=True)
    names = {arg.name for arg in session.get_outputs()}
    if ("window_starts" in names) != ("contributions" in names):
        raise BundleFormatError(f"{bundle.name}: model.onnx has one of window_starts and contributions; the evidence "
                                "outputs come as a pair")


def check_language_model_graphs(bundle, sessions: dict) -> None:
    """step.onnx and word_encoder.onnx against the contract (`sessions`: file -> session)."""
    for graph, (inputs, outputs) in language_model_graphs(bundle.config["encoding"]).items():
        check_tensors(bundle.name, graph, "inputs", sessions[graph].get_inputs(), inputs, (), allowed_extra=False)
        check_tensors(bundle.name, graph, "outputs", sessions[graph].get_outputs(), outputs, (), allowed_extra=False)
