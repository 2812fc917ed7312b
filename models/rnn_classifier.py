"""Recurrent text classifiers (the lecture notes' RNN, LSTM, GRU, bidirectional, many-to-one;
LSTM baseline of Zhang, Zhao & LeCun 2015: 512 units, mean of the outputs).

word ids -> embedding (300) -> L layers of an RNN (tanh), LSTM or GRU, one direction or both
-> summary over time (last state, mean, or max: "Y = max_t Y_t") -> dropout -> K logits.

Padding never changes a prediction, and the graph still exports to ONNX (pack_padded_sequence
does not): the forward direction is causal, so padding after a text cannot reach its outputs;
the backward direction reverses each row within its own length (a gather), runs forward, and
reverses back; the summary reads only positions inside the length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.recipe import TrainingRecipe

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
SUMMARIES = ("last", "mean", "max")
RNN_RECIPE = TrainingRecipe(optimizer="adam", learning_rate=1e-3, batch_size=50, epochs=15, grad_clip_norm=5.0)


@dataclass(frozen=True)
class RNNClassifierConfig:
    vocab_size: int
    num_classes: int
    cell: str = "lstm"  # rnn (tanh) | lstm | gru
    embedding_dim: int = 300
    hidden_size: int = 512  # Zhang et al.'s LSTM baseline
    num_layers: int = 1
    bidirectional: bool = False
    summary: str = "mean"  # last | mean | max
    dropout: float = 0.5  # on the summary, and between layers
    embedding_init_range: float = 0.25
    recipe: TrainingRecipe = field(default=RNN_RECIPE)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; expected one of {tuple(CELLS)}")
        if self.summary not in SUMMARIES:
            raise ValueError(f"unknown summary {self.summary!r}; expected one of {SUMMARIES}")

    @property
    def edge_padding(self) -> int:
        return 0


PRESETS: dict[str, dict] = {
    "lstm": {"cell": "lstm"},
    "gru": {"cell": "gru"},
    "bilstm": {"cell": "lstm", "bidirectional": True, "hidden_size": 256},  # 2 x 256 = the LSTM's 512
    "rnn": {"cell": "rnn"},
}


def reverse_within_length(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values (B, T, D): each row's first `length` steps in reverse order, padding left in place.
    Applying it twice gives `values` back."""
    positions = torch.arange(values.shape[1], device=values.device).unsqueeze(0)  # (1, T)
    source = lengths.unsqueeze(1) - 1 - positions  # (B, T): where step t reads from
    source = torch.where(source >= 0, source, positions)  # padding steps read themselves
    return values.gather(1, source.unsqueeze(2).expand(-1, -1, values.shape[2]))


class RNNClassifier(nn.Module):
    def __init__(self, config: RNNClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        nn.init.uniform_(self.embedding.weight, -config.embedding_init_range, config.embedding_init_range)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        cell = CELLS[config.cell]
        directions = 2 if config.bidirectional else 1
        # One single-layer, single-direction RNN per (layer, direction): the backward one runs
        # forward over rows reversed within their lengths (nn.LSTM's own reverse would read
        # the padding first).
        self.forward_layers = nn.ModuleList()
        self.backward_layers = nn.ModuleList()
        for layer in range(config.num_layers):
            input_size = config.embedding_dim if layer == 0 else directions * config.hidden_size
            self.forward_layers.append(cell(input_size, config.hidden_size, batch_first=True))
            if config.bidirectional:
                self.backward_layers.append(cell(input_size, config.hidden_size, batch_first=True))
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(directions * config.hidden_size, config.num_classes)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """token_ids (B, T) int64, right-padded; lengths (B,) >= 1 -> logits (B, K)."""
        outputs = self.embedding(token_ids)  # (B, T, E)
        backward = None
        for layer, forward_rnn in enumerate(self.forward_layers):
            if layer > 0:
                outputs = self.dropout(outputs)
            forward, _ = forward_rnn(outputs)  # (B, T, H)
            if self.config.bidirectional:
                reversed_outputs, _ = self.backward_layers[layer](reverse_within_length(outputs, lengths))
                backward = reverse_within_length(reversed_outputs, lengths)  # (B, T, H), back in text order
                outputs = torch.cat([forward, backward], dim=2)  # (B, T, 2H)
            else:
                outputs = forward
        return self.output(self.dropout(self.summarise(outputs, lengths)))

    def summarise(self, outputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """outputs (B, T, D) -> (B, D), reading only steps inside each row's length."""
        positions = torch.arange(outputs.shape[1], device=outputs.device).unsqueeze(0)  # (1, T)
        inside = (positions < lengths.unsqueeze(1)).unsqueeze(2)  # (B, T, 1)
        if self.config.summary == "mean":
            return (outputs * inside).sum(dim=1) / lengths.unsqueeze(1).to(outputs.dtype)
        if self.config.summary == "max":
            # Every cell's output lies in (-1, 1) (tanh), so -2 is below any real step and,
            # unlike -inf, stays finite in fp16.
            return outputs.masked_fill(~inside, -2.0).amax(dim=1)
        # last: the forward half at step length - 1; the backward half at step 0, where it has
        # read the whole text.
        hidden = self.config.hidden_size
        last_step = (lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden)  # (B, 1, H)
        forward_last = outputs[:, :, :hidden].gather(1, last_step).squeeze(1)  # (B, H)
        if not self.config.bidirectional:
            return forward_last
        return torch.cat([forward_last, outputs[:, 0, hidden:]], dim=1)  # (B, 2H)
