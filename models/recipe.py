"""How a model is trained, carried by its config so that a preset names the paper's optimiser
and schedule along with its architecture. The training job reads it; models never do."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OPTIMIZERS = ("adadelta", "sgd", "adam")
SHUFFLES = ("examples", "batches")


@dataclass(frozen=True)
class TrainingRecipe:
    optimizer: str = "adadelta"  # adadelta | sgd | adam
    learning_rate: float = 1.0
    momentum: float = 0.0  # sgd only
    adadelta_rho: float = 0.95
    adadelta_eps: float = 1e-6
    batch_size: int = 50
    epochs: int = 25
    halve_lr_every: int = 0  # epochs between halvings of the learning rate; 0 keeps it constant
    max_halvings: int = 0
    grad_clip_norm: float = 0.0  # clip the global gradient norm; 0 = no clipping
    weight_init_std: float = 0.0  # > 0: Gaussian init of every weight with this std (Zhang et al.)
    # examples: a new order of the examples every epoch; batches: Kim's CNN_sentence, which shuffles
    # the examples once and then only the order of the same batches every epoch
    shuffle: str = "examples"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"unknown shuffle {self.shuffle!r}; expected one of {SHUFFLES}")

    def learning_rate_at(self, epoch: int) -> float:
        """The rate for 1-based `epoch` under the halving schedule."""
        if not self.halve_lr_every:
            return self.learning_rate
        halvings = min((epoch - 1) // self.halve_lr_every, self.max_halvings)
        return self.learning_rate / 2**halvings

    def epoch_batches(self, examples: int, rng, fixed_order=None) -> list:
        """The epoch's batches, each an array of example indices: a fresh order of the examples, or
        (shuffle="batches", with `fixed_order` drawn once per run) the same batches in a new order."""
        if self.shuffle == "examples" or fixed_order is None:
            order = rng.permutation(examples)
            return [order[start: start + self.batch_size] for start in range(0, examples, self.batch_size)]
        batches = [fixed_order[start: start + self.batch_size] for start in range(0, examples, self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def config_from_dict(config_class, values: dict):
    """Rebuild a frozen config from its `dataclasses.asdict` form (a checkpoint or config.json):
    lists back to tuples and the recipe back to its recipe class."""
    kwargs = {}
    for field in dataclasses.fields(config_class):
        if field.name not in values:
            continue
        value = values[field.name]
        if field.name == "recipe" and isinstance(value, dict):
            value = type(field.default)(**value)  # the config's own recipe class
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[field.name] = value
    return config_class(**kwargs)


class SettingError(ValueError):
    """A `--set NAME=VALUE` that names no setting or whose value does not parse as the setting's type."""


def with_overrides(config, overrides: dict[str, str]):
    """A copy of `config` with `name=value` strings applied, each parsed as its field's type;
    `recipe.epochs=5` reaches into the training recipe."""
    changes: dict = {}
    recipe_changes: dict = {}
    for key, raw in overrides.items():
        target, name = (config.recipe, key.split(".", 1)[1]) if key.startswith("recipe.") else (config, key)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if name not in fields:
            raise SettingError(f"unknown setting {key!r}; settings are {sorted(fields)}")
        current = getattr(target, name)
        value = parse_like(current, raw, key)
        (recipe_changes if target is not config else changes)[name] = value
    if recipe_changes:
        changes["recipe"] = dataclasses.replace(config.recipe, **recipe_changes)
    return dataclasses.replace(config, **changes)


def parse_like(current, raw: str, key: str):
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(int(part) for part in raw.split(",") if part)
        return type(current)(raw)
    except ValueError:
        raise SettingError(f"{key}={raw!r} is not a valid {type(current).__name__}") from None
