"""FastAPI's side of the one error mapping (services/errors.py), and the OpenAPI document's.

Inside the FastAPI app (the APP routes of routes.py), an ApiError, FastAPI's own validation
errors (a list, status 422) and a bug are answered here in the same `{"error": "what was
wrong"}` shape the pipeline answers everything else with, so a client only ever parses one
error format.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from services.errors import ApiError, internal_error
from services.http.routes import BENTOML, METRICS, OPEN, PAGE, TABLE, document_the_others

logger = logging.getLogger("bentoml.textserve")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def describe_validation_error(error: dict) -> str:
    """One pydantic error as `field.path: message`, e.g. `texts.2: Input should be a valid string`."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    if error.get("type") == "missing":
        return f"{'.'.join(location)}: this field is required"
    if error.get("type") == "extra_forbidden":
        return f"{'.'.join(location)}: unknown field"
    prefix = ".".join(location) or "body"
    return f"{prefix}: {error.get('msg')}"


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one message: the first five, then how many more."""
    problems = [describe_validation_error(e) for e in errors]
    return "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(error.errors()))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _: ClientDisconnect) -> Response:
        # Not the server's error: the client closed the connection before its body was read.
        # Counted as nginx's 499 (client closed request); the answer goes nowhere.
        logger.info("client left %s %s before sending its whole body", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        answer = internal_error(error)
        return error_response(answer.status, answer.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path}")
        if error.status_code == 405:  # its Allow header (RFC 9110) says which methods are
            return error_response(405, f"{request.method} is not allowed on {request.url.path}", error.headers)
        return error_response(error.status_code, str(error.detail), error.headers)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string", "description": "what was wrong"}}}
ERROR_DESCRIPTIONS = {
    400: "malformed input; the message names the field (repository calls: a bundle that failed its checks, and why)",
    401: "an API key is needed (TEXTSERVE_API_KEYS): send Authorization: Bearer KEY",
    403: "load and unload: model control is off (TEXTSERVE_MODEL_CONTROL=none), or the key is not an admin key",
    404: "unknown model or version",
    413: "too many texts, too long a text or too large a body; the message names the limit and its variable",
    429: "overloaded: this worker holds its limit of pending texts; retry after Retry-After",
    503: "overloaded (the batch cannot start in time), not ready, or the model failed to load; the message says which",
    504: "no answer within TEXTSERVE_REQUEST_TIMEOUT_S (repository calls: TEXTSERVE_MODEL_LOAD_TIMEOUT_S)",
}
# OIP v2 inference request, JSON form (the binary tensor extension sends the same header as
# JSON, followed by the tensors' bytes: application/octet-stream with Inference-Header-Content-Length).
INFER_REQUEST_SCHEMA = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "datatype": {"type": "string"}, "parameters": {"type": "object"}, "data": {"type": "array"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}


def error_statuses(method: str, path: str) -> list[int]:
    """The error statuses an operation can answer, as the service's code raises them; 401 on
    every route the route table does not open (once keys are configured: services/http/access.py)."""
    route = TABLE.match(method.upper(), path).route
    if route is None or route.handler in (PAGE, BENTOML):
        return [401] if route is not None and route.access == METRICS else []
    if path == "/v2/repository/index":
        statuses = [400, 401]
    elif path.startswith("/v2/repository/"):  # load, unload
        statuses = [400, 401, 403, 404, 504]
    elif method == "post":  # validation, limits, admission, batching, timeout; models by name
        statuses = [400, 401, 404, 413, 429, 503, 504]
    elif "{name}" in path:
        statuses = [401, 404, 503] if path.endswith("/ready") else [401, 404]
    elif path == "/v2/health/ready":
        statuses = [503]
    else:
        statuses = [401]
    return [status for status in statuses if status != 401 or route.access != OPEN]


def document_errors(app: FastAPI, model_names=None, add_examples=None):
    """The OpenAPI document tells the truth about errors: every operation lists the statuses it
    can answer with the {"error": ...} body, and FastAPI's 422 (which this service answers as
    400, see install_error_handlers) is dropped. The OIP infer routes, which read their body
    themselves, get its schema. With `model_names` (a callable), model names in paths and
    bodies are documented as the loaded models' names (the document is built on first request,
    once the models are loaded).

    Returns `document(with_models)`: the document with the model names and real examples (what
    a caller with a key, or any caller of a server without keys, gets), or without them (a
    caller without a key may read the API, not which models there are). `document.forget()`
    drops both once the loaded models change."""
    build = app.openapi
    built: dict[bool, dict] = {}

    def document(with_models: bool = True) -> dict:
        if with_models not in built:
            app.openapi_schema = None  # FastAPI's own cache: each form is built from scratch
            built[with_models] = openapi(with_models)
        return built[with_models]

    def openapi(with_models: bool) -> dict:
        document = build()
        document_the_others(document)  # the pages, probes and /metrics, from the route table
        names = sorted(model_names()) if model_names is not None and with_models else []
        bodies = [content["schema"] for operations in document["paths"].values() for operation in operations.values()
                  for content in operation.get("requestBody", {}).get("content", {}).values() if "schema" in content]
        for schema in [*document.get("components", {}).get("schemas", {}).values(), *bodies]:
            model = schema.get("properties", {}).get("model")
            if names and model is not None and model.get("type") == "string":
                model["enum"] = names
        document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                for parameter in operation.get("parameters", []):
                    if names and parameter.get("in") == "path" and parameter.get("name") == "name":
                        parameter["schema"] = {**parameter.get("schema", {}), "enum": names}
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in error_statuses(method, path):
                    responses[str(status)] = {"description": ERROR_DESCRIPTIONS[status],
                                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                if path.endswith("/infer"):
                    operation["requestBody"] = {"required": True, "content": {
                        "application/json": {"schema": INFER_REQUEST_SCHEMA},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        if add_examples is not None and with_models:  # real ones, for the loaded models (docs_page.py)
            add_examples(document)
        document["components"]["schemas"].pop("HTTPValidationError", None)
        document["components"]["schemas"].pop("ValidationError", None)
        return document

    document.forget = built.clear
    app.openapi = document
    return document
