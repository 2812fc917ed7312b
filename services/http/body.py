"""A request's body, read once for every route: within TEXTSERVE_MAX_BODY_BYTES as it arrives,
then its Content-Encoding undone within the same limit.

The limit bounds what a handler ever holds, compressed or not: a 39 KB gzip body that expands
to 40 MB (a "bomb") is refused with 413 as soon as its output passes the limit, having inflated
at most the limit. Inflating a large body takes milliseconds of CPU, so a body over
INFLATE_IN_THREAD_BYTES is inflated in a thread, never on the event loop that serves every
other connection of the worker.

tritonclient sends gzip (`gzip.compress`) or deflate (`zlib.compress`, zlib-wrapped as RFC 9110
says); some clients send raw DEFLATE for deflate, accepted too.
"""

from __future__ import annotations

import asyncio
import zlib

from services.errors import ApiError

INFLATE_IN_THREAD_BYTES = 16 * 1024
MAX_GZIP_MEMBERS = 64  # tritonclient sends one; each member copies the bytes after it (quadratic)


def too_large_message(limit: int, size: int | None) -> str:
    if size is None:  # chunked: refused as it passed the limit
        return f"the request body passed the limit of {limit} bytes (TEXTSERVE_MAX_BODY_BYTES) while it was being sent"
    return f"the request body has {size} bytes; the limit is {limit} bytes (TEXTSERVE_MAX_BODY_BYTES)"


def inflated_too_large_message(limit: int) -> str:
    return f"the decompressed request body passes the limit of {limit} bytes (TEXTSERVE_MAX_BODY_BYTES)"


def wbits_for(content_encoding: str) -> list[int] | None:
    """zlib's window settings to try for an encoding; None for identity; 400 if unsupported."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return [zlib.MAX_WBITS | 16]
    if encoding == "deflate":
        return [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    raise ApiError(400, f"unsupported Content-Encoding {content_encoding!r}; supported: gzip, deflate, identity")


def inflate(body: bytes, content_encoding: str, limit: int) -> bytes:
    """`body` with `content_encoding` undone, at most `limit` bytes of it, else 413; 400 for a
    body that is not what its encoding says."""
    candidates = wbits_for(content_encoding)
    if candidates is None:
        return body
    last_error: Exception | None = None
    for wbits in candidates:
        try:
            return bounded_inflate(body, wbits, limit)
        except zlib.error as error:
            last_error = error
    raise ApiError(400, f"the request body is not valid {content_encoding.strip().lower()} data: {last_error}")


def bounded_inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Inflate `data` (gzip may hold several concatenated members, RFC 1952 2.2; at most
    MAX_GZIP_MEMBERS) to at most `limit` bytes: each step asks zlib for no more than what is
    left of the limit, plus one byte to tell "exactly at" from "past"."""
    out: list[bytes] = []
    total = 0
    remaining = data
    while True:
        if len(out) == MAX_GZIP_MEMBERS:
            raise ApiError(400, f"the request body has more than {MAX_GZIP_MEMBERS} concatenated gzip members")
        inflater = zlib.decompressobj(wbits)
        chunk = inflater.decompress(remaining, limit - total + 1)
        total += len(chunk)
        out.append(chunk)
        if total > limit or inflater.unconsumed_tail:
            raise ApiError(413, inflated_too_large_message(limit))
        if not inflater.eof:
            raise zlib.error("the compressed stream is truncated")
        remaining = inflater.unused_data
        if not remaining or not (wbits & 16):
            if remaining:
                raise zlib.error(f"{len(remaining)} trailing bytes after the compressed stream")
            return b"".join(out)


async def decoded(body: bytes, content_encoding: bytes | None, limit: int) -> bytes:
    """`body` as its handler reads it: inflated if it came compressed (in a thread when large)."""
    if content_encoding is None:
        return body
    encoding = content_encoding.decode("latin-1")
    if len(body) > INFLATE_IN_THREAD_BYTES:
        return await asyncio.to_thread(inflate, body, encoding, limit)
    return inflate(body, encoding, limit)
