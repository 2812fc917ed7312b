"""How fast one training step of the character-aware LM runs here, and what each CPU option buys:
`python -m training.bench.lm_step [--preset small] [--threads 1 2] [--steps 12]`.

One step is what train-lm does per chunk (batch 20 x 35 words, forward, the summed loss,
backward, clipping, SGD) on random characters and targets of PTB's sizes (10k words, 51
characters, width 21). For each thread count it times plain float32 (the recipe as trained),
torch.compile, and bfloat16 autocast, and prints the median seconds per step with the ratio to
float32 at the same thread count. The first steps (compilation, allocation) are not counted.
Nothing here changes how train-lm trains; the table is the evidence for choosing its options.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from models.char_lm import CharAwareLM, char_lm_config
from training.jobs.language_model import summed_step_loss

PTB_WORDS, PTB_CHARS, PTB_WIDTH = 10_000, 51, 21
WARM_UP_STEPS = 3


def time_steps(model: torch.nn.Module, config, steps: int, autocast: bool) -> float:
    recipe = config.recipe
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.learning_rate)
    generator = torch.Generator().manual_seed(0)
    chars = torch.randint(1, PTB_CHARS, (recipe.batch_size, recipe.bptt_steps, PTB_WIDTH), generator=generator)
    targets = torch.randint(0, PTB_WORDS, (recipe.batch_size, recipe.bptt_steps), generator=generator)
    state = (torch.zeros(config.lstm_layers, recipe.batch_size, config.hidden_size),) * 2
    times = []
    for _ in range(WARM_UP_STEPS + steps):
        started = time.perf_counter()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits, _ = model(chars, state)
        loss = summed_step_loss(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[WARM_UP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=("small", "large"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print(f"| threads | option | s per step (median of {args.steps}) | vs float32 | epoch of 1,327 steps |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        baseline = None
        for option in ("float32", "torch.compile", "bfloat16 autocast"):
            torch.manual_seed(0)
            model = CharAwareLM(char_lm_config(args.preset, PTB_WORDS, PTB_CHARS, PTB_WIDTH)).train()
            runnable = torch.compile(model) if option == "torch.compile" else model
            seconds = time_steps(runnable, model.config, args.steps, autocast=option == "bfloat16 autocast")
            baseline = baseline or seconds
            print(f"| {threads} | {option} | {seconds:.3f} | {baseline / seconds:.2f}x | {1327 * seconds / 60:.1f} min |", flush=True)


if __name__ == "__main__":
    main()
