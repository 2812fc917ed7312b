"""The classifier training job, one loop for every architecture, read top to bottom.

    examples -> vocabulary (word models) -> input ids -> model from the registry
             -> the preset's recipe: optimiser, learning-rate halving, gradient clipping,
                the model's own constraints (Kim's max-norm) -> keep the best dev epoch -> checkpoint

A checkpoint is a plain dict {architecture, preset, state_dict, config, vocab, labels, encoding,
metrics, step}, loadable with torch.load(weights_only=True); never a pickled module.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.ensemble import ensemble_of, member_seeds
from models.recipe import TrainingRecipe
from models.registry import architecture, build_config, build_model, config_values, input_encoding
from models.text_encoding import CharEncoder, WordEncoder, WordVocab, encoder_from_config, tokenize
from services.backends.inference import softmax
from training.jobs import distributed, progress
from training.jobs.checkpoints import save_atomically, seed_everything
from training.data.datasets import LabelledText, first_unknown_label, kfold, split_dev
from training.data.word_vectors import embedding_matrix, read_word_vectors

PARITY_TEXTS = 512  # texts kept in a checkpoint for export's parity check (dev first, then train)


def encode_examples(
    encoder: WordEncoder | CharEncoder, examples: Sequence[LabelledText], labels: Sequence[str]
) -> tuple[list[list[int]], np.ndarray]:
    """Word-id rows (unpadded across rows) and label ids (N,)."""
    label_ids = {label: i for i, label in enumerate(labels)}
    rows = [encoder.encode_one(example.text) for example in examples]
    return rows, np.array([label_ids[example.label] for example in examples], dtype=np.int64)


def batch_tensors(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest: token_ids (B, T), lengths (B,)."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    token_ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return token_ids, lengths


@torch.no_grad()
def accuracy(model: torch.nn.Module, rows: Sequence[Sequence[int]], targets: np.ndarray, batch_size: int = 500,
             device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        token_ids, lengths = batch_tensors(rows[start : start + batch_size])
        predictions = model(token_ids.to(device), lengths.to(device)).argmax(dim=1).cpu().numpy()
        correct += int((predictions == targets[start : start + batch_size]).sum())
    return correct / len(rows)


def make_optimizer(recipe: TrainingRecipe, parameters) -> torch.optim.Optimizer:
    if recipe.optimizer == "adadelta":
        return torch.optim.Adadelta(parameters, lr=recipe.learning_rate, rho=recipe.adadelta_rho, eps=recipe.adadelta_eps)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=recipe.learning_rate, momentum=recipe.momentum)
    return torch.optim.Adam(parameters, lr=recipe.learning_rate)


def train_classifier(
    train: Sequence[LabelledText],
    dev: Sequence[LabelledText],
    architecture_name: str = "kim-cnn",
    preset: str = "rand",
    lowercase: bool = True,
    seed: int = 3435,  # Kim's seed in CNN_sentence
    epochs: int | None = None,
    min_count: int = 1,
    patience: int | None = None,
    overrides: dict[str, str] | None = None,
    vectors_path: str | Path | None = None,
    vectors_format: str = "auto",
    show_progress: bool = True,
    held_out: Sequence[LabelledText] | None = None,
    device: str = "cpu",
    resume_path: Path | None = None,
) -> dict:
    """Train on `train`, early-stop on `dev`, return the checkpoint dict of the best dev epoch.

    Under torchrun (training/jobs/distributed.py) each rank computes its share of every batch and
    rank 0 alone validates; with `resume_path`, rank 0 writes the run's state there after every
    epoch and a rerun with the same settings, with any number of ranks, continues from it.

    `held_out` (cross-validation's fold) is scored after every epoch into the history as
    `held_out_accuracy`, so that selection rules can be compared on one run; it chooses nothing.

    The preset's recipe trains the full run and keeps the best dev epoch (Kim); `patience` N
    stops once N epochs in a row have not improved dev accuracy. `overrides` are config
    `name=value` strings, e.g. {"length": "256", "recipe.epochs": "10"}."""
    seed_everything(seed)
    data = EncodedData.of(train, dev, held_out, architecture_name, preset, lowercase, seed, epochs, min_count,
                          overrides, vectors_path, vectors_format)
    run = ClassifierRun(data, architecture_name, device, seed)
    run_key = {"architecture": architecture_name, "preset": preset, "config": config_values(data.config), "seed": seed,
               "labels": data.labels, "vocab_size": len(data.vocab) if data.vocab else 0, "train_examples": len(train),
               "dev_examples": len(dev), "patience": patience, "data_sha256": examples_digest(train, dev),
               "vectors": str(vectors_path) if vectors_path is not None else None}
    run.resume(resume_path, run_key)

    # ---- loop: shuffle, step, clip, constrain; keep the best dev epoch ----
    recipe = data.recipe
    started = time.perf_counter() - run.seconds_before
    first_epoch = len(run.history) + 1
    shown = show_progress and run.ranks.is_main
    epoch_bar = progress.bar(range(first_epoch, recipe.epochs + 1 if not run.stopped_early else first_epoch), shown,
                             desc="epochs", leave=False)
    for epoch in epoch_bar:
        epoch_started = time.perf_counter()
        entry = run.train_epoch(epoch, shown)
        epoch_bar.set_postfix(loss=f"{entry['train_loss']:.4f}", dev=f"{entry['dev_accuracy']:.4f}")
        progress.report(progress.epoch_line(epoch, recipe.epochs, time.perf_counter() - epoch_started, time.perf_counter() - started,
                                            f"train loss {entry['train_loss']:.4f}, dev {entry['dev_accuracy']:.4f}"), shown)
        improved = run.keep_if_best(entry)
        stop = not improved and patience is not None and epoch - run.best["best_epoch"] >= patience
        if resume_path is not None and run.ranks.is_main:
            run.save_epoch_state(resume_path, run_key, stop, time.perf_counter() - started)
        if stop:
            break
    return run.checkpoint(architecture_name, preset, patience, vectors_path, time.perf_counter() - started, train, dev)


@dataclass
class EncodedData:
    """A classifier run's data: labels (sorted, for a stable order), the vocabulary (from the
    training split only), the config with the preset's recipe, pretrained vectors if the preset
    starts from them, and the three splits encoded as the model reads them."""

    labels: list[str]
    vocab: WordVocab | None
    config: object
    encoding: dict
    pretrained: np.ndarray | None
    vectors_found: int
    train_rows: list[list[int]]
    train_targets: np.ndarray
    dev_rows: list[list[int]]
    dev_targets: np.ndarray
    held_out_rows: list[list[int]] | None
    held_out_targets: np.ndarray | None

    @property
    def recipe(self) -> TrainingRecipe:
        return self.config.recipe

    @classmethod
    def of(cls, train, dev, held_out, architecture_name: str, preset: str, lowercase: bool, seed: int, epochs: int | None,
           min_count: int, overrides: dict[str, str] | None, vectors_path, vectors_format: str) -> "EncodedData":
        labels = sorted({example.label for example in train})
        unseen = first_unknown_label(dev, labels, "no training example has it: give it more examples, or drop it")
        if unseen:
            raise unseen
        uses_words = architecture(architecture_name).input_kind == "words"
        vocab = WordVocab.build((tokenize(e.text, lowercase) for e in train), min_count=min_count) if uses_words else None
        overrides = dict(overrides or {})
        if epochs is not None:
            overrides["recipe.epochs"] = str(epochs)
        config = build_config(architecture_name, preset, len(vocab) if vocab else 0, len(labels), overrides)
        pretrained, vectors_found = None, 0
        if getattr(config, "variant", "rand") != "rand":
            if vectors_path is None:
                raise ValueError(f"preset {preset!r} starts from pretrained word vectors: give --vectors FILE (word2vec or GloVe)")
            vectors, dimension = read_word_vectors(vectors_path, vocab, vectors_format)
            config = build_config(architecture_name, preset, len(vocab), len(labels), {**overrides, "embedding_dim": str(dimension)})
            pretrained = embedding_matrix(vocab, vectors, dimension, seed, config.embedding_init_range)
            vectors_found = len(vectors)
        encoding = input_encoding(architecture_name, config, lowercase)
        encoder = encoder_from_config(encoding, vocab)
        held_out_rows, held_out_targets = encode_examples(encoder, held_out, labels) if held_out else (None, None)
        return cls(labels, vocab, config, encoding, pretrained, vectors_found, *encode_examples(encoder, train, labels),
                   *encode_examples(encoder, dev, labels), held_out_rows, held_out_targets)


class ClassifierRun:
    """The model and optimiser of one classifier run (both from the preset) and where it stands:
    the epochs' history, the best dev epoch and its weights, the step count and the batch order."""

    def __init__(self, data: EncodedData, architecture_name: str, device: str, seed: int) -> None:
        self.data, self.device, self.seed = data, device, seed
        self.ranks = distributed.current_ranks()
        self.model = build_model(architecture_name, config_values(data.config)).to(device)
        if data.pretrained is not None:
            with torch.no_grad():
                for embedding in self.model.embeddings:  # every channel starts from the same vectors
                    embedding.weight.copy_(torch.from_numpy(data.pretrained))
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(data.recipe, self.parameters)
        self.best: dict = {"dev_accuracy": -1.0}
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self.step = 0
        self.order_rng = np.random.default_rng(seed)
        # Kim's: one order for the whole run.
        self.fixed_order = self.order_rng.permutation(len(data.train_rows)) if data.recipe.shuffle == "batches" else None
        self.stopped_early, self.seconds_before = False, 0.0

    def resume(self, resume_path: Path | None, run_key: dict) -> None:
        """The run so far, when a rerun resumes one (rank 0 reads it, every rank gets it)."""
        resumed = distributed.from_main(read_epoch_state(resume_path, run_key) if self.ranks.is_main else None)
        if resumed and "refused" in resumed:
            raise SystemExit(resumed["refused"])
        if resumed:
            self.model.load_state_dict(resumed["state_dict"])
            self.optimizer.load_state_dict(resumed["optimizer"])
            self.best, self.best_state, self.history, self.step = resumed["best"], resumed["best_state"], resumed["history"], resumed["step"]
            self.order_rng.bit_generator.state = resumed["order_rng"]
            if self.ranks.is_main:
                torch.set_rng_state(resumed["torch_rng"])
                if self.device.startswith("cuda") and resumed.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(resumed["cuda_rng"])  # dropout masks on this rank's GPU
                print(f"resuming {resume_path}: {len(self.history)} of {self.data.recipe.epochs} epochs done", flush=True)
            self.stopped_early = bool(resumed["stopped"])  # a rerun of a run that patience had stopped
            self.seconds_before = resumed["seconds"]
        distributed.reseed_dropout(self.seed, self.step)
        self.trained = distributed.wrap(self.model, self.device)  # DDP under torchrun, else the model itself

    def train_epoch(self, epoch: int, shown: bool) -> dict:
        """One epoch of steps over this rank's share of every batch, then rank 0's validation, which
        every rank takes (so all decide alike); returns the epoch's history entry."""
        data, recipe, ranks, model, optimizer = self.data, self.data.recipe, self.ranks, self.model, self.optimizer
        model.train()
        learning_rate = recipe.learning_rate_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        batch_losses = 0.0  # sum over batches of this rank's part of the batch's mean loss
        batches = recipe.epoch_batches(len(data.train_rows), self.order_rng, self.fixed_order)  # the same global batches on every rank
        for index in progress.bar(batches, shown, desc=f"epoch {epoch}", leave=False):
            batch_losses += self.train_step(index) / ranks.world_size
        train_loss = distributed.sum_over_ranks([batch_losses])[0] / len(batches)
        entry = {"epoch": epoch, "learning_rate": learning_rate, "train_loss": train_loss}
        if ranks.is_main:
            entry["dev_accuracy"] = accuracy(model, data.dev_rows, data.dev_targets, device=self.device)
            if data.held_out_rows is not None:
                entry["held_out_accuracy"] = accuracy(model, data.held_out_rows, data.held_out_targets, device=self.device)
        entry = distributed.from_main(entry)
        self.history.append(entry)
        return entry

    def train_step(self, index: np.ndarray) -> float:
        """One optimiser step on this rank's share of the batch `index`; returns its loss."""
        data, recipe, ranks, device = self.data, self.data.recipe, self.ranks, self.device
        share = ranks.share(index)
        # A rank whose share is empty (a last batch smaller than the world) still joins the
        # all-reduce, with one example weighted 0.
        weight = ranks.world_size / len(index) if len(share) else 0.0
        share = share if len(share) else index[:1]
        token_ids, lengths = batch_tensors([data.train_rows[i] for i in share])
        logits = self.trained(token_ids.to(device), lengths.to(device))
        share_targets = torch.from_numpy(data.train_targets[share]).to(device)
        if ranks.distributed:  # this share's loss sum over the global batch size, times the world
            # size: DDP's mean over the ranks turns the gradients back into the batch mean's
            loss = F.cross_entropy(logits, share_targets, reduction="sum") * weight
        else:
            loss = F.cross_entropy(logits, share_targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, recipe.grad_clip_norm)
        self.optimizer.step()
        if hasattr(self.model, "apply_constraints"):
            self.model.apply_constraints()  # Kim's max-norm on the output rows
        self.step += 1
        return loss.item()

    def keep_if_best(self, entry: dict) -> bool:
        improved = entry["dev_accuracy"] > self.best["dev_accuracy"]
        if improved:
            self.best = {"dev_accuracy": entry["dev_accuracy"], "best_epoch": entry["epoch"], "step": self.step}
            self.best_state = {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}
        return improved

    def save_epoch_state(self, resume_path: Path, run_key: dict, stopped: bool, seconds: float) -> None:
        save_atomically({
            "key": run_key, "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best": self.best,
            "best_state": self.best_state, "history": self.history, "step": self.step,
            "order_rng": self.order_rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "stopped": stopped,
            "seconds": seconds, "cuda_rng": torch.cuda.get_rng_state() if self.device.startswith("cuda") else None}, resume_path)

    def checkpoint(self, architecture_name: str, preset: str, patience: int | None, vectors_path, seconds: float,
                   train: Sequence[LabelledText], dev: Sequence[LabelledText]) -> dict:
        data, best, model, history, recipe = self.data, self.best, self.model, self.history, self.data.recipe
        vocab, labels, encoding, config, best_state = data.vocab, data.labels, data.encoding, data.config, self.best_state
        metrics = {
            **best,
            "train_examples": len(train),
            "dev_examples": len(dev),
            "epochs": recipe.epochs,
            "epochs_run": len(history),
            "patience": patience,
            "global_batch": recipe.batch_size,  # examples per step, over all ranks
            "world_size": self.ranks.world_size,  # ranks that ran the last invocation (a resumed run may have changed it)
            "parameters": sum(p.numel() for p in model.parameters()),
            **({"vectors_file": Path(vectors_path).name, "vectors_coverage": data.vectors_found / (len(vocab) - 2)}
               if data.pretrained is not None else {}),
            "train_seconds": round(seconds, 1),
            "history": history,
        }
        return {
            "architecture": architecture_name,
            "preset": preset,
            "state_dict": best_state,
            "config": config_values(config),
            "vocab": list(vocab.tokens) if vocab else None,
            "labels": labels,
            "encoding": encoding,
            "metrics": metrics,
            "step": best["step"],
            # Real texts for export's parity check and float16 decision when `export --data` is not given.
            "parity_texts": [example.text for example in [*dev, *train][:PARITY_TEXTS]],
        }


def examples_digest(*parts: Sequence[LabelledText]) -> str:
    """sha256 of the examples (labels and texts, in order): a resumed run must be on the same data."""
    digest = hashlib.sha256()
    for part in parts:
        for example in part:
            digest.update(f"{example.label}\t{example.text}\n".encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def read_epoch_state(path: Path | None, run_key: dict) -> dict | None:
    """The state a stopped run left in `path` (save_atomically), or None when there is none;
    a state written under other settings is refused ({"refused": why}), not mixed in."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings: nothing to unpickle
    if state["key"] != run_key:
        return {"refused": f"{path} holds a stopped run with other settings; remove it to start afresh"}
    return state


def resume_folder(out: Path) -> Path:
    """Where `train --out OUT` (and `cv --out OUT`) keep the state of runs in progress: OUT.resume/,
    removed once the checkpoint (the cv result) is written."""
    return out.with_name(out.name + ".resume")


def remove_resume_state(folder: Path, pattern: str = "*") -> None:
    """Drop the kept state of finished runs, and the folder once it is empty."""
    if folder.is_dir():
        for path in folder.glob(pattern):
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def train_ensemble(train: Sequence[LabelledText], dev: Sequence[LabelledText], members: int, seed: int = 3435,
                   resume: Path | None = None, **train_options) -> dict:
    """Train `members` copies of one recipe on the same split, seeds apart (member_seeds), each
    keeping its own best dev epoch; one member is the plain checkpoint of train_classifier.

    Two or more: one checkpoint holding every member's weights (`member_state_dicts`), served as
    the mean of their logits (models/ensemble.py); its `dev_accuracy` is the ensemble's, and the
    metrics keep each member's figures and curve.

    With `resume` (a folder), each member's run in progress is kept there after every epoch and its
    finished checkpoint when it ends, so a rerun continues where the last one stopped."""
    checkpoints = []
    for member, member_seed in enumerate(member_seeds(seed, members)):
        done_path = resume / f"member-{member}.done.pt" if resume else None
        finished = distributed.from_main(load_checkpoint(done_path) if done_path and done_path.exists() and
                                         distributed.current_ranks().is_main else None)
        if finished is not None:
            checkpoints.append(finished)
            continue
        checkpoint = train_classifier(train, dev, seed=member_seed, resume_path=resume / f"member-{member}.pt" if resume else None,
                                      **train_options)
        if done_path is not None and distributed.current_ranks().is_main and members > 1:
            save_atomically(checkpoint, done_path)
        checkpoints.append(checkpoint)
    if members == 1:
        return checkpoints[0]
    first = checkpoints[0]
    # Same data, same split, same recipe: the vocabulary and labels are the same for every member.
    assert all(c["vocab"] == first["vocab"] and c["labels"] == first["labels"] for c in checkpoints)
    labels = first["labels"]
    dev_rows, dev_targets = encode_examples(encoder_for(first), dev, labels)
    ensemble = ensemble_of([load_model(checkpoint) for checkpoint in checkpoints])
    member_metrics = [checkpoint["metrics"] for checkpoint in checkpoints]
    metrics = {
        **{key: value for key, value in first["metrics"].items() if key not in ("history", "best_epoch", "step")},
        "dev_accuracy": accuracy(ensemble, dev_rows, dev_targets),
        "ensemble_members": members,
        "ensemble_combine": "mean of the members' logits",
        "member_seeds": member_seeds(seed, members),
        "member_dev_accuracies": [m["dev_accuracy"] for m in member_metrics],
        "member_best_epochs": [m["best_epoch"] for m in member_metrics],
        "parameters": sum(m["parameters"] for m in member_metrics),
        "train_seconds": round(sum(m["train_seconds"] for m in member_metrics), 1),
        "member_histories": [m["history"] for m in member_metrics],
    }
    return {
        **{key: value for key, value in first.items() if key not in ("state_dict", "metrics", "step")},
        "member_state_dicts": [checkpoint["state_dict"] for checkpoint in checkpoints],
        "metrics": metrics,
        "step": sum(checkpoint["step"] for checkpoint in checkpoints),
    }


@torch.no_grad()
def logits_of(model: torch.nn.Module, rows: Sequence[Sequence[int]], batch_size: int = 500) -> np.ndarray:
    """(N, K) float32 logits of encoded rows, in eval mode."""
    model.eval()
    parts = [model(*batch_tensors(rows[start : start + batch_size])).numpy() for start in range(0, len(rows), batch_size)]
    return np.concatenate(parts)


class CrossValidationMismatch(ValueError):
    """A cv progress file was written under other settings than the run asked for."""


def cross_validate(
    examples: Sequence[LabelledText],
    folds: int = 10,
    dev_fraction: float = 0.1,
    seed: int = 3435,
    members: int = 1,
    show_progress: bool = True,
    progress_path: Path | None = None,
    progress_key: dict | None = None,
    **train_options,
) -> dict:
    """Kim's k-fold CV: per fold, 10 % of the training part is dev for early stopping and the
    held-out fold is scored at the best dev epoch. Returns mean, std and every fold's accuracy.

    With `members` >= 2 each fold trains that many seeds on its split (train_ensemble's seeds)
    and the fold's figure is their ensemble's (the mean of the logits, as served); the result adds
    the ensembles of the first 1, 2, ... members, the mean of the probabilities instead, and the
    members alone, all from the same runs.

    With `progress_path`, each finished fold (and member) is written there at once, and a rerun with
    the same `progress_key` (the settings that define the run) skips what is already scored: a
    ten-fold run of hours survives being stopped. A file written under other settings is refused."""
    main = distributed.current_ranks().is_main  # under torchrun, rank 0 reads, prints and writes
    previous = distributed.from_main(json.loads(progress_path.read_text()) if main and progress_path is not None
                                     and progress_path.exists() else {})
    if previous and previous.get("cv_settings") != progress_key:
        raise CrossValidationMismatch(f"{progress_path} holds a cross-validation run with other settings "
                                      f"({previous.get('cv_settings')}); remove it or write to another --out")
    done: dict[str, float] = {str(fold): accuracy for fold, accuracy in previous.get("cv_fold_progress", {}).items()}
    curves: dict[str, list[list[float]]] = previous.get("cv_fold_curves", {})  # fold -> [dev, fold accuracy] per epoch (member 0)
    scored: dict[str, dict] = previous.get("cv_member_runs", {})  # members >= 2: fold -> {"targets", "members": [{"curve", "logits"}]}
    say = print if main else (lambda *args, **kwargs: None)

    def save_progress() -> None:
        if progress_path is not None and main:
            write_json_atomically(progress_path, {"cv_settings": progress_key, "cv_fold_progress": done, "cv_fold_curves": curves,
                                                  **({"cv_member_runs": scored} if members > 1 else {})})

    for fold, (train_part, test_part) in enumerate(kfold(examples, folds=folds, seed=seed), start=1):
        if str(fold) in done:
            say(f"fold {fold}/{folds}: accuracy {done[str(fold)]:.4f} (from {progress_path})", flush=True)
            continue
        train, dev = split_dev(train_part, dev_fraction=dev_fraction, seed=seed + fold)
        runs = scored.setdefault(str(fold), {"members": []})
        for member, member_seed in enumerate(member_seeds(seed + fold, members)):
            if member < len(runs["members"]):
                continue  # scored before a stop
            # The fold's run in progress, kept after every epoch: a rerun continues it mid-fold.
            epoch_state = resume_folder(progress_path) / f"fold-{fold}-member-{member}.pt" if progress_path else None
            checkpoint = train_classifier(train, dev, seed=member_seed, show_progress=show_progress, held_out=test_part,
                                          resume_path=epoch_state, **train_options)
            curve = [[h["dev_accuracy"], h["held_out_accuracy"]] for h in checkpoint["metrics"]["history"]]
            if member == 0:
                curves[str(fold)] = curve
            if members > 1:
                rows, targets = encode_examples(encoder_for(checkpoint), test_part, checkpoint["labels"])
                runs["targets"] = targets.tolist()
                runs["members"].append({"seed": member_seed, "curve": curve,
                                        "logits": np.round(logits_of(load_model(checkpoint), rows), 5).tolist()})
                say(f"fold {fold}/{folds}, member {member + 1}/{members}: accuracy {select_epoch(curve, 'first-best-dev'):.4f} "
                      f"(best dev epoch {checkpoint['metrics']['best_epoch']})", flush=True)
                save_progress()
        if members > 1:
            done[str(fold)] = ensemble_accuracy(runs, members)
            say(f"fold {fold}/{folds}: ensemble of {members}: accuracy {done[str(fold)]:.4f}", flush=True)
        else:
            done[str(fold)] = select_epoch(curves[str(fold)], "first-best-dev")  # the epoch the checkpoint keeps
            say(f"fold {fold}/{folds}: accuracy {done[str(fold)]:.4f} (best dev epoch {checkpoint['metrics']['best_epoch']})", flush=True)
        save_progress()
        if progress_path is not None and main:  # the fold is in the progress file now
            remove_resume_state(resume_folder(progress_path), f"fold-{fold}-member-*.pt")
    return cv_summary(done, curves, scored, folds, members)


def cv_summary(done: dict[str, float], curves: dict[str, list], scored: dict[str, dict], folds: int, members: int) -> dict:
    """The cross-validation's figures from its folds: mean, std and each fold's accuracy; the
    mean under each epoch-selection rule where every fold's curve is known; with members >= 2,
    the ensembles of the first 1, 2, ... members, the mean of probabilities, and each member alone."""
    fold_accuracies = [done[str(fold)] for fold in range(1, folds + 1)]
    result = {
        "cv_folds": folds,
        "cv_accuracy_mean": statistics.mean(fold_accuracies),
        "cv_accuracy_std": statistics.stdev(fold_accuracies) if folds > 1 else 0.0,
        "cv_fold_accuracies": fold_accuracies,
    }
    if len(curves) == folds:  # every fold's curve (a progress file from before curves has none)
        result["cv_accuracy_by_selection_rule"] = {
            rule: statistics.mean(select_epoch(curves[str(fold)], rule) for fold in range(1, folds + 1)) for rule in SELECTION_RULES}
    if members > 1:
        runs = [scored[str(fold)] for fold in range(1, folds + 1)]
        result.update({
            "cv_members": members,
            "cv_accuracy_by_members": {str(k): statistics.mean(ensemble_accuracy(r, k) for r in runs) for k in range(1, members + 1)},
            "cv_accuracy_probability_mean": statistics.mean(ensemble_accuracy(r, members, "probabilities") for r in runs),
            "cv_member_accuracies": [statistics.mean(select_epoch(r["members"][m]["curve"], "first-best-dev") for r in runs)
                                     for m in range(members)],
        })
    return result


def ensemble_accuracy(runs: dict, members: int, combine: str = "logits") -> float:
    """Held-out accuracy of the first `members` members of a fold's runs, combined by the mean of
    their logits (as served) or of their probabilities."""
    logits = np.array([run["logits"] for run in runs["members"][:members]], dtype=np.float32)  # (M, N, K)
    scores = logits.mean(axis=0) if combine == "logits" else softmax(logits).mean(axis=0)
    return float((scores.argmax(axis=1) == np.array(runs["targets"])).mean())


# How the epoch to keep is picked from the dev curve: the first epoch with the best dev accuracy
# (this job), the last one (Kim's CNN_sentence: `if val_perf >= best_val_perf`), or simply the last epoch.
SELECTION_RULES = ("first-best-dev", "last-best-dev", "last-epoch")


def select_epoch(curve: Sequence[Sequence[float]], rule: str) -> float:
    """The held-out accuracy of the epoch `rule` keeps, from [dev accuracy, held-out accuracy] per epoch."""
    if rule == "last-epoch":
        return curve[-1][1]
    best = max(dev for dev, _ in curve)
    chosen = [held_out for dev, held_out in curve if dev == best]
    return chosen[0] if rule == "first-best-dev" else chosen[-1]


def write_json_atomically(path: Path, value: dict) -> None:
    """Write through a sibling temporary file and rename, so a stop mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    staging.replace(path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(checkpoint: dict) -> torch.nn.Module:
    """The checkpoint's model in eval mode: one network, or an ensemble of its members (train --members)."""
    architecture_name = checkpoint.get("architecture", "kim-cnn")
    states = checkpoint.get("member_state_dicts") or [checkpoint["state_dict"]]
    members = []
    for state in states:
        member = build_model(architecture_name, checkpoint["config"])
        member.load_state_dict(state)
        members.append(member)
    return (members[0] if len(members) == 1 else ensemble_of(members)).eval()


def encoder_for(checkpoint: dict) -> WordEncoder | CharEncoder:
    vocab = WordVocab(tuple(checkpoint["vocab"])) if checkpoint.get("vocab") else None
    return encoder_from_config(checkpoint["encoding"], vocab)
