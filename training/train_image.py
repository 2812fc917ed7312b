"""Train an image CNN (models/image_cnn.py), early-stopped on a dev split, and save a checkpoint.

    python -m training train-image --preset digits --out checkpoints/digits-cnn.pt
    (or --idx IMAGES LABELS, or --pictures FOLDER, instead of scikit-learn's digits)

The images go through models/image_encoding.py (the service's own preprocessing). 10 % of the
training images (seed 3435) are dev; the epoch with the best dev accuracy is kept. The test
split of the digits is scored once, at the end, and recorded; it never chooses anything.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import torch
from torch import nn

from models.image_cnn import PRESETS, ImageCNN, ImageCNNConfig
from models.image_encoding import ImageEncoder
from models.recipe import config_from_dict

ARCHITECTURE = "image-cnn"


def split_dev(grids: np.ndarray, labels: np.ndarray, seed: int, dev_fraction: float = 0.1):
    order = np.random.default_rng(seed).permutation(len(grids))
    cut = int(round(len(grids) * dev_fraction))
    return (grids[order[cut:]], labels[order[cut:]]), (grids[order[:cut]], labels[order[:cut]])


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def train_image_cnn(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None, label_names: list[str],
                    preset: str = "digits", seed: int = 3435, epochs: int | None = None) -> dict:
    """Train on `train` (grids, labels) with the preset's recipe; the checkpoint as a dict."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    config = ImageCNNConfig(num_classes=len(label_names), **PRESETS[preset])
    recipe = config.recipe if epochs is None else dataclasses.replace(config.recipe, epochs=epochs)
    encoder = ImageEncoder(size=config.input_size)
    (train_grids, train_labels), (dev_grids, dev_labels) = split_dev(*train, seed=seed)
    train_images, dev_images = encoder.encode(train_grids), encoder.encode(dev_grids)
    model = ImageCNN(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    loss_function = nn.CrossEntropyLoss()
    history, best = [], (-1.0, 0, None)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(len(train_images))
        losses = []
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start: start + recipe.batch_size]
            loss = loss_function(model(torch.from_numpy(train_images[batch.numpy()])), torch.from_numpy(train_labels[batch.numpy()]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        dev_accuracy = accuracy(model, dev_images, dev_labels)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_accuracy": dev_accuracy})
        if dev_accuracy > best[0]:
            best = (dev_accuracy, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    metrics = {"dev_accuracy": best[0], "best_epoch": best[1], "history": history,
               "train_images": int(len(train_images)), "dev_images": int(len(dev_images))}
    if test is not None:
        metrics.update(test_accuracy=accuracy(model, encoder.encode(test[0]), test[1]), test_images=int(len(test[0])))
    return {"architecture": ARCHITECTURE, "preset": preset, "config": dataclasses.asdict(config),
            "encoding": encoder.to_config(), "labels": label_names, "state_dict": model.state_dict(), "metrics": metrics}


def load_image_model(checkpoint: dict) -> ImageCNN:
    model = ImageCNN(config_from_dict(ImageCNNConfig, checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
