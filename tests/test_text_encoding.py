"""Kim's tokenisation, the vocabulary and the padding, against values worked out by hand."""

import numpy as np
import pytest

from models.text_encoding import PAD_ID, UNK_ID, WordEncoder, WordVocab, clean_str, tokenize


@pytest.mark.parametrize(
    "raw, lowercase, expected",
    [
        ("How far is it from Denver to Aspen ?", False, "How far is it from Denver to Aspen ?"),
        ("How far is it from Denver to Aspen ?", True, "how far is it from denver to aspen ?"),
        ("It's the film's best, isn't it?!", True, "it 's the film 's best , is n't it ? !"),
        ("We've said they're sure we'd go & you'll see", True, "we 've said they 're sure we 'd go you 'll see"),
        ("(parenthetical)remark", True, "( parenthetical ) remark"),
        ("naïve café -- 3.5 stars", True, "na ve caf 3 5 stars"),  # non-ASCII and . - are separators
        ("   ", True, ""),
        ("`quoted`", True, "`quoted`"),
    ],
)
def test_clean_str_matches_kim(raw, lowercase, expected):
    assert clean_str(raw, lowercase=lowercase) == expected


def test_tokenize_empty_text_has_no_words():
    assert tokenize("$$$ ...") == []
    assert tokenize("Who?") == ["who", "?"]


def test_vocab_orders_by_count_then_alphabet_and_reserves_pad_unk():
    vocab = WordVocab.build([["b", "a", "c"], ["c", "a"], ["c"]])
    assert vocab.tokens == ("<pad>", "<unk>", "c", "a", "b")  # c x3, a x2, b x1
    assert vocab.ids(["a", "zebra", "c"]) == [3, UNK_ID, 2]
    assert WordVocab.build([["b", "a", "c"], ["c", "a"]], min_count=2).tokens == ("<pad>", "<unk>", "a", "c")


def test_vocab_round_trips_through_json(tmp_path):
    vocab = WordVocab.build([["naïve", "x"]])
    vocab.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json") == vocab


def test_vocab_rejects_a_list_without_reserved_tokens():
    with pytest.raises(ValueError, match="must start with"):
        WordVocab(("a", "b"))


def test_encoder_pads_like_kim_and_batches_to_the_longest():
    vocab = WordVocab(("<pad>", "<unk>", "who", "?", "wrote", "hamlet"))
    encoder = WordEncoder(vocab, lowercase=True, edge_padding=4)
    assert encoder.encode_one("Who?") == [0, 0, 0, 0, 2, 3, 0, 0, 0, 0]
    token_ids, lengths = encoder.encode_batch(["Who?", "Who wrote Hamlet?", "$$$"])
    assert lengths.tolist() == [10, 12, 8]  # words + 2 * 4; an empty text still spans the widest filter (5)
    assert token_ids.shape == (3, 12) and token_ids.dtype == np.int64
    assert token_ids[1].tolist() == [0, 0, 0, 0, 2, 4, 5, 3, 0, 0, 0, 0]
    assert token_ids[0, 10:].tolist() == [PAD_ID, PAD_ID]


def test_encoder_truncates_to_max_words():
    vocab = WordVocab(("<pad>", "<unk>", "a"))
    assert WordEncoder(vocab, True, 1, max_words=2).encode_one("a a a a") == [0, 2, 2, 0]


def test_encoding_and_services_are_torch_free():
    import subprocess
    import sys

    code = "import sys, models.text_encoding, services.service; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
