"""The character-aware language model in onnxruntime: scoring, next words, generation and word
vectors, from a bundle's two graphs. Torch-free; shared by the service and by
`python -m training evaluate`, so a perplexity printed by one is what the other computes.

    step.onnx          char_ids (B, T, W) int64, h (L, B, H), c (L, B, H)
                         -> logits (B, T, V), h_out, c_out            state explicit: continue anywhere
    word_encoder.onnx  char_ids (N, W) -> cnn (N, F), highway (N, F)  vectors of any string

Text is read the way Penn Treebank was written: lower case, numbers as "N", clitics ('s n't
're 've 'll 'd 'm) split off, punctuation around words dropped except where the word with
its period is in the vocabulary ("mr.", "u.s."). A text is preceded by <eos> (a sentence
boundary) and, when scored, followed by one: a sentence's probability includes its end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from models.text_encoding import EOS_TOKEN, UNK_TOKEN, LanguageModelVocab, WordCharEncoder
from services.backends.inference import Bundle, BundleError, make_session
from services.backends.bundle_format import check_language_model_graphs
from services.backends.cost_batching import length_groups, measure_token_budget, padded_tokens, rows_at_typical_length

STEP_GRAPH = "step.onnx"
WORD_ENCODER_GRAPH = "word_encoder.onnx"
VECTOR_LAYERS = ("highway", "cnn")  # after / before the highway layers (Table 6 of the paper)

_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ve|'ll|'d|'m)$")
_NUMBER = re.compile(r"^[+-]?(\d+([.,:/-]\d+)*|\d*\.\d+)(s|th|st|nd|rd)?$")
_OUTER_PUNCTUATION = "\"'`,;:!?()[]{}%"
_SPLIT_PREFIXES = ("$", "#")  # PTB writes "$ N million", "# N"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ptb_tokenize(text: str, vocab: LanguageModelVocab) -> list[str]:
    """Penn Treebank's conventions (module docstring); an empty list for a text without words.
    `vocab` decides whether a word keeps its final period ("mr." yes, "end." no)."""
    tokens: list[str] = []
    for raw in text.lower().split():
        word = raw.strip(_OUTER_PUNCTUATION)
        if word[:1] in _SPLIT_PREFIXES and len(word) > 1:
            tokens.append(word[0])
            word = word[1:]
        if word.endswith(".") and word not in vocab:
            word = word.rstrip(".").strip(_OUTER_PUNCTUATION)
        if not word:
            continue
        clitic = _CLITIC.search(word)
        parts = [word[: clitic.start()], clitic.group()] if clitic and clitic.start() > 0 else [word]
        tokens.extend("N" if _NUMBER.match(part) else part for part in parts if part)
    return tokens


@dataclass(frozen=True)
class ScoredText:
    tokens: list[str]  # as the model read them, the closing <eos> included
    log_probs: np.ndarray  # (len(tokens),) natural-log probability of each token given those before it
    in_vocabulary: list[bool]  # False: the token was scored as <unk> (the class of every unknown word)

    @property
    def total(self) -> float:
        return float(self.log_probs.sum())

    @property
    def perplexity(self) -> float:
        return float(np.exp(-self.log_probs.mean()))


class CharLanguageModel:
    TYPICAL_TOKENS = 24  # a news sentence in words, <eos> included: the length the token budget is measured at

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0) -> None:
        if bundle.config.get("encoding", {}).get("kind") != "word-chars":
            raise BundleError(f"{bundle.name}: not a character-aware language model bundle")
        self.bundle = bundle
        self.vocab = LanguageModelVocab(tuple(json.loads((bundle.path / "vocab.json").read_text())["words"]))
        self.chars = WordCharEncoder.from_config(bundle.config["encoding"])
        self.step_session = make_session(bundle.path / STEP_GRAPH, device, threads)
        self.word_session = make_session(bundle.path / WORD_ENCODER_GRAPH, device, threads)
        model = bundle.config["model"]
        self.layers, self.hidden_size = model["lstm_layers"], model["hidden_size"]
        self._check_graphs()
        self._vocab_unit_vectors: dict[str, np.ndarray] = {}
        self.token_budget: int | None = None  # padded words per step-graph run when scoring (cost_batching.py)
        self.observe_batch: Callable[[int, int], None] | None = None  # (padded words, words) per score call

    def _check_graphs(self) -> None:
        """The two graphs against the bundle contract (bundle_format.py)."""
        check_language_model_graphs(self.bundle, {STEP_GRAPH: self.step_session, WORD_ENCODER_GRAPH: self.word_session})

    @property
    def name(self) -> str:
        return self.bundle.name

    # ------------------------------------------------------------------ text -> tokens

    def tokenize(self, text: str) -> list[str]:
        return ptb_tokenize(text, self.vocab)

    # ------------------------------------------------------------------ the step graph

    def initial_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def step(self, char_ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """char_ids (B, T, W) -> logits (B, T, V), h, c: one call of the step graph."""
        logits, h, c = self.step_session.run(["logits", "h_out", "c_out"], {"char_ids": char_ids, "h": h, "c": c})
        return logits, h, c

    def stream_log_probs(self, input_chars: np.ndarray, targets: np.ndarray, chunk: int = 700) -> np.ndarray:
        """(N,) log-probabilities of `targets` for one stream read in order with the state carried
        (batch 1): how training validates and how `evaluate` scores a file."""
        h, c = self.initial_state(1)
        out = np.empty(len(targets), np.float64)
        for start in range(0, len(targets), chunk):
            logits, h, c = self.step(input_chars[None, start : start + chunk], h, c)
            log_probs = log_softmax(logits[0].astype(np.float64))
            out[start : start + chunk] = log_probs[np.arange(len(log_probs)), targets[start : start + chunk]]
        return out

    def score(self, texts: Sequence[str]) -> list[ScoredText]:
        """Each text's tokens and their log-probabilities. The texts run in groups of similar
        length within `token_budget` padded tokens (cost_batching.py; one batch without one);
        rows are right-padded, and since the LSTM reads left to right the padding after a text
        never changes its scores."""
        tokenized = [self.tokenize(text) + [EOS_TOKEN] for text in texts]
        lengths = np.array([len(tokens) for tokens in tokenized], np.int64)
        groups = length_groups(lengths, self.token_budget, rows_at_typical_length(self.token_budget, self.TYPICAL_TOKENS))
        if self.observe_batch is not None:
            self.observe_batch(padded_tokens(lengths, groups), int(lengths.sum()))
        scored: list[ScoredText | None] = [None] * len(texts)
        for rows in groups:
            for row, text in zip(rows, self._score_padded([tokenized[row] for row in rows])):
                scored[row] = text
        return scored

    def _score_padded(self, tokenized: list[list[str]]) -> list[ScoredText]:
        """Token lists (each closed by <eos>) as one right-padded batch of the step graph."""
        longest = max(len(tokens) for tokens in tokenized)
        char_ids = np.zeros((len(tokenized), longest, self.chars.word_width), np.int64)
        targets = np.zeros((len(tokenized), longest), np.int64)
        for row, tokens in enumerate(tokenized):
            char_ids[row, : len(tokens)] = self.chars.encode_words([EOS_TOKEN, *tokens[:-1]])
            targets[row, : len(tokens)] = self.vocab.ids(tokens)
        logits, _, _ = self.step(char_ids, *self.initial_state(len(tokenized)))
        log_probs = log_softmax(logits.astype(np.float64))
        picked = np.take_along_axis(log_probs, targets[..., None], axis=2)[..., 0]  # (B, T)
        return [
            ScoredText(tokens, picked[row, : len(tokens)], [token in self.vocab for token in tokens])
            for row, tokens in enumerate(tokenized)
        ]

    def measure_token_budget(self, max_rows: int) -> int:
        """This model's padded-token budget (words) on this device (cost_batching.py)."""
        width = self.TYPICAL_TOKENS
        run = lambda rows: self.step(np.ones((rows, width, self.chars.word_width), np.int64), *self.initial_state(rows))
        return measure_token_budget(run, width, max_rows)

    def _read(self, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read <eos> + tokens; the log-probabilities of the word after them, and the state."""
        logits, h, c = self.step(self.chars.encode_words([EOS_TOKEN, *tokens])[None], *self.initial_state(1))
        return log_softmax(logits[0, -1].astype(np.float64)), h, c

    def next_words(self, prefix: str, k: int) -> tuple[list[str], list[tuple[str, float]]]:
        """The prefix's tokens and the k most probable next words with their probabilities."""
        tokens = self.tokenize(prefix)
        log_probs, _, _ = self._read(tokens)
        best = np.argsort(-log_probs, kind="stable")[:k]
        return tokens, [(self.vocab.words[i], float(np.exp(log_probs[i]))) for i in best]

    def generate(self, prefix: str, max_words: int, temperature: float, top_k: int, seed: int,
                 stop_at_eos: bool = False) -> Iterator[tuple[str, float]]:
        """Sample up to `max_words` words after `prefix`, one step graph call each, yielding
        (word, its probability under the sampling distribution). The same seed gives the same
        words. temperature 0 is greedy; top_k 0 samples from the whole vocabulary."""
        rng = np.random.default_rng(seed)
        log_probs, h, c = self._read(self.tokenize(prefix))
        for _ in range(max_words):
            if temperature == 0:
                choice = int(np.argmax(log_probs))
                probability = 1.0
            else:
                scaled = log_probs / temperature
                if top_k:
                    cut = np.partition(scaled, -top_k)[-top_k]
                    scaled = np.where(scaled >= cut, scaled, -np.inf)
                distribution = np.exp(scaled - scaled.max())
                distribution /= distribution.sum()
                choice = int(rng.choice(len(distribution), p=distribution))
                probability = float(distribution[choice])
            word = self.vocab.words[choice]
            yield word, probability
            if stop_at_eos and word == EOS_TOKEN:
                return
            logits, h, c = self.step(self.chars.encode_words([word])[None], h, c)
            log_probs = log_softmax(logits[0, -1].astype(np.float64))

    # ------------------------------------------------------------------ the word encoder graph

    def vectors(self, words: Sequence[str], layer: str = "highway") -> np.ndarray:
        """(len(words), F) vectors of any strings, from their characters alone."""
        if layer not in VECTOR_LAYERS:
            raise ValueError(f"layer {layer!r}: expected one of {VECTOR_LAYERS}")
        cnn, highway = self.word_session.run(["cnn", "highway"], {"char_ids": self.chars.encode_words(list(words))})
        return highway if layer == "highway" else cnn

    def neighbors(self, words: Sequence[str], k: int, layer: str = "highway") -> list[list[tuple[str, float]]]:
        """For each word, the k in-vocabulary words with the most similar vector (cosine), the
        word itself left out. The vocabulary's vectors are computed once per layer."""
        if layer not in self._vocab_unit_vectors:
            candidates = [w for w in self.vocab.words if w not in (UNK_TOKEN, EOS_TOKEN)]
            table = np.concatenate([self.vectors(candidates[i : i + 2048], layer) for i in range(0, len(candidates), 2048)])
            # _candidates first: a concurrent call that sees the table must find the words too.
            self._candidates = candidates
            self._vocab_unit_vectors[layer] = table / np.linalg.norm(table, axis=1, keepdims=True).clip(1e-12)
        unit = self._vocab_unit_vectors[layer]
        queries = self.vectors(words, layer)
        similarity = (queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)) @ unit.T  # (Q, V')
        results = []
        for row, word in enumerate(words):
            order = [i for i in np.argsort(-similarity[row], kind="stable")[: k + 1] if self._candidates[i] != word][:k]
            results.append([(self._candidates[i], float(similarity[row, i])) for i in order])
        return results
