"""The lecture notes' image CNNs: shapes and parameter counts checked by hand."""

import pytest
import torch

from models.image_cnn import PRESETS, ImageCNN, ImageCNNConfig


@pytest.mark.parametrize("preset, side, feature_size, parameters", [
    # conv 25x(1*9)+25 = 250; conv 50x(25*9)+50 = 11,300; dense 200x100+100 = 20,100; out 100x10+10 = 1,010
    ("digits", 8, 2, 250 + 11_300 + 20_100 + 1_010),
    # the released digits-16: 16 -> 16 -> 8 -> 8 -> 4; conv 32x9+32 = 320; conv 64x(32*9)+64 = 18,496;
    # dense 1,024x256+256 = 262,400; out 256x10+10 = 2,570
    ("digits-16", 16, 4, 320 + 18_496 + 262_400 + 2_570),
    # the notes' 28x28: 28 -> 26 -> 13 -> 11 -> 5; dense 1,250x100+100 = 125,100
    ("digits-28", 28, 5, 250 + 11_300 + 125_100 + 1_010),
    # LeNet-5: C1 6x25+6 = 156; C3 16x150+16 = 2,416; C5 120x400+120 = 48,120; F6 84x120+84 = 10,164; out 850
    ("lenet5", 32, 5, 156 + 2_416 + 48_120 + 10_164 + 850),
])
def test_each_preset_gives_logits_with_the_parameters_counted_by_hand(preset, side, feature_size, parameters):
    config = ImageCNNConfig(num_classes=10, **PRESETS[preset])
    model = ImageCNN(config)
    assert config.input_size == side and config.feature_size == feature_size
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model(torch.zeros(4, 1, side, side)).shape == (4, 10)


def test_images_too_small_for_the_network_are_refused():
    with pytest.raises(ValueError, match="too small"):
        ImageCNNConfig(num_classes=10, **{**PRESETS["lenet5"], "input_size": 8})
