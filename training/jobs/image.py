"""Train an image CNN (models/image_cnn.py) and save a checkpoint; or cross-validate a preset.

    python -m training train-image --preset digits --out checkpoints/digits-cnn.pt
    (or --idx IMAGES LABELS, or --pictures FOLDER, instead of scikit-learn's digits)
    python -m training cv-image --preset digits-16 --folds 5

The images go through models/image_encoding.py (the service's own preprocessing). With the
recipe's `dev_fraction` > 0 that share of the training images (seed 3435) is dev and the epoch
with the best dev accuracy is kept; with 0 every training image is trained on for the recipe's
epochs and the last epoch is kept (the count chosen by cross-validation). `shift` > 0 moves each
training image by a random whole number of pixels per axis in every epoch (zeros come in);
`jitter` > 0 replaces that share of the digits in every epoch by copies redrawn as pictures are read
(training/data/picture_jitter.py). Digit models also record `drawn_accuracy`, their score on the pen-drawn
check set of training/evaluation/drawn_digits.py, which chooses nothing in training.
The test split of the digits is scored once, at the end, and recorded; it never chooses anything.

Cross-validation cuts the training images into contiguous blocks, not a shuffle: scikit-learn's
digits come writer by writer, so a block is mostly writers the rest never saw, as the held-out
360 are. (A shuffled dev split has the same writers on both sides and scores 97 % for a model
that gets 94 % on new writers: it is why the first release was chosen badly.)
"""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import torch
from torch import nn

from models.ensemble import ensemble_of, member_seeds
from models.image_cnn import PRESETS, ImageCNN, ImageCNNConfig
from models.image_encoding import GRID, ImageEncoder
from models.recipe import config_from_dict, with_overrides
from training.evaluation.drawn_digits import drawn_grids
from training.data.picture_jitter import Jitter, pick, redrawn_copies

ARCHITECTURE = "image-cnn"
DIGIT_LABELS = [str(digit) for digit in range(10)]


def split_dev(grids: np.ndarray, labels: np.ndarray, seed: int, dev_fraction: float = 0.1):
    order = np.random.default_rng(seed).permutation(len(grids))
    cut = int(round(len(grids) * dev_fraction))
    return (grids[order[cut:]], labels[order[cut:]]), (grids[order[:cut]], labels[order[:cut]])


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def shifted(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """(B, 1, H, W) -> each image moved by (dy, dx), each uniform in [-max_shift, max_shift];
    what moves out is dropped and zeros (no ink) come in."""
    if max_shift == 0:
        return images
    side = images.shape[-1]
    padded = np.pad(images, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(images), 2))
    return np.stack([padded[i, :, dy: dy + side, dx: dx + side] for i, (dy, dx) in enumerate(offsets)])


def image_config(preset: str, num_classes: int, overrides: dict[str, str] | None = None) -> ImageCNNConfig:
    """The preset's config, with `name=value` overrides (`dropout=0.3`, `recipe.shift=2`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    return with_overrides(ImageCNNConfig(num_classes=num_classes, **PRESETS[preset]), overrides or {})


def train_image_cnn(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None, label_names: list[str],
                    preset: str = "digits", seed: int = 3435, epochs: int | None = None,
                    overrides: dict[str, str] | None = None) -> dict:
    """Train on `train` (grids, labels) with the preset's recipe; the checkpoint as a dict."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if epochs is not None:
        overrides = {**(overrides or {}), "recipe.epochs": str(epochs)}
    config = image_config(preset, len(label_names), overrides)
    recipe = config.recipe
    encoder = ImageEncoder(size=config.input_size)
    if recipe.dev_fraction > 0:
        (train_grids, train_labels), (dev_grids, dev_labels) = split_dev(*train, seed=seed, dev_fraction=recipe.dev_fraction)
        dev_images = encoder.encode(dev_grids)
    else:
        (train_grids, train_labels), dev_images = train, None
    train_images = encoder.encode(train_grids)
    copies = redrawn_copies(train_grids, recipe.jitter_copies, Jitter(), rng) if recipe.jitter > 0 else None
    model = ImageCNN(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    loss_function = nn.CrossEntropyLoss()
    history, best = [], (-1.0, 0, None)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        if copies is not None:  # this epoch's mix of the digits and their redrawn copies
            train_images = encoder.encode(pick(train_grids, copies, recipe.jitter, rng))
        order = torch.randperm(len(train_images)).numpy()
        losses = []
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start: start + recipe.batch_size]
            images = shifted(train_images[batch], recipe.shift, rng)
            loss = loss_function(model(torch.from_numpy(images)), torch.from_numpy(train_labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        entry = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if dev_images is not None:
            entry["dev_accuracy"] = accuracy(model, dev_images, dev_labels)
            if entry["dev_accuracy"] > best[0]:
                best = (entry["dev_accuracy"], epoch, copy.deepcopy(model.state_dict()))
        history.append(entry)
    if dev_images is not None:
        model.load_state_dict(best[2])
        metrics = {"dev_accuracy": best[0], "best_epoch": best[1], "dev_images": int(len(dev_images))}
    else:
        metrics = {"kept_epoch": recipe.epochs}
    metrics.update(history=history, train_images=int(len(train_images)), parameters=sum(p.numel() for p in model.parameters()))
    metrics.update(held_out_metrics(model, encoder, test, label_names, train[0].shape[1:]))
    return {"architecture": ARCHITECTURE, "preset": preset, "config": dataclasses.asdict(config),
            "encoding": encoder.to_config(), "labels": label_names, "state_dict": model.state_dict(), "metrics": metrics}


def held_out_metrics(model: nn.Module, encoder: ImageEncoder, test: tuple[np.ndarray, np.ndarray] | None,
                     label_names: list[str], grid_shape: tuple[int, ...]) -> dict:
    """The test split's accuracy (chooses nothing) and, for digits, the drawn check set's."""
    metrics = {}
    if test is not None:
        metrics.update(test_accuracy=accuracy(model, encoder.encode(test[0]), test[1]), test_images=int(len(test[0])))
    if label_names == DIGIT_LABELS and grid_shape == (GRID, GRID):  # digits: also the drawn check set
        drawn, drawn_labels, _ = drawn_grids()
        metrics.update(drawn_accuracy=accuracy(model, encoder.encode(drawn), np.array([int(label) for label in drawn_labels])),
                       drawn_images=int(len(drawn)))
    return metrics


MEMBER_FIGURES = {"test_accuracy": "member_test_accuracies", "drawn_accuracy": "member_drawn_accuracies",
                  "dev_accuracy": "member_dev_accuracies", "best_epoch": "member_best_epochs"}


def train_image_ensemble(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None,
                         label_names: list[str], members: int, seed: int = 3435, **options) -> dict:
    """`members` copies of the recipe, seeds apart (member_seeds: member 0 is the single model of
    `seed`), in one checkpoint (`member_state_dicts`) served as the mean of their logits
    (models/ensemble.py). Its test and drawn accuracies are the ensemble's; each member's stay beside them."""
    checkpoints = [train_image_cnn(train, test, label_names, seed=member_seed, **options) for member_seed in member_seeds(seed, members)]
    if members == 1:
        return checkpoints[0]
    first = checkpoints[0]
    ensemble = ensemble_of([load_image_model(checkpoint) for checkpoint in checkpoints]).eval()
    member_metrics = [checkpoint["metrics"] for checkpoint in checkpoints]
    metrics = {
        **{key: value for key, value in first["metrics"].items() if key not in ("history", "best_epoch", "dev_accuracy")},
        **held_out_metrics(ensemble, ImageEncoder.from_config(first["encoding"]), test, label_names, train[0].shape[1:]),
        "ensemble_members": members,
        "ensemble_combine": "mean of the members' logits",
        "member_seeds": member_seeds(seed, members),
        "parameters": sum(m["parameters"] for m in member_metrics),
        "member_histories": [m["history"] for m in member_metrics],
        **{plural: [m[key] for m in member_metrics] for key, plural in MEMBER_FIGURES.items() if key in first["metrics"]},
    }
    return {**{key: value for key, value in first.items() if key not in ("state_dict", "metrics")},
            "member_state_dicts": [checkpoint["state_dict"] for checkpoint in checkpoints], "metrics": metrics}


SVM_BASELINE = {"C": 10.0, "gamma": 0.001}  # scikit-learn's RBF SVC on the flat 0..16 grids, as its digits example


def svm_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """The kernel-machine baseline a CNN has to beat: an RBF SVM on the 64 raw ink values."""
    from sklearn.svm import SVC

    svm = SVC(kernel="rbf", **SVM_BASELINE).fit(train[0].reshape(len(train[0]), -1), train[1])
    return float((svm.predict(test[0].reshape(len(test[0]), -1)) == test[1]).mean())


def svm_drawn_accuracy(train: tuple[np.ndarray, np.ndarray]) -> float:
    """The same SVM on the drawn check set (training/evaluation/drawn_digits.py), read as the service reads pictures."""
    drawn, drawn_labels, _ = drawn_grids()
    return svm_accuracy(train, (drawn, np.array([int(label) for label in drawn_labels])))


def cv_image_cnn(train: tuple[np.ndarray, np.ndarray], label_names: list[str], preset: str, folds: int = 5,
                 seed: int = 3435, overrides: dict[str, str] | None = None, baseline: str | None = None,
                 members: int = 1) -> dict:
    """Accuracy of the preset (or of `baseline` "svm") on each of `folds` contiguous blocks of
    `train`, trained on the rest; with `members` >= 2, of the ensemble as served, its members'
    mean accuracy beside it."""
    grids, labels = train
    edges = np.linspace(0, len(grids), folds + 1).round().astype(int)
    accuracies, drawn, member_means = [], [], []
    for fold, (start, stop) in enumerate(zip(edges, edges[1:]), 1):
        rest = np.r_[0:start, stop:len(grids)]
        held_out = (grids[start:stop], labels[start:stop])
        if baseline == "svm":
            accuracies.append(svm_accuracy((grids[rest], labels[rest]), held_out))
        else:
            checkpoint = train_image_ensemble((grids[rest], labels[rest]), held_out, label_names, members, preset=preset,
                                              seed=seed, overrides=overrides)
            accuracies.append(checkpoint["metrics"]["test_accuracy"])
            if members > 1:
                member_means.append(float(np.mean(checkpoint["metrics"]["member_test_accuracies"])))
            if "drawn_accuracy" in checkpoint["metrics"]:
                drawn.append(checkpoint["metrics"]["drawn_accuracy"])
        drawn_note = f", drawn {drawn[-1]:.4f}" if len(drawn) == fold else ""
        print(f"fold {fold}/{folds}: images {start}..{stop - 1}, accuracy {accuracies[-1]:.4f}{drawn_note}", flush=True)
    model = {"baseline": f"svm {SVM_BASELINE}"} if baseline == "svm" else {"preset": preset, "overrides": dict(overrides or {})}
    if members > 1:
        model.update(members=members, member_mean_accuracies=member_means, mean_member_accuracy=float(np.mean(member_means)))
    return {**model, "folds": folds, "fold_accuracies": accuracies,
            "mean_accuracy": float(np.mean(accuracies)), "std_accuracy": float(np.std(accuracies)),
            **({"drawn_accuracies": drawn, "mean_drawn_accuracy": float(np.mean(drawn))} if drawn else {})}


def load_image_model(checkpoint: dict) -> nn.Module:
    """The checkpoint's network in eval mode, or the ensemble of its members (train-image --members)."""
    members = []
    for state in checkpoint.get("member_state_dicts") or [checkpoint["state_dict"]]:
        member = ImageCNN(config_from_dict(ImageCNNConfig, checkpoint["config"]))
        member.load_state_dict(state)
        members.append(member)
    return (members[0] if len(members) == 1 else ensemble_of(members)).eval()
