"""Limits on a connection before any request reaches the pipeline: the one patch of uvicorn.

- **Header time.** A client that has not finished sending a request's headers within
  TEXTSERVE_HEADER_TIMEOUT_S gets 408 and its connection is closed. uvicorn arms no timer while
  a request's headers arrive, nor on a new connection before its first byte (its keep-alive
  timer runs only between requests): a client sending one header line a second (slowloris) held
  a connection, a file descriptor and a parser for as long as it liked. nginx's
  `client_header_timeout` and Envoy's `request_headers_timeout` are the same guard.
- **Header size.** A request line and headers of more than TEXTSERVE_MAX_HEADER_BYTES (16 KiB),
  or more than TEXTSERVE_MAX_HEADERS (100) header lines, get 431 and the connection is closed,
  as soon as they pass the limit. Nothing capped them: httptools grows a header value by
  concatenation on the event loop, so 4 sockets sending an endless header value kept a worker's
  keyed /classify waiting for seconds, and many small headers took a worker from 550 MB to
  3.4 GB. nginx (`large_client_header_buffers`) and Node (`--max-http-header-size`) answer 431 /
  400 at the same size.

uvicorn offers no hook for either (its h11 protocol has `h11_max_incomplete_event_size`, the
httptools one nothing), so `install()` wraps six methods of uvicorn's httptools protocol, the one
BentoML's HTTP workers run (uvicorn picks httptools when it is installed), and `check()`, run at
every worker's start-up, refuses to start a server where the wrapping did not take.

How the size is counted: the bytes of a request line and headers that completed are counted
exactly (on_url, on_header); bytes of headers still arriving are counted by the chunk as they
are fed to the parser, so an endless header is cut within one read (at most 256 KB) of the limit.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

WRAPPED = ("connection_made", "data_received", "on_message_begin", "on_url", "on_header", "on_headers_complete",
           "on_body", "on_message_complete", "connection_lost")


class Limits:
    """One connection's state (the protocol's `_textserve_limits`, set as the connection opens):
    its header timer and what its current request's head has used."""

    __slots__ = ("timer", "in_head", "began_in_chunk", "head_bytes", "arriving_bytes", "headers", "refused")

    def __init__(self) -> None:
        self.timer = None
        self.in_head = False  # between a request's first byte and its headers' end
        self.began_in_chunk = False  # the request began inside the chunk being fed: its bytes before are another's
        self.head_bytes = 0  # request line and completed headers, exactly
        self.arriving_bytes = 0  # chunks fed while the head was still arriving
        self.headers = 0
        self.refused = False


def error_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n".encode()
            + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def timeout_response(timeout_s: float) -> bytes:
    return error_response(408, "Request Timeout", f"the request headers did not arrive within {timeout_s:g} s "
                                                  "(TEXTSERVE_HEADER_TIMEOUT_S); the connection is closed")


def too_large_response(what: str) -> bytes:
    return error_response(431, "Request Header Fields Too Large", f"{what}; the connection is closed")


def install(timeout_s: float, max_header_bytes: int, max_headers: int) -> None:
    """Wrap uvicorn's httptools protocol (once per process; a later call changes the limits).
    The wrappers run for every request: their state is one attribute of the protocol, set as
    the connection opens, and the limits are read from one tuple."""
    HttpToolsProtocol._textserve_settings = (timeout_s, max_header_bytes, max_headers)
    if getattr(HttpToolsProtocol, "_textserve_installed", False):
        return
    HttpToolsProtocol._textserve_installed = True
    original = {name: getattr(HttpToolsProtocol, name) for name in WRAPPED}

    def disarm(limits: Limits) -> None:
        if limits.timer is not None:
            limits.timer.cancel()
            limits.timer = None

    def close_with(protocol, response: bytes) -> None:
        limits = protocol._textserve_limits
        limits.refused = True
        disarm(limits)
        if not protocol.transport.is_closing():
            protocol.transport.write(response)
            protocol.transport.close()

    def expire(protocol) -> None:
        protocol._textserve_limits.timer = None
        close_with(protocol, timeout_response(HttpToolsProtocol._textserve_settings[0]))

    def arm(protocol, limits: Limits) -> None:
        disarm(limits)
        limits.timer = protocol.loop.call_later(HttpToolsProtocol._textserve_settings[0], expire, protocol)

    def over(limits: Limits) -> str | None:
        """What the current head has passed, if anything."""
        _, max_bytes, max_count = HttpToolsProtocol._textserve_settings
        if limits.head_bytes > max_bytes or limits.arriving_bytes > max_bytes:
            return f"the request line and headers pass {max_bytes} bytes (TEXTSERVE_MAX_HEADER_BYTES)"
        if limits.headers > max_count:
            return f"the request has more than {max_count} header lines (TEXTSERVE_MAX_HEADERS)"
        return None

    def connection_made(self, transport) -> None:
        self._textserve_limits = Limits()
        original["connection_made"](self, transport)
        arm(self, self._textserve_limits)

    def data_received(self, data: bytes) -> None:
        limits = self._textserve_limits
        if limits.refused:
            return  # answered and closing: nothing more is parsed
        limits.began_in_chunk = False
        original["data_received"](self, data)
        if limits.in_head and not limits.refused:
            if not limits.began_in_chunk:  # the whole chunk belongs to this head
                limits.arriving_bytes += len(data)
            problem = over(limits)
            if problem:
                close_with(self, too_large_response(problem))

    def on_message_begin(self) -> None:
        limits = self._textserve_limits
        limits.in_head = limits.began_in_chunk = True
        limits.head_bytes = limits.arriving_bytes = limits.headers = 0
        original["on_message_begin"](self)
        arm(self, limits)

    def on_url(self, url: bytes) -> None:
        self._textserve_limits.head_bytes += len(url)
        original["on_url"](self, url)

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._textserve_limits
        limits.head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        limits.headers += 1
        settings = HttpToolsProtocol._textserve_settings
        if limits.head_bytes <= settings[1] and limits.headers <= settings[2]:  # past a limit, the rest are not kept
            original["on_header"](self, name, value)

    def on_headers_complete(self) -> None:
        limits = self._textserve_limits
        limits.in_head = False
        disarm(limits)
        problem = over(limits)
        if problem:
            return close_with(self, too_large_response(problem))  # no request reaches the app
        original["on_headers_complete"](self)

    def on_body(self, body: bytes) -> None:
        if not self._textserve_limits.refused:
            original["on_body"](self, body)

    def on_message_complete(self) -> None:
        if not self._textserve_limits.refused:
            original["on_message_complete"](self)

    def connection_lost(self, exc) -> None:
        disarm(self._textserve_limits)
        original["connection_lost"](self, exc)

    for wrapper in (connection_made, data_received, on_message_begin, on_url, on_header, on_headers_complete, on_body,
                    on_message_complete, connection_lost):
        wrapper._textserve = True
        setattr(HttpToolsProtocol, wrapper.__name__, wrapper)


def check() -> None:
    """Raise RuntimeError unless uvicorn will run the wrapped httptools protocol: the limits
    above would otherwise not exist (an upgrade that renamed a method, or h11 chosen)."""
    problems = [name for name in WRAPPED if not getattr(getattr(HttpToolsProtocol, name, None), "_textserve", False)]
    if problems:
        raise RuntimeError(f"the header limits are not installed on uvicorn's httptools protocol ({', '.join(problems)})")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # what BentoML's workers run ("auto")

    if AutoHTTPProtocol is not HttpToolsProtocol:
        raise RuntimeError(f"uvicorn runs {AutoHTTPProtocol.__name__}, not httptools: the header limits would not apply")
