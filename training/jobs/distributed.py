"""Data parallelism for the training jobs under torchrun: one process per rank, each computing its
share of every batch, DistributedDataParallel averaging the gradients.

    torchrun --nproc_per_node 2 -m training train ...          (one machine, two ranks)
    torchrun --nnodes 4 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:29400 -m training train-lm ...

Without torchrun (no WORLD_SIZE in the environment) every helper here is the identity: one process
trains exactly as before, bit for bit.

What stays what one process computes (docs/training.md, "Training on several processes"):
- the global batch: each rank takes every world_size-th example (row, for the LM) of the same
  batch, drawn from the same seeded order on every rank;
- the loss and its gradient: each rank's share of the loss is weighted so that DDP's mean of the
  ranks' gradients is the gradient of the whole batch's mean loss, whatever the shares' sizes;
- clipping: after DDP's all-reduce every rank holds the whole gradient, so clip_grad_norm_ sees
  the norm over the whole model that one process sees;
- the learning rate and its schedule: decided by rank 0's validation and broadcast.
What differs: dropout masks (each rank draws its own) and the order of float additions.

Only rank 0 validates, prints, shows progress bars and writes files; the other ranks wait for its
decisions at a broadcast. A rank that dies closes its sockets, so the others fail at their next
collective and the job stops; `lost_rank_message` says what to do, and a rerun of the same
command, with any number of ranks, resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits at a collective for the others: rank 0 validates the LM (about 20 s on a
# CPU for PTB's validation file) while the others wait. Environment: TRAINING_RANK_TIMEOUT_S.
RANK_TIMEOUT_S = float(os.environ.get("TRAINING_RANK_TIMEOUT_S", "1800"))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the GPU of this rank on its machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items):
        """This rank's part of a batch: every world_size-th item from its rank on, so that shares
        differ in size by one at most and one process (world 1) gets everything in order."""
        return items[self.rank :: self.world_size]


def current_ranks() -> Ranks:
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_training_device(requested: str) -> str:
    """--device of the training commands: auto is a CUDA GPU when one is usable; cuda without
    one is refused, never run on the CPU instead."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no usable CUDA GPU here (torch.cuda.is_available() is False)")
    return requested


def start(device: str) -> Ranks:
    """Join torchrun's process group when the environment says there is one (WORLD_SIZE > 1):
    NCCL with each rank on its own GPU for `device` cuda, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or current_ranks().distributed:
        return current_ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU of its own: this machine has {torch.cuda.device_count()}; "
                             f"start at most that many ranks per machine (--nproc_per_node), or train on CPUs (--device cpu)")
        torch.cuda.set_device(local_rank)  # "cuda" means this rank's GPU from here on
    dist.init_process_group(backend, timeout=timedelta(seconds=RANK_TIMEOUT_S))
    return current_ranks()


def stop() -> None:
    """Leave the group once every rank is done: a rank that tears down its connections while
    another still works (rank 0 writing the last checkpoint) can make gloo abort that rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The module the training step calls: DDP around `model` when distributed (it broadcasts rank
    0's weights now and averages gradients in backward), else `model` itself. Validation, the
    model's constraints and checkpoints use `model`, which DDP shares its parameters with."""
    ranks = current_ranks()
    if not ranks.distributed:
        return model
    device_ids = [ranks.local_rank] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def reseed_dropout(seed: int, salt: int) -> None:
    """Ranks other than 0 draw their own dropout masks (the same masks on every rank would repeat
    one pattern across the shares); rank 0 keeps the generator one process would have. `salt`
    (the step a run resumes at) keeps a resumed rank from replaying the masks it drew before."""
    ranks = current_ranks()
    if ranks.rank > 0:
        torch.manual_seed(seed + 1_000_003 * ranks.rank + salt)


def from_main(value):
    """Rank 0's `value` on every rank (pickled through the process group); `value` elsewhere is ignored."""
    if not current_ranks().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks of a few floats (float64), in one all-reduce."""
    if not current_ranks().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_to_main(value) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    ranks = current_ranks()
    if not ranks.distributed:
        return [value]
    gathered = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def lost_rank_message(error: BaseException, checkpoint: str | None) -> str | None:
    """The one line to print when a collective failed because another rank is gone; None when
    `error` is something else."""
    text = str(error)
    lost = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError") if hasattr(dist, name))
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words for a peer gone
    if not (isinstance(error, lost) or (isinstance(error, RuntimeError) and any(m in text for m in markers))):
        return None
    ranks = current_ranks()
    resume = (f"rerun the same command, with any number of ranks, to resume from {checkpoint}" if checkpoint
              else "rerun the same command to start again")
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"rank {ranks.rank} of {ranks.world_size}: lost contact with another rank ({first_line[:200]}); "
            f"the job stops: {resume}")


class RankStopped(Exception):
    """torchrun (or Kubernetes, through it) asked this rank to stop: SIGTERM."""


@contextlib.contextmanager
def job(device: str, checkpoint: str | None):
    """A training command's span: joins torchrun's group (when there is one), turns a lost rank or
    a stop into a one-line exit naming the checkpoint to resume from, and leaves the group at the end.

    When one rank dies torchrun sends SIGTERM to the others (and prints its own report of the
    root cause); each of them then says, in one line, that it was stopped and how to resume."""
    ranks = start(device)
    resume = (f"rerun the same command, with any number of ranks, to resume from {checkpoint}" if checkpoint
              else "rerun the same command to start again")

    def stopped(signum, frame):
        raise RankStopped(f"rank {ranks.rank} of {ranks.world_size}: stopped by {signal.Signals(signum).name} "
                          f"(torchrun stops every rank when one fails: its report names the first); {resume}")

    default_handler = signal.signal(signal.SIGTERM, stopped) if ranks.distributed else None
    try:
        yield ranks
    except RankStopped as stop_request:
        raise SystemExit(str(stop_request)) from None
    except Exception as error:
        message = lost_rank_message(error, checkpoint) if ranks.distributed else None
        if message is None:
            raise
        raise SystemExit(message) from None
    else:
        stop()  # only after success: leaving a group whose peer is gone can wait on it (the process exits anyway)
    finally:
        if default_handler is not None:
            signal.signal(signal.SIGTERM, default_handler)
