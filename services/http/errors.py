"""Every error the service answers is `{"error": "what was wrong"}` with a 4xx/5xx status.

FastAPI's own validation errors (a list, status 422) and unmatched routes are rewritten to that
shape here, so a client only ever parses one error format.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger("bentoml.textserve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


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


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """An error's headers (Retry-After, WWW-Authenticate) as ASGI header pairs."""
    return [(key.lower().encode(), value.encode()) for key, value in headers.items()]


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
        return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")

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
    """The error statuses an operation can answer, as the service's code raises them (401 on
    every route that needs a key once keys are configured: services/http/access.py)."""
    if path == "/v2/repository/index":
        return [400, 401]
    if path.startswith("/v2/repository/"):  # load, unload
        return [400, 401, 403, 404, 504]
    if method == "post":  # validation, limits, admission, batching, timeout; models by name
        return [400, 401, 404, 413, 429, 503, 504]
    if "{name}" in path:
        return [401, 404, 503] if path.endswith("/ready") else [401, 404]
    if path == "/v2/health/ready":
        return [503]
    return [] if path in ("/v2/health/live",) else [401]


def document_errors(app: FastAPI, model_names=None, add_examples=None) -> None:
    """The OpenAPI document tells the truth about errors: every operation lists the statuses it
    can answer with the {"error": ...} body, and FastAPI's 422 (which this service answers as
    400, see install_error_handlers) is dropped. The OIP infer routes, which read their body
    themselves, get its schema. With `model_names` (a callable), model names in paths and
    bodies are documented as the loaded models' names (the document is built on first request,
    once the models are loaded)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        names = sorted(model_names()) if model_names is not None else []
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
        if add_examples is not None:  # real ones, for the loaded models (docs_page.py)
            add_examples(document)
        document["components"]["schemas"].pop("HTTPValidationError", None)
        document["components"]["schemas"].pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi


class JsonNotFound:
    """ASGI middleware around the whole server: the router's plain-text 404 for a path nobody
    serves becomes `{"error": "no such endpoint: ..."}`; every other response passes as it is."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rewriting = False

        async def send_json_404(message) -> None:
            nonlocal rewriting
            if message["type"] == "http.response.start" and message["status"] == 404:
                headers = dict(message.get("headers", []))
                rewriting = headers.get(b"content-type", b"").startswith(b"text/plain")
            if not rewriting:
                return await send(message)
            if message["type"] == "http.response.start":
                return  # sent with the body, once its length is known
            if message.get("more_body"):
                return  # drop the plain-text body
            body = json.dumps({"error": f"no such endpoint: {scope['method']} {scope['path']}"}).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_json_404)
