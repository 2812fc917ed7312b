"""Torch-free text encoding shared by training and serving, so the two cannot drift.

Word-level models (Kim 2014) see a text as word ids:

    "How far is it?"  --clean_str-->  "how far is it ?"  --vocab-->  [57, 211, 9, 30, 4]
                      --pad-->  [0, 0, 0, 0, 57, 211, 9, 30, 4, 0, 0, 0, 0]   length 5 + 2*4

The padding follows Kim's CNN_sentence code: (widest filter - 1) zero pads in front and behind,
so every word can sit in every position of a window and even an empty text is as long as the
widest filter. A batch is right-padded to its longest member; the model receives each row's
own length and ignores windows beyond it, so a text's logits do not depend on its batch.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1


def clean_str(text: str, lowercase: bool = True) -> str:
    """Kim's tokenisation (CNN_sentence/process_data.py `clean_str`).

    Keeps letters, digits and ( ) , ! ? ' `; splits clitics ('s 've n't 're 'd 'll) and
    punctuation into tokens; lower-cases unless `lowercase` is False (Kim keeps case for TREC).
    One deliberate difference: Kim's replacement strings " \\( " leave a literal backslash in
    the token ("\\?"); we emit the bare "?" "(" ")", which partitions words identically.
    """
    text = re.sub(r"[^A-Za-z0-9(),!?\'\`]", " ", text)
    text = re.sub(r"\'s", " 's", text)
    text = re.sub(r"\'ve", " 've", text)
    text = re.sub(r"n\'t", " n't", text)
    text = re.sub(r"\'re", " 're", text)
    text = re.sub(r"\'d", " 'd", text)
    text = re.sub(r"\'ll", " 'll", text)
    text = re.sub(r",", " , ", text)
    text = re.sub(r"!", " ! ", text)
    text = re.sub(r"\(", " ( ", text)
    text = re.sub(r"\)", " ) ", text)
    text = re.sub(r"\?", " ? ", text)
    text = re.sub(r"\s{2,}", " ", text)
    text = text.strip()
    return text.lower() if lowercase else text


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Words of `text` after Kim's cleaning; an empty list for a text with no word characters."""
    cleaned = clean_str(text, lowercase=lowercase)
    return cleaned.split(" ") if cleaned else []


@dataclass(frozen=True)
class WordVocab:
    """Word <-> id map with `<pad>` = 0 and `<unk>` = 1; saved as JSON `{"tokens": [...]}`."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.tokens[:2] != (PAD_TOKEN, UNK_TOKEN):
            raise ValueError(f"a vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary must not repeat a token")
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.tokens)})

    @classmethod
    def build(cls, tokenized_texts: Iterable[Sequence[str]], min_count: int = 1) -> WordVocab:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for words in tokenized_texts for word in words)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls((PAD_TOKEN, UNK_TOKEN, *(w for w in kept if w not in (PAD_TOKEN, UNK_TOKEN))))

    def __len__(self) -> int:
        return len(self.tokens)

    def ids(self, words: Sequence[str]) -> list[int]:
        lookup = self._ids  # type: ignore[attr-defined]
        return [lookup.get(word, UNK_ID) for word in words]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": list(self.tokens)}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordVocab:
        return cls(tuple(json.loads(Path(path).read_text())["tokens"]))


@dataclass(frozen=True)
class WordEncoder:
    """Turns raw texts into the (token_ids, lengths) pair a word-level model takes.

    `edge_padding` pads before and after each text (Kim: widest filter - 1); `max_words`
    truncates longer texts (the service rejects them before they get here).
    """

    vocab: WordVocab
    lowercase: bool
    edge_padding: int
    max_words: int | None = None
    min_length: int = 1  # a text with no words still gets one <pad> position (an RNN needs a step)

    def encode_one(self, text: str) -> list[int]:
        words = tokenize(text, lowercase=self.lowercase)
        if self.max_words is not None:
            words = words[: self.max_words]
        pad = [PAD_ID] * self.edge_padding
        row = pad + self.vocab.ids(words) + pad
        return row + [PAD_ID] * (self.min_length - len(row))

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token_ids (B, T) int64 right-padded with 0, lengths (B,) int64 before that padding)."""
        rows = [self.encode_one(text) for text in texts]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        token_ids = np.full((len(rows), int(lengths.max(initial=0))), PAD_ID, dtype=np.int64)
        for i, row in enumerate(rows):
            token_ids[i, : len(row)] = row
        return token_ids, lengths

    def count_words(self, text: str) -> int:
        return len(tokenize(text, lowercase=self.lowercase))


# Zhang, Zhao & LeCun (2015): 26 letters, 10 digits, 33 other characters and the newline.
ZHANG_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{}\n"


@dataclass(frozen=True)
class CharEncoder:
    """Zhang et al.'s quantisation: each character -> its 1-based index in the alphabet, 0 for
    any other character and for padding (the model turns ids into one-hot vectors, with 0 as
    the all-zero vector). Fixed length `length` (l0), shorter texts padded; with `reverse`
    (the paper's setting) the last l0 characters are kept and fed last-first."""

    alphabet: str = ZHANG_ALPHABET
    length: int = 1014
    lowercase: bool = True
    reverse: bool = True

    def __post_init__(self) -> None:
        # The paper's list repeats "-"; the first index wins, so ids stay stable.
        ids: dict[str, int] = {}
        for i, char in enumerate(self.alphabet, start=1):
            ids.setdefault(char, i)
        object.__setattr__(self, "_ids", ids)

    @property
    def alphabet_size(self) -> int:
        return len(self.alphabet)

    def encode_one(self, text: str) -> list[int]:
        text = text.lower() if self.lowercase else text
        # Zhang's Crepe reads from the end: the last `length` characters, last first.
        kept = text[::-1][: self.length] if self.reverse else text[: self.length]
        lookup = self._ids  # type: ignore[attr-defined]
        row = [lookup.get(char, 0) for char in kept]
        return row + [0] * (self.length - len(row))

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(char_ids (B, length) int64, lengths (B,) int64 = length: every row is full)."""
        token_ids = np.array([self.encode_one(text) for text in texts], dtype=np.int64).reshape(len(texts), self.length)
        return token_ids, np.full(len(texts), self.length, dtype=np.int64)


class TokenizerEncoder:
    """A Hugging Face tokenizer.json (the `tokenizers` package: Rust, torch-free; the file is
    read, nothing is fetched) -> (input_ids (B, T) int64 right-padded with the tokenizer's pad
    id, lengths (B,) int64), T <= max_length: longer texts are truncated (its post-processor's
    special tokens, e.g. [CLS] ... [SEP], included). The graph's attention_mask is lengths'."""

    PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")

    def __init__(self, path: str | os.PathLike[str], max_length: int) -> None:
        from tokenizers import Tokenizer  # only bundles with this encoding need the package

        self.tokenizer = Tokenizer.from_file(os.fspath(path))
        self.max_length = max_length
        padding = self.tokenizer.padding
        known = [self.tokenizer.token_to_id(token) for token in self.PAD_TOKENS]
        self.pad_id = padding["pad_id"] if padding else next((i for i in known if i is not None), 0)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        token_ids = np.full((len(rows), max(1, int(lengths.max(initial=0)))), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            token_ids[i, : len(row)] = row
        return token_ids, lengths


def encoder_from_config(encoding: dict, vocab: WordVocab | None = None,
                        folder: str | os.PathLike[str] | None = None) -> WordEncoder | CharEncoder | TokenizerEncoder:
    """The encoder a bundle's or checkpoint's `encoding` section describes (`folder`: the
    bundle's, for a tokenizer's file)."""
    if encoding["kind"] == "words":
        if vocab is None:
            raise ValueError("a word encoding needs its vocabulary")
        return WordEncoder(vocab, encoding["lowercase"], encoding["edge_padding"], min_length=encoding.get("min_length", 1))
    if encoding["kind"] == "chars":
        return CharEncoder(encoding["alphabet"], encoding["length"], encoding["lowercase"], encoding["reverse"])
    if encoding["kind"] == "tokenizer":
        if folder is None:
            raise ValueError("a tokenizer encoding needs the folder of its file")
        return TokenizerEncoder(Path(folder) / encoding["file"], encoding["max_length"])
    raise ValueError(f"unknown input encoding {encoding['kind']!r}; expected 'words', 'chars' or 'tokenizer'")


# --------------------------------------------------------------------------- language model
# Kim et al. 2016 read every word as its characters between a start and an end marker. The
# markers, padding and unseen characters get ids of their own (Kim used the characters "{",
# "}" and " " and removed them from the text); corpus characters follow from id 4.
CHAR_PAD_ID, WORD_START_ID, WORD_END_ID, UNKNOWN_CHAR_ID = 0, 1, 2, 3
FIRST_CHAR_ID = 4
EOS_TOKEN = "<eos>"
# Kim spells the two special words as one reserved character each, so `<unk>` does not look
# like a word that starts with "<u" (yoonkim/lstm-char-cnn: "|" for <unk>, "+" for <eos>).
SPECIAL_SPELLINGS = {UNK_TOKEN: "|", EOS_TOKEN: "+"}
MAX_WORD_WIDTH = 65  # Kim's max_word_l: longer words keep their first 63 characters


@dataclass(frozen=True)
class LanguageModelVocab:
    """The words a language model predicts, most frequent first; `<unk>` stands for the rest."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if UNK_TOKEN not in self.words:
            raise ValueError(f"a language-model vocabulary needs {UNK_TOKEN!r}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("a vocabulary must not repeat a word")
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.words)})

    @classmethod
    def build(cls, tokens: Iterable[str]) -> LanguageModelVocab:
        counts = Counter(tokens)
        counts.setdefault(UNK_TOKEN, 0)
        return cls(tuple(sorted(counts, key=lambda word: (-counts[word], word))))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def unk_id(self) -> int:
        return self._ids[UNK_TOKEN]  # type: ignore[attr-defined]

    def ids(self, words: Sequence[str]) -> np.ndarray:
        lookup, unk = self._ids, self.unk_id  # type: ignore[attr-defined]
        return np.array([lookup.get(word, unk) for word in words], dtype=np.int64)

    def __contains__(self, word: str) -> bool:
        return word in self._ids  # type: ignore[attr-defined]


@dataclass(frozen=True)
class WordCharEncoder:
    """A word -> its character ids: start marker, characters, end marker, zero padding to
    `word_width` (the longest training word + 2, at most 65; the model is served at the width it
    was trained with). A character the corpus never had gets UNKNOWN_CHAR_ID, so any string,
    in any script, has a spelling."""

    chars: tuple[str, ...]  # corpus characters; chars[i] has id FIRST_CHAR_ID + i
    word_width: int

    def __post_init__(self) -> None:
        if self.word_width < 3:
            raise ValueError("word_width must hold the two markers and a character")
        object.__setattr__(self, "_ids", {char: FIRST_CHAR_ID + i for i, char in enumerate(self.chars)})

    @classmethod
    def build(cls, words: Iterable[str], max_width: int = MAX_WORD_WIDTH) -> WordCharEncoder:
        spellings = {SPECIAL_SPELLINGS.get(word, word) for word in words}
        chars = sorted({char for spelling in spellings for char in spelling})
        longest = max((len(spelling) for spelling in spellings), default=1)
        return cls(tuple(chars), min(longest + 2, max_width))

    @property
    def num_chars(self) -> int:
        return FIRST_CHAR_ID + len(self.chars)

    def encode_word(self, word: str) -> list[int]:
        lookup = self._ids  # type: ignore[attr-defined]
        spelling = SPECIAL_SPELLINGS.get(word, word)[: self.word_width - 2]
        row = [WORD_START_ID, *(lookup.get(char, UNKNOWN_CHAR_ID) for char in spelling), WORD_END_ID]
        return row + [CHAR_PAD_ID] * (self.word_width - len(row))

    def encode_words(self, words: Sequence[str]) -> np.ndarray:
        """(N,) words -> (N, word_width) int64 character ids; each distinct word is spelled once."""
        rows: dict[str, list[int]] = {}
        for word in words:
            if word not in rows:
                rows[word] = self.encode_word(word)
        if not words:
            return np.zeros((0, self.word_width), dtype=np.int64)
        table = np.array(list(rows.values()), dtype=np.int64)
        index = {word: i for i, word in enumerate(rows)}
        return table[[index[word] for word in words]]

    def to_config(self) -> dict:
        return {"kind": "word-chars", "chars": "".join(self.chars), "word_width": self.word_width,
                "special_spellings": SPECIAL_SPELLINGS}

    @classmethod
    def from_config(cls, encoding: dict) -> WordCharEncoder:
        if encoding.get("special_spellings", SPECIAL_SPELLINGS) != SPECIAL_SPELLINGS:
            raise ValueError("this bundle spells <unk>/<eos> differently from this code")
        return cls(tuple(encoding["chars"]), encoding["word_width"])


def scoring_stream(tokens: list[str], vocab: LanguageModelVocab, chars: WordCharEncoder) -> tuple[np.ndarray, np.ndarray]:
    """A file scored as one stream: the model reads <eos> then every token but the last and
    predicts every token, so each of the file's N tokens gets a probability (N targets).
    Returns (input chars (N, W), target ids (N,))."""
    return chars.encode_words([EOS_TOKEN, *tokens[:-1]]), vocab.ids(tokens)
