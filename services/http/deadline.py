"""The request timeout: no answer started within its time -> the work is cancelled and the
client gets 504 with a message that says which limit passed.

One timer per request, cancelled as soon as the work ends or its response starts (a started
stream is never cut), and no extra task (asyncio.wait_for starts one per call). BentoML 1.4's own
TimeoutMiddleware never cancels its timer, which kept every request's context alive for the
whole timeout after its answer left: at 1,000 requests/s and 30 s, some 500,000 objects that
each full garbage collection walked while the event loop waited (docs/performance-history.md).
The HTTP pipeline and gRPC both use `within_timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.errors import ApiError

REQUEST_VARIABLE = "TEXTSERVE_REQUEST_TIMEOUT_S"
MODEL_CHANGE_VARIABLE = "TEXTSERVE_MODEL_LOAD_TIMEOUT_S"


def model_change_timeout_s(model_load_timeout_s: float) -> float:
    """A load or unload waits for every process twice (a prepare and a commit), each with its
    own 504 that names the process that is late; this bound comes after both."""
    return model_load_timeout_s * 2 + 10


def timeout_message(timeout_s: float, variable: str) -> str:
    """The 504's words. A model change is not cancelled with its request (model_agreement.py runs
    it to the end, so that no process is left half-way): say so, and where to see its outcome."""
    if variable == MODEL_CHANGE_VARIABLE:
        return (f"no answer within {timeout_s:g} s ({variable}); the change goes on and may still complete: "
                "GET /v2/repository/index shows what each model serves")
    return f"no answer within {timeout_s:g} s ({variable}); the request was cancelled"


async def within_timeout(work: Awaitable, timeout_s: float, variable: str = REQUEST_VARIABLE,
                         answering: Callable[[], bool] = lambda: False):
    """Await `work` in the current task, or cancel it and raise 504 once `timeout_s` has passed,
    unless `answering()` says its response has started by then."""
    task = asyncio.current_task()
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        if not answering():
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
