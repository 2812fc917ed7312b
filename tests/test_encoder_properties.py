"""Property tests (hypothesis) of the torch-free encoders the service and training share: any
Unicode text encodes without error, with lengths and ids in range, using the released bundles'
own vocabularies and alphabets."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from models.text_encoding import (
    CHAR_PAD_ID, EOS_TOKEN, PAD_ID, SPECIAL_SPELLINGS, UNK_TOKEN, WORD_END_ID, WORD_START_ID, LanguageModelVocab,
    WordCharEncoder, WordVocab, encoder_from_config, tokenize,
)
from tests.conftest import ZOO

# Any code point, surrogates included (a JSON string can carry a lone one), and some long texts.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=3000)
TEXTS = st.lists(ANY_TEXT, min_size=1, max_size=8)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bundle_encoder(name: str):
    config = json.loads((ZOO / name / "config.json").read_text())
    vocab = WordVocab.load(ZOO / name / "vocab.json") if config["encoding"]["kind"] == "words" else None
    return encoder_from_config(config["encoding"], vocab), vocab


KIM, KIM_VOCAB = bundle_encoder("kim-cnn-trec6")
LSTM, LSTM_VOCAB = bundle_encoder("lstm-mr")
CHAR_CNN, _ = bundle_encoder("char-cnn-small-trec6")
LM_CONFIG = json.loads((ZOO / "char-lm-small-ptb" / "config.json").read_text())
LM_CHARS = WordCharEncoder.from_config(LM_CONFIG["encoding"])
LM_VOCAB = LanguageModelVocab(tuple(json.loads((ZOO / "char-lm-small-ptb" / "vocab.json").read_text())["words"]))


@PROPERTY_SETTINGS
@given(TEXTS)
def test_word_encoders_take_any_text_with_ids_and_lengths_in_range(texts):
    for encoder, vocab in ((KIM, KIM_VOCAB), (LSTM, LSTM_VOCAB)):
        ids, lengths = encoder.encode_batch(texts)
        assert ids.dtype == np.int64 and lengths.dtype == np.int64 and ids.shape[0] == len(texts) == len(lengths)
        assert ids.min() >= 0 and ids.max() < len(vocab)
        assert lengths.min() >= 1 and ids.shape[1] == lengths.max()
        for row, length, text in zip(ids, lengths, texts):
            words = tokenize(text, lowercase=encoder.lowercase)
            assert length == max(encoder.min_length, len(words) + 2 * encoder.edge_padding)
            assert (row[length:] == PAD_ID).all()  # right padding only after the text
            real = row[encoder.edge_padding: encoder.edge_padding + len(words)]
            assert ((real != PAD_ID) | (len(words) == 0)).all()  # a word never encodes as padding


@PROPERTY_SETTINGS
@given(ANY_TEXT)
def test_tokenize_gives_words_without_spaces_and_is_stable(text):
    words = tokenize(text)
    assert all(word and not any(ch.isspace() for ch in word) for word in words)
    assert tokenize(" ".join(words)) == words  # cleaning what is already clean changes nothing


@PROPERTY_SETTINGS
@given(TEXTS)
def test_the_char_encoder_gives_fixed_rows_of_alphabet_ids(texts):
    ids, lengths = CHAR_CNN.encode_batch(texts)
    assert ids.shape == (len(texts), CHAR_CNN.length) and (lengths == CHAR_CNN.length).all()
    assert ids.min() >= 0 and ids.max() <= CHAR_CNN.alphabet_size
    for row, text in zip(ids, texts):
        kept = min(len(text), CHAR_CNN.length)
        assert (row[kept:] == 0).all()  # only the text's characters are nonzero


@PROPERTY_SETTINGS
@given(st.lists(ANY_TEXT.filter(lambda w: w != ""), min_size=1, max_size=20))
def test_the_language_models_spelling_takes_any_string(words):
    rows = LM_CHARS.encode_words(words)
    assert rows.shape == (len(words), LM_CHARS.word_width) and rows.dtype == np.int64
    assert rows.min() >= 0 and rows.max() < LM_CHARS.num_chars
    for row, word in zip(rows, words):
        spelled = min(len(SPECIAL_SPELLINGS.get(word, word)), LM_CHARS.word_width - 2)  # <unk>, <eos>: one reserved character
        assert row[0] == WORD_START_ID and row[spelled + 1] == WORD_END_ID
        assert (row[spelled + 2:] == CHAR_PAD_ID).all()
    ids = LM_VOCAB.ids(words)
    assert ((ids >= 0) & (ids < len(LM_VOCAB))).all()
    assert all(i == LM_VOCAB.unk_id or LM_VOCAB.words[i] == w for i, w in zip(ids, words))
    assert EOS_TOKEN in LM_VOCAB and UNK_TOKEN in LM_VOCAB
