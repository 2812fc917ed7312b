"""BentoML's request timeout, without keeping every request alive for the whole timeout.

BentoML 1.4's TimeoutMiddleware (bentoml/_internal/server/http/traffic.py) schedules
`loop.call_later(timeout, ...)` for every request and never cancels it. The timer handle keeps
the request's context (its tracing span, its scope) for the full TEXTSERVE_REQUEST_TIMEOUT_S
after the answer left: at 1,000 requests/s and 30 s, some 500,000 objects that every full
garbage collection walks while the event loop waits (tens of milliseconds of p99; see
docs/performance.md). It also runs each request in an extra task.

This middleware keeps BentoML's contract (no response started within the timeout -> 504 with
an "error" message) and cancels its timer as soon as the response starts. `install()` puts it
where BentoML looks for its own when it builds the server's middleware stack.
"""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from services.http.outcome import request_outcome

REPOSITORY_PREFIX = "/v2/repository/"


def timeout_variable(path: str) -> str:
    return "TEXTSERVE_MODEL_LOAD_TIMEOUT_S" if path.startswith(REPOSITORY_PREFIX) else "TEXTSERVE_REQUEST_TIMEOUT_S"


def timeout_message(timeout_s: float, variable: str) -> str:
    """The 504's words. A model change is not cancelled with its request (model_control.py runs
    it to the end, so that no process is left half-way): say so, and where to see its outcome."""
    if variable == "TEXTSERVE_MODEL_LOAD_TIMEOUT_S":
        return (f"no answer within {timeout_s:g} s ({variable}); the change goes on and may still complete: "
                "GET /v2/repository/index shows what each model serves")
    return f"no answer within {timeout_s:g} s ({variable}); the request was cancelled"


async def within_timeout(work, timeout_s: float, variable: str = "TEXTSERVE_REQUEST_TIMEOUT_S"):
    """Await `work` in the current task, or cancel it and raise 504 once `timeout_s` has
    passed: one timer, cancelled as soon as the work ends, and no extra task (asyncio.wait_for
    starts one per call). The fast front and gRPC calls use it."""
    from services.http.errors import ApiError

    task = asyncio.current_task()
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        return await work
    except asyncio.CancelledError:
        if not timed_out:
            raise
        task.uncancel()
        raise ApiError(504, timeout_message(timeout_s, variable)) from None
    finally:
        timer.cancel()


class TimeoutMiddleware:
    """No response started within `timeout` seconds -> the handler is cancelled and the client
    gets 504 {"error": ...}; a response that has started (a stream) is never cut. The model
    repository's calls (load and unload wait for every process) have TEXTSERVE_MODEL_LOAD_TIMEOUT_S
    instead, and a little more: their own wait gives the 504 that says which process is late."""

    def __init__(self, app, timeout: float) -> None:
        from services.config import SETTINGS

        self.app = app
        self.timeout = timeout
        self.repository_timeout = SETTINGS.model_load_timeout_s * 2 + 10  # a prepare and a commit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        started = timed_out = False
        outcome = request_outcome(scope)

        def expire() -> None:
            nonlocal timed_out
            if not started:
                timed_out = outcome["timed_out"] = True  # counted as the 504 it is (request_timing.py)
                task.cancel()

        repository = scope.get("path", "").startswith(REPOSITORY_PREFIX)
        timeout = self.repository_timeout if repository else self.timeout
        timer = asyncio.get_running_loop().call_later(timeout, expire)

        async def send_marking_start(message) -> None:
            nonlocal started
            if not started:
                started = True
                timer.cancel()  # the handle, and the request it holds, are let go now
            await send(message)

        try:
            await self.app(scope, receive, send_marking_start)
        except asyncio.CancelledError:
            if not timed_out:
                raise
            task.uncancel()
            await JSONResponse({"error": timeout_message(timeout, timeout_variable(scope.get("path", "")))}, status_code=504)(scope, receive, send)
        finally:
            timer.cancel()


def install() -> None:
    """Make BentoML build its servers with this middleware in place of its own."""
    traffic.TimeoutMiddleware = TimeoutMiddleware
