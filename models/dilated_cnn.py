"""Dilated residual CNN classifier (the lecture notes' stacked-vs-dilated convolutions; the
dilation idea of Yu & Koltun 2016 and ByteNet, Kalchbrenner et al. 2016).

word ids -> embedding (300) -> 1x1 projection -> L residual blocks h = h + ReLU(conv_k,d(h))
with kernel 3 and dilation 1, 2, 4, 8, ... -> max over time -> dropout -> K logits.

With dilations doubling, L layers see 1 + (k - 1)(2^L - 1) words, so a receptive field of n
words costs O(k m^2 log n) parameters, against O(k m^2 n) for a plain stack (m channels).

Padding: every block zeroes the positions past a row's length, so a neighbour that is padding
reads as the zero that the convolution's own "same" padding gives a text alone; features are
>= 0 (ReLU and sums of ReLUs), so the zeros never win the max. A text's logits therefore do
not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.recipe import TrainingRecipe


@dataclass(frozen=True)
class DilatedCNNConfig:
    vocab_size: int
    num_classes: int
    embedding_dim: int = 300
    channels: int = 300
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8)  # receptive field 1 + 2 * 15 = 31 words
    dropout: float = 0.5
    embedding_init_range: float = 0.25  # as Kim's CNN-rand, whose inputs these are
    recipe: TrainingRecipe = field(default=TrainingRecipe())  # Kim's Adadelta recipe

    @property
    def edge_padding(self) -> int:
        return 0

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


PRESETS: dict[str, dict] = {"base": {}}


class DilatedCNN(nn.Module):
    def __init__(self, config: DilatedCNNConfig) -> None:
        super().__init__()
        if config.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so that 'same' padding is symmetric")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
        nn.init.uniform_(self.embedding.weight, -config.embedding_init_range, config.embedding_init_range)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.projection = nn.Conv1d(config.embedding_dim, config.channels, 1)
        self.blocks = nn.ModuleList(
            nn.Conv1d(config.channels, config.channels, config.kernel_size, dilation=d, padding=d * (config.kernel_size - 1) // 2)
            for d in config.dilations
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.channels, config.num_classes)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """token_ids (B, T) int64, right-padded; lengths (B,) -> logits (B, K)."""
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        inside = (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).to(torch.float32)  # (B, 1, T)
        hidden = torch.relu(self.projection(self.embedding(token_ids).transpose(1, 2))) * inside  # (B, C, T)
        for block in self.blocks:
            hidden = hidden + torch.relu(block(hidden)) * inside  # (B, C, T), zero past each length
        return self.output(self.dropout(hidden.amax(dim=2)))  # (B, C) -> (B, K)


def receptive_field_table(kernel_size: int = 3, channels: int = 300, targets=(7, 15, 31, 63, 127, 255)) -> list[dict]:
    """For each receptive field n: layers and conv parameters of a dilated vs a plain stack."""
    per_layer = kernel_size * channels * channels + channels
    rows = []
    for n in targets:
        dilated_layers = 0
        while 1 + (kernel_size - 1) * (2**dilated_layers - 1) < n:
            dilated_layers += 1
        plain_layers = -(-(n - 1) // (kernel_size - 1))  # ceil((n - 1) / (k - 1))
        rows.append({
            "receptive_field": n,
            "dilated_layers": dilated_layers,
            "dilated_parameters": dilated_layers * per_layer,
            "plain_layers": plain_layers,
            "plain_parameters": plain_layers * per_layer,
        })
    return rows
