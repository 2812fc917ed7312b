"""A client that has not finished sending a request's headers within TEXTSERVE_HEADER_TIMEOUT_S
gets 408 and its connection is closed.

uvicorn arms no timer while a request's headers arrive, nor on a new connection before its
first byte (its keep-alive timer runs only between requests). A client that opens connections
and sends a header line now and then (slowloris) held each one for as long as it liked: a probe
sending one header line a second was still connected after 65 s, one file descriptor and one
parser per connection. nginx's `client_header_timeout` and Envoy's `request_headers_timeout`
are the same guard. A slow *body* is bounded by the request timeout (TEXTSERVE_REQUEST_TIMEOUT_S,
504), since the service reads the body inside the request's handling.

`install()` wraps four methods of uvicorn's httptools protocol, the one BentoML's HTTP workers
use (uvicorn picks httptools when it is installed; services/service.py calls install at import,
before the worker builds its server).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMER = "_textserve_header_timer"


def timeout_response(timeout_s: float) -> bytes:
    body = json.dumps({"error": f"the request headers did not arrive within {timeout_s:g} s "
                                "(TEXTSERVE_HEADER_TIMEOUT_S); the connection is closed"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def install(timeout_s: float) -> None:
    """Arm a timer when a connection opens and when each request starts; its headers complete
    in time or the client gets 408 and the connection closes. Idempotent."""
    if getattr(HttpToolsProtocol, "_textserve_header_timeout_s", None) is not None:
        HttpToolsProtocol._textserve_header_timeout_s = timeout_s
        return
    HttpToolsProtocol._textserve_header_timeout_s = timeout_s
    connection_made, on_message_begin = HttpToolsProtocol.connection_made, HttpToolsProtocol.on_message_begin
    on_headers_complete, connection_lost = HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.connection_lost

    def disarm(protocol) -> None:
        timer = getattr(protocol, TIMER, None)
        if timer is not None:
            timer.cancel()
            setattr(protocol, TIMER, None)

    def expire(protocol) -> None:
        setattr(protocol, TIMER, None)
        if not protocol.transport.is_closing():
            protocol.transport.write(timeout_response(HttpToolsProtocol._textserve_header_timeout_s))
            protocol.transport.close()

    def arm(protocol) -> None:
        disarm(protocol)
        setattr(protocol, TIMER, protocol.loop.call_later(HttpToolsProtocol._textserve_header_timeout_s, expire, protocol))

    def made(self, transport) -> None:
        connection_made(self, transport)
        arm(self)

    def begin(self) -> None:
        on_message_begin(self)
        arm(self)

    def headers_complete(self) -> None:
        disarm(self)
        on_headers_complete(self)

    def lost(self, exc) -> None:
        disarm(self)
        connection_lost(self, exc)

    HttpToolsProtocol.connection_made = made
    HttpToolsProtocol.on_message_begin = begin
    HttpToolsProtocol.on_headers_complete = headers_complete
    HttpToolsProtocol.connection_lost = lost
