"""Open Inference Protocol v2 (KServe / Triton HTTP) routes, binary tensor extension included.

A classifier takes one BYTES input `text` of shape [N] (or [N, 1]) and answers two outputs:
`probabilities` FP32 [N, K] in the order of the model's labels, and `label` BYTES [N]. The
texts go through TextService.probabilities, the same batched path as POST /classify.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

import bentoml
from services.errors import ApiError
from services.inference import Bundle
from services.oip import OIPError, OutputTensor, decode_infer_request, encode_infer_response, parse_header_length, select_outputs

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

SERVER_NAME = "textserve"
SERVER_VERSION = "0.1.0"
INPUT_NAME = "text"
OUTPUTS = ("probabilities", "label")


def model_version(bundle: Bundle) -> str:
    return bundle.sha256[:16]  # the same version as the model's BentoML store tag


def checked_bundle(service, name: str, version: str | None) -> Bundle:
    bundle = service.bundle(name)
    if version is not None and version != model_version(bundle):
        raise ApiError(404, f"model {name!r} has version {model_version(bundle)!r}, not {version!r}")
    return bundle


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="200 while the server process runs")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="200 once every model is loaded and warmed up")
async def ready(service=Depends(bentoml.get_current_service)) -> dict:
    missing = await service.models_not_ready()
    if missing:
        raise ApiError(503, f"not ready: models {missing} are not loaded yet")
    return {"ready": True}


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(name: str, version: str | None = None, service=Depends(bentoml.get_current_service)) -> dict:
    bundle = checked_bundle(service, name, version)
    return {
        "name": bundle.name,
        "versions": [model_version(bundle)],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(bundle.labels)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"labels": list(bundle.labels), "architecture": bundle.architecture},
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
    bundle = checked_bundle(service, name, version)
    request.state.model = bundle.name
    try:
        inference = decode_infer_request(
            await request.body(),
            parse_header_length(request.headers.get("inference-header-content-length")),
            request.headers.get("content-encoding"),
        )
        texts = texts_from_request(inference.inputs)
        selected = select_outputs(inference, list(OUTPUTS))
    except OIPError as error:
        raise ApiError(400, str(error)) from None
    probabilities = await service.probabilities(bundle.name, texts)  # (N, K)
    tensors = {
        "probabilities": OutputTensor("probabilities", "FP32", probabilities.astype(np.float32)),
        "label": OutputTensor("label", "BYTES", np.array([bundle.labels[i] for i in probabilities.argmax(axis=1)], dtype=object)),
    }
    body, headers = encode_infer_response(
        bundle.name, model_version(bundle), inference.id, [tensors[n] for n in selected], inference.binary_output_names(selected)
    )
    return Response(content=body, headers=headers)


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
