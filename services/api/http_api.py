"""The service's own JSON API: POST /classify and GET /models. Requests enter here (and in
open_inference.py for OIP v2); both hand texts to TextService.probabilities, the one path to
the batched runner."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ValidationError

import bentoml
from services.errors import ApiError
from services.http.errors import validation_message
from services.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ExplainRequest,
    ExplainResponse,
    ModelInfo,
    ModelsResponse,
)

router = APIRouter()


def parsed(raw: bytes, schema: type[BaseModel]):
    """The body as JSON whatever its Content-Type (`curl -d` sends a form type), validated by
    pydantic (in Rust); a 400 naming the fields otherwise. The route declares the schema for the
    OpenAPI page itself."""
    try:
        return schema.model_validate_json(raw)
    except ValidationError as error:
        errors = error.errors()
        surrogate = lone_surrogate_in(raw) if errors and "hex escape" in str(errors[0].get("msg", "")) else None
        raise ApiError(400, surrogate or validation_message(errors)) from None


def lone_surrogate_in(raw: bytes) -> str | None:
    """Where a JSON body holds a lone surrogate escape (\\ud800 alone is valid JSON text but no
    Unicode character, so pydantic's parser says only "unexpected end of hex escape"): the field
    and the character, as the message of a 400; None if that was not the problem."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None

    def walk(value, where: str) -> str | None:
        if isinstance(value, str):
            for index, character in enumerate(value):
                if "\ud800" <= character <= "\udfff":
                    return (f"{where} holds a lone surrogate \\u{ord(character):04x} at character {index}, which is no "
                            "Unicode character: send the character itself, or both halves of its surrogate pair")
        elif isinstance(value, dict):
            return next((found for key, item in value.items() if (found := walk(item, key if where == "body" else f"{where}.{key}"))), None)
        elif isinstance(value, list):
            return next((found for index, item in enumerate(value) if (found := walk(item, f"{where}[{index}]"))), None)
        return None

    return walk(value, "body")


PARSE_IN_THREAD_BYTES = 256 * 1024  # a few ms of parsing and more: not on the event loop every connection shares


async def off_the_loop_if_large(raw: bytes, parse, *arguments):
    """`parse(raw, *arguments)`, in a thread when `raw` is large (up to TEXTSERVE_MAX_BODY_BYTES)."""
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(parse, raw, *arguments)
    return parse(raw, *arguments)


async def parse_body(request: Request, schema: type[BaseModel]):
    return await off_the_loop_if_large(await request.body(), parsed, schema)


def requested_bundle(request, service, name: str, kind: str = "classifier"):
    """The named bundle (404 if unknown, 400 if it is not of `kind`), also noted on the request's
    state (`request.state`, or the pipeline exchange's) for the metrics' model label."""
    bundle = service.bundle(name, kind)
    request.state.model = bundle.name
    return bundle


def top_k_or_default(value: int | None, default: int, maximum: int, why: str = "") -> int:
    if value is None:
        return default
    if not 1 <= value <= maximum:
        raise ApiError(400, f"top_k must be between 1 and {maximum}{why}, got {value}")
    return value


def json_body(schema: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def top_k_results(labels: tuple[str, ...], probabilities: np.ndarray, k: int) -> list[dict]:
    """probabilities (N, K) -> one TextResult (as a plain dict) per row, its top k by descending
    probability."""
    results = []
    for row in probabilities.tolist():  # Python floats: one conversion for the whole batch
        order = sorted(range(len(labels)), key=lambda i: -row[i])[:k]  # stable: ties keep label order
        results.append({
            "label": labels[order[0]],
            "probabilities": dict(zip(labels, row)),
            "top_k": [{"label": labels[i], "probability": row[i]} for i in order],
        })
    return results


def json_bytes(content: dict) -> bytes:
    """`content` as compact UTF-8 JSON, by orjson (several times faster than json.dumps for a
    result with a probability per label). Routes answer these bytes instead of a pydantic model:
    FastAPI would otherwise validate our own output against the response model and serialise it
    again, which for 16 texts cost more than the model (docs/performance-history.md). The response model
    still documents the shape, and the end-to-end tests parse bodies strictly with it."""
    return orjson.dumps(content)


def json_response(content: dict) -> Response:
    return Response(json_bytes(content), media_type="application/json")


async def classify_answer(request, service, raw: bytes) -> bytes:
    """POST /classify, from the body's bytes to the answer's: what the FastAPI route below and
    the pipeline (services/api/hot_routes.py) both run. `request` has a `.state` for the model label."""
    body = await off_the_loop_if_large(raw, parsed, ClassifyRequest)
    bundle = requested_bundle(request, service, body.model)
    k = top_k_or_default(body.top_k, min(service.settings.default_top_k, len(bundle.labels)),
                         len(bundle.labels), " (the model's label count)")
    probabilities = await service.probabilities(bundle.name, body.texts)
    return json_bytes({"model": bundle.name, "results": top_k_results(bundle.labels, probabilities, k)})


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify texts with one model",
    openapi_extra=json_body(ClassifyRequest),
)
async def classify(request: Request, service=Depends(bentoml.get_current_service)) -> Response:
    return Response(await classify_answer(request, service, await request.body()), media_type="application/json")


@router.get("/models", response_model=ModelsResponse, summary="Every loaded model")
async def list_models(service=Depends(bentoml.get_current_service)) -> ModelsResponse:
    return ModelsResponse(
        models=[
            ModelInfo(
                name=bundle.name,
                architecture=bundle.architecture,
                preset=bundle.config.get("preset", ""),
                kind=service.kind_of(bundle),
                labels=list(bundle.labels),
                metrics={k: v for k, v in bundle.metrics.items() if k != "history"},
                sha256=bundle.sha256,
                store_tag=service.store_tags[bundle.name],
            )
            for bundle in service.bundles.values()
        ]
    )


DEFAULT_EXPLAIN_TOP_K = 5
MAX_EXPLAIN_TOP_K = 50


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Which n-grams made a Kim CNN decide",
    openapi_extra=json_body(ExplainRequest),
)
async def explain(request: Request, service=Depends(bentoml.get_current_service)) -> ExplainResponse:
    body = await parse_body(request, ExplainRequest)
    bundle = requested_bundle(request, service, body.model)
    if "contributions" not in bundle.config.get("onnx", {}).get("outputs", []):
        raise ApiError(400, f"model {bundle.name!r} ({bundle.architecture}) has no explanations; /explain works for kim-cnn bundles")
    top_k = top_k_or_default(body.top_k, DEFAULT_EXPLAIN_TOP_K, MAX_EXPLAIN_TOP_K)
    results = await service.explanations(bundle.name, body.texts, top_k)
    return ExplainResponse(model=bundle.name, results=results)
