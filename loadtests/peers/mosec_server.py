"""A mosec peer for `make bench`: mosec's Rust HTTP front end, its dynamic batcher, and Python
worker processes that run loadtests/peers/work.py (the service's encoder and onnxruntime sessions).

    PYTHONPATH=. .venv-bench-mosec/bin/python -m loadtests.peers.mosec_server \\
        --models kim-cnn-trec6,char-lm-small-ptb --workers 1 --threads 2 --port 8000

POST /inference {"model": NAME, "texts": [...]} answers {"model", "results": [...]}: per text
{"label", "probabilities"} for a classifier, {"tokens", "log_probs", "perplexity"} for the language
model, as the hand-rolled baseline does. GET / is mosec's liveness check. Any of mosec's own
options (--timeout, --capacity, ...) may follow; it reads them from the same command line.

mosec batches requests, not texts: a batch of up to --max-batch-size requests, each with one or
more texts, is flattened, each model runs once on its texts, and the answers are split back.
"""

from __future__ import annotations

import argparse
import json
import os

from mosec import Server, Worker
from mosec.errors import ValidationError

from loadtests.peers.work import BadRequest, PeerModels

# Read by each worker process (spawned: they import this module afresh, without the arguments).
MODELS_ENV = "PEER_MODELS"
THREADS_ENV = "PEER_ORT_THREADS"


class TextWorker(Worker):
    """One worker process: its own onnxruntime sessions with PEER_ORT_THREADS threads each."""

    def __init__(self) -> None:
        super().__init__()
        self.models = PeerModels.load(os.environ[MODELS_ENV].split(","), threads=int(os.environ[THREADS_ENV]))

    def deserialize(self, data: bytes) -> tuple[str, list[str]]:
        # Validated after decoding, as mosec's documentation places it (422). mosec answers every
        # request of the batch with the error (its coordinator decodes the batch as one step);
        # the bench sends only valid bodies.
        try:
            return self.models.check(json.loads(data))
        except (ValueError, BadRequest) as error:  # json.JSONDecodeError is a ValueError
            raise ValidationError(str(error)) from error

    def forward(self, data: list[tuple[str, list[str]]]) -> list[dict]:
        return self.models.answer_batch(data)

    def serialize(self, data: dict) -> bytes:
        # mosec's default indents its JSON; compact, as every other server in the bench answers.
        return json.dumps(data).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="kim-cnn-trec6,char-lm-small-ptb", help="comma-separated bundles of models/zoo")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each with its own sessions")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per session")
    parser.add_argument("--max-batch-size", type=int, default=64, help="requests per batch")
    parser.add_argument("--max-wait-ms", type=int, default=1, help="how long a batch waits to fill")
    args, _ = parser.parse_known_args()  # the rest (--port, --timeout, ...) is mosec's
    os.environ[MODELS_ENV] = args.models
    os.environ[THREADS_ENV] = str(args.threads)
    server = Server()
    server.append_worker(TextWorker, num=args.workers, max_batch_size=args.max_batch_size, max_wait_time=args.max_wait_ms)
    server.run()


if __name__ == "__main__":
    main()
