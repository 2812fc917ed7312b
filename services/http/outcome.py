"""What the ASGI layers around the app did with a request, for the one that counts it.

The timeout middleware (bentoml_timeout.py) answers 504 after cancelling the app, and the body
limit (body_limit.py) answers and counts a 413 while the app still runs; RequestTiming
(request_timing.py), inside both, counts every other request. They share one dict in the
request's ASGI scope, the same object however the scope is copied on the way in:
{"timed_out": True}, so that the request is counted as the 504 it gets, not a 500, and
{"counted": True}, so that it is not counted twice."""

from __future__ import annotations


def request_outcome(scope) -> dict:
    return scope.setdefault("textserve.outcome", {})
