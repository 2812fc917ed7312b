"""Admission: the texts a worker holds in flight, and the fast refusal once it holds its limit.

Each HTTP worker counts the texts (or words to generate) it has admitted and not yet answered;
a request whose cost would take the count past TEXTSERVE_MAX_PENDING_TEXTS gets 429 with
Retry-After (`Admission.reserve`, called by the service once the body is parsed and its cost
known).

Once the count has reached the limit, no request of any cost can be admitted, so the
pipeline (pipeline.py) answers an admitting route (routes.py) at once, before its body is read,
parsed and validated: `python -m loadtests.overload --ignore-retry-after` (a retry storm) measured a
refusal that went the whole way costing as much CPU as a served small request, so the refusals
themselves became the load and their p99 grew with the number of clients (docs/performance-history.md).
"""

from __future__ import annotations

from services.errors import ApiError, overloaded


class Admission:
    """One worker's count of admitted, unanswered texts against its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    def refusal_message(self) -> str:
        return (f"overloaded: {self.pending} texts (or words to generate) are already waiting in this worker "
                f"(limit {self.limit}, TEXTSERVE_MAX_PENDING_TEXTS); retry shortly")

    def reserve(self, cost: int) -> None:
        """Count `cost` against the limit, or refuse: 429, or 413 for a request that could never fit."""
        if cost > self.limit:  # retrying would not help: say so
            raise ApiError(413, f"{cost} texts (or words to generate) in one request; a worker holds at most {self.limit} "
                                "at once (TEXTSERVE_MAX_PENDING_TEXTS): send fewer per request")
        if self.pending + cost > self.limit:
            raise overloaded(self.refusal_message(), 429)
        self.pending += cost

    def release(self, cost: int) -> None:
        self.pending -= cost
