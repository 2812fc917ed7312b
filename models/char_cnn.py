"""Character-level CNN (Xiang Zhang, Junbo Zhao & Yann LeCun, "Character-level Convolutional
Networks for Text Classification", NIPS 2015; reference code zhangxiangxiao/Crepe).

char ids (B, l0) -> one-hot over the 70-character alphabet (id 0: all-zero) -> 6 convolutions
(kernels 7, 7, 3, 3, 3, 3; 256 or 1024 maps; ReLU; max-pool 3 after the 1st, 2nd and 6th)
-> 2 fully connected layers (1024 or 2048, dropout 0.5) -> K logits.

Every text is quantised to exactly l0 characters (models.text_encoding.CharEncoder), so a
batch never pads a row beyond its own input and the prediction cannot depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from models.recipe import TrainingRecipe

ZHANG_RECIPE = TrainingRecipe(
    optimizer="sgd", learning_rate=0.01, momentum=0.9, batch_size=128,
    epochs=30, halve_lr_every=3, max_halvings=10, weight_init_std=0.05,
)


@dataclass(frozen=True)
class CharCNNConfig:
    num_classes: int
    vocab_size: int = 0  # unused: characters, not words (kept so every config builds alike)
    alphabet_size: int = 70
    length: int = 1014  # l0; shorter for short-text sets is allowed (documented per bundle)
    feature_maps: int = 256  # small 256, large 1024
    hidden_units: int = 1024  # small 1024, large 2048
    kernel_sizes: tuple[int, ...] = (7, 7, 3, 3, 3, 3)
    pool_after: tuple[int, ...] = (0, 1, 5)  # 0-based convolution indexes followed by max-pool
    pool_size: int = 3
    dropout: float = 0.5
    recipe: TrainingRecipe = field(default=ZHANG_RECIPE)

    @property
    def frames_after_convolutions(self) -> int:
        """Positions left for the first fully connected layer ((l0 - 96) / 27 = 34 for 1014)."""
        frames = self.length
        for index, kernel in enumerate(self.kernel_sizes):
            frames = frames - kernel + 1
            if index in self.pool_after:
                frames //= self.pool_size
        if frames < 1:
            raise ValueError(f"length {self.length} is too short for {len(self.kernel_sizes)} convolutions and the pooling")
        return frames


PRESETS: dict[str, dict] = {
    "small": {},
    "large": {"feature_maps": 1024, "hidden_units": 2048, "recipe": replace(ZHANG_RECIPE, weight_init_std=0.02)},
}


class CharCNN(nn.Module):
    def __init__(self, config: CharCNNConfig) -> None:
        super().__init__()
        self.config = config
        frames = config.frames_after_convolutions
        # Row 0 is the all-zero vector of characters outside the alphabet (and padding).
        one_hot = torch.cat([torch.zeros(1, config.alphabet_size), torch.eye(config.alphabet_size)])
        self.register_buffer("one_hot", one_hot, persistent=False)  # (A + 1, A)
        layers = []
        channels = config.alphabet_size
        for index, kernel in enumerate(config.kernel_sizes):
            layers += [nn.Conv1d(channels, config.feature_maps, kernel), nn.ReLU()]
            if index in config.pool_after:
                layers.append(nn.MaxPool1d(config.pool_size))
            channels = config.feature_maps
        self.convolutions = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(frames * config.feature_maps, config.hidden_units), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden_units, config.hidden_units), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden_units, config.num_classes),
        )
        std = config.recipe.weight_init_std
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)) and std > 0:
                nn.init.normal_(module.weight, 0.0, std)  # Zhang: Gaussian, std 0.05 (small) / 0.02 (large)
                nn.init.zeros_(module.bias)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids (B, l0) char ids; lengths unused (every row is l0 long) -> logits (B, K)."""
        one_hot = self.one_hot[token_ids]  # (B, l0, A)
        features = self.convolutions(one_hot.transpose(1, 2))  # (B, F, frames)
        return self.classifier(features.flatten(1))  # (B, F * frames) -> (B, K)
