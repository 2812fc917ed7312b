"""Open Inference Protocol v2 (KServe / Triton HTTP) routes, binary tensor extension included.

A classifier takes one BYTES input `text` of shape [N] (or [N, 1]) and answers two outputs:
`probabilities` FP32 [N, K] in the order of the model's labels, and `label` BYTES [N]. The
texts go through TextService.probabilities, the same batched path as POST /classify.

A language model takes the same input and answers what POST /lm/score does: `log_prob` FP32 [N]
(each text's total, its closing <eos> included), `token_count` INT64 [N], `perplexity` FP32 [N]
and `token_log_probs` FP32 [N, T], row i's first token_count[i] entries real and the rest 0.
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

import bentoml
from services.api.http_api import json_response, off_the_loop_if_large
from services.errors import ApiError
from services.backends.inference import IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, Bundle
from services.api.oip import InferRequest, OIPError, OutputTensor, decode_infer_request, encode_infer_response, parse_header_length, select_outputs

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

SERVER_NAME = "textserve"
SERVER_VERSION = "0.1.0"
INPUT_NAME = "text"
IMAGE_INPUT_NAME = "images"
OUTPUTS = ("probabilities", "label")
LANGUAGE_MODEL_OUTPUTS = ("log_prob", "token_count", "perplexity", "token_log_probs")
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]


def model_version(bundle: Bundle) -> str:
    return bundle.version  # a decimal number, as Triton's; the store tag keeps the sha256's first 16 hex digits


def checked_bundle(service, name: str, version: str | None) -> Bundle:
    bundle = service.bundle(name)
    if version is not None and version != model_version(bundle):
        raise ApiError(404, f"model {name!r} version {version!r} is not loaded; the version served is {model_version(bundle)!r}")
    return bundle


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live", summary="200 while the server process runs")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="200 once every model that loaded is warmed up; lists any that failed to load")
async def ready(service=Depends(bentoml.get_current_service)) -> dict:
    missing = await service.models_not_ready()
    if missing:
        raise ApiError(503, f"not ready: models {missing} are not loaded yet")
    # A model whose bundle failed its checks does not hold the others back; it is named here,
    # in /v2/models/{name}/ready (503 with the reason) and in textserve_model_loaded.
    return {"ready": True, **({"failed_to_load": service.failed_models} if service.failed_models else {})}


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(name: str, version: str | None = None, service=Depends(bentoml.get_current_service)) -> dict:
    return metadata_of(checked_bundle(service, name, version))


def metadata_of(bundle: Bundle) -> dict:
    """A model's OIP v2 metadata (HTTP above, gRPC's ModelMetadata)."""
    if is_language_model(bundle):
        outputs = [
            {"name": "log_prob", "datatype": "FP32", "shape": [-1]},
            {"name": "token_count", "datatype": "INT64", "shape": [-1]},
            {"name": "perplexity", "datatype": "FP32", "shape": [-1]},
            {"name": "token_log_probs", "datatype": "FP32", "shape": [-1, -1]},
        ]
        parameters = {"architecture": bundle.architecture, "vocabulary_size": bundle.config["model"]["vocab_size"]}
    else:
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(bundle.labels)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ]
        parameters = {"labels": list(bundle.labels), "architecture": bundle.architecture}
    # [N, 1], as Triton states a batched input of one value per row (the config's dims [1]);
    # a tensor of shape [N] is taken too. perf_analyzer shapes its texts from this.
    inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1, 1]}]
    if is_image_model(bundle):
        side = image_side(bundle)
        inputs = [{"name": IMAGE_INPUT_NAME, "datatype": "FP32", "shape": [-1, 1, side, side]}]
        parameters["input_range"] = [0.0, 1.0]  # ink, after models/image_encoding.py's scaling
    return {
        "name": bundle.name,
        "versions": [model_version(bundle)],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    }


@router.get("/models/{name}/ready", summary="200 once this model is loaded and warmed up")
@router.get("/models/{name}/versions/{version}/ready", summary="200 once this model is loaded and warmed up")
async def model_ready(name: str, version: str | None = None, service=Depends(bentoml.get_current_service)) -> dict:
    bundle = checked_bundle(service, name, version)
    if bundle.name in await service.models_not_ready():
        raise ApiError(503, f"model {name!r} is not loaded yet")
    return {"name": bundle.name, "ready": True}


@router.post("/models/{name}/infer", summary="Classify a BYTES tensor of texts")
@router.post("/models/{name}/versions/{version}/infer", summary="Classify a BYTES tensor of texts")
async def infer(name: str, request: Request, version: str | None = None, service=Depends(bentoml.get_current_service)) -> Response:
    body, headers = await infer_answer(request, service, await request.body(), name, version,
                                       request.headers.get("inference-header-content-length"))
    return Response(content=body, headers=headers)


async def infer_answer(request, service, raw: bytes, name: str, version: str | None,
                       header_length: str | None) -> tuple[bytes, dict[str, str]]:
    """POST /v2/models/{name}[/versions/{version}]/infer from the body's bytes (decoded by the
    pipeline) and the header the binary extension reads, to the answer's bytes and headers: the
    documented route above and the pipeline's FRONT route (services/api/hot_routes.py) both run it."""
    bundle = checked_bundle(service, name, version)
    request.state.model = bundle.name
    try:
        inference = await off_the_loop_if_large(raw, decode_infer_request, parse_header_length(header_length))
    except OIPError as error:
        raise ApiError(400, str(error)) from None
    outputs = await infer_outputs(service, bundle, inference)
    return encode_infer_response(bundle.name, model_version(bundle), inference.id, outputs,
                                 inference.binary_output_names([output.name for output in outputs]))


async def infer_outputs(service, bundle: Bundle, inference: InferRequest) -> list[OutputTensor]:
    """The outputs a decoded infer request selected, in its order, from its inputs run through
    the batched path: what HTTP (above) and gRPC (grpc_inference.py) answer."""
    try:
        if is_image_model(bundle):
            images = images_from_request(inference.inputs, image_side(bundle))
        else:
            texts = texts_from_request(inference.inputs)
        selected = select_outputs(inference, list(LANGUAGE_MODEL_OUTPUTS if is_language_model(bundle) else OUTPUTS))
    except OIPError as error:
        raise ApiError(400, str(error)) from None
    if is_image_model(bundle):
        service.check_image_count(len(images))
        probabilities = await service.image_probabilities(bundle.name, images)
    elif is_language_model(bundle):
        tensors = language_model_tensors(await service.scores(bundle.name, texts))
        return [tensors[name] for name in selected]
    else:
        probabilities = await service.probabilities(bundle.name, texts)  # (N, K)
    tensors = {
        "probabilities": OutputTensor("probabilities", "FP32", probabilities.astype(np.float32)),
        "label": OutputTensor("label", "BYTES", np.array([bundle.labels[i] for i in probabilities.argmax(axis=1)], dtype=object)),
    }
    return [tensors[name] for name in selected]


def is_image_model(bundle: Bundle) -> bool:
    return bundle.architecture == IMAGE_ARCHITECTURE


def image_side(bundle: Bundle) -> int:
    return int(bundle.config["encoding"]["size"])


def images_from_request(inputs: dict[str, np.ndarray], side: int) -> np.ndarray:
    """The one FP32 input `images` of shape [N, 1, side, side], ink scaled to [0, 1]."""
    if set(inputs) != {IMAGE_INPUT_NAME}:
        raise OIPError(f"this model takes one FP32 input named {IMAGE_INPUT_NAME!r}; got inputs {sorted(inputs)}")
    array = inputs[IMAGE_INPUT_NAME]
    if array.dtype != np.float32:
        raise OIPError(f"input {IMAGE_INPUT_NAME!r} must have datatype FP32")
    if array.ndim != 4 or array.shape[1:] != (1, side, side) or array.shape[0] < 1:
        raise OIPError(f"input {IMAGE_INPUT_NAME!r} must have shape [N, 1, {side}, {side}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise OIPError(f"input {IMAGE_INPUT_NAME!r} must hold finite numbers")
    return np.clip(array, 0.0, 1.0)


def is_language_model(bundle: Bundle) -> bool:
    return bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE


def language_model_tensors(scored: list[dict]) -> dict[str, OutputTensor]:
    counts = np.array([len(s["log_probs"]) for s in scored], dtype=np.int64)
    token_log_probs = np.zeros((len(scored), int(counts.max())), dtype=np.float32)  # (N, T), 0 past each count
    for row, s in enumerate(scored):
        token_log_probs[row, : counts[row]] = s["log_probs"]
    totals = np.array([sum(s["log_probs"]) for s in scored], dtype=np.float64)
    return {
        "log_prob": OutputTensor("log_prob", "FP32", totals.astype(np.float32)),
        "token_count": OutputTensor("token_count", "INT64", counts),
        "perplexity": OutputTensor("perplexity", "FP32", np.exp(-totals / counts).astype(np.float32)),
        "token_log_probs": OutputTensor("token_log_probs", "FP32", token_log_probs),
    }


def texts_from_request(inputs: dict[str, np.ndarray]) -> list[str]:
    """The one BYTES input `text` of shape [N] or [N, 1], decoded from UTF-8."""
    if set(inputs) != {INPUT_NAME}:
        raise OIPError(f"this model takes one BYTES input named {INPUT_NAME!r}; got inputs {sorted(inputs)}")
    array = inputs[INPUT_NAME]
    if array.dtype != object:
        raise OIPError(f"input {INPUT_NAME!r} must have datatype BYTES")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise OIPError(f"input {INPUT_NAME!r} must have shape [N] or [N, 1], got {list(array.shape)}")
    texts = []
    for index, element in enumerate(array.tolist()):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise OIPError(f"input {INPUT_NAME!r} element {index} is not valid UTF-8: {error.reason} at byte {error.start}") from None
    return texts


# --------------------------------------------------------------------------- model repository

def repository_body(raw: bytes, allowed: tuple[str, ...], what: str) -> dict:
    """A repository call's optional JSON body: {} when empty; its parameters checked."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body of {what} must be a JSON object")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError(400, "parameters must be a JSON object")
    unsupported = sorted(set(parameters) - set(allowed))
    if unsupported:
        raise ApiError(400, f"{what}: parameters {unsupported} are not supported (a bundle is loaded as exported, "
                            "from the zoo folder; no config or files can be sent with the call)")
    return body


def optional_json_body(properties: dict) -> dict:
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties}}}}}


PARAMETERS = {"parameters": {"type": "object", "description": "Triton's load parameters; none is supported (config and files are refused)"}}


@router.post("/repository/index", summary="Every bundle the server can serve, with its state (Triton's repository index)",
             openapi_extra=optional_json_body({"ready": {"type": "boolean", "description": "only the models that are READY"}}))
async def repository_index(request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    body = repository_body(await request.body(), (), "the repository index")
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise ApiError(400, f"ready must be true or false, got {ready_only!r}")
    return json_response(service.repository.index(service.model_set, ready_only))


@router.post("/repository/models/{name}/load", summary="Load or reload a bundle from the zoo folder, in every worker",
             openapi_extra=optional_json_body(PARAMETERS))
async def repository_load(name: str, request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    repository_body(await request.body(), (), "load")
    await service.repository.load(name)
    return json_response(loaded_entry(service, name))


@router.post("/repository/models/{name}/unload", summary="Stop serving a model, in every worker, once its requests in flight finish",
             openapi_extra=optional_json_body({"parameters": {"type": "object", "properties": {"unload_dependents": {"type": "boolean"}}}}))
async def repository_unload(name: str, request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    repository_body(await request.body(), ("unload_dependents",), "unload")
    await service.repository.unload(name, service.model_set)
    return json_response({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})


def loaded_entry(service, name: str) -> dict:
    return next(entry for entry in service.repository.index(service.model_set) if entry["name"] == name)
