"""Keep-alive connections that move between HTTP workers now and then, so no worker sits idle.

The HTTP workers share one listening socket and a client's keep-alive connection stays with the
worker that accepted it. A burst of new connections can all land on one worker (the other has
no free core to wake on when the machine is busy): `make bench` saw all 64 of its connections
on one of two workers, at half the machine's throughput, for the whole level. nginx
(`keepalive_requests`) and Envoy (`max_requests_per_connection`) bound the requests one
connection carries for the same reason.

Each response asks the client to close its connection with probability 1 / N (N =
TEXTSERVE_REQUESTS_PER_CONNECTION): a connection carries N requests on average, with no
per-connection state to keep, and the client's next connection is accepted by whichever
worker is free first. Reconnecting costs a client a TCP handshake every N requests.
"""

from __future__ import annotations

import random


def close_probability(requests_per_connection: int) -> float:
    """1 / N, or 0 (never) when N is 0."""
    return 1 / requests_per_connection if requests_per_connection > 0 else 0.0


class RecycleConnections:
    """ASGI middleware: `Connection: close` on a response with probability 1 / requests_per_connection
    (never when it is 0). uvicorn closes the connection after such a response."""

    def __init__(self, app, requests_per_connection: int, rng: random.Random | None = None) -> None:
        self.app = app
        self.close_probability = close_probability(requests_per_connection)
        self.rng = rng or random.Random()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.rng.random() >= self.close_probability:
            return await self.app(scope, receive, send)

        async def send_with_close(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_with_close)
