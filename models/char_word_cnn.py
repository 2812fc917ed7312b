"""The character CNN that builds a word's vector from its characters (Kim et al. 2016, sec. 2.2;
the TDNN.lua module of yoonkim/lstm-char-cnn).

    char ids (N, W) -> embedding (N, W, 15) -> for each width w: conv over the characters
    (N, filters_w, W - w + 1) -> tanh -> max over positions (N, filters_w) -> concatenated (N, F)

Id 0 is the padding character: its embedding is zero and kept there by the training job, so
the padding past a word's end marker contributes only the convolutions' biases, identically for
every word. A width-w filter is a character w-gram detector (a prefix, suffix or stem).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CharCNNWordEncoder(nn.Module):
    def __init__(self, num_chars: int, char_dim: int, widths: Sequence[int], filters: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(filters):
            raise ValueError("one filter count per width")
        self.embedding = nn.Embedding(num_chars, char_dim, padding_idx=0)
        self.convolutions = nn.ModuleList(nn.Conv1d(char_dim, n, w) for w, n in zip(widths, filters))
        self.output_size = sum(filters)

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        """char_ids (N, W) int64, W >= the widest filter -> word features (N, sum(filters))."""
        chars = self.embedding(char_ids).transpose(1, 2)  # (N, char_dim, W)
        return torch.cat([torch.tanh(conv(chars)).amax(dim=2) for conv in self.convolutions], dim=1)
