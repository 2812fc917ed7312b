"""A PyTriton peer for `make bench`: NVIDIA's tritonserver (shipped in the nvidia-pytriton wheel,
CPU only here), its dynamic batcher, and inference functions bound in this Python process that run
the service's encoder and onnxruntime sessions (services/backends/inference.py,
services/backends/language_model.py).

    PYTHONPATH=. .venv-bench-pytriton/bin/python -m loadtests.peers.pytriton_server \\
        --models kim-cnn-trec6,char-lm-small-ptb --instances 1 --threads 2 --port 8000

Each bundle is a Triton model of its own name, reached with Triton's HTTP API (Open Inference
Protocol v2, JSON): POST /v2/models/NAME/infer with one BYTES input "texts" of shape [N, 1].
A classifier answers "probabilities" FP32 [N, K] (the bundle's labels.json order) and "label"
BYTES [N, 1]; the language model answers "perplexity" FP32 [N, 1], and "tokens" BYTES [N, T] with
"log_probs" FP32 [N, T] (each row right-padded, with "" and 0, to the longest text of the batch).
GET /v2/models/NAME/ready answers 200 once that model is loaded (/v2/health/ready does as soon as
tritonserver is up, before the models are).

Triton batches rows (texts), not requests: --max-batch-size is in texts, 1,024 by default, so that
64 requests of 16 texts fit in one batch as they do in mosec's and LitServe's 64-request batches.
--instances binds that many copies of each inference function (Triton's instance count), each with
its own sessions; PyTriton runs each instance in a thread of this process.

This virtualenv needs numpy < 2 (PyTriton 0.7's Python-backend stub crashes deserialising BYTES
under numpy 2), and the stub must load the same libpython as this interpreter: the directory of
this interpreter's libpython is put first on LD_LIBRARY_PATH before tritonserver starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from loadtests.peers.work import PeerModels
from services.backends.inference import TextClassifier
from services.backends.language_model import CharLanguageModel


def classifier_function(classifier: TextClassifier):
    @batch
    def infer(texts: np.ndarray) -> dict[str, np.ndarray]:
        probabilities = classifier.probabilities([text.decode("utf-8") for text in texts[:, 0]])
        labels = np.array([classifier.labels[i].encode() for i in probabilities.argmax(axis=1)], dtype=np.object_)
        return {"probabilities": probabilities.astype(np.float32), "label": labels[:, None]}

    return infer


def language_model_function(language_model: CharLanguageModel):
    @batch
    def infer(texts: np.ndarray) -> dict[str, np.ndarray]:
        scored = language_model.score([text.decode("utf-8") for text in texts[:, 0]])
        longest = max(len(text.tokens) for text in scored)
        tokens = np.full((len(scored), longest), b"", dtype=np.object_)
        log_probs = np.zeros((len(scored), longest), np.float32)
        for row, text in enumerate(scored):
            tokens[row, : len(text.tokens)] = [token.encode() for token in text.tokens]
            log_probs[row, : len(text.tokens)] = text.log_probs
        perplexity = np.array([[text.perplexity] for text in scored], np.float32)
        return {"perplexity": perplexity, "tokens": tokens, "log_probs": log_probs}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="kim-cnn-trec6,char-lm-small-ptb", help="comma-separated bundles of models/zoo")
    parser.add_argument("--instances", type=int, default=1, help="instances of each model (threads of this process)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads per session")
    parser.add_argument("--max-batch-size", type=int, default=1024, help="texts per batch")
    parser.add_argument("--max-queue-delay-us", type=int, default=1000, help="how long a batch waits to fill")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="HTTP; gRPC, metrics and the others are off")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # PyTriton stops tritonserver cleanly on SIGINT only (KeyboardInterrupt in serve()); under
    # Python's default SIGTERM this process dies at once and tritonserver, killed after it, leaves
    # its stubs' shared-memory regions in /dev/shm. A SIGTERM (how the bench stops a server) is
    # therefore taken as a SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    library_dir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [library_dir, os.environ.get("LD_LIBRARY_PATH")]))

    names = args.models.split(",")
    instances = [PeerModels.load(names, threads=args.threads) for _ in range(args.instances)]
    config = ModelConfig(max_batch_size=args.max_batch_size,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us))
    texts_input = [Tensor(name="texts", dtype=bytes, shape=(1,))]
    triton_config = TritonConfig(http_address=args.host, http_port=args.port, allow_grpc=False, allow_metrics=False,
                                 allow_cpu_metrics=False, allow_gpu_metrics=False, log_verbose=0)
    with Triton(config=triton_config) as triton:
        for name in names:
            if name in instances[0].classifiers:
                triton.bind(model_name=name, infer_func=[classifier_function(m.classifiers[name]) for m in instances],
                            inputs=texts_input, config=config,
                            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
                                     Tensor(name="label", dtype=bytes, shape=(1,))])
            else:
                triton.bind(model_name=name, infer_func=[language_model_function(m.language_models[name]) for m in instances],
                            inputs=texts_input, config=config,
                            outputs=[Tensor(name="perplexity", dtype=np.float32, shape=(1,)),
                                     Tensor(name="tokens", dtype=bytes, shape=(-1,)),
                                     Tensor(name="log_probs", dtype=np.float32, shape=(-1,))])
        triton.serve()


if __name__ == "__main__":
    main()
