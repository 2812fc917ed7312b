"""A LitServe peer for `make bench`: LitServe's FastAPI/uvicorn front end (one process per
inference worker, its default), its batching, and inference worker processes that run
loadtests/peers/work.py (the service's encoder and onnxruntime sessions).

    PYTHONPATH=. .venv-bench-litserve/bin/python -m loadtests.peers.litserve_server \\
        --models kim-cnn-trec6,char-lm-small-ptb --workers 1 --threads 2 --port 8000

POST /predict {"model": NAME, "texts": [...]} answers {"model", "results": [...]}: per text
{"label", "probabilities"} for a classifier, {"tokens", "log_probs", "perplexity"} for the language
model, as the hand-rolled baseline does. GET /health answers "ok" once every worker has loaded.

LitServe batches requests, not texts: a batch of up to --max-batch-size requests, each with one
or more texts, is flattened, each model runs once on its texts, and the answers are split back.
"""

from __future__ import annotations

import argparse

import litserve as ls
from fastapi import HTTPException

from loadtests.peers.work import BadRequest, PeerModels


class TextAPI(ls.LitAPI):
    """Pickled into each inference worker process; `setup` loads the sessions there."""

    def __init__(self, models: list[str], threads: int, max_batch_size: int, batch_timeout_s: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
        self.model_names = models
        self.threads = threads

    def setup(self, device: str) -> None:
        self.models = PeerModels.load(self.model_names, threads=self.threads)

    def decode_request(self, request: dict) -> tuple[str, list[str]]:
        try:
            return self.models.check(request)
        except BadRequest as error:
            raise HTTPException(422, str(error)) from error

    def batch(self, inputs: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
        return inputs  # kept as a list of requests: answer_batch groups and flattens them

    def predict(self, requests: list[tuple[str, list[str]]]) -> list[dict]:
        return self.models.answer_batch(requests)

    def unbatch(self, answers: list[dict]) -> list[dict]:
        return answers

    def encode_response(self, answer: dict) -> dict:
        return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="kim-cnn-trec6,char-lm-small-ptb", help="comma-separated bundles of models/zoo")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes (workers_per_device on the CPU)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per session")
    parser.add_argument("--max-batch-size", type=int, default=64, help="requests per batch")
    parser.add_argument("--batch-timeout-ms", type=float, default=1.0, help="how long a batch waits to fill")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = TextAPI(args.models.split(","), args.threads, args.max_batch_size, args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
