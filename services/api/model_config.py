"""Triton's model configuration extension: what a served model takes and how it is served, as
Triton's `ModelConfig` (model_config.proto). GET /v2/models/{name}[/versions/{v}]/config answers
it as JSON, the gRPC call ModelConfig as the message; tritonclient and perf_analyzer read it
to shape their requests.

Every field says what the service really does:
- `max_batch_size`: the most texts (or images) one request may carry
  (TEXTSERVE_MAX_TEXTS_PER_REQUEST, TEXTSERVE_MAX_IMAGES_PER_REQUEST); the dims below leave the
  batch dimension out, as Triton's do when max_batch_size > 0.
- `input` / `output`: the OIP v2 tensors of the model's metadata (open_inference.metadata_of).
  A tensor of one value per row has dims [1]: the texts input, sent as [N, 1] (the service
  takes [N] too), and each output answered as [N] (a label, a log-probability), reshaped to [].
- `dynamic_batching`: the idle-dispatch batcher (services/backends/batching.py) starts a batch
  as soon as the model is free, so no queue delay; a text that waited longer than
  TEXTSERVE_MAX_LATENCY_MS for its batch is refused (REJECT), and an HTTP worker admits at most
  TEXTSERVE_MAX_PENDING_TEXTS texts at once.
- `instance_group`: CPU or GPU, and how many batches run at once: one per HTTP worker inline,
  the runner's concurrent batches in shared-runner mode.
"""

from __future__ import annotations

from services.api.open_inference import is_image_model, is_language_model, metadata_of, model_version
from services.backends.inference import Bundle
from services.config import ServiceSettings, resolve_device

PER_REQUEST_VALUES = {"label", "log_prob", "token_count", "perplexity"}  # one value per text: shape [N]


def triton_data_type(datatype: str) -> str:
    """OIP v2's datatype name as model_config.proto's DataType (BYTES is TYPE_STRING there)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def tensor_config(tensor: dict, output: bool) -> dict:
    """One OIP v2 tensor of the metadata (shape with its batch dimension first) as a Triton
    ModelInput / ModelOutput without the batch dimension. A tensor of one value per row ([N])
    has dims [1]: an input is then sent as [N, 1], which the service takes as it takes [N]; an
    output, answered as [N], is dims [1] reshaped to [] (Triton's form for it)."""
    dims = list(tensor["shape"][1:])
    config = {"name": tensor["name"], "data_type": triton_data_type(tensor["datatype"]), "dims": dims or [1]}
    if output and not dims:
        config["reshape"] = {"shape": []}
    return config


def config_of(bundle: Bundle, settings: ServiceSettings) -> dict:
    """The model's configuration as Triton's JSON (model_config.proto's field names)."""
    metadata = metadata_of(bundle)
    device = resolve_device(settings.device)
    if settings.inference_mode == "inline":
        instances = settings.http_workers
    else:
        instances = settings.runner_workers * settings.concurrent_batches()
    per_request = settings.max_images_per_request if is_image_model(bundle) else settings.max_texts_per_request
    return {
        "name": bundle.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},  # one version served: the bundle in the zoo
        "max_batch_size": per_request,
        "input": [tensor_config(tensor, output=False) for tensor in metadata["inputs"]],
        "output": [tensor_config(tensor, output=True) for tensor in metadata["outputs"]],
        "dynamic_batching": {
            "max_queue_delay_microseconds": 0,
            "default_queue_policy": {"timeout_action": "REJECT", "default_timeout_microseconds": settings.max_latency_ms * 1000,
                                     "max_queue_size": settings.max_pending_texts},
        },
        "instance_group": [{"name": bundle.name, "kind": "KIND_GPU" if device == "cuda" else "KIND_CPU", "count": instances}],
        "default_model_filename": "model.onnx",
        "parameters": {
            "architecture": {"string_value": bundle.architecture},
            "version": {"string_value": model_version(bundle)},
            "kind": {"string_value": "language_model" if is_language_model(bundle) else "image_classifier" if is_image_model(bundle)
                     else "text_classifier"},
            "inference_mode": {"string_value": settings.inference_mode},
            "max_batch_texts": {"string_value": str(settings.max_batch_texts)},
        },
    }
