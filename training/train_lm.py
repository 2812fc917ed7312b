"""The language-model training job (Kim et al. 2016's recipe), read top to bottom.

    PTB tokens -> word vocabulary (the words predicted) and character table (how words are read)
      -> the training stream cut into `batch_size` rows, read `bptt_steps` words at a time with
         the LSTM state carried from chunk to chunk (never reset, detached between chunks)
      -> SGD lr 1.0 on the per-step mean losses summed over the chunk, global norm clipped at 5
      -> after each epoch: validation perplexity of the whole file as one stream; the rate is
         halved when it improved by less than 1.0 (from the third validation on)
      -> optional tail (not the paper's): `tail_epochs` cycles of one epoch, the rate falling from
         `tail_learning_rate` to 0 within each, the cycles' last weights averaged (SWA)
      -> checkpoint: the best validation epoch's weights, plus everything needed to resume

The job resumes from its checkpoint: the file is rewritten every few minutes and at every
epoch's end with the current weights, the carried state, the position in the epoch, the rate
and the random generators, so a stopped run continues where it stopped rather than restarting.
Each epoch's figures go to a JSON-lines curve file as well as the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.char_lm import CharAwareLM, CharLMConfig, LanguageModelRecipe, char_lm_config
from models.recipe import config_from_dict, with_overrides
from models.text_encoding import LanguageModelVocab, WordCharEncoder, scoring_stream
from models.registry import config_values
from training import distributed
from training import progress as progress_lines  # `progress` is the run's state here
from training.train_classifier import save_atomically, seed_everything

ARCHITECTURE = "char-lm"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TokenStream:
    """A corpus as the model reads it: next-word targets and each token's characters."""

    word_ids: np.ndarray  # (N,) int64, ids in the vocabulary (<unk> for unknown words)
    char_ids: np.ndarray  # (N, word_width) int64

    def __len__(self) -> int:
        return len(self.word_ids)


def make_stream(tokens: list[str], vocab: LanguageModelVocab, chars: WordCharEncoder) -> TokenStream:
    return TokenStream(vocab.ids(tokens), chars.encode_words(tokens))


def training_batches(stream: TokenStream, rows: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream as `rows` parallel rows (Kim's view(batch_size, -1)), cut to whole chunks:
    inputs (rows, chunks * steps, W) and next-word targets (rows, chunks * steps)."""
    usable = (len(stream) - 1) // (rows * steps) * rows * steps
    if usable == 0:
        raise ValueError(f"the training text has {len(stream)} tokens; one batch needs {rows * steps + 1}")
    inputs = torch.from_numpy(stream.char_ids[:usable]).reshape(rows, usable // rows, -1)
    targets = torch.from_numpy(stream.word_ids[1 : usable + 1]).reshape(rows, usable // rows)
    return inputs, targets


# --------------------------------------------------------------------------- the recipe's two rules


def summed_step_loss(logits: torch.Tensor, targets: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> the sum over the T steps of each step's batch-mean
    NLL, as Torch's ClassNLLCriterion per step gives it: T times the token-mean loss, so the
    gradient clipped at norm 5 is T times a token mean's (the recipe's lr 1.0 assumes this).

    Under torchrun a rank holds B' of the global batch's rows: `share` = B' * ranks / B weights
    its mean so that DDP's mean over the ranks is the global batch's (1 when the rows split evenly)."""
    steps = logits.shape[1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) * steps
    return loss if share == 1.0 else loss * share


def next_learning_rate(history: list[dict], learning_rate: float, recipe: LanguageModelRecipe) -> float:
    """After an epoch: multiply by `decay` when validation perplexity improved by less than
    `decay_when` over the previous epoch, from the third validation on (Kim's main.lua)."""
    if len(history) > 2 and history[-2]["valid_perplexity"] - history[-1]["valid_perplexity"] < recipe.decay_when:
        return learning_rate * recipe.decay
    return learning_rate


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def stream_perplexity(model: CharAwareLM, input_chars: np.ndarray, targets: np.ndarray, chunk: int = 700,
                      device: str = "cpu") -> tuple[float, int]:
    """exp(mean NLL over every target) of one stream read in order with the state carried
    (batch 1). The chunk length only bounds memory: with the state carried, any chunking gives
    the same figure. Returns (perplexity, tokens)."""
    was_training = model.training
    model.eval()
    state = model.initial_state(1)
    total_nll = 0.0
    for start in range(0, len(targets), chunk):
        chars = torch.from_numpy(input_chars[start : start + chunk]).unsqueeze(0).to(device)  # (1, T, W)
        logits, state = model(chars, state)  # (1, T, V)
        target = torch.from_numpy(targets[start : start + chunk]).to(device)
        total_nll += F.cross_entropy(logits[0].float(), target, reduction="sum").item()
    model.train(was_training)
    return math.exp(total_nll / len(targets)), len(targets)


# --------------------------------------------------------------------------- checkpoint


def without_tail(values: dict | None) -> dict | None:
    """Settings or config without the recipe's tail: a run extended by a tail resumes the same run."""
    if values is None:
        return None
    values = copy.deepcopy(values)
    if "overrides" in values:
        values["overrides"] = {k: v for k, v in values["overrides"].items() if not k.startswith("recipe.tail_")}
    if "recipe" in values:
        values["recipe"] = {k: v for k, v in values["recipe"].items() if not k.startswith("tail_")}
    return values


# --------------------------------------------------------------------------- weight averaging


class WeightAverage:
    """The running mean of a model's parameters over the steps it was given (recipe
    `average_from_halving`), kept in float32 beside the model; resumable with the checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.means: list[torch.Tensor] | None = None
        self.steps = 0

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        parameters = [parameter.detach() for _, parameter in model.named_parameters()]
        if self.means is None:
            self.means = [parameter.clone() for parameter in parameters]
        else:  # mean_n = mean_{n-1} + (x_n - mean_{n-1}) / n
            torch._foreach_lerp_(self.means, parameters, 1.0 / (self.steps + 1))
        self.steps += 1

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model with the averaged parameters for the block, its own ones again after it."""
        own = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        with torch.no_grad():
            for (name, parameter), mean in zip(model.named_parameters(), self.means):
                parameter.copy_(mean)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    parameter.copy_(own[name])

    def to_save(self) -> dict | None:
        if self.means is None:
            return None
        return {"steps": self.steps, "means": {name: mean.detach().cpu().clone() for name, mean in zip(self.names, self.means)}}

    def load(self, saved: dict | None, device: str) -> None:
        if saved:
            self.means = [saved["means"][name].to(device) for name in self.names]
            self.steps = saved["steps"]


# --------------------------------------------------------------------------- the job


def train_language_model(
    train_tokens: list[str],
    valid_tokens: list[str],
    out: Path,
    preset: str = "small",
    overrides: dict[str, str] | None = None,
    seed: int = 3435,  # Kim's seed
    device: str = "auto",
    curve_path: Path | None = None,
    checkpoint_every_seconds: float = 300.0,
    time_limit_seconds: float | None = None,
    show_progress: bool = True,
    command: str = "",
) -> dict:
    """Train (or resume training) into the checkpoint `out`; returns the checkpoint dict.

    `overrides` are config `name=value` strings (`hidden_size=32`, `recipe.epochs=2`);
    `time_limit_seconds` stops this invocation after the chunk that passes it, with a checkpoint
    from which a rerun resumes exactly. A checkpoint written under other settings is refused, not mixed in."""
    curve_path = curve_path or out.with_suffix(".curve.jsonl")
    device = distributed.resolve_training_device(device)
    ranks = distributed.current_ranks()  # under torchrun: this rank carries every world_size-th row of the batch
    settings = {"preset": preset, "overrides": dict(sorted((overrides or {}).items())), "seed": seed,
                "train_tokens": len(train_tokens), "valid_tokens": len(valid_tokens)}

    # ---- data: vocabulary and character table from the training text only ----
    vocab = LanguageModelVocab.build(train_tokens)
    chars = WordCharEncoder.build(vocab.words)
    config: CharLMConfig = with_overrides(char_lm_config(preset, len(vocab), chars.num_chars, chars.word_width),
                                          overrides or {})
    recipe: LanguageModelRecipe = config.recipe
    inputs, targets = training_batches(make_stream(train_tokens, vocab, chars), recipe.batch_size, recipe.bptt_steps)
    chunks = inputs.shape[1] // recipe.bptt_steps
    if recipe.batch_size < ranks.world_size:
        raise SystemExit(f"the batch's {recipe.batch_size} rows cannot be shared by {ranks.world_size} ranks")
    rows = torch.tensor(ranks.share(range(recipe.batch_size)))  # this rank's rows (streams) of the batch
    inputs, targets = inputs[rows], targets[rows]  # (B', chunks * steps, W), (B', chunks * steps)
    row_share = len(rows) * ranks.world_size / recipe.batch_size
    valid_chars, valid_targets = scoring_stream(valid_tokens, vocab, chars)

    # ---- model, or the run to resume ----
    seed_everything(seed)
    model = CharAwareLM(config).to(device)
    progress = {"epoch": 1, "chunk": 0, "learning_rate": recipe.learning_rate, "step": 0, "seconds": 0.0,
                "history": [], "best_valid_perplexity": None, "best_epoch": None}
    carried = model.initial_state(recipe.batch_size)  # the whole batch's; each rank keeps its rows below
    best_state = None
    averaged = WeightAverage(model)
    # Rank 0 reads the checkpoint; every rank learns where the run stands and its rows' state.
    # (The weights reach the other ranks through DDP, which broadcasts rank 0's when it wraps the model.)
    previous = torch.load(out, map_location="cpu", weights_only=True) if ranks.is_main and out.exists() else None
    if previous is not None and (without_tail(previous.get("settings")) != without_tail(settings) or
                                 without_tail(previous["config"]) != without_tail(config_values(config))):
        previous = {"refused": f"{out} holds a run with other settings ({previous.get('settings')}); "
                               f"remove it or choose another --out to start afresh"}
    shared = distributed.from_main(None if previous is None else previous.get("refused") or
                                   {"progress": previous["resume"]["progress"], "carried": previous["resume"]["carried_state"]})
    if isinstance(shared, str):
        raise SystemExit(shared)
    if shared is not None:
        progress, carried = shared["progress"], tuple(shared["carried"])
    if previous is not None:
        model.load_state_dict(previous["resume"]["state_dict"])
        torch.set_rng_state(previous["resume"]["torch_rng"])
        cuda_rng = previous["resume"].get("cuda_rng")
        if device == "cuda" and cuda_rng is not None and len(cuda_rng):  # dropout masks on this rank's GPU (a list:
            torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng)  # written by older runs)
        best_state = previous["state_dict"] if progress["best_epoch"] else None
        averaged.load(previous["resume"].get("average"), device)
        print(f"resuming {out}: epoch {progress['epoch']}, chunk {progress['chunk']}/{chunks}, "
              f"lr {progress['learning_rate']:g}", flush=True)
    carried = tuple(t[:, rows].to(device) for t in carried)  # (layers, B', H): this rank's rows
    distributed.reseed_dropout(seed, progress["step"])
    trained = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
    optimizer = torch.optim.SGD(model.parameters(), lr=progress["learning_rate"])  # plain SGD: no state to resume

    def whole_batch_state() -> list[torch.Tensor] | None:
        """The carried state of all the batch's rows, (layers, B, H) each, on rank 0 (a collective)."""
        parts = distributed.gather_to_main((rows, [t.detach().cpu() for t in carried]))
        if parts is None:
            return None
        whole = [torch.zeros(t.shape[0], recipe.batch_size, t.shape[2]) for t in parts[0][1]]
        for part_rows, tensors in parts:
            for full, part in zip(whole, tensors):
                full[:, part_rows] = part
        return whole

    def checkpoint(batch_state: list[torch.Tensor]) -> dict:
        weights = best_state if best_state is not None else model.state_dict()
        return {
            "architecture": ARCHITECTURE,
            "preset": preset,
            "settings": settings,
            "config": config_values(config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in weights.items()},  # best validation epoch
            "vocab": list(vocab.words),
            "encoding": chars.to_config(),
            "metrics": {
                "valid_perplexity": progress["best_valid_perplexity"],
                "best_epoch": progress["best_epoch"],
                "best_weights": progress.get("best_weights", "raw"),
                "epochs": recipe.epochs,
                "tail_epochs": recipe.tail_epochs,
                "epochs_run": len(progress["history"]),
                "train_tokens": len(train_tokens),
                "valid_tokens": len(valid_tokens),
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(progress["seconds"], 1),
                "device": device,
                "world_size": ranks.world_size,  # ranks of the last invocation; each epoch's is in the history
                "global_batch": recipe.batch_size,  # rows (streams) of bptt_steps words per step, over all ranks
                "train_command": command,
                "history": progress["history"],
            },
            "step": progress["step"],
            "resume": {
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "carried_state": batch_state,
                "progress": progress,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else [],  # rank 0's GPU: any count resumes
                "average": averaged.to_save(),
            },
        }

    # ---- loop ----
    run_started = time.perf_counter()
    total_epochs = recipe.epochs + recipe.tail_epochs
    while progress["epoch"] <= total_epochs:
        epoch = progress["epoch"]
        in_tail = epoch > recipe.epochs
        if in_tail and not progress.get("tail_started"):  # the average restarts from the recipe's last weights
            averaged = WeightAverage(model)
            averaged.add(model)
            progress["tail_started"] = True
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = progress["learning_rate"]
        epoch_nll = progress.get("epoch_nll", 0.0)
        last_save = started = time.perf_counter()
        bar = progress_lines.bar(range(progress["chunk"], chunks), show_progress and ranks.is_main, desc=f"epoch {epoch}/{total_epochs}",
                                 initial=progress["chunk"], total=chunks, mininterval=2.0)
        for chunk in bar:
            window = slice(chunk * recipe.bptt_steps, (chunk + 1) * recipe.bptt_steps)
            carried = tuple(t.detach() for t in carried)  # truncated BPTT: no gradient into the last chunk
            if in_tail:  # one cycle per epoch: the rate falls linearly to 0
                for group in optimizer.param_groups:
                    group["lr"] = recipe.tail_learning_rate * (1 - chunk / chunks)
            logits, carried = trained(inputs[:, window].to(device), carried)  # (B', 35, V)
            loss = summed_step_loss(logits, targets[:, window].to(device), row_share)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
            optimizer.step()
            with torch.no_grad():
                model.char_cnn.embedding.weight[0].zero_()  # the padding character stays zero
            if ranks.is_main and not in_tail and recipe.average_from_halving and \
                    progress["learning_rate"] <= recipe.learning_rate * recipe.decay ** recipe.average_from_halving:
                averaged.add(model)
            # The chunk's mean NLL per token (this rank's part of it), and rank 0's clock deciding
            # for every rank whether to checkpoint or stop now: one small all-reduce per step.
            out_of_time = ranks.is_main and time_limit_seconds is not None and time.perf_counter() - run_started > time_limit_seconds
            save_now = ranks.is_main and (out_of_time or time.perf_counter() - last_save > checkpoint_every_seconds)
            chunk_nll, save_now, out_of_time = distributed.sum_over_ranks(
                [loss.item() / recipe.bptt_steps / ranks.world_size, float(save_now), float(out_of_time)])
            epoch_nll += chunk_nll
            progress["step"] += 1
            progress["chunk"] = chunk + 1
            if show_progress and chunk % 20 == 0:
                bar.set_postfix(ppl=f"{math.exp(epoch_nll / (chunk + 1)):.1f}", lr=f"{optimizer.param_groups[0]['lr']:g}")
            if save_now:
                progress["seconds"] += time.perf_counter() - started
                progress["epoch_nll"] = epoch_nll
                batch_state = whole_batch_state()
                if ranks.is_main:
                    save_atomically(checkpoint(batch_state), out)
                last_save = started = time.perf_counter()
            if out_of_time:
                bar.close()
                if ranks.is_main:
                    print(f"time limit reached at epoch {epoch}, chunk {chunk + 1}/{chunks}; {out} resumes from here", flush=True)
                return checkpoint(batch_state) if ranks.is_main else None
        bar.close()

        # ---- end of epoch: rank 0 validates, keeps the best, applies the rate rule; all follow ----
        batch_state = whole_batch_state()
        if not ranks.is_main:
            progress = distributed.from_main(None)
            continue
        if in_tail:
            averaged.add(model)  # the cycle's end
        valid_perplexity, _ = stream_perplexity(model, valid_chars, valid_targets, device=device)
        progress["seconds"] += time.perf_counter() - started  # training and validation, as one process always counted
        entry = {"epoch": epoch, "learning_rate": recipe.tail_learning_rate if in_tail else progress["learning_rate"],
                 "train_perplexity": math.exp(epoch_nll / chunks), "valid_perplexity": valid_perplexity,
                 "step": progress["step"], "seconds": round(progress["seconds"], 1),
                 **({"world_size": ranks.world_size} if ranks.distributed else {})}
        candidate, candidate_perplexity = model.state_dict(), valid_perplexity
        if averaged.steps:
            with averaged.swapped_in(model):
                entry["valid_perplexity_averaged"], _ = stream_perplexity(model, valid_chars, valid_targets, device=device)
                entry["averaged_steps"] = averaged.steps
                if entry["valid_perplexity_averaged"] < valid_perplexity:
                    candidate, candidate_perplexity = copy.deepcopy(model.state_dict()), entry["valid_perplexity_averaged"]
        progress["history"].append(entry)
        if progress["best_valid_perplexity"] is None or candidate_perplexity < progress["best_valid_perplexity"]:
            progress["best_valid_perplexity"], progress["best_epoch"] = candidate_perplexity, epoch
            progress["best_weights"] = "averaged" if candidate_perplexity < valid_perplexity else "raw"
            best_state = copy.deepcopy(candidate)
        if in_tail:
            entry["cycle"] = epoch - recipe.epochs  # the rate ran from learning_rate down to 0
        else:
            progress["learning_rate"] = next_learning_rate(progress["history"], progress["learning_rate"], recipe)
        progress.update(epoch=epoch + 1, chunk=0, epoch_nll=0.0)
        progress = distributed.from_main(progress)
        save_atomically(checkpoint(batch_state), out)
        with open(curve_path, "a") as curve:
            curve.write(json.dumps(entry) + "\n")
        averaged_note = f" (averaged weights: {entry['valid_perplexity_averaged']:.2f})" if "valid_perplexity_averaged" in entry else ""
        print(progress_lines.epoch_line(epoch, total_epochs, time.perf_counter() - started, entry["seconds"],
                                        f"train ppl {entry['train_perplexity']:.2f}, valid ppl {valid_perplexity:.2f}{averaged_note}, "
                                        f"lr {entry['learning_rate']:g}"), flush=True)
    batch_state = whole_batch_state()
    return checkpoint(batch_state) if ranks.is_main else None


def load_language_model(checkpoint: dict, weights: str = "best") -> CharAwareLM:
    """The model of a train-lm checkpoint: `best` (released) or `current` (where training is)."""
    model = CharAwareLM(config_from_dict(CharLMConfig, checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"] if weights == "best" else checkpoint["resume"]["state_dict"])
    return model.eval()


def set_threads(threads: int | None) -> None:
    """Intra-op threads for this process (default: torch's, one per core)."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
