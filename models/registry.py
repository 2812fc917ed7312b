"""Every architecture the classifier job trains, by name: its config class, module and presets,
and the input encoding its bundle declares (word ids or characters). Adding an architecture
means adding a line here, not a service file or an endpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from models import char_cnn, dilated_cnn, kim_cnn, rnn_classifier
from models.recipe import config_from_dict, with_overrides
from models.text_encoding import ZHANG_ALPHABET


@dataclass(frozen=True)
class Architecture:
    config_class: type
    module_class: type[nn.Module]
    presets: dict[str, dict]
    input_kind: str  # "words" or "chars"


ARCHITECTURES: dict[str, Architecture] = {
    "kim-cnn": Architecture(kim_cnn.KimCNNConfig, kim_cnn.KimCNN, kim_cnn.PRESETS, "words"),
    "char-cnn": Architecture(char_cnn.CharCNNConfig, char_cnn.CharCNN, char_cnn.PRESETS, "chars"),
    "dilated-cnn": Architecture(dilated_cnn.DilatedCNNConfig, dilated_cnn.DilatedCNN, dilated_cnn.PRESETS, "words"),
    "rnn": Architecture(rnn_classifier.RNNClassifierConfig, rnn_classifier.RNNClassifier, rnn_classifier.PRESETS, "words"),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_config(name: str, preset: str, vocab_size: int, num_classes: int, overrides: dict[str, str] | None = None):
    """The preset's config for this data, with `name=value` overrides (e.g. length=256)."""
    arch = architecture(name)
    if preset not in arch.presets:
        raise ValueError(f"unknown preset {preset!r} for {name}; expected one of {tuple(arch.presets)}")
    config = arch.config_class(vocab_size=vocab_size, num_classes=num_classes, **arch.presets[preset])
    return with_overrides(config, overrides or {})


def build_model(name: str, config_values: dict) -> nn.Module:
    arch = architecture(name)
    return arch.module_class(config_from_dict(arch.config_class, config_values))


def input_encoding(name: str, config, lowercase: bool) -> dict:
    """The `encoding` section of a checkpoint and bundle: how the service turns text into input."""
    if architecture(name).input_kind == "chars":
        return {"kind": "chars", "alphabet": ZHANG_ALPHABET[: config.alphabet_size], "length": config.length,
                "lowercase": True, "reverse": True}
    return {"kind": "words", "lowercase": lowercase, "edge_padding": config.edge_padding, "min_length": 1}


def config_values(config) -> dict:
    return dataclasses.asdict(config)
