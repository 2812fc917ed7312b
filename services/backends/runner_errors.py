"""The runner's errors of its own, shared by the runner (runner.py), its socket protocol
(shared_runner.py) and the service that words them for clients (service.py runner_error), so
that none of them imports another for them. With BentoML's own refusals they make the runner's
whole vocabulary: overloaded (ServiceUnavailable: a batch that cannot start in time), not loaded
(ModelNotLoaded, a NotFound: over BentoML's proxy it arrives as a plain NotFound, which the runner
raises for nothing else), failed (InferenceFailed) and unavailable (the connection, in the clients)."""

from __future__ import annotations

import logging
from http import HTTPStatus

import bentoml

logger = logging.getLogger("bentoml.textserve")


class InferenceFailed(bentoml.exceptions.BentoMLException):
    """onnxruntime (or the encoding before it) failed on a model's texts: a 500 whose message
    names the model and onnxruntime's reason (the service passes it on to the client)."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelNotLoaded(bentoml.exceptions.NotFound):
    """The runner has no sessions for a model the HTTP worker serves: its load failed there, or a
    reload is under way."""


def inference_failure(model: str, error: Exception) -> InferenceFailed:
    reason = str(error).strip().splitlines()[0][:600] if str(error).strip() else type(error).__name__
    logger.error("inference failed for model %s: %s: %s", model, type(error).__name__, error)
    return InferenceFailed(f"inference failed for model {model!r}: {type(error).__name__}: {reason}")
