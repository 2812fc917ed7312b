"""The bundle contract's validator (services/backends/bundle_format.py) on real bundles of the
zoo, altered one field at a time, and docs/bundle.md against it."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from services.backends.bundle_format import ENCODING_FIELDS, FORMAT_VERSION, BundleFormatError
from services.backends.inference import BundleError, ImageClassifier, TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from training.bundles.writing import write_manifest
from tests.conftest import REPOSITORY, ZOO

BUNDLE_DOC = REPOSITORY / "docs" / "bundle.md"


def test_every_released_bundle_follows_the_contract():
    for folder in sorted(path for path in ZOO.iterdir() if (path / "manifest.json").is_file()):
        bundle = read_bundle(folder)
        kind = bundle.config["encoding"]["kind"]
        {"word-chars": CharLanguageModel, "image": ImageClassifier}.get(kind, TextClassifier)(bundle)


def altered(tmp_path, name: str, change) -> "Path":
    folder = tmp_path / name
    shutil.copytree(ZOO / name, folder)
    change(folder)
    write_manifest(folder)  # a consistent manifest: the contract, not the sha256s, is what fails
    return folder


def edit_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        for key, value in fields.items():
            if value is None:
                config.pop(key, None)
            elif key == "encoding":
                config["encoding"] = {**config["encoding"], **value}
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


@pytest.mark.parametrize("change, says", [
    (edit_config(format=FORMAT_VERSION + 1), f"bundle format {FORMAT_VERSION + 1} is newer than this server reads ({FORMAT_VERSION})"),
    (edit_config(name="../etc"), "name '../etc' must be letters, digits, '.', '_' and '-'"),
    (edit_config(encoding={"kind": "bytes"}), "encoding kind 'bytes' is not one of"),
    (edit_config(encoding={"edge_padding": "4"}), "the words encoding needs 'edge_padding' as int, got '4'"),
    (edit_config(encoding={"lowercase": 1}), "the words encoding needs 'lowercase' as bool, got 1"),
    (lambda folder: (folder / "labels.json").write_text('["NUM", "NUM"]'), "labels.json: must list two or more distinct"),
    (lambda folder: (folder / "vocab.json").unlink(), "the words encoding needs vocab.json, which is missing"),
])
def test_a_bundle_off_the_contract_is_refused_by_read_bundle_with_what_differs(tmp_path, change, says):
    with pytest.raises(BundleFormatError, match=re.escape(says)):
        read_bundle(altered(tmp_path, "kim-cnn-trec6", change))


@pytest.mark.parametrize("manifest", ["[]", '{"files": []}', '{"files": {"model.onnx": 7}}', '"files"'])
def test_a_manifest_of_the_wrong_shape_is_refused_as_a_bundle_error(tmp_path, manifest):
    # A BundleError is what a load answers 400 with (a TypeError or AttributeError read as 500).
    folder = tmp_path / "kim-cnn-trec6"
    shutil.copytree(ZOO / "kim-cnn-trec6", folder)
    (folder / "manifest.json").write_text(manifest)
    with pytest.raises(BundleError, match="manifest.json must be an object whose \"files\" maps each file name to its sha256"):
        read_bundle(folder)


def test_a_config_that_is_not_an_object_is_refused_as_a_bundle_error(tmp_path):
    folder = altered(tmp_path, "kim-cnn-trec6", lambda folder: (folder / "config.json").write_text("[1, 2]"))
    with pytest.raises(BundleError, match="config.json must be a JSON object"):
        read_bundle(folder)


def test_a_graph_for_other_labels_is_refused_when_its_session_is_made(tmp_path):
    folder = altered(tmp_path, "lstm-trec6", lambda f: (f / "labels.json").write_text(json.dumps(list("ABCDEFG"))))
    with pytest.raises(BundleError, match=re.escape("model.onnx output 'logits' axis 1 is 6; the bundle's labels or encoding say 7")):
        TextClassifier(read_bundle(folder))


def test_the_char_cnn_graph_must_read_the_length_its_encoding_says(tmp_path):
    folder = altered(tmp_path, "char-cnn-small-trec6", edit_config(encoding={"length": 300}))
    with pytest.raises(BundleError, match=re.escape("input 'token_ids' axis 1 is 256; the bundle's labels or encoding say 300")):
        TextClassifier(read_bundle(folder))


def test_docs_bundle_md_names_every_encoding_and_field_the_validator_checks():
    text = BUNDLE_DOC.read_text()
    assert f"format {FORMAT_VERSION}" in text.splitlines()[0]
    for kind, fields in ENCODING_FIELDS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{kind}` |")), None)
        assert row is not None, f"docs/bundle.md has no row for the {kind} encoding"
        for field in fields:
            assert f"`{field}`" in row, f"docs/bundle.md's {kind} row does not name {field}"
