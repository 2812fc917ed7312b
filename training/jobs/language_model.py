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
from training.jobs import distributed
from training.jobs import progress as progress_lines  # `progress` is the run's state here
from training.jobs.checkpoints import save_atomically, seed_everything

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
    arguments: dict | None = None,
) -> dict:
    """Train (or resume training) into the checkpoint `out`; returns the checkpoint dict (None on
    ranks other than the first under torchrun).

    `overrides` are config `name=value` strings (`hidden_size=32`, `recipe.epochs=2`);
    `time_limit_seconds` stops this invocation after the chunk that passes it, with a checkpoint
    from which a rerun resumes exactly. A checkpoint written under other settings is refused, not mixed in."""
    run = LanguageModelRun(train_tokens, valid_tokens, out, preset, overrides or {}, seed, device,
                           record={"train_command": command, "train_arguments": arguments or {}})
    run.resume_or_start()
    clock = Clock(time_limit_seconds, checkpoint_every_seconds)
    curve_path = curve_path or out.with_suffix(".curve.jsonl")
    while run.progress["epoch"] <= run.total_epochs:
        if not run.train_epoch(clock, show_progress):
            return run.checkpoint(run.batch_state) if run.ranks.is_main else None  # out of time: resumable
        entry = run.end_epoch()
        if entry is not None:
            run.report_epoch(entry, curve_path)
    run.batch_state = run.whole_batch_state()
    return run.checkpoint(run.batch_state) if run.ranks.is_main else None


class Clock:
    """When this invocation must stop (its time limit) and when it next checkpoints."""

    def __init__(self, limit_seconds: float | None, checkpoint_every_seconds: float) -> None:
        self.started = time.perf_counter()
        self.limit_seconds, self.every = limit_seconds, checkpoint_every_seconds

    def out_of_time(self) -> bool:
        return self.limit_seconds is not None and time.perf_counter() - self.started > self.limit_seconds

    def due(self, last_save: float) -> bool:
        return time.perf_counter() - last_save > self.every


class LanguageModelRun:
    """One run of the recipe: the data as this rank reads it, the model, the optimiser and where
    the run stands (`progress`, the carried LSTM state, the best and averaged weights), which the
    checkpoint holds and a rerun resumes from. Each method is one stage of the job."""

    def __init__(self, train_tokens: list[str], valid_tokens: list[str], out: Path, preset: str,
                 overrides: dict[str, str], seed: int, device: str, record: dict) -> None:
        self.out, self.preset, self.seed, self.record = out, preset, seed, record
        self.device = distributed.resolve_training_device(device)
        self.ranks = distributed.current_ranks()  # under torchrun: this rank carries every world_size-th row of the batch
        self.settings = {"preset": preset, "overrides": dict(sorted(overrides.items())), "seed": seed,
                         "train_tokens": len(train_tokens), "valid_tokens": len(valid_tokens)}
        self.prepare_data(train_tokens, valid_tokens, overrides)

    def prepare_data(self, train_tokens: list[str], valid_tokens: list[str], overrides: dict[str, str]) -> None:
        """Vocabulary and character table from the training text only; the training stream cut into
        the batch's rows (this rank's share of them); the validation text as one stream."""
        self.vocab = LanguageModelVocab.build(train_tokens)
        self.chars = WordCharEncoder.build(self.vocab.words)
        self.config: CharLMConfig = with_overrides(
            char_lm_config(self.preset, len(self.vocab), self.chars.num_chars, self.chars.word_width), overrides)
        self.recipe: LanguageModelRecipe = self.config.recipe
        recipe = self.recipe
        inputs, targets = training_batches(make_stream(train_tokens, self.vocab, self.chars), recipe.batch_size, recipe.bptt_steps)
        self.chunks = inputs.shape[1] // recipe.bptt_steps
        if recipe.batch_size < self.ranks.world_size:
            raise SystemExit(f"the batch's {recipe.batch_size} rows cannot be shared by {self.ranks.world_size} ranks")
        self.rows = torch.tensor(self.ranks.share(range(recipe.batch_size)))  # this rank's rows (streams) of the batch
        self.inputs, self.targets = inputs[self.rows], targets[self.rows]  # (B', chunks * steps, W), (B', chunks * steps)
        self.row_share = len(self.rows) * self.ranks.world_size / recipe.batch_size
        self.valid_chars, self.valid_targets = scoring_stream(valid_tokens, self.vocab, self.chars)
        self.train_tokens, self.valid_tokens = len(train_tokens), len(valid_tokens)
        self.total_epochs = recipe.epochs + recipe.tail_epochs

    def resume_or_start(self) -> None:
        """The model from the seed, or the run to resume from `out`. Rank 0 reads the checkpoint;
        every rank learns where the run stands and its rows' state. (The weights reach the other
        ranks through DDP, which broadcasts rank 0's when it wraps the model.)"""
        seed_everything(self.seed)
        self.model = CharAwareLM(self.config).to(self.device)
        self.progress = {"epoch": 1, "chunk": 0, "learning_rate": self.recipe.learning_rate, "step": 0, "seconds": 0.0,
                         "history": [], "best_valid_perplexity": None, "best_epoch": None}
        carried = self.model.initial_state(self.recipe.batch_size)  # the whole batch's; each rank keeps its rows below
        self.best_state = None
        self.averaged = WeightAverage(self.model)
        previous = self.previous_checkpoint()
        shared = distributed.from_main(None if previous is None else previous.get("refused") or
                                       {"progress": previous["resume"]["progress"], "carried": previous["resume"]["carried_state"]})
        if isinstance(shared, str):
            raise SystemExit(shared)
        if shared is not None:
            self.progress, carried = shared["progress"], tuple(shared["carried"])
        if previous is not None:
            self.load_resume_state(previous)
        self.carried = tuple(t[:, self.rows].to(self.device) for t in carried)  # (layers, B', H): this rank's rows
        distributed.reseed_dropout(self.seed, self.progress["step"])
        self.trained = distributed.wrap(self.model, self.device)  # DDP under torchrun, else the model itself
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.progress["learning_rate"])  # plain SGD: no state to resume
        self.batch_state = None

    def previous_checkpoint(self) -> dict | None:
        """Rank 0's checkpoint at `out`, or {"refused": why} when it holds a run of other settings."""
        if not (self.ranks.is_main and self.out.exists()):
            return None
        previous = torch.load(self.out, map_location="cpu", weights_only=True)
        if (without_tail(previous.get("settings")) != without_tail(self.settings) or
                without_tail(previous["config"]) != without_tail(config_values(self.config))):
            return {"refused": f"{self.out} holds a run with other settings ({previous.get('settings')}); "
                               f"remove it or choose another --out to start afresh"}
        return previous

    def load_resume_state(self, previous: dict) -> None:
        resume = previous["resume"]
        self.model.load_state_dict(resume["state_dict"])
        torch.set_rng_state(resume["torch_rng"])
        cuda_rng = resume.get("cuda_rng")
        if self.device == "cuda" and cuda_rng is not None and len(cuda_rng):  # dropout masks on this rank's GPU (a list:
            torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng)  # written by older runs)
        self.best_state = previous["state_dict"] if self.progress["best_epoch"] else None
        self.averaged.load(resume.get("average"), self.device)
        print(f"resuming {self.out}: epoch {self.progress['epoch']}, chunk {self.progress['chunk']}/{self.chunks}, "
              f"lr {self.progress['learning_rate']:g}", flush=True)

    def whole_batch_state(self) -> list[torch.Tensor] | None:
        """The carried state of all the batch's rows, (layers, B, H) each, on rank 0 (a collective)."""
        parts = distributed.gather_to_main((self.rows, [t.detach().cpu() for t in self.carried]))
        if parts is None:
            return None
        whole = [torch.zeros(t.shape[0], self.recipe.batch_size, t.shape[2]) for t in parts[0][1]]
        for part_rows, tensors in parts:
            for full, part in zip(whole, tensors):
                full[:, part_rows] = part
        return whole

    def checkpoint(self, batch_state: list[torch.Tensor] | None) -> dict:
        """The best weights with what serving and the record need, and everything a rerun resumes from."""
        progress, recipe, model = self.progress, self.recipe, self.model
        weights = self.best_state if self.best_state is not None else model.state_dict()
        return {
            "architecture": ARCHITECTURE,
            "preset": self.preset,
            "settings": self.settings,
            "config": config_values(self.config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in weights.items()},  # best validation epoch
            "vocab": list(self.vocab.words),
            "encoding": self.chars.to_config(),
            "metrics": {
                "valid_perplexity": progress["best_valid_perplexity"],
                "best_epoch": progress["best_epoch"],
                "best_weights": progress.get("best_weights", "raw"),
                "epochs": recipe.epochs,
                "tail_epochs": recipe.tail_epochs,
                "epochs_run": len(progress["history"]),
                "train_tokens": self.train_tokens,
                "valid_tokens": self.valid_tokens,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(progress["seconds"], 1),
                "device": self.device,
                "world_size": self.ranks.world_size,  # ranks of the last invocation; each epoch's is in the history
                "global_batch": recipe.batch_size,  # rows (streams) of bptt_steps words per step, over all ranks
                **self.record,  # train_command, and train_arguments: the values later commands read (export's --data)
                "history": progress["history"],
            },
            "step": progress["step"],
            "resume": {
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "carried_state": batch_state,
                "progress": progress,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device == "cuda" else [],  # rank 0's GPU: any count resumes
                "average": self.averaged.to_save(),
            },
        }

    def train_epoch(self, clock: Clock, show_progress: bool) -> bool:
        """The rest of the current epoch, chunk by chunk, checkpointing on the clock; False when
        the time limit stopped it (with a checkpoint a rerun resumes from)."""
        progress, recipe, model, optimizer = self.progress, self.recipe, self.model, self.optimizer
        epoch = progress["epoch"]
        self.in_tail = epoch > recipe.epochs
        if self.in_tail and not progress.get("tail_started"):  # the average restarts from the recipe's last weights
            self.averaged = WeightAverage(model)
            self.averaged.add(model)
            progress["tail_started"] = True
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = progress["learning_rate"]
        self.epoch_nll = progress.get("epoch_nll", 0.0)
        last_save = self.started = time.perf_counter()
        bar = progress_lines.bar(range(progress["chunk"], self.chunks), show_progress and self.ranks.is_main,
                                 desc=f"epoch {epoch}/{self.total_epochs}", initial=progress["chunk"], total=self.chunks, mininterval=2.0)
        for chunk in bar:
            loss = self.train_chunk(chunk)
            # The chunk's mean NLL per token (this rank's part of it), and rank 0's clock deciding
            # for every rank whether to checkpoint or stop now: one small all-reduce per step.
            out_of_time = self.ranks.is_main and clock.out_of_time()
            save_now = self.ranks.is_main and (out_of_time or clock.due(last_save))
            chunk_nll, save_now, out_of_time = distributed.sum_over_ranks(
                [loss / recipe.bptt_steps / self.ranks.world_size, float(save_now), float(out_of_time)])
            self.epoch_nll += chunk_nll
            progress["step"] += 1
            progress["chunk"] = chunk + 1
            if show_progress and chunk % 20 == 0:
                bar.set_postfix(ppl=f"{math.exp(self.epoch_nll / (chunk + 1)):.1f}", lr=f"{optimizer.param_groups[0]['lr']:g}")
            if save_now:
                self.save_mid_epoch()
                last_save = self.started = time.perf_counter()
            if out_of_time:
                bar.close()
                if self.ranks.is_main:
                    print(f"time limit reached at epoch {epoch}, chunk {chunk + 1}/{self.chunks}; {self.out} resumes from here", flush=True)
                return False
        bar.close()
        return True

    def train_chunk(self, chunk: int) -> float:
        """One step: `bptt_steps` words of every row, the state carried in; returns the summed loss."""
        recipe, optimizer, model = self.recipe, self.optimizer, self.model
        window = slice(chunk * recipe.bptt_steps, (chunk + 1) * recipe.bptt_steps)
        self.carried = tuple(t.detach() for t in self.carried)  # truncated BPTT: no gradient into the last chunk
        if self.in_tail:  # one cycle per epoch: the rate falls linearly to 0
            for group in optimizer.param_groups:
                group["lr"] = recipe.tail_learning_rate * (1 - chunk / self.chunks)
        logits, self.carried = self.trained(self.inputs[:, window].to(self.device), self.carried)  # (B', 35, V)
        loss = summed_step_loss(logits, self.targets[:, window].to(self.device), self.row_share)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.char_cnn.embedding.weight[0].zero_()  # the padding character stays zero
        if self.ranks.is_main and not self.in_tail and recipe.average_from_halving and \
                self.progress["learning_rate"] <= recipe.learning_rate * recipe.decay ** recipe.average_from_halving:
            self.averaged.add(model)
        return loss.item()

    def save_mid_epoch(self) -> None:
        self.progress["seconds"] += time.perf_counter() - self.started
        self.progress["epoch_nll"] = self.epoch_nll
        self.batch_state = self.whole_batch_state()
        if self.ranks.is_main:
            save_atomically(self.checkpoint(self.batch_state), self.out)

    def end_epoch(self) -> dict | None:
        """Rank 0 validates, keeps the best weights, applies the rate rule and checkpoints; every
        rank follows. Returns the epoch's curve entry on rank 0, None on the others."""
        self.batch_state = self.whole_batch_state()
        if not self.ranks.is_main:
            self.progress = distributed.from_main(None)
            return None
        progress, recipe, model = self.progress, self.recipe, self.model
        epoch = progress["epoch"]
        if self.in_tail:
            self.averaged.add(model)  # the cycle's end
        valid_perplexity, _ = stream_perplexity(model, self.valid_chars, self.valid_targets, device=self.device)
        progress["seconds"] += time.perf_counter() - self.started  # training and validation, as one process always counted
        entry = {"epoch": epoch, "learning_rate": recipe.tail_learning_rate if self.in_tail else progress["learning_rate"],
                 "train_perplexity": math.exp(self.epoch_nll / self.chunks), "valid_perplexity": valid_perplexity,
                 "step": progress["step"], "seconds": round(progress["seconds"], 1),
                 **({"world_size": self.ranks.world_size} if self.ranks.distributed else {})}
        self.keep_if_best(entry, valid_perplexity)
        if self.in_tail:
            entry["cycle"] = epoch - recipe.epochs  # the rate ran from learning_rate down to 0
        else:
            progress["learning_rate"] = next_learning_rate(progress["history"], progress["learning_rate"], recipe)
        progress.update(epoch=epoch + 1, chunk=0, epoch_nll=0.0)
        self.progress = distributed.from_main(progress)
        save_atomically(self.checkpoint(self.batch_state), self.out)
        return entry

    def keep_if_best(self, entry: dict, valid_perplexity: float) -> None:
        """The epoch's candidate (its raw weights, or their running average where that validates
        better) replaces the best weights when it beats them."""
        progress, model = self.progress, self.model
        candidate, candidate_perplexity = model.state_dict(), valid_perplexity
        if self.averaged.steps:
            with self.averaged.swapped_in(model):
                entry["valid_perplexity_averaged"], _ = stream_perplexity(model, self.valid_chars, self.valid_targets, device=self.device)
                entry["averaged_steps"] = self.averaged.steps
                if entry["valid_perplexity_averaged"] < valid_perplexity:
                    candidate, candidate_perplexity = copy.deepcopy(model.state_dict()), entry["valid_perplexity_averaged"]
        progress["history"].append(entry)
        if progress["best_valid_perplexity"] is None or candidate_perplexity < progress["best_valid_perplexity"]:
            progress["best_valid_perplexity"], progress["best_epoch"] = candidate_perplexity, entry["epoch"]
            progress["best_weights"] = "averaged" if candidate_perplexity < valid_perplexity else "raw"
            self.best_state = copy.deepcopy(candidate)

    def report_epoch(self, entry: dict, curve_path: Path) -> None:
        with open(curve_path, "a") as curve:
            curve.write(json.dumps(entry) + "\n")
        averaged_note = f" (averaged weights: {entry['valid_perplexity_averaged']:.2f})" if "valid_perplexity_averaged" in entry else ""
        print(progress_lines.epoch_line(entry["epoch"], self.total_epochs, time.perf_counter() - self.started, entry["seconds"],
                                        f"train ppl {entry['train_perplexity']:.2f}, valid ppl {entry['valid_perplexity']:.2f}"
                                        f"{averaged_note}, lr {entry['learning_rate']:g}"), flush=True)


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
