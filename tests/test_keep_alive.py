"""Connection recycling: about one response in N closes its keep-alive connection."""

import asyncio
import random

from services.http.keep_alive import RecycleConnections


def test_about_one_response_in_n_closes_and_replaces_any_connection_header():
    async def inner_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"{}"})

    def closes(middleware) -> bool:
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(middleware({"type": "http"}, None, send))
        headers = sent[0]["headers"]
        assert sent[1]["body"] == b"{}" and [n for n, _ in headers].count(b"connection") == 1
        return dict(headers)[b"connection"] == b"close"

    assert all(closes(RecycleConnections(inner_app, 1)) for _ in range(20))
    assert not any(closes(RecycleConnections(inner_app, 0)) for _ in range(20))
    sampled = RecycleConnections(inner_app, 10, rng=random.Random(7))
    closed = sum(closes(sampled) for _ in range(2000))
    assert 150 <= closed <= 250  # binomial(2000, 0.1): mean 200, sd 13.4
