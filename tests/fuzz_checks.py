"""Schemathesis checks of our own, loaded with SCHEMATHESIS_HOOKS=tests.fuzz_checks (tests/test_fuzz.py, make fuzz)."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def error_has_a_message(ctx, response, case) -> None:
    """Every 4xx and 5xx is JSON {"error": "..."} with a message that is not empty."""
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} whose body is not JSON: {response.content[:200]!r}") from None
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str) or len(message.strip()) < 10:
        raise AssertionError(f"{response.status_code} without an error message: {response.content[:200]!r}")
