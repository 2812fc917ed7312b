"""What every training job shares: one seed for every generator, and checkpoints written so that
a stop mid-write keeps the previous file (a rerun resumes from it)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomically(state: dict, path: Path) -> None:
    """torch.save through a sibling temporary file, so a stop mid-write keeps the previous file
    (checkpoints, and the state of a run in progress)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    torch.save(state, staging)
    staging.replace(path)
