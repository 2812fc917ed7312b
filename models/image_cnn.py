"""Image CNNs of the lecture notes: the Keras digits network and LeNet-5.

The notes' network (28x28 MNIST in the notes; `digits-28`):
    image (1, 28, 28) -> conv 25 of 3x3 -> max pool 2x2 -> conv 50 of 3x3 -> max pool 2x2
    -> flatten (50*5*5 = 1,250) -> dense 100 (ReLU) -> dense 10 (logits; softmax in the loss)
Each 3x3 filter is a small pattern detector slid over the image, and pooling keeps its
strongest response in each 2x2 block, as the 6x6-image example of the notes shows.

`digits` is the same network for scikit-learn's 8x8 digits: the convolutions pad by 1 ("same"),
so that 8 -> 8 -> 4 -> 4 -> 2 and the flattened layer has 50*2*2 = 200 values.

LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document
recognition"): image (1, 32, 32) -> C1 6 of 5x5 -> S2 2x2 subsampling -> C3 16 of 5x5 -> S4 2x2
subsampling -> C5 120 of 5x5 -> F6 84 -> 10, tanh. Two simplifications, as in most
reimplementations: S2/S4 are average pooling (the paper's has a trainable coefficient and bias
per map), and C3 connects every S2 map (the paper's table connects each C3 map to 3-6 of them);
the output is a linear layer, not the paper's RBF units. 61,706 parameters.

`digits-16` is the recipe chosen by 5-fold cross-validation over writers on the 1,437 training
digits (training/jobs/image.py `cv_image_cnn`; docs/training.md has the table; released as
`digits-cnn` trained with `recipe.jitter=0.5` as an ensemble of 5 seeds, `train-image --members 5`):
the 8x8 grid upsampled to 16x16 (bilinear, by models/image_encoding.py) so that two 3x3
convolution stages see more than 2x2 cells, wider convolutions (32, 64), dense 256 with dropout
0.5, and training on copies shifted by up to one pixel (the digits are centred by hand, and
another writer's digit sits a pixel off).

`forward` takes (B, 1, H, W) float32, already normalised by models/image_encoding.py, and returns
logits (B, num_classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.recipe import TrainingRecipe

POOLS = ("max", "avg")
ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class ImageTrainingRecipe(TrainingRecipe):
    """The image training job's settings beyond the shared recipe (training only: the graph never sees them)."""

    shift: int = 0  # each training image moved by a random whole number of pixels in [-shift, shift], per axis
    dev_fraction: float = 0.1  # held out of training to keep the best epoch; 0 trains on all and keeps the last
    # Each epoch, this share of the training digits is replaced by a copy redrawn as a picture would be
    # read (rotated, slanted, wider or narrower, another pen; training/data/picture_jitter.py); 0 = off.
    jitter: float = 0.0
    jitter_copies: int = 8  # redrawn copies made per digit before training, among which each epoch picks


@dataclass(frozen=True)
class ImageCNNConfig:
    num_classes: int
    input_size: int = 8  # images are input_size x input_size, one channel
    conv_channels: tuple[int, ...] = (25, 50)
    kernel_size: int = 3
    padding: int = 1  # 1 keeps 3x3 maps the size of their input ("same"); 0 shrinks them ("valid")
    pool: str = "max"
    activation: str = "relu"
    hidden: tuple[int, ...] = (100,)  # fully connected layers between the convolutions and the output
    dropout: float = 0.0
    # Adam, lr 1e-3, batch 32: the notes' Keras example trains with a default optimiser.
    recipe: ImageTrainingRecipe = field(default=ImageTrainingRecipe(optimizer="adam", learning_rate=1e-3, batch_size=32, epochs=40))

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.feature_size < 1:
            raise ValueError(f"{self.input_size}x{self.input_size} images are too small for these convolutions and pools")

    @property
    def feature_size(self) -> int:
        """Side of the last pooled feature map: each stage is a convolution then a 2x2 pool."""
        size = self.input_size
        for _ in self.conv_channels:
            size = (size + 2 * self.padding - self.kernel_size + 1) // 2
        return size


PRESETS: dict[str, dict] = {
    # The notes' network, on scikit-learn's 8x8 digits (padded convolutions).
    "digits": {"input_size": 8},
    # The CV-chosen recipe (see above): 8x8 grids read at 16x16, wider, dropout, shifted copies.
    "digits-16": {"input_size": 16, "conv_channels": (32, 64), "hidden": (256,), "dropout": 0.5,
                  "recipe": ImageTrainingRecipe(optimizer="adam", learning_rate=1e-3, batch_size=32, epochs=120, shift=1,
                                                dev_fraction=0.0)},
    # The notes' network exactly, for 28x28 images (MNIST).
    "digits-28": {"input_size": 28, "padding": 0},
    # LeNet-5 on 32x32 images; C5 is the third convolution (5x5 on a 5x5 map: 120 units).
    "lenet5": {"input_size": 32, "conv_channels": (6, 16), "kernel_size": 5, "padding": 0, "pool": "avg",
               "activation": "tanh", "hidden": (120, 84)},
}


class ImageCNN(nn.Module):
    def __init__(self, config: ImageCNNConfig) -> None:
        super().__init__()
        self.config = config
        activation = nn.ReLU if config.activation == "relu" else nn.Tanh
        pool = nn.MaxPool2d if config.pool == "max" else nn.AvgPool2d
        layers: list[nn.Module] = []
        channels = 1
        for out_channels in config.conv_channels:
            layers += [nn.Conv2d(channels, out_channels, config.kernel_size, padding=config.padding), activation(), pool(2)]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        widths = [channels * config.feature_size**2, *config.hidden]
        dense: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths, widths[1:]):
            dense += [nn.Linear(width_in, width_out), activation(), nn.Dropout(config.dropout)]
        self.classifier = nn.Sequential(*dense)
        self.output = nn.Linear(widths[-1], config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1, H, W) float32 -> logits (B, num_classes)."""
        return self.output(self.classifier(self.features(images)))
