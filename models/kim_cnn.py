"""Kim's CNN for sentence classification (Yoon Kim, "Convolutional Neural Networks for Sentence
Classification", EMNLP 2014; reference code yoonkim/CNN_sentence).

word ids -> embedding (E=300) -> convolutions of widths 3, 4, 5 (100 maps each, ReLU)
-> max over time -> concat (300) -> dropout 0.5 -> linear to K classes (logits).

Each filter of width m is an n-gram detector; max-over-time keeps its strongest match wherever
it occurs. The service batches texts of different lengths, so the max must only see windows
that lie inside the text's own (Kim-padded) length: windows past it are masked to 0, which
is exact under ReLU (every real feature is >= 0) and, unlike -inf, stays finite in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from models.recipe import TrainingRecipe

VARIANTS = ("rand", "static", "non-static", "multichannel")


@dataclass(frozen=True)
class KimCNNConfig:
    vocab_size: int
    num_classes: int
    variant: str = "rand"  # rand | static | non-static | multichannel (see VARIANTS)
    embedding_dim: int = 300
    filter_widths: tuple[int, ...] = (3, 4, 5)
    feature_maps: int = 100  # per filter width
    dropout: float = 0.5
    max_norm: float = 3.0  # cap on the L2 norm of each class's output weight row
    embedding_init_range: float = 0.25  # rand vectors ~ U[-0.25, 0.25]
    # Two details of Kim's code (CNN_sentence) that the defaults leave out, kept as switches so
    # that cross-validation can measure what each costs (docs/training.md):
    # - kim_init_length N > 0: the filters' init bound of Kim's Theano code, whose fan_out is
    #   divided by the pool size N - width + 1 (every text padded to N tokens; TREC: 37 + 2 * 4 = 45);
    #   about 0.63 of the Xavier bound used when 0.
    # - pool_padding: Kim pads every text to the longest one and max-pools over all of it, so each
    #   filter also sees windows of padding alone, which score relu(bias). Only the widest filters
    #   miss them here: the edge padding (widest - 1 zeros each side) gives narrower ones such windows.
    kim_init_length: int = 0
    pool_padding: bool = False
    # Kim's training recipe: Adadelta (lr 1.0, rho 0.95, eps 1e-6), batch 50, 25 epochs.
    recipe: TrainingRecipe = field(default=TrainingRecipe())

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")

    @property
    def edge_padding(self) -> int:
        """Zero pads before and after each text (Kim: widest filter - 1)."""
        return max(self.filter_widths) - 1


# The paper's four variants; they differ only in where the word vectors come from.
PRESETS: dict[str, dict] = {variant: {"variant": variant} for variant in VARIANTS}


def kim_cnn_config(preset: str, vocab_size: int, num_classes: int, **overrides) -> KimCNNConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    return replace(KimCNNConfig(vocab_size, num_classes, **PRESETS[preset]), **overrides)


class KimCNN(nn.Module):
    def __init__(self, config: KimCNNConfig) -> None:
        super().__init__()
        self.config = config
        channels = 2 if config.variant == "multichannel" else 1
        # Channel 0 is tuned (rand / non-static / multichannel) or frozen (static); a
        # multichannel model adds a frozen copy as channel 1. Kim's 2-channel 2-D convolution
        # sums one filter per channel, which is a 1-D convolution over the concatenated vectors.
        self.embeddings = nn.ModuleList(
            nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0) for _ in range(channels)
        )
        self.convolutions = nn.ModuleList(
            nn.Conv1d(channels * config.embedding_dim, config.feature_maps, width) for width in config.filter_widths
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.feature_maps * len(config.filter_widths), config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.config.embedding_init_range
        for embedding in self.embeddings:
            nn.init.uniform_(embedding.weight, -bound, bound)
            with torch.no_grad():
                embedding.weight[0].zero_()  # <pad> stays a zero vector, as in Kim's set_zero
        for convolution, width in zip(self.convolutions, self.config.filter_widths):
            if self.config.kim_init_length:  # CNN_sentence: fan_out = maps * width * E / pooled length
                fan_in = convolution.in_channels * width
                fan_out = convolution.out_channels * width * convolution.in_channels / (self.config.kim_init_length - width + 1)
                bound = (6.0 / (fan_in + fan_out)) ** 0.5
                nn.init.uniform_(convolution.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(convolution.weight)  # Theano's U(+-sqrt(6/(fan_in+fan_out)))
            nn.init.zeros_(convolution.bias)
        nn.init.zeros_(self.output.weight)  # Kim's LogisticRegression layer starts at zero
        nn.init.zeros_(self.output.bias)
        frozen = {"static": [0], "multichannel": [1]}.get(self.config.variant, [])
        for channel in frozen:
            self.embeddings[channel].weight.requires_grad_(False)

    def window_scores(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per filter width, every filter's score of every window: (B, F, T - width + 1), 0 for
        a window that does not end inside its row's length; with `pool_padding`, one more window of
        padding alone at the end (B, F, T - width + 2)."""
        vectors = torch.cat([embedding(token_ids) for embedding in self.embeddings], dim=2)  # (B, T, C*E)
        vectors = vectors.transpose(1, 2)  # (B, C*E, T): Conv1d slides over the last axis
        scores = []
        for convolution, width in zip(self.convolutions, self.config.filter_widths):
            feature_maps = torch.relu(convolution(vectors))  # (B, F, T - width + 1)
            window_starts = torch.arange(feature_maps.shape[2], device=token_ids.device)  # (T - width + 1,)
            # A window is real when it ends inside the row's own length.
            inside = window_starts.unsqueeze(0) <= (lengths - width).unsqueeze(1)  # (B, T - width + 1)
            masked = feature_maps * inside.unsqueeze(1).to(feature_maps.dtype)
            if self.config.pool_padding:
                # One more window, of padding alone, past the end of every row: it scores relu(bias),
                # as in Kim's code for any text shorter than the longest, whatever else is in the batch.
                padding_window = torch.relu(convolution.bias).view(1, -1, 1).expand(masked.shape[0], -1, 1)
                masked = torch.cat([masked, padding_window], dim=2)  # (B, F, T - width + 2)
            scores.append(masked)
        return scores

    def pooled_features(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max-over-time features (B, F * len(widths)) and where each window starts (same shape)."""
        pooled, starts = [], []
        for feature_maps in self.window_scores(token_ids, lengths):
            values, positions = feature_maps.max(dim=2)  # (B, F) each: the winning window of each filter
            pooled.append(values)
            starts.append(positions)
        return torch.cat(pooled, dim=1), torch.cat(starts, dim=1)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """token_ids (B, T) int64, right-padded; lengths (B,) int64 -> logits (B, K)."""
        features, _ = self.pooled_features(token_ids, lengths)
        return self.output(self.dropout(features))

    def forward_with_evidence(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits (B, K), the start of each feature's winning window (B, F') and each feature's
        contribution to each class's logit, feature x output weight (B, K, F'). A logit is its
        bias plus the sum of its contributions; the window says which n-gram fired."""
        features, window_starts = self.pooled_features(token_ids, lengths)
        logits = self.output(self.dropout(features))
        contributions = features.unsqueeze(1) * self.output.weight.unsqueeze(0)  # (B, K, F')
        return logits, window_starts, contributions

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Kim's max-norm: rescale each class's output weight row to L2 norm <= max_norm."""
        weight = self.output.weight  # (K, F * len(widths))
        weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=self.config.max_norm))
