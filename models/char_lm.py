"""Character-aware neural language model (Kim, Jernite, Sontag & Rush, AAAI 2016).

    word characters (B, T, W)            each word as {chars} zero-padded to W
      -> character CNN (B*T, F)          widths 1..6 (small) or 1..7 (large), tanh, max over time
      -> highway layers (B*T, F)         z = t*relu(W_H y + b_H) + (1 - t)*y, carry bias -2
      -> 2-layer LSTM (B, T, H)          state (h, c) carried in and out
      -> dropout -> linear (B, T, V)     logits over the word vocabulary (10k for PTB)

Dropout (0.5) sits on the output of each LSTM layer: between the layers and before the
softmax, not on the highway output (as yoonkim/lstm-char-cnn's LSTMTDNN.lua; a port that also
dropped the LSTM input lost 7 perplexity points). `forward` returns logits and the new state;
the loss lives in training/. The model never sees a word id on its input: any string of
characters gets a vector, including words outside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.char_word_cnn import CharCNNWordEncoder
from models.highway import Highway


@dataclass(frozen=True)
class LanguageModelRecipe:
    """Kim et al.'s training recipe; read by training/jobs/language_model.py, never by the model."""

    learning_rate: float = 1.0  # plain SGD, no momentum
    decay: float = 0.5  # multiply the rate by this after an epoch whose validation perplexity
    decay_when: float = 1.0  # ... improved by less than this (from the third validation on)
    grad_clip_norm: float = 5.0  # of the gradient of the per-step losses summed over the 35 steps
    batch_size: int = 20  # rows the training stream is cut into
    bptt_steps: int = 35  # truncated back-propagation length
    epochs: int = 25
    init_range: float = 0.05  # every parameter ~ U(-0.05, 0.05)
    # Not the paper's: 0 = off; k >= 1 = from the first step whose rate has been halved k times,
    # also keep the running mean of the weights over every step (Polyak averaging, as in Merity
    # et al. 2017's averaged SGD), validated beside the raw weights after each epoch; the better
    # of the two is the epoch's candidate for the released weights. The rate rule reads the raw ones.
    average_from_halving: int = 0
    # Not the paper's: after the recipe's epochs, `tail_epochs` more cycles of one epoch each, the
    # rate falling linearly from `tail_learning_rate` to 0 within each; the recipe's last weights
    # and the weights at the end of every cycle are averaged (stochastic weight averaging with a
    # cyclical rate, Izmailov et al. 2018) and validated beside each cycle's own. A finished run's
    # checkpoint is extended by rerunning it with these set: the first `epochs` do not change.
    tail_epochs: int = 0
    tail_learning_rate: float = 0.25


@dataclass(frozen=True)
class CharLMConfig:
    vocab_size: int  # words predicted, <unk> and <eos> included
    num_chars: int  # character table: padding 0, start, end, unknown character, then the corpus's
    word_width: int  # characters per word, markers included: longest training word + 2, at most 65
    char_dim: int = 15
    widths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    filters: tuple[int, ...] = (25, 50, 75, 100, 125, 150)  # 25 * width: 525 features
    highway_layers: int = 1
    hidden_size: int = 300
    lstm_layers: int = 2
    dropout: float = 0.5
    carry_bias: float = -2.0
    recipe: LanguageModelRecipe = field(default=LanguageModelRecipe())

    def __post_init__(self) -> None:
        if self.word_width < max(self.widths):
            raise ValueError(f"word_width {self.word_width} is narrower than the widest filter {max(self.widths)}")


PRESETS: dict[str, dict] = {
    "small": {},  # about 5 M parameters with PTB's 10k words
    "large": {  # about 19 M
        "widths": (1, 2, 3, 4, 5, 6, 7),
        "filters": (50, 100, 150, 200, 200, 200, 200),  # min(200, 50 * width): 1100 features
        "highway_layers": 2,
        "hidden_size": 650,
        "recipe": LanguageModelRecipe(epochs=35),
    },
}


def char_lm_config(preset: str, vocab_size: int, num_chars: int, word_width: int) -> CharLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    return CharLMConfig(vocab_size=vocab_size, num_chars=num_chars, word_width=word_width, **PRESETS[preset])


State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (lstm_layers, B, hidden_size)


class CharAwareLM(nn.Module):
    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.config = config
        self.char_cnn = CharCNNWordEncoder(config.num_chars, config.char_dim, config.widths, config.filters)
        features = self.char_cnn.output_size
        self.highways = nn.ModuleList(Highway(features, config.carry_bias) for _ in range(config.highway_layers))
        # One nn.LSTM per layer, so that dropout can sit on each layer's output (nn.LSTM's own
        # `dropout` skips the last layer's output, which Kim's model drops before the softmax).
        self.lstms = nn.ModuleList(
            nn.LSTM(features if layer == 0 else config.hidden_size, config.hidden_size, batch_first=True)
            for layer in range(config.lstm_layers)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter ~ U(-r, r) as in Kim's code (forget-gate bias included: no +1), then
        the padding character's embedding back to zero."""
        r = self.config.recipe.init_range
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -r, r)
        with torch.no_grad():
            self.char_cnn.embedding.weight[0].zero_()

    def word_vectors(self, char_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """char_ids (N, W) -> (the character CNN's output, the highway layers' output), each (N, F):
        the two representations of the paper's Table 6."""
        before = self.char_cnn(char_ids)
        after = before
        for highway in self.highways:
            after = highway(after)
        return before, after

    def initial_state(self, batch_size: int) -> State:
        shape = (self.config.lstm_layers, batch_size, self.config.hidden_size)
        weight = self.output.weight
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(self, char_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """char_ids (B, T, W) int64 and state (h, c) -> logits (B, T, V) and the new state."""
        batch, steps, width = char_ids.shape
        _, words = self.word_vectors(char_ids.reshape(batch * steps, width))  # (B*T, F)
        hidden = words.reshape(batch, steps, -1)  # (B, T, F)
        h_in, c_in = state
        h_out, c_out = [], []
        for layer, lstm in enumerate(self.lstms):
            hidden, (h, c) = lstm(hidden, (h_in[layer : layer + 1], c_in[layer : layer + 1]))  # (B, T, H)
            hidden = self.dropout(hidden)
            h_out.append(h)
            c_out.append(c)
        return self.output(hidden), (torch.cat(h_out), torch.cat(c_out))
