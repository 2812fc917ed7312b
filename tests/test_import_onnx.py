"""`python -m training import-onnx` on models trained outside our training code: a bag-of-tokens
classifier written here in plain PyTorch, trained on the committed TREC sample, exported with
torch.onnx by hand, over a WordPiece tokenizer trained here with the `tokenizers` package (and
once over a word vocabulary with our encoding). The bundle must give the model's own logits
through the service's session class, be refused with a message that says what is wrong when
the graph breaks the contract, and be served over HTTP by `bentoml serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from models.text_encoding import WordVocab, tokenize
from services.backends.inference import TextClassifier, read_bundle
from training.data.datasets import read_trec, split_dev
from tests.conftest import REPOSITORY
from tests.serving import running_server

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


class BagOfTokens(torch.nn.Module):
    """Mean of the embeddings of the real tokens, then a linear layer: logits (B, K)."""

    def __init__(self, vocab_size: int, classes: int, mask_padding: bool = True, softmax: bool = False) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 48)
        self.out = torch.nn.Linear(48, classes)
        self.mask_padding, self.softmax = mask_padding, softmax

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float() if self.mask_padding else torch.ones_like(attention_mask).unsqueeze(-1).float()
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.out(pooled)
        return logits.softmax(-1) if self.softmax else logits


class BagOfWords(BagOfTokens):
    """The same over our word encoding: token_ids and lengths."""

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(token_ids.shape[1])[None, :] < lengths[:, None]
        return super().forward(token_ids, mask.long())


def padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    return ids, lengths


def train(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> list[float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):  # full batch: a few seconds
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(*inputs), targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def export(model: torch.nn.Module, path, names: tuple[str, str], example, output: str = "scores",
           dynamic_batch: bool = True) -> None:
    axes = {names[0]: {0: "batch", 1: "sequence"}, names[1]: {0: "batch", 1: "sequence"} if names[1] != "lengths" else {0: "batch"},
            output: {0: "batch"}}
    torch.onnx.export(model.eval(), example, str(path), input_names=list(names), output_names=[output],
                      dynamic_axes=axes if dynamic_batch else None, opset_version=17, dynamo=False)


def import_onnx(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "import-onnx", *map(str, arguments)], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trec_path):
    """The tokenizer, the model (trained, exported) and the held-out questions."""
    folder = tmp_path_factory.mktemp("elsewhere")
    train_part, held_out = split_dev(read_trec(trec_path), dev_fraction=0.2, seed=7)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator([e.text for e in train_part], trainers.WordPieceTrainer(vocab_size=2000, special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    tokenizer.save(str(folder / "tokenizer.json"))
    labels = sorted({e.label for e in train_part})
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    targets = torch.tensor([labels.index(e.label) for e in train_part])

    def tokens(texts):
        ids, lengths = padded([encoding.ids for encoding in tokenizer.encode_batch(list(texts))])
        return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()

    torch.manual_seed(0)
    model = BagOfTokens(tokenizer.get_vocab_size(), len(labels))
    losses = train(model, tokens([e.text for e in train_part]), targets)
    assert losses[-1] < 0.5 * losses[0], losses[::10]  # it learned
    export(model, folder / "bag.onnx", ("input_ids", "attention_mask"), tokens(["Who wrote Hamlet ?", "What is it ?"]))
    return {"folder": folder, "model": model, "tokens": tokens, "labels": labels, "held_out": held_out,
            "train_part": train_part, "targets": targets}


@pytest.fixture(scope="module")
def imported(trained, tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    folder = trained["folder"]
    done = import_onnx("--onnx", folder / "bag.onnx", "--labels", folder / "labels.txt", "--tokenizer",
                       folder / "tokenizer.json", "--max-length", 64, "--output", "scores", "--bundle", zoo / "bag-trec6")
    assert done.returncode == 0, done.stderr[-3000:]
    return zoo / "bag-trec6", json.loads(done.stdout.splitlines()[-1])


def test_the_imported_bundle_gives_the_models_own_logits_through_the_service_session(trained, imported):
    bundle_dir, printed = imported
    assert printed["probe_texts"] == 5 and printed["probe_max_abs_batch_delta"] <= 1e-4
    bundle = read_bundle(bundle_dir)
    assert bundle.config["format"] == 1 and bundle.config["encoding"] == {"kind": "tokenizer", "file": "tokenizer.json", "max_length": 64}
    assert bundle.config["onnx"]["outputs"] == ["scores"] and list(bundle.labels) == trained["labels"]
    classifier = TextClassifier(bundle)
    texts = [e.text for e in trained["held_out"][:200]]
    with torch.no_grad():
        expected = trained["model"](*trained["tokens"](texts)).numpy()
    assert np.abs(classifier.logits(texts) - expected).max() < 1e-4
    accuracy = np.mean([trained["labels"][i] == e.label for i, e in zip(classifier.logits(texts).argmax(1), trained["held_out"][:200])])
    assert accuracy > 0.45, accuracy  # six classes; the biggest holds about a quarter


def test_a_long_text_is_truncated_to_max_length(imported):
    classifier = TextClassifier(read_bundle(imported[0]))
    token_ids, lengths = classifier.encoder.encode_batch(["word " * 500, "Who ?"])
    assert token_ids.shape == (2, 64) and lengths.tolist() == [64, 4]  # [CLS] who ? [SEP]


def test_a_word_vocabulary_import_runs_with_our_word_encoding(trained, tmp_path):
    vocab = WordVocab.build(tokenize(e.text, lowercase=True) for e in trained["train_part"])
    (tmp_path / "vocab.txt").write_text("\n".join(vocab.tokens) + "\n")

    def words(texts):
        ids, lengths = padded([vocab.ids(tokenize(text, lowercase=True)) or [0] for text in texts])
        return ids, lengths

    torch.manual_seed(0)
    model = BagOfWords(len(vocab), len(trained["labels"]))
    train(model, words([e.text for e in trained["train_part"]]), trained["targets"])
    export(model, tmp_path / "words.onnx", ("token_ids", "lengths"), words(["Who wrote Hamlet ?", "What ?"]), output="logits")
    done = import_onnx("--onnx", tmp_path / "words.onnx", "--labels", trained["folder"] / "labels.txt", "--vocab",
                       tmp_path / "vocab.txt", "--lowercase", "--bundle", tmp_path / "zoo" / "words-trec6")
    assert done.returncode == 0, done.stderr[-3000:]
    classifier = TextClassifier(read_bundle(tmp_path / "zoo" / "words-trec6"))
    texts = [e.text for e in trained["held_out"][:50]]
    with torch.no_grad():
        assert np.abs(classifier.logits(texts) - model(*words(texts)).numpy()).max() < 1e-4


@pytest.mark.parametrize("breakage, says", [
    ("softmax", "the class scores look like probabilities (each row sums to 1); the service applies the softmax itself"),
    ("ignores-padding", "a text scored alone differs from the same text in a padded batch"),
    ("fixed-batch", "'input_ids' has a fixed batch of 2; axis 0 must be symbolic"),
    ("five-labels", "'scores' axis 1 is 6; the bundle's labels or encoding say 5"),
    ("input-names", "model.onnx has inputs ['ids', 'mask']; the contract is input_ids"),
    ("small-embedding", "the graph fails on the probe texts: "),
])
def test_a_graph_that_breaks_the_contract_is_refused_with_what_is_wrong(trained, tmp_path, breakage, says):
    folder, labels = trained["folder"], trained["folder"] / "labels.txt"
    vocab_size = trained["model"].embedding.num_embeddings
    model = BagOfTokens(vocab_size, len(trained["labels"]), mask_padding=breakage != "ignores-padding", softmax=breakage == "softmax")
    model.load_state_dict(trained["model"].state_dict())
    if breakage == "small-embedding":  # a graph built for another tokenizer: ids past its table
        model.embedding = torch.nn.Embedding(10, 48)
    names = ("ids", "mask") if breakage == "input-names" else ("input_ids", "attention_mask")
    ids, mask = trained["tokens"](["Who wrote Hamlet ?", "What is the capital of France ?"])
    export(model, tmp_path / "broken.onnx", names, (ids.clamp(max=model.embedding.num_embeddings - 1), mask), dynamic_batch=breakage != "fixed-batch")
    if breakage == "five-labels":
        labels = tmp_path / "labels.txt"
        labels.write_text("\n".join(trained["labels"][:5]))
    done = import_onnx("--onnx", tmp_path / "broken.onnx", "--labels", labels, "--tokenizer", folder / "tokenizer.json",
                       "--bundle", tmp_path / "zoo" / "broken")
    assert done.returncode == 1 and says in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "zoo" / "broken").exists() and not list((tmp_path / "zoo").glob(".*"))  # nothing written


def test_bentoml_serve_answers_with_the_imported_bundle(imported, tmp_path):
    bundle_dir, _ = imported
    with running_server(tmp_path / "home", bundle_dir.parent) as url:
        answer = requests.post(f"{url}/classify", json={"model": "bag-trec6", "texts": ["Who wrote Hamlet ?"]}, timeout=30)
        assert answer.status_code == 200, answer.text
        expected = TextClassifier(read_bundle(bundle_dir)).probabilities(["Who wrote Hamlet ?"])[0]
        got = answer.json()["results"][0]["probabilities"]
        assert np.allclose([got[label] for label in read_bundle(bundle_dir).labels], expected, atol=1e-5)
        v2 = requests.post(f"{url}/v2/models/bag-trec6/infer", timeout=30, json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Who wrote Hamlet ?"]}]}).json()
        assert next(o for o in v2["outputs"] if o["name"] == "label")["data"] == [answer.json()["results"][0]["label"]]


def test_a_default_torch_export_with_its_weights_beside_it_imports_as_one_file_with_the_tokenizers_length(trained, tmp_path):
    # torch 2.13's default exporter (dynamo) writes the weights to NAME.onnx.data beside the graph,
    # as a Hugging Face model's export does; the tokenizer carries its own truncation (128 for MiniLM).
    folder = trained["folder"]
    example = trained["tokens"](["Who wrote Hamlet ?", "What is it ?"])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(trained["model"].eval(), example, str(tmp_path / "bag.onnx"), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: sequence},
                                                               "attention_mask": {0: batch, 1: sequence}})
    assert (tmp_path / "bag.onnx.data").is_file()  # the situation: weights in a separate file
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=48)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    done = import_onnx("--onnx", tmp_path / "bag.onnx", "--labels", folder / "labels.txt", "--tokenizer", tmp_path / "tokenizer.json",
                       "--bundle", tmp_path / "zoo" / "bag-default-export")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.splitlines()[-1])
    assert printed["folded_external_data"] == ["bag.onnx.data"]
    assert (printed["max_length"], printed["max_length_from"]) == (48, "tokenizer.json's truncation")
    bundle = read_bundle(tmp_path / "zoo" / "bag-default-export")
    assert sorted(p.name for p in bundle.path.iterdir() if p.name.startswith("model")) == ["model.onnx"]
    assert bundle.config["encoding"]["max_length"] == 48
    texts = [e.text for e in trained["held_out"][:100]]
    with torch.no_grad():
        expected = trained["model"](*trained["tokens"](texts)).numpy()
    assert np.abs(TextClassifier(bundle).logits(texts) - expected).max() < 1e-4
    # without its data file beside it, the import says which file is missing
    (tmp_path / "bag.onnx.data").rename(tmp_path / "elsewhere.data")
    refused = import_onnx("--onnx", tmp_path / "bag.onnx", "--labels", folder / "labels.txt", "--tokenizer", tmp_path / "tokenizer.json",
                          "--bundle", tmp_path / "zoo" / "bag-missing-data")
    assert refused.returncode != 0 and "bag.onnx.data, which is not beside it" in refused.stderr


def test_without_a_length_anywhere_the_import_says_it_took_512(trained, tmp_path):
    folder = trained["folder"]
    done = import_onnx("--onnx", folder / "bag.onnx", "--labels", folder / "labels.txt", "--tokenizer", folder / "tokenizer.json",
                       "--output", "scores", "--bundle", tmp_path / "bag-no-length")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.splitlines()[-1])
    assert (printed["max_length"], printed["max_length_from"]) == (512, "the default, 512")
    help_text = subprocess.run([sys.executable, "-m", "training", "import-onnx", "--help"], cwd=REPOSITORY, capture_output=True,
                               text=True, timeout=120).stdout
    assert "tokenizer.json's own truncation" in " ".join(help_text.split()) and "else 512" in help_text


def test_a_hugging_face_bert_exported_by_default_imports_matches_pytorch_and_serves(trained, tmp_path):
    # A real Hugging Face architecture (BertForSequenceClassification, small, built from its
    # config over the WordPiece tokenizer trained above), exported by torch's default exporter
    # with the three inputs an HF export has; its weights land beside the graph.
    from transformers import BertConfig, BertForSequenceClassification

    folder = trained["folder"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                                    num_labels=len(trained["labels"]))).eval()

    class Logits(torch.nn.Module):  # what an HF export wraps: the logits of the classification head
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    ids, mask = trained["tokens"](["Who wrote Hamlet ?", "How far is it from Denver to Aspen ?"])
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=128)
    names = ("input_ids", "attention_mask", "token_type_ids")
    torch.onnx.export(Logits().eval(), (ids, mask, torch.zeros_like(ids)), str(tmp_path / "model.onnx"), input_names=list(names),
                      output_names=["logits"], dynamic_shapes={name: {0: batch, 1: sequence} for name in names})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    shutil.copyfile(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    done = import_onnx("--onnx", tmp_path / "model.onnx", "--labels", folder / "labels.txt", "--tokenizer", tmp_path / "tokenizer.json",
                       "--bundle", tmp_path / "zoo" / "tiny-bert-trec6")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.splitlines()[-1])
    assert printed["folded_external_data"] == ["model.onnx.data"]
    assert (printed["max_length"], printed["max_length_from"]) == (128, "tokenizer_config.json's model_max_length")
    bundle = read_bundle(tmp_path / "zoo" / "tiny-bert-trec6")
    texts = [e.text for e in trained["held_out"][:64]]
    ids, mask = trained["tokens"](texts)
    with torch.no_grad():
        expected = torch.softmax(Logits()(ids, mask, torch.zeros_like(ids)), dim=-1).numpy()
    assert np.abs(TextClassifier(bundle).probabilities(texts) - expected).max() < 1e-5
    with running_server(tmp_path / "home", tmp_path / "zoo") as url:
        answer = requests.post(f"{url}/classify", json={"model": "tiny-bert-trec6", "texts": texts[:3]}, timeout=30)
        assert answer.status_code == 200, answer.text
        served = [[result["probabilities"][label] for label in bundle.labels] for result in answer.json()["results"]]
        assert np.abs(np.array(served) - expected[:3]).max() < 1e-5
