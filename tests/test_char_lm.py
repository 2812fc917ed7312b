"""The character-aware language model: its parts with hand-checked numbers, the details that
decide whether the paper's perplexity is reached, and a resumable training job."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from models.char_lm import CharAwareLM, CharLMConfig, LanguageModelRecipe, char_lm_config
from models.char_word_cnn import CharCNNWordEncoder
from models.highway import Highway
from models.text_encoding import tokenize
from models.text_encoding import (
    CHAR_PAD_ID, UNKNOWN_CHAR_ID, WORD_END_ID, WORD_START_ID, LanguageModelVocab, WordCharEncoder,
)
from services.backends.inference import read_bundle
from tests.conftest import REPOSITORY, SAMPLE_DATA
from training.bundles import export_lm as export_lm_module
from training.bundles.export_lm import export_language_model
from training.bundles.export_classifier import ExportRefused
from training.data.datasets import read_mr_dir, read_ptb
from models.text_encoding import scoring_stream
from training.jobs.language_model import (WeightAverage, load_language_model, next_learning_rate, stream_perplexity, summed_step_loss,
                              train_language_model)



def tiny_config(**changes) -> CharLMConfig:
    values = dict(vocab_size=50, num_chars=12, word_width=8, char_dim=5, widths=(1, 2, 3), filters=(4, 6, 8),
                  hidden_size=16, dropout=0.5)
    return CharLMConfig(**{**values, **changes})


# --------------------------------------------------------------------------- parts


def test_highway_numbers_checked_by_hand():
    layer = Highway(2)
    with torch.no_grad():
        layer.transform.weight.copy_(torch.eye(2))
        layer.transform.bias.zero_()
        layer.gate.weight.zero_()
        layer.gate.bias.zero_()
    z = layer(torch.tensor([[1.0, -2.0]]))
    t = 1 / (1 + math.exp(2.0))  # sigmoid(0 + 0 - 2) = 0.1192
    # z = t * relu(y) + (1 - t) * y = [t + (1 - t), (1 - t) * -2]
    assert z[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert z[0, 1].item() == pytest.approx(-2 * (1 - t), abs=1e-6) == pytest.approx(-1.76159, abs=1e-5)


def test_highway_starts_close_to_the_identity():
    torch.manual_seed(0)
    layer = Highway(300)
    for parameter in layer.parameters():
        torch.nn.init.uniform_(parameter, -0.05, 0.05)
    y = torch.randn(64, 300)
    gate = torch.sigmoid(layer.gate(y) - 2)
    assert 0.05 < gate.mean().item() < 0.2  # the carry bias -2 keeps about 88 % of y
    assert F.cosine_similarity(layer(y), y).mean().item() > 0.95


def test_char_cnn_is_tanh_then_max_over_positions():
    encoder = CharCNNWordEncoder(num_chars=4, char_dim=1, widths=[1], filters=[1])
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [-1.0], [3.0]]))
        encoder.convolutions[0].weight.fill_(0.5)
        encoder.convolutions[0].bias.fill_(0.1)
    # Characters 1, 2, 0 (padding): tanh(0.5 * e + 0.1) = tanh(0.6), tanh(-0.4), tanh(0.1)
    out = encoder(torch.tensor([[1, 2, 0]]))
    assert out.item() == pytest.approx(math.tanh(0.6), abs=1e-6)
    # A character with a larger embedding wins the max wherever it sits.
    assert encoder(torch.tensor([[0, 3, 1]])).item() == pytest.approx(math.tanh(1.6), abs=1e-6)


def test_presets_have_the_papers_sizes():
    # PTB: 10,000 words; 51 character ids (48 corpus characters less "<" and ">" plus "|" "+",
    # and 4 reserved); words up to 19 characters, so a width of 21.
    small = CharAwareLM(char_lm_config("small", 10_000, 51, 21))
    large = CharAwareLM(char_lm_config("large", 10_000, 51, 21))
    assert small.char_cnn.output_size == 525 and large.char_cnn.output_size == 1100
    assert len(small.highways) == 1 and len(large.highways) == 2
    assert 5.0e6 < sum(p.numel() for p in small.parameters()) < 5.5e6  # the paper: 5 M
    assert 19.0e6 < sum(p.numel() for p in large.parameters()) < 19.6e6  # the paper: 19 M
    assert large.config.recipe.epochs == 35 and small.config.recipe.epochs == 25


def test_every_parameter_starts_uniform_and_the_padding_character_at_zero():
    model = CharAwareLM(tiny_config())
    for name, parameter in model.named_parameters():
        assert parameter.abs().max().item() <= 0.05, name
    assert torch.all(model.char_cnn.embedding.weight[CHAR_PAD_ID] == 0)


# --------------------------------------------------------------------------- details that decide perplexity


def test_dropout_is_on_lstm_outputs_not_on_the_highway_output():
    torch.manual_seed(1)
    model = CharAwareLM(tiny_config()).train()
    seen = {}

    def record(name, pick):
        def hook(module, args, out):
            seen[name] = pick(args, out)  # returns None: the forward pass goes on unchanged
        return hook

    model.lstms[0].register_forward_hook(record("lstm0_in", lambda args, out: args[0]))
    model.lstms[1].register_forward_hook(record("lstm1_out", lambda args, out: out[0]))
    model.output.register_forward_hook(record("softmax_in", lambda args, out: args[0]))
    chars = torch.randint(1, 12, (3, 5, 8))
    model(chars, model.initial_state(3))
    _, highway_out = model.word_vectors(chars.reshape(15, 8))
    assert torch.equal(seen["lstm0_in"], highway_out.reshape(3, 5, -1))  # no dropout on the LSTM input
    kept = seen["softmax_in"] != 0
    assert 0.3 < kept.float().mean().item() < 0.7  # half of the last layer's output dropped...
    assert torch.allclose(seen["softmax_in"][kept], 2 * seen["lstm1_out"][kept])  # ...and the rest scaled by 2


def test_the_state_carried_across_chunks_gives_the_same_logits_as_one_pass():
    torch.manual_seed(2)
    model = CharAwareLM(tiny_config()).eval()
    chars = torch.randint(1, 12, (2, 9, 8))
    whole, _ = model(chars, model.initial_state(2))
    first, state = model(chars[:, :4], model.initial_state(2))
    second, _ = model(chars[:, 4:], state)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-5)


def test_loss_is_the_sum_of_per_step_batch_means():
    torch.manual_seed(3)
    logits, targets = torch.randn(4, 35, 50), torch.randint(0, 50, (4, 35))
    by_step = sum(F.cross_entropy(logits[:, t], targets[:, t]) for t in range(35))
    assert summed_step_loss(logits, targets).item() == pytest.approx(by_step.item(), rel=1e-5)
    assert summed_step_loss(logits, targets).item() == pytest.approx(35 * F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1)).item(), rel=1e-5)


def test_learning_rate_halves_only_from_the_third_validation_when_progress_is_under_one():
    recipe = LanguageModelRecipe()
    curve = lambda *ppl: [{"valid_perplexity": p} for p in ppl]  # noqa: E731
    assert next_learning_rate(curve(300.0), 1.0, recipe) == 1.0
    assert next_learning_rate(curve(300.0, 299.5), 1.0, recipe) == 1.0  # second validation: never
    assert next_learning_rate(curve(300.0, 200.0, 199.2), 1.0, recipe) == 0.5  # improved by 0.8 < 1
    assert next_learning_rate(curve(300.0, 200.0, 198.5), 1.0, recipe) == 1.0  # improved by 1.5
    assert next_learning_rate(curve(300.0, 200.0, 201.0), 0.5, recipe) == 0.25  # got worse


def test_stream_perplexity_does_not_depend_on_the_chunk_length():
    torch.manual_seed(4)
    model = CharAwareLM(tiny_config())
    chars, targets = np.random.default_rng(0).integers(1, 12, (100, 8)), np.random.default_rng(1).integers(0, 50, 100)
    whole, tokens = stream_perplexity(model, chars, targets, chunk=100)
    assert tokens == 100
    assert stream_perplexity(model, chars, targets, chunk=7)[0] == pytest.approx(whole, rel=1e-5)
    # By hand: exp of the mean NLL over all 100 targets of one pass.
    logits, _ = model.eval()(torch.from_numpy(chars).unsqueeze(0), model.initial_state(1))
    assert whole == pytest.approx(math.exp(F.cross_entropy(logits[0], torch.from_numpy(targets)).item()), rel=1e-5)


# --------------------------------------------------------------------------- encoding


def test_words_are_spelled_between_markers_and_padded():
    chars = WordCharEncoder.build(["the", "cat", "<unk>", "<eos>"])
    assert chars.word_width == 5  # longest word "the"/"cat" + 2
    ids = {char: FIRST for char, FIRST in zip(chars.chars, range(4, 4 + len(chars.chars)))}
    assert chars.encode_word("cat") == [WORD_START_ID, ids["c"], ids["a"], ids["t"], WORD_END_ID]
    assert chars.encode_word("<unk>") == [WORD_START_ID, ids["|"], WORD_END_ID, CHAR_PAD_ID, CHAR_PAD_ID]
    assert chars.encode_word("<eos>")[1] == ids["+"]
    assert chars.encode_word("zé") == [WORD_START_ID, UNKNOWN_CHAR_ID, UNKNOWN_CHAR_ID, WORD_END_ID, CHAR_PAD_ID]
    assert chars.encode_word("catcat") == [WORD_START_ID, ids["c"], ids["a"], ids["t"], WORD_END_ID]  # cut to fit
    assert chars.encode_words(["cat", "dog", "cat"]).tolist() == [chars.encode_word(w) for w in ("cat", "dog", "cat")]
    assert WordCharEncoder.from_config(chars.to_config()) == chars


def test_vocab_keeps_unk_as_a_word_and_maps_unknown_words_to_it():
    vocab = LanguageModelVocab.build(["a", "b", "a", "<eos>"])
    assert vocab.words[0] == "a" and "<unk>" in vocab
    assert vocab.ids(["a", "never-seen"]).tolist() == [0, vocab.unk_id]


def test_a_file_is_scored_with_every_token_a_target():
    tokens = ["the", "cat", "<eos>", "sat", "<eos>"]
    vocab, chars = LanguageModelVocab.build(tokens), WordCharEncoder.build(tokens)
    inputs, targets = scoring_stream(tokens, vocab, chars)
    assert len(targets) == 5 and targets.tolist() == vocab.ids(tokens).tolist()
    assert inputs.tolist() == chars.encode_words(["<eos>", "the", "cat", "<eos>", "sat"]).tolist()


# --------------------------------------------------------------------------- the training job


@pytest.fixture(scope="module")
def ptb_slice():
    """A small corpus in PTB's form (lower-case tokens, <eos> at each sentence end) from the
    committed MR sample, so these tests run wherever the repository does: 90 % to train on,
    the rest, whole sentences, to validate on."""
    tokens = [t for example in read_mr_dir(SAMPLE_DATA / "mr") for t in (*tokenize(example.text), "<eos>")]
    train, valid = tokens[:16_000], tokens[27_000:]
    return train, valid[: len(valid) - valid[::-1].index("<eos>")]


TINY = {"hidden_size": "48", "filters": "8,8,8,8,8,8", "recipe.epochs": "3"}


@pytest.fixture(scope="module")
def tiny_run(ptb_slice, tmp_path_factory):
    train, valid = ptb_slice
    out = tmp_path_factory.mktemp("lm") / "lm.pt"
    return train_language_model(train, valid, out, overrides=TINY, device="cpu", show_progress=False), out


def test_training_lowers_validation_perplexity(tiny_run):
    checkpoint, out = tiny_run
    curve = [entry["valid_perplexity"] for entry in checkpoint["metrics"]["history"]]
    assert len(curve) == 3 and curve[-1] < curve[0] < len(checkpoint["vocab"])  # better than a uniform guess, and improving
    assert checkpoint["metrics"]["valid_perplexity"] == min(curve)
    assert out.with_suffix(".curve.jsonl").read_text().count("\n") == 3


def test_a_stopped_run_resumes_to_the_same_curve(ptb_slice, tmp_path):
    train, valid = ptb_slice
    straight = train_language_model(train, valid, tmp_path / "straight.pt", overrides=TINY, device="cpu", show_progress=False)
    stops = 0
    while True:  # a limit of 0 s stops every run after one chunk: stopped and resumed at every point
        stopped = train_language_model(train, valid, tmp_path / "stopped.pt", overrides=TINY, device="cpu",
                                       show_progress=False, time_limit_seconds=0.0)
        if stopped["metrics"]["epochs_run"] == 3:
            break
        stops += 1
        assert stops < 100
    chunks_per_epoch = straight["metrics"]["history"][0]["step"]
    assert stops == 3 * chunks_per_epoch  # each chunk ends one run; the last run validates epoch 3
    for a, b in zip(straight["metrics"]["history"], stopped["metrics"]["history"], strict=True):
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-6)
        assert a["train_perplexity"] == pytest.approx(b["train_perplexity"], rel=1e-6)
        assert a["learning_rate"] == b["learning_rate"]


def test_weight_average_is_the_mean_of_the_steps_and_survives_a_checkpoint():
    model = torch.nn.Linear(2, 1, bias=False)
    average = WeightAverage(model)
    for value in (1.0, 2.0, 6.0):  # checked by hand: (1 + 2 + 6) / 3 = 3
        with torch.no_grad():
            model.weight.fill_(value)
        average.add(model)
    with average.swapped_in(model):
        assert model.weight.tolist() == [[3.0, 3.0]]
    assert model.weight.tolist() == [[6.0, 6.0]]  # its own weights again
    again = WeightAverage(model)
    again.load(average.to_save(), "cpu")
    again.add(model)  # (1 + 2 + 6 + 6) / 4 = 3.75
    with again.swapped_in(model):
        assert model.weight.tolist() == [[3.75, 3.75]] and again.steps == 4


def test_averaging_starts_at_the_halving_it_names_and_is_validated_beside_the_raw_weights(ptb_slice, tmp_path):
    train, valid = ptb_slice
    # decay_when 1000: every validation from the third on halves the rate, so epochs 4 and 5 run at 1/2 and 1/4
    overrides = {**TINY, "recipe.epochs": "5", "recipe.decay_when": "1000", "recipe.average_from_halving": "1"}
    run = train_language_model(train, valid, tmp_path / "lm.pt", overrides=overrides, device="cpu", show_progress=False)
    history = run["metrics"]["history"]
    assert [entry["learning_rate"] for entry in history] == [1.0, 1.0, 1.0, 0.5, 0.25]
    assert ["valid_perplexity_averaged" in entry for entry in history] == [False, False, False, True, True]
    chunks = history[0]["step"]
    assert [entry.get("averaged_steps") for entry in history[3:]] == [chunks, 2 * chunks]
    best = min(min(e["valid_perplexity"], e.get("valid_perplexity_averaged", math.inf)) for e in history)
    assert run["metrics"]["valid_perplexity"] == best
    assert run["metrics"]["best_weights"] in ("raw", "averaged")
    released = load_language_model(run)
    valid_chars, valid_targets = scoring_stream(valid, LanguageModelVocab(tuple(run["vocab"])),
                                                WordCharEncoder.from_config(run["encoding"]))
    assert stream_perplexity(released, valid_chars, valid_targets)[0] == pytest.approx(best, rel=1e-6)  # the weights that scored it


def test_a_tail_of_cycles_extends_a_finished_run_and_averages_the_cycle_ends(ptb_slice, tmp_path):
    train, valid = ptb_slice
    tail = {"recipe.tail_epochs": "2", "recipe.tail_learning_rate": "0.5"}
    finished = train_language_model(train, valid, tmp_path / "lm.pt", overrides=TINY, device="cpu", show_progress=False)
    extended = train_language_model(train, valid, tmp_path / "lm.pt", overrides={**TINY, **tail}, device="cpu",
                                    show_progress=False)
    straight = train_language_model(train, valid, tmp_path / "straight.pt", overrides={**TINY, **tail}, device="cpu",
                                    show_progress=False)
    history = extended["metrics"]["history"]
    assert history[:3] == finished["metrics"]["history"]  # the recipe's epochs are not touched
    assert [(e.get("cycle"), e["learning_rate"], e.get("averaged_steps")) for e in history[3:]] == [(1, 0.5, 2), (2, 0.5, 3)]
    for a, b in zip(history, straight["metrics"]["history"], strict=True):  # extending = running it all at once
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-6)
        assert a.get("valid_perplexity_averaged", 0) == pytest.approx(b.get("valid_perplexity_averaged", 0), rel=1e-6)
    best = min(min(e["valid_perplexity"], e.get("valid_perplexity_averaged", math.inf)) for e in history)
    assert extended["metrics"]["valid_perplexity"] == best and extended["metrics"]["tail_epochs"] == 2
    # the average of three points: the recipe's last weights and the two cycles' ends, by hand
    first = load_language_model(finished, weights="current").state_dict()
    ends = [first]
    for run_epochs in (1, 2):
        partial = train_language_model(train, valid, tmp_path / f"tail{run_epochs}.pt", device="cpu", show_progress=False,
                                       overrides={**TINY, "recipe.tail_epochs": str(run_epochs), "recipe.tail_learning_rate": "0.5"})
        ends.append(load_language_model(partial, weights="current").state_dict())
    averaged = WeightAverage(load_language_model(extended, weights="current"))
    averaged.load(extended["resume"]["average"], "cpu")
    for name, mean in zip(averaged.names, averaged.means):
        torch.testing.assert_close(mean, sum(end[name] for end in ends) / 3, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_other_settings_is_not_resumed(ptb_slice, tmp_path):
    train, valid = ptb_slice
    train_language_model(train, valid, tmp_path / "lm.pt", overrides={**TINY, "recipe.epochs": "1"}, device="cpu",
                         show_progress=False)
    with pytest.raises(SystemExit, match="other settings"):
        train_language_model(train, valid, tmp_path / "lm.pt", overrides=TINY, device="cpu", show_progress=False)


# --------------------------------------------------------------------------- export and evaluate


def test_export_writes_two_graphs_that_match_pytorch(tiny_run, ptb_slice, tmp_path):
    checkpoint, _ = tiny_run
    _, valid = ptb_slice
    metrics = export_language_model(checkpoint, tmp_path / "char-lm-tiny", "char-lm-tiny", valid)
    bundle = read_bundle(tmp_path / "char-lm-tiny")
    assert sorted(p.name for p in bundle.path.iterdir()) == [
        "config.json", "manifest.json", "metrics.json", "step.onnx", "vocab.json", "word_encoder.onnx"]
    assert bundle.labels == () and bundle.architecture == "char-lm"
    # The same figure as training's validation, now through onnxruntime, every token scored.
    assert metrics["valid_perplexity_onnx"] == pytest.approx(checkpoint["metrics"]["valid_perplexity"], rel=1e-3)
    assert metrics["valid_tokens_scored"] == len(valid)
    assert metrics["parity_max_abs_logit_delta"] <= 1e-4 and metrics["parity_max_abs_vector_delta"] <= 1e-4
    step = onnx.load(str(bundle.path / "step.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in step.input}
    assert dims["char_ids"][:2] == ["batch", "steps"] and dims["char_ids"][2] == checkpoint["config"]["word_width"]
    assert dims["h"][1] == "batch"


def test_evaluate_command_scores_a_file_as_one_stream(tiny_run, ptb_slice, tmp_path):
    checkpoint, _ = tiny_run
    _, valid = ptb_slice
    export_language_model(checkpoint, tmp_path / "char-lm-tiny", "char-lm-tiny", valid)
    text = tmp_path / "valid.txt"
    lines, line = [], []
    for token in valid:  # back to Mikolov's layout: one sentence per line
        if token == "<eos>":
            lines.append(" " + " ".join(line) + " ")
            line = []
        else:
            line.append(token)
    text.write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "training", "evaluate", "--bundle", str(tmp_path / "char-lm-tiny"),
                             "--data", str(text), "--format", "ptb"], capture_output=True, text=True, cwd=REPOSITORY, check=True)
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["model"] == "char-lm-tiny" and scored["tokens"] == len(read_ptb(text)) == len(valid)
    model = load_language_model(checkpoint)
    vocab, chars = LanguageModelVocab(tuple(checkpoint["vocab"])), WordCharEncoder.from_config(checkpoint["encoding"])
    expected, _ = stream_perplexity(model, *scoring_stream(valid, vocab, chars))
    assert scored["perplexity"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("bug, message", [("shift", "logits differ"), ("tilt", "perplexity")])
def test_export_is_refused_when_a_graph_differs_from_pytorch(tiny_run, ptb_slice, tmp_path, monkeypatch, bug, message):
    checkpoint, _ = tiny_run
    _, valid = ptb_slice
    real_export = export_lm_module.export_graphs

    def export_a_different_model(model, folder):  # stands in for an exporter bug
        broken = copy.deepcopy(model)
        with torch.no_grad():
            if bug == "shift":
                broken.output.bias.add_(0.01)  # every logit moves, the probabilities do not
            else:
                broken.output.bias[0] += 5.0  # one word's probability jumps
        real_export(broken, folder)

    monkeypatch.setattr(export_lm_module, "export_graphs", export_a_different_model)
    with pytest.raises(ExportRefused, match=message):
        export_language_model(checkpoint, tmp_path / "char-lm-tiny", "char-lm-tiny", valid)
    assert sorted(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_float16_storage_halves_the_graphs_and_records_its_effect(tiny_run, ptb_slice, tmp_path):
    checkpoint, _ = tiny_run
    _, valid = ptb_slice
    export_language_model(checkpoint, tmp_path / "full", "full", valid)
    metrics = export_language_model(checkpoint, tmp_path / "half", "half", valid, storage="float16")
    full, half = (tmp_path / "full" / "step.onnx").stat().st_size, (tmp_path / "half" / "step.onnx").stat().st_size
    assert half < 0.6 * full
    before, after = metrics["float16_rounding_perplexity_before"], metrics["float16_rounding_perplexity_after"]
    assert before == pytest.approx(checkpoint["metrics"]["valid_perplexity"], rel=1e-6)
    assert after != before and after == pytest.approx(before, rel=0.01)
    assert metrics["valid_perplexity_onnx"] == pytest.approx(after, rel=1e-3)


# --------------------------------------------------------------------------- the lecture's pre-training strategy


def test_an_lm_bundle_gives_kims_cnn_a_vector_for_every_word(tiny_lm_bundle, trec_path):
    from models.text_encoding import WordVocab, tokenize
    from services.backends.language_model import CharLanguageModel
    from training.data.datasets import read_trec
    from training.jobs.classifier import train_classifier
    from training.data.word_vectors import read_word_vectors

    examples = read_trec(trec_path)[:300]
    vocab = WordVocab.build(tokenize(e.text, lowercase=False) for e in examples)
    vectors, dimension = read_word_vectors(tiny_lm_bundle, vocab)  # a folder: detected as char-lm
    assert dimension == 48 and set(vectors) == set(vocab.tokens[2:])  # no word left out, rare names and typos included
    served = CharLanguageModel(read_bundle(tiny_lm_bundle))
    capitalised = next(word for word in vocab.tokens[2:] if word[0].isupper())
    assert np.allclose(vectors[capitalised], served.vectors([capitalised.lower()])[0], atol=1e-6)  # lower-cased, as the LM read PTB

    checkpoint = train_classifier(examples[:250], examples[250:], preset="static", lowercase=False, epochs=1,
                                  vectors_path=tiny_lm_bundle, show_progress=False)
    assert checkpoint["metrics"]["vectors_coverage"] == 1.0 and checkpoint["config"]["embedding_dim"] == 48
    embedding = checkpoint["state_dict"]["embeddings.0.weight"]
    word = checkpoint["vocab"].index(capitalised)
    assert np.allclose(embedding[word].numpy(), vectors[checkpoint["vocab"][word]], atol=1e-6)  # static: frozen as read


def test_results_table_has_a_language_model_section(tiny_lm_bundle, tmp_path):
    from training.evaluation.results_table import write_results

    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "char-lm-tiny").symlink_to(tiny_lm_bundle)
    metrics = read_bundle(tiny_lm_bundle).metrics
    [row] = write_results(tmp_path / "zoo", tmp_path / "results.md")
    assert row["bundle"] == "char-lm-tiny" and row["valid_perplexity"] == metrics["valid_perplexity_onnx"]
    assert row["tokens_per_second"] > 0 and row["step_ms"] > 0 and len(row["history"]) == 2
    text = (tmp_path / "results.md").read_text()
    assert "## Character-aware language models" in text and f"| `char-lm-tiny` | small | {metrics['valid_perplexity_onnx']:.1f} |" in text
    assert "| 2 | 1 |" in text  # the curve: epoch 2 at learning rate 1
    vocab = set(json.loads((tiny_lm_bundle / "vocab.json").read_text())["words"])
    for layer in ("cnn", "highway"):  # Table 6: 4 vocabulary words each, best first, never the word itself
        for word, neighbors in row["neighbors"][layer].items():
            similarities = [similarity for _, similarity in neighbors]
            assert len(neighbors) == 4 and similarities == sorted(similarities, reverse=True)
            assert all(n in vocab and n != word for n, _ in neighbors)
    first, similarity = row["neighbors"]["highway"]["looooook"][0]
    assert f"| looooook | " in text and f"{first} ({similarity:.2f})" in text


def test_the_curve_shows_a_tail_cycle_as_a_rate_falling_to_zero():
    from training.evaluation.results_table import TABLE6_WORDS, render_language_models

    history = [{"epoch": 1, "learning_rate": 1.0, "train_perplexity": 300.0, "valid_perplexity": 200.0},
               {"epoch": 2, "learning_rate": 0.25, "train_perplexity": 250.0, "valid_perplexity": 190.0,
                "valid_perplexity_averaged": 185.0, "averaged_steps": 2, "cycle": 1}]
    row = {"bundle": "char-lm-x", "preset": "small", "valid_perplexity": 185.0, "valid_tokens": 10, "best_epoch": 2,
           "best_weights": "averaged", "epochs_run": 2, "epochs": 2, "parameters": 5, "onnx_mb": 1.0,
           "tokens_per_second": 1.0, "step_ms": 1.0, "train_hours": 0.1, "device": "cpu", "paper": "none",
           "history": history, "commands": {}, "neighbors": {layer: {word: [] for word in TABLE6_WORDS} for layer in ("cnn", "highway")}}
    text = "\n".join(render_language_models([row]))
    assert "| 1 | 1 | 300.0 | 200.0 | |" in text and "| 2 | 0.25 → 0 | 250.0 | 190.0 | 185.0 |" in text
    assert "SWA, `recipe.tail_epochs`" in text and "the averaged weights of epoch 2" in text


def test_served_text_is_read_with_penn_treebank_conventions():
    from services.backends.language_model import ptb_tokenize

    vocab = LanguageModelVocab(("<unk>", "<eos>", "mr.", "the"))
    assert ptb_tokenize("Mr. Smith's company didn't pay $5,000 (about 3.5%) in 1990s, the end.", vocab) == [
        "mr.", "smith", "'s", "company", "did", "n't", "pay", "$", "N", "about", "N", "in", "N", "the", "end"]
    assert ptb_tokenize("  !!! ... ", vocab) == []
    assert ptb_tokenize("#1 choice", vocab) == ["#", "N", "choice"]


def test_asking_for_cuda_without_a_gpu_is_an_error_not_a_fallback(tiny_lm_bundle, ptb_slice, tmp_path):
    from services.backends.inference import BundleError
    from training.evaluation.evaluate import evaluate_language_model

    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    train, valid = ptb_slice
    with pytest.raises(SystemExit, match="no usable CUDA GPU"):
        train_language_model(train, valid, tmp_path / "lm.pt", overrides=TINY, device="cuda", show_progress=False)
    assert not (tmp_path / "lm.pt").exists()
    with pytest.raises(BundleError, match="cuda"):
        evaluate_language_model(tiny_lm_bundle, valid, device="cuda")
