"""The one error kind of the service, and its one mapping to what a client sees.

Any layer (a route, the batcher, the runner's client, model control) raises ApiError(status,
message[, headers]); the HTTP pipeline (services/http/pipeline.py), FastAPI's handlers
(services/http/errors.py) and gRPC (services/api/grpc_inference.py) all answer it through the
functions below: `{"error": message}` with the status over HTTP, the matching gRPC status code
with the same message over gRPC. Neutral on purpose: backends raise it without importing
anything of the HTTP layer.
"""

from __future__ import annotations

import difflib
import json

import grpc

RETRY_AFTER_S = "1"  # what every refusal for overload tells a client to wait

# The gRPC status of each HTTP status the service raises.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # a limit of the request itself; the message names it and its variable
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def overloaded(message: str, status: int = 503) -> ApiError:
    """A refusal for want of capacity: retrying soon may succeed."""
    return ApiError(status, message, {"Retry-After": RETRY_AFTER_S})


def internal_error(error: BaseException) -> ApiError:
    """What a client sees of a bug: its kind, never its details (the log has the traceback)."""
    return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details")


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def http_headers(error: ApiError) -> list[tuple[bytes, bytes]]:
    """An error's headers (Retry-After, WWW-Authenticate, Allow) as ASGI header pairs."""
    return [(key.lower().encode(), value.encode()) for key, value in error.headers.items()]


def grpc_code(error: ApiError) -> grpc.StatusCode:
    return GRPC_CODES.get(error.status, grpc.StatusCode.INTERNAL)


NAMES_IN_A_MESSAGE = 6


def some_names(names, asked: str) -> str:
    """The loaded model names for a 404's message: all of them when few, else the few closest
    to the name asked for and how many more there are (a zoo of 27 made a 1,000-character line)."""
    names = sorted(names)
    if len(names) <= NAMES_IN_A_MESSAGE:
        return str(names)
    closest = difflib.get_close_matches(asked, names, n=NAMES_IN_A_MESSAGE, cutoff=0.0)
    return f"{sorted(closest)} and {len(names) - len(closest)} more (GET /models lists every one)"
